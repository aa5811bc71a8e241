-- The change feed's position of every event: the id of the transaction that wrote it,
-- then its order of writing. Ids are taken before commit, so a lower position can
-- become visible after a higher one; readers therefore read only below the oldest
-- transaction still running (pg_snapshot_xmin(pg_current_snapshot())), where every
-- transaction has ended and nothing can appear any more. Kept in step with
-- migrations/sqlite, where one writer at a time makes writing order commit order.
ALTER TABLE batch_events ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE batch_events ADD COLUMN position BIGINT GENERATED ALWAYS AS IDENTITY;
CREATE INDEX batch_events_by_feed_position ON batch_events (xid, position);
