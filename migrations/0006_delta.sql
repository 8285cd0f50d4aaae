-- Delta chunks (issue 4): a chunk stored as a zstd delta against a base chunk
-- (payload codec 0x02, docs/formats.md §3) names its base here, so GC keeps
-- every base while a chunk row points at it. NULL for every other chunk.
-- A base is never itself a delta. The partial index holds delta rows only.
ALTER TABLE chunks ADD COLUMN base BLOB;
CREATE INDEX chunks_base ON chunks(base) WHERE base IS NOT NULL;
