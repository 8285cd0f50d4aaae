-- Inserts at scale (issue 4, docs/scale.md "Staged chunk rows"). A chunk id
-- is a random keyed hash, so inserting a row into `chunks` dirties its own
-- leaf of a B-tree that at 80 M rows spans ~1.5 M leaves. New rows are
-- therefore first APPENDED to `chunks_recent` (in insertion order: a pack of
-- 64 rows dirties one or two pages) and mirrored in the gateway's memory,
-- which answers lookups for them. A merge moves them into `chunks` in id
-- order, in short transactions over consecutive id ranges, so the rows that
-- land in one leaf are written together; only then are they deleted here.
-- An id is in at most one of the two tables except during a merge, when a
-- merged row may still be here too (same location).
CREATE TABLE chunks_recent (
    seq      INTEGER PRIMARY KEY,         -- append order, assigned by the writer
    id       BLOB NOT NULL,               -- 32-byte keyed chunk id
    pack_id  BLOB NOT NULL,               -- its pack (inserted in the same transaction)
    "offset" INTEGER NOT NULL,
    len      INTEGER NOT NULL,
    raw_len  INTEGER NOT NULL,
    base     BLOB                         -- delta base, as chunks.base
);

-- Which chunk ids each pack was recorded with (its table of contents),
-- written with the pack. Replaces the index chunks_pack(pack_id): that index
-- is keyed by pack, so an id-ordered merge would dirty one of its leaves per
-- row. A pack's rows in `chunks` are the members whose row names the pack
-- (a member moved out by compaction names another pack).
CREATE TABLE pack_members (
    pack_id BLOB NOT NULL REFERENCES packs(id),
    id      BLOB NOT NULL,
    PRIMARY KEY (pack_id, id)
) WITHOUT ROWID;
INSERT INTO pack_members (pack_id, id)
    SELECT pack_id, id FROM chunks ORDER BY pack_id, id;

-- `chunks` without its foreign key: with no index on chunks(pack_id), a
-- foreign key check of every deleted pack would scan the table. Each chunk's
-- pack row is inserted in the transaction that records it (and GC deletes a
-- pack's rows with the pack), which the catalog code keeps; pack_members
-- keeps the foreign key.
CREATE TABLE chunks_new (
    id       BLOB PRIMARY KEY,
    pack_id  BLOB NOT NULL,
    "offset" INTEGER NOT NULL,
    len      INTEGER NOT NULL,
    raw_len  INTEGER NOT NULL,
    base     BLOB
) WITHOUT ROWID;
INSERT INTO chunks_new (id, pack_id, "offset", len, raw_len, base)
    SELECT id, pack_id, "offset", len, raw_len, base FROM chunks ORDER BY id;
DROP TABLE chunks;
ALTER TABLE chunks_new RENAME TO chunks;
CREATE INDEX chunks_base ON chunks(base) WHERE base IS NOT NULL;
