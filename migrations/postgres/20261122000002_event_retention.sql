-- The retention task deletes events older than --event-retention; this finds them.
CREATE INDEX batch_events_by_time ON batch_events (at);
