-- Snapshot ids are never reused. With a plain INTEGER PRIMARY KEY, SQLite gives a new row the
-- largest id + 1, so deleting the newest snapshot handed its id to the next one: a stale
-- `snapq snapshots delete ID`, a connection, evidence or an audit line naming that id would then
-- point at another snapshot. AUTOINCREMENT never gives an id twice; the table is rebuilt to get it
-- (same columns, same rows, same ids).
CREATE TABLE snapshots_new (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id   INTEGER NOT NULL REFERENCES endpoints(id),
    -- `<hostname>_YYYY_MM_DDTHH.MM.SS.mmmZ.db`; NULL until the copy is staged and its time known.
    name          TEXT    UNIQUE,
    -- queued, measuring, transferring, verifying, complete, failed
    state         TEXT    NOT NULL,
    -- capture, upload, watch
    origin        TEXT    NOT NULL,
    size          INTEGER,
    sha256        TEXT,
    events        INTEGER,
    oldest_ts     INTEGER,
    newest_ts     INTEGER,
    bytes_done    INTEGER NOT NULL DEFAULT 0,
    bytes_total   INTEGER,
    -- The agent's staged copy this capture downloads (resume with Range while it is the same).
    staged_id     TEXT,
    error         TEXT,
    job_id        TEXT,
    requested_by  TEXT    NOT NULL,
    created_ms    INTEGER NOT NULL,
    completed_ms  INTEGER
);
INSERT INTO snapshots_new (id, endpoint_id, name, state, origin, size, sha256, events, oldest_ts,
        newest_ts, bytes_done, bytes_total, staged_id, error, job_id, requested_by, created_ms,
        completed_ms)
    SELECT id, endpoint_id, name, state, origin, size, sha256, events, oldest_ts, newest_ts,
        bytes_done, bytes_total, staged_id, error, job_id, requested_by, created_ms, completed_ms
    FROM snapshots;
DROP TABLE snapshots;
ALTER TABLE snapshots_new RENAME TO snapshots;
CREATE INDEX snapshots_endpoint ON snapshots(endpoint_id, created_ms);
CREATE INDEX snapshots_sha256 ON snapshots(sha256) WHERE state = 'complete';
