-- ocidx schema, version 1.
-- The database is a cache of the layouts on disk: every row can be rebuilt by a scan.

CREATE TABLE layouts (
    id             INTEGER PRIMARY KEY,
    path           TEXT    NOT NULL UNIQUE,  -- the layout directory, symlinks resolved
    -- identity of index.json as of the last read (good or not)
    dev            INTEGER,
    ino            INTEGER,
    size           INTEGER,
    mtime_ns       INTEGER,
    ctime_ns       INTEGER,
    read_ns        INTEGER,                  -- wall clock when that read began (racy-clean check)
    content_hash   TEXT,                     -- "sha256:..." of the index.json bytes the rows came from
    state          TEXT    NOT NULL CHECK (state IN ('ok', 'error')),
    error_category TEXT,                     -- set while state = 'error'
    error          TEXT,
    last_good_ns   INTEGER,                  -- when the rows were last read from a good index.json
    checked_ns     INTEGER NOT NULL,         -- when a scan last looked at this layout
    entry_count    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE entries (
    id               INTEGER PRIMARY KEY,
    layout_id        INTEGER NOT NULL REFERENCES layouts (id) ON DELETE CASCADE,
    position         INTEGER NOT NULL,       -- index in index.json "manifests"
    row_key          TEXT    NOT NULL,       -- hash of everything below: rows are diffed on it
    digest           TEXT    NOT NULL,
    media_type       TEXT    NOT NULL,
    size             INTEGER NOT NULL,
    platform         TEXT,                   -- JSON {"os","architecture","variant",...} or NULL
    annotations      TEXT    NOT NULL,       -- JSON object, string values as written
    invalid_names    TEXT,                   -- JSON list of raw ref names that were not readable
    warnings         TEXT                    -- JSON list
);
CREATE INDEX entries_layout ON entries (layout_id);
CREATE INDEX entries_digest ON entries (digest);

CREATE TABLE names (
    entry_id   INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    layout_id  INTEGER NOT NULL,
    name       TEXT    NOT NULL,             -- canonical repository, '' when unknown
    tag        TEXT    NOT NULL,             -- '' when the annotation had no tag
    how        TEXT    NOT NULL              -- containerd | tag-only | full | familiar
);
CREATE INDEX names_tag ON names (tag, layout_id);
CREATE INDEX names_name_tag ON names (name, tag, layout_id);
CREATE INDEX names_entry ON names (entry_id);

CREATE TABLE children (
    entry_id   INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    layout_id  INTEGER NOT NULL,
    position   INTEGER NOT NULL,             -- order of discovery, depth first
    parent     TEXT    NOT NULL,             -- digest of the index that lists it
    depth      INTEGER NOT NULL,             -- 1 = listed by a top-level index
    digest     TEXT    NOT NULL,
    media_type TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    platform   TEXT,
    annotations TEXT   NOT NULL
);
CREATE INDEX children_entry ON children (entry_id);
CREATE INDEX children_digest ON children (digest);

CREATE TABLE layout_warnings (
    layout_id  INTEGER NOT NULL REFERENCES layouts (id) ON DELETE CASCADE,
    message    TEXT    NOT NULL
);
CREATE INDEX layout_warnings_layout ON layout_warnings (layout_id);

CREATE TABLE daemon (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    pid               INTEGER,
    started_ns        INTEGER,
    heartbeat_ns      INTEGER,
    stopped_ns        INTEGER,
    last_reconcile_ns INTEGER,
    watch_mode        TEXT,                  -- 'inotify' or 'polling' (and why)
    roots             TEXT                   -- JSON list
);
