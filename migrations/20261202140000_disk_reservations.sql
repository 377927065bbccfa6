-- Disk a capture in flight holds on a store several nodes share (PostgreSQL deployments): the
-- bytes and a lease its progress renews, so a dead node's reservations lapse. Unused (NULL) on a
-- single SQLite node, whose reservations are in memory.
ALTER TABLE snapshots ADD COLUMN reserved_bytes INTEGER;
ALTER TABLE snapshots ADD COLUMN reserved_until_ms INTEGER;
