-- /metrics counts AUDIT_REQUIRED runs on every scrape (dpp_audit_required_runs,
-- cached a few seconds per replica): a partial index keeps that to the few
-- runs waiting for a person instead of a scan of the whole runs table.
CREATE INDEX runs_audit_required ON runs (created_at) WHERE status = 'AUDIT_REQUIRED';
