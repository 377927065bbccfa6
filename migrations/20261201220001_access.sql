-- Access control: users' passwords and granted computer groups, API tokens with labels, expiry
-- and revocation, computer groups, and the endpoint each job belongs to (for scoping).

-- argon2id PHC string of the user's console password; NULL until `snapq users passwd`.
ALTER TABLE users ADD COLUMN password_hash TEXT;

-- Tokens get a label, a visible prefix, expiry and revocation. A token outlives its user as a
-- revoked row (user_id NULL), so the answer to it can say why it stopped working.
CREATE TABLE api_tokens (
    id             INTEGER PRIMARY KEY,
    user_id        INTEGER REFERENCES users(id) ON DELETE SET NULL,
    user_name      TEXT    NOT NULL,
    label          TEXT,
    -- The first characters of the token (`snapq_1a2b3c`), shown in listings.
    prefix         TEXT    NOT NULL,
    -- sha256 of the token; the token itself is never stored.
    token_sha256   TEXT    NOT NULL UNIQUE,
    -- 1 for the token in the data directory's admin.token.
    bootstrap      INTEGER NOT NULL DEFAULT 0,
    created_ms     INTEGER NOT NULL,
    last_used_ms   INTEGER,
    expires_ms     INTEGER,
    revoked_ms     INTEGER,
    revoked_reason TEXT
);
INSERT INTO api_tokens (id, user_id, user_name, label, prefix, token_sha256, bootstrap, created_ms)
    SELECT t.id, t.user_id, u.name, 'admin.token', '', t.token_sha256, u.name = 'admin', t.created_ms
    FROM tokens t JOIN users u ON u.id = t.user_id;
DROP TABLE tokens;
ALTER TABLE api_tokens RENAME TO tokens;
CREATE INDEX tokens_user ON tokens(user_id);

-- Computer groups: an endpoint is a member when any rule matches its current facts (see
-- core/src/access.rs). Rules are JSON arrays of strings.
CREATE TABLE computer_groups (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    hostnames  TEXT    NOT NULL DEFAULT '[]',
    cidrs      TEXT    NOT NULL DEFAULT '[]',
    labels     TEXT    NOT NULL DEFAULT '[]',
    members    TEXT    NOT NULL DEFAULT '[]',
    created_ms INTEGER NOT NULL
);

CREATE TABLE user_groups (
    user_id  INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    group_id INTEGER NOT NULL REFERENCES computer_groups(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, group_id)
);

-- The endpoint (by hostname) each job the API enqueued belongs to; a job is visible to whoever
-- may see that endpoint. Jobs without a row are resolved from their arguments.
CREATE TABLE job_targets (
    job_id   TEXT PRIMARY KEY,
    hostname TEXT NOT NULL
);

CREATE INDEX audit_actor ON audit(actor, ts_ms);
CREATE INDEX audit_action ON audit(action, ts_ms);
