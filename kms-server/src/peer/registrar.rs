//! Coalescing key registrations towards one peer KME.

use super::messages::{RegisterBatch, Registration};
use super::PeerClient;

type Pending = (
    Registration,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Coalesces concurrent registrations towards one peer into few requests (at most
/// `Registrar::WORKERS` in flight, each carrying whatever queued meanwhile). Each
/// registration still succeeds or fails on its own, all or nothing.
#[derive(Clone)]
pub struct Registrar {
    tx: tokio::sync::mpsc::Sender<Pending>,
}

impl Registrar {
    const WORKERS: usize = 2;
    const MAX_BATCH: usize = 256;

    /// Starts the workers (needs a Tokio runtime).
    pub fn start(client: PeerClient) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel::<Pending>(4096);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..Self::WORKERS {
            let rx = rx.clone();
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut batch = vec![first];
                        while batch.len() < Self::MAX_BATCH {
                            match rx.try_recv() {
                                Ok(p) => batch.push(p),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    let (regs, waiters): (Vec<Registration>, Vec<_>) = batch.into_iter().unzip();
                    match client
                        .register_batch(&RegisterBatch {
                            registrations: regs,
                        })
                        .await
                    {
                        Ok(results) if results.len() == waiters.len() => {
                            for (w, r) in waiters.into_iter().zip(results) {
                                let _ = w.send(r.map_or(Ok(()), Err));
                            }
                        }
                        Ok(_) => {
                            for w in waiters {
                                let _ = w.send(Err(
                                    "peer answered a different number of results".into()
                                ));
                            }
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            for w in waiters {
                                let _ = w.send(Err(msg.clone()));
                            }
                        }
                    }
                }
            });
        }
        Registrar { tx }
    }

    /// Registers keys at the peer; returns only once the peer holds them (or why not).
    pub async fn register(&self, reg: Registration) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((reg, tx))
            .await
            .map_err(|_| "registration queue closed".to_owned())?;
        rx.await
            .unwrap_or_else(|_| Err("registration worker stopped".into()))
    }
}
