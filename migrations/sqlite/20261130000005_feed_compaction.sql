-- The change feed's compaction watermark: every change that compaction deleted is at
-- or below this position, so a reader resuming from an older cursor is refused rather
-- than served a gap. Each compaction chunk raises it in the transaction that deletes.
-- Events deleted before this migration were not recorded: the watermark starts at the
-- highest position (no cursor from before could exist, since the feed is served from
-- this release on). Kept in step with migrations/postgres.
CREATE TABLE feed_compaction (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    through_transaction INTEGER NOT NULL,
    through_position    INTEGER NOT NULL
);
INSERT INTO feed_compaction (id, through_transaction, through_position)
SELECT 1, 0, COALESCE(MAX(position), 0) FROM batch_events;
