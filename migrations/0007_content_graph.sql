-- ocidx schema: the content graph (issue 19).
--
-- Host-wide tables, by digest: every manifest, index and config blob read on this host is parsed
-- once and stored once, shared by every layout that references it (layouts reach them through
-- their entries and children). Rows are keyed by the digest's graph key (its first 63 bits:
-- store.write.graph_key) and carry the digest itself, which every lookup compares. A row nothing
-- references any more is deleted in the transaction that removed its last reference, and that
-- transaction bumps ocidx_counters('graph_epoch') (store.write, docs/design.md).
CREATE TABLE manifests (
    key               INTEGER PRIMARY KEY,
    digest            TEXT    NOT NULL,
    kind              TEXT    NOT NULL CHECK (kind IN ('manifest', 'index')),
    media_type        TEXT    NOT NULL,      -- as the document says ('' when it says nothing)
    size              INTEGER NOT NULL,      -- the blob's
    artifact_type     TEXT    NOT NULL,      -- '' when none
    subject           TEXT,                  -- the digest of its subject (a referrer), or NULL
    annotations       TEXT,                  -- JSON object, NULL when none
    config            TEXT,                  -- the config's digest (manifests only)
    config_key        INTEGER,
    config_media_type TEXT,
    config_size       INTEGER,
    layers            TEXT,                  -- JSON [[digest, size, mediaType, 1], ...] (store.write.layers_json)
    layer_count       INTEGER,
    image_size        INTEGER,               -- manifest + config + layers, in bytes (manifests only)
    complete          INTEGER NOT NULL,      -- 0 when a descriptor it lists could not be read
    warnings          TEXT                   -- JSON list, NULL when none
);
CREATE INDEX manifests_subject ON manifests (subject) WHERE subject IS NOT NULL;
CREATE INDEX manifests_config ON manifests (config_key) WHERE config_key IS NOT NULL;

-- Which manifests list a layer (find @LAYER), by graph keys: (layer, manifest).
CREATE TABLE layer_users (
    layer    INTEGER NOT NULL,
    manifest INTEGER NOT NULL,
    PRIMARY KEY (layer, manifest)
) WITHOUT ROWID;

CREATE TABLE configs (
    key          INTEGER PRIMARY KEY,
    digest       TEXT    NOT NULL,
    os           TEXT,                       -- NULL when the config names no platform
    architecture TEXT,
    variant      TEXT,
    os_version   TEXT,
    os_features  TEXT,                       -- JSON list, NULL when none
    created      TEXT,                       -- as written, NULL when absent or not a time
    warnings     TEXT
);

-- BuildKit's attestation manifests, as the index blob listing them says: the descriptor `digest`
-- in index `index_key` carries vnd.docker.reference.type attestation-manifest and
-- vnd.docker.reference.digest `target`.
CREATE TABLE attestations (
    target_key INTEGER NOT NULL,
    index_key  INTEGER NOT NULL,
    digest     TEXT    NOT NULL,
    target     TEXT    NOT NULL,
    PRIMARY KEY (target_key, index_key, digest)
) WITHOUT ROWID;
CREATE INDEX attestations_index ON attestations (index_key);

-- Per layout: which blobs its blobs/ holds (one listing of each blobs/ALG directory), as figures,
-- the referenced digests that are absent, and the held set (du's "shared": the graph keys of the
-- blobs present, referenced ones first, then their sizes), as little-endian int64 arrays.
CREATE TABLE layout_graph (
    layout_id          INTEGER PRIMARY KEY,
    complete           INTEGER NOT NULL,     -- every reference known: the unreferenced are proven so
    referenced_blobs   INTEGER NOT NULL,     -- referenced and present
    referenced_bytes   INTEGER NOT NULL,
    missing_blobs      INTEGER NOT NULL,     -- referenced and absent (external layers are not counted)
    unreferenced_blobs INTEGER NOT NULL,
    unreferenced_bytes INTEGER NOT NULL,
    missing            BLOB,                 -- graph keys of the absent referenced digests, NULL when none
    held               BLOB    NOT NULL
);

-- The identity of the directories whose listing the per-layout rows came from: the no-change
-- proof stats them as it stats index.json (a blob added or removed changes its directory's mtime).
-- blobs_dir names the first ('blobs/sha256' as a rule, relative to the layout; 'blobs' when no
-- blobs/ALG exists; NULL before the graph was read); blobs_more holds any further ones as JSON
-- [[name, dev, ino, mtime_ns, ctime_ns], ...] (dev NULL: absent then). blobs_root is the identity
-- of blobs/ itself as JSON, which `du` checks (a new blobs/ALG directory). blobs_settles_ns is when
-- a listing of them proves itself (the racy rule of index.json identities, store.read.settles_at).
ALTER TABLE layouts ADD COLUMN blobs_dir TEXT;
ALTER TABLE layouts ADD COLUMN blobs_dev INTEGER;
ALTER TABLE layouts ADD COLUMN blobs_ino INTEGER;
ALTER TABLE layouts ADD COLUMN blobs_mtime_ns INTEGER;
ALTER TABLE layouts ADD COLUMN blobs_ctime_ns INTEGER;
ALTER TABLE layouts ADD COLUMN blobs_more TEXT;
ALTER TABLE layouts ADD COLUMN blobs_root TEXT;
ALTER TABLE layouts ADD COLUMN blobs_listed_ns INTEGER;
ALTER TABLE layouts ADD COLUMN blobs_since_ns INTEGER;
ALTER TABLE layouts ADD COLUMN blobs_settles_ns INTEGER;
ALTER TABLE layouts ADD COLUMN graph_hash TEXT;

INSERT INTO ocidx_counters (name, value) VALUES ('graph_epoch', 0);
