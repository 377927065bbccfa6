//! The bridge from exports and evidence to connections and live endpoints: a connection resolves
//! to its target ([`Source`]) through `connections.rs` (scoped, active, counted as activity), and
//! saved events are read through the events engine (`events.rs`), the same one `snapq events`
//! uses.

use snapq_core::access::Role;
use snapq_core::query::Event;

use super::ExportSource;
use super::evidence::EventRef;
use crate::agent::api::EventParams;
use crate::http::ApiError;
use crate::server::ServerState;
use crate::server::access::Access;
use crate::server::connections;
use crate::server::events::{self, Source};

/// The source of an export through a connection, and the endpoint it belongs to.
pub(super) async fn connection_source(
    access: &Access,
    state: &ServerState,
    connection: &str,
) -> Result<(ExportSource, Option<String>), ApiError> {
    let row = access.connection(connection, Role::Operator).await?;
    let (row, source) = connections::usable(state, access, row).await?;
    let id = Some(row.id.to_string());
    let source = match source {
        Source::Snapshot { id: snapshot } => ExportSource::Snapshot {
            id: snapshot,
            connection: id,
        },
        Source::Endpoint { hostname } => ExportSource::Endpoint {
            hostname,
            connection: id,
        },
    };
    Ok((source, Some(row.hostname)))
}

/// Where the events of a connection are read from, and its endpoint.
pub(super) async fn connection_event_source(
    access: &Access,
    state: &ServerState,
    connection: &str,
) -> Result<(String, Source, i64), ApiError> {
    let row = access.connection(connection, Role::Operator).await?;
    let (row, source) = connections::usable(state, access, row).await?;
    Ok((row.hostname.clone(), source, row.id))
}

/// The events `refs` names, every column, in order, read through the events engine; an event
/// that is not there is 404. An agent that stopped answering interrupts `connection`.
pub(super) async fn events_by_id(
    state: &ServerState,
    source: &Source,
    refs: &[EventRef],
    connection: Option<i64>,
) -> Result<Vec<Event>, ApiError> {
    let mut found = Vec::with_capacity(refs.len());
    for r in refs {
        let params = EventParams {
            event_type: Some(r.event_type.to_owned()),
            wheres: vec![format!("id eq {}", r.id)],
            limit: Some("1".into()),
            ..EventParams::default()
        };
        let page = match events::events(state, source, &params).await {
            Ok(page) => page,
            Err(e) => {
                let row = match connection {
                    Some(id) => state.catalog.connection(id).await.ok().flatten(),
                    None => None,
                };
                return Err(match row {
                    Some(row) => connections::engine_error(state, &row, e).await,
                    None => e.into(),
                });
            }
        };
        let event = page.events.into_iter().next().ok_or_else(|| {
            ApiError::not_found(format!(
                "no {} event {} in {}; `snapq events` lists them",
                r.event_type,
                r.id,
                source.describe()
            ))
        })?;
        found.push(event);
    }
    Ok(found)
}
