//! What the queue and its handlers count for Prometheus: attempts and their outcomes, run time,
//! queue wait, capture bytes and throughput, ingest outcomes.
//!
//! The families live for the whole process (one queue per process); the server's `/metrics`
//! registers them with what it reads at scrape time (job counts, disk, connections) and encodes
//! the lot (`src/server/metrics.rs`). Histograms have fixed buckets, so several nodes' series
//! can be summed.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::JobKind;

/// Label sets: a static label name with its value.
pub type Labels = Vec<(&'static str, String)>;
/// A histogram family whose histograms all have the same fixed buckets.
pub type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Seconds a job attempt ran: from 10 ms to an hour.
const RUN_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Seconds a job waited between becoming due and starting.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];
/// Capture throughput in bytes per second: 1 MiB/s to 4 GiB/s.
const THROUGHPUT_BUCKETS: &[f64] = &[
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
    4294967296.0,
];

fn run_histogram() -> Histogram {
    Histogram::new(RUN_BUCKETS.iter().copied())
}
fn wait_histogram() -> Histogram {
    Histogram::new(WAIT_BUCKETS.iter().copied())
}
fn throughput_histogram() -> Histogram {
    Histogram::new(THROUGHPUT_BUCKETS.iter().copied())
}

pub struct JobMetrics {
    attempts: Family<Labels, Counter>,
    outcomes: Family<Labels, Counter>,
    run_seconds: Histograms,
    wait_seconds: Histograms,
    capture_bytes: Counter,
    capture_throughput: Histogram,
    ingests: Family<Labels, Counter>,
}

/// The process's job metrics.
pub fn metrics() -> &'static JobMetrics {
    static METRICS: LazyLock<JobMetrics> = LazyLock::new(|| JobMetrics {
        attempts: Family::default(),
        outcomes: Family::default(),
        run_seconds: Family::new_with_constructor(run_histogram),
        wait_seconds: Family::new_with_constructor(wait_histogram),
        capture_bytes: Counter::default(),
        capture_throughput: throughput_histogram(),
        ingests: Family::default(),
    });
    &METRICS
}

fn kind(kind: JobKind) -> Labels {
    vec![("kind", kind.as_str().to_owned())]
}

impl JobMetrics {
    /// An attempt started after waiting `waited` since it became due.
    pub(crate) fn started(&self, k: JobKind, waited: Duration) {
        self.attempts.get_or_create(&kind(k)).inc();
        self.wait_seconds
            .get_or_create(&kind(k))
            .observe(waited.as_secs_f64());
    }

    /// An attempt ended with `outcome` (`ok`, `transient`, `permanent`, `panicked`, `cancelled`,
    /// `interrupted`, `lost`) after running `ran` (`None`: not seen running here, e.g. an
    /// orphan rescued from a dead process).
    pub(crate) fn ended(&self, k: JobKind, outcome: &str, ran: Option<Duration>) {
        let mut labels = kind(k);
        labels.push(("outcome", outcome.to_owned()));
        self.outcomes.get_or_create(&labels).inc();
        if let Some(ran) = ran {
            self.run_seconds
                .get_or_create(&labels)
                .observe(ran.as_secs_f64());
        }
    }

    /// A capture moved `bytes` from an endpoint in `took`.
    pub fn capture_transferred(&self, bytes: u64, took: Duration) {
        self.capture_bytes.inc_by(bytes);
        if bytes > 0 && !took.is_zero() {
            self.capture_throughput
                .observe(bytes as f64 / took.as_secs_f64());
        }
    }

    /// An ingest ended: `stored`, `duplicate`, `superseded`, `quarantined`.
    pub fn ingest_outcome(&self, outcome: &str) {
        self.ingests
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    /// Adds every family to `registry` (they keep counting; the registry only reads them).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "snapq_job_attempts",
            "Job attempts started, by kind",
            self.attempts.clone(),
        );
        registry.register(
            "snapq_job_attempt_outcomes",
            "Job attempts ended, by kind and outcome (ok, transient, permanent, panicked, cancelled, interrupted, lost)",
            self.outcomes.clone(),
        );
        registry.register_with_unit(
            "snapq_job_run",
            "How long job attempts ran, by kind and outcome",
            Unit::Seconds,
            self.run_seconds.clone(),
        );
        registry.register_with_unit(
            "snapq_job_queue_wait",
            "How long jobs waited between becoming due and starting, by kind",
            Unit::Seconds,
            self.wait_seconds.clone(),
        );
        registry.register_with_unit(
            "snapq_capture",
            "Bytes captures downloaded from endpoints",
            Unit::Bytes,
            self.capture_bytes.clone(),
        );
        registry.register(
            "snapq_capture_throughput_bytes_per_second",
            "Throughput of each capture's transfer",
            self.capture_throughput.clone(),
        );
        registry.register(
            "snapq_ingests",
            "Ingests ended, by outcome (stored, duplicate, superseded, quarantined)",
            self.ingests.clone(),
        );
    }
}
