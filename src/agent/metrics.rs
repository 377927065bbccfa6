//! The agent's Prometheus metrics, at `GET /metrics` on the endpoint API (same token as the rest
//! of it): events written per type, the recorder database's size, staging time, and how long
//! the recorder waited for its single writer (what a staging's checkpoint and pin cost it).
//! A `fleet-sim` process shares one set among all its simulated endpoints.

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::{Registry, Unit};
use snapq_jobs::metrics::Labels;

use prometheus_client::metrics::histogram::Histogram;

/// Seconds: a writer wait or hold, 100 µs to 5 s.
const WRITER_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Seconds a staging took until its copy was ready.
const STAGING_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

fn writer_histogram() -> Histogram {
    Histogram::new(WRITER_BUCKETS.iter().copied())
}

fn staging_histogram() -> Histogram {
    Histogram::new(STAGING_BUCKETS.iter().copied())
}

pub struct AgentMetrics {
    events: Family<Labels, Counter>,
    writer_wait: Histogram,
    writer_hold: Histogram,
    staging: Histogram,
}

pub fn metrics() -> &'static AgentMetrics {
    static METRICS: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics {
        events: Family::default(),
        writer_wait: writer_histogram(),
        writer_hold: writer_histogram(),
        staging: staging_histogram(),
    });
    &METRICS
}

impl AgentMetrics {
    /// `n` events of table `table` were committed.
    pub fn written(&self, table: &'static str, n: u64) {
        self.events
            .get_or_create(&vec![("type", table.to_owned())])
            .inc_by(n);
    }

    /// A recorder batch waited this long for the writer.
    pub fn writer_waited(&self, waited: Duration) {
        self.writer_wait.observe(waited.as_secs_f64());
    }

    /// A staging held the writer this long (checkpoint and pin): recorder writes stalled.
    pub fn staging_held_writer(&self, held: Duration) {
        self.writer_hold.observe(held.as_secs_f64());
    }

    /// A staged copy became ready this long after it was asked for.
    pub fn staged(&self, took: Duration) {
        self.staging.observe(took.as_secs_f64());
    }

    /// Every metric as OpenMetrics text; `db` is the recorder database.
    pub fn render(&self, db: &Path) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register(
            "snapq_agent_events_written",
            "Events the recorder committed, by type",
            self.events.clone(),
        );
        registry.register_with_unit(
            "snapq_agent_writer_wait",
            "How long recorder batches waited for the database's single writer",
            Unit::Seconds,
            self.writer_wait.clone(),
        );
        registry.register_with_unit(
            "snapq_agent_staging_writer_hold",
            "How long a staging held the writer to checkpoint and pin (recorder writes stall meanwhile)",
            Unit::Seconds,
            self.writer_hold.clone(),
        );
        registry.register_with_unit(
            "snapq_agent_staging",
            "How long a staged copy took until it was ready",
            Unit::Seconds,
            self.staging.clone(),
        );
        let size: Gauge = Gauge::default();
        size.set(super::staging::db_bytes(db) as i64);
        registry.register_with_unit(
            "snapq_agent_recorder_database",
            "Bytes of the recorder database and its WAL",
            Unit::Bytes,
            size,
        );
        let mut text = String::new();
        encode(&mut text, &registry)?;
        Ok(text)
    }
}
