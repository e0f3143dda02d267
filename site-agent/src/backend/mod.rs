//! Where a site's shares live: the [`Backend`] contract and its two drivers,
//! [`local`] (a folder on the agent's own disks, O_DIRECT where possible; the default) and
//! [`s3`] (a bucket of any S3-compatible object store, for a site that outgrows a disk).
//!
//! What is generic lives above this module: [`crate::storage::ShareFiles`] (claims, checks
//! against records, finalisation, mending) and [`crate::staging::Staging`] (the renewal
//! protocol) keep the share's records in memory and decide; a driver only makes bytes and
//! records durable and reads them back. Both drivers keep the same things — a manifest, the
//! chunks of the current epoch each with its record (chunk index, split nonce, BLAKE3), the
//! QKD key IDs that carried them, a renewal staged beside them, the sample-set manifests —
//! and hold exactly what the agent has after removing the one-time pad: its own share, never
//! another site's bytes, never key material.
//!
//! # The contract a driver keeps
//!
//! - [`ShareIo::put`] returns only once every chunk's bytes **and** its record are durable
//!   (fsynced, or acknowledged by the object store). After a crash or an error, each chunk
//!   is either held with a record that describes its bytes, or not held: never a record of
//!   other bytes.
//! - [`ShareIo::retire`] durably forgets chunks before new bytes replace them, so a crash in
//!   the middle of a rewrite leaves the chunk missing (sent again), not mis-described.
//! - Writes of the manifest and of the renewal state replace the old one atomically.
//! - [`ShareIo::finish_renewal`] is idempotent: it is redone by [`Backend::recover`] (and by
//!   [`Backend::open`]) whenever the renewal state says committed.
//! - Reads never check hashes: the caller does, against its records.
//!
//! # Adding a driver
//!
//! Implement [`Backend`] and [`ShareIo`]; map failures to [`StoreError::Io`] (a local path)
//! or [`StoreError::Backend`] (anything remote: the agent answers 503 and names it); give it
//! a table in [`crate::config::AgentConfig`] (as `[s3]` is) and a case where
//! [`crate::Agent::new`] picks the backend;
//! run the storage unit tests (`storage::tests`, `staging::tests`) against it and the
//! end-to-end suite with a `devnet` switch, as `devnet up --s3` does for [`s3`].

pub mod local;
pub mod s3;

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::storage::{Failpoint, StoreError};
use share_transfer::wire::Manifest;

/// A chunk's record: (split nonce, BLAKE3 of its bytes).
pub type Record = (u64, [u8; 32]);

/// Chunk index → record, as a driver holds them.
pub type ChunkRecords = HashMap<u64, Record>;

/// Length of one encoded record (chunk, nonce, BLAKE3): the local chunk log's entries and
/// the S3 driver's frozen record lists share this format.
pub(crate) const RECORD: usize = 48;

/// Appends one encoded record.
pub(crate) fn record_bytes(out: &mut Vec<u8>, chunk: u64, nonce: u64, hash: &[u8; 32]) {
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&nonce.to_le_bytes());
    out.extend_from_slice(hash);
}

/// The encoded records in `raw` (a torn tail shorter than a record is ignored):
/// (chunk, nonce, BLAKE3) each.
pub(crate) fn decode_records(raw: &[u8]) -> impl Iterator<Item = (u64, u64, [u8; 32])> + '_ {
    raw.chunks_exact(RECORD).map(|r| {
        let word = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or([0; 8]));
        let mut h = [0u8; 32];
        h.copy_from_slice(&r[16..48]);
        (word(0), word(8), h)
    })
}

/// Which QKD key IDs carried each chunk, one line per chunk (`chunk id id ...`), as both
/// drivers keep them.
pub(crate) fn key_lines(chunks: &[Put<'_>]) -> String {
    let mut lines = String::new();
    for c in chunks {
        lines.push_str(&c.chunk.to_string());
        for k in c.key_ids {
            lines.push(' ');
            lines.push_str(&k.to_string());
        }
        lines.push('\n');
    }
    lines
}

/// Which chunks of a share: the current ones, or a renewal's, staged beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Live,
    Staged,
}

/// One chunk to make durable: its bytes, its record, and the QKD key IDs that carried it.
pub struct Put<'a> {
    pub chunk: u64,
    pub nonce: u64,
    pub hash: [u8; 32],
    pub data: &'a [u8],
    pub key_ids: &'a [Uuid],
}

/// A share renewal's state (`renew.json`): which renewal, to which epoch, how far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewState {
    pub renewal: Uuid,
    pub epoch: u32,
    pub prepared: bool,
    pub committed: bool,
}

/// A share as a driver finds it.
pub struct Opened {
    pub io: Arc<dyn ShareIo>,
    pub manifest: Manifest,
    pub live: ChunkRecords,
    /// A renewal staged and not committed, with the records of its staged chunks.
    pub staged: Option<(RenewState, ChunkRecords)>,
}

/// The bytes of one share (see the module doc for the contract).
pub trait ShareIo: Send + Sync {
    /// Makes chunks and their records durable in `area`. `crash` names failpoints to pass
    /// once the bytes are written and before the records are (crash tests).
    fn put(&self, area: Area, chunks: &[Put<'_>], crash: &[Failpoint]) -> Result<(), StoreError>;

    /// Durably forgets live chunks (with their current records) that are about to be
    /// rewritten.
    fn retire(&self, held: &[(u64, Record)]) -> Result<(), StoreError>;

    /// Writes live chunks again with exactly the bytes their (unchanged) records describe.
    fn mend(&self, chunks: &[Put<'_>]) -> Result<(), StoreError>;

    /// Reads chunk `chunk` of `area`, recorded as `rec`, into `buf` (the chunk's length).
    /// Bytes that are not there read as [`StoreError::Damaged`].
    fn read(&self, area: Area, chunk: u64, rec: &Record, buf: &mut [u8]) -> Result<(), StoreError>;

    /// Called once every chunk of `area` is recorded and before the share (or renewal) is
    /// marked complete (or prepared): the records will not change again.
    fn freeze(&self, area: Area, records: &ChunkRecords) -> Result<(), StoreError>;

    /// Replaces the manifest atomically and durably.
    fn put_manifest(&self, m: &Manifest) -> Result<(), StoreError>;

    /// Starts a renewal: drops whatever was staged before, then writes `st`.
    fn begin_renewal(&self, st: &RenewState) -> Result<(), StoreError>;

    /// Replaces the renewal state atomically and durably (`committed` is the commit point).
    fn put_renewal(&self, st: &RenewState) -> Result<(), StoreError>;

    /// After the commit point: the staged chunks become the share, the manifest records
    /// the epoch and the renewal, the state goes. Idempotent.
    fn finish_renewal(&self, st: &RenewState) -> Result<(), StoreError>;

    /// Drops a renewal that was not committed.
    fn abort_renewal(&self) -> Result<(), StoreError>;
}

/// All the shares and sample sets of one agent.
pub trait Backend: Send + Sync {
    /// Where, for logs and errors.
    fn describe(&self) -> String;

    /// The share, if held; a committed renewal is finished first.
    fn open(&self, id: Uuid, index: u8) -> Result<Option<Opened>, StoreError>;

    /// Makes a new, empty share with manifest `m`, durably (anything left under its name by
    /// an earlier removal is dropped first).
    fn create(&self, m: &Manifest) -> Result<(), StoreError>;

    /// Removes a share; a crash part-way leaves it whole or gone, never half of it.
    fn remove(&self, id: Uuid, index: u8) -> Result<(), StoreError>;

    /// Backups that have a share here.
    fn backups(&self) -> Result<Vec<Uuid>, StoreError>;

    /// Shares of backup `id` held here.
    fn shares(&self, id: Uuid) -> Result<Vec<u8>, StoreError>;

    /// Finishes a renewal of the share that was committed before a crash; whether there was.
    fn recover(&self, id: Uuid, index: u8) -> Result<bool, StoreError>;

    /// Replaces set `name` of `owner` (hex of the SAE ID) atomically and durably.
    fn put_set(&self, owner: &str, name: &str, bytes: &[u8]) -> Result<(), StoreError>;

    /// Names of the sets of `owner` (hex).
    fn set_names(&self, owner: &str) -> Result<Vec<String>, StoreError>;

    /// Every set manifest kept here: (where, bytes).
    fn sets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// (free, total) bytes of the storage, where the driver can tell.
    fn space(&self) -> Option<(u64, u64)>;
}
