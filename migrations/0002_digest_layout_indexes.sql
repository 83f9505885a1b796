-- ocidx schema, version 2.
-- A digest lookup in one layout searches (digest, layout_id): a base image's digest that is in
-- thousands of layouts no longer makes a single-layout lookup read every one of those rows
-- (measured: p99 22.9 ms at 1M names with the digest-only index, benchmarks/RESULTS.md).
DROP INDEX entries_digest;
CREATE INDEX entries_digest ON entries (digest, layout_id);
DROP INDEX children_digest;
CREATE INDEX children_digest ON children (digest, layout_id);

-- A cold build drops the lookup indexes, inserts, and recreates them (3x faster than inserting
-- with them in place). The dropped definitions are kept here in the same transaction as the drop,
-- so a build killed half-way recreates them when the next writer opens the database.
CREATE TABLE ocidx_deferred_indexes (
    name TEXT PRIMARY KEY,
    sql  TEXT NOT NULL
);
