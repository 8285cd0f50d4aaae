//! Wire DTOs of the agent ↔ gateway and admin ↔ gateway HTTPS protocol
//! (documented in docs/protocol.md). JSON bodies are these types; the two bulk
//! bodies (chunk uploads and stream indexes) use the small binary framings
//! defined at the end of this module.

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::ids::{ChunkHash, ChunkId};

/// Version prefix of every API path.
pub const API_PREFIX: &str = "/v1";

/// Most hashes one "which do you lack?" request may carry.
pub const MAX_LACK_BATCH: usize = 4096;

/// Largest body of one chunk upload request.
pub const MAX_CHUNK_BATCH_BYTES: usize = 64 << 20;

/// The `Upgrade` protocol of a chunk stream (`POST
/// /v1/agent/backups/{session}/chunk-stream`; docs/protocol.md).
pub const CHUNK_STREAM_PROTOCOL: &str = "tierback-chunks/1";

/// Largest chunk size a protection group may use.
pub const MAX_CHUNK_SIZE: u32 = 8 << 20;
/// Smallest chunk size a protection group may use.
pub const MIN_CHUNK_SIZE: u32 = 256 << 10;
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// Error body of every non-2xx response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Short machine-readable kind: "unauthorized", "not_found", "bad_request", …
    pub error: String,
    /// One human-readable line.
    pub message: String,
}

/// `POST /v1/enroll` (unauthenticated; the one-time token is the credential).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// One-time enrolment token from `tierback-gateway enroll-token`.
    pub token: String,
    /// Host name of the Hyper-V host.
    pub host_name: String,
}

/// Answer to [`EnrollRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The agent's id at the gateway.
    pub agent_id: String,
    /// Bearer credential the agent sends with every later request.
    pub credential: String,
}

/// A virtual disk attached to a VM, as the agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskInfo {
    /// Position in vm.json's `disks` (the "disk N" of the CLI).
    pub index: u32,
    /// Path relative to the VM folder, `/`-separated, as in vm.json.
    pub path: String,
    /// Controller type (SCSI, IDE).
    pub controller: String,
    /// Controller location, e.g. "0:1".
    pub location: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Logical sector size in bytes (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// Container format and chain, for humans ("dynamic VHDX, …").
    pub format: String,
    /// Change-tracking health as of the agent's last backup of this disk
    /// (absent before the first backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<TrackingHealth>,
}

/// A VM as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    /// The VM's id (survives renames and moves).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Hyper-V generation (1 or 2).
    pub generation: u32,
    /// Configuration version, e.g. "9.0".
    pub config_version: String,
    /// Running, Off, Saved, Paused.
    pub state: String,
    /// Folder of the VM on its host (for humans and for restore-to-original).
    pub folder: String,
    /// Disks in vm.json order.
    pub disks: Vec<DiskInfo>,
}

/// `POST /v1/agent/inventory`: the agent's current view of its host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InventoryRequest {
    /// Every VM found under the host root.
    pub vms: Vec<VmInfo>,
}

/// What a stream of a recovery point holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// A virtual disk's contents (virtual-disk offsets, not the container).
    Disk,
    /// A configuration file carried byte for byte (vm.json, .vmcx, .vmrs, .vmgs).
    Config,
}

/// One stream announced at the start of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamSpec {
    /// Number of the stream inside the point: disks first (0..n in vm.json
    /// order), then config files.
    pub stream_no: u32,
    /// Disk or config file.
    pub kind: StreamKind,
    /// Path relative to the VM folder.
    pub path: String,
    /// Controller type (disks only).
    pub controller: Option<String>,
    /// Controller location (disks only).
    pub location: Option<String>,
    /// Bytes of the stream (virtual size or file size).
    pub size: u64,
    /// Logical sector size (disks; 512 for config files).
    pub logical_sector_size: u32,
    /// Physical sector size (disks; 512 for config files).
    pub physical_sector_size: u32,
    /// Stream of [`BeginBackupRequest::base_point`] this stream continues:
    /// its index upload is then a DELTA against that stream's index (see
    /// [`DELTA_ZERO_HASH`]); absent: the index upload is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_stream: Option<u32>,
    /// Change-tracking identity of the disk at backup time, stored with the
    /// point and returned by `GET /v1/agent/vms/{id}/last-point`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<DiskTrackingIds>,
}

/// `POST /v1/agent/backups`: opens a backup session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BeginBackupRequest {
    /// The VM being backed up.
    pub vm: VmInfo,
    /// Every stream the point will hold.
    pub streams: Vec<StreamSpec>,
    /// Full (re-read everything) rather than incremental.
    pub full: bool,
    /// The VM's previous point (from `last-point`) that streams naming a
    /// `base_stream` are deltas against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_point: Option<String>,
}

/// Change-tracking health of one disk, as the agent's last backup found it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrackingHealth {
    /// `tracking` (changes came from change tracking, or the disk was
    /// unchanged), `fallback` (full read + compare, with a reason) or
    /// `reset` (tracking state lost: full read + compare, with a reason).
    pub state: String,
    /// How changes were found: `rct`, `checkpoint`, `unchanged`, `compare`, `full`.
    pub method: String,
    /// Why, when `state` is not `tracking`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Alerts of the last backup (a sample chunk differed from the stored hash …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
}

/// Change-tracking identity of a disk at the time of a backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskTrackingIds {
    /// RCT change-tracking id current when the disk was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    /// VHDX DataWriteGuid of the leaf when the disk was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_write_guid: Option<String>,
}

/// Hash that marks, in a DELTA index upload, a chunk number that became
/// zero or deallocated since the base point (BLAKE3 never yields it in practice).
pub const DELTA_ZERO_HASH: ChunkHash = ChunkHash([0; 32]);

/// `GET /v1/agent/vms/{id}/last-point`: the VM's newest committed point,
/// wherever (host, agent) it was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastPointResponse {
    /// Point id.
    pub point: String,
    /// Creation time, RFC 3339.
    pub time: String,
    /// Its streams.
    pub streams: Vec<LastPointStream>,
}

/// One stream of [`LastPointResponse`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastPointStream {
    /// Stream number.
    pub stream_no: u32,
    /// Disk or config.
    pub kind: StreamKind,
    /// Path relative to the VM folder at backup time.
    pub path: String,
    /// Controller (disks).
    pub controller: Option<String>,
    /// Location (disks).
    pub location: Option<String>,
    /// Bytes.
    pub size: u64,
    /// Chunk size of its index.
    pub chunk_size: u32,
    /// Change-tracking identity recorded by the agent (if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<DiskTrackingIds>,
}

/// Answer to [`BeginBackupRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BeginBackupResponse {
    /// Session id for the following requests.
    pub session_id: String,
    /// Chunk size to cut streams into.
    pub chunk_size: u32,
    /// The gateway takes patch records ([`CHUNK_RECORD_PATCH_FLAG`]); an
    /// older one leaves this out and gets whole chunks only.
    #[serde(default)]
    pub accepts_patches: bool,
}

/// `POST /v1/agent/backups/{session}/lack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LackRequest {
    /// Plaintext BLAKE3 hashes of chunks the agent is about to send.
    pub hashes: Vec<ChunkHash>,
}

/// Answer to [`LackRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LackResponse {
    /// Positions (in the request) of the hashes the gateway lacks.
    pub missing: Vec<u32>,
}

/// Answer to a chunk upload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChunksResponse {
    /// Chunks newly stored.
    pub stored: u32,
    /// Chunks the gateway already had.
    pub duplicate: u32,
    /// Bytes they take in the store (compressed, sealed).
    pub stored_bytes: u64,
    /// Hashes of patch records ([`CHUNK_RECORD_PATCH_FLAG`]) not stored: the
    /// base is gone or the rebuilt chunk does not match its hash. The agent
    /// sends these chunks whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<ChunkHash>,
}

/// `POST /v1/agent/backups/{session}/commit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CommitRequest {
    /// Bytes the agent read from source disks.
    pub bytes_read: u64,
    /// Chunk bytes the agent sent.
    pub bytes_sent: u64,
    /// Alerts raised while backing up (recorded in the job message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
}

/// Answer to [`CommitRequest`]: the recovery point is visible.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitResponse {
    /// Id of the new recovery point.
    pub point: String,
    /// Non-zero bytes the point covers.
    pub logical_bytes: u64,
    /// Bytes newly stored for this point.
    pub stored_bytes: u64,
}

/// A VM as the gateway knows it (`vms`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSummary {
    /// VM id.
    pub id: String,
    /// Latest known name.
    pub name: String,
    /// Agent (host) that reported it last.
    pub agent_id: String,
    /// Host name of that agent.
    pub host_name: String,
    /// Power state when last reported.
    pub state: String,
    /// Disks when last reported.
    pub disks: Vec<DiskInfo>,
    /// Number of recovery points.
    pub points: u64,
    /// Time of the newest point (RFC 3339), if any.
    pub last_point: Option<String>,
}

/// A recovery point (`points`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointSummary {
    /// Point id.
    pub id: String,
    /// VM id.
    pub vm_id: String,
    /// VM name at backup time.
    pub vm_name: String,
    /// Creation time, RFC 3339.
    pub time: String,
    /// "full" or "incremental".
    pub kind: String,
    /// Tiers holding the point ("local", later "cloud").
    pub tiers: Vec<String>,
    /// Non-zero bytes the point covers.
    pub logical_bytes: u64,
    /// Bytes newly stored for this point (after dedup, compression, sealing).
    pub stored_bytes: u64,
    /// Bytes read from source disks.
    pub bytes_read: u64,
    /// Chunk bytes sent by the agent.
    pub bytes_sent: u64,
    /// "committed".
    pub state: String,
}

/// One stream of a point, as restore needs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamSummary {
    /// Stream number.
    pub stream_no: u32,
    /// Disk or config.
    pub kind: StreamKind,
    /// Path relative to the VM folder at backup time.
    pub path: String,
    /// Controller (disks).
    pub controller: Option<String>,
    /// Location (disks).
    pub location: Option<String>,
    /// Bytes.
    pub size: u64,
    /// Chunk size the stream was cut into.
    pub chunk_size: u32,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Stored (non-zero) chunks.
    pub chunk_count: u64,
}

/// `GET /v1/admin/points/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointDetail {
    /// The point.
    pub point: PointSummary,
    /// Its streams.
    pub streams: Vec<StreamSummary>,
}

/// `GET /v1/admin/points/{id}/streams/{n}/extents`: the chunk numbers that hold
/// data; every other chunk of the stream is zeros.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamExtents {
    /// Chunk size.
    pub chunk_size: u32,
    /// Stream size in bytes.
    pub size: u64,
    /// Sorted chunk numbers present in the index.
    pub chunks: Vec<u64>,
}

/// `POST /v1/admin/enroll-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollTokenResponse {
    /// One-time token.
    pub token: String,
    /// Expiry, RFC 3339.
    pub expires: String,
}

/// `POST /v1/admin/verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// Restrict to one point (all points otherwise).
    pub point: Option<String>,
}

/// A damaged chunk found by verify.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DamagedChunkReport {
    /// Stored chunk id (hex).
    pub chunk: String,
    /// Pack holding it.
    pub pack: String,
    /// Offset in the pack.
    pub offset: u64,
    /// What failed.
    pub reason: String,
    /// Every recovery point that needs it.
    pub points: Vec<String>,
}

/// Result of verify.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyResponse {
    /// Points examined.
    pub points_checked: u64,
    /// Chunks re-read.
    pub chunks_checked: u64,
    /// Plaintext bytes re-hashed.
    pub bytes_checked: u64,
    /// Damaged chunks.
    pub damaged: Vec<DamagedChunkReport>,
    /// Damaged stream indexes: (point, stream, reason).
    pub damaged_indexes: Vec<(String, u32, String)>,
}

/// A job (`jobs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// "backup", …
    pub kind: String,
    /// VM id.
    pub vm_id: Option<String>,
    /// VM name.
    pub vm_name: Option<String>,
    /// queued, dispatched (scheduled jobs), running, succeeded, failed, abandoned.
    pub state: String,
    /// Start time, RFC 3339.
    pub started: String,
    /// End time, RFC 3339.
    pub finished: Option<String>,
    /// Outcome line.
    pub message: Option<String>,
    /// Recovery point made.
    pub point: Option<String>,
}

/// A scheduled job handed to an agent (`POST /v1/agent/jobs/next`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentJob {
    /// Job id; the backup session the agent begins for `vm_id` adopts it.
    pub id: String,
    /// "backup" or "consistency-check" ([`PURPOSE_CONSISTENCY_CHECK`]).
    pub kind: String,
    /// VM id.
    pub vm_id: String,
    /// VM name.
    pub vm_name: String,
    /// Express full (read every disk in full) rather than incremental.
    pub full: bool,
    /// The schedule window it serves, RFC 3339 UTC.
    pub window: Option<String>,
}

/// Answer of `POST /v1/agent/jobs/next`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextJobResponse {
    /// The oldest queued job for a VM of the caller's host, if any.
    pub job: Option<AgentJob>,
}

/// `GET /v1/agent/vms/{vm}/seed-params`: what an offline export must use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedParamsResponse {
    /// Chunk size of the VM (its protection group's, else the gateway's).
    pub chunk_size: u32,
}

/// `GET /v1/agent/groups/{name}/seed-members`: the VMs of a protection
/// group last reported by the calling agent (what `export --group` exports).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedMembersResponse {
    /// VM ids, by VM name.
    pub vm_ids: Vec<String>,
}

/// `POST /v1/admin/import/begin`: the manifest of an offline seed, less its
/// indexes (sent per stream like a backup's) and file list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportBeginRequest {
    /// Seed id (32 hex), recorded in the job message.
    pub seed_id: String,
    /// The agent that exported it (must be enrolled).
    pub agent_id: String,
    /// Point id to commit (chosen at export; refused if it exists).
    pub point: String,
    /// The VM.
    pub vm: VmInfo,
    /// Chunk size of the seed's streams.
    pub chunk_size: u32,
    /// Streams, as in [`BeginBackupRequest`] (no `base_stream`).
    pub streams: Vec<StreamSpec>,
}

/// `POST /v1/admin/import/{session}/commit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportCommitRequest {
    /// The point to commit (the seed's, as at begin).
    pub point: String,
    /// The seed's id (recorded in the job message).
    pub seed_id: String,
    /// The exporting agent (recorded as the point's maker).
    pub agent_id: String,
    /// Plaintext bytes of the chunks imported.
    pub bytes: u64,
}

// ---- binary framings ------------------------------------------------------

/// Errors of the binary framings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The body ended inside a record.
    #[error("truncated {0} record")]
    Truncated(&'static str),
    /// A record declares a length beyond the allowed maximum.
    #[error("chunk record of {0} bytes exceeds the {MAX_CHUNK_SIZE}-byte maximum")]
    TooLarge(u64),
    /// The body is larger than the request may be.
    #[error("upload body exceeds the {0}-byte limit")]
    BodyTooLarge(usize),
    /// A patch record that cannot be applied as it stands.
    #[error("bad chunk patch: {0}")]
    BadPatch(&'static str),
    /// A payload frame of a kind this version does not know.
    #[error("payload frame of unknown kind {0}")]
    UnknownKind(u8),
}

/// Bit of a chunk record's length word: the record carries a base hint (the
/// plaintext hash of the chunk the same place held in the previous point)
/// between the length and the data. The gateway may store the chunk as a
/// delta against that base; the hint never changes what is stored.
pub const CHUNK_RECORD_BASE_FLAG: u32 = 1 << 31;

/// Bit of a chunk record's length word, only with [`CHUNK_RECORD_BASE_FLAG`]:
/// the record's data is not the chunk but a patch of its base, the 4 KiB
/// blocks the agent's change tracking reports written since the base point:
/// `chunk_len u32 LE | bitmap[⌈⌈chunk_len / 4096⌉ / 8⌉] | blocks`, bit i
/// (LSB first) set when block i is in `blocks` (in order; the last block of a
/// chunk may be short), every other block taken from the base. The gateway
/// rebuilds the chunk, checks it against the record's hash and, when the base
/// is gone or the result does not match (tracking that under-reported),
/// names the hash in [`ChunksResponse::refused`]: the agent then sends the
/// whole chunk. See [`apply_chunk_patch`].
pub const CHUNK_RECORD_PATCH_FLAG: u32 = 1 << 30;

/// Block size of a chunk patch ([`CHUNK_RECORD_PATCH_FLAG`]): the blocks of
/// a stored delta.
pub const PATCH_BLOCK: usize = crate::crypto::DELTA_BLOCK;

/// The length bits of a chunk record's length word.
const RECORD_LEN_MASK: u32 = !(CHUNK_RECORD_BASE_FLAG | CHUNK_RECORD_PATCH_FLAG);

/// One record of a chunk upload body, as [`ChunkRecordSplitter`] yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRecord {
    /// BLAKE3 of the data (the gateway checks it).
    pub hash: ChunkHash,
    /// Base hint, if the record carries one.
    pub base: Option<ChunkHash>,
    /// `data` is a patch of the base ([`CHUNK_RECORD_PATCH_FLAG`]), not the
    /// chunk.
    pub patch: bool,
    /// The chunk's bytes (or the patch).
    pub data: Bytes,
}

/// The bytes before a chunk record's data: `hash[32] | len u32 LE`, or with a
/// base hint `hash[32] | (len | CHUNK_RECORD_BASE_FLAG) u32 LE | base[32]`.
pub fn chunk_record_head(hash: &ChunkHash, base: Option<&ChunkHash>, len: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(68);
    head.extend_from_slice(&hash.0);
    let len = len as u32;
    match base {
        Some(b) => {
            head.extend_from_slice(&(len | CHUNK_RECORD_BASE_FLAG).to_le_bytes());
            head.extend_from_slice(&b.0);
        }
        None => head.extend_from_slice(&len.to_le_bytes()),
    }
    head
}

/// The bytes before a patch record's blocks ([`CHUNK_RECORD_PATCH_FLAG`]):
/// `hash | length word | base | chunk_len | bitmap`; the record's blocks
/// (`blocks_len` bytes) follow.
pub fn chunk_patch_head(
    hash: &ChunkHash,
    base: &ChunkHash,
    chunk_len: usize,
    bitmap: &[u8],
    blocks_len: usize,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(RECORD_HEAD_WITH_BASE + 4 + bitmap.len());
    head.extend_from_slice(&hash.0);
    let len = (4 + bitmap.len() + blocks_len) as u32;
    head.extend_from_slice(&(len | CHUNK_RECORD_BASE_FLAG | CHUNK_RECORD_PATCH_FLAG).to_le_bytes());
    head.extend_from_slice(&base.0);
    head.extend_from_slice(&(chunk_len as u32).to_le_bytes());
    head.extend_from_slice(bitmap);
    head
}

/// Rebuilds a chunk from its base's plaintext and a patch record's data
/// ([`CHUNK_RECORD_PATCH_FLAG`]). The caller checks the result against the
/// record's hash.
pub fn apply_chunk_patch(base: &[u8], patch: &[u8]) -> Result<Vec<u8>, FrameError> {
    let (len, rest) = patch
        .split_first_chunk::<4>()
        .ok_or(FrameError::BadPatch("truncated"))?;
    let len = u32::from_le_bytes(*len);
    if len > MAX_CHUNK_SIZE {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    let len = len as usize;
    let (bitmap, blocks) = rest
        .split_at_checked(len.div_ceil(PATCH_BLOCK).div_ceil(8))
        .ok_or(FrameError::BadPatch("truncated"))?;
    crate::crypto::compose_blocks(base, len, bitmap, blocks).map_err(|e| {
        FrameError::BadPatch(match e {
            crate::crypto::ComposeError::Short => "truncated",
            crate::crypto::ComposeError::BeyondBase => "an unchanged block lies beyond the base",
            crate::crypto::ComposeError::Long => "more blocks than its bitmap names",
        })
    })
}

/// Appends one chunk record (`hash[32] | len u32 LE | data`) to a chunk upload body.
pub fn put_chunk_record(body: &mut Vec<u8>, hash: &ChunkHash, data: &[u8]) {
    put_chunk_record_with_base(body, hash, None, data);
}

/// [`put_chunk_record`] with an optional base hint (see
/// [`CHUNK_RECORD_BASE_FLAG`]).
pub fn put_chunk_record_with_base(
    body: &mut Vec<u8>,
    hash: &ChunkHash,
    base: Option<&ChunkHash>,
    data: &[u8],
) {
    body.extend_from_slice(&chunk_record_head(hash, base, data.len()));
    body.extend_from_slice(data);
}

/// Bytes before a record's data: hash and length word, then the base hint
/// when the length word's [`CHUNK_RECORD_BASE_FLAG`] is set.
pub const RECORD_HEAD_LEN: usize = 36;
/// Bytes of a record's base hint, after [`RECORD_HEAD_LEN`].
pub const RECORD_BASE_LEN: usize = 32;
const RECORD_HEAD_WITH_BASE: usize = RECORD_HEAD_LEN + RECORD_BASE_LEN;

/// What the first [`RECORD_HEAD_LEN`] bytes of a chunk record say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordWord {
    /// BLAKE3 of the chunk.
    pub hash: ChunkHash,
    /// Bytes of data after the head.
    pub len: usize,
    /// A base hint ([`RECORD_BASE_LEN`] bytes) follows the length word.
    pub has_base: bool,
    /// The data is a patch of the base ([`CHUNK_RECORD_PATCH_FLAG`]).
    pub patch: bool,
}

/// Parses a record's hash and length word, with the checks every reader
/// of records makes: the length within [`MAX_CHUNK_SIZE`], a patch only
/// with a base.
pub fn parse_record_word(head: &[u8; RECORD_HEAD_LEN]) -> Result<RecordWord, FrameError> {
    let mut h = [0u8; 32];
    h.copy_from_slice(&head[..32]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&head[32..RECORD_HEAD_LEN]);
    let word = u32::from_le_bytes(l);
    let len = word & RECORD_LEN_MASK;
    if len > MAX_CHUNK_SIZE {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    let has_base = word & CHUNK_RECORD_BASE_FLAG != 0;
    let patch = word & CHUNK_RECORD_PATCH_FLAG != 0;
    if patch && !has_base {
        return Err(FrameError::BadPatch("a patch record without its base"));
    }
    Ok(RecordWord {
        hash: ChunkHash(h),
        len: len as usize,
        has_base,
        patch,
    })
}

/// Splits a chunk upload body into its records as the body arrives, piece
/// by piece (each piece as the transport delivers it), so the gateway can
/// store the first chunk while the rest is still on the wire.
///
/// A record that lies whole inside one piece is handed on as a slice of
/// that piece; one that spans pieces is gathered once into a buffer of its
/// declared length (the one copy a chunk takes on its way to the
/// compressor). The body's total size is bounded by `limit`.
#[derive(Debug)]
pub struct ChunkRecordSplitter {
    head: [u8; RECORD_HEAD_WITH_BASE],
    head_len: usize,
    partial: Option<PartialRecord>,
    seen: usize,
    limit: usize,
}

#[derive(Debug)]
struct PartialRecord {
    hash: ChunkHash,
    base: Option<ChunkHash>,
    patch: bool,
    len: usize,
    data: BytesMut,
}

impl ChunkRecordSplitter {
    /// A splitter for one body of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            head: [0; RECORD_HEAD_WITH_BASE],
            head_len: 0,
            partial: None,
            seen: 0,
            limit,
        }
    }

    /// Takes the next piece of the body; every record it completes is
    /// appended to `out`.
    pub fn push(&mut self, mut piece: Bytes, out: &mut Vec<ChunkRecord>) -> Result<(), FrameError> {
        self.seen = self.seen.saturating_add(piece.len());
        if self.seen > self.limit {
            return Err(FrameError::BodyTooLarge(self.limit));
        }
        while !piece.is_empty() {
            if let Some(p) = &mut self.partial {
                let take = (p.len - p.data.len()).min(piece.len());
                p.data.extend_from_slice(&piece.split_to(take));
                if p.data.len() == p.len {
                    if let Some(p) = self.partial.take() {
                        out.push(ChunkRecord {
                            hash: p.hash,
                            base: p.base,
                            patch: p.patch,
                            data: p.data.freeze(),
                        });
                    }
                }
                continue;
            }
            let want = if self.head_len >= RECORD_HEAD_LEN && self.has_base() {
                RECORD_HEAD_WITH_BASE
            } else {
                RECORD_HEAD_LEN
            };
            let take = (want - self.head_len).min(piece.len());
            self.head[self.head_len..self.head_len + take].copy_from_slice(&piece[..take]);
            self.head_len += take;
            piece.advance(take);
            if self.head_len < RECORD_HEAD_LEN {
                continue;
            }
            let mut first = [0u8; RECORD_HEAD_LEN];
            first.copy_from_slice(&self.head[..RECORD_HEAD_LEN]);
            let RecordWord {
                hash,
                len,
                has_base,
                patch,
            } = parse_record_word(&first)?;
            if self.head_len < want || (want == RECORD_HEAD_LEN && has_base) {
                continue;
            }
            let base = has_base.then(|| {
                let mut b = [0u8; RECORD_BASE_LEN];
                b.copy_from_slice(&self.head[RECORD_HEAD_LEN..RECORD_HEAD_WITH_BASE]);
                ChunkHash(b)
            });
            self.head_len = 0;
            if piece.len() >= len {
                // Whole in this piece: no copy.
                out.push(ChunkRecord {
                    hash,
                    base,
                    patch,
                    data: piece.split_to(len),
                });
            } else {
                self.partial = Some(PartialRecord {
                    hash,
                    base,
                    patch,
                    len,
                    data: BytesMut::with_capacity(len),
                });
            }
        }
        Ok(())
    }

    /// Ends the body: an error when it stopped inside a record.
    pub fn finish(self) -> Result<(), FrameError> {
        if self.head_len > 0 || self.partial.is_some() {
            return Err(FrameError::Truncated("chunk"));
        }
        Ok(())
    }

    fn has_base(&self) -> bool {
        self.length_word() & CHUNK_RECORD_BASE_FLAG != 0
    }

    fn length_word(&self) -> u32 {
        let mut l = [0u8; 4];
        l.copy_from_slice(&self.head[32..RECORD_HEAD_LEN]);
        u32::from_le_bytes(l)
    }
}

/// Encodes a stream index upload: (`chunk_no u64 LE | hash[32]`)*.
pub fn encode_stream_index(entries: &[(u64, ChunkHash)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 40);
    for (n, h) in entries {
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&h.0);
    }
    out
}

/// Decodes a stream index upload.
pub fn decode_stream_index(body: &[u8]) -> Result<Vec<(u64, ChunkHash)>, FrameError> {
    if !body.len().is_multiple_of(40) {
        return Err(FrameError::Truncated("index"));
    }
    Ok(body
        .chunks_exact(40)
        .map(|r| {
            let mut n = [0u8; 8];
            n.copy_from_slice(&r[..8]);
            let mut h = [0u8; 32];
            h.copy_from_slice(&r[8..]);
            (u64::from_le_bytes(n), ChunkHash(h))
        })
        .collect())
}

/// `format` of `GET /v1/admin/points/{id}/streams/{n}/data` that asks for
/// [payload frames](parse_payload_frames) instead of plaintext.
pub const DATA_FORMAT_FRAMES: &str = "frames";

/// Bytes of a payload frame's header: `chunk_no u64 LE | kind u8 | len u32 LE`.
pub const PAYLOAD_FRAME_HEADER: usize = 13;

/// Frame kind: `len` bytes of chunk payload (codec flag, then raw or zstd
/// data, as inside a chunk record; docs/formats.md).
pub const PAYLOAD_FRAME_CHUNK: u8 = 0;

/// Frame kind: `len` bytes of UTF-8 saying why chunk `chunk_no` could not be
/// read. Always the last frame of a body.
pub const PAYLOAD_FRAME_ERROR: u8 = 1;

/// Longest error message a frame may carry.
pub const MAX_PAYLOAD_FRAME_ERROR: u32 = 64 << 10;

/// The header of one payload frame.
pub fn payload_frame_header(chunk_no: u64, kind: u8, len: u32) -> [u8; PAYLOAD_FRAME_HEADER] {
    let mut h = [0u8; PAYLOAD_FRAME_HEADER];
    h[..8].copy_from_slice(&chunk_no.to_le_bytes());
    h[8] = kind;
    h[9..].copy_from_slice(&len.to_le_bytes());
    h
}

/// One frame of a payload-frames body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadFrame<'a> {
    /// The still-encoded payload of chunk `chunk_no`.
    Chunk {
        /// Chunk number in the stream.
        chunk_no: u64,
        /// Codec flag, then the data.
        payload: &'a [u8],
    },
    /// The gateway could not read chunk `chunk_no`; nothing follows.
    Error {
        /// Chunk number in the stream.
        chunk_no: u64,
        /// Why, one line.
        message: String,
    },
}

/// Splits a payload-frames body (restore data with `format=frames`) into
/// frames, refusing truncation, unknown kinds and oversized frames (a chunk
/// payload is at most `MAX_CHUNK_SIZE + 1` bytes). Stops after an error frame.
pub fn parse_payload_frames(body: &[u8]) -> Result<Vec<PayloadFrame<'_>>, FrameError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < body.len() {
        let Some(h) = body.get(pos..pos + PAYLOAD_FRAME_HEADER) else {
            return Err(FrameError::Truncated("payload frame"));
        };
        let mut n = [0u8; 8];
        n.copy_from_slice(&h[..8]);
        let chunk_no = u64::from_le_bytes(n);
        let kind = h[8];
        let mut l = [0u8; 4];
        l.copy_from_slice(&h[9..]);
        let len = u32::from_le_bytes(l);
        let max = match kind {
            PAYLOAD_FRAME_CHUNK => MAX_CHUNK_SIZE + 1,
            PAYLOAD_FRAME_ERROR => MAX_PAYLOAD_FRAME_ERROR,
            _ => return Err(FrameError::UnknownKind(kind)),
        };
        if len > max {
            return Err(FrameError::TooLarge(len as u64));
        }
        let start = pos + PAYLOAD_FRAME_HEADER;
        let end = start + len as usize;
        let Some(data) = body.get(start..end) else {
            return Err(FrameError::Truncated("payload frame"));
        };
        pos = end;
        if kind == PAYLOAD_FRAME_ERROR {
            out.push(PayloadFrame::Error {
                chunk_no,
                message: String::from_utf8_lossy(data).into_owned(),
            });
            break;
        }
        out.push(PayloadFrame::Chunk {
            chunk_no,
            payload: data,
        });
    }
    Ok(out)
}

/// Id of the chunk in the index of a point; re-exported for convenience.
pub type StoredChunkId = ChunkId;

// ---- consistency checks ---------------------------------------------------

/// Query of `POST /v1/agent/backups?purpose=consistency-check`: the session
/// is a consistency check (its job and point are of kind `consistency-check`).
pub const PURPOSE_CONSISTENCY_CHECK: &str = "consistency-check";

/// One chunk as the source reads it now, for [`CompareRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareEntry {
    pub chunk_no: u64,
    /// Plaintext BLAKE3 of the chunk (non-zero chunks only).
    pub hash: ChunkHash,
}

/// `POST /v1/agent/backups/{session}/compare`: the non-zero chunks of stream
/// `stream` with numbers in `first..end` as the source reads them now; every
/// other chunk number of that range reads as zero.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareRequest {
    pub stream: u32,
    pub first: u64,
    pub end: u64,
    pub chunks: Vec<CompareEntry>,
}

/// Chunk numbers of the range whose content differs from the base point's
/// index (different id, or present on one side only), ascending.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CompareResponse {
    pub differing: Vec<u64>,
}

/// What a consistency check found on one disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCheckFigures {
    pub index: u32,
    pub path: String,
    /// Chunk numbers compared (every chunk of the disk).
    pub chunks_compared: u64,
    /// Chunks whose content differs from the newest point.
    pub chunks_differing: u64,
    /// Bytes of those chunks.
    pub bytes_differing: u64,
    /// Chunk bytes sent to repair them (the gateway lacked them).
    pub bytes_sent: u64,
}

/// Commit of a consistency-check session: the usual commit plus the
/// figures, which become the job's message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckCommitRequest {
    #[serde(flatten)]
    pub commit: CommitRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Vec<DiskCheckFigures>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits a whole chunk upload body into its records.
    fn parse_chunk_records(body: Bytes) -> Result<Vec<ChunkRecord>, FrameError> {
        let mut split = ChunkRecordSplitter::new(usize::MAX);
        let mut out = Vec::new();
        split.push(body, &mut out)?;
        split.finish()?;
        Ok(out)
    }

    #[test]
    fn chunk_records_round_trip_and_reject_truncation() {
        let mut body = Vec::new();
        put_chunk_record(&mut body, &ChunkHash([1; 32]), b"hello");
        put_chunk_record(&mut body, &ChunkHash([2; 32]), b"");
        put_chunk_record_with_base(
            &mut body,
            &ChunkHash([3; 32]),
            Some(&ChunkHash([4; 32])),
            b"xy",
        );
        let body = Bytes::from(body);
        let recs = parse_chunk_records(body.clone()).expect("parse");
        assert_eq!(recs.len(), 3);
        assert_eq!(&recs[0].data[..], b"hello");
        assert_eq!(recs[0].base, None);
        assert_eq!(recs[1].hash, ChunkHash([2; 32]));
        assert!(recs[1].data.is_empty());
        assert_eq!(recs[2].base, Some(ChunkHash([4; 32])));
        assert_eq!(&recs[2].data[..], b"xy");
        // A base hint cut short is a truncated record.
        assert_eq!(
            parse_chunk_records(body.slice(..body.len() - 20)),
            Err(FrameError::Truncated("chunk"))
        );
        assert_eq!(
            parse_chunk_records(body.slice(..body.len() - 1)),
            Err(FrameError::Truncated("chunk"))
        );
        let mut huge = vec![0u8; 32];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_chunk_records(Bytes::from(huge)),
            Err(FrameError::TooLarge(_))
        ));
        // The limit counts every byte of the body, records or not.
        let mut split = ChunkRecordSplitter::new(body.len() - 1);
        assert_eq!(
            split.push(body.clone(), &mut Vec::new()),
            Err(FrameError::BodyTooLarge(body.len() - 1))
        );
    }

    #[test]
    fn a_gateway_that_does_not_say_it_takes_patches_gets_none() {
        let old: BeginBackupResponse =
            serde_json::from_str(r#"{"session_id":"s","chunk_size":1048576}"#).expect("json");
        assert!(!old.accepts_patches);
        let new: BeginBackupResponse = serde_json::from_str(
            r#"{"session_id":"s","chunk_size":1048576,"accepts_patches":true}"#,
        )
        .expect("json");
        assert!(new.accepts_patches);
    }

    #[test]
    fn a_patch_record_rebuilds_its_chunk_from_the_base() {
        // 3 blocks and a short fourth; blocks 1 and 3 changed.
        let len = 3 * PATCH_BLOCK + 100;
        let base: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut new = base.clone();
        new[PATCH_BLOCK + 7] ^= 0xff;
        new[3 * PATCH_BLOCK + 99] ^= 0xff;
        let mut blocks = new[PATCH_BLOCK..2 * PATCH_BLOCK].to_vec();
        blocks.extend_from_slice(&new[3 * PATCH_BLOCK..]);
        let (h, b) = (ChunkHash([1; 32]), ChunkHash([2; 32]));
        let mut body = chunk_patch_head(&h, &b, len, &[0b1010], blocks.len());
        body.extend_from_slice(&blocks);
        let recs = parse_chunk_records(Bytes::from(body)).expect("parse");
        assert_eq!(recs.len(), 1);
        assert!(recs[0].patch);
        assert_eq!(recs[0].base, Some(b));
        assert_eq!(apply_chunk_patch(&base, &recs[0].data).expect("apply"), new);
        // Cut short, one block too many, a base too short for a kept block.
        let data = &recs[0].data;
        assert_eq!(
            apply_chunk_patch(&base, &data[..data.len() - 1]),
            Err(FrameError::BadPatch("truncated"))
        );
        let mut long = data.to_vec();
        long.push(0);
        assert!(apply_chunk_patch(&base, &long).is_err());
        assert!(apply_chunk_patch(&base[..PATCH_BLOCK], data).is_err());
        // A patch needs its base hint.
        let mut bad = vec![0u8; 32];
        bad.extend_from_slice(&(4 | CHUNK_RECORD_PATCH_FLAG).to_le_bytes());
        bad.extend_from_slice(&[0; 4]);
        assert!(matches!(
            parse_chunk_records(Bytes::from(bad)),
            Err(FrameError::BadPatch(_))
        ));
    }

    proptest::proptest! {
        /// However the transport cuts the body into pieces, the splitter
        /// yields the same records, in order, as from the whole body.
        #[test]
        fn chunk_records_split_anywhere_come_out_the_same(
            records in proptest::collection::vec(
                (proptest::prelude::any::<u8>(), proptest::option::of(proptest::prelude::any::<u8>()), 0usize..300),
                0..8,
            ),
            cuts in proptest::collection::vec(0usize..3000, 0..12),
        ) {
            let mut body = Vec::new();
            let mut want = Vec::new();
            for (i, (h, b, len)) in records.iter().enumerate() {
                let data: Vec<u8> = (0..*len).map(|j| (i * 31 + j) as u8).collect();
                let base = b.map(|b| ChunkHash([b; 32]));
                put_chunk_record_with_base(&mut body, &ChunkHash([*h; 32]), base.as_ref(), &data);
                want.push(ChunkRecord { hash: ChunkHash([*h; 32]), base, patch: false, data: Bytes::from(data) });
            }
            let body = Bytes::from(body);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            cuts.push(0);
            cuts.push(body.len());
            cuts.sort_unstable();
            let mut split = ChunkRecordSplitter::new(body.len());
            let mut got = Vec::new();
            for w in cuts.windows(2) {
                split.push(body.slice(w[0]..w[1]), &mut got).expect("push");
            }
            split.finish().expect("finish");
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn payload_frames_round_trip_and_reject_damage() {
        let mut body = Vec::new();
        body.extend_from_slice(&payload_frame_header(7, PAYLOAD_FRAME_CHUNK, 3));
        body.extend_from_slice(b"\x01ab");
        body.extend_from_slice(&payload_frame_header(8, PAYLOAD_FRAME_ERROR, 4));
        body.extend_from_slice(b"oops");
        body.extend_from_slice(&payload_frame_header(9, PAYLOAD_FRAME_CHUNK, 0));
        let f = parse_payload_frames(&body).expect("parse");
        assert_eq!(
            f,
            vec![
                PayloadFrame::Chunk {
                    chunk_no: 7,
                    payload: b"\x01ab"
                },
                PayloadFrame::Error {
                    chunk_no: 8,
                    message: "oops".into()
                }
            ],
            "nothing after an error frame"
        );
        assert_eq!(
            parse_payload_frames(&body[..20]),
            Err(FrameError::Truncated("payload frame"))
        );
        assert_eq!(
            parse_payload_frames(&body[..5]),
            Err(FrameError::Truncated("payload frame"))
        );
        assert!(parse_payload_frames(&[]).expect("empty").is_empty());
        let big = payload_frame_header(0, PAYLOAD_FRAME_CHUNK, MAX_CHUNK_SIZE + 2);
        assert_eq!(
            parse_payload_frames(&big),
            Err(FrameError::TooLarge(MAX_CHUNK_SIZE as u64 + 2))
        );
        assert_eq!(
            parse_payload_frames(&payload_frame_header(0, 9, 0)),
            Err(FrameError::UnknownKind(9))
        );
    }

    #[test]
    fn stream_index_round_trip() {
        let e = vec![(0u64, ChunkHash([9; 32])), (77, ChunkHash([3; 32]))];
        let b = encode_stream_index(&e);
        assert_eq!(decode_stream_index(&b).expect("decode"), e);
        assert!(decode_stream_index(&b[..41]).is_err());
    }
}
