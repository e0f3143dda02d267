//! The ledger of download keys: QKD key the agent took (as master) for a reading client and
//! sent it in frames, until the client shows with a receipt ([`share_transfer::receipt`])
//! that it fetched those keys, or until they age out (the KME discards keys no one fetched
//! after its key TTL).
//!
//! Invariant, per client: the key bytes issued and not acknowledged stay within
//! `max_unfetched_key_bytes_per_client`. A download reserves ([`Ledger::reserve`]) before it takes
//! keys for a batch; a client that starts downloads and drops them, or never fetches their
//! keys, is refused once it holds the bound, however often it restarts: a restarted download
//! adds its new keys to the old ones, which still count until acknowledged or aged out. An
//! honest restore sends receipts as it goes and never comes near the bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use share_transfer::receipt::RECEIPT_LEN;
use uuid::Uuid;

/// What one issue costs against the bound beyond its key bytes: about the memory its entry
/// takes here, so that many tiny chunks cannot grow the ledger past the bound either.
pub const ENTRY_COST: u64 = 128;

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
        self.bytes = self.bytes.saturating_sub(freed);
    }
}

/// Bytes counted for a download's next batch; see [`Ledger::reserve`].
pub struct Reservation<'a> {
    ledger: &'a Ledger,
    client: String,
    left: u64,
}

impl Reservation<'_> {
    /// Records that the client was sent chunk `at` with `key_bytes` of key whose receipt
    /// is `receipt`, out of this reservation.
    pub fn issue(&mut self, at: ChunkRef, key_bytes: u64, receipt: [u8; RECEIPT_LEN]) {
        let bytes = (key_bytes + ENTRY_COST).min(self.left);
        self.left -= bytes;
        let mut all = self
            .ledger
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let c = all.entry(self.client.clone()).or_default();
        // Counted since `reserve`; from now on the entry holds those bytes.
        c.issued.entry(at).or_default().push(Issued {
            receipt,
            bytes,
            at: Instant::now(),
        });
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.left == 0 {
            return;
        }
        let mut all = self
            .ledger
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = all.get_mut(&self.client) {
            c.bytes = c.bytes.saturating_sub(self.left);
            if c.bytes == 0 && c.issued.is_empty() {
                all.remove(&self.client);
            }
        }
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

    /// Reserves `bytes` (key bytes plus [`ENTRY_COST`] per chunk) for `client`, counted at
    /// once so that downloads running side by side cannot pass the bound together; what the
    /// reservation does not [`issue`](Reservation::issue) is released when it is dropped.
    pub fn reserve(&self, client: &str, bytes: u64) -> Result<Reservation<'_>, OverBound> {
        let mut all = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let c = all.entry(client.to_owned()).or_default();
        if c.bytes + bytes > self.max_bytes {
            // Only a client at its bound pays for the walk over its entries.
            c.expire(self.ttl);
        }
        if c.bytes + bytes > self.max_bytes {
            return Err(OverBound {
                client: client.to_owned(),
                held: c.bytes,
                limit: self.max_bytes,
            });
        }
        c.bytes += bytes;
        Ok(Reservation {
            ledger: self,
            client: client.to_owned(),
            left: bytes,
        })
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
                c.bytes = c.bytes.saturating_sub(v.remove(p).bytes);
                matched += 1;
            }
            if v.is_empty() {
                c.issued.remove(&at);
            }
        }
        if c.issued.is_empty() && c.bytes == 0 {
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
            l.reserve("A", cost)
                .unwrap()
                .issue((ID, 0, 0), 100, [1; RECEIPT_LEN]);
        }
        let e = l.reserve("A", cost).err().unwrap();
        assert_eq!(e.held, 3 * cost);
        assert!(
            l.reserve("B", 100).is_ok(),
            "another client is not affected"
        );
        assert_eq!(l.acknowledge("A", ID, 0, &[(0, [2; RECEIPT_LEN])]), 0);
        assert_eq!(l.acknowledge("A", ID, 1, &[(0, [1; RECEIPT_LEN])]), 0);
        assert_eq!(l.acknowledge("A", ID, 0, &[(0, [1; RECEIPT_LEN])]), 1);
        assert_eq!(l.held("A"), 2 * cost);
        l.reserve("A", cost).unwrap();
    }

    #[test]
    fn issues_age_out() {
        let l = Ledger::new(100 + ENTRY_COST, Duration::from_millis(20));
        l.reserve("A", 100 + ENTRY_COST)
            .unwrap()
            .issue((ID, 0, 0), 100, [1; RECEIPT_LEN]);
        assert!(l.reserve("A", 1).is_err());
        std::thread::sleep(Duration::from_millis(40));
        drop(l.reserve("A", 100 + ENTRY_COST).unwrap());
        assert_eq!(l.held("A"), 0);
    }

    #[test]
    fn a_reservation_counts_at_once_and_returns_what_it_did_not_issue() {
        let l = Ledger::new(1000, Duration::from_secs(3600));
        let mut r = l.reserve("A", 600).unwrap();
        assert!(
            l.reserve("A", 600).is_err(),
            "side-by-side downloads share the bound"
        );
        r.issue((ID, 0, 0), 100, [1; RECEIPT_LEN]);
        drop(r);
        assert_eq!(l.held("A"), 100 + ENTRY_COST);
    }
}
