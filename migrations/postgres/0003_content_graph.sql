-- ocidx fleet schema: the content graph (issue 19).
-- What each host answers of an image rides with its entry or child row ("image": JSON of config,
-- layers, image_size, created and the config's platform, as the host's own lookups give them). The
-- manifests a host's layouts reference and the attestation links of its indexes are the host's own
-- rows, once per host and digest (hosts publish only their own rows: one host's rows never answer
-- for another's layouts); find --fleet @DIGEST reaches layers and configs through them, referrers
-- --fleet subjects and attestations.

ALTER TABLE entries ADD COLUMN image text;
ALTER TABLE children ADD COLUMN image text;

CREATE TABLE graph_manifests (
    host              text   NOT NULL DEFAULT session_user REFERENCES hosts ON DELETE CASCADE,
    digest            text   NOT NULL,
    config            text,                       -- the config's digest
    config_media_type text,
    config_size       bigint,
    artifact_type     text   NOT NULL,            -- '' when none
    subject           text,                       -- the digest it refers to (a referrer), or NULL
    annotations       text,                       -- JSON object, NULL when none
    layers            text[] NOT NULL,            -- the layers' digests, in order
    layer_types       text[] NOT NULL,            -- their media types
    layer_sizes       bigint[] NOT NULL,          -- their sizes
    PRIMARY KEY (host, digest)
);
CREATE INDEX graph_manifests_layers ON graph_manifests USING gin (layers);
CREATE INDEX graph_manifests_config ON graph_manifests (config) WHERE config IS NOT NULL;
CREATE INDEX graph_manifests_subject ON graph_manifests (subject) WHERE subject IS NOT NULL;

CREATE TABLE graph_attestations (
    host         text NOT NULL DEFAULT session_user REFERENCES hosts ON DELETE CASCADE,
    index_digest text NOT NULL,                   -- the index that lists the attestation manifest
    digest       text NOT NULL,                   -- the attestation manifest
    target       text NOT NULL,                   -- vnd.docker.reference.digest: the image it is about
    PRIMARY KEY (host, index_digest, digest)
);
CREATE INDEX graph_attestations_target ON graph_attestations (target);

GRANT SELECT ON graph_manifests, graph_attestations TO ocidx_reader, ocidx_publisher;
GRANT INSERT, UPDATE, DELETE ON graph_manifests, graph_attestations TO ocidx_publisher;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['graph_manifests', 'graph_attestations']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR SELECT TO ocidx_reader, ocidx_publisher USING (true)',
                       t || '_read', t);
        EXECUTE format('CREATE POLICY %I ON %I TO %I USING (true) WITH CHECK (true)', t || '_admin', t, current_user);
        EXECUTE format('CREATE POLICY %I ON %I FOR INSERT TO ocidx_publisher WITH CHECK (host = session_user)',
                       t || '_insert', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR DELETE TO ocidx_publisher USING (host = session_user)',
                       t || '_delete', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR UPDATE TO ocidx_publisher '
                       'USING (host = session_user) WITH CHECK (host = session_user)', t || '_update', t);
    END LOOP;
END
$$;
