-- Disk a capture in flight holds on the shared store: the bytes and a lease its progress renews,
-- so a dead node's reservations lapse (SQLite: migrations/20261202140000_disk_reservations.sql).
ALTER TABLE snapshots ADD COLUMN reserved_bytes BIGINT;
ALTER TABLE snapshots ADD COLUMN reserved_until_ms BIGINT;
CREATE INDEX snapshots_reserved ON snapshots(reserved_until_ms) WHERE reserved_bytes IS NOT NULL;
