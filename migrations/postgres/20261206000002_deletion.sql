-- Deleting batches (issue 28). Kept in step with migrations/sqlite.

-- A deletion is logged like a change, so that the change feed tells collection
-- watchers of it: the event after a batch's last version, carrying that version's
-- snapshot (what the watchers' filters judge), marked deleted. Per-batch reads of the
-- log never return it; compaction removes it, and every other event of a deleted
-- batch, once it is old enough.
ALTER TABLE batch_events ADD COLUMN deleted BOOLEAN NOT NULL DEFAULT FALSE;

-- What a deletion removes with the batch, found by the batch.
CREATE INDEX idempotency_keys_by_batch ON idempotency_keys (batch_id);
CREATE INDEX webhook_deliveries_pending_by_batch ON webhook_deliveries (batch_id)
    WHERE state = 'pending';

-- The retention sweep: terminal batches by when they became terminal. The expression
-- reads only the terminal timestamps, each written once: an index on `updated_at`
-- would change with every progress report and cost PostgreSQL its HOT updates.
CREATE INDEX batches_terminal_by_time ON batches ((CASE status
    WHEN 'completed' THEN completed_at WHEN 'failed' THEN failed_at
    WHEN 'expired' THEN expired_at WHEN 'cancelled' THEN cancelled_at END))
    WHERE status IN ('completed', 'failed', 'expired', 'cancelled');
