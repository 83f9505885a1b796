-- ocidx fleet schema, version 3: the content graph (docs/fleet.md, "The content graph").
--
-- What a host answers of an image rides with its entry or child row: "image", the JSON of config,
-- layers, image_size, created and the config's platform, as the host's own lookups give them. The
-- manifests and indexes its layouts reference (config, layers, subject, artifactType, annotations)
-- and the attestation links of its indexes are the host's own rows, once per host and digest, in
-- graph_manifests and graph_attestations; the referenced blobs a layout lacks (a partial export) are
-- its rows in missing_blobs. A digest's rows from one host never answer for another host's layouts.
--
-- Everything stays as migration 0002 made it: the tables live in ocidx_data, which no host and no
-- reader may look into; they reach them only through the SECURITY DEFINER functions of schema
-- ocidx, owned by ocidx_api, their search_path pinned; row-level security binds ocidx_api to the
-- caller's own rows. Graph rows go in with the first layout naming them (ocidx.put_graph) and out
-- with the last: ocidx.put_layouts and ocidx.remove_layouts return the digests the rows they delete
-- named, and ocidx.put_graph deletes those of them no entry or child of the host names any more.

-- A host's own rows are found by "host = session_user::text COLLATE "default"" here, not "host =
-- session_user" as in migration 0002: session_user is a name, of collation "C", and a comparison of a
-- text column of the database's collation with it cannot use an index on that column, so every
-- statement meant for one host's rows read every host's (a batch replacing 500 layouts spent 8 s
-- in one DELETE at 36,000 graph rows). The functions of 0002 that looked a host's rows up that way
-- are made again below.
--
-- Locks. This runs on a live fleet, in one transaction; its costly step is building the digest+host
-- indexes (minutes on a fleet of a billion rows). Readers of migration 0002 read on until its last,
-- short statements; publishers wait. In order:
-- 1. SHARE ROW EXCLUSIVE on layouts, then SHARE on entries and children, before anything costly:
--    readers (ACCESS SHARE) go on; a publisher waits at its first write, on layouts, holding nothing
--    the migration needs, and gives up after its lock_timeout and retries. A publisher let past
--    layouts would wait for entries holding ROW EXCLUSIVE on layouts, which missing_blobs' foreign key
--    (SHARE ROW EXCLUSIVE on layouts) needs: a deadlock, which PostgreSQL ends by failing one side,
--    the migration itself when the publisher began waiting first.
-- 2. The indexes, under those locks.
-- 3. The graph's tables; their foreign keys take SHARE ROW EXCLUSIVE on hosts (heartbeats wait).
-- 4. The new column and the old indexes dropped: ACCESS EXCLUSIVE on entries and children, which
--    readers wait for, from there to the commit, milliseconds later.
LOCK TABLE ocidx_data.layouts IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE ocidx_data.entries, ocidx_data.children IN SHARE MODE;

-- Whether a host's entries or children still name a digest (the graph's rows go with the last that
-- does) is asked by digest and host: the digest indexes gain the host.
CREATE INDEX entries_digest_host ON ocidx_data.entries (digest, host);
CREATE INDEX children_digest_host ON ocidx_data.children (digest, host);

CREATE TABLE ocidx_data.graph_manifests (
    host              text     NOT NULL REFERENCES ocidx_data.hosts ON DELETE CASCADE,
    digest            text     NOT NULL,          -- a manifest's or an index's
    artifact_type     text     NOT NULL,          -- '' when none
    subject           text,                       -- the digest it refers to (a referrer), or NULL
    annotations       text,                       -- JSON object, NULL when none
    config            text,                       -- the config's digest (manifests only)
    config_media_type text,
    config_size       bigint,
    layers            text[],                     -- the layers' digests, in order (NULL for an index)
    layer_types       text[],                     -- their media types
    layer_sizes       bigint[],                   -- their sizes
    PRIMARY KEY (host, digest)
);
CREATE INDEX graph_manifests_layers ON ocidx_data.graph_manifests USING gin (layers);
CREATE INDEX graph_manifests_config ON ocidx_data.graph_manifests (config) WHERE config IS NOT NULL;
CREATE INDEX graph_manifests_subject ON ocidx_data.graph_manifests (subject) WHERE subject IS NOT NULL;

-- BuildKit's attestation manifests, as the index listing them says: descriptor "digest" of index
-- "index_digest" is an attestation-manifest about "target" (vnd.docker.reference.digest).
CREATE TABLE ocidx_data.graph_attestations (
    host         text NOT NULL REFERENCES ocidx_data.hosts ON DELETE CASCADE,
    index_digest text NOT NULL,
    digest       text NOT NULL,
    target       text NOT NULL,
    PRIMARY KEY (host, index_digest, digest, target)
);
CREATE INDEX graph_attestations_target ON ocidx_data.graph_attestations (target);
CREATE INDEX graph_attestations_index ON ocidx_data.graph_attestations (index_digest);

-- The blobs a layout references that its blobs/ lacks (external layers are not counted).
CREATE TABLE ocidx_data.missing_blobs (
    host      text   NOT NULL,
    layout_id bigint NOT NULL,
    digest    text   NOT NULL,
    PRIMARY KEY (host, layout_id, digest),
    FOREIGN KEY (host, layout_id) REFERENCES ocidx_data.layouts (host, id) ON DELETE CASCADE
);

ALTER TABLE ocidx_data.entries ADD COLUMN image text;    -- JSON object, NULL for no image
ALTER TABLE ocidx_data.children ADD COLUMN image text;
DROP INDEX ocidx_data.entries_digest;
DROP INDEX ocidx_data.children_digest;

-- Privileges as migration 0002 set them: none for hosts and readers; ocidx_api reads everything
-- and writes what the publishing functions write.
REVOKE ALL ON ocidx_data.graph_manifests, ocidx_data.graph_attestations, ocidx_data.missing_blobs
    FROM PUBLIC, ocidx_publisher, ocidx_reader;
GRANT SELECT, INSERT, DELETE ON ocidx_data.graph_manifests, ocidx_data.graph_attestations,
    ocidx_data.missing_blobs TO ocidx_api;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['graph_manifests', 'graph_attestations', 'missing_blobs']
    LOOP
        EXECUTE format('ALTER TABLE ocidx_data.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE ocidx_data.%I FORCE ROW LEVEL SECURITY', t);
        -- The administrator reads and repairs the tables directly (as migration 0001's policies allow).
        EXECUTE format('CREATE POLICY %I ON ocidx_data.%I TO %I USING (true) WITH CHECK (true)',
                       t || '_admin', t, current_user);
        EXECUTE format('CREATE POLICY %I ON ocidx_data.%I FOR SELECT TO ocidx_api USING (true)', t || '_api_read', t);
        EXECUTE format('CREATE POLICY %I ON ocidx_data.%I TO ocidx_api '
                       'USING (host = session_user) WITH CHECK (host = session_user)', t || '_api_write', t);
    END LOOP;
END
$$;

SET LOCAL ROLE ocidx_api;

-- Readers ---------------------------------------------------------------------------------------

-- As in migration 0002, each hit with its image.
DROP FUNCTION ocidx.lookup(text, text[], text[], text[], bigint[]);
CREATE FUNCTION ocidx.lookup(lookup_table text, lookup_columns text[], lookup_values text[],
                             only_hosts text[] DEFAULT NULL, only_layouts bigint[] DEFAULT NULL)
RETURNS TABLE (host text, layout_id bigint, "position" integer, entry_position integer, digest text,
               media_type text, size bigint, platform text, annotations text, invalid_names text,
               warnings text, source text, image text)
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
                '       e.annotations, e.invalid_names, e.warnings, ''entry''::text, e.image '
                'FROM entries e WHERE (e.host, e.layout_id, e.position) IN ('
                '    SELECT n.host, n.layout_id, n.entry_position FROM names n WHERE ' || matching || ')'
                USING lookup_values, only_hosts, only_layouts;
            RETURN;
        END IF;
    ELSIF lookup_table = 'entries' AND lookup_columns = ARRAY['digest'] THEN
        RETURN QUERY
            SELECT e.host, e.layout_id, e.position, e.position, e.digest, e.media_type, e.size, e.platform,
                   e.annotations, e.invalid_names, e.warnings, 'entry'::text, e.image
            FROM entries e WHERE e.digest = lookup_values[1];
        RETURN;
    ELSIF lookup_table = 'children' AND lookup_columns = ARRAY['digest'] THEN
        RETURN QUERY
            SELECT c.host, c.layout_id, c.position, c.entry_position, c.digest, c.media_type, c.size, c.platform,
                   c.annotations, NULL::text, NULL::text, 'child'::text, c.image
            FROM children c WHERE c.digest = lookup_values[1];
        RETURN;
    END IF;
    RAISE EXCEPTION 'ocidx.lookup: no lookup of % by %', lookup_table, lookup_columns
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- find --fleet @DIGEST of a layer or a config: each layout, on every host, whose entries or children
-- name a manifest of that host that uses the digest (as its config, which wins, or as a layer: the
-- first it lists), with the blob's media type and size as that manifest says, and whether the
-- layout lacks the blob. The layouts of each manifest are looked up one manifest at a time (LATERAL):
-- joined as sets, a digest no manifest uses (every image's digest is asked) was planned as a sort of
-- every entry of the fleet. A lookup is a few index probes: no parallel workers, which cost more to
-- start than they save, and no JIT compilation, which the estimates made for a digest of unknown
-- use asked for on every call (20 ms).
CREATE FUNCTION ocidx.graph_users(target text)
RETURNS TABLE (host text, layout_id bigint, manifest text, source text, media_type text, size bigint,
               missing boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp
    SET max_parallel_workers_per_gather = 0 SET jit = off AS $$
    SELECT u.host, held.layout_id, u.digest, u.source, u.media_type, u.size,
           EXISTS (SELECT FROM missing_blobs m
                   WHERE m.host = u.host AND m.layout_id = held.layout_id AND m.digest = target)
    FROM (
        SELECT g.host, g.digest,
               CASE WHEN g.config = target THEN 'config' ELSE 'layer' END AS source,
               CASE WHEN g.config = target THEN g.config_media_type
                    ELSE g.layer_types[array_position(g.layers, target)] END AS media_type,
               CASE WHEN g.config = target THEN g.config_size
                    ELSE g.layer_sizes[array_position(g.layers, target)] END AS size
        FROM graph_manifests g
        WHERE g.layers @> ARRAY[target] OR g.config = target
    ) AS u
    CROSS JOIN LATERAL (
        SELECT e.layout_id FROM entries e WHERE e.digest = u.digest AND e.host = u.host
        UNION
        SELECT c.layout_id FROM children c WHERE c.digest = u.digest AND c.host = u.host
    ) AS held
$$;

-- referrers --fleet: on every host, the entries and children whose manifest has one of targets as
-- its subject ('subject'), the attestation manifests listed for a target or in a target index
-- ('attestation', subject: what it is about), and the entries named by one of tags ('fallback-tag')
-- with their children one level down ('fallback-child'); each with the target or tag it was found by
-- (matched), and what the host's graph_manifests row of its digest says (artifactType, its config's
-- media type, annotations). Each row found looks its rows up by index (LATERAL; OFFSET 0 keeps the
-- planner from making the lookups joins of whole tables, which it plans for arrays of unknown size),
-- and neither parallel workers nor JIT, as graph_users.
CREATE FUNCTION ocidx.referrers(targets text[], tags text[])
RETURNS TABLE (host text, layout_id bigint, entry_position integer, digest text, media_type text, how text,
               subject text, matched text, artifact_type text, config_media_type text, annotations text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp
    SET max_parallel_workers_per_gather = 0 SET jit = off AS $$
    WITH found AS (
        SELECT g.host, e.layout_id, e.position AS entry_position, e.digest, e.media_type, 'subject' AS how,
               g.subject, g.subject AS matched
        FROM graph_manifests g
            CROSS JOIN LATERAL (SELECT * FROM entries e WHERE e.digest = g.digest AND e.host = g.host OFFSET 0) AS e
        WHERE g.subject = ANY (targets)
        UNION ALL
        SELECT g.host, c.layout_id, c.entry_position, c.digest, c.media_type, 'subject', g.subject, g.subject
        FROM graph_manifests g
            CROSS JOIN LATERAL (SELECT * FROM children c WHERE c.digest = g.digest AND c.host = g.host OFFSET 0) AS c
        WHERE g.subject = ANY (targets)
        UNION ALL
        SELECT a.host, c.layout_id, c.entry_position, c.digest, c.media_type, 'attestation', a.target, a.target
        FROM graph_attestations a
            CROSS JOIN LATERAL (SELECT * FROM children c
                                WHERE c.digest = a.digest AND c.host = a.host AND c.parent = a.index_digest
                                OFFSET 0) AS c
        WHERE a.target = ANY (targets)
        UNION ALL
        SELECT a.host, c.layout_id, c.entry_position, c.digest, c.media_type, 'attestation', a.target, a.index_digest
        FROM graph_attestations a
            CROSS JOIN LATERAL (SELECT * FROM children c
                                WHERE c.digest = a.digest AND c.host = a.host AND c.parent = a.index_digest
                                OFFSET 0) AS c
        WHERE a.index_digest = ANY (targets)
        UNION ALL
        SELECT n.host, e.layout_id, e.position, e.digest, e.media_type, 'fallback-tag', NULL, n.tag
        FROM names n
            CROSS JOIN LATERAL (SELECT * FROM entries e
                                WHERE e.host = n.host AND e.layout_id = n.layout_id
                                    AND e.position = n.entry_position
                                OFFSET 0) AS e
        WHERE n.tag = ANY (tags)
        UNION ALL
        SELECT n.host, c.layout_id, c.entry_position, c.digest, c.media_type, 'fallback-child', NULL, n.tag
        FROM names n
            CROSS JOIN LATERAL (SELECT * FROM children c
                                WHERE c.host = n.host AND c.layout_id = n.layout_id
                                    AND c.entry_position = n.entry_position AND c.depth = 1
                                OFFSET 0) AS c
        WHERE n.tag = ANY (tags)
    )
    SELECT f.host, f.layout_id, f.entry_position, f.digest, f.media_type, f.how, f.subject, f.matched,
           g.artifact_type, g.config_media_type, g.annotations
    FROM found f
        LEFT JOIN LATERAL (SELECT * FROM graph_manifests g WHERE g.host = f.host AND g.digest = f.digest OFFSET 0) AS g
            ON true
$$;

-- Publishers ------------------------------------------------------------------------------------

-- As in migration 0002, each host's rows found by an index (the top of this file says why).
CREATE OR REPLACE FUNCTION ocidx.publisher_state()
RETURNS TABLE (registered boolean, watermark bigint, sqlite_incarnation text, fleet_incarnation text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT h.host IS NOT NULL, h.watermark, h.sqlite_incarnation, ocidx.fleet_incarnation()
    FROM (SELECT) AS one LEFT JOIN hosts h ON h.host = session_user::text COLLATE "default"
$$;

CREATE OR REPLACE FUNCTION ocidx.host_layouts()
RETURNS TABLE (id bigint, path bytea, version bigint, content_hash text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT l.id, l.path, l.version, l.content_hash FROM layouts l WHERE l.host = session_user::text COLLATE "default"
$$;

-- As in migration 0002, with the graph's counts (the publisher counts the same in SQLite).
DROP FUNCTION ocidx.host_summary();
CREATE FUNCTION ocidx.host_summary()
RETURNS TABLE (layouts bigint, layouts_checksum numeric, entries bigint, names bigint, children bigint,
               layout_warnings bigint, watermark bigint, sqlite_incarnation text, graph_manifests bigint,
               graph_attestations bigint, missing_blobs bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    SELECT
        (SELECT count(*) FROM layouts l WHERE l.host = session_user::text COLLATE "default"),
        (SELECT coalesce(sum(('x' || substr(md5(convert_to(l.id || ':' || l.version || ':'
                                                           || coalesce(l.content_hash, '') || ':', 'UTF8')
                                                || l.path), 1, 15))::bit(60)::bigint), 0)
         FROM layouts l WHERE l.host = session_user::text COLLATE "default"),
        (SELECT count(*) FROM entries e WHERE e.host = session_user::text COLLATE "default"),
        (SELECT count(*) FROM names n WHERE n.host = session_user::text COLLATE "default"),
        (SELECT count(*) FROM children c WHERE c.host = session_user::text COLLATE "default"),
        (SELECT count(*) FROM layout_warnings w WHERE w.host = session_user::text COLLATE "default"),
        (SELECT h.watermark FROM hosts h WHERE h.host = session_user::text COLLATE "default"),
        (SELECT h.sqlite_incarnation FROM hosts h WHERE h.host = session_user::text COLLATE "default"),
        (SELECT count(*) FROM graph_manifests g WHERE g.host = session_user::text COLLATE "default"),
        (SELECT count(*) FROM graph_attestations a WHERE a.host = session_user::text COLLATE "default"),
        (SELECT count(*) FROM missing_blobs m WHERE m.host = session_user::text COLLATE "default")
$$;

CREATE OR REPLACE FUNCTION ocidx.forget_host() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    DELETE FROM names n WHERE n.host = session_user::text COLLATE "default";
    DELETE FROM children c WHERE c.host = session_user::text COLLATE "default";
    DELETE FROM layout_warnings w WHERE w.host = session_user::text COLLATE "default";
    DELETE FROM missing_blobs m WHERE m.host = session_user::text COLLATE "default";
    DELETE FROM entries e WHERE e.host = session_user::text COLLATE "default";
    DELETE FROM layouts l WHERE l.host = session_user::text COLLATE "default";
    DELETE FROM graph_manifests g WHERE g.host = session_user::text COLLATE "default";
    DELETE FROM graph_attestations a WHERE a.host = session_user::text COLLATE "default";
    UPDATE hosts h SET watermark = 0, sqlite_incarnation = NULL WHERE h.host = session_user::text COLLATE "default";
$$;

-- As in migration 0002, returning the digests the deleted layouts' entries and children named (read
-- in the statement that deletes them: its snapshot still holds the rows the foreign keys cascade to).
DROP FUNCTION ocidx.remove_layouts(bytea[]);
CREATE FUNCTION ocidx.remove_layouts(paths bytea[]) RETURNS text[]
LANGUAGE sql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    WITH gone AS (
        DELETE FROM layouts l WHERE l.host = session_user::text COLLATE "default" AND l.path = ANY (paths) RETURNING l.id
    )
    SELECT coalesce(array_agg(DISTINCT named.digest), '{}') FROM (
        SELECT e.digest FROM entries e WHERE e.host = session_user::text COLLATE "default" AND e.layout_id IN (SELECT id FROM gone)
        UNION ALL
        SELECT c.digest FROM children c WHERE c.host = session_user::text COLLATE "default" AND c.layout_id IN (SELECT id FROM gone)
    ) AS named
$$;

DROP FUNCTION ocidx.put_layouts(bigint[], bytea[], bigint[], text[], text[], text[], text[], integer[]);
CREATE FUNCTION ocidx.put_layouts(ids bigint[], paths bytea[], versions bigint[], states text[],
                                  error_categories text[], errors text[], content_hashes text[],
                                  entry_counts integer[]) RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
DECLARE
    released text[];
BEGIN
    WITH gone AS (
        DELETE FROM layouts l WHERE l.host = session_user::text COLLATE "default" AND (l.id = ANY (ids) OR l.path = ANY (paths))
        RETURNING l.id
    )
    SELECT coalesce(array_agg(DISTINCT named.digest), '{}') INTO released FROM (
        SELECT e.digest FROM entries e WHERE e.host = session_user::text COLLATE "default" AND e.layout_id IN (SELECT id FROM gone)
        UNION ALL
        SELECT c.digest FROM children c WHERE c.host = session_user::text COLLATE "default" AND c.layout_id IN (SELECT id FROM gone)
    ) AS named;
    INSERT INTO layouts (host, id, path, version, state, error_category, error, content_hash, entry_count)
        SELECT session_user, * FROM unnest(ids, paths, versions, states, error_categories, errors, content_hashes,
                                           entry_counts);
    RETURN released;
END
$$;

-- As in migration 0002, with each entry's and child's image (the last column of its row).
CREATE OR REPLACE FUNCTION ocidx.put_rows(entry_rows json, name_rows json, child_rows json, warning_rows json)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    INSERT INTO entries (host, layout_id, position, digest, media_type, size, platform, annotations, invalid_names,
                         warnings, image)
        SELECT session_user, (r->>0)::bigint, (r->>1)::integer, r->>2, r->>3, (r->>4)::bigint, r->>5, r->>6, r->>7,
               r->>8, r->>9
        FROM json_array_elements(coalesce(entry_rows, '[]')) AS r;
    INSERT INTO names (host, layout_id, entry_position, ordinal, name, tag, how)
        SELECT session_user, (r->>0)::bigint, (r->>1)::integer, (r->>2)::integer, r->>3, r->>4, r->>5
        FROM json_array_elements(coalesce(name_rows, '[]')) AS r;
    INSERT INTO children (host, layout_id, entry_position, position, parent, depth, digest, media_type, size,
                          platform, annotations, image)
        SELECT session_user, (r->>0)::bigint, (r->>1)::integer, (r->>2)::integer, r->>3, (r->>4)::integer, r->>5,
               r->>6, (r->>7)::bigint, r->>8, r->>9, r->>10
        FROM json_array_elements(coalesce(child_rows, '[]')) AS r;
    INSERT INTO layout_warnings (host, layout_id, ordinal, message)
        SELECT session_user, (r->>0)::bigint, (r->>1)::integer, r->>2
        FROM json_array_elements(coalesce(warning_rows, '[]')) AS r;
$$;

-- The graph's rows of a batch, after its layouts and rows (JSON arrays of arrays, columns in the order
-- of the INSERTs below; a manifest or attestation the host has already is left as it is: a digest's
-- content never changes); then, of the digests *released* (what ocidx.put_layouts and
-- ocidx.remove_layouts returned in this transaction), the graph rows that no entry or child of the
-- host names any more are deleted.
CREATE FUNCTION ocidx.put_graph(manifest_rows json, attestation_rows json, missing_rows json, released text[])
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = ocidx_data, pg_temp AS $$
    INSERT INTO graph_manifests (host, digest, artifact_type, subject, annotations, config, config_media_type,
                                 config_size, layers, layer_types, layer_sizes)
        SELECT session_user, r->>0, r->>1, r->>2, r->>3, r->>4, r->>5, (r->>6)::bigint,
               CASE WHEN json_typeof(r->7) = 'array' THEN ARRAY(SELECT json_array_elements_text(r->7)) END,
               CASE WHEN json_typeof(r->8) = 'array' THEN ARRAY(SELECT json_array_elements_text(r->8)) END,
               CASE WHEN json_typeof(r->9) = 'array' THEN ARRAY(SELECT json_array_elements_text(r->9))::bigint[] END
        FROM json_array_elements(coalesce(manifest_rows, '[]')) AS r
        -- Most manifests of a layout published again are the host's already: an index probe each,
        -- before their arrays are built.
        WHERE NOT EXISTS (SELECT FROM graph_manifests g
                          WHERE g.host = session_user::text COLLATE "default" AND g.digest = r->>0)
        ON CONFLICT (host, digest) DO NOTHING;
    INSERT INTO graph_attestations (host, index_digest, digest, target)
        SELECT session_user, r->>0, r->>1, r->>2
        FROM json_array_elements(coalesce(attestation_rows, '[]')) AS r
        ON CONFLICT (host, index_digest, digest, target) DO NOTHING;
    INSERT INTO missing_blobs (host, layout_id, digest)
        SELECT session_user, (r->>0)::bigint, r->>1
        FROM json_array_elements(coalesce(missing_rows, '[]')) AS r;
    DELETE FROM graph_manifests g
    WHERE g.host = session_user::text COLLATE "default" AND g.digest = ANY (released)
        AND NOT EXISTS (SELECT FROM entries e WHERE e.digest = g.digest AND e.host = session_user::text COLLATE "default")
        AND NOT EXISTS (SELECT FROM children c WHERE c.digest = g.digest AND c.host = session_user::text COLLATE "default");
    DELETE FROM graph_attestations a
    WHERE a.host = session_user::text COLLATE "default" AND a.index_digest = ANY (released)
        AND NOT EXISTS (SELECT FROM entries e WHERE e.digest = a.index_digest AND e.host = session_user::text COLLATE "default")
        AND NOT EXISTS (SELECT FROM children c WHERE c.digest = a.index_digest AND c.host = session_user::text COLLATE "default");
$$;

-- Functions made or re-made here start with EXECUTE for PUBLIC: none of them keeps it.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ocidx FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ocidx.lookup(text, text[], text[], text[], bigint[]), ocidx.graph_users(text),
    ocidx.referrers(text[], text[])
    TO ocidx_reader;
GRANT EXECUTE ON FUNCTION ocidx.host_summary(), ocidx.remove_layouts(bytea[]),
    ocidx.put_layouts(bigint[], bytea[], bigint[], text[], text[], text[], text[], integer[]),
    ocidx.put_graph(json, json, json, text[])
    TO ocidx_publisher;

RESET ROLE;

-- Rows published before this migration carry no image and name no graph rows, and nothing else tells
-- them from the index they came from: forgetting which index that was makes each host's publisher
-- publish everything again once, as soon as it is connected (as rows of schema version 1 carried no
-- incarnation at all).
UPDATE ocidx_data.hosts SET sqlite_incarnation = NULL;
