-- Fleet captures: batches over a computer group, their per-endpoint items, cron schedules, and
-- snapshots marked to keep (never pruned by a schedule's retention).

CREATE TABLE schedules (
    id              INTEGER PRIMARY KEY,
    name            TEXT    NOT NULL UNIQUE,
    cron            TEXT    NOT NULL,
    -- IANA zone the cron expression is read in (`UTC`, `Europe/Berlin`).
    tz              TEXT    NOT NULL,
    group_name      TEXT    NOT NULL,
    max_concurrency INTEGER NOT NULL,
    expire_secs     INTEGER NOT NULL,
    -- `N` failures or `P%` of the batch; NULL: no limit.
    failure_limit   TEXT,
    keep_last       INTEGER,
    keep_days       INTEGER,
    paused          INTEGER NOT NULL DEFAULT 0,
    created_by      TEXT    NOT NULL,
    created_ms      INTEGER NOT NULL,
    -- The last tick handled (a batch started or recorded skipped); ticks up to it never run again.
    last_tick_ms    INTEGER
);

CREATE TABLE batches (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    group_name      TEXT    NOT NULL,
    -- The schedule and tick that started it (NULL for `fleet capture`): one batch per tick.
    schedule_id     INTEGER REFERENCES schedules(id) ON DELETE SET NULL,
    schedule_name   TEXT,
    tick_ms         INTEGER,
    -- running, paused, complete, complete_with_failures, expired, cancelled, skipped
    state           TEXT    NOT NULL,
    reason          TEXT,
    max_concurrency INTEGER NOT NULL,
    expire_at_ms    INTEGER NOT NULL,
    failure_limit   TEXT,
    -- 1 once the group's members were fixed into batch_items.
    resolved        INTEGER NOT NULL DEFAULT 0,
    -- A user asked to cancel; the fleet job ends the batch.
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    -- The end state already decided (cancelled, expired) while running captures finish.
    stop_state      TEXT,
    -- Failures before the last resume: the failure limit counts the ones after it.
    failure_base    INTEGER NOT NULL DEFAULT 0,
    job_id          TEXT,
    requested_by    TEXT    NOT NULL,
    created_ms      INTEGER NOT NULL,
    finished_ms     INTEGER,
    UNIQUE (schedule_id, tick_ms)
);
CREATE INDEX batches_state ON batches(state);

-- One row per endpoint of a batch: queued (waiting, maybe offline), running (its capture job
-- exists), done, failed (with the capture's error), skipped (with the reason).
CREATE TABLE batch_items (
    batch_id    INTEGER NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    endpoint_id INTEGER NOT NULL,
    hostname    TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    snapshot_id INTEGER,
    job_id      TEXT,
    error       TEXT,
    bytes       INTEGER,
    PRIMARY KEY (batch_id, endpoint_id)
);

CREATE TABLE snapshot_keep (
    snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
    kept_by     TEXT    NOT NULL,
    kept_ms     INTEGER NOT NULL
);
