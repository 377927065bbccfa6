-- The names the catalog's listings sort and page by (hostnames, user, group and schedule names)
-- compare byte by byte, as SQLite's do, whatever the database's default collation: under an
-- ICU or glibc locale `web-01` sorts before `Web-02`, on SQLite after it, and a paging cursor
-- (`hostname > ?`) must follow the same order on every node. `lower()` then folds ASCII only,
-- as SQLite's does, so a search matches the same endpoints on both engines.
ALTER TABLE endpoints ALTER COLUMN hostname TYPE TEXT COLLATE "C";
ALTER TABLE users ALTER COLUMN name TYPE TEXT COLLATE "C";
ALTER TABLE computer_groups ALTER COLUMN name TYPE TEXT COLLATE "C";
ALTER TABLE schedules ALTER COLUMN name TYPE TEXT COLLATE "C";
ALTER TABLE batch_items ALTER COLUMN hostname TYPE TEXT COLLATE "C";
