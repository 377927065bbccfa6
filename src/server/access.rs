//! Who is asking and what they may touch: the one place where the server API authenticates a
//! caller and decides, for every target a route names, whether the caller may see it and act on it.
//!
//! The story of a request: [`authenticate`] (a layer on every user route) turns the bearer token
//! (or the web console's session cookie, with its CSRF token on changes: `console/session.rs`)
//! into a [`Caller`] (user, role, granted groups) or answers 401 saying why (unknown, revoked,
//! expired, user removed). The handler then takes an [`Access`] or a [`Scoped`] extractor, which
//! resolves the target (endpoint, snapshot, job, ingest, connection, evidence, export) to its
//! endpoint and checks it (a fleet batch or schedule to its computer group, which must be granted
//! to the caller): outside the
//! caller's groups answers 404 with exactly the body of an id that does not exist; inside, but
//! above the caller's role, answers 403 naming the role needed. Listings ask [`Access::visible`]
//! and show only what the caller may see.
//!
//! The backstop: [`authenticate`] also counts whether the request was checked. A request that
//! finishes with a success (or a server error) without any check becomes a 500 and a logged bug,
//! so a new route that forgets its check fails its first test (see the access-table test in
//! `tests/it/access.rs`). A request refused before any check (a 4xx from a body or query
//! extractor) is let through: it did nothing.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use snapq_core::access::{Facts, Role, Scope};
use snapq_core::catalog::{
    ConnectionRow, Endpoint, Evidence, Export, Group, Ingest, Principal, Snapshot, TokenRefusal,
};
use snapq_core::fleet::{Batch, Schedule};
use snapq_jobs::{JobDetail, JobId, JobInfo};

use super::{ServerState, sha256_hex};
use crate::http::ApiError;

/// Who is asking: the holder of a valid token or console session.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    /// The token's id; a console session's id, negated (no token has a negative id).
    pub token_id: i64,
    /// Every endpoint for admins, else the members of the caller's groups.
    pub scope: Scope,
}

/// Set once a route has made an authorization decision about the request.
#[derive(Clone, Default)]
struct Checked(Arc<AtomicBool>);

impl Checked {
    fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn bearer(request: &axum::extract::Request) -> Option<&str> {
    request
        .headers()
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn unauthorized(message: String) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, message).into_response()
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// The principal of a bearer token, or the 401 saying why the token is not accepted.
async fn token_principal(state: &ServerState, token: &str) -> Result<Principal, Response> {
    Ok(match state.catalog.authenticate(&sha256_hex(token)).await {
        Ok(Ok(p)) => p,
        Ok(Err(refusal)) => {
            return Err(unauthorized(match refusal {
                TokenRefusal::Unknown => {
                    "unknown token: check --token / SNAPQ_TOKEN; an admin makes one with `snapq tokens create`".into()
                }
                TokenRefusal::Revoked { when, reason } => format!(
                    "this token was revoked at {}{}; ask an admin for a new one (`snapq tokens create`)",
                    time_text(when),
                    reason.map(|r| format!(" ({r})")).unwrap_or_default()
                ),
                TokenRefusal::Expired { when } => format!(
                    "this token expired at {}; make a new one with `snapq tokens create`",
                    time_text(when)
                ),
                TokenRefusal::UserRemoved { user } => {
                    format!("this token's user {user} was removed; ask an admin for an account")
                }
            }));
        }
        Err(e) => return Err(ApiError::internal(e).into_response()),
    })
}

/// The layer on every user route: authenticates, runs the route, and turns a request that
/// finished without an authorization check into a 500 and a logged bug.
pub async fn authenticate(
    State(state): State<Arc<ServerState>>,
    mut request: axum::extract::Request,
    next: Next,
) -> Response {
    // A bearer token first (the CLI, scripts); else the console's session cookie, which also
    // needs the session's CSRF token on anything that changes something (`console/session.rs`).
    let principal = match (bearer(&request), super::console::secret(request.headers())) {
        (Some(token), _) => token_principal(&state, token).await,
        (None, Some(secret)) => {
            super::console::principal(
                &state,
                &secret,
                request.method(),
                request.headers(),
                request.uri().path(),
            )
            .await
        }
        (None, None) => Err(unauthorized(
            "missing bearer token: send `Authorization: Bearer <token>` (`snapq tokens create` makes one), or sign in to the console"
                .into(),
        )),
    };
    let principal = match principal {
        Ok(p) => p,
        Err(response) => return response,
    };
    let scope = if principal.role == Role::Admin {
        Scope::All
    } else {
        Scope::groups(&principal.groups)
    };
    let checked = Checked::default();
    request.extensions_mut().insert(Arc::new(Caller {
        name: principal.name,
        role: principal.role,
        token_id: principal.token_id,
        scope,
    }));
    request.extensions_mut().insert(checked.clone());
    let route = request.uri().path().to_owned();
    let method = request.method().clone();
    let caller_name = request
        .extensions()
        .get::<Arc<Caller>>()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let response = next.run(request).await;
    if response.status() == StatusCode::FORBIDDEN && method != axum::http::Method::GET {
        // A refused attempt to change something is worth an admin's attention.
        state
            .audit(
                &caller_name,
                "access.denied",
                &format!("{method} {route}"),
                "refused",
                None,
            )
            .await;
    }
    if !checked.0.load(Ordering::Relaxed) && !response.status().is_client_error() {
        tracing::error!(%method, %route, status = %response.status(),
            "BUG: this route answered without an authorization check; add an Access or Scoped extractor");
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {method} {route} made no authorization check (a bug, logged on the server)"),
        )
        .into_response();
    }
    response
}

/// The caller, ready to check targets. Taking this extractor obliges the handler to call one of
/// its checks; the [`authenticate`] layer notices if it does not.
pub struct Access {
    pub caller: Arc<Caller>,
    checked: Checked,
    state: Arc<ServerState>,
}

impl FromRequestParts<Arc<ServerState>> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ServerState>,
    ) -> Result<Self, Self::Rejection> {
        let caller = parts.extensions.get::<Arc<Caller>>().cloned();
        let checked = parts.extensions.get::<Checked>().cloned();
        match (caller, checked) {
            (Some(caller), Some(checked)) => Ok(Access {
                caller,
                checked,
                state: state.clone(),
            }),
            _ => Err(ApiError::internal(
                "a route that takes Access is not behind the authenticate layer",
            )),
        }
    }
}

/// 403 for a caller whose role is below `need`.
fn forbidden(caller: &Caller, need: Role) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "this needs the {need} role; {} is {} {}",
            caller.name,
            if caller.role == Role::Viewer {
                "a"
            } else {
                "an"
            },
            caller.role
        ),
    )
}

impl Access {
    pub fn name(&self) -> &str {
        &self.caller.name
    }

    /// The role check alone, for routes about no endpoint (admin routes, own tokens) and for
    /// listings, which then show only [`Access::visible`] things.
    pub fn require(&self, need: Role) -> Result<(), ApiError> {
        self.checked.mark();
        if self.caller.role < need {
            return Err(forbidden(&self.caller, need));
        }
        Ok(())
    }

    /// The scope check of one endpoint's facts, then the role check. `not_found` is the answer
    /// for an id that does not exist, given also when the endpoint is outside the caller's groups.
    fn decide(
        &self,
        facts: Option<Facts<'_>>,
        need: Role,
        not_found: ApiError,
    ) -> Result<(), ApiError> {
        self.checked.mark();
        match facts {
            Some(f) if self.caller.scope.allows(&f) => {}
            _ => return Err(not_found),
        }
        if self.caller.role < need {
            return Err(forbidden(&self.caller, need));
        }
        Ok(())
    }

    /// A known endpoint by hostname.
    pub async fn endpoint(&self, host: &str, need: Role) -> Result<Endpoint, ApiError> {
        let endpoint = self
            .state
            .catalog
            .endpoint(host)
            .await
            .map_err(ApiError::internal)?;
        self.decide(
            endpoint.as_ref().map(Endpoint::facts),
            need,
            unknown_endpoints(&[host]),
        )?;
        Ok(endpoint.expect("decide refuses a missing endpoint"))
    }

    /// Several known endpoints: all may be reached, or the request names the ones that may not
    /// (unknown and outside the caller's groups alike), or 403 for the role.
    pub async fn endpoints(&self, hosts: &[String], need: Role) -> Result<Vec<Endpoint>, ApiError> {
        self.checked.mark();
        let mut found = Vec::new();
        let mut unknown = Vec::new();
        for host in hosts {
            match self
                .state
                .catalog
                .endpoint(host)
                .await
                .map_err(ApiError::internal)?
            {
                Some(e) if self.caller.scope.allows(&e.facts()) => found.push(e),
                _ => unknown.push(host.as_str()),
            }
        }
        if !unknown.is_empty() {
            return Err(unknown_endpoints(&unknown));
        }
        if self.caller.role < need {
            return Err(forbidden(&self.caller, need));
        }
        Ok(found)
    }

    /// An endpoint that may not be known yet (an upload names its host): its facts if known,
    /// else its hostname alone, are checked.
    pub async fn host(&self, hostname: &str, need: Role) -> Result<(), ApiError> {
        let endpoint = self
            .state
            .catalog
            .endpoint(hostname)
            .await
            .map_err(ApiError::internal)?;
        let facts = match &endpoint {
            Some(e) => e.facts(),
            None => Facts::hostname_only(hostname),
        };
        self.decide(
            Some(facts),
            need,
            ApiError::not_found(format!(
                "no endpoint {hostname:?} in your groups; an admin grants groups with `snapq users grant`"
            )),
        )
    }

    /// A snapshot by id.
    pub async fn snapshot(&self, id: &str, need: Role) -> Result<Snapshot, ApiError> {
        let snap = match id.parse::<i64>() {
            Ok(n) => self
                .state
                .catalog
                .snapshot(n)
                .await
                .map_err(ApiError::internal)?,
            Err(_) => None,
        };
        let facts = match &snap {
            Some(s) => self.facts_of(&s.hostname).await?,
            None => None,
        };
        self.decide(
            facts.as_ref().map(|f| f.as_facts()),
            need,
            unknown_snapshots(&[id]),
        )?;
        Ok(snap.expect("decide refuses a missing snapshot"))
    }

    /// Several snapshots by id, all or nothing, like [`Access::endpoints`].
    pub async fn snapshots(&self, ids: &[i64], need: Role) -> Result<Vec<Snapshot>, ApiError> {
        self.checked.mark();
        let visible = self.visible().await?;
        let mut found = Vec::new();
        let mut unknown = Vec::new();
        for id in ids {
            match self
                .state
                .catalog
                .snapshot(*id)
                .await
                .map_err(ApiError::internal)?
            {
                Some(s) if visible.host(&s.hostname) => found.push(s),
                _ => unknown.push(id.to_string()),
            }
        }
        if !unknown.is_empty() {
            let unknown: Vec<&str> = unknown.iter().map(String::as_str).collect();
            return Err(unknown_snapshots(&unknown));
        }
        if self.caller.role < need {
            return Err(forbidden(&self.caller, need));
        }
        Ok(found)
    }

    /// A live connection by id: it belongs to its endpoint (a snapshot connection to the
    /// snapshot's). Closed connections resolve too (a query on one answers 409, not 404).
    pub async fn connection(&self, id: &str, need: Role) -> Result<ConnectionRow, ApiError> {
        let row = match id.parse::<i64>() {
            Ok(n) => self
                .state
                .catalog
                .connection(n)
                .await
                .map_err(ApiError::internal)?,
            Err(_) => None,
        };
        self.decide(
            row.as_ref().map(ConnectionRow::facts),
            need,
            ApiError::not_found(format!(
                "no connection {}; `snapq live list` shows them",
                short(id)
            )),
        )?;
        Ok(row.expect("decide refuses a missing connection"))
    }

    /// A job by id; a job whose endpoint is unknown is visible to admins only.
    pub async fn job(&self, id: &str, need: Role) -> Result<JobDetail, ApiError> {
        let not_found = || {
            ApiError::not_found(format!(
                "no job {:?}; `snapq queue list` shows the jobs",
                short(id)
            ))
        };
        let detail = match self.state.queue.show(&JobId::from(id)).await {
            Ok(d) => Some(d),
            Err(snapq_jobs::QueueError::NotFound(_)) => None,
            Err(e) => return Err(ApiError::internal(e)),
        };
        let facts = match &detail {
            Some(d) => match self.job_hosts(std::slice::from_ref(&d.job)).await?.pop() {
                Some(Some(host)) => self.facts_of(&host).await?,
                _ if self.caller.role == Role::Admin => Some(OwnedFacts::hostname_only("")),
                _ => None,
            },
            None => None,
        };
        self.decide(facts.as_ref().map(|f| f.as_facts()), need, not_found())?;
        Ok(detail.expect("decide refuses a missing job"))
    }

    /// An ingest by its job id; one whose file name names no endpoint is visible to admins only.
    pub async fn ingest(&self, job_id: &str, need: Role) -> Result<Ingest, ApiError> {
        let not_found = ApiError::not_found(format!("no ingest job {:?}", short(job_id)));
        let ingest = self
            .state
            .catalog
            .ingest(job_id)
            .await
            .map_err(ApiError::internal)?;
        let facts = match &ingest {
            Some(i) => match host_of_name(&i.original_name) {
                Some(host) => self.facts_of(&host).await?,
                None if self.caller.role == Role::Admin => Some(OwnedFacts::hostname_only("")),
                None => None,
            },
            None => None,
        };
        self.decide(facts.as_ref().map(|f| f.as_facts()), need, not_found)?;
        Ok(ingest.expect("decide refuses a missing ingest"))
    }

    /// Saved evidence by id: it belongs to its endpoint (known or not any more).
    pub async fn evidence(&self, id: &str, need: Role) -> Result<Evidence, ApiError> {
        let evidence = match id.parse::<i64>() {
            Ok(n) => self
                .state
                .catalog
                .evidence(n)
                .await
                .map_err(ApiError::internal)?,
            Err(_) => None,
        };
        let facts = match &evidence {
            Some(e) => self.facts_of(&e.hostname).await?,
            None => None,
        };
        let not_found = ApiError::not_found(format!(
            "no evidence {:?}; `snapq evidence list` shows it",
            short(id)
        ));
        self.decide(facts.as_ref().map(|f| f.as_facts()), need, not_found)?;
        Ok(evidence.expect("decide refuses missing evidence"))
    }

    /// An export by id: it belongs to its endpoint, or (an evidence export over several
    /// endpoints) to its requester and admins.
    pub async fn export(&self, id: &str, need: Role) -> Result<Export, ApiError> {
        let export = match id.parse::<i64>() {
            Ok(n) => self
                .state
                .catalog
                .export(n)
                .await
                .map_err(ApiError::internal)?,
            Err(_) => None,
        };
        let facts = match &export {
            Some(Export {
                hostname: Some(host),
                ..
            }) => self.facts_of(host).await?,
            Some(e) if self.caller.role == Role::Admin || e.requested_by == self.caller.name => {
                Some(OwnedFacts::hostname_only(""))
            }
            _ => None,
        };
        let not_found = ApiError::not_found(format!(
            "no export {:?}; `snapq exports list` shows them",
            short(id)
        ));
        // The requester's own multi-endpoint export is theirs whatever their groups.
        let own = export
            .as_ref()
            .is_some_and(|e| e.hostname.is_none() && facts.is_some());
        if own {
            self.require(need)?;
        } else {
            self.decide(facts.as_ref().map(|f| f.as_facts()), need, not_found)?;
        }
        Ok(export.expect("decide refuses a missing export"))
    }

    /// The computer groups granted to the caller by name; `None` for admins (every group).
    /// Checks the viewer role (every user has it).
    pub async fn granted_groups(
        &self,
    ) -> Result<Option<std::collections::HashSet<String>>, ApiError> {
        self.require(Role::Viewer)?;
        if self.caller.role == Role::Admin {
            return Ok(None);
        }
        let user = self
            .state
            .catalog
            .user(&self.caller.name)
            .await
            .map_err(ApiError::internal)?;
        Ok(Some(
            user.map(|u| u.groups.into_iter().collect())
                .unwrap_or_default(),
        ))
    }

    /// Whether the caller may reach a computer group by name: admins every group, others the
    /// groups granted to them. A batch or schedule belongs to its group.
    async fn group_allowed(&self, name: &str) -> Result<bool, ApiError> {
        Ok(match self.granted_groups().await? {
            None => true,
            Some(granted) => granted.contains(name),
        })
    }

    /// A computer group the caller may batch or schedule: an existing group granted to them
    /// (admins: any). Others answer 404 like a missing group.
    pub async fn group(&self, name: &str, need: Role) -> Result<Group, ApiError> {
        let group = self
            .state
            .catalog
            .group(name)
            .await
            .map_err(ApiError::internal)?;
        let allowed = self.group_allowed(name).await?;
        let not_found = ApiError::not_found(format!(
            "no computer group {:?} among your groups; `snapq groups list` (admin) shows them, and an admin grants them with `snapq users grant`",
            short(name)
        ));
        self.decide_by(group.is_some() && allowed, need, not_found)?;
        Ok(group.expect("decide refuses a missing group"))
    }

    /// A fleet batch by id: visible with its group.
    pub async fn batch(&self, id: &str, need: Role) -> Result<Batch, ApiError> {
        let batch = match id.parse::<i64>() {
            Ok(n) => self
                .state
                .catalog
                .batch(n)
                .await
                .map_err(ApiError::internal)?,
            Err(_) => None,
        };
        let allowed = match &batch {
            Some(b) => self.group_allowed(&b.group_name).await?,
            None => false,
        };
        let not_found = ApiError::not_found(format!(
            "no batch {:?}; `snapq fleet list` shows them",
            short(id)
        ));
        self.decide_by(allowed, need, not_found)?;
        Ok(batch.expect("decide refuses a missing batch"))
    }

    /// A schedule by name: visible with its group.
    pub async fn schedule(&self, name: &str, need: Role) -> Result<Schedule, ApiError> {
        let schedule = self
            .state
            .catalog
            .schedule(name)
            .await
            .map_err(ApiError::internal)?;
        let allowed = match &schedule {
            Some(s) => self.group_allowed(&s.group_name).await?,
            None => false,
        };
        let not_found = ApiError::not_found(format!(
            "no schedule {:?}; `snapq schedule list` shows them",
            short(name)
        ));
        self.decide_by(allowed, need, not_found)?;
        Ok(schedule.expect("decide refuses a missing schedule"))
    }

    /// The decision for a target that belongs to a group: outside (or missing) is `not_found`,
    /// then the role.
    fn decide_by(&self, allowed: bool, need: Role, not_found: ApiError) -> Result<(), ApiError> {
        self.checked.mark();
        if !allowed {
            return Err(not_found);
        }
        if self.caller.role < need {
            return Err(forbidden(&self.caller, need));
        }
        Ok(())
    }

    /// For a listing whose rows carry their endpoint's facts: checks the viewer role (every user
    /// has it) and answers whether the caller may see each row.
    pub fn endpoint_filter(&self) -> Result<impl Fn(&Facts<'_>) -> bool + '_, ApiError> {
        self.require(Role::Viewer)?;
        Ok(|facts: &Facts<'_>| self.caller.scope.allows(facts))
    }

    /// What this caller's listings may show. Checks the viewer role (every user has it).
    pub async fn visible(&self) -> Result<Visible, ApiError> {
        self.require(Role::Viewer)?;
        if matches!(self.caller.scope, Scope::All) {
            return Ok(Visible {
                caller: self.caller.clone(),
                known: None,
            });
        }
        let facts = self
            .state
            .catalog
            .endpoint_facts()
            .await
            .map_err(ApiError::internal)?;
        let known = facts
            .into_iter()
            .map(|(hostname, ips, labels)| {
                let allowed = self.caller.scope.allows(&Facts {
                    hostname: &hostname,
                    ips: &ips,
                    labels: &labels,
                });
                (hostname, allowed)
            })
            .collect();
        Ok(Visible {
            caller: self.caller.clone(),
            known: Some(known),
        })
    }

    /// Jobs this caller may see, in their order.
    pub async fn visible_jobs(&self, jobs: Vec<JobInfo>) -> Result<Vec<JobInfo>, ApiError> {
        let visible = self.visible().await?;
        if visible.known.is_none() {
            return Ok(jobs);
        }
        let hosts = self.job_hosts(&jobs).await?;
        Ok(jobs
            .into_iter()
            .zip(hosts)
            .filter(|(_, host)| host.as_deref().is_some_and(|h| visible.host(h)))
            .map(|(job, _)| job)
            .collect())
    }

    /// The endpoint (hostname) each job belongs to: recorded when the API enqueued it, else from
    /// its arguments (an ingest's file name, a capture's or delete's snapshot).
    async fn job_hosts(&self, jobs: &[JobInfo]) -> Result<Vec<Option<String>>, ApiError> {
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let targets = self
            .state
            .catalog
            .job_targets(&ids)
            .await
            .map_err(ApiError::internal)?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let host = match targets.get(job.id.as_str()) {
                Some(h) => Some(h.clone()),
                None => match (
                    job.args["original_name"].as_str(),
                    job.args["snapshot_id"].as_i64(),
                ) {
                    (Some(name), _) => host_of_name(name),
                    (None, Some(id)) => self
                        .state
                        .catalog
                        .snapshot(id)
                        .await
                        .map_err(ApiError::internal)?
                        .map(|s| s.hostname),
                    _ => None,
                },
            };
            out.push(host);
        }
        Ok(out)
    }

    /// The current facts of `hostname`: the known endpoint's, else the hostname alone (an
    /// ingest may name an endpoint before it exists).
    async fn facts_of(&self, hostname: &str) -> Result<Option<OwnedFacts>, ApiError> {
        let endpoint = self
            .state
            .catalog
            .endpoint(hostname)
            .await
            .map_err(ApiError::internal)?;
        Ok(Some(match endpoint {
            Some(e) => OwnedFacts {
                hostname: e.hostname,
                ips: e.ips,
                labels: e.labels,
            },
            None => OwnedFacts::hostname_only(hostname),
        }))
    }
}

struct OwnedFacts {
    hostname: String,
    ips: Vec<String>,
    labels: Vec<String>,
}

impl OwnedFacts {
    fn hostname_only(hostname: &str) -> OwnedFacts {
        OwnedFacts {
            hostname: hostname.to_owned(),
            ips: Vec::new(),
            labels: Vec::new(),
        }
    }

    fn as_facts(&self) -> Facts<'_> {
        Facts {
            hostname: &self.hostname,
            ips: &self.ips,
            labels: &self.labels,
        }
    }
}

/// What a caller's listings may show.
pub struct Visible {
    caller: Arc<Caller>,
    /// `None`: everything. Else whether each known endpoint is in the caller's groups.
    known: Option<HashMap<String, bool>>,
}

impl Visible {
    pub fn host(&self, hostname: &str) -> bool {
        match &self.known {
            None => true,
            Some(known) => match known.get(hostname) {
                Some(allowed) => *allowed,
                None => self.caller.scope.allows(&Facts::hostname_only(hostname)),
            },
        }
    }

    /// Whether the caller sees everything (admins).
    pub fn everything(&self) -> bool {
        self.known.is_none()
    }
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The hostname a snapshot file name carries, if it is a valid name.
fn host_of_name(name: &str) -> Option<String> {
    name.parse::<snapq_core::SnapshotName>()
        .ok()
        .map(|n| n.hostname().to_owned())
}

/// The answer for endpoints that do not exist or are outside the caller's groups (the same).
fn unknown_endpoints(hosts: &[&str]) -> ApiError {
    let hosts: Vec<String> = hosts.iter().map(|h| short(h)).collect();
    ApiError::not_found(format!(
        "unknown endpoint(s): {}; `snapq endpoints search TEXT` lists the ones you can reach",
        hosts.join(", ")
    ))
}

/// The answer for snapshots that do not exist or are outside the caller's groups (the same).
fn unknown_snapshots(ids: &[&str]) -> ApiError {
    let ids: Vec<String> = ids.iter().map(|i| short(i)).collect();
    ApiError::not_found(format!(
        "no snapshot with id {}; `snapq snapshots list` shows them",
        ids.join(", ")
    ))
}

/// The role a [`Scoped`] route needs.
pub trait Need: Send + Sync + 'static {
    const ROLE: Role;
}

/// Viewers and above.
pub struct View;
/// Operators and admins.
pub struct Operate;
/// Admins.
pub struct Administer;

impl Need for View {
    const ROLE: Role = Role::Viewer;
}
impl Need for Operate {
    const ROLE: Role = Role::Operator;
}
impl Need for Administer {
    const ROLE: Role = Role::Admin;
}

/// Something a route names by its one path parameter, resolved to its endpoint and checked.
pub trait Target: Sized + Send {
    fn resolve(
        access: &Access,
        raw: &str,
        need: Role,
    ) -> impl Future<Output = Result<Self, ApiError>> + Send;
}

impl Target for Endpoint {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.endpoint(raw, need).await
    }
}

impl Target for Snapshot {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.snapshot(raw, need).await
    }
}

impl Target for ConnectionRow {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.connection(raw, need).await
    }
}

impl Target for JobDetail {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.job(raw, need).await
    }
}

impl Target for Batch {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.batch(raw, need).await
    }
}

impl Target for Schedule {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.schedule(raw, need).await
    }
}

impl Target for Ingest {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.ingest(raw, need).await
    }
}

impl Target for Evidence {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.evidence(raw, need).await
    }
}

impl Target for Export {
    async fn resolve(access: &Access, raw: &str, need: Role) -> Result<Self, ApiError> {
        access.export(raw, need).await
    }
}

/// The target a route's path names (`{host}`, `{id}`, `{job_id}`), resolved and checked for
/// role `N`: `Scoped<Snapshot, View>` is a snapshot the caller may see.
pub struct Scoped<T, N> {
    pub access: Access,
    pub target: T,
    need: PhantomData<N>,
}

impl<T: Target, N: Need> FromRequestParts<Arc<ServerState>> for Scoped<T, N> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ServerState>,
    ) -> Result<Self, Self::Rejection> {
        let access = Access::from_request_parts(parts, state).await?;
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let target = T::resolve(&access, &raw, N::ROLE).await?;
        Ok(Scoped {
            access,
            target,
            need: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;

    /// The backstop: a route that answers without any authorization check is a 500 (and a logged
    /// bug), while the same route with a check answers normally.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_route_that_forgets_its_check_answers_500_and_one_that_checks_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::server::ServeConfig::with_data_dir(dir.path().to_owned());
        config.listen = "127.0.0.1:0".parse().unwrap();
        let server = crate::server::Server::build(config).await.unwrap();
        let state = server.state().clone();
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();

        async fn forgetful(_access: Access) -> &'static str {
            "everything, unchecked"
        }
        async fn careful(access: Access) -> Result<&'static str, ApiError> {
            access.require(Role::Viewer)?;
            Ok("checked")
        }
        let app: Router = Router::new()
            .route("/forgetful", get(forgetful))
            .route("/careful", get(careful))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                authenticate,
            ))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        snapq_core::agent_client::install_crypto_provider();
        let http = reqwest::Client::new();
        let get = |path: &'static str| {
            http.get(format!("http://{addr}{path}"))
                .bearer_auth(token.trim())
                .send()
        };
        let forgot = get("/forgetful").await.unwrap();
        assert_eq!(forgot.status(), 500);
        let body: serde_json::Value = forgot.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("made no authorization check"),
            "{body}"
        );
        assert_eq!(get("/careful").await.unwrap().status(), 200);
    }
}
