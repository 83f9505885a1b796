-- ocidx fleet schema (PostgreSQL), version 1.
-- Every host is a login role that is a member of ocidx_publisher; the rows a host publishes carry
-- its role name in "host" (filled from session_user), and row-level security lets it write those
-- rows only. Readers (ocidx_reader) can only read. The tables belong to the role that migrates.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ocidx_publisher') THEN
        CREATE ROLE ocidx_publisher NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ocidx_reader') THEN
        CREATE ROLE ocidx_reader NOLOGIN;
    END IF;
END
$$;

-- Hosts never create objects (PostgreSQL 15 already revokes this from PUBLIC; older ones do not).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

CREATE TABLE hosts (
    host          text        PRIMARY KEY,            -- the host's login role
    registered_at timestamptz NOT NULL DEFAULT now(),
    watermark     bigint      NOT NULL DEFAULT 0,     -- the host's local version published through
    published_at  timestamptz                         -- when it last committed a batch
);

CREATE TABLE heartbeats (
    host       text        PRIMARY KEY DEFAULT session_user REFERENCES hosts ON DELETE CASCADE,
    beat_at    timestamptz NOT NULL DEFAULT now(),    -- the server's clock: ages compare across hosts
    backlog    bigint      NOT NULL,                  -- local changes not yet published, as last reported
    pid        integer,
    started_at timestamptz
);

CREATE TABLE layouts (
    host           text    NOT NULL DEFAULT session_user REFERENCES hosts ON DELETE CASCADE,
    id             bigint  NOT NULL,                  -- the layout's id in the host's SQLite index
    path           bytea   NOT NULL,                  -- the directory's bytes (file names need not be UTF-8)
    version        bigint  NOT NULL,                  -- the host's local version of these rows
    state          text    NOT NULL CHECK (state IN ('ok', 'error')),
    error_category text,
    error          text,
    content_hash   text,
    entry_count    integer NOT NULL,
    PRIMARY KEY (host, id),
    UNIQUE (host, path)
);

CREATE TABLE entries (
    host          text    NOT NULL DEFAULT session_user,
    layout_id     bigint  NOT NULL,
    position      integer NOT NULL,                   -- index in index.json "manifests"
    digest        text    NOT NULL,
    media_type    text    NOT NULL,
    size          bigint  NOT NULL,
    platform      text,                               -- JSON, as the host's index holds it
    annotations   text    NOT NULL,                   -- JSON object
    invalid_names text,                               -- JSON list
    warnings      text,                               -- JSON list
    PRIMARY KEY (host, layout_id, position),
    FOREIGN KEY (host, layout_id) REFERENCES layouts (host, id) ON DELETE CASCADE
);
CREATE INDEX entries_digest ON entries (digest);

CREATE TABLE names (
    host           text    NOT NULL DEFAULT session_user,
    layout_id      bigint  NOT NULL,
    entry_position integer NOT NULL,
    ordinal        integer NOT NULL,                  -- the order the names were read in
    name           text    NOT NULL,                  -- canonical repository, '' when unknown
    tag            text    NOT NULL,                  -- '' when untagged
    how            text    NOT NULL,                  -- containerd | tag-only | full | familiar
    PRIMARY KEY (host, layout_id, entry_position, ordinal),
    FOREIGN KEY (host, layout_id) REFERENCES layouts (host, id) ON DELETE CASCADE
);
CREATE INDEX names_tag ON names (tag);
CREATE INDEX names_name_tag ON names (name, tag);

CREATE TABLE children (
    host           text    NOT NULL DEFAULT session_user,
    layout_id      bigint  NOT NULL,
    entry_position integer NOT NULL,
    position       integer NOT NULL,                  -- order of discovery under the entry, depth first
    parent         text    NOT NULL,
    depth          integer NOT NULL,
    digest         text    NOT NULL,
    media_type     text    NOT NULL,
    size           bigint  NOT NULL,
    platform       text,
    annotations    text    NOT NULL,
    PRIMARY KEY (host, layout_id, entry_position, position),
    FOREIGN KEY (host, layout_id) REFERENCES layouts (host, id) ON DELETE CASCADE
);
CREATE INDEX children_digest ON children (digest);

CREATE TABLE layout_warnings (
    host      text    NOT NULL DEFAULT session_user,
    layout_id bigint  NOT NULL,
    ordinal   integer NOT NULL,
    message   text    NOT NULL,
    PRIMARY KEY (host, layout_id, ordinal),
    FOREIGN KEY (host, layout_id) REFERENCES layouts (host, id) ON DELETE CASCADE
);

-- Privileges: reading for both groups; writing published rows for publishers; nothing else.
-- TRUNCATE is never granted (row-level security does not apply to it).
GRANT SELECT ON ocidx_migrations, hosts, heartbeats, layouts, entries, names, children, layout_warnings
    TO ocidx_reader, ocidx_publisher;
GRANT INSERT, UPDATE, DELETE ON heartbeats, layouts, entries, names, children, layout_warnings
    TO ocidx_publisher;
GRANT UPDATE (watermark, published_at) ON hosts TO ocidx_publisher;

-- Row-level security, forced so that not even the tables' owner writes around it by accident.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['hosts', 'heartbeats', 'layouts', 'entries', 'names', 'children', 'layout_warnings']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR SELECT TO ocidx_reader, ocidx_publisher USING (true)',
                       t || '_read', t);
        -- The migrating role administers hosts (ocidx fleet add-host, remove-host).
        EXECUTE format('CREATE POLICY %I ON %I TO %I USING (true) WITH CHECK (true)', t || '_admin', t, current_user);
        IF t <> 'hosts' THEN
            EXECUTE format('CREATE POLICY %I ON %I FOR INSERT TO ocidx_publisher WITH CHECK (host = session_user)',
                           t || '_insert', t);
            EXECUTE format('CREATE POLICY %I ON %I FOR DELETE TO ocidx_publisher USING (host = session_user)',
                           t || '_delete', t);
        END IF;
        EXECUTE format('CREATE POLICY %I ON %I FOR UPDATE TO ocidx_publisher '
                       'USING (host = session_user) WITH CHECK (host = session_user)', t || '_update', t);
    END LOOP;
END
$$;
