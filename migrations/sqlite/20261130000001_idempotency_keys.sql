-- Idempotency keys of creates (Idempotency-Key / request_id): per owner, a key stands
-- for the batch its first request created, for 24 hours. Kept in step with
-- migrations/postgres.
CREATE TABLE idempotency_keys (
    user_id         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    request_sha256  BLOB    NOT NULL,  -- what the first request asked for
    batch_id        TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);
-- Expired keys are deleted by the compaction task; this finds them.
CREATE INDEX idempotency_keys_by_time ON idempotency_keys (created_at);
