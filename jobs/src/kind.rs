//! Job kinds and their queue names: one explicit, constant queue name per kind, so the rows in
//! `queue.db` never depend on a Rust type name.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Every kind of job the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(utoipa::ToSchema)]
pub enum JobKind {
    Capture,
    Ingest,
    Export,
    Delete,
    Fleet,
    /// Does nothing; for benchmarks and tests.
    Noop,
}

impl JobKind {
    pub const ALL: [JobKind; 6] = [
        JobKind::Capture,
        JobKind::Ingest,
        JobKind::Export,
        JobKind::Delete,
        JobKind::Fleet,
        JobKind::Noop,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            JobKind::Capture => "capture",
            JobKind::Ingest => "ingest",
            JobKind::Export => "export",
            JobKind::Delete => "delete",
            JobKind::Fleet => "fleet",
            JobKind::Noop => "noop",
        }
    }

    /// The apalis queue (`Jobs.job_type`) this kind is stored under.
    pub const fn queue_name(self) -> &'static str {
        match self {
            JobKind::Capture => queue_names::CAPTURE,
            JobKind::Ingest => queue_names::INGEST,
            JobKind::Export => queue_names::EXPORT,
            JobKind::Delete => queue_names::DELETE,
            JobKind::Fleet => queue_names::FLEET,
            JobKind::Noop => queue_names::NOOP,
        }
    }

    pub fn from_queue_name(name: &str) -> Option<JobKind> {
        Self::ALL.into_iter().find(|k| k.queue_name() == name)
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let valid: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown job kind {s:?}; valid kinds: {}", valid.join(", "))
            })
    }
}

/// Queue names as stored in `Jobs.job_type`. Never rename one: existing rows carry it.
pub mod queue_names {
    pub const CAPTURE: &str = "snapq.capture";
    pub const INGEST: &str = "snapq.ingest";
    pub const EXPORT: &str = "snapq.export";
    pub const DELETE: &str = "snapq.delete";
    pub const FLEET: &str = "snapq.fleet";
    pub const NOOP: &str = "snapq.noop";
}

/// Typed job arguments: ties an argument struct to its kind, so callers enqueue with
/// `queue.push(&CaptureArgs { .. }, requested_by)` and never build JSON.
pub trait JobArgs: Serialize + DeserializeOwned + Send + 'static {
    const KIND: JobKind;
}

/// Arguments of the `noop` kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NoopArgs {
    #[serde(default)]
    pub n: u64,
}

impl JobArgs for NoopArgs {
    const KIND: JobKind = JobKind::Noop;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_distinct_queue_name_that_round_trips() {
        let mut names: Vec<_> = JobKind::ALL.iter().map(|k| k.queue_name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), JobKind::ALL.len());
        for k in JobKind::ALL {
            assert_eq!(JobKind::from_queue_name(k.queue_name()), Some(k));
            assert_eq!(k.as_str().parse::<JobKind>(), Ok(k));
            assert_eq!(JobKind::ALL[k.index()], k);
        }
        assert!("nope".parse::<JobKind>().unwrap_err().contains("capture"));
    }
}
