-- The server's catalog: endpoints, snapshots, tokens and the audit log.
-- Times are epoch milliseconds (UTC); lists are JSON arrays.

CREATE TABLE endpoints (
    id            INTEGER PRIMARY KEY,
    hostname      TEXT    NOT NULL UNIQUE,
    ips           TEXT    NOT NULL DEFAULT '[]',
    os            TEXT,
    agent_version TEXT,
    labels        TEXT    NOT NULL DEFAULT '[]',
    -- Where the endpoint API answers and the token it wants; NULL for endpoints known only from
    -- uploaded or dropped snapshots.
    api_url       TEXT,
    api_token     TEXT,
    last_seen_ms  INTEGER,
    created_ms    INTEGER NOT NULL
);

CREATE TABLE snapshots (
    id            INTEGER PRIMARY KEY,
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
CREATE INDEX snapshots_endpoint ON snapshots(endpoint_id, created_ms);
CREATE INDEX snapshots_sha256 ON snapshots(sha256) WHERE state = 'complete';

CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    -- admin, operator, viewer
    role        TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL
);

CREATE TABLE tokens (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users(id),
    -- sha256 of the token; the token itself is never stored.
    token_sha256 TEXT    NOT NULL UNIQUE,
    created_ms   INTEGER NOT NULL
);

CREATE TABLE audit (
    id      INTEGER PRIMARY KEY,
    ts_ms   INTEGER NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT    NOT NULL,
    result  TEXT    NOT NULL,
    detail  TEXT
);
CREATE INDEX audit_ts ON audit(ts_ms);
