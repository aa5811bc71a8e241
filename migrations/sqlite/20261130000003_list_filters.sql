-- List filters (status set, creation time range, metadata pairs), each backed by an
-- index so a tenant with a million batches is never scanned. Kept in step with
-- migrations/postgres.

-- Metadata pairs, one row each, copied from batches.metadata when a batch is created
-- (metadata never changes afterwards): the index of `metadata[key]=value` filters.
CREATE TABLE batch_metadata (
    batch_seq  INTEGER NOT NULL REFERENCES batches (seq),
    user_id    TEXT    NOT NULL,
    meta_key   TEXT    NOT NULL,
    meta_value TEXT    NOT NULL,
    PRIMARY KEY (batch_seq, meta_key)
);
CREATE INDEX batch_metadata_by_owner ON batch_metadata (user_id, meta_key, meta_value, batch_seq);
CREATE INDEX batch_metadata_by_pair ON batch_metadata (meta_key, meta_value, batch_seq);
INSERT INTO batch_metadata (batch_seq, user_id, meta_key, meta_value)
    SELECT b.seq, b.user_id, m.key, m.value
    FROM batches b, json_each(b.metadata) m
    WHERE b.metadata IS NOT NULL;

-- One owner's batches in some statuses, or created in a time range.
CREATE INDEX batches_by_owner_status ON batches (user_id, status, seq);
CREATE INDEX batches_by_owner_created ON batches (user_id, created_at);
CREATE INDEX batches_by_created ON batches (created_at);
