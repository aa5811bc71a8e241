-- Webhooks (issue 15): endpoints, the dispatcher's position in the change feed, and
-- the deliveries it queued. Kept in step with migrations/postgres.

-- An endpoint: where an owner's batch events go. Its signing secrets are stored sealed
-- (`sealed:v1:`, encrypted with BATCHD_WEBHOOK_SECRETS_KEY) or, when no key is
-- configured, as `plain:` text: this table is then as sensitive as the secrets.
CREATE TABLE webhook_endpoints (
    seq                       INTEGER PRIMARY KEY AUTOINCREMENT,
    id                        TEXT    NOT NULL UNIQUE,
    owner                     TEXT    NOT NULL,
    -- an admin's endpoint: every owner's batches
    all_owners                INTEGER NOT NULL,
    name                      TEXT    NOT NULL,
    url                       TEXT    NOT NULL,
    -- event type names, comma-separated
    event_types               TEXT    NOT NULL,
    secret                    TEXT    NOT NULL,
    previous_secret           TEXT,
    previous_secret_until     INTEGER,
    created_at                INTEGER NOT NULL,
    updated_at                INTEGER NOT NULL,
    -- the feed's head when it was created: it receives the changes after it
    starts_after_transaction  INTEGER NOT NULL,
    starts_after_position     INTEGER NOT NULL,
    -- since when every attempt failed (unix s), none when the last one succeeded
    failing_since             INTEGER,
    disabled_at               INTEGER,
    disabled_reason           TEXT
);
CREATE INDEX webhook_endpoints_by_owner ON webhook_endpoints (owner, seq);

-- Where the dispatcher is in the change feed: one row, created with the feed's head
-- when the first endpoint is or the first dispatcher starts. Advanced only by a
-- compare-and-set in the transaction that queues the deliveries of the changes read.
CREATE TABLE webhook_dispatch (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    after_transaction  INTEGER NOT NULL,
    after_position     INTEGER NOT NULL
);

-- One event for one endpoint, until a 2xx ends it or its retries run out. A replica
-- owns an attempt while its lease lasts; a dead replica's lease runs out and another
-- takes the delivery over.
CREATE TABLE webhook_deliveries (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    endpoint_id      TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    batch_id         TEXT    NOT NULL,
    -- the exact body sent on every attempt
    payload          TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_until      INTEGER,
    last_attempt_at  INTEGER,
    last_duration_ms INTEGER,
    last_status_code INTEGER,
    last_error       TEXT,
    finished_at      INTEGER,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, seq) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, seq);
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (finished_at) WHERE state <> 'pending';
