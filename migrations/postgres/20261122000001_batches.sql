-- Batches, their event log and API keys (PostgreSQL). Kept in step with migrations/sqlite.

CREATE TABLE batches (
    -- Insertion order: lists are newest first and page on it, so two batches created in
    -- the same second still have a strict order.
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT    NOT NULL UNIQUE,
    user_id           TEXT    NOT NULL,
    api_key_id        TEXT    NOT NULL,
    endpoint          TEXT    NOT NULL,
    input_file_id     TEXT    NOT NULL,
    completion_window TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    output_file_id    TEXT,
    error_file_id     TEXT,
    errors            JSONB,            -- array of {code, line, message, param}
    created_at        BIGINT  NOT NULL,
    in_progress_at    BIGINT,
    expires_at        BIGINT,
    finalizing_at     BIGINT,
    completed_at      BIGINT,
    failed_at         BIGINT,
    expired_at        BIGINT,
    cancelling_at     BIGINT,
    cancelled_at      BIGINT,
    request_total     BIGINT  NOT NULL,
    request_completed BIGINT  NOT NULL,
    request_failed    BIGINT  NOT NULL,
    metadata          JSONB,
    model             TEXT,
    usage             JSONB,
    job_id            TEXT,
    remark            TEXT,
    version           BIGINT  NOT NULL,
    updated_at        BIGINT
);

CREATE INDEX batches_by_owner ON batches (user_id, seq);
CREATE INDEX batches_by_job ON batches (job_id, seq) WHERE job_id IS NOT NULL;
CREATE INDEX batches_by_status ON batches (status, seq);

-- One row per committed version of a batch, written in the same transaction as the
-- change itself: the history that watchers read.
CREATE TABLE batch_events (
    batch_id TEXT   NOT NULL,
    version  BIGINT NOT NULL,
    snapshot JSONB  NOT NULL,  -- the whole batch at this version
    at       BIGINT NOT NULL,
    PRIMARY KEY (batch_id, version)
);

CREATE TABLE api_keys (
    id            TEXT   PRIMARY KEY,
    secret_sha256 BYTEA  NOT NULL UNIQUE,
    user_id       TEXT   NOT NULL,
    scope         TEXT   NOT NULL CHECK (scope IN ('batches', 'worker', 'admin')),
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);
