-- Room on each page of `batches` for the next version of its rows (issue 26). A batch
-- is written once and then updated for every progress report. PostgreSQL writes an
-- update as a HOT update (no new entry in any of the table's indexes) only when the
-- new version fits on the page of the old one; a page filled to 100 % has no room, so
-- the first update of every row on it went to another page and added an entry to each
-- of the table's thirteen indexes. Measured with the harness's writes group (100,000
-- batches inserted, then updated): the first write phase began 46 % non-HOT and stayed
-- at 5-10 %, against 0.2-0.5 % once the pages had been rewritten. A fill factor applies
-- to pages written from now on; SQLite has no such setting.
ALTER TABLE batches SET (fillfactor = 90);
