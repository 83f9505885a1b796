-- ocidx schema, version 4.
-- The fleet publisher's own state, for 'ocidx status' and for a restarted daemon: the host it
-- publishes as, whether PostgreSQL is reachable (or why not), and the local version it has
-- published through (its watermark; the backlog is every change with a higher version).
CREATE TABLE fleet_publisher (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    host         TEXT,                    -- the PostgreSQL role it publishes as, once connected
    state        TEXT    NOT NULL,        -- 'connected', or why not
    since_ns     INTEGER NOT NULL,        -- when state last changed (wall clock)
    watermark    INTEGER NOT NULL DEFAULT 0,
    published_ns INTEGER                  -- when a batch was last committed to PostgreSQL
);
