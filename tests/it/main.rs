//! End-to-end tests: real `snapq` processes on loopback with temp data directories.

mod agent;
mod dropfolder;
mod ingest;
mod recorder;
mod server;
mod support;
