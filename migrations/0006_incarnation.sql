-- ocidx schema, version 6.
-- The index's incarnation: a random id made when the database is created (this migration runs then),
-- so a database rebuilt from scratch, or replaced by another file, has a new one. A rebuilt index
-- hands out the same layout ids and versions again for other contents: whatever follows the index
-- by its versions (the fleet publisher) compares incarnations first, and starts over when they differ.
CREATE TABLE ocidx_incarnation (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    incarnation TEXT    NOT NULL
);
INSERT INTO ocidx_incarnation (id, incarnation) VALUES (1, lower(hex(randomblob(16))));
