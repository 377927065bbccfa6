//! The endpoint recorder: what fills `monitor.db`, the database every live query and snapshot of
//! an endpoint reads.
//!
//! - [`RecorderDb`] owns the database file: it refuses files that are not its own, writes batches
//!   of events through one writer connection, hands out read-only connections, and applies
//!   retention (oldest events first) by size and age.
//! - [`linux`] records the real machine by polling `/proc` (processes, TCP/UDP sockets) and the
//!   login records in `wtmp`/`btmp`.
//! - [`simulator`] writes realistic events of every type at a chosen rate, or prefills history,
//!   for demos, tests, benchmarks and `fleet-sim`.
//!
//! The table and column names come from [`snapq_core::schema`] only.

mod db;
mod handle;
pub mod linux;
pub mod simulator;

use std::sync::Arc;
use std::time::Duration;

pub use db::{
    Event, IntoValue, Limits, ProcessEnd, RecorderDb, RecorderError, RetentionReport, meta_keys,
};
pub use handle::RecorderHandle;
pub use linux::{LinuxConfig, spawn_linux_recorder, spawn_linux_recorder_with};
pub use simulator::{
    SimConfig, SimOs, prefill, prefill_with, spawn_simulator, spawn_simulator_with,
};

/// The simulator's handle is the same as any recorder's.
pub type SimulatorHandle = RecorderHandle;

/// Which recorder the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecorderKind {
    /// Simulated events at a fixed rate.
    Simulate { events_per_sec: u32 },
    /// The real machine, polled every `interval`.
    Linux { interval: Duration },
}

impl RecorderKind {
    /// The real Linux recorder with its default poll interval.
    pub fn linux() -> RecorderKind {
        RecorderKind::Linux {
            interval: linux::DEFAULT_INTERVAL,
        }
    }
}

/// Starts the chosen recorder writing into `db`; it runs until the handle is stopped or dropped.
pub fn spawn(kind: RecorderKind, db: Arc<RecorderDb>) -> RecorderHandle {
    match kind {
        RecorderKind::Simulate { events_per_sec } => spawn_simulator(db, events_per_sec),
        RecorderKind::Linux { interval } => spawn_linux_recorder(db, interval),
    }
}
