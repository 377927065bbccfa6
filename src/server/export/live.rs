//! The bridge from exports and evidence to live sources: connections and live endpoints, read
//! through the events engine (`super::super::events`).

use snapq_core::access::Role;
use snapq_core::query::Event;

use super::ExportSource;
use super::evidence::{EventRef, EventSource};
use crate::http::ApiError;
use crate::server::ServerState;
use crate::server::access::Access;

/// The source of an export through a connection, and the endpoint it belongs to.
pub(super) async fn connection_source(
    access: &Access,
    _state: &ServerState,
    connection: &str,
) -> Result<(ExportSource, Option<String>), ApiError> {
    access.require(Role::Operator)?;
    Err(ApiError::not_found(format!(
        "no connection {connection:?}; `snapq live list` shows them"
    )))
}

/// Where the events of a connection are read from, and its endpoint.
pub(super) async fn connection_event_source(
    access: &Access,
    _state: &ServerState,
    connection: &str,
) -> Result<(String, EventSource), ApiError> {
    access.require(Role::Operator)?;
    Err(ApiError::not_found(format!(
        "no connection {connection:?}; `snapq live list` shows them"
    )))
}

/// The events `refs` names, read live from `hostname`'s agent.
pub(super) async fn live_events_by_id(
    _state: &ServerState,
    hostname: &str,
    _refs: &[EventRef],
) -> Result<Vec<Event>, ApiError> {
    Err(ApiError::new(
        axum::http::StatusCode::NOT_IMPLEMENTED,
        format!("saving live events of {hostname} needs the events engine"),
    ))
}
