//! End-to-end tests: real `snapq` processes on loopback with temp data directories.

mod access;
mod agent;
mod chaos;
mod crash;
mod dropfolder;
mod fleet;
mod hardening;
mod identity;
mod ingest;
mod recorder;
mod server;
mod support;
