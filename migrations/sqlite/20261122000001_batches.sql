-- Batches, their event log and API keys (SQLite). Kept in step with migrations/postgres.

CREATE TABLE batches (
    -- Insertion order: lists are newest first and page on it, so two batches created in
    -- the same second still have a strict order. AUTOINCREMENT never reuses a value.
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    user_id           TEXT    NOT NULL,
    api_key_id        TEXT    NOT NULL,
    endpoint          TEXT    NOT NULL,
    input_file_id     TEXT    NOT NULL,
    completion_window TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    output_file_id    TEXT,
    error_file_id     TEXT,
    errors            TEXT,             -- JSON array of {code, line, message, param}
    created_at        INTEGER NOT NULL,
    in_progress_at    INTEGER,
    expires_at        INTEGER,
    finalizing_at     INTEGER,
    completed_at      INTEGER,
    failed_at         INTEGER,
    expired_at        INTEGER,
    cancelling_at     INTEGER,
    cancelled_at      INTEGER,
    request_total     INTEGER NOT NULL,
    request_completed INTEGER NOT NULL,
    request_failed    INTEGER NOT NULL,
    metadata          TEXT,             -- JSON object
    model             TEXT,
    usage             TEXT,             -- JSON object
    job_id            TEXT,
    remark            TEXT,
    version           INTEGER NOT NULL,
    updated_at        INTEGER
);

CREATE INDEX batches_by_owner ON batches (user_id, seq);
CREATE INDEX batches_by_job ON batches (job_id, seq) WHERE job_id IS NOT NULL;
CREATE INDEX batches_by_status ON batches (status, seq);

-- One row per committed version of a batch, written in the same transaction as the
-- change itself: the history that watchers read.
CREATE TABLE batch_events (
    batch_id TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    snapshot TEXT    NOT NULL,  -- the whole batch at this version, JSON
    at       INTEGER NOT NULL,
    PRIMARY KEY (batch_id, version)
) WITHOUT ROWID;

CREATE TABLE api_keys (
    id            TEXT    PRIMARY KEY,
    secret_sha256 BLOB    NOT NULL UNIQUE,
    user_id       TEXT    NOT NULL,
    scope         TEXT    NOT NULL CHECK (scope IN ('batches', 'worker', 'admin')),
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
