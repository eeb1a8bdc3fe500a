-- SafeURL schema. Applied by `safeurl-worker migrate`: idempotent, and safe where the API service
-- already created these tables (every statement is IF NOT EXISTS or guarded).

CREATE TABLE IF NOT EXISTS scan_jobs (
    id            uuid PRIMARY KEY,
    url           text NOT NULL,
    state         text NOT NULL DEFAULT 'QUEUED',
    version       integer NOT NULL DEFAULT 0,
    attempts      integer NOT NULL DEFAULT 0,
    worker_id     text,
    error_code    text,
    error_message text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz
);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'scan_jobs_state_check') THEN
        ALTER TABLE scan_jobs ADD CONSTRAINT scan_jobs_state_check CHECK (state IN
            ('QUEUED', 'FETCHING', 'ANALYZING', 'COMPLETED', 'FAILED', 'TIMED_OUT'));
    END IF;
END $$;

-- Ownership and fault counting (see docs/contract.md): which process life owns the job, and how
-- many failures the job itself caused (container crashes, taking its worker down).
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS owner_token text;
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS faults integer NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS scan_results (
    job_id           uuid PRIMARY KEY REFERENCES scan_jobs(id),
    verdict          text NOT NULL CHECK (verdict IN ('safe', 'suspicious', 'malicious', 'unknown')),
    score            integer NOT NULL CHECK (score BETWEEN 0 AND 100),
    http_status      integer,
    final_url        text,
    redirects        jsonb,
    content_type     text,
    sha256           text,
    title            text,
    signals          jsonb,
    report           jsonb,
    analyzer_version text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
-- Our own additions, guarded so an API-created table gains them too.
ALTER TABLE scan_results ADD COLUMN IF NOT EXISTS url_key text;          -- normalized URL
ALTER TABLE scan_results ADD COLUMN IF NOT EXISTS cached_from uuid;      -- result reused from
-- How much of the page the verdict rests on (0..1); NULL for results scored before it existed.
ALTER TABLE scan_results ADD COLUMN IF NOT EXISTS confidence double precision
    CHECK (confidence IS NULL OR confidence BETWEEN 0 AND 1);

CREATE TABLE IF NOT EXISTS scan_audit_log (
    id         bigserial PRIMARY KEY,
    job_id     uuid NOT NULL,
    from_state text,
    to_state   text NOT NULL,
    version    integer NOT NULL,
    worker_id  text,
    at         timestamptz NOT NULL DEFAULT now(),
    detail     jsonb
);

CREATE INDEX IF NOT EXISTS scan_audit_log_job_idx ON scan_audit_log (job_id, version);
-- The janitor and `status` look at unfinished jobs by age; keep that index small.
CREATE INDEX IF NOT EXISTS scan_jobs_active_idx ON scan_jobs (state, updated_at)
    WHERE state IN ('QUEUED', 'FETCHING', 'ANALYZING');
CREATE INDEX IF NOT EXISTS scan_jobs_finished_idx ON scan_jobs (finished_at);
CREATE INDEX IF NOT EXISTS scan_results_url_key_idx ON scan_results (url_key, created_at);

-- Submissions through `safeurl-worker api` (docs/api.md). All nullable: rows INSERTed by another
-- API service simply have none of them.
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS callback_url text;
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS metadata jsonb;
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS mode text;                -- static / render
-- "<token name>:<Idempotency-Key>" and a hash of the request body it came with: the same key
-- with the same body returns the same job, with another body it is a conflict (409).
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS idempotency_key text;
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS request_hash text;
CREATE UNIQUE INDEX IF NOT EXISTS scan_jobs_idempotency_idx ON scan_jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- `GET /v1/scans` pages newest first by (created_at, id).
CREATE INDEX IF NOT EXISTS scan_jobs_created_idx ON scan_jobs (created_at DESC, id DESC);
-- `GET /v1/scans?url=` looks a URL up by its hash: URLs (up to 8 KiB) can outgrow a btree entry.
CREATE INDEX IF NOT EXISTS scan_jobs_url_md5_idx ON scan_jobs (md5(url));

-- The completion-callback outbox (docs/contract.md, *Callbacks and NOTIFY*): one row per
-- terminal write of a job that has a callback URL, inserted by that same statement, so a
-- callback is never lost to a crash. The api process delivers them (callbacks.py).
CREATE TABLE IF NOT EXISTS scan_callbacks (
    id              bigserial PRIMARY KEY,
    job_id          uuid NOT NULL,
    version         integer NOT NULL,           -- the job version of the terminal write
    state           text NOT NULL,              -- the job's terminal state it reports
    error_code      text,
    url             text NOT NULL,
    status          text NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED', 'REFUSED')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX IF NOT EXISTS scan_callbacks_due_idx ON scan_callbacks (next_attempt_at)
    WHERE status = 'PENDING';
CREATE INDEX IF NOT EXISTS scan_callbacks_job_idx ON scan_callbacks (job_id);

CREATE TABLE IF NOT EXISTS scan_callback_attempts (
    id          bigserial PRIMARY KEY,
    callback_id bigint NOT NULL,
    job_id      uuid NOT NULL,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    http_status integer,
    error       text,
    duration_ms integer
);
CREATE INDEX IF NOT EXISTS scan_callback_attempts_job_idx ON scan_callback_attempts (job_id);

-- A render scan's artifacts (artifacts.py): screenshot, full-page screenshot, DOM, request log.
-- Written by the completing statement with the result row (Store.complete); the foreign key
-- makes an artifact without its result impossible. `size` and `sha256` are measured by the
-- worker, never taken from the container. Behind Store.artifact_bytes, so the bytes could move
-- to an object store later (the row would keep kind, type, size, hash and a key).
CREATE TABLE IF NOT EXISTS scan_artifacts (
    job_id       uuid NOT NULL REFERENCES scan_results(job_id),
    kind         text NOT NULL,
    content_type text NOT NULL,
    size         bigint NOT NULL CHECK (size >= 0),
    sha256       text NOT NULL,
    data         bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, kind)
);

-- Scheduling (docs/contract.md, "Lanes, tenants and politeness"). Nullable, so rows INSERTed by
-- another API service keep working: NULL lane is the default lane (the plain SCAN_STREAM), NULL
-- tenant is no tenant (no quota, shares the lane's own queue).
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS lane text;
ALTER TABLE scan_jobs ADD COLUMN IF NOT EXISTS tenant text;
-- "How many QUEUED jobs does tenant T have": asked under a per-tenant lock by every submission
-- of a tenant with a quota (Store.submit_job), so it must stay cheap with a large backlog. Only
-- QUEUED rows of tenants are in it: it shrinks as the backlog drains.
CREATE INDEX IF NOT EXISTS scan_jobs_tenant_queued_idx ON scan_jobs (tenant)
    WHERE state = 'QUEUED' AND tenant IS NOT NULL;
-- A refusal's retry hint reads how many of the tenant's jobs finished lately; a tenant hammering
-- at its quota must not make each refusal scan every recent finish of every tenant.
CREATE INDEX IF NOT EXISTS scan_jobs_tenant_finished_idx ON scan_jobs (tenant, finished_at)
    WHERE tenant IS NOT NULL AND finished_at IS NOT NULL;
