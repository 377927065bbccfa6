//! snapq-core: what the endpoint side, the server and the jobs all need.
//!
//! Snapshot names, the recorder database schema, the filter language and query engine that run on a
//! recorder database (live on an agent or on a stored snapshot), snapshot verification and disk
//! checks, the endpoint API's wire types and the server's client of it, the server's catalog and its
//! snapshot store. It knows nothing of the queue, the HTTP server or the CLI.

pub mod access;
pub mod agent_client;
pub mod catalog;
pub mod disk;
pub mod filter;
pub mod fleet;
pub mod identity;
pub mod name;
pub mod pin;
pub mod query;
pub mod schedule;
pub mod schema;
pub mod store;
pub mod verify;
pub mod wire;
pub mod writers;

pub use name::SnapshotName;
