-- Saved evidence: events copied out of a live endpoint or a snapshot, with where they came from and
-- who saved them and why. Keyed by hostname, not by a foreign key: evidence outlives the
-- connection, the snapshot and even a forgotten endpoint.
CREATE TABLE evidence (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hostname TEXT NOT NULL,
    event_type TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    event_ts INTEGER,
    -- Every column of the event, as a JSON object keyed by column name.
    event TEXT NOT NULL,
    -- `snapshot` or `endpoint` (a live endpoint), and which one.
    source_kind TEXT NOT NULL,
    source_id TEXT NOT NULL,
    -- The connection the analyst worked through, when there was one.
    connection_id TEXT,
    saved_by TEXT NOT NULL,
    saved_ms INTEGER NOT NULL,
    note TEXT
);
CREATE INDEX evidence_by_host ON evidence (hostname, saved_ms);

-- Export jobs and the files they wrote under `exports/`.
CREATE TABLE exports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT,
    -- The endpoint the export belongs to (scoping); NULL for an evidence export over every
    -- endpoint its requester could see, which only the requester and admins see.
    hostname TEXT,
    -- JSON: where the rows come from (snapshot, endpoint, evidence).
    source TEXT NOT NULL,
    format TEXT NOT NULL,
    -- JSON: event types and the filter (where, any, since, until, sort).
    filters TEXT NOT NULL,
    state TEXT NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER,
    file_name TEXT,
    error TEXT,
    requested_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX exports_by_finish ON exports (finished_ms);
