-- ocidx schema, version 3.
-- Every change to what is known of a layout gets a version, so that anything that follows the
-- index (the fleet publisher) can ask "what changed after W" without caring which writer wrote it.
-- A write transaction that changes a layout's rows, state, error or content hash takes one new
-- version from ocidx_counters ('version') and stamps it on each layout it changed; a layout it
-- removes is kept as a removal with that version. Versions are handed out under the write lock
-- (BEGIN IMMEDIATE), so commit order is version order.
ALTER TABLE layouts ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX layouts_version ON layouts (version);

CREATE TABLE layout_removals (
    path    TEXT    PRIMARY KEY,  -- as layouts.path holds it (text, or the raw bytes of a non-UTF-8 path)
    version INTEGER NOT NULL
);
CREATE INDEX layout_removals_version ON layout_removals (version);

-- 'version': the last version handed out. 'removals_pruned_through': the highest version of a
-- removal dropped to keep layout_removals bounded (a follower behind it must compare everything).
CREATE TABLE ocidx_counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO ocidx_counters (name, value) VALUES ('version', 0), ('removals_pruned_through', 0);

-- A hard-linked index.json shared by several layouts changes for all of them at once: the
-- daemon finds the others by the file's identity.
CREATE INDEX layouts_identity ON layouts (dev, ino);

-- When the stored identity of index.json was first seen (wall clock, ns). Two reads at least the
-- racy window apart that see the same identity prove it settled even when the file's timestamps
-- lie in the future (clock skew, touch -d), where the usual "changed well before it was read"
-- test can never hold.
ALTER TABLE layouts ADD COLUMN identity_since_ns INTEGER;
UPDATE layouts SET identity_since_ns = read_ns;
