-- OpenAI's output_expires_after ({anchor, seconds}) as the client sent it on create, for
-- the worker that writes the output files. NULL when none was asked for. Kept in step
-- with migrations/sqlite.
ALTER TABLE batches ADD COLUMN output_expires_after JSONB;
