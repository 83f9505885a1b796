-- ocidx fleet schema, version 2: no host and no reader can block another session.
--
-- Version 1 let hosts write the tables directly, row-level security keeping each to its own rows.
-- But a privilege on a table is also a right to lock it: a host could LOCK TABLE ... IN ACCESS
-- EXCLUSIVE MODE and keep its transaction open, and every reader and publisher waited. Worse, any
-- role that can name a table can queue a strong lock on it before PostgreSQL checks ownership
-- (CREATE RULE asks for ACCESS EXCLUSIVE, CREATE TRIGGER for SHARE ROW EXCLUSIVE, then fail): queued
-- behind any open transaction on the table, such a request holds up every session that comes after
-- it. So from here on:
--
-- * the tables live in schema ocidx_data, which no host and no reader may even look into (no
--   USAGE): they cannot name a table, so they can neither lock it nor queue a lock on it;
-- * hosts and readers call the functions of schema ocidx. Each runs as the role ocidx_api
--   (SECURITY DEFINER; NOLOGIN, no superuser, no BYPASSRLS), with its search_path pinned to
--   ocidx_data then pg_temp, so that nothing a caller creates can stand in for a table; every
--   write is about the caller's own rows (host = session_user), which row-level security
--   enforces on ocidx_api as well. A host that calls them in a transaction it keeps open holds row
--   locks on its own rows and ROW EXCLUSIVE on the tables: neither blocks a reader or another host;
-- * ocidx_publisher is a member of ocidx_reader: a host may read the fleet as before;
-- * the fleet's incarnation (ocidx.fleet_incarnation()) and the SQLite incarnation each host's
--   rows came from (hosts.sqlite_incarnation) let a publisher notice a restored database or a
--   rebuilt index and reconcile in full.
--
-- The tables keep their owner, the administrator, whose sessions find them through its
-- search_path (ocidx fleet migrate, add-host and remove-host put ocidx_data first).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ocidx_api') THEN
        CREATE ROLE ocidx_api NOLOGIN;
    ELSIF EXISTS (SELECT FROM pg_roles WHERE rolname = 'ocidx_api' AND (rolsuper OR rolbypassrls OR rolcanlogin)) THEN
        RAISE EXCEPTION 'role ocidx_api exists and can log in, is a superuser or bypasses row-level security: '
                        'the fleet''s functions would run with those rights; drop or alter it first';
    END IF;
    -- The functions are created as ocidx_api (SET ROLE below): a non-superuser administrator must be
    -- a member of it (a superuser is a member of every role).
    IF NOT pg_has_role(current_user, 'ocidx_api', 'MEMBER') THEN
        EXECUTE format('GRANT ocidx_api TO %I', current_user);
    END IF;
END
$$;

CREATE SCHEMA ocidx_data;
COMMENT ON SCHEMA ocidx_data IS 'ocidx fleet tables: reached only through the functions of schema ocidx';

-- Old readers and publishers look for ocidx_migrations on their search_path: a view left where the
-- table was tells them the schema is newer than they know ("upgrade ocidx").
DO $$
DECLARE
    t text;
    home text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = 'ocidx_migrations'::regclass);
BEGIN
    FOREACH t IN ARRAY ARRAY['ocidx_migrations', 'hosts', 'heartbeats', 'layouts', 'entries', 'names', 'children',
                             'layout_warnings']
    LOOP
        EXECUTE format('ALTER TABLE %I.%I SET SCHEMA ocidx_data', home, t);
    END LOOP;
    EXECUTE format('CREATE VIEW %I.ocidx_migrations AS SELECT name, applied_at FROM ocidx_data.ocidx_migrations', home);
    EXECUTE format('GRANT SELECT ON %I.ocidx_migrations TO ocidx_reader, ocidx_publisher', home);
END
$$;

-- The database's own identity: with the catalog's identities (ocidx.fleet_incarnation) it changes
-- when the database is restored or re-created. An administrator who repaired rows by hand can make
-- every publisher reconcile in full: UPDATE ocidx_data.fleet SET incarnation = gen_random_uuid().
CREATE TABLE ocidx_data.fleet (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    incarnation uuid    NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO ocidx_data.fleet DEFAULT VALUES;

-- The incarnation of the SQLite index the host's rows were published from, moved with the watermark.
ALTER TABLE ocidx_data.hosts ADD COLUMN sqlite_incarnation text;

-- Privileges: hosts and readers hold none on the tables. ocidx_api reads everything and writes what
-- the publishing functions write.
REVOKE ALL ON ALL TABLES IN SCHEMA ocidx_data FROM PUBLIC, ocidx_publisher, ocidx_reader;
GRANT USAGE ON SCHEMA ocidx_data TO ocidx_api;
GRANT SELECT ON ALL TABLES IN SCHEMA ocidx_data TO ocidx_api;
GRANT INSERT, DELETE ON ocidx_data.layouts, ocidx_data.entries, ocidx_data.names, ocidx_data.children,
    ocidx_data.layout_warnings TO ocidx_api;
GRANT INSERT, UPDATE ON ocidx_data.heartbeats TO ocidx_api;
GRANT UPDATE (watermark, published_at, sqlite_incarnation) ON ocidx_data.hosts TO ocidx_api;
GRANT ocidx_reader TO ocidx_publisher;

-- Row-level security: the hosts' own policies go (they write nothing now); ocidx_api reads every row
-- and writes the caller's only, whatever a function's body says.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['hosts', 'heartbeats', 'layouts', 'entries', 'names', 'children', 'layout_warnings']
    LOOP
        EXECUTE format('DROP POLICY IF EXISTS %I ON ocidx_data.%I', t || '_read', t);
        EXECUTE format('DROP POLICY IF EXISTS %I ON ocidx_data.%I', t || '_insert', t);
        EXECUTE format('DROP POLICY IF EXISTS %I ON ocidx_data.%I', t || '_delete', t);
        EXECUTE format('DROP POLICY IF EXISTS %I ON ocidx_data.%I', t || '_update', t);
        EXECUTE format('CREATE POLICY %I ON ocidx_data.%I FOR SELECT TO ocidx_api USING (true)', t || '_api_read', t);
        EXECUTE format('CREATE POLICY %I ON ocidx_data.%I TO ocidx_api '
                       'USING (host = session_user) WITH CHECK (host = session_user)', t || '_api_write', t);
    END LOOP;
END
$$;

-- The functions, created as ocidx_api so that they run as it. Every one pins its search_path.
CREATE SCHEMA ocidx AUTHORIZATION ocidx_api;
COMMENT ON SCHEMA ocidx IS 'ocidx fleet: the only way hosts and readers reach the fleet tables';
SET LOCAL ROLE ocidx_api;

-- Readers ---------------------------------------------------------------------------------------

CREATE FUNCTION ocidx.applied_migrations() RETURNS SETOF text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT m.name FROM ocidx_migrations m ORDER BY m.name
$$;

-- The rows one lookup of indexer.store.read.lookups reaches, on every host (or, with only_hosts and
-- only_layouts, in those layouts only): entries, or child manifests of nested indexes. A names lookup
-- is put together from fixed pieces, the values passed apart, and planned for the values at hand.
CREATE FUNCTION ocidx.lookup(lookup_table text, lookup_columns text[], lookup_values text[],
                             only_hosts text[] DEFAULT NULL, only_layouts bigint[] DEFAULT NULL)
RETURNS TABLE (host text, layout_id bigint, "position" integer, entry_position integer, digest text,
               media_type text, size bigint, platform text, annotations text, invalid_names text,
               warnings text, source text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
DECLARE
    matching text;
BEGIN
    IF lookup_table = 'names' THEN
        matching := CASE
            WHEN lookup_columns = ARRAY['name', 'tag'] THEN 'n.name = $1[1] AND n.tag = $1[2]'
            WHEN lookup_columns = ARRAY['tag'] THEN 'n.tag = $1[1]'
            WHEN lookup_columns = ARRAY['name'] THEN 'n.name = $1[1]'
        END;
        IF matching IS NOT NULL THEN
            IF only_hosts IS NOT NULL THEN
                matching := matching || ' AND (n.host, n.layout_id) IN (SELECT k.h, k.i FROM unnest($2, $3) AS k (h, i))';
            END IF;
            RETURN QUERY EXECUTE
                'SELECT e.host, e.layout_id, e.position, e.position, e.digest, e.media_type, e.size, e.platform, '
                '       e.annotations, e.invalid_names, e.warnings, ''entry''::text '
                'FROM entries e WHERE (e.host, e.layout_id, e.position) IN ('
                '    SELECT n.host, n.layout_id, n.entry_position FROM names n WHERE ' || matching || ')'
                USING lookup_values, only_hosts, only_layouts;
            RETURN;
        END IF;
    ELSIF lookup_table = 'entries' AND lookup_columns = ARRAY['digest'] THEN
        RETURN QUERY
            SELECT e.host, e.layout_id, e.position, e.position, e.digest, e.media_type, e.size, e.platform,
                   e.annotations, e.invalid_names, e.warnings, 'entry'::text
            FROM entries e WHERE e.digest = lookup_values[1];
        RETURN;
    ELSIF lookup_table = 'children' AND lookup_columns = ARRAY['digest'] THEN
        RETURN QUERY
            SELECT c.host, c.layout_id, c.position, c.entry_position, c.digest, c.media_type, c.size, c.platform,
                   c.annotations, NULL::text, NULL::text, 'child'::text
            FROM children c WHERE c.digest = lookup_values[1];
        RETURN;
    END IF;
    RAISE EXCEPTION 'ocidx.lookup: no lookup of % by %', lookup_table, lookup_columns
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

CREATE FUNCTION ocidx.layouts_of(hosts text[], ids bigint[])
RETURNS TABLE (host text, id bigint, path bytea, state text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT l.host, l.id, l.path, l.state
    FROM layouts l JOIN unnest(hosts, ids) AS k (h, i) ON l.host = k.h AND l.id = k.i
$$;

CREATE FUNCTION ocidx.names_of(hosts text[], layout_ids bigint[], positions integer[])
RETURNS TABLE (host text, layout_id bigint, entry_position integer, name text, tag text, how text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT n.host, n.layout_id, n.entry_position, n.name, n.tag, n.how
    FROM names n JOIN unnest(hosts, layout_ids, positions) AS k (h, l, p)
        ON n.host = k.h AND n.layout_id = k.l AND n.entry_position = k.p
    ORDER BY n.host, n.layout_id, n.entry_position, n.ordinal
$$;

-- Every host with its heartbeat's age by the server's clock and the backlog it last reported.
CREATE FUNCTION ocidx.hosts()
RETURNS TABLE (host text, heartbeat_age_s float8, backlog bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT h.host, extract(epoch FROM now() - b.beat_at)::float8, b.backlog
    FROM hosts h LEFT JOIN heartbeats b ON b.host = h.host
$$;

CREATE FUNCTION ocidx.host_counts()
RETURNS TABLE (host text, layouts bigint, entries bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT l.host, count(*), coalesce(sum(l.entry_count), 0)::bigint FROM layouts l GROUP BY l.host
$$;

-- Publishers ------------------------------------------------------------------------------------

-- Changes when the database is restored from a dump (new table oids, or a new database or cluster),
-- restored from a physical backup or failed over (a new timeline), or re-stamped by an administrator.
CREATE FUNCTION ocidx.fleet_incarnation() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT concat_ws('/',
        (SELECT f.incarnation::text FROM fleet f),
        (SELECT s.system_identifier::text FROM pg_control_system() s),
        (SELECT d.oid::text FROM pg_database d WHERE d.datname = current_database()),
        'ocidx_data.hosts'::regclass::oid::text,
        'ocidx_data.layouts'::regclass::oid::text,
        substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))
$$;

CREATE FUNCTION ocidx.publisher_state()
RETURNS TABLE (registered boolean, watermark bigint, sqlite_incarnation text, fleet_incarnation text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT h.host IS NOT NULL, h.watermark, h.sqlite_incarnation, ocidx.fleet_incarnation()
    FROM (SELECT) AS one LEFT JOIN hosts h ON h.host = session_user
$$;

CREATE FUNCTION ocidx.host_layouts()
RETURNS TABLE (id bigint, path bytea, version bigint, content_hash text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT l.id, l.path, l.version, l.content_hash FROM layouts l WHERE l.host = session_user
$$;

-- The cheap check of a host's rows: counts, and an order-free checksum of its layouts (the sum of the
-- first 60 bits of md5("ID:VERSION:CONTENT_HASH:" || path)), which the publisher computes from SQLite.
CREATE FUNCTION ocidx.host_summary()
RETURNS TABLE (layouts bigint, layouts_checksum numeric, entries bigint, names bigint, children bigint,
               layout_warnings bigint, watermark bigint, sqlite_incarnation text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT
        (SELECT count(*) FROM layouts l WHERE l.host = session_user),
        (SELECT coalesce(sum(('x' || substr(md5(convert_to(l.id || ':' || l.version || ':'
                                                           || coalesce(l.content_hash, '') || ':', 'UTF8')
                                                || l.path), 1, 15))::bit(60)::bigint), 0)
         FROM layouts l WHERE l.host = session_user),
        (SELECT count(*) FROM entries e WHERE e.host = session_user),
        (SELECT count(*) FROM names n WHERE n.host = session_user),
        (SELECT count(*) FROM children c WHERE c.host = session_user),
        (SELECT count(*) FROM layout_warnings w WHERE w.host = session_user),
        (SELECT h.watermark FROM hosts h WHERE h.host = session_user),
        (SELECT h.sqlite_incarnation FROM hosts h WHERE h.host = session_user)
$$;

-- Every row of the caller's, in every table (rows a restore left without their layout too).
CREATE FUNCTION ocidx.forget_host() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    DELETE FROM names n WHERE n.host = session_user;
    DELETE FROM children c WHERE c.host = session_user;
    DELETE FROM layout_warnings w WHERE w.host = session_user;
    DELETE FROM entries e WHERE e.host = session_user;
    DELETE FROM layouts l WHERE l.host = session_user;
    UPDATE hosts h SET watermark = 0, sqlite_incarnation = NULL WHERE h.host = session_user;
$$;

CREATE FUNCTION ocidx.remove_layouts(paths bytea[]) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    DELETE FROM layouts l WHERE l.host = session_user AND l.path = ANY (paths);
$$;

-- Whole layouts: each one's previous rows go (the foreign keys cascade), whether the host knew it by
-- this id or this path, and its new row comes in. Their entries, names, children and warnings follow
-- with ocidx.put_rows in the same transaction.
CREATE FUNCTION ocidx.put_layouts(ids bigint[], paths bytea[], versions bigint[], states text[],
                                  error_categories text[], errors text[], content_hashes text[],
                                  entry_counts integer[]) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    DELETE FROM layouts l WHERE l.host = session_user AND (l.id = ANY (ids) OR l.path = ANY (paths));
    INSERT INTO layouts (host, id, path, version, state, error_category, error, content_hash, entry_count)
        SELECT session_user, * FROM unnest(ids, paths, versions, states, error_categories, errors, content_hashes,
                                           entry_counts);
$$;

-- Rows sent as JSON arrays of arrays, one per row, columns in the order of the INSERTs below.
CREATE FUNCTION ocidx.put_rows(entry_rows json, name_rows json, child_rows json, warning_rows json) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    INSERT INTO entries (host, layout_id, position, digest, media_type, size, platform, annotations, invalid_names,
                         warnings)
        SELECT session_user, (r->>0)::bigint, (r->>1)::integer, r->>2, r->>3, (r->>4)::bigint, r->>5, r->>6, r->>7,
               r->>8
        FROM json_array_elements(coalesce(entry_rows, '[]')) AS r;
    INSERT INTO names (host, layout_id, entry_position, ordinal, name, tag, how)
        SELECT session_user, (r->>0)::bigint, (r->>1)::integer, (r->>2)::integer, r->>3, r->>4, r->>5
        FROM json_array_elements(coalesce(name_rows, '[]')) AS r;
    INSERT INTO children (host, layout_id, entry_position, position, parent, depth, digest, media_type, size,
                          platform, annotations)
        SELECT session_user, (r->>0)::bigint, (r->>1)::integer, (r->>2)::integer, r->>3, (r->>4)::integer, r->>5,
               r->>6, (r->>7)::bigint, r->>8, r->>9
        FROM json_array_elements(coalesce(child_rows, '[]')) AS r;
    INSERT INTO layout_warnings (host, layout_id, ordinal, message)
        SELECT session_user, (r->>0)::bigint, (r->>1)::integer, r->>2
        FROM json_array_elements(coalesce(warning_rows, '[]')) AS r;
$$;

-- The end of every publishing transaction: with a watermark, the host row moves to it (and records
-- the SQLite incarnation the rows came from); with a backlog, the heartbeat. Returns the fleet's
-- incarnation, which the publisher compares with the one it reconciled against.
CREATE FUNCTION ocidx.beat(new_backlog bigint, new_pid integer, new_watermark bigint DEFAULT NULL,
                           new_sqlite_incarnation text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
BEGIN
    IF new_watermark IS NOT NULL THEN
        UPDATE hosts h SET watermark = new_watermark, published_at = now(), sqlite_incarnation = new_sqlite_incarnation
        WHERE h.host = session_user;
    END IF;
    IF new_backlog IS NOT NULL THEN
        INSERT INTO heartbeats AS b (host, beat_at, backlog, pid, started_at)
        VALUES (session_user, now(), new_backlog, new_pid, now())
        ON CONFLICT (host) DO UPDATE SET beat_at = now(), backlog = excluded.backlog, pid = excluded.pid;
    END IF;
    RETURN ocidx.fleet_incarnation();
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ocidx FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ocidx.applied_migrations(), ocidx.lookup(text, text[], text[], text[], bigint[]),
    ocidx.layouts_of(text[], bigint[]), ocidx.names_of(text[], bigint[], integer[]), ocidx.hosts(),
    ocidx.host_counts()
    TO ocidx_reader;
GRANT EXECUTE ON FUNCTION ocidx.fleet_incarnation(), ocidx.publisher_state(), ocidx.host_layouts(),
    ocidx.host_summary(), ocidx.forget_host(), ocidx.remove_layouts(bytea[]),
    ocidx.put_layouts(bigint[], bytea[], bigint[], text[], text[], text[], text[], integer[]),
    ocidx.put_rows(json, json, json, json), ocidx.beat(bigint, integer, bigint, text)
    TO ocidx_publisher;
GRANT USAGE ON SCHEMA ocidx TO ocidx_reader, ocidx_publisher;

RESET ROLE;
