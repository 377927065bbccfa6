//! snapq-jobs: durable jobs (work in progress).
