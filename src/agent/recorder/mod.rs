//! The endpoint recorder: what fills `monitor.db`, the database every live query and snapshot of
//! an endpoint reads.
//!
//! - [`RecorderDb`] owns the database file: it refuses files that are not its own, writes batches
//!   of events through one writer connection, hands out read-only connections, and applies
//!   retention (oldest events first) by size and age.
//! - [`linux`] records the real machine: processes from the kernel's process-events connector and
//!   file changes from fanotify when privileged (else processes by polling `/proc`), TCP/UDP
//!   sockets by polling `/proc/net`, and the login records in `wtmp`/`btmp`.
//! - [`simulator`] writes realistic events of every type at a chosen rate, or prefills history,
//!   for demos, tests, benchmarks and `fleet-sim`.
//!
//! The table and column names come from [`snapq_core::schema`] only.

mod checkpointer;
mod db;
mod handle;
pub mod linux;
pub mod simulator;

use std::sync::Arc;

#[cfg(test)]
pub(crate) use db::incremental_vacuum;
pub use db::{
    Event, IntoValue, Limits, ProcessEnd, RecorderDb, RecorderError, RetentionReport, meta_keys,
};
pub use handle::RecorderHandle;
pub use linux::{
    LinuxConfig, MODES_META_KEY, Modes, spawn_linux_recorder, spawn_linux_recorder_with,
};
pub use simulator::{
    SimConfig, SimOs, prefill, prefill_with, spawn_simulator, spawn_simulator_with,
};

/// The simulator's handle is the same as any recorder's.
pub type SimulatorHandle = RecorderHandle;

/// Which recorder the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecorderKind {
    /// Simulated events at a fixed rate.
    Simulate { events_per_sec: u32 },
    /// The real machine: kernel events when privileged, else polled every `interval`.
    Linux(Box<LinuxConfig>),
}

impl RecorderKind {
    /// The real Linux recorder with its defaults.
    pub fn linux() -> RecorderKind {
        RecorderKind::Linux(Box::new(LinuxConfig::new(linux::DEFAULT_INTERVAL)))
    }
}

/// Starts the chosen recorder writing into `db`; it runs until the handle is stopped or dropped.
pub fn spawn(kind: RecorderKind, db: Arc<RecorderDb>) -> RecorderHandle {
    match kind {
        RecorderKind::Simulate { events_per_sec } => spawn_simulator(db, events_per_sec),
        RecorderKind::Linux(config) => spawn_linux_recorder_with(db, *config),
    }
}
