//! The data formats of ETSI GS QKD 014 v1.1.1, clause 6.
//!
//! Field names are the specification's exactly (`key_ID`, `master_SAE_ID`, ...), hence the
//! `non_snake_case` allowance. Optional members are omitted from the JSON when absent.
//!
//! Request types read tolerantly and mean strictly: members they do not know are kept aside
//! in `unknown` (a server logs and ignores them, as JSON APIs conventionally do, and as real
//! clients need: the QuKayDee build of the QURSA C client names `master_SAE_ID` inside each
//! key ID reference), while what 014 says must not be ignored, `extension_mandatory`, is
//! still refused by the server when it names an extension it does not support. Unknown
//! members are never sent back out (`skip_serializing`).
#![allow(non_snake_case)]

use base64::Engine;
use secret_buf::SecretBuf;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Status data format (clause 6.1): the reply of Get status.
///
/// Sizes are in bits; `max_SAE_ID_count` is how many *additional* slave SAEs a multicast
/// Get key request may name (0 means no multicast).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub source_KME_ID: String,
    pub target_KME_ID: String,
    pub master_SAE_ID: String,
    pub slave_SAE_ID: String,
    pub key_size: u64,
    pub stored_key_count: u64,
    pub max_key_count: u64,
    pub max_key_per_request: u64,
    pub max_key_size: u64,
    pub min_key_size: u64,
    pub max_SAE_ID_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_extension: Option<Map<String, Value>>,
}

/// Key request data format (clause 6.2): the body of Get key by POST.
///
/// `number` defaults to 1 and `size` (bits) to the KME's `key_size` when absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_slave_SAE_IDs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_mandatory: Option<Vec<Map<String, Value>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_optional: Option<Vec<Map<String, Value>>>,
    /// Members 014 does not define (ignored by the server; never serialised).
    #[serde(flatten, skip_serializing)]
    pub unknown: Map<String, Value>,
}

/// One key of a key container: its ID (a UUID) and its bytes in base64.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Key {
    pub key_ID: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ID_extension: Option<Map<String, Value>>,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_extension: Option<Map<String, Value>>,
}

impl std::fmt::Debug for Key {
    /// Never prints the key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("key_ID", &self.key_ID)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl Key {
    /// Decodes the base64 key into bytes that are wiped when dropped.
    pub fn decode(&self) -> Result<SecretBuf, base64::DecodeError> {
        crate::codec::engine()
            .decode(self.key.as_bytes())
            .map(SecretBuf::from)
    }
}

/// Key container data format (clause 6.3): the reply of Get key and Get key with key IDs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyContainer {
    pub keys: Vec<Key>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_container_extension: Option<Map<String, Value>>,
}

/// A key ID reference inside a Key IDs body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIdRef {
    pub key_ID: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ID_extension: Option<Map<String, Value>>,
    /// Members 014 does not define, e.g. QuKayDee's `master_SAE_ID` (ignored by the server;
    /// never serialised).
    #[serde(flatten, skip_serializing)]
    pub unknown: Map<String, Value>,
}

/// Key IDs data format (clause 6.4): the body of Get key with key IDs by POST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIds {
    pub key_IDs: Vec<KeyIdRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_IDs_extension: Option<Map<String, Value>>,
    /// Members 014 does not define (ignored by the server; never serialised).
    #[serde(flatten, skip_serializing)]
    pub unknown: Map<String, Value>,
}

impl KeyIds {
    /// The names of members 014 does not define, at the top level and in each key ID
    /// reference (`key_IDs[3].master_SAE_ID`), for a server's debug log.
    pub fn unknown_members(&self) -> Vec<String> {
        let mut out: Vec<String> = self.unknown.keys().cloned().collect();
        for (i, k) in self.key_IDs.iter().enumerate() {
            out.extend(k.unknown.keys().map(|n| format!("key_IDs[{i}].{n}")));
        }
        out
    }
}

impl KeyIds {
    /// A Key IDs body naming the given key IDs, without extensions.
    pub fn from_ids<I: IntoIterator<Item = S>, S: Into<String>>(ids: I) -> Self {
        KeyIds {
            key_IDs: ids
                .into_iter()
                .map(|id| KeyIdRef {
                    key_ID: id.into(),
                    key_ID_extension: None,
                    unknown: Map::new(),
                })
                .collect(),
            key_IDs_extension: None,
            unknown: Map::new(),
        }
    }
}

/// Error data format (clause 6.5): the body of every 400, 401 and 503 reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Error {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<Map<String, Value>>>,
}

impl Error {
    /// An error with a message only.
    pub fn new(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            details: None,
        }
    }

    /// Adds one `details` entry `{name: value}`.
    pub fn with_detail(mut self, name: &str, value: impl Into<Value>) -> Self {
        let mut entry = Map::new();
        entry.insert(name.to_owned(), value.into());
        self.details.get_or_insert_with(Vec::new).push(entry);
        self
    }
}
