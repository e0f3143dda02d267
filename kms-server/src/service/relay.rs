//! Key relay through trusted nodes: keys between SAEs of KMEs without a QKD link between
//! them, carried hop by hop over the links of a path, as in the Tokyo QKD Network and
//! EuroQCI designs.
//!
//! * **Routing** ([`Kme::relay_path`]): breadth-first over the network's links (this KME's
//!   own, whose state it knows, and the others named in `[relay] links`), shortest in hops,
//!   at most `max_hops`, never through a KME of `[relay] forbid`, around own links that are
//!   alarmed or not reconciled and around links a previous try found broken; among equally
//!   short paths, the one whose first link holds the most key. The state and pool levels of
//!   links further away are not known here (no link-state exchange): a broken one is found
//!   by trying it, and routed around.
//! * **Origin** (`Kme::relay_keys`, the master's KME): the keys are drawn from its own
//!   direction of the first link of the path, exactly as for a slave at that linked KME, and
//!   named to the next KME by their ranges ([`Carrier::Link`]). The master gets them only
//!   once the last KME has registered them durably; if a link of the path cannot carry them,
//!   the keys are discarded and the relay tried again on a path around it (twice at most).
//! * **Transit** ([`Kme::relay_in`] at a KME in the middle): it obtains the keys (from its
//!   copy of the link they came over, removing a pad), then takes `len + 32` fresh bytes of
//!   its own direction of the next link, one-time pads the keys with the first `len` and
//!   tags the message with a Wegman–Carter MAC under the last 32 ([`Carrier::Sealed`]). Each
//!   hop's key is consumed once, durably, before anything is sent. A transit KME sees the
//!   keys: it is a trusted node, and says so in its log and metrics.
//! * **Destination** (the slaves' KME): removes the pad, checks the tag, and registers the
//!   keys for the slaves in the `relayed` stream of its pool, durably, before answering.
//!
//! A crash anywhere loses at most the keys in flight: every hop's bytes are consumed on disk
//! before they are used, so none is used twice; the master receives keys only after the
//! destination holds them durably, so every key a master received can be delivered.

use std::collections::{HashMap, HashSet, VecDeque};

use base64::Engine;
use secret_buf::SecretBuf;

use super::keys::KeyOrder;
use super::{IssuedKeys, Kme, KmeError};
use crate::peer::{Carrier, Relay, RelayOutcome, RelayedKey};
use crate::pool::records::{now_unix, KeyBytes};
use crate::pool::store::{Batch, RecordOp};
use crate::pool::{KeyRecord, Readiness, StreamId};

/// Whether a link can carry keys now: reconciled, and not stopped by an alarm.
fn link_usable(l: &crate::pool::LinkState) -> bool {
    l.synced() && !l.perf.is_some_and(|p| p.aborted)
}

/// Tries of a relay on new paths after a link of the path failed.
const ATTEMPTS: usize = 3;

/// Wegman–Carter key bytes per sealed hop.
const MAC_KEY: u64 = wegman_carter::KEY_LEN as u64;

/// Why a relay stopped, and the link to route around if one is to blame.
struct Stop {
    message: String,
    hop: Option<[String; 2]>,
}

impl Stop {
    fn at(a: &str, b: &str, message: String) -> Self {
        Stop {
            message,
            hop: Some([a.to_owned(), b.to_owned()]),
        }
    }

    fn refused(message: impl Into<String>) -> Self {
        Stop {
            message: message.into(),
            hop: None,
        }
    }

    fn outcome(self) -> RelayOutcome {
        RelayOutcome {
            error: Some(self.message),
            broken_hop: self.hop,
        }
    }
}

impl Kme {
    /// Whether this KME may relay keys to KMEs it has no link to.
    pub fn relays(&self) -> bool {
        self.settings.relay.is_some()
    }

    /// Whether this KME's own link to `peer` can carry keys now.
    fn own_link_usable(&self, peer: &str) -> bool {
        self.lock()
            .is_ok_and(|st| st.links.get(peer).is_some_and(link_usable))
    }

    /// This KME's links that can carry keys now, with the key each holds for its masters,
    /// most first (one look at the state).
    fn usable_links(&self) -> Vec<(&str, u64)> {
        let Ok(st) = self.lock() else {
            return Vec::new();
        };
        let mut v: Vec<(&str, u64)> = self
            .settings
            .peers
            .iter()
            .filter_map(|p| {
                let l = st.links.get(&p.kme_id).filter(|l| link_usable(l))?;
                Some((p.kme_id.as_str(), l.own.available()))
            })
            .collect();
        v.sort_by_key(|&(p, held)| (std::cmp::Reverse(held), p));
        v
    }

    /// The shortest path (KME IDs, this one first) to `target` within `max_hops`, through
    /// no forbidden KME, around `avoid` and around own links that cannot carry keys now.
    pub fn relay_path(&self, target: &str, avoid: &[[String; 2]]) -> Result<Vec<String>, KmeError> {
        let Some(relay) = &self.settings.relay else {
            return Err(KmeError::bad_request(format!(
                "no QKD link from KME {} to KME {target}, and this KME does not relay",
                self.kme_id()
            )));
        };
        let me = self.kme_id();
        let avoided = |a: &str, b: &str| {
            avoid
                .iter()
                .any(|h| (h[0] == a && h[1] == b) || (h[0] == b && h[1] == a))
        };
        let mut graph: HashMap<&str, Vec<&str>> = HashMap::new();
        for [a, b] in &relay.links {
            if a != me && b != me && !avoided(a, b) {
                graph.entry(a).or_default().push(b);
                graph.entry(b).or_default().push(a);
            }
        }
        for n in graph.values_mut() {
            n.sort_unstable();
            n.dedup();
        }
        // Among paths of equal length, the one whose first link holds the most key: the
        // breadth-first search meets this KME's neighbours in that order.
        let first: Vec<&str> = self
            .usable_links()
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| !avoided(me, p))
            .collect();
        for &p in &first {
            graph.entry(p).or_default().push(me);
        }
        graph.insert(me, first);
        let forbidden = |k: &str| relay.forbid.iter().any(|f| f == k);
        let mut parent: HashMap<&str, &str> = HashMap::new();
        let mut depth: HashMap<&str, usize> = HashMap::from([(me, 0)]);
        let mut queue = VecDeque::from([me]);
        while let Some(at) = queue.pop_front() {
            if at == target {
                break;
            }
            let d = depth[at];
            if d >= relay.max_hops || (at != me && forbidden(at)) {
                continue;
            }
            for &next in graph.get(at).into_iter().flatten() {
                if depth.contains_key(next) {
                    continue;
                }
                depth.insert(next, d + 1);
                parent.insert(next, at);
                queue.push_back(next);
            }
        }
        if !parent.contains_key(target) {
            let around = if avoid.is_empty() {
                String::new()
            } else {
                format!(
                    " around the broken link(s) {}",
                    avoid
                        .iter()
                        .map(|h| format!("{}-{}", h[0], h[1]))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(KmeError::unavailable(format!(
                "no relay path from KME {me} to KME {target}{around} within {} hops{}",
                relay.max_hops,
                if relay.forbid.is_empty() {
                    String::new()
                } else {
                    format!(" avoiding {}", relay.forbid.join(", "))
                }
            ))
            // Waiting for key does not help: said so, for clients that wait out a 503.
            .detail("relay_path", "none"));
        }
        let mut path = vec![target.to_owned()];
        let mut at = target;
        while let Some(&p) = parent.get(at) {
            path.push(p.to_owned());
            at = p;
        }
        path.reverse();
        Ok(path)
    }

    /// Get key for slaves at `target`, a KME without a link to this one: the keys travel
    /// along a relay path; returned once the last KME holds them (see the module doc).
    pub(super) async fn relay_keys(
        &self,
        order: &KeyOrder<'_>,
        target: &str,
    ) -> Result<IssuedKeys, KmeError> {
        let mut avoid: Vec<[String; 2]> = Vec::new();
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let path = self.relay_path(target, &avoid)?;
            let first = path[1].clone();
            let hop_order = KeyOrder {
                remote: Some(&first),
                ..order.clone()
            };
            let alloc = {
                let mut st = self.lock()?;
                self.allocate(&mut st, &hop_order)?
            };
            self.consumed.notify_waiters();
            self.metrics
                .consumed(&first, order.number * order.key_bytes());
            let msg = Relay {
                relay_id: uuid::Uuid::new_v4(),
                master: order.master.to_owned(),
                slaves: order.remote_slaves.clone(),
                path: path.clone(),
                keys: alloc
                    .registered
                    .iter()
                    .map(|k| RelayedKey {
                        key_id: k.key_id,
                        len: k.len,
                    })
                    .collect(),
                carrier: Carrier::Link {
                    offsets: alloc.registered.iter().map(|k| k.offset).collect(),
                },
            };
            alloc.durable.await?;
            tracing::info!(relay = %msg.relay_id, keys = msg.keys.len(), path = %path.join(" > "), "relaying keys to a KME without a link to this one");
            let peer = self
                .peer(&first)
                .ok_or_else(|| KmeError::unavailable("peer client missing"))?;
            let outcome = match peer.relay(&msg).await {
                Ok(o) => o,
                Err(e) => Stop::at(self.kme_id(), &first, e.to_string()).outcome(),
            };
            match outcome {
                RelayOutcome { error: None, .. } => {
                    self.metrics.relayed("origin", msg.keys.len() as u64);
                    return Ok(alloc.keys);
                }
                RelayOutcome {
                    error: Some(e),
                    broken_hop: Some(hop),
                } => {
                    tracing::warn!(relay = %msg.relay_id, hop = %format!("{}-{}", hop[0], hop[1]), error = %e, "relay path broken; the keys are discarded, trying around the link");
                    last = format!("link {}-{}: {e}", hop[0], hop[1]);
                    avoid.push(hop);
                }
                RelayOutcome { error: Some(e), .. } => {
                    return Err(KmeError::unavailable(format!(
                        "the keys could not be relayed to KME {target} ({e}); nothing was delivered"
                    )));
                }
            }
        }
        Err(KmeError::unavailable(format!(
            "the keys could not be relayed to KME {target} after {ATTEMPTS} paths; last: {last}"
        )))
    }

    /// A relay message from linked KME `from`: obtain the keys, then pass them on or, at the
    /// end of the path, register them for the slaves here.
    pub async fn relay_in(&self, from: &str, msg: Relay) -> RelayOutcome {
        match self.relay_step(from, msg).await {
            Ok(o) => o,
            Err(stop) => stop.outcome(),
        }
    }

    async fn relay_step(&self, from: &str, msg: Relay) -> Result<RelayOutcome, Stop> {
        let at = self.check_relay(from, &msg)?;
        let keys = self.receive_hop(from, &msg).await?;
        if at + 1 == msg.path.len() {
            self.register_relayed(&msg, keys).await?;
            self.metrics.relayed("destination", msg.keys.len() as u64);
            tracing::info!(relay = %msg.relay_id, keys = msg.keys.len(), from = %msg.path[0], "relayed keys registered for their slaves here");
            return Ok(RelayOutcome::default());
        }
        let next = msg.path[at + 1].clone();
        tracing::info!(relay = %msg.relay_id, keys = msg.keys.len(), from = %msg.path[0], to = %msg.path[msg.path.len() - 1], %next, "trusted node: passing relayed keys on (this KME sees them)");
        let sealed = self.seal_hop(&next, &msg, &keys).await?;
        drop(keys);
        let peer = self
            .peer(&next)
            .ok_or_else(|| Stop::refused("peer client missing"))?;
        let outcome = peer
            .relay(&sealed)
            .await
            .map_err(|e| Stop::at(self.kme_id(), &next, e.to_string()))?;
        if outcome.error.is_none() {
            self.metrics.relayed("transit", msg.keys.len() as u64);
        }
        Ok(outcome)
    }

    /// Checks a relay message; returns this KME's position on its path.
    fn check_relay(&self, from: &str, msg: &Relay) -> Result<usize, Stop> {
        let refuse = |m: String| Err(Stop::refused(m));
        let Some(relay) = &self.settings.relay else {
            return refuse(format!("KME {} does not relay keys", self.kme_id()));
        };
        let hops = msg.path.len().saturating_sub(1);
        if hops < 2 || hops > relay.max_hops {
            return refuse(format!(
                "a relay path of {hops} links (this KME allows 2 to {})",
                relay.max_hops
            ));
        }
        let unique: HashSet<&String> = msg.path.iter().collect();
        if unique.len() != msg.path.len() {
            return refuse("the relay path visits a KME twice".into());
        }
        let Some(at) = msg.path.iter().position(|k| k == self.kme_id()) else {
            return refuse(format!("KME {} is not on the relay path", self.kme_id()));
        };
        if at == 0 || msg.path[at - 1] != from {
            return refuse(format!("KME {from} is not the hop before this one"));
        }
        if at + 1 < msg.path.len() && relay.forbid.iter().any(|f| f == self.kme_id()) {
            return refuse(format!(
                "KME {} does not relay keys through itself",
                self.kme_id()
            ));
        }
        if self.homes.get(&msg.master) != Some(&msg.path[0]) {
            return refuse(format!(
                "master SAE {:?} is not attached to KME {}",
                msg.master, msg.path[0]
            ));
        }
        let last = &msg.path[hops];
        if msg.slaves.is_empty() || msg.slaves.iter().any(|s| self.homes.get(s) != Some(last)) {
            return refuse(format!("the slaves are not all attached to KME {last}"));
        }
        let l = &self.settings.limits;
        let ids: HashSet<_> = msg.keys.iter().map(|k| k.key_id).collect();
        if msg.keys.is_empty()
            || ids.len() != msg.keys.len()
            || msg.keys.len() as u64 > l.max_key_per_request
            || msg
                .keys
                .iter()
                .any(|k| k.len == 0 || k.len > l.max_key_size / 8)
        {
            return refuse("the relayed keys are empty, too many, too long or named twice".into());
        }
        let first_hop = at == 1;
        if first_hop != matches!(msg.carrier, Carrier::Link { .. }) {
            return refuse("only the first hop names link ranges".into());
        }
        Ok(at)
    }

    /// The keys' bytes, taken from this KME's copy of the link to `from` (durably consumed
    /// before they are used).
    async fn receive_hop(&self, from: &str, msg: &Relay) -> Result<Vec<SecretBuf>, Stop> {
        let n: u64 = msg.keys.iter().map(|k| k.len).sum();
        let ranges: Vec<(u64, u64)> = match &msg.carrier {
            Carrier::Link { offsets } if offsets.len() == msg.keys.len() => offsets
                .iter()
                .zip(&msg.keys)
                .map(|(&o, k)| (o, k.len))
                .collect(),
            Carrier::Link { .. } => return Err(Stop::refused("one offset per key is needed")),
            Carrier::Sealed { pad_offset, .. } => vec![(*pad_offset, n + MAC_KEY)],
        };
        let needed = ranges
            .iter()
            .map(|r| r.0.saturating_add(r.1))
            .max()
            .unwrap_or(0);
        self.await_stream_end(from, needed).await;
        let stream = StreamId::theirs(from);
        let (taken, durable) = {
            let mut st = self.lock().map_err(|e| Stop::refused(e.body.message))?;
            let link = st
                .links
                .get_mut(from)
                .ok_or_else(|| Stop::refused(format!("no link with KME {from}")))?;
            let taken = link
                .theirs
                .take_many(&ranges)
                .map_err(|e| Stop::at(from, self.kme_id(), e.to_string()))?;
            let mut batch = Batch::default();
            if self.durable() {
                for &(off, len) in &ranges {
                    batch.wipes.push((stream.name(), off, len));
                }
                batch.streams.push((stream.name(), link.theirs.meta()));
            }
            (taken, self.persist(batch))
        };
        durable.await.map_err(|e| Stop::refused(e.body.message))?;
        self.metrics
            .consumed(from, ranges.iter().map(|r| r.1).sum());
        self.consumed.notify_waiters();
        match &msg.carrier {
            Carrier::Link { .. } => Ok(taken),
            Carrier::Sealed {
                pad_offset,
                ciphertext,
                tag,
            } => {
                let pad = taken
                    .into_iter()
                    .next()
                    .ok_or_else(|| Stop::refused("no pad"))?;
                let n = n as usize;
                let ct = base64::engine::general_purpose::STANDARD
                    .decode(ciphertext)
                    .map_err(|_| Stop::refused("ciphertext is not base64"))?;
                let tag = hex::decode(tag).map_err(|_| Stop::refused("tag is not hex"))?;
                if ct.len() != n {
                    return Err(Stop::refused("ciphertext length does not match the keys"));
                }
                wegman_carter::verify(&pad[n..], &msg.mac_input(*pad_offset, &ct), &tag)
                    .map_err(|e| {
                        tracing::warn!(relay = %msg.relay_id, from, error = %e, "relayed keys failed authentication; discarded");
                        Stop::at(from, self.kme_id(), format!("relayed keys failed authentication: {e}"))
                    })?;
                let mut plain = SecretBuf::from(ct);
                for (p, k) in plain.iter_mut().zip(pad.iter()) {
                    *p ^= k;
                }
                let mut keys = Vec::with_capacity(msg.keys.len());
                let mut at = 0;
                for k in &msg.keys {
                    let len = k.len as usize;
                    keys.push(SecretBuf::from(plain[at..at + len].to_vec()));
                    at += len;
                }
                Ok(keys)
            }
        }
    }

    /// The next hop's message: the keys padded and tagged with fresh bytes of this KME's own
    /// direction of the link to `next`, consumed durably first.
    async fn seal_hop(&self, next: &str, msg: &Relay, keys: &[SecretBuf]) -> Result<Relay, Stop> {
        let n: u64 = keys.iter().map(|k| k.len() as u64).sum();
        if !self.peers.contains_key(next) || !self.own_link_usable(next) {
            return Err(Stop::at(
                self.kme_id(),
                next,
                format!(
                    "the QKD link {}-{next} cannot carry keys now (down, alarmed or reconciling)",
                    self.kme_id()
                ),
            ));
        }
        let stream = StreamId::own(next);
        let ((pad_offset, pad), durable) = {
            let mut st = self.lock().map_err(|e| Stop::refused(e.body.message))?;
            let link = st
                .links
                .get_mut(next)
                .ok_or_else(|| Stop::refused(format!("no link with KME {next}")))?;
            let have = link.own.available();
            let Some(mut got) = link.own.allocate(&[n + MAC_KEY]) else {
                return Err(Stop::at(
                    self.kme_id(),
                    next,
                    format!(
                        "not enough key on the link {}-{next}: {} bytes needed, {have} held",
                        self.kme_id(),
                        n + MAC_KEY
                    ),
                ));
            };
            let pad = got.remove(0);
            let mut batch = Batch::default();
            if self.durable() {
                batch.wipes.push((stream.name(), pad.0, n + MAC_KEY));
                batch.streams.push((stream.name(), link.own.meta()));
            }
            (pad, self.persist(batch))
        };
        durable.await.map_err(|e| Stop::refused(e.body.message))?;
        self.metrics.consumed(next, n + MAC_KEY);
        self.consumed.notify_waiters();
        let n = n as usize;
        let mut ct = Vec::with_capacity(n);
        for (b, p) in keys.iter().flat_map(|k| k.iter()).zip(pad.iter()) {
            ct.push(b ^ p);
        }
        let mut out = Relay {
            carrier: Carrier::Sealed {
                pad_offset,
                ciphertext: String::new(),
                tag: String::new(),
            },
            ..msg.clone()
        };
        let tag = wegman_carter::tag(&pad[n..], &out.mac_input(pad_offset, &ct))
            .map_err(|e| Stop::refused(format!("MAC key: {e}")))?;
        out.carrier = Carrier::Sealed {
            pad_offset,
            ciphertext: base64::engine::general_purpose::STANDARD.encode(&ct),
            tag: hex::encode(tag.0),
        };
        Ok(out)
    }

    /// At the end of the path: the keys become records for the slaves here, their bytes in
    /// the `relayed` stream, all in one durable write.
    async fn register_relayed(&self, msg: &Relay, keys: Vec<SecretBuf>) -> Result<(), Stop> {
        let durable = {
            let mut st = self.lock().map_err(|e| Stop::refused(e.body.message))?;
            if msg.keys.iter().any(|k| st.records.contains(&k.key_id)) {
                return Err(Stop::refused("a relayed key ID already exists here"));
            }
            let longest = msg.keys.iter().map(|k| k.len).max().unwrap_or(0);
            st.records
                .check_room(&msg.master, msg.keys.len() as u64, longest)
                .map_err(|e| Stop::refused(e.to_string()))?;
            let mut batch = Batch::default();
            let now = now_unix();
            for (k, bytes) in msg.keys.iter().zip(keys) {
                let offset = st.relayed.end();
                let copy = self.durable().then(|| SecretBuf::from(bytes.to_vec()));
                st.relayed
                    .append(offset, bytes)
                    .map_err(|e| Stop::refused(e.to_string()))?;
                let taken = st
                    .relayed
                    .take_many(&[(offset, k.len)])
                    .map_err(|e| Stop::refused(e.to_string()))?;
                if let Some(copy) = copy {
                    batch.appends.push((StreamId::Relayed.name(), offset, copy));
                }
                let bytes = taken
                    .into_iter()
                    .next()
                    .ok_or_else(|| Stop::refused("relayed bytes vanished"))?;
                let meta = st.records.insert(
                    k.key_id,
                    KeyRecord {
                        master: msg.master.clone(),
                        pending: msg.slaves.clone(),
                        bytes: KeyBytes::Held(bytes),
                        created_unix: now,
                        stream: StreamId::Relayed,
                        offset,
                        readiness: Readiness::Ready,
                    },
                );
                batch
                    .records
                    .extend(meta.map(|m| RecordOp::Put(k.key_id, m)));
            }
            if self.durable() {
                batch
                    .streams
                    .push((StreamId::Relayed.name(), st.relayed.meta()));
            }
            self.persist(batch)
        };
        durable.await.map_err(|e| Stop::refused(e.body.message))
    }
}
