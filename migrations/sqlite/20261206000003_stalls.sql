-- Stalls and progress estimates (issue 29). Kept in step with migrations/postgres.

-- When batchd marked the batch stalled (no change for --stall-after); its next change
-- clears it.
ALTER TABLE batches ADD COLUMN stalled_at INTEGER;
-- The progress estimate: a rate averaged over recent versions, in thousandths of a
-- request per second, and the sample it was last moved from.
ALTER TABLE batches ADD COLUMN progress_rate_milli INTEGER;
ALTER TABLE batches ADD COLUMN progress_sampled_at INTEGER;
ALTER TABLE batches ADD COLUMN progress_sampled_done INTEGER;

-- Where the stall sweep looks: the store's own coarse "quiet since", at most a minute
-- before the batch's last change and never after it. Every write moves it only when it
-- is more than a minute behind, so a batch reporting progress every second rewrites it
-- once a minute. An index on `updated_at` itself would change with every progress
-- report and cost PostgreSQL its HOT updates: no index of `batches` reads a column
-- that a progress report changes.
ALTER TABLE batches ADD COLUMN quiet_since INTEGER;
UPDATE batches SET quiet_since = COALESCE(updated_at, created_at)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
CREATE INDEX batches_quiet ON batches (quiet_since)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
    AND stalled_at IS NULL;

-- The stalled batches: the list's `stalled=true`, and the gauge of them per status.
CREATE INDEX batches_stalled ON batches (status, seq) WHERE stalled_at IS NOT NULL;
CREATE INDEX batches_stalled_by_owner ON batches (user_id, seq) WHERE stalled_at IS NOT NULL;
