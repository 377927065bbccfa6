//! What the workers of each job kind do. Handlers read like the story of their job; the errors they
//! return decide the retry (`.transient()` / `.permanent()`), and the queue engine does the rest.

pub mod capture;
pub mod delete;
pub mod fleet;
pub mod ingest;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use snapq_core::catalog::Catalog;
use snapq_core::disk::human_bytes;
use snapq_core::store::Store;

/// What handlers need from the server, built once at start-up.
pub struct Services {
    pub catalog: Catalog,
    pub queue: crate::Queue,
    pub store: Store,
    /// Where rejected files go, each with a `.reason.json` beside it.
    pub quarantine: PathBuf,
    /// How to reach enrolled agents (pinned certificates, derived credentials).
    pub agents: snapq_core::agent_client::Agents,
    pub reservations: Reservations,
    pub capture: CaptureSettings,
    pub ingest: ingest::IngestSettings,
    pub fleet: fleet::FleetSettings,
}

#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// Disk space captures must always leave free on the snapshot store.
    pub reserve_bytes: u64,
    /// Most bytes per second one capture downloads (`None`: as fast as the network goes).
    pub max_bytes_per_sec: Option<u64>,
}

/// Disk space promised to captures in flight, so concurrent captures never overcommit the disk.
#[derive(Debug, Default)]
pub struct Reservations {
    reserved: Arc<Mutex<u64>>,
}

/// Space held for one capture until it is dropped.
#[derive(Debug)]
pub struct Reservation {
    reserved: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        *self.reserved.lock().expect("reservations lock") -= self.bytes;
    }
}

/// Not enough disk for a capture; the message has the numbers and what to do.
#[derive(Debug, thiserror::Error)]
#[error(
    "insufficient disk space for the {hostname} snapshot: need {}, {} free after the {} reserve and {} held by captures in flight; free space or lower the capture reserve",
    human_bytes(*.need), human_bytes(*.available), human_bytes(*.reserve), human_bytes(*.in_flight)
)]
pub struct InsufficientDisk {
    pub hostname: String,
    pub need: u64,
    pub available: u64,
    pub reserve: u64,
    pub in_flight: u64,
}

impl Reservations {
    /// Holds `need` bytes if `free`, minus the reserve and what others hold, covers them.
    pub fn reserve(
        &self,
        hostname: &str,
        need: u64,
        free: u64,
        reserve: u64,
    ) -> Result<Reservation, InsufficientDisk> {
        let mut reserved = self.reserved.lock().expect("reservations lock");
        let available = free.saturating_sub(reserve).saturating_sub(*reserved);
        if need > available {
            return Err(InsufficientDisk {
                hostname: hostname.to_owned(),
                need,
                available,
                reserve,
                in_flight: *reserved,
            });
        }
        *reserved += need;
        Ok(Reservation {
            reserved: self.reserved.clone(),
            bytes: need,
        })
    }

    /// Bytes currently held by captures in flight.
    pub fn held(&self) -> u64 {
        *self.reserved.lock().expect("reservations lock")
    }
}

/// Runs blocking work (SQLite, hashing, file copies) on the blocking pool inside the current
/// tracing span, so what it logs carries the job's id and kind like the rest of the job.
/// Starts at once, like `spawn_blocking`.
pub(crate) fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_overcommit_and_are_returned_on_drop() {
        let r = Reservations::default();
        let a = r.reserve("a", 60, 200, 50).unwrap();
        let err = r.reserve("b", 100, 200, 50).unwrap_err();
        assert_eq!((err.need, err.available, err.in_flight), (100, 90, 60));
        assert!(
            err.to_string()
                .contains("insufficient disk space for the b snapshot")
        );
        drop(a);
        assert_eq!(r.held(), 0);
        let _b = r.reserve("b", 100, 200, 50).unwrap();
        assert_eq!(r.held(), 100);
    }
}
