-- ocidx schema, version 5.
-- The directory cache (git's untracked cache): what a full pass found when it listed a directory
-- below a root, and the directory's identity then. A later walk that finds the same identity,
-- settled (it last changed a racy window before the listing), uses the stored listing instead of
-- listing again: adding, removing or renaming an entry changes a directory's mtime, and chmod or
-- utime its ctime. Files rewritten in place do not, so every index.json is still stat-ed.
CREATE TABLE directories (
    path      TEXT    PRIMARY KEY,   -- as layouts.path holds a path (text, or the raw bytes when not UTF-8)
    dev       INTEGER NOT NULL,
    ino       INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    ctime_ns  INTEGER NOT NULL,
    listed_ns INTEGER NOT NULL,      -- wall clock when the listing began
    layout    INTEGER NOT NULL,      -- 1 when it holds oci-layout or index.json
    subdirs   BLOB    NOT NULL,      -- names of its subdirectories (blobs/ left out), NUL-separated bytes
    links     BLOB    NOT NULL       -- names of its symbolic links, NUL-separated bytes
) WITHOUT ROWID;
