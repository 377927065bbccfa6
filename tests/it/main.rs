//! End-to-end tests: real `snapq` processes on loopback with temp data directories.

mod agent;
mod hardening;
mod identity;
mod ingest;
mod server;
mod support;
