-- The sweeper finds running batches past their window and cancelling batches past the
-- cancel grace period; these partial indexes hold exactly those candidates.
CREATE INDEX batches_due_to_expire ON batches (expires_at)
    WHERE status IN ('validating', 'in_progress', 'finalizing');
CREATE INDEX batches_due_to_cancel ON batches (cancelling_at)
    WHERE status = 'cancelling';
