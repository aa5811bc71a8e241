-- The change feed's position of every event: its order of writing, which SQLite's one
-- writer at a time makes the order of commit. Every write sets it (the next one after
-- the highest); events already written get theirs in the order they were committed.
-- Kept in step with migrations/postgres, where the position starts with the writing
-- transaction's id.
ALTER TABLE batch_events ADD COLUMN position INTEGER;
UPDATE batch_events SET position = (
    SELECT numbered.n FROM (
        SELECT batch_id, version, row_number() OVER (ORDER BY at, batch_id, version) AS n
        FROM batch_events
    ) AS numbered
    WHERE numbered.batch_id = batch_events.batch_id AND numbered.version = batch_events.version
);
CREATE UNIQUE INDEX batch_events_by_feed_position ON batch_events (position);
