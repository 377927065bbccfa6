-- Web console sessions: a signed-in browser holds a random session secret in an HttpOnly cookie;
-- the catalog keeps only its sha256. A session belongs to its user (removed with them) and ends
-- at sign-out (the row is deleted), after an idle period, or at its absolute expiry.
CREATE TABLE console_sessions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    secret_sha256  TEXT    NOT NULL UNIQUE,
    user_id        INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_ms     INTEGER NOT NULL,
    last_seen_ms   INTEGER NOT NULL,
    expires_ms     INTEGER NOT NULL
);
CREATE INDEX console_sessions_user ON console_sessions(user_id);
