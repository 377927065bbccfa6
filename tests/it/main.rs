//! End-to-end tests: real `snapq` processes on loopback with temp data directories.

mod access;
mod agent;
mod ingest;
mod server;
mod support;
