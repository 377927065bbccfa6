-- What each ingest job (an upload or a file dropped into the watched folder) came to.
CREATE TABLE ingests (
    job_id        TEXT    PRIMARY KEY,
    origin        TEXT    NOT NULL,
    original_name TEXT    NOT NULL,
    -- pending, complete, duplicate, quarantined
    state         TEXT    NOT NULL,
    snapshot_id   INTEGER,
    reason        TEXT,
    requested_by  TEXT    NOT NULL,
    created_ms    INTEGER NOT NULL,
    finished_ms   INTEGER
);
