//! Data-plane tables: sealed packs, chunk locations, committed recovery points
//! and their streams (schema in `migrations/0002_data.sql`).
//!
//! Write ordering (DESIGN.md §6): a pack and its chunks are inserted in one
//! transaction only after the pack file is durable; a point and its streams are
//! inserted in one transaction only after every index it names is durable.
//! This module does not check those preconditions: the chunk store and the
//! commit handler do.

use std::collections::{HashMap, HashSet};

use futures_util::{stream, StreamExt, TryStreamExt};

use tierback_format::ids::{ChunkId, PackId, PointId};
use tierback_format::pack::TocEntry;

use super::staging::StagedRow;
use super::{Catalog, CatalogError, Result};

/// Ids per statement of batched lookups (DESIGN.md §4: batched
/// lookups are ~10× faster than single-key ones on SQLite).
pub const LOOKUP_BATCH: usize = 256;
/// Default number of concurrent statements of one [`Catalog::lookup_chunks`]
/// or [`Catalog::contains_chunks`]
/// (the pool has 8 connections; see docs/scale.md for the measurement).
pub const LOOKUP_PARALLELISM: usize = 8;
/// Upper bound of the parallelism a caller may ask for.
pub const LOOKUP_MAX_PARALLELISM: usize = 8;
/// Fewest ids per statement when a lookup is split for parallelism.
pub const LOOKUP_MIN_PART: usize = 32;
/// Rows per multi-row `INSERT` of chunk rows (5 bound values each).
const INSERT_ROWS: usize = 128;

/// Where a chunk lives in the local tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Pack holding the chunk's sealed record.
    pub pack_id: PackId,
    /// Offset of the record in the pack file.
    pub offset: u64,
    /// Length of the sealed record.
    pub len: u32,
    /// Length of the chunk's plaintext.
    pub raw_len: u32,
}

/// A pack to record (its chunks are passed alongside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewPack {
    /// Pack id.
    pub id: PackId,
    /// Bytes of the pack file.
    pub size: u64,
    /// Unix seconds.
    pub created_at: i64,
}

/// A recorded pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackRow {
    /// Pack id.
    pub id: PackId,
    /// Bytes of the pack file.
    pub size: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// `sealed` (tiering may add states).
    pub state: String,
}

/// A recovery point to commit, with its streams.
#[derive(Debug, Clone)]
pub struct NewPoint {
    pub id: PointId,
    pub vm_id: String,
    pub vm_name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `full` or `incremental`.
    pub kind: String,
    pub agent_id: String,
    pub job_id: Option<String>,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub streams: Vec<NewStream>,
}

/// One stream (virtual disk or configuration file) of a new point.
#[derive(Debug, Clone)]
pub struct NewStream {
    pub stream_no: u32,
    /// `disk` or `config`.
    pub kind: String,
    pub path: String,
    pub controller: Option<String>,
    pub location: Option<String>,
    pub size: u64,
    pub chunk_size: u32,
    pub logical_sector: u32,
    pub physical_sector: u32,
    /// Stored (non-zero) chunks in the stream's index.
    pub chunk_count: u64,
}

/// A committed recovery point as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PointRow {
    /// 32 lowercase hex characters.
    pub id: String,
    pub vm_id: String,
    pub vm_name: String,
    pub created_at: i64,
    pub kind: String,
    pub state: String,
    pub agent_id: String,
    pub job_id: Option<String>,
    pub logical_bytes: i64,
    pub stored_bytes: i64,
    pub bytes_read: i64,
    pub bytes_sent: i64,
}

/// A stream of a committed point as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StreamRow {
    pub point_id: String,
    pub stream_no: i64,
    pub kind: String,
    pub path: String,
    pub controller: Option<String>,
    pub location: Option<String>,
    pub size: i64,
    pub chunk_size: i64,
    pub logical_sector: i64,
    pub physical_sector: i64,
    pub chunk_count: i64,
}

const POINT_COLUMNS: &str = "id, vm_id, vm_name, created_at, kind, state, agent_id, job_id, \
     logical_bytes, stored_bytes, bytes_read, bytes_sent";
const STREAM_COLUMNS: &str =
    "point_id, stream_no, kind, path, controller, location, size, chunk_size, \
     logical_sector, physical_sector, chunk_count";

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v)
        .map_err(|_| CatalogError::Invalid(format!("{what} {v} does not fit the catalog")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v)
        .map_err(|_| CatalogError::Invalid(format!("catalog holds a negative {what} ({v})")))
}

fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| CatalogError::Invalid(format!("catalog holds an out-of-range {what} ({v})")))
}

type ChunkTuple = (Vec<u8>, Vec<u8>, i64, i64, i64);

pub(crate) fn decode_location(row: ChunkTuple) -> Result<(ChunkId, ChunkLocation)> {
    let (id, pack, offset, len, raw_len) = row;
    let bad = |e: tierback_format::ids::IdError| CatalogError::Invalid(e.to_string());
    Ok((
        ChunkId::from_slice(&id).map_err(bad)?,
        ChunkLocation {
            pack_id: PackId::from_slice(&pack).map_err(bad)?,
            offset: to_u64(offset, "chunk offset")?,
            len: to_u32(len, "chunk length")?,
            raw_len: to_u32(raw_len, "chunk raw length")?,
        },
    ))
}

/// Chunk ids whose first byte is in `first..end` (`end` `None`: to the
/// last id). Chunk ids are keyed hashes, so ranges of equal width hold
/// about equal numbers of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    pub first: u8,
    pub end: Option<u8>,
}

impl ChunkRange {
    /// `n` (1..=256) ranges of equal width covering every id.
    pub fn split(n: usize) -> Vec<ChunkRange> {
        let n = n.clamp(1, 256);
        (0..n)
            .map(|i| ChunkRange {
                first: (i * 256 / n) as u8,
                end: (i + 1 < n).then(|| ((i + 1) * 256 / n) as u8),
            })
            .collect()
    }
}

pub(crate) async fn chunk_page(
    pool: &sqlx::SqlitePool,
    range: ChunkRange,
    after: Option<&ChunkId>,
    limit: u32,
) -> Result<Vec<(ChunkId, PackId, u32)>> {
    // BLOBs compare bytewise and a prefix sorts first: [first] <= every id
    // starting with `first`, [end] > every id starting below `end`.
    // Both tables, merged in id order by SQLite (one statement, so a row
    // moving from `chunks_mid` to `chunks` is seen once).
    let cond = format!(
        "id {} ?1 {}",
        if after.is_some() { ">" } else { ">=" },
        if range.end.is_some() {
            "AND id < ?2"
        } else {
            ""
        },
    );
    let sql = format!(
        "SELECT id, pack_id, len FROM chunks WHERE {cond} UNION ALL \
         SELECT id, pack_id, len FROM chunks_mid WHERE {cond} ORDER BY id LIMIT ?3"
    );
    let first = [range.first];
    let mut q = sqlx::query_as::<_, (Vec<u8>, Vec<u8>, i64)>(&sql);
    q = match after {
        Some(a) => q.bind(&a.0[..]),
        None => q.bind(&first[..]),
    };
    let end = range.end.map(|e| [e]);
    q = q.bind(end.as_ref().map(|e| &e[..]));
    let rows = q.bind(i64::from(limit)).fetch_all(pool).await?;
    let bad = |e: tierback_format::ids::IdError| CatalogError::Invalid(e.to_string());
    rows.into_iter()
        .map(|(id, pack, len)| {
            Ok((
                ChunkId::from_slice(&id).map_err(bad)?,
                PackId::from_slice(&pack).map_err(bad)?,
                to_u32(len, "chunk length")?,
            ))
        })
        .collect()
}

/// Writes chunk rows, [`INSERT_ROWS`] per statement: appended to
/// `chunks_recent` numbered from `first_seq`, or (`None`) merged into
/// `chunks_mid` with `INSERT OR IGNORE` (a chunk keeps its first location).
/// Returns the rows written.
pub(crate) async fn write_chunk_rows(
    conn: &mut sqlx::SqliteConnection,
    rows: &[StagedRow],
    first_seq: Option<i64>,
) -> Result<u64> {
    let (head, cols) = match first_seq {
        Some(_) => ("INSERT INTO chunks_recent (seq, ", "(?, ?, ?, ?, ?, ?, ?)"),
        None => ("INSERT OR IGNORE INTO chunks_mid (", "(?, ?, ?, ?, ?, ?)"),
    };
    let mut written = 0;
    for (k, part) in rows.chunks(INSERT_ROWS).enumerate() {
        let sql = format!(
            "{head}id, pack_id, \"offset\", len, raw_len, base) VALUES {}",
            vec![cols; part.len()].join(", ")
        );
        let mut q = sqlx::query(&sql);
        for (j, (id, loc, base)) in part.iter().enumerate() {
            if let Some(first) = first_seq {
                q = q.bind(first + (k * INSERT_ROWS + j) as i64);
            }
            q = q
                .bind(&id.0[..])
                .bind(&loc.pack_id.0[..])
                .bind(to_i64(loc.offset, "chunk offset")?)
                .bind(i64::from(loc.len))
                .bind(i64::from(loc.raw_len))
                .bind(base.map(|b| b.0.to_vec()));
        }
        written += q.execute(&mut *conn).await?.rows_affected();
    }
    Ok(written)
}

/// One statement over `batch`: `chunks` first, then `chunks_mid` for the
/// ids `chunks` lacks (the leaves the first part read are cached, so the
/// second asks the small table only for those).
async fn select_chunks(
    pool: sqlx::SqlitePool,
    batch: Vec<ChunkId>,
) -> Result<Vec<(ChunkId, ChunkLocation)>> {
    let sql = format!(
        "SELECT id, pack_id, \"offset\", len, raw_len FROM chunks WHERE id IN ({}) UNION ALL \
         SELECT m.id, m.pack_id, m.\"offset\", m.len, m.raw_len FROM (VALUES {}) AS v \
         JOIN chunks_mid m ON m.id = v.column1 \
         WHERE NOT EXISTS (SELECT 1 FROM chunks WHERE id = v.column1)",
        vec!["?"; batch.len()].join(", "),
        vec!["(?)"; batch.len()].join(", ")
    );
    let mut q = sqlx::query_as::<_, ChunkTuple>(&sql);
    for id in batch.iter().chain(&batch) {
        q = q.bind(&id.0[..]);
    }
    q.fetch_all(&pool)
        .await?
        .into_iter()
        .map(decode_location)
        .collect()
}

/// One presence statement over `batch`: the positions (in `batch`) of the
/// ids catalogued (in `chunks`, else in `chunks_mid`: `OR` asks the small
/// table only for ids the large one lacks), as a single `group_concat`
/// row. The driver copies every column of every result row and sends each
/// row to the caller as its own message, so one row per statement instead
/// of one per hit is faster: at 80 M rows, 8 statements at once, 120 k
/// hits/s against 95 k/s for the locations query in the same run
/// (docs/scale.md, fourth pass).
pub(crate) async fn select_present<'e, E>(ex: E, batch: &[ChunkId]) -> Result<Vec<usize>>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let values: Vec<String> = (0..batch.len()).map(|i| format!("({i}, ?)")).collect();
    let sql = format!(
        "SELECT group_concat(v.column1) FROM (VALUES {}) AS v \
         WHERE EXISTS (SELECT 1 FROM chunks WHERE id = v.column2) \
         OR EXISTS (SELECT 1 FROM chunks_mid WHERE id = v.column2)",
        values.join(", ")
    );
    let mut q = sqlx::query_scalar::<_, Option<String>>(&sql);
    for id in batch {
        q = q.bind(&id.0[..]);
    }
    let Some(list) = q.fetch_one(ex).await? else {
        return Ok(Vec::new());
    };
    list.split(',')
        .map(|p| match p.parse::<usize>() {
            Ok(i) if i < batch.len() => Ok(i),
            _ => Err(CatalogError::Invalid(format!(
                "presence query returned position {p:?} for {} ids",
                batch.len()
            ))),
        })
        .collect()
}

/// The ids of `ask` split into about `parallelism` statements of
/// [`LOOKUP_MIN_PART`]..=[`LOOKUP_BATCH`] ids.
fn lookup_parts(ask: &[ChunkId], parallelism: usize) -> (usize, Vec<Vec<ChunkId>>) {
    let parallelism = parallelism.clamp(1, LOOKUP_MAX_PARALLELISM);
    let part = ask
        .len()
        .div_ceil(parallelism)
        .clamp(LOOKUP_MIN_PART, LOOKUP_BATCH);
    // Owned batches: the futures must be `Send` for any lifetime (axum
    // handlers), which borrowed closures are not.
    let parts = ask.chunks(part).map(<[ChunkId]>::to_vec).collect();
    (parallelism, parts)
}

impl Catalog {
    /// Whether each of `ids` is catalogued (aligned with the input): the
    /// dedup question of the protocol's `lack` requests and of the commit
    /// check, answered like [`Self::lookup_chunks`] (filter first, then up
    /// to [`LOOKUP_PARALLELISM`] statements at once) but without the
    /// locations, one result row per statement.
    pub async fn contains_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        self.contains_chunks_with(ids, LOOKUP_PARALLELISM).await
    }

    /// [`Self::contains_chunks`] with `parallelism` concurrent statements.
    pub async fn contains_chunks_with(
        &self,
        ids: &[ChunkId],
        parallelism: usize,
    ) -> Result<Vec<bool>> {
        let filter = self.chunk_filter.active();
        let maybe = (0..ids.len())
            .filter(|&i| filter.as_ref().is_none_or(|f| f.may_contain(&ids[i])))
            .map(|i| (i, ids[i]));
        // Staged rows first, then SQL (staging.rs: never neither).
        let (staged, rest) = self.staged.partition(maybe);
        let mut present = vec![false; ids.len()];
        for (i, _) in staged {
            present[i] = true;
        }
        if rest.is_empty() {
            return Ok(present);
        }
        let pos: Vec<usize> = rest.iter().map(|(i, _)| *i).collect();
        let ask: Vec<ChunkId> = rest.into_iter().map(|(_, id)| id).collect();
        let (parallelism, parts) = lookup_parts(&ask, parallelism);
        let starts: Vec<usize> = parts
            .iter()
            .scan(0, |at, p| {
                let start = *at;
                *at += p.len();
                Some(start)
            })
            .collect();
        let pool = self.pool.clone();
        let mut found = stream::iter(parts.into_iter().zip(starts))
            .map(move |(part, start)| {
                let pool = pool.clone();
                async move { Ok::<_, CatalogError>((start, select_present(&pool, &part).await?)) }
            })
            .buffer_unordered(parallelism);
        while let Some((start, hits)) = found.try_next().await? {
            for k in hits {
                present[pos[start + k]] = true;
            }
        }
        Ok(present)
    }

    /// Locations of `ids` (aligned with the input; `None` = not stored).
    /// Ids the chunk filter rules out are answered `None` without SQL; the
    /// rest are looked up [`LOOKUP_BATCH`] at most per statement, up to
    /// [`LOOKUP_PARALLELISM`] statements at once (see
    /// [`Self::lookup_chunks_with`]).
    pub async fn lookup_chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkLocation>>> {
        self.lookup_chunks_with(ids, LOOKUP_PARALLELISM).await
    }

    /// [`Self::lookup_chunks`] with `parallelism` concurrent statements.
    /// The ids left after the filter are split into about `parallelism`
    /// statements (of [`LOOKUP_MIN_PART`]..=[`LOOKUP_BATCH`] ids), run on
    /// as many pool connections at once, so that rows not in the page cache
    /// are read with a queue depth above one.
    pub async fn lookup_chunks_with(
        &self,
        ids: &[ChunkId],
        parallelism: usize,
    ) -> Result<Vec<Option<ChunkLocation>>> {
        let filter = self.chunk_filter.active();
        let maybe = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| filter.as_ref().is_none_or(|f| f.may_contain(id)))
            .map(|(i, id)| (i, *id));
        // Staged rows first, then SQL (staging.rs: never neither).
        let (staged, rest) = self.staged.partition(maybe);
        let mut out = vec![None; ids.len()];
        for (i, loc) in staged {
            out[i] = Some(loc);
        }
        if rest.is_empty() {
            return Ok(out);
        }
        let ask: Vec<ChunkId> = rest.iter().map(|(_, id)| *id).collect();
        let (parallelism, batches) = lookup_parts(&ask, parallelism);
        let pool = self.pool.clone();
        let found: HashMap<ChunkId, ChunkLocation> = stream::iter(batches)
            .map(move |batch| select_chunks(pool.clone(), batch))
            .buffer_unordered(parallelism)
            .try_fold(
                HashMap::with_capacity(ask.len()),
                |mut m, rows| async move {
                    m.extend(rows);
                    Ok(m)
                },
            )
            .await?;
        for (i, id) in rest {
            out[i] = found.get(&id).copied();
        }
        Ok(out)
    }

    /// Location of one chunk.
    pub async fn chunk_location(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        if self
            .chunk_filter
            .active()
            .is_some_and(|f| !f.may_contain(id))
        {
            return Ok(None);
        }
        if let Some(loc) = self.staged.get(id) {
            return Ok(Some(loc));
        }
        let row = sqlx::query_as::<_, ChunkTuple>(
            "SELECT id, pack_id, \"offset\", len, raw_len FROM chunks WHERE id = ?1 UNION ALL \
             SELECT id, pack_id, \"offset\", len, raw_len FROM chunks_mid WHERE id = ?1 LIMIT 1",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(decode_location)
            .transpose()
            .map(|o| o.map(|(_, loc)| loc))
    }

    /// Location of one chunk and, for a delta chunk, its base.
    pub async fn chunk_location_and_base(
        &self,
        id: &ChunkId,
    ) -> Result<Option<(ChunkLocation, Option<ChunkId>)>> {
        if self
            .chunk_filter
            .active()
            .is_some_and(|f| !f.may_contain(id))
        {
            return Ok(None);
        }
        if let Some(staged) = self.staged.get_with_base(id) {
            return Ok(Some(staged));
        }
        let row = sqlx::query_as::<_, (Vec<u8>, Vec<u8>, i64, i64, i64, Option<Vec<u8>>)>(
            "SELECT id, pack_id, \"offset\", len, raw_len, base FROM chunks WHERE id = ?1 UNION ALL \
             SELECT id, pack_id, \"offset\", len, raw_len, base FROM chunks_mid WHERE id = ?1 \
             LIMIT 1",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, pack, offset, len, raw_len, base)) = row else {
            return Ok(None);
        };
        let (_, loc) = decode_location((id, pack, offset, len, raw_len))?;
        let base = base
            .map(|b| ChunkId::from_slice(&b).map_err(|e| CatalogError::Invalid(e.to_string())))
            .transpose()?;
        Ok(Some((loc, base)))
    }

    /// Distinct ids that some chunk row (merged or staged) names as its
    /// base, ascending, after `after`: GC keeps them all (keyset pages over
    /// the partial index `chunks_base`, plus the staged bases they span). A
    /// page with fewer than `limit` ids is the last.
    pub async fn delta_bases_page(
        &self,
        after: Option<&ChunkId>,
        limit: u32,
    ) -> Result<Vec<ChunkId>> {
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
            "SELECT base FROM chunks WHERE base IS NOT NULL AND base > ?1 UNION \
             SELECT base FROM chunks_mid WHERE base IS NOT NULL AND base > ?1 \
             ORDER BY base LIMIT ?2",
        )
        .bind(after.map_or_else(Vec::new, |a| a.0.to_vec()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let full = rows.len() >= limit as usize;
        let mut page: std::collections::BTreeSet<ChunkId> = rows
            .into_iter()
            .map(|(b,)| ChunkId::from_slice(&b).map_err(|e| CatalogError::Invalid(e.to_string())))
            .collect::<Result<_>>()?;
        // Bases of staged rows: up to the page's last id while SQL has more
        // pages, all of them on the last page.
        let last = page.last().copied();
        page.extend(
            self.staged
                .bases_after(after)
                .into_iter()
                .filter(|b| !full || last.is_none_or(|l| *b <= l)),
        );
        Ok(page.into_iter().collect())
    }

    /// Records a durable pack and its chunks in one transaction. Idempotent:
    /// a pack or chunk already recorded is left as it is (a chunk keeps its
    /// first location). The ids enter the chunk filter before the
    /// transaction commits (a rolled-back insert leaves stale positives,
    /// which cost a lookup).
    pub async fn insert_pack_with_chunks(&self, pack: &NewPack, chunks: &[TocEntry]) -> Result<()> {
        self.insert_packs_with_chunks(&[(*pack, chunks)]).await
    }

    /// [`Self::insert_pack_with_chunks`] for several durable packs in ONE
    /// transaction (one WAL fsync instead of one per pack: bulk loads such
    /// as a catalog rebuilt from the cloud).
    pub async fn insert_packs_with_chunks(&self, packs: &[(NewPack, &[TocEntry])]) -> Result<()> {
        self.insert_packs_with_bases(packs, &HashMap::new()).await
    }

    /// [`Self::insert_pack_with_chunks`], where the chunks named in `bases`
    /// are deltas against the chunk they map to (recorded in `base`).
    pub async fn insert_pack_with_bases(
        &self,
        pack: &NewPack,
        chunks: &[TocEntry],
        bases: &HashMap<ChunkId, ChunkId>,
    ) -> Result<()> {
        self.insert_packs_with_bases(&[(*pack, chunks)], bases)
            .await
    }

    async fn insert_packs_with_bases(
        &self,
        packs: &[(NewPack, &[TocEntry])],
        bases: &HashMap<ChunkId, ChunkId>,
    ) -> Result<()> {
        let guard = self.chunk_filter.insert_guard().await;
        // The chunk writer (synchronous = NORMAL, see `Catalog::open`). Under
        // it no other insert or merge runs, so no row can be added to
        // `chunks` or staged until this transaction ends (GC may delete).
        let mut writer = self.chunk_writer.lock().await;
        let conn = writer
            .as_mut()
            .ok_or_else(|| CatalogError::Invalid("the catalog is closed".into()))?;
        // A chunk keeps its first location: ids staged already are known,
        // and ids the filter cannot rule out are checked in `chunks` below
        // (asked before this insert adds its own ids to the filter).
        let filter = self.chunk_filter.active();
        let all = packs
            .iter()
            .flat_map(|(_, c)| c.iter().map(|c| (c.chunk_id, c.chunk_id)));
        let (staged_now, rest) = self.staged.partition(all);
        let mut known: HashSet<ChunkId> = staged_now.into_iter().map(|(id, _)| id).collect();
        let ask: Vec<ChunkId> = rest
            .into_iter()
            .map(|(_, id)| id)
            .filter(|id| filter.as_ref().is_none_or(|f| f.may_contain(id)))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        guard.add(
            packs
                .iter()
                .flat_map(|(_, c)| c.iter().map(|c| &c.chunk_id)),
        );
        let mut tx = sqlx::Connection::begin(conn).await?;
        for part in ask.chunks(LOOKUP_BATCH) {
            known.extend(
                select_present(&mut *tx, part)
                    .await?
                    .into_iter()
                    .map(|k| part[k]),
            );
        }
        let mut staged: Vec<StagedRow> = Vec::new();
        for (pack, chunks) in packs {
            sqlx::query(
                "INSERT OR IGNORE INTO packs (id, size, created_at, state) VALUES (?, ?, ?, 'sealed')",
            )
            .bind(&pack.id.0[..])
            .bind(to_i64(pack.size, "pack size")?)
            .bind(pack.created_at)
            .execute(&mut *tx)
            .await?;
            // Multi-row statements: per-statement overhead, not SQLite,
            // bounded pack-sized transactions (docs/scale.md).
            for rows in chunks.chunks(INSERT_ROWS) {
                let sql = format!(
                    "INSERT OR IGNORE INTO pack_members (pack_id, id) VALUES {}",
                    vec!["(?, ?)"; rows.len()].join(", ")
                );
                let mut q = sqlx::query(&sql);
                for c in rows {
                    q = q.bind(&pack.id.0[..]).bind(&c.chunk_id.0[..]);
                }
                q.execute(&mut *tx).await?;
            }
            for c in chunks.iter() {
                if known.insert(c.chunk_id) {
                    let loc = ChunkLocation {
                        pack_id: pack.id,
                        offset: c.offset,
                        len: c.len,
                        raw_len: c.raw_len,
                    };
                    staged.push((c.chunk_id, loc, bases.get(&c.chunk_id).copied()));
                }
            }
        }
        // New rows are appended to chunks_recent (staging.rs).
        let first_seq = self.staged.take_seqs(staged.len());
        write_chunk_rows(&mut tx, &staged, Some(first_seq)).await?;
        tx.commit().await?;
        self.staged.add(first_seq, &staged);
        drop(writer);
        drop(guard);
        self.checkpointer.poke();
        self.chunk_filter.maybe_rebuild(&self.pool, &self.staged);
        self.after_staging().await
    }

    /// One recorded pack.
    pub async fn get_pack(&self, id: &PackId) -> Result<Option<PackRow>> {
        let row = sqlx::query_as::<_, (Vec<u8>, i64, i64, String)>(
            "SELECT id, size, created_at, state FROM packs WHERE id = ?",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(id, size, created_at, state)| {
            Ok(PackRow {
                id: PackId::from_slice(&id).map_err(|e| CatalogError::Invalid(e.to_string()))?,
                size: to_u64(size, "pack size")?,
                created_at,
                state,
            })
        })
        .transpose()
    }

    /// Makes a recovery point and its streams visible in ONE transaction
    /// (DESIGN.md §6 rule 3). The caller has made every index durable first.
    pub async fn commit_point(&self, p: &NewPoint) -> Result<()> {
        let id = p.id.to_string();
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO points ({POINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, 'committed', ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&id)
        .bind(&p.vm_id)
        .bind(&p.vm_name)
        .bind(p.created_at)
        .bind(&p.kind)
        .bind(&p.agent_id)
        .bind(&p.job_id)
        .bind(to_i64(p.logical_bytes, "logical bytes")?)
        .bind(to_i64(p.stored_bytes, "stored bytes")?)
        .bind(to_i64(p.bytes_read, "bytes read")?)
        .bind(to_i64(p.bytes_sent, "bytes sent")?)
        .execute(&mut *tx)
        .await?;
        for s in &p.streams {
            sqlx::query(&format!(
                "INSERT INTO point_streams ({STREAM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .bind(&id)
            .bind(i64::from(s.stream_no))
            .bind(&s.kind)
            .bind(&s.path)
            .bind(&s.controller)
            .bind(&s.location)
            .bind(to_i64(s.size, "stream size")?)
            .bind(i64::from(s.chunk_size))
            .bind(i64::from(s.logical_sector))
            .bind(i64::from(s.physical_sector))
            .bind(to_i64(s.chunk_count, "chunk count")?)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Committed points, newest first; `vm` matches the VM id or name.
    pub async fn list_points(&self, vm: Option<&str>) -> Result<Vec<PointRow>> {
        let base = format!("SELECT {POINT_COLUMNS} FROM points WHERE state = 'committed'");
        let order = "ORDER BY created_at DESC, id DESC";
        let rows = match vm {
            // Two indexed lookups instead of one OR that would scan.
            Some(vm) => {
                sqlx::query_as::<_, PointRow>(&format!(
                    "{base} AND vm_id = ? UNION {base} AND vm_name = ? {order}"
                ))
                .bind(vm)
                .bind(vm)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as::<_, PointRow>(&format!("{base} {order}"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows)
    }

    /// One committed point and its streams (ordered by stream number).
    pub async fn get_point(&self, id: &PointId) -> Result<Option<(PointRow, Vec<StreamRow>)>> {
        let id = id.to_string();
        let Some(point) = sqlx::query_as::<_, PointRow>(&format!(
            "SELECT {POINT_COLUMNS} FROM points WHERE id = ? AND state = 'committed'"
        ))
        .bind(&id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let streams = sqlx::query_as::<_, StreamRow>(&format!(
            "SELECT {STREAM_COLUMNS} FROM point_streams WHERE point_id = ? ORDER BY stream_no"
        ))
        .bind(&id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some((point, streams)))
    }

    /// Ids of every committed point, oldest first.
    pub async fn all_point_ids(&self) -> Result<Vec<PointId>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM points WHERE state = 'committed' ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|s| {
                s.parse().map_err(|e: tierback_format::ids::IdError| {
                    CatalogError::Invalid(e.to_string())
                })
            })
            .collect()
    }

    /// Deletes recovery points and their stream rows in ONE transaction;
    /// returns how many points were deleted (unknown ids are ignored). Jobs
    /// keep their history (`jobs.point_id` still names the deleted point).
    /// The caller removes the points' index files afterwards.
    pub async fn delete_points(&self, ids: &[PointId]) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut deleted = 0;
        for id in ids {
            let id = id.to_string();
            sqlx::query("DELETE FROM point_streams WHERE point_id = ?")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            deleted += sqlx::query("DELETE FROM points WHERE id = ?")
                .bind(&id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// Every recorded pack, oldest first.
    pub async fn list_packs(&self) -> Result<Vec<PackRow>> {
        let rows = sqlx::query_as::<_, (Vec<u8>, i64, i64, String)>(
            "SELECT id, size, created_at, state FROM packs ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, size, created_at, state)| {
                Ok(PackRow {
                    id: PackId::from_slice(&id)
                        .map_err(|e| CatalogError::Invalid(e.to_string()))?,
                    size: to_u64(size, "pack size")?,
                    created_at,
                    state,
                })
            })
            .collect()
    }

    /// One keyset page of the chunk table in id order, within `range`:
    /// (id, pack, sealed length) of at most `limit` rows after `after` (from
    /// the range's start if `None`). Whole-table passes (the chunk filter's
    /// build, GC's plan) read the table this way, a few ranges at once, so
    /// that leaf pages scattered by random inserts are read at a queue depth
    /// above one, and no read transaction lasts longer than a page.
    pub async fn chunk_page(
        &self,
        range: ChunkRange,
        after: Option<&ChunkId>,
        limit: u32,
    ) -> Result<Vec<(ChunkId, PackId, u32)>> {
        chunk_page(&self.pool, range, after, limit).await
    }

    /// The chunks the catalog places in `pack`, in offset order (the
    /// pack's staged rows are merged first).
    pub async fn pack_chunks(&self, pack: &PackId) -> Result<Vec<(ChunkId, ChunkLocation)>> {
        self.merge_if_staged(pack).await?;
        let rows = sqlx::query_as::<_, ChunkTuple>(
            "SELECT c.id, c.pack_id, c.\"offset\", c.len, c.raw_len \
             FROM pack_members m JOIN chunks c ON c.id = m.id \
             WHERE m.pack_id = ?1 AND c.pack_id = ?1 UNION ALL \
             SELECT c.id, c.pack_id, c.\"offset\", c.len, c.raw_len \
             FROM pack_members m JOIN chunks_mid c ON c.id = m.id \
             WHERE m.pack_id = ?1 AND c.pack_id = ?1 ORDER BY 3",
        )
        .bind(&pack.0[..])
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(decode_location).collect()
    }

    /// (packs, bytes of pack files, chunks) recorded.
    pub async fn store_totals(&self) -> Result<(u64, u64, u64)> {
        let (packs, bytes): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM packs")
                .fetch_one(&self.pool)
                .await?;
        let chunks: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM chunks) + (SELECT COUNT(*) FROM chunks_mid)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((
            to_u64(packs, "pack count")?,
            to_u64(bytes, "store size")?,
            to_u64(chunks, "chunk count")? + self.staged.unmerged() as u64,
        ))
    }

    /// GC: drops a pack and every chunk row still placed in it, in ONE
    /// transaction; returns the number of chunk rows removed. The caller
    /// deletes the file afterwards (a crash in between leaves an
    /// uncatalogued file, removed by the next GC).
    pub async fn delete_pack(&self, pack: &PackId) -> Result<u64> {
        self.move_chunks_and_drop_pack(pack, &[]).await
    }

    /// GC compaction: in ONE transaction, points each chunk of `moves` (all
    /// currently in `old`) at its new location, deletes the chunk rows left
    /// in `old` (dead ones) and the pack row of `old`. Returns the number of
    /// chunk rows deleted. Fails without changing anything if a moved chunk
    /// is no longer in `old` or its new pack is not recorded.
    pub async fn move_chunks_and_drop_pack(
        &self,
        old: &PackId,
        moves: &[(ChunkId, ChunkLocation)],
    ) -> Result<u64> {
        self.merge_if_staged(old).await?;
        let mut tx = self.pool.begin().await?;
        for (id, loc) in moves {
            // The row is in one of the two tables (this transaction holds
            // the write lock, so no merge moves it in between).
            let mut n = 0;
            for table in ["chunks", "chunks_mid"] {
                n += sqlx::query(&format!(
                    "UPDATE {table} SET pack_id = ?, \"offset\" = ?, len = ?, raw_len = ? \
                     WHERE id = ? AND pack_id = ?"
                ))
                .bind(&loc.pack_id.0[..])
                .bind(to_i64(loc.offset, "chunk offset")?)
                .bind(i64::from(loc.len))
                .bind(i64::from(loc.raw_len))
                .bind(&id.0[..])
                .bind(&old.0[..])
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n > 0 {
                    break;
                }
            }
            if n != 1 {
                return Err(CatalogError::Invalid(format!(
                    "chunk {id} is no longer in pack {old}; not moved"
                )));
            }
            // The new pack lists it (its foreign key fails the move if the
            // new pack is not recorded).
            sqlx::query("INSERT OR IGNORE INTO pack_members (pack_id, id) VALUES (?, ?)")
                .bind(&loc.pack_id.0[..])
                .bind(&id.0[..])
                .execute(&mut *tx)
                .await?;
        }
        // (rows removed from chunks, from chunks_mid)
        let mut removed = [0; 2];
        for (n, table) in removed.iter_mut().zip(["chunks", "chunks_mid"]) {
            *n = sqlx::query(&format!(
                "DELETE FROM {table} WHERE pack_id = ?1 \
                 AND id IN (SELECT id FROM pack_members WHERE pack_id = ?1)"
            ))
            .bind(&old.0[..])
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        sqlx::query("DELETE FROM pack_members WHERE pack_id = ?")
            .bind(&old.0[..])
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM packs WHERE id = ?")
            .bind(&old.0[..])
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.staged.note_mid_deleted(removed[1]);
        Ok(removed[0] + removed[1])
    }

    /// Merges the staged rows if some belong to `pack` (before GC reads or
    /// changes its rows in `chunks`).
    async fn merge_if_staged(&self, pack: &PackId) -> Result<()> {
        if self.staged.has_pack(pack) {
            self.merge_staged().await?;
        }
        Ok(())
    }

    /// (point, stream number) of every stream of every committed point.
    pub async fn committed_streams(&self) -> Result<Vec<(PointId, u32)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT s.point_id, s.stream_no FROM point_streams s JOIN points p ON p.id = s.point_id \
             WHERE p.state = 'committed' ORDER BY p.created_at, s.point_id, s.stream_no",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(p, s)| {
                let p = p.parse().map_err(|e: tierback_format::ids::IdError| {
                    CatalogError::Invalid(e.to_string())
                })?;
                Ok((p, to_u32(s, "stream number")?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    use crate::catalog::test_catalog as catalog;

    fn entry(id: u8, offset: u64) -> TocEntry {
        TocEntry {
            chunk_id: ChunkId([id; 32]),
            offset,
            len: 100 + u32::from(id),
            raw_len: 1000,
        }
    }

    fn point(id: u8, vm: &str, name: &str, at: i64) -> NewPoint {
        NewPoint {
            id: PointId([id; 16]),
            vm_id: vm.into(),
            vm_name: name.into(),
            created_at: at,
            kind: "full".into(),
            agent_id: "agent-1".into(),
            job_id: Some("job-1".into()),
            logical_bytes: 10,
            stored_bytes: 5,
            bytes_read: 11,
            bytes_sent: 6,
            streams: vec![
                NewStream {
                    stream_no: 1,
                    kind: "config".into(),
                    path: "Virtual Machines/x.vmcx".into(),
                    controller: None,
                    location: None,
                    size: 4096,
                    chunk_size: 1 << 20,
                    logical_sector: 512,
                    physical_sector: 4096,
                    chunk_count: 1,
                },
                NewStream {
                    stream_no: 0,
                    kind: "disk".into(),
                    path: "Virtual Hard Disks/a.vhdx".into(),
                    controller: Some("scsi".into()),
                    location: Some("0:0".into()),
                    size: 1 << 30,
                    chunk_size: 1 << 20,
                    logical_sector: 512,
                    physical_sector: 4096,
                    chunk_count: 7,
                },
            ],
        }
    }

    #[tokio::test]
    async fn packs_and_chunks() {
        let (_d, c) = catalog().await;
        let pack = NewPack {
            id: PackId([1; 16]),
            size: 999,
            created_at: 42,
        };
        let ids: Vec<ChunkId> = (0..600u32)
            .map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect();
        let entries: Vec<TocEntry> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| TocEntry {
                chunk_id: *id,
                offset: 32 + i as u64 * 10,
                len: 10,
                raw_len: 20,
            })
            .collect();
        assert!(c
            .lookup_chunks(&ids)
            .await
            .expect("lookup")
            .iter()
            .all(Option::is_none));
        c.insert_pack_with_chunks(&pack, &entries)
            .await
            .expect("insert");
        // Idempotent, and a chunk keeps its first location.
        c.insert_pack_with_chunks(&pack, &entries)
            .await
            .expect("insert again");
        let other = NewPack {
            id: PackId([2; 16]),
            size: 5,
            created_at: 43,
        };
        c.insert_pack_with_chunks(
            &other,
            &[TocEntry {
                chunk_id: ids[3],
                offset: 32,
                len: 1,
                raw_len: 1,
            }],
        )
        .await
        .expect("insert other");

        let mut query = ids.clone();
        query.insert(100, ChunkId([0xff; 32]));
        let found = c.lookup_chunks(&query).await.expect("lookup");
        assert_eq!(found.len(), 601);
        assert!(found[100].is_none());
        assert_eq!(
            found[3],
            Some(ChunkLocation {
                pack_id: pack.id,
                offset: 62,
                len: 10,
                raw_len: 20
            })
        );
        assert_eq!(found.iter().filter(|f| f.is_some()).count(), 600);
        assert_eq!(
            c.chunk_location(&ids[599])
                .await
                .expect("loc")
                .map(|l| l.offset),
            Some(32 + 5990)
        );
        assert_eq!(
            c.chunk_location(&ChunkId([0xff; 32])).await.expect("loc"),
            None
        );
        assert_eq!(
            c.get_pack(&pack.id).await.expect("pack"),
            Some(PackRow {
                id: pack.id,
                size: 999,
                created_at: 42,
                state: "sealed".into()
            })
        );
        assert_eq!(c.get_pack(&PackId([9; 16])).await.expect("pack"), None);
    }

    fn toc(ids: &[ChunkId]) -> Vec<TocEntry> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| TocEntry {
                chunk_id: *id,
                offset: 32 + i as u64 * 10,
                len: 10,
                raw_len: 20,
            })
            .collect()
    }

    fn hashed(from: u32, n: u32) -> Vec<ChunkId> {
        (from..from + n)
            .map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect()
    }

    /// Every id of `present` found (in its pack), every id of `absent` not,
    /// at every parallelism, through both lookups.
    async fn assert_exact(c: &Catalog, present: &[(ChunkId, PackId)], absent: &[ChunkId]) {
        let mut query: Vec<ChunkId> = absent.to_vec();
        query.extend(present.iter().map(|(id, _)| *id));
        for par in [1, 3, LOOKUP_PARALLELISM, LOOKUP_MAX_PARALLELISM, 100] {
            let found = c.lookup_chunks_with(&query, par).await.expect("lookup");
            assert_eq!(found.len(), query.len());
            let (a, p) = found.split_at(absent.len());
            assert!(a.iter().all(Option::is_none), "parallelism {par}");
            for (f, (_, pack)) in p.iter().zip(present) {
                assert_eq!(f.map(|l| l.pack_id), Some(*pack), "parallelism {par}");
            }
        }
        // Presence (the protocol's question) on an interleaved query with
        // repeats, so that a position mixed up between statements shows.
        let mut mixed: Vec<(ChunkId, bool)> = Vec::new();
        for i in 0..absent.len().max(present.len()) {
            mixed.extend(absent.get(i).map(|id| (*id, false)));
            mixed.extend(present.get(i).map(|(id, _)| (*id, true)));
        }
        let repeats: Vec<_> = mixed.iter().step_by(7).copied().collect();
        mixed.extend(repeats);
        let (ids, expected): (Vec<ChunkId>, Vec<bool>) = mixed.into_iter().unzip();
        for par in [1, 3, LOOKUP_PARALLELISM, LOOKUP_MAX_PARALLELISM, 100] {
            let got = c.contains_chunks_with(&ids, par).await.expect("presence");
            assert!(got == expected, "presence at parallelism {par}");
        }
        assert!(c.contains_chunks(&[]).await.expect("empty").is_empty());
        for (id, pack) in present.iter().take(50) {
            let loc = c.chunk_location(id).await.expect("loc");
            assert_eq!(loc.map(|l| l.pack_id), Some(*pack));
        }
        for id in absent.iter().take(50) {
            assert_eq!(c.chunk_location(id).await.expect("loc"), None);
        }
    }

    #[tokio::test]
    async fn lookups_stay_exact_with_the_filter() {
        let (d, c) = catalog().await;
        assert!(
            c.chunk_filter_status().ready,
            "small catalog: built at open"
        );
        assert!(c.lookup_chunks(&[]).await.expect("empty").is_empty());
        let (p1, p2) = (PackId([1; 16]), PackId([2; 16]));
        let pack = |id| NewPack {
            id,
            size: 1,
            created_at: 1,
        };
        let first = hashed(0, 1500);
        c.insert_pack_with_chunks(&pack(p1), &toc(&first))
            .await
            .expect("insert");
        let absent = hashed(10_000, 3000);
        let present: Vec<_> = first.iter().map(|id| (*id, p1)).collect();
        assert_exact(&c, &present, &absent).await;
        // The filter answers most misses: about 0.5 % reach SQL.
        let f = c.chunk_filter.active().expect("filter");
        let fp = absent.iter().filter(|id| f.may_contain(id)).count();
        assert!(fp < 60, "{fp} false positives of 3000");

        // Inserted after open, into another pack.
        let second = hashed(5000, 700);
        c.insert_pack_with_chunks(&pack(p2), &toc(&second))
            .await
            .expect("insert");
        let mut present2 = present.clone();
        present2.extend(second.iter().map(|id| (*id, p2)));
        assert_exact(&c, &present2, &absent).await;

        // Deleted by GC: stale filter bits, exact answers.
        assert_eq!(c.delete_pack(&p1).await.expect("drop"), 1500);
        let mut gone = absent.clone();
        gone.extend(&first);
        let kept: Vec<_> = second.iter().map(|id| (*id, p2)).collect();
        assert_exact(&c, &kept, &gone).await;

        // Reopened: the filter is rebuilt from the table.
        c.close().await;
        let c = Catalog::open(&d.path().join("catalog.db"))
            .await
            .expect("reopen");
        let s = c.chunk_filter_status();
        assert!(s.ready);
        assert_eq!(s.last_build_rows, 700);
        assert_exact(&c, &kept, &gone).await;

        // Before a filter is built every id goes to SQL, still exactly.
        let unbuilt = Catalog {
            chunk_filter: Arc::default(),
            ..c.clone()
        };
        assert!(!unbuilt.chunk_filter_status().ready);
        assert_exact(&unbuilt, &kept, &gone).await;
    }

    #[tokio::test]
    async fn chunk_pages_over_split_ranges_see_every_row_once() {
        let (_d, c) = catalog().await;
        let mut ids = hashed(0, 3000);
        ids.push(ChunkId([0; 32]));
        ids.push(ChunkId([0xff; 32]));
        ids.push(ChunkId([0x80; 32]));
        c.insert_pack_with_chunks(
            &NewPack {
                id: PackId([1; 16]),
                size: 1,
                created_at: 1,
            },
            &toc(&ids),
        )
        .await
        .expect("insert");
        // Pages read `chunks`: merged rows (GC merges first).
        c.merge_staged().await.expect("merge");
        for n in [1, 3, 4, 7, 256, 1000] {
            let mut seen = Vec::new();
            for range in ChunkRange::split(n) {
                let mut after = None;
                loop {
                    let page = c.chunk_page(range, after.as_ref(), 97).await.expect("page");
                    seen.extend(page.iter().map(|(id, _, _)| *id));
                    if page.len() < 97 {
                        break;
                    }
                    after = page.last().map(|(id, _, _)| *id);
                }
            }
            let mut want = ids.clone();
            want.sort();
            assert_eq!(seen, want, "{n} ranges");
        }
    }

    #[tokio::test]
    async fn an_overfull_filter_is_rebuilt_and_stays_exact() {
        let (_d, c) = catalog().await;
        let p1 = PackId([1; 16]);
        let ids = hashed(0, 2000);
        c.insert_pack_with_chunks(
            &NewPack {
                id: p1,
                size: 1,
                created_at: 1,
            },
            &toc(&ids[..1000]),
        )
        .await
        .expect("insert");
        // A filter sized for 100 entries holding 1000: answers stay exact.
        c.chunk_filter
            .build(&c.pool, &c.staged, Some(100))
            .await
            .expect("build");
        let s = c.chunk_filter_status();
        assert!(s.capacity < 200 && s.added == 1000, "{s:?}");
        let present: Vec<_> = ids[..1000].iter().map(|id| (*id, p1)).collect();
        assert_exact(&c, &present, &ids[1000..]).await;
        // The next insert starts a rebuild, twice the inserts at least.
        let p2 = PackId([2; 16]);
        c.insert_pack_with_chunks(
            &NewPack {
                id: p2,
                size: 1,
                created_at: 1,
            },
            &toc(&ids[1000..1500]),
        )
        .await
        .expect("insert");
        let mut grown = false;
        for _ in 0..200 {
            let s = c.chunk_filter_status();
            if s.capacity >= 2000 && !s.building {
                grown = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(grown, "{:?}", c.chunk_filter_status());
        let mut present = present;
        present.extend(ids[1000..1500].iter().map(|id| (*id, p2)));
        assert_exact(&c, &present, &ids[1500..]).await;
    }

    #[tokio::test]
    async fn pack_members_need_their_pack() {
        let (_d, c) = catalog().await;
        // Foreign key: a pack's member list cannot name an unrecorded pack.
        // The pack row is inserted first in the same transaction, so this
        // only guards bugs.
        let r = sqlx::query("INSERT INTO pack_members (pack_id, id) VALUES (?, ?)")
            .bind(&[2u8; 16][..])
            .bind(&[1u8; 32][..])
            .execute(&c.pool)
            .await;
        assert!(r.is_err());
        c.insert_pack_with_chunks(
            &NewPack {
                id: PackId([3; 16]),
                size: 1,
                created_at: 1,
            },
            &[entry(1, 32)],
        )
        .await
        .expect("insert");
        assert!(c
            .chunk_location(&ChunkId([1; 32]))
            .await
            .expect("loc")
            .is_some());
    }

    #[tokio::test]
    async fn points_commit_list_get() {
        let (_d, c) = catalog().await;
        c.commit_point(&point(1, "vm-a", "alpha", 100))
            .await
            .expect("commit 1");
        c.commit_point(&point(2, "vm-b", "beta", 200))
            .await
            .expect("commit 2");
        let mut p3 = point(3, "vm-a", "alpha", 300);
        p3.kind = "incremental".into();
        p3.job_id = None;
        c.commit_point(&p3).await.expect("commit 3");

        let all = c.list_points(None).await.expect("list");
        assert_eq!(
            all.iter().map(|p| p.created_at).collect::<Vec<_>>(),
            vec![300, 200, 100]
        );
        let a = c.list_points(Some("vm-a")).await.expect("list by id");
        assert_eq!(
            a.iter().map(|p| p.created_at).collect::<Vec<_>>(),
            vec![300, 100]
        );
        let b = c.list_points(Some("beta")).await.expect("list by name");
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].id, PointId([2; 16]).to_string());
        assert!(c
            .list_points(Some("nobody"))
            .await
            .expect("list")
            .is_empty());

        let (row, streams) = c
            .get_point(&PointId([3; 16]))
            .await
            .expect("get")
            .expect("present");
        assert_eq!(row.kind, "incremental");
        assert_eq!(row.state, "committed");
        assert_eq!(row.job_id, None);
        assert_eq!(
            (
                row.logical_bytes,
                row.stored_bytes,
                row.bytes_read,
                row.bytes_sent
            ),
            (10, 5, 11, 6)
        );
        assert_eq!(streams.len(), 2);
        assert_eq!(streams[0].stream_no, 0);
        assert_eq!(streams[0].kind, "disk");
        assert_eq!(streams[0].controller.as_deref(), Some("scsi"));
        assert_eq!(streams[0].size, 1 << 30);
        assert_eq!(streams[0].chunk_count, 7);
        assert_eq!(streams[1].location, None);
        assert!(c.get_point(&PointId([9; 16])).await.expect("get").is_none());

        assert_eq!(
            c.all_point_ids().await.expect("ids"),
            vec![PointId([1; 16]), PointId([2; 16]), PointId([3; 16])]
        );
        let streams = c.committed_streams().await.expect("streams");
        assert_eq!(streams.len(), 6);
        assert_eq!(streams[0], (PointId([1; 16]), 0));
    }

    #[tokio::test]
    async fn delete_points_and_gc_queries() {
        let (_d, c) = catalog().await;
        c.commit_point(&point(1, "vm-a", "alpha", 100))
            .await
            .expect("commit 1");
        c.commit_point(&point(2, "vm-a", "alpha", 200))
            .await
            .expect("commit 2");
        assert_eq!(
            c.delete_points(&[PointId([1; 16]), PointId([9; 16])])
                .await
                .expect("delete"),
            1
        );
        assert!(c.get_point(&PointId([1; 16])).await.expect("get").is_none());
        assert_eq!(c.committed_streams().await.expect("streams").len(), 2);
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM point_streams")
            .fetch_one(&c.pool)
            .await
            .expect("count");
        assert_eq!(left, 2, "stream rows deleted with their point");

        let (old, new) = (PackId([1; 16]), PackId([2; 16]));
        let pack = |id, at| NewPack {
            id,
            size: 1000,
            created_at: at,
        };
        c.insert_pack_with_chunks(&pack(old, 1), &[entry(1, 32), entry(2, 200), entry(3, 400)])
            .await
            .expect("old");
        c.insert_pack_with_chunks(&pack(new, 2), &[entry(4, 32)])
            .await
            .expect("new");
        assert_eq!(
            c.list_packs()
                .await
                .expect("packs")
                .iter()
                .map(|p| p.id)
                .collect::<Vec<_>>(),
            vec![old, new]
        );
        assert_eq!(c.store_totals().await.expect("totals"), (2, 2000, 4));
        let in_old = c.pack_chunks(&old).await.expect("chunks");
        assert_eq!(
            in_old.iter().map(|(id, _)| id.0[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let moved = ChunkLocation {
            pack_id: new,
            offset: 500,
            len: 101,
            raw_len: 1000,
        };
        // A move naming a chunk that is not in the old pack changes nothing.
        assert!(c
            .move_chunks_and_drop_pack(&old, &[(ChunkId([4; 32]), moved)])
            .await
            .is_err());
        assert_eq!(c.store_totals().await.expect("totals"), (2, 2000, 4));
        assert_eq!(
            c.move_chunks_and_drop_pack(&old, &[(ChunkId([1; 32]), moved)])
                .await
                .expect("move"),
            2,
            "the two dead rows go with the pack"
        );
        assert_eq!(
            c.chunk_location(&ChunkId([1; 32])).await.expect("loc"),
            Some(moved)
        );
        assert!(c.get_pack(&old).await.expect("pack").is_none());
        assert_eq!(c.delete_pack(&new).await.expect("drop"), 2);
        assert_eq!(c.store_totals().await.expect("totals"), (0, 0, 0));
    }

    #[tokio::test]
    async fn commit_point_is_all_or_nothing() {
        let (_d, c) = catalog().await;
        let mut bad = point(1, "vm-a", "alpha", 100);
        bad.streams[1].kind = "floppy".into(); // violates the CHECK constraint
        assert!(c.commit_point(&bad).await.is_err());
        assert!(c.get_point(&PointId([1; 16])).await.expect("get").is_none());
        assert!(c.list_points(None).await.expect("list").is_empty());
        let mut dup = point(2, "vm-a", "alpha", 100);
        dup.streams[1].stream_no = 1; // same primary key twice
        assert!(c.commit_point(&dup).await.is_err());
        assert!(c.all_point_ids().await.expect("ids").is_empty());
        let mut bad_kind = point(3, "vm-a", "alpha", 100);
        bad_kind.kind = "weekly".into();
        assert!(c.commit_point(&bad_kind).await.is_err());
        c.commit_point(&point(4, "vm-a", "alpha", 100))
            .await
            .expect("commit");
        assert!(
            c.commit_point(&point(4, "vm-a", "alpha", 100))
                .await
                .is_err(),
            "same id twice"
        );
    }
}
