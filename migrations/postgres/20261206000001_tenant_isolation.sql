-- Keeping tenants apart (issue 25). Kept in step with migrations/sqlite.

-- The API key that last configured an endpoint (created it, or changed it since).
-- Revoking that key disables the endpoint if it follows every owner's batches, and
-- no delivery goes to such an endpoint while its key is revoked. Endpoints saved
-- before this migration have none: an admin key's update records one.
ALTER TABLE webhook_endpoints ADD COLUMN key_id TEXT;

-- The owner of each logged version, so that one tenant's change feed catch-up reads
-- through an index of its own changes, not through every tenant's.
ALTER TABLE batch_events ADD COLUMN owner TEXT;
UPDATE batch_events e SET owner = b.user_id FROM batches b WHERE b.id = e.batch_id;
CREATE INDEX batch_events_by_owner_feed_position ON batch_events (owner, xid, position);

-- Keys the server makes for itself and every replica shares, e.g. the one that seals
-- change feed cursors (base64). Made at the first start that needs one.
CREATE TABLE server_keys (
    name   TEXT PRIMARY KEY,
    secret TEXT NOT NULL
);
