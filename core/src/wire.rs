//! The endpoint API's JSON bodies, shared by the agent that sends them and the server that reads them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `GET /v1/endpoint`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub hostname: String,
    pub ips: Vec<String>,
    pub os: String,
    pub agent_version: String,
    /// The recorder database with its WAL: the most a snapshot copy can take.
    pub db_bytes: u64,
    pub events: BTreeMap<String, u64>,
    pub oldest_ts: Option<i64>,
    pub newest_ts: Option<i64>,
    pub disk_free_bytes: u64,
    /// How the recorder records each event type (`process` → `kernel events` or `polling every
    /// 250 ms`, …); empty for a simulator or an older agent.
    #[serde(default)]
    pub recorder_modes: BTreeMap<String, String>,
}

/// A staged snapshot copy: `POST /v1/snapshots`, `GET /v1/snapshots`, `GET /v1/snapshots/{id}/info`.
///
/// Staging answers as soon as the copy is pinned, with `state: copying`: the copy can be downloaded
/// while the agent still writes it (the download follows the writer). It becomes `ready` when the
/// whole copy is written, hashed, and the image it was copied from passed `PRAGMA quick_check`, or
/// `failed` with the reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Staged {
    /// Also the download's ETag: an id never names other bytes.
    pub id: String,
    /// Known from the pin: the copy's final size.
    pub size: u64,
    pub created_at: DateTime<Utc>,
    pub state: StagedState,
    /// Set once `ready`.
    pub sha256: Option<String>,
    /// Events in the copy, counted inside the same read transaction that pinned it; set once `ready`.
    pub events: Option<u64>,
    /// Why a `failed` staging failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StagedState {
    Copying,
    Ready,
    Failed,
}

/// `GET /v1/endpoint/size`: what a capture needs to check disk space, without counting events.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbSize {
    pub db_bytes: u64,
    pub disk_free_bytes: u64,
}
