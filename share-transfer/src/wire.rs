//! What crosses the wire between the backup client and the site agents.
//!
//! Share chunks travel as **frames**, concatenated in a request or response body:
//!
//! ```text
//! "BKF1" | header length: u32 LE | header: JSON FrameHeader | payload | tag: 16 bytes
//! ```
//!
//! The chunk's key material is the concatenation of the `key_ids` keys, in order. When the
//! transfer leaves its site (`pad`), its first `len` bytes are the one-time pad of the payload
//! and the next 32 bytes the MAC key; within a site there is no pad and the first 32 bytes are
//! the MAC key. The tag is a Wegman–Carter MAC ([`crate::auth`]) over
//! [`mac_context`] ‖ header ‖ payload, so a frame cannot be altered, replayed into another
//! backup, share, chunk or direction, or have its key IDs swapped without detection.
//!
//! The JSON control messages of the agent's HTTP API are also defined here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::TAG_LEN;

/// Frame magic.
pub const FRAME_MAGIC: [u8; 4] = *b"BKF1";
/// Largest accepted frame header.
pub const MAX_FRAME_HEADER: usize = 64 * 1024;

/// Request header of a chunk upload: the milliseconds the client has waited for QKD key in
/// this backup so far (for the operators' view of the job; optional, never trusted for
/// anything else).
pub const KEY_WAIT_HEADER: &str = "x-qkd-key-wait-ms";

/// Which way a frame travels (bound into its MAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → agent.
    Store = 0,
    /// Agent → client.
    Restore = 1,
    /// Client → agent: a share renewal's delta (see [`RenewBegin`]).
    Renew = 2,
}

/// The header of one frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameHeader {
    /// Chunk index within the share.
    pub chunk: u64,
    /// Split generation of this chunk: all shares of one split of the chunk carry the same
    /// nonce, so a resumed store can tell whether the sites hold matching shares.
    pub nonce: u64,
    /// IDs of the QKD keys whose concatenation is this chunk's key material.
    pub key_ids: Vec<Uuid>,
    /// The payload is one-time-padded (required between sites).
    pub pad: bool,
    /// Payload length in bytes.
    pub len: u32,
    /// Set (with len 0) when the sender cannot provide this chunk; the frame then ends the
    /// stream and carries no valid tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Errors while parsing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic")]
    Magic,
    #[error("frame header of {0} bytes is too large")]
    HeaderTooLarge(usize),
    #[error("frame header is not valid JSON: {0}")]
    Header(#[from] serde_json::Error),
    #[error("frame truncated")]
    Truncated,
    #[error("frame payload of {got} bytes exceeds the limit of {limit}")]
    PayloadTooLarge { got: usize, limit: usize },
}

/// The data the MAC of a frame starts with.
pub fn mac_context(backup: Uuid, share: u8, dir: Direction) -> [u8; 22] {
    let mut c = [0u8; 22];
    c[..4].copy_from_slice(&FRAME_MAGIC);
    c[4..20].copy_from_slice(backup.as_bytes());
    c[20] = share;
    c[21] = dir as u8;
    c
}

/// Appends a frame's header to `out` and returns where the payload starts.
pub fn begin_frame(out: &mut Vec<u8>, header: &FrameHeader) -> (usize, usize) {
    let json = serde_json::to_vec(header).unwrap_or_default();
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    let h_start = out.len();
    out.extend_from_slice(&json);
    (h_start, out.len())
}

/// One parsed frame, borrowing from the buffer it was parsed from.
#[derive(Debug)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub header_bytes: &'a [u8],
    pub payload: &'a [u8],
    pub tag: &'a [u8],
}

/// Parses the header of the frame at the start of `buf`: returns it, where its payload
/// starts and the whole frame's length, or `Ok(None)` if `buf` does not yet hold the header.
/// Lets a receiver act on a frame's header (fetch its keys, say) before its payload is in.
pub fn parse_header(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(FrameHeader, usize, usize)>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    if buf[..4] != FRAME_MAGIC {
        return Err(FrameError::Magic);
    }
    let hlen = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if hlen > MAX_FRAME_HEADER {
        return Err(FrameError::HeaderTooLarge(hlen));
    }
    if buf.len() < 8 + hlen {
        return Ok(None);
    }
    let header: FrameHeader = serde_json::from_slice(&buf[8..8 + hlen])?;
    let plen = header.len as usize;
    if plen > max_payload {
        return Err(FrameError::PayloadTooLarge {
            got: plen,
            limit: max_payload,
        });
    }
    let tag_len = if header.error.is_some() { 0 } else { TAG_LEN };
    Ok(Some((header, 8 + hlen, 8 + hlen + plen + tag_len)))
}

/// Parses the frame at the start of `buf`; returns it and its total length, or `Ok(None)`
/// if `buf` does not yet hold a whole frame.
pub fn parse_frame(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some((header, _, total)) = parse_header(buf, max_payload)? else {
        return Ok(None);
    };
    Ok(frame_with(buf, header).map(|f| (f, total)))
}

/// The frame at the start of `buf` whose header [`parse_header`] already returned (so it is
/// not parsed again), or `None` if `buf` does not yet hold the whole frame.
pub fn frame_with(buf: &[u8], header: FrameHeader) -> Option<Frame<'_>> {
    let hlen = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?) as usize;
    let start = 8 + hlen;
    let end = start + header.len as usize;
    let total = end + if header.error.is_some() { 0 } else { TAG_LEN };
    if buf.len() < total {
        return None;
    }
    Some(Frame {
        header_bytes: &buf[8..start],
        payload: &buf[start..end],
        tag: &buf[end..total],
        header,
    })
}

/// Scheme parameters as written in manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemeInfo {
    /// `xor` or `shamir`.
    pub kind: SchemeName,
    pub k: u8,
    pub n: u8,
}

/// Name of a sharing scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchemeName {
    /// Kurihara et al. XOR threshold scheme (fast; patented in some places until ~2028).
    Xor,
    /// Shamir over GF(2^8) (patent-free).
    Shamir,
}

impl SchemeInfo {
    /// The library scheme.
    pub fn scheme(&self) -> Result<sharing::Scheme, sharing::scheme::SchemeError> {
        match self.kind {
            SchemeName::Xor => sharing::Scheme::xor(self.k, self.n),
            SchemeName::Shamir => sharing::Scheme::shamir(self.k, self.n),
        }
    }
}

/// Body of `PUT /v1/backups/{id}/shares/{index}`: opens (or re-opens) a share for storing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareOpen {
    pub scheme: SchemeInfo,
    pub chunk_size: u32,
    pub chunk_count: u64,
    pub original_len: u64,
    /// File name of the original (for listings).
    pub name: String,
    /// Seconds since the Unix epoch when the backup was started.
    pub created: u64,
    /// The agent SAE ID of the site holding each share, in share order (share `i` at
    /// `placement[i]`), recorded at every site: a restore accepts share `i` only from that
    /// site, and only when at least `k` sites agree on it (empty for backups stored before
    /// it was recorded).
    #[serde(default)]
    pub placement: Vec<String>,
    /// Raised each time a share moves to another site (`repair --to`): when sites disagree
    /// only on the placement, and each side has `k` sites, the higher version is the
    /// backup's (a move in progress).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub placement_version: u32,
    /// SAEs besides the owner that may read this share; `None` (absent): the owner's own
    /// site's clients (SAEs of the owner's KME). The agent's operator may add readers for
    /// disaster recovery (`recovery_clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readers: Option<Vec<String>>,
    /// Share epoch: 0 as stored, one more after each renewal. Shares of different epochs
    /// never combine (a restore uses one epoch; chunk nonces change with each renewal too).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u32,
}

fn is_zero(e: &u32) -> bool {
    *e == 0
}

/// A sample set: files stored as one job, each its own backup. Every site keeps a copy
/// (`PUT /v1/sets/{name}`), so a client that lost its own state, or another site's client
/// after a disaster, finds the set and its files again. No content digests here: they stay
/// with the owner's client (a digest of a genome at every site would let a site confirm a
/// guess).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetManifest {
    /// [`valid_set_name`].
    pub name: String,
    /// The SAE that stored the set (set by the agent from the caller's certificate).
    #[serde(default)]
    pub owner: String,
    /// Who besides the owner may read it (as `ShareOpen::readers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readers: Option<Vec<String>>,
    /// Seconds since the Unix epoch of the last change.
    pub updated: u64,
    /// The files, by path within the set.
    pub files: Vec<SetFile>,
}

/// One file of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetFile {
    /// Relative path with `/` separators: no empty, `.` or `..` component, no leading `/`
    /// ([`valid_set_path`]).
    pub path: String,
    pub size: u64,
    /// Modification time when stored, nanoseconds since the Unix epoch.
    pub mtime_ns: u128,
    pub backup_id: Uuid,
}

/// Set names: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn valid_set_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A path within a set that stays within the folder it is restored into.
pub fn valid_set_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 4096
        && !path.starts_with('/')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

impl SetManifest {
    /// Why this manifest cannot be stored, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if !valid_set_name(&self.name) {
            return Some(format!(
                "set name {:?}: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with .)",
                self.name
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            if !valid_set_path(&f.path) {
                return Some(format!(
                    "path {:?} is not a relative path within the set",
                    f.path
                ));
            }
            if !seen.insert(f.path.as_str()) {
                return Some(format!("path {:?} is listed twice", f.path));
            }
        }
        None
    }
}

/// What an agent keeps about one share; `GET /v1/backups` lists these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub backup_id: Uuid,
    pub share_index: u8,
    #[serde(flatten)]
    pub open: ShareOpen,
    /// SAE that stored the share.
    pub client_sae: String,
    /// Share file header and trailer (hex), set when the share is complete.
    #[serde(default)]
    pub header_hex: Option<String>,
    #[serde(default)]
    pub trailer_hex: Option<String>,
    pub complete: bool,
    /// The renewal that brought the share to its epoch (absent at epoch 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal: Option<Uuid>,
}

/// Body of `PUT /v1/backups/{id}/shares/{i}/placement`: the backup's new placement after one
/// of its shares moved to another site. Only the owner may send it, with a higher version
/// (the same one again is a no-op). After it, `DELETE /v1/backups/{id}/shares/{i}` removes
/// the share from a site the placement no longer names for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementUpdate {
    pub placement: Vec<String>,
    pub placement_version: u32,
}

/// Body of `PUT /v1/backups/{id}/shares/{i}/renewal/{renewal}`: stage a renewal of the share
/// from its current epoch to `epoch` (one more). Renewal in four steps, each idempotent:
///
/// 1. **begin** — the agent opens empty staging files beside the share;
/// 2. **chunks** (`POST …/renewal/{renewal}/chunks`, frames as for a store, MAC direction
///    [`Direction::Renew`]) — each frame's payload is the chunk's delta (a share of zero,
///    `sharing::renewal`), which the agent XORs into its current chunk and writes to the
///    staging files, with the frame's nonce as the chunk's new split nonce; the current
///    share is not touched;
/// 3. **prepare** ([`RenewPrepare`]) — the agent checks that every chunk is staged, from
///    the splits the client dealt, and reads them back;
/// 4. **commit** (`POST …/renewal/{renewal}/commit`) — sent only once every site prepared;
///    the agent durably marks the renewal committed, then swaps the staged files in. A
///    crash after the mark finishes the swap at restart; before it, the share is as it was.
///
/// Before commit, `DELETE …/renewal/{renewal}` drops the staged files (roll back).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBegin {
    /// The epoch the share moves to: the current one plus one.
    pub epoch: u32,
}

/// Body of `POST …/renewal/{renewal}/prepare`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewPrepare {
    /// [`splits_digest`] of the new `(chunk, nonce)` of every chunk.
    pub splits: String,
}

/// A renewal staged at an agent and not yet committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRenewal {
    pub renewal: Uuid,
    /// The epoch it moves the share to.
    pub epoch: u32,
    /// Chunks staged so far.
    pub staged: u64,
    /// Every chunk staged and checked: ready to commit.
    pub prepared: bool,
}

/// Reply of the renewal routes (`GET /v1/backups/{id}/shares/{i}/renewal` and the steps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalStatus {
    /// The share's current epoch.
    pub epoch: u32,
    /// The renewal that brought it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal: Option<Uuid>,
    /// A renewal staged and not committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingRenewal>,
}

/// Reply of `GET /v1/backups/{id}/shares/{index}/state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShareState {
    /// `[chunk, nonce]` of every chunk held durably.
    pub chunks: Vec<(u64, u64)>,
    pub complete: bool,
}

/// Reply of a chunk upload: the chunks now durable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub stored: Vec<u64>,
}

/// Body of `POST /v1/backups/{id}/shares/{index}/receipts`: the client fetched the keys of
/// these downloaded chunks (see [`crate::receipt`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipts {
    /// `(chunk, receipt as hex)`.
    pub chunks: Vec<(u64, String)>,
}

/// Reply to [`Receipts`]: how many matched keys the agent had issued and not yet seen
/// acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Acknowledged {
    pub matched: usize,
}

/// Body of `POST /v1/backups/{id}/shares/{index}/finalize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finalize {
    pub header_hex: String,
    pub trailer_hex: String,
    /// [`splits_digest`] of the `(chunk, nonce)` of every chunk, as the client split them:
    /// the agent refuses to complete a share whose chunks come from other splits.
    pub splits: String,
}

/// BLAKE3 (hex) over the little-endian `(chunk, nonce)` pairs in chunk order.
pub fn splits_digest(nonces: impl IntoIterator<Item = (u64, u64)>) -> String {
    let mut h = blake3::Hasher::new();
    for (j, n) in nonces {
        h.update(&j.to_le_bytes());
        h.update(&n.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// One share's result in `POST /v1/backups/{id}/verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareCheck {
    pub share_index: u8,
    pub complete: bool,
    pub chunk_count: u64,
    pub chunks_ok: u64,
    pub missing: Vec<u64>,
    pub damaged: Vec<u64>,
}

/// Error body of the agent API (the same shape as ETSI 014's Error).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentError {
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names_and_paths_cannot_leave_their_folder() {
        for good in ["run42", "batch-7", "a.b_c", &"x".repeat(128)] {
            assert!(valid_set_name(good), "{good}");
        }
        for bad in ["", ".hidden", "../up", "a/b", "a b", &"x".repeat(129), "é"] {
            assert!(!valid_set_name(bad), "{bad}");
        }
        for good in ["a", "run42/lane1/s.fq", "x/.y", "..a/b"] {
            assert!(valid_set_path(good), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "./a",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(!valid_set_path(bad), "{bad:?}");
        }
        let file = |p: &str| SetFile {
            path: p.into(),
            size: 1,
            mtime_ns: 0,
            backup_id: Uuid::nil(),
        };
        let m = SetManifest {
            name: "s".into(),
            owner: String::new(),
            readers: None,
            updated: 0,
            files: vec![file("a"), file("a")],
        };
        assert!(m.problem().is_some_and(|p| p.contains("twice")));
    }

    #[test]
    fn frames_round_trip_and_need_all_bytes() {
        let h = FrameHeader {
            chunk: 7,
            nonce: 9,
            key_ids: vec![Uuid::new_v4()],
            pad: true,
            len: 3,
            error: None,
        };
        let mut buf = Vec::new();
        begin_frame(&mut buf, &h);
        buf.extend_from_slice(&[1, 2, 3]);
        buf.extend_from_slice(&[0xAA; TAG_LEN]);
        for cut in 0..buf.len() {
            assert!(parse_frame(&buf[..cut], 16).unwrap().is_none());
        }
        let (f, used) = parse_frame(&buf, 16).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(f.header, h);
        assert_eq!(f.payload, &[1, 2, 3]);
        assert!(parse_frame(&buf, 2).is_err(), "payload limit");
        buf[0] = b'X';
        assert!(parse_frame(&buf, 16).is_err());
    }
}
