-- Protection groups (MABS semantics): a named set of VMs sharing one policy.
-- A VM is in at most one group (UNIQUE vm_id). Times of day are minutes after
-- midnight UTC; see gateway/src/policy/ for what the values mean.

CREATE TABLE groups (
    name                 TEXT PRIMARY KEY,
    -- NULL = express full just before each recovery point (no periodic sync)
    sync_minutes         INTEGER CHECK (sync_minutes IS NULL OR sync_minutes BETWEEN 15 AND 1440),
    points_at            TEXT NOT NULL,      -- "480,1200": recovery-point times, minutes UTC
    short_term_days      INTEGER NOT NULL CHECK (short_term_days BETWEEN 1 AND 448),
    chunk_size           INTEGER NOT NULL,
    consistency_check    TEXT NOT NULL
        CHECK (consistency_check IN ('only-when-inconsistent', 'scheduled', 'manual')),
    consistency_check_at INTEGER,            -- minutes UTC, only when 'scheduled'
    created_at           INTEGER NOT NULL    -- unix seconds
);

CREATE TABLE group_members (
    vm_id      TEXT NOT NULL UNIQUE REFERENCES vms(id),
    group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    added_at   INTEGER NOT NULL,             -- unix seconds
    -- When the scheduler last enqueued a run of each kind for this VM (unix
    -- seconds); NULL = never. Input of policy::schedule::plan.
    last_sync              INTEGER,
    last_recovery_point    INTEGER,
    last_consistency_check INTEGER
);
CREATE INDEX group_members_group ON group_members(group_name);

-- Scheduled backups queue in `jobs`: 'queued' (by the scheduler) →
-- 'dispatched' (an agent took it) → 'running' (its backup session began) →
-- succeeded | failed. Queued jobs survive a gateway restart.
ALTER TABLE jobs ADD COLUMN full INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN window_at INTEGER;   -- the schedule window served
ALTER TABLE jobs ADD COLUMN group_name TEXT;
CREATE INDEX jobs_state ON jobs(state, started_at);
