-- Control plane of the gateway: agents and their credentials, one-time
-- enrolment tokens, admin tokens, VMs and their disks as last reported, jobs.
-- Secrets are never stored: only keyed BLAKE3 hashes of them.

CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    host_name   TEXT NOT NULL,
    secret_hash BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL
);

CREATE TABLE enroll_tokens (
    token_hash BLOB PRIMARY KEY,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
);

CREATE TABLE admin_tokens (
    token_hash BLOB PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE vms (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    agent_id    TEXT NOT NULL REFERENCES agents(id),
    state       TEXT NOT NULL,
    descriptor  TEXT NOT NULL,   -- wire::VmInfo as JSON
    updated_at  INTEGER NOT NULL
);
CREATE INDEX vms_name ON vms(name);

CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    vm_id       TEXT,
    vm_name     TEXT,
    agent_id    TEXT,
    state       TEXT NOT NULL,     -- running | succeeded | failed | abandoned
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    message     TEXT,
    point_id    TEXT
);
CREATE INDEX jobs_started ON jobs(started_at);
