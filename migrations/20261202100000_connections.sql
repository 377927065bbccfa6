-- Live connections: an analyst's open line to an endpoint's agent or to a stored snapshot. A row
-- outlives the server (restarts re-check active ones) and stays until closed.
CREATE TABLE connections (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The endpoint it belongs to (scoping); a snapshot connection belongs to the snapshot's.
    endpoint_id      INTEGER NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    -- What it queries: JSON of `events::Source` ({"kind":"endpoint","hostname":...} or
    -- {"kind":"snapshot","id":...}).
    target           TEXT    NOT NULL,
    -- The agent's API URL, or the snapshot's file name.
    address          TEXT,
    -- active | failed_to_connect | unexpected_interruption | timed_out | closed
    status           TEXT    NOT NULL,
    reason           TEXT,
    -- When the current status began.
    since_ms         INTEGER NOT NULL,
    last_activity_ms INTEGER NOT NULL,
    created_ms       INTEGER NOT NULL,
    created_by       TEXT    NOT NULL,
    -- What the target reported when last (re)connected.
    db_bytes         INTEGER,
    events           INTEGER,
    oldest_ts        INTEGER,
    newest_ts        INTEGER
);
CREATE INDEX connections_status ON connections(status, last_activity_ms);
CREATE UNIQUE INDEX connections_target ON connections(target);
