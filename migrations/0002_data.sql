-- Data plane of the gateway: sealed packs, where each chunk lives, and the
-- committed recovery points with their streams. Ids of packs and chunks are raw
-- bytes (BLOB); point ids are their 32-character lowercase hex text.
-- See docs/formats.md for the write ordering these rows take part in.

-- One row per sealed local pack file (data_dir/packs/<2 hex>/<id>.pack).
-- Inserted in the same transaction as its chunks, only after the file is
-- durable (fsynced and renamed, directory fsynced).
CREATE TABLE packs (
    id         BLOB PRIMARY KEY,          -- 16-byte pack id
    size       INTEGER NOT NULL,          -- bytes of the pack file
    created_at INTEGER NOT NULL,          -- unix seconds
    state      TEXT NOT NULL              -- 'sealed' (tiering may add states)
);

-- Where each stored chunk lives. A chunk lives in exactly one local pack.
CREATE TABLE chunks (
    id       BLOB PRIMARY KEY,            -- 32-byte keyed chunk id
    pack_id  BLOB NOT NULL REFERENCES packs(id),
    "offset" INTEGER NOT NULL,            -- of the sealed record in the pack
    len      INTEGER NOT NULL,            -- sealed record length
    raw_len  INTEGER NOT NULL             -- plaintext length
) WITHOUT ROWID;
CREATE INDEX chunks_pack ON chunks(pack_id);

-- Committed recovery points. A point and its streams are inserted in one
-- transaction, after every index it names is durable.
CREATE TABLE points (
    id            TEXT PRIMARY KEY,       -- 32 lowercase hex characters
    vm_id         TEXT NOT NULL,
    vm_name       TEXT NOT NULL,
    created_at    INTEGER NOT NULL,       -- unix seconds
    kind          TEXT NOT NULL CHECK (kind IN ('full', 'incremental')),
    state         TEXT NOT NULL,          -- 'committed'
    agent_id      TEXT NOT NULL,
    job_id        TEXT,
    logical_bytes INTEGER NOT NULL,
    stored_bytes  INTEGER NOT NULL,
    bytes_read    INTEGER NOT NULL,
    bytes_sent    INTEGER NOT NULL
);
CREATE INDEX points_vm_id ON points(vm_id, created_at);
CREATE INDEX points_vm_name ON points(vm_name, created_at);
CREATE INDEX points_created ON points(created_at);

-- The streams (virtual disks, configuration files) of a point; each has a
-- sealed index at data_dir/indexes/<point id>/<stream_no>.idx.
CREATE TABLE point_streams (
    point_id        TEXT NOT NULL REFERENCES points(id) ON DELETE CASCADE,
    stream_no       INTEGER NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('disk', 'config')),
    path            TEXT NOT NULL,
    controller      TEXT,
    location        TEXT,
    size            INTEGER NOT NULL,
    chunk_size      INTEGER NOT NULL,
    logical_sector  INTEGER NOT NULL,
    physical_sector INTEGER NOT NULL,
    chunk_count     INTEGER NOT NULL,
    PRIMARY KEY (point_id, stream_no)
);
