-- The change feed's compaction watermark: every change that compaction deleted is at
-- or below this position, so a reader resuming from an older cursor is refused rather
-- than served a gap. Each compaction chunk raises it in the transaction that deletes.
-- Events deleted before this migration were not recorded: if there are events, the
-- watermark starts at the current horizon (no cursor from before could exist, since
-- the feed is served from this release on). Kept in step with migrations/sqlite.
CREATE TABLE feed_compaction (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    through_transaction BIGINT  NOT NULL,
    through_position    BIGINT  NOT NULL
);
INSERT INTO feed_compaction (id, through_transaction, through_position)
SELECT 1,
       CASE WHEN EXISTS (SELECT 1 FROM batch_events)
            THEN pg_snapshot_xmin(pg_current_snapshot())::text::bigint ELSE 0 END,
       0;
