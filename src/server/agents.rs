//! Endpoint identity on the server: enrollment and heartbeats (`POST /v1/agents/heartbeat`), and
//! the admin's re-key, forget and enroll-token rotation.
//!
//! The enroll token only admits **new** endpoints: the first heartbeat of an unknown (or re-keyed)
//! hostname, sent with it, binds the hostname to the agent's certificate pin and answers with the
//! agent's credential (see `snapq_core::identity`). Every later heartbeat must carry that
//! credential; the enroll token for an enrolled hostname is a second agent claiming it: 409,
//! audited, and nothing about the endpoint changes. `snapq endpoints rekey HOST` (or `forget`) lets
//! a reimaged machine enroll again; rotating the enroll token leaves enrolled agents alone.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::Method;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use snapq_core::access::Role;
use snapq_core::catalog::Heartbeat;

use super::ServerState;
use super::access::Access;
use super::api::{ApiRoute, Auth};
use crate::agent::enroll::EnrollToken;
use crate::http::{ApiError, bearer, same_secret};

/// Who the audit log names for requests an agent (not a user) makes.
const AGENT_ACTOR: &str = "agent";

/// The OpenAPI description of this module's routes (assembled in [`super::openapi`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(heartbeat, rekey, forget, rotate_enroll_token))]
pub(super) struct Doc;

/// `POST /v1/agents/heartbeat`, authenticated by its own rules (enroll token or credential), and
/// the admin routes, which sit behind the user check like every other user route.
pub(super) fn routes() -> Vec<ApiRoute> {
    use super::api::route as r;
    vec![
        r(Method::POST, "/v1/agents/heartbeat", Auth::Agent, heartbeat),
        r(
            Method::POST,
            "/v1/endpoints/{host}/rekey",
            Auth::User,
            rekey,
        ),
        r(
            Method::POST,
            "/v1/endpoints/{host}/forget",
            Auth::User,
            forget,
        ),
        r(
            Method::POST,
            "/v1/enroll-token/rotate",
            Auth::User,
            rotate_enroll_token,
        ),
    ]
}

async fn audit(
    state: &ServerState,
    actor: &str,
    action: &str,
    target: &str,
    result: &str,
    detail: Option<&str>,
) {
    if let Err(e) = state
        .catalog
        .audit(actor, action, target, result, detail)
        .await
    {
        tracing::warn!(%actor, %action, %target, error = %e, "could not write the audit log");
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// An agent's heartbeat: its facts, and its enrollment the first time (with the enroll token).
#[utoipa::path(
    post,
    path = "/v1/agents/heartbeat",
    request_body = Heartbeat,
    responses(
        (
            status = 200,
            description = "`{\"endpoint_id\"}`; at enrollment also the agent's `credential`",
            body = Object,
        ),
    ),
)]
async fn heartbeat(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Json(hb): Json<Heartbeat>,
) -> Result<Response, ApiError> {
    let Some(given) = bearer(&headers) else {
        return Err(wrong_enroll_token());
    };
    snapq_core::name::validate_hostname(&hb.hostname)
        .map_err(|e| ApiError::bad_request(format!("hostname {:?}: {e}", hb.hostname)))?;
    let host = hb.hostname.as_str();
    let enroll_secret = state.enroll_token().secret;
    let existing = state
        .catalog
        .endpoint(host)
        .await
        .map_err(ApiError::internal)?;
    if let Some(endpoint) = existing.as_ref().filter(|e| e.is_enrolled()) {
        let nonce = endpoint.identity_nonce.as_deref().unwrap_or_default();
        if state.services.agents.key().verify(host, nonce, given) {
            return match state
                .catalog
                .heartbeat(&hb, nonce)
                .await
                .map_err(ApiError::internal)?
            {
                Some(e) => Ok(Json(serde_json::json!({ "endpoint_id": e.id })).into_response()),
                None => Err(stale_credential(host)),
            };
        }
        let claim = format!(
            "claimed from api_url {} with certificate sha256 {}",
            hb.api_url, hb.cert_sha256
        );
        if same_secret(given, &enroll_secret) {
            audit(
                &state,
                AGENT_ACTOR,
                "endpoint.identity_conflict",
                host,
                "refused",
                Some(&claim),
            )
            .await;
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{host} is already enrolled by another agent; if this machine was reimaged, an admin can let it enroll again with `snapq endpoints rekey {host}`"
                ),
            ));
        }
        audit(
            &state,
            AGENT_ACTOR,
            "endpoint.identity_conflict",
            host,
            "refused",
            Some(&format!("wrong credential; {claim}")),
        )
        .await;
        return Err(stale_credential(host));
    }
    if !same_secret(given, &enroll_secret) {
        return Err(wrong_enroll_token());
    }
    enroll(&state, &hb).await
}

/// The first heartbeat of a hostname with no agent bound to it.
async fn enroll(state: &ServerState, hb: &Heartbeat) -> Result<Response, ApiError> {
    let host = hb.hostname.as_str();
    if !is_sha256_hex(&hb.cert_sha256) {
        return Err(ApiError::bad_request(
            "enrollment needs cert_sha256, the sha256 of the agent API's TLS certificate; upgrade the agent",
        ));
    }
    if !hb.api_url.starts_with("https://") {
        return Err(ApiError::bad_request(format!(
            "the agent API must be served over https, not at {:?}",
            hb.api_url
        )));
    }
    let nonce = snapq_core::identity::new_nonce();
    let Some(endpoint) = state
        .catalog
        .enroll(hb, &nonce)
        .await
        .map_err(ApiError::internal)?
    else {
        // Another agent enrolled this hostname between our read and our write.
        audit(
            state,
            AGENT_ACTOR,
            "endpoint.identity_conflict",
            host,
            "refused",
            Some("lost an enrollment race"),
        )
        .await;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{host} is already enrolled by another agent"),
        ));
    };
    audit(
        state,
        AGENT_ACTOR,
        "endpoint.enroll",
        host,
        "ok",
        Some(&format!(
            "api_url {}, certificate sha256 {}",
            hb.api_url, hb.cert_sha256
        )),
    )
    .await;
    let credential = state.services.agents.key().credential(host, &nonce);
    Ok(
        Json(serde_json::json!({ "endpoint_id": endpoint.id, "credential": credential }))
            .into_response(),
    )
}

fn wrong_enroll_token() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "wrong enroll token: start the agent with the content of the server's enroll.token",
    )
}

/// The agent's credential is not (or no longer) the endpoint's: it was re-keyed or forgotten.
fn stale_credential(host: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!(
            "this is not {host}'s credential (the endpoint may have been re-keyed or forgotten); the agent enrolls again with the enroll token"
        ),
    )
}

/// `POST /v1/endpoints/{host}/rekey`: the next enrollment of `host` binds a new agent.
#[utoipa::path(
    post,
    path = "/v1/endpoints/{host}/rekey",
    params(("host" = String, Path, description = "the endpoint's hostname", example = "demo-01")),
    responses((status = 200, description = "`{\"rekeyed\": host}`", body = Object)),
)]
async fn rekey(
    State(state): State<Arc<ServerState>>,
    access: Access,
    Path(host): Path<String>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let found = state
        .catalog
        .rekey_endpoint(&host)
        .await
        .map_err(ApiError::internal)?;
    audit(
        &state,
        access.name(),
        "endpoint.rekey",
        &host,
        if found { "ok" } else { "not found" },
        None,
    )
    .await;
    if !found {
        return Err(unknown_endpoint(&host));
    }
    Ok(Json(serde_json::json!({ "rekeyed": host })).into_response())
}

/// `POST /v1/endpoints/{host}/forget`: drops the agent's binding and address (and the endpoint,
/// unless snapshots belong to it).
#[utoipa::path(
    post,
    path = "/v1/endpoints/{host}/forget",
    params(("host" = String, Path, description = "the endpoint's hostname", example = "demo-01")),
    responses((status = 200, description = "`{\"forgotten\": host}`", body = Object)),
)]
async fn forget(
    State(state): State<Arc<ServerState>>,
    access: Access,
    Path(host): Path<String>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let found = state
        .catalog
        .forget_endpoint(&host)
        .await
        .map_err(ApiError::internal)?;
    audit(
        &state,
        access.name(),
        "endpoint.forget",
        &host,
        if found { "ok" } else { "not found" },
        None,
    )
    .await;
    if !found {
        return Err(unknown_endpoint(&host));
    }
    Ok(Json(serde_json::json!({ "forgotten": host })).into_response())
}

fn unknown_endpoint(host: &str) -> ApiError {
    ApiError::not_found(format!(
        "unknown endpoint {host:?}; `snapq endpoints list` shows them"
    ))
}

/// `POST /v1/enroll-token/rotate`: a new enroll secret (same certificate pin) in `enroll.token`;
/// enrolled agents keep working with their credentials.
#[utoipa::path(
    post,
    path = "/v1/enroll-token/rotate",
    responses(
        (status = 200, description = "`{\"enroll_token\"}`: the new enroll token", body = Object),
    ),
)]
async fn rotate_enroll_token(
    State(state): State<Arc<ServerState>>,
    access: Access,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let token = {
        let mut current = state.enroll_token.write().expect("enroll token lock");
        let token = EnrollToken {
            secret: crate::token::generate(),
            pin: current.pin.clone(),
        };
        crate::token::write_private(&state.layout().enroll_token(), &token.to_string())?;
        *current = token.clone();
        token
    };
    audit(
        &state,
        access.name(),
        "enroll_token.rotate",
        "enroll.token",
        "ok",
        None,
    )
    .await;
    Ok(Json(serde_json::json!({ "enroll_token": token.to_string() })).into_response())
}
