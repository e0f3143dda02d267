//! The ledger of download keys: QKD key the agent took (as master) for a reading client and
//! sent it in frames, until the client shows with a receipt ([`share_transfer::receipt`])
//! that it fetched those keys, or until they age out (the KME discards keys no one fetched
//! after its key TTL).
//!
//! Invariant, per client: the key bytes issued and not acknowledged stay within
//! `max_unfetched_key_bytes_per_client`. A download asks [`Ledger::admit`] before it takes
//! keys for a batch; a client that starts downloads and drops them, or never fetches their
//! keys, is refused once it holds the bound, however often it restarts: a restarted download
//! adds its new keys to the old ones, which still count until acknowledged or aged out. An
//! honest restore sends receipts as it goes and never comes near the bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use share_transfer::receipt::RECEIPT_LEN;
use uuid::Uuid;

/// What one issue costs against the bound beyond its key bytes (its entry here), so that
/// many tiny chunks cannot grow the ledger past the bound either.
pub const ENTRY_COST: u64 = 64;

/// One chunk's keys, issued and not yet acknowledged.
struct Issued {
    receipt: [u8; RECEIPT_LEN],
    bytes: u64,
    at: Instant,
}

/// Where a chunk came from: backup, share, chunk.
type ChunkRef = (Uuid, u8, u64);

#[derive(Default)]
struct Client {
    /// Every issue of a chunk's keys, oldest first (a restarted download issues again).
    issued: HashMap<ChunkRef, Vec<Issued>>,
    bytes: u64,
}

impl Client {
    fn expire(&mut self, ttl: Duration) {
        let now = Instant::now();
        let mut freed = 0;
        self.issued.retain(|_, v| {
            v.retain(|i| {
                let keep = now.duration_since(i.at) < ttl;
                if !keep {
                    freed += i.bytes;
                }
                keep
            });
            !v.is_empty()
        });
        self.bytes -= freed;
    }
}

/// Download keys per client (see the module doc).
pub struct Ledger {
    max_bytes: u64,
    ttl: Duration,
    clients: Mutex<HashMap<String, Client>>,
}

/// A download may not take more keys for this client now.
#[derive(Debug, thiserror::Error)]
#[error("{held} bytes of QKD key issued to SAE {client} for downloads are not yet acknowledged (limit {limit} per client, limits.max_unfetched_key_bytes_per_client): fetch those keys and send receipts, or wait until they age out")]
pub struct OverBound {
    pub client: String,
    pub held: u64,
    pub limit: u64,
}

impl Ledger {
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        Ledger {
            max_bytes,
            ttl,
            clients: Mutex::default(),
        }
    }

    /// Whether `client` may be issued `bytes` more now (key bytes plus [`ENTRY_COST`] per
    /// chunk).
    pub fn admit(&self, client: &str, bytes: u64) -> Result<(), OverBound> {
        let mut all = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let c = all.entry(client.to_owned()).or_default();
        c.expire(self.ttl);
        if c.bytes + bytes > self.max_bytes {
            return Err(OverBound {
                client: client.to_owned(),
                held: c.bytes,
                limit: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Records that `client` was sent chunk `at` with `key_bytes` of key whose receipt is
    /// `receipt`.
    pub fn issued(&self, client: &str, at: ChunkRef, key_bytes: u64, receipt: [u8; RECEIPT_LEN]) {
        let bytes = key_bytes + ENTRY_COST;
        let mut all = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let c = all.entry(client.to_owned()).or_default();
        c.bytes += bytes;
        c.issued.entry(at).or_default().push(Issued {
            receipt,
            bytes,
            at: Instant::now(),
        });
    }

    /// Clears the issues `receipts` acknowledge; returns how many matched.
    pub fn acknowledge(
        &self,
        client: &str,
        backup: Uuid,
        share: u8,
        receipts: &[(u64, [u8; RECEIPT_LEN])],
    ) -> usize {
        let mut all = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = all.get_mut(client) else {
            return 0;
        };
        let mut matched = 0;
        for (chunk, r) in receipts {
            let at = (backup, share, *chunk);
            let Some(v) = c.issued.get_mut(&at) else {
                continue;
            };
            if let Some(p) = v.iter().position(|i| &i.receipt == r) {
                c.bytes -= v.remove(p).bytes;
                matched += 1;
            }
            if v.is_empty() {
                c.issued.remove(&at);
            }
        }
        if c.issued.is_empty() {
            all.remove(client);
        }
        matched
    }

    /// Key bytes issued to `client` and not acknowledged.
    pub fn held(&self, client: &str) -> u64 {
        let all = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        all.get(client).map_or(0, |c| c.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Uuid = Uuid::from_u128(1);

    #[test]
    fn restarts_add_up_to_the_bound_and_receipts_free_it() {
        let cost = 100 + ENTRY_COST;
        let l = Ledger::new(3 * cost, Duration::from_secs(3600));
        for _ in 0..3 {
            l.admit("A", cost).unwrap();
            l.issued("A", (ID, 0, 0), 100, [1; RECEIPT_LEN]);
        }
        let e = l.admit("A", cost).unwrap_err();
        assert_eq!(e.held, 3 * cost);
        assert!(l.admit("B", 100).is_ok(), "another client is not affected");
        assert_eq!(l.acknowledge("A", ID, 0, &[(0, [2; RECEIPT_LEN])]), 0);
        assert_eq!(l.acknowledge("A", ID, 1, &[(0, [1; RECEIPT_LEN])]), 0);
        assert_eq!(l.acknowledge("A", ID, 0, &[(0, [1; RECEIPT_LEN])]), 1);
        assert_eq!(l.held("A"), 2 * cost);
        l.admit("A", cost).unwrap();
    }

    #[test]
    fn issues_age_out() {
        let l = Ledger::new(100 + ENTRY_COST, Duration::from_millis(20));
        l.issued("A", (ID, 0, 0), 100, [1; RECEIPT_LEN]);
        assert!(l.admit("A", 1).is_err());
        std::thread::sleep(Duration::from_millis(40));
        l.admit("A", 100 + ENTRY_COST).unwrap();
        assert_eq!(l.held("A"), 0);
    }
}
