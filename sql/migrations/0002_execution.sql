-- Execution: what the SQS queue backend needs to find runs whose message was
-- never sent. A run is committed QUEUED first and its message is sent after
-- the commit (a message must never name a run that does not exist); a crash
-- between the two leaves enqueued_at NULL, and the reconciler's backstop
-- sends those runs again. The Postgres backend never sets it: there the run
-- row itself is the queue entry.

ALTER TABLE runs ADD COLUMN enqueued_at TIMESTAMPTZ;

CREATE INDEX runs_queued_unsent ON runs (created_at)
    WHERE status = 'QUEUED' AND enqueued_at IS NULL;
