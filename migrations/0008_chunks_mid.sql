-- A middle tier between the staged rows and `chunks` (issue 4, docs/scale.md
-- "Middle tier"). Merging staged rows straight into `chunks` put ~1.9 rows
-- in each leaf it rewrote at 80 M rows: a leaf read and a leaf write per
-- ~2 rows. Staged rows are now merged into `chunks_mid`, a B-tree of the
-- same shape that stays small (a few million rows, cached), and only once it
-- holds `MID_MAX` rows is it merged into `chunks` in id order, ~8 rows per
-- leaf. A row moves from here to `chunks` in ONE transaction (inserted
-- there, deleted here), so within one statement's snapshot an id is in at
-- most one of the two tables; every reader asks both in one statement or one
-- read transaction.
CREATE TABLE chunks_mid (
    id       BLOB PRIMARY KEY,
    pack_id  BLOB NOT NULL,
    "offset" INTEGER NOT NULL,
    len      INTEGER NOT NULL,
    raw_len  INTEGER NOT NULL,
    base     BLOB
) WITHOUT ROWID;
CREATE INDEX chunks_mid_base ON chunks_mid(base) WHERE base IS NOT NULL;
