//! End-to-end tests: real `snapq` processes on loopback with temp data directories.

mod access;
mod agent;
mod chaos;
mod console;
mod console_browser;
mod crash;
mod dropfolder;
mod export;
mod fleet;
mod hardening;
mod identity;
mod ingest;
mod live;
mod openapi;
mod operability;
mod paging;
mod postgres;
mod recorder;
mod server;
mod support;
mod webdriver;
