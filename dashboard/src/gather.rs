//! Reading every KME and agent once per sample interval, concurrently, each within
//! [`TIMEOUT`]; one that does not answer is listed as unreachable, never waited for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use dashboard_web::{AgentSample, KmeSample, Unreachable, Update, View, Viewer};
use futures_util::future::join_all;

/// Longest wait for one source per sample.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The KMEs and agents, and the clients that reach them.
pub struct Sources {
    /// mTLS with the user's certificate.
    kme_client: reqwest::Client,
    /// Plain HTTP on the operators' network.
    agent_client: reqwest::Client,
    kmes: Vec<String>,
    agents: Vec<String>,
    /// KME ID → base URL, as the samples say (the eavesdropper switch names a KME by ID).
    urls: Mutex<HashMap<String, String>>,
}

impl Sources {
    pub fn new(
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        kmes: Vec<String>,
        agents: Vec<String>,
    ) -> Result<Self> {
        let identity = mtls::client::ClientIdentity {
            cert_pem: cert,
            key_pem: key,
        };
        let kme_client = mtls::client::builder(ca, Some(identity), TIMEOUT)?
            .timeout(TIMEOUT)
            .build()
            .context("KME client")?;
        let agent_client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .context("agent client")?;
        let trim = |v: Vec<String>| {
            v.into_iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect()
        };
        Ok(Sources {
            kme_client,
            agent_client,
            kmes: trim(kmes),
            agents: trim(agents),
            urls: Mutex::new(HashMap::new()),
        })
    }

    /// Who the certificate is, as the first KME that answers says.
    pub async fn viewer(&self) -> Result<Viewer, String> {
        let mut last = String::from("no KME given");
        for k in &self.kmes {
            match get_json::<View>(&self.kme_client, &format!("{k}/dashboard/api/view")).await {
                Ok(v) => return Ok(v.viewer),
                Err(e) => last = format!("{k}: {e}"),
            }
        }
        Err(last)
    }

    /// Every KME and agent now.
    pub async fn sample(&self) -> Update {
        let kmes = join_all(self.kmes.iter().map(|k| async move {
            let r =
                get_json::<KmeSample>(&self.kme_client, &format!("{k}/dashboard/api/sample")).await;
            (k, r)
        }));
        let agents = join_all(self.agents.iter().map(|a| async move {
            (
                a,
                get_json::<AgentSample>(&self.agent_client, &format!("{a}/jobs")).await,
            )
        }));
        let (kmes, agents) = futures_util::join!(kmes, agents);
        let mut u = Update {
            t_ms: dashboard_web::now_ms(),
            ..Update::default()
        };
        if let Ok(mut urls) = self.urls.lock() {
            for (url, r) in &kmes {
                if let Ok(s) = r {
                    urls.insert(s.kme_id.clone(), (*url).clone());
                }
            }
        }
        sort_replies(kmes, "KME", &mut u.kmes, &mut u.unreachable);
        sort_replies(agents, "site agent", &mut u.agents, &mut u.unreachable);
        u
    }

    /// Passes the eavesdropper switch of the link `kme`–`peer` on to `kme` with the
    /// user's certificate: (status, body) as the KME answered.
    pub async fn switch_eavesdropper(
        &self,
        kme: &str,
        peer: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), String> {
        // The KME by its ID, as the samples found it.
        let url = self
            .urls
            .lock()
            .ok()
            .and_then(|u| u.get(kme).cloned())
            .ok_or_else(|| format!("no reachable KME is {kme}"))?;
        let r = self
            .kme_client
            .post(format!("{url}/admin/v1/links/{peer}/eavesdropper"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        Ok((status, bytes.to_vec()))
    }
}

/// Each source's reply: into `ok`, or as unreachable (named "`what` at URL").
fn sort_replies<T>(
    replies: Vec<(&String, Result<T, String>)>,
    what: &str,
    ok: &mut Vec<T>,
    unreachable: &mut Vec<Unreachable>,
) {
    for (url, r) in replies {
        match r {
            Ok(s) => ok.push(s),
            Err(error) => unreachable.push(Unreachable {
                name: format!("{what} at {url}"),
                error,
            }),
        }
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let r = client.get(url).send().await.map_err(|e| error_text(&e))?;
    let status = r.status();
    if !status.is_success() {
        let body = r.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or(body);
        return Err(format!("{}: {msg}", status.as_u16()));
    }
    r.json::<T>().await.map_err(|e| error_text(&e))
}

/// A reqwest error with its causes, on one line.
fn error_text(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
