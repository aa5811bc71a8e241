-- Kept in step with migrations/postgres, where this migration gives the pages of
-- `batches` room for their rows' next versions (a fill factor of 90). SQLite has no
-- such setting, so nothing changes here.
SELECT 1;
