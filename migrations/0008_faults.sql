-- ocidx schema: what a failure of the environment leaves (issue 17, "a failure is never a proof").
-- A layout that could not be read for a reason outside its own bytes (descriptors or memory used up,
-- an I/O error, a permission, a worker process that died, a writer mid-rewrite) is stored in state
-- 'error' with no identity, so that every pass reads it again; retry_ns is when the daemon reads it
-- again by itself, after a backoff that doubles with each consecutive such failure (failures).
ALTER TABLE layouts ADD COLUMN retry_ns INTEGER;
ALTER TABLE layouts ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
-- find re-examines the layouts in error (their rows, if any, are a last good state at best).
CREATE INDEX layouts_in_error ON layouts (path) WHERE state = 'error';

-- What a layout's stored rows depend on besides index.json: the nested index blobs that were absent
-- or unusable when it was read, each with what the read found at its path (JSON, read.encode_depends;
-- NULL when nothing: the common case costs no proof). A blob that arrives later, index.json
-- untouched, makes every no-change proof and single lookup read the layout again.
ALTER TABLE layouts ADD COLUMN depends TEXT;

-- The unique id of the mount index.json was read on (statx STATX_MNT_ID_UNIQUE, Linux 6.8; NULL where
-- the system cannot say), and of the mount each cached directory listing was made on: two file
-- systems with identical metadata mounted one after the other at the same place have the same
-- device, inode, size and times, and only the mount tells them apart (docs/reliability.md).
ALTER TABLE layouts ADD COLUMN mnt_id INTEGER;
ALTER TABLE directories ADD COLUMN mnt_id INTEGER;

-- Children are stored once per layout, under the first entry that reaches them (each distinct
-- nested index expanded once: layout._ChildWalk); lookups follow them by parent digest.
CREATE INDEX children_parent ON children (layout_id, parent);
