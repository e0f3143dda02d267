//! Admission: how many uploads or downloads one client, and all clients together, may run
//! at once. A request past a bound is refused at once (429 with the bound named), before any
//! key is fetched or any byte buffered, so a flooding client cannot queue work either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One kind of request ("upload", "download") and its two bounds.
pub struct Gate {
    kind: &'static str,
    per_client: usize,
    total: usize,
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    total: usize,
    by_client: HashMap<String, usize>,
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("SAE {client} already has {running} {kind}s running at this agent (limit {limit} per client, limits.max_{kind}s_per_client); retry when one ends")]
    Client {
        client: String,
        kind: &'static str,
        running: usize,
        limit: usize,
    },
    #[error("this agent already runs {running} {kind}s (limit {limit}, limits.max_{kind}s); retry later")]
    Total {
        kind: &'static str,
        running: usize,
        limit: usize,
    },
}

/// A running request's place; dropping it frees the place.
pub struct Pass {
    gate: Arc<Gate>,
    client: String,
}

impl Gate {
    pub fn new(kind: &'static str, per_client: usize, total: usize) -> Arc<Self> {
        Arc::new(Gate {
            kind,
            per_client,
            total,
            running: Mutex::default(),
        })
    }

    /// A place for one more request of `client`, or why not.
    pub fn enter(self: &Arc<Self>, client: &str) -> Result<Pass, Refused> {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if r.total >= self.total {
            return Err(Refused::Total {
                kind: self.kind,
                running: r.total,
                limit: self.total,
            });
        }
        let mine = r.by_client.get(client).copied().unwrap_or(0);
        if mine >= self.per_client {
            return Err(Refused::Client {
                client: client.to_owned(),
                kind: self.kind,
                running: mine,
                limit: self.per_client,
            });
        }
        r.total += 1;
        *r.by_client.entry(client.to_owned()).or_default() += 1;
        Ok(Pass {
            gate: self.clone(),
            client: client.to_owned(),
        })
    }

    /// Requests running now, in all.
    pub fn running(&self) -> usize {
        self.running.lock().map(|r| r.total).unwrap_or(0)
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut r = self.gate.running.lock().unwrap_or_else(|e| e.into_inner());
        r.total = r.total.saturating_sub(1);
        if let Some(n) = r.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                r.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_bound_is_refused_and_others_are_not() {
        let g = Gate::new("upload", 2, 3);
        let a1 = g.enter("A").unwrap();
        let _a2 = g.enter("A").unwrap();
        assert!(matches!(
            g.enter("A"),
            Err(Refused::Client { running: 2, .. })
        ));
        let _b1 = g.enter("B").unwrap();
        assert!(matches!(
            g.enter("C"),
            Err(Refused::Total { running: 3, .. })
        ));
        drop(a1);
        assert!(g.enter("A").is_ok(), "a freed place is usable again");
        assert_eq!(g.running(), 2);
    }
}
