-- Quarantine entries are ingests whose state is `quarantined`: where the file lies now. An entry is
-- closed (`retried`, `deleted`, `expired`) when the file leaves quarantine.
ALTER TABLE ingests ADD COLUMN quarantine_path TEXT;
CREATE INDEX ingests_by_state ON ingests (state, finished_ms);
