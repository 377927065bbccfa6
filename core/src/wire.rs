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
}

/// A staged snapshot copy: `POST /v1/snapshots`, `GET /v1/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Staged {
    pub id: String,
    pub size: u64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    /// Events in the copy, counted inside the same read transaction that pinned it.
    pub events: u64,
}

/// `GET /v1/endpoint/size`: what a capture needs to check disk space, without counting events.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbSize {
    pub db_bytes: u64,
    pub disk_free_bytes: u64,
}
