//! The API of who may do what: users, API tokens, computer groups and the audit log.
//!
//! Admin-only except a user's own tokens (any user lists, creates and revokes their own; "tokens
//! of others" are an admin's) and their own password. Every change is audited with its outcome.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use snapq_core::access::{GroupRules, Role};
use snapq_core::catalog::{AuditEntry, AuditFilter, CatalogError, Group, TokenInfo, UserInfo};

use super::ServerState;
use super::access::Access;
use super::api::{ApiRoute, Auth};
use super::openapi::ErrorBody;
use crate::http::ApiError;

/// The OpenAPI description of this module's routes (assembled in [`super::openapi`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list_users,
    add_user,
    show_user,
    remove_user,
    set_role,
    grant,
    revoke,
    set_password,
    list_tokens,
    create_token,
    revoke_token,
    list_groups,
    add_group,
    show_group,
    remove_group,
    audit_list,
    whoami
))]
pub(super) struct Doc;

pub(super) fn routes() -> Vec<ApiRoute> {
    use super::api::route as r;
    use Auth::User;
    vec![
        r(Method::GET, "/v1/users", User, list_users),
        r(Method::POST, "/v1/users", User, add_user),
        r(Method::GET, "/v1/users/{name}", User, show_user),
        r(Method::DELETE, "/v1/users/{name}", User, remove_user),
        r(Method::POST, "/v1/users/{name}/role", User, set_role),
        r(Method::POST, "/v1/users/{name}/groups", User, grant),
        r(
            Method::DELETE,
            "/v1/users/{name}/groups/{group}",
            User,
            revoke,
        ),
        r(
            Method::POST,
            "/v1/users/{name}/password",
            User,
            set_password,
        ),
        r(Method::GET, "/v1/tokens", User, list_tokens),
        r(Method::POST, "/v1/tokens", User, create_token),
        r(Method::DELETE, "/v1/tokens/{id}", User, revoke_token),
        r(Method::GET, "/v1/groups", User, list_groups),
        r(Method::POST, "/v1/groups", User, add_group),
        r(Method::GET, "/v1/groups/{name}", User, show_group),
        r(Method::DELETE, "/v1/groups/{name}", User, remove_group),
        r(Method::GET, "/v1/audit", User, audit_list),
        r(Method::GET, "/v1/whoami", User, whoami),
    ]
}

fn catalog_error(e: CatalogError) -> ApiError {
    match e {
        CatalogError::NotFound(m) => ApiError::not_found(m),
        CatalogError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
        CatalogError::Invalid(m) => ApiError::bad_request(m),
        other => ApiError::internal(other),
    }
}

/// Audits a change with its outcome, then hands the outcome on.
async fn audited<T>(
    state: &ServerState,
    access: &Access,
    action: &str,
    target: &str,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    let target: String = target.chars().take(200).collect();
    match &result {
        Ok(_) => {
            state
                .audit(access.name(), action, &target, "ok", None)
                .await
        }
        Err(e) => {
            state
                .audit(access.name(), action, &target, "refused", Some(&e.message))
                .await
        }
    }
    result
}

// --- users ----------------------------------------------------------------------------------

/// All users with their roles and groups.
#[utoipa::path(
    get,
    path = "/v1/users",
    responses((status = 200, description = "users", body = [UserInfo])),
)]
async fn list_users(
    access: Access,
    State(state): State<Arc<ServerState>>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let users = state.catalog.users().await.map_err(catalog_error)?;
    Ok(Json(users).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewUser {
    /// 1 to 64 letters, digits and `-_.@`, starting with a letter or digit.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$", example = "alice")]
    name: String,
    #[schema(pattern = "^(admin|operator|viewer)$", example = "operator")]
    role: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// Adds a user with a role and computer groups.
#[utoipa::path(
    post,
    path = "/v1/users",
    request_body = NewUser,
    responses(
        (status = 201, description = "the user", body = UserInfo),
        (status = 409, description = "a user of that name exists", body = ErrorBody),
    ),
)]
async fn add_user(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(new): Json<NewUser>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let result = async {
        let role: Role = new
            .role
            .parse()
            .map_err(|e: snapq_core::access::AccessError| ApiError::bad_request(e.to_string()))?;
        state
            .catalog
            .add_user(&new.name, role, &new.groups)
            .await
            .map_err(catalog_error)
    }
    .await;
    let user = audited(&state, &access, "user.add", &new.name, result).await?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

/// A user and their tokens.
#[utoipa::path(
    get,
    path = "/v1/users/{name}",
    params(("name" = String, Path, description = "user name")),
    responses((status = 200, description = "`{\"user\", \"tokens\"}`", body = Object)),
)]
async fn show_user(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let user = state
        .catalog
        .user(&name)
        .await
        .map_err(catalog_error)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no user named {:?}; `snapq users list` shows them",
                name.chars().take(64).collect::<String>()
            ))
        })?;
    let tokens = state
        .catalog
        .tokens(Some(&user.name))
        .await
        .map_err(catalog_error)?;
    Ok(Json(serde_json::json!({ "user": user, "tokens": tokens })).into_response())
}

/// Removes a user; their tokens stop working.
#[utoipa::path(
    delete,
    path = "/v1/users/{name}",
    params(("name" = String, Path, description = "user name")),
    responses(
        (status = 200, description = "`{\"removed\": name}`", body = Object),
        (status = 409, description = "the last admin cannot be removed", body = ErrorBody),
    ),
)]
async fn remove_user(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let result = state
        .catalog
        .remove_user(&name)
        .await
        .map_err(catalog_error);
    audited(&state, &access, "user.remove", &name, result).await?;
    Ok(Json(serde_json::json!({ "removed": name })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct RoleChange {
    role: String,
}

/// Changes a user's role.
#[utoipa::path(
    post,
    path = "/v1/users/{name}/role",
    params(("name" = String, Path, description = "user name")),
    request_body = RoleChange,
    responses(
        (status = 200, description = "`{\"user\", \"role\"}`", body = Object),
        (status = 409, description = "the last admin cannot lose the role", body = ErrorBody),
    ),
)]
async fn set_role(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Json(change): Json<RoleChange>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let result = async {
        let role: Role = change
            .role
            .parse()
            .map_err(|e: snapq_core::access::AccessError| ApiError::bad_request(e.to_string()))?;
        state
            .catalog
            .set_role(&name, role)
            .await
            .map_err(catalog_error)?;
        Ok(role)
    }
    .await;
    let role = audited(
        &state,
        &access,
        "user.role",
        &format!("{name} -> {}", change.role),
        result,
    )
    .await?;
    Ok(Json(serde_json::json!({ "user": name, "role": role })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct GroupGrant {
    group: String,
}

/// Grants a user a computer group.
#[utoipa::path(
    post,
    path = "/v1/users/{name}/groups",
    params(("name" = String, Path, description = "user name")),
    request_body = GroupGrant,
    responses((status = 200, description = "`{\"user\", \"granted\"}`", body = Object)),
)]
async fn grant(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Json(g): Json<GroupGrant>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let result = state
        .catalog
        .grant(&name, &g.group)
        .await
        .map_err(catalog_error);
    audited(
        &state,
        &access,
        "user.grant",
        &format!("{name} + {}", g.group),
        result,
    )
    .await?;
    Ok(Json(serde_json::json!({ "user": name, "granted": g.group })).into_response())
}

/// Revokes a computer group from a user.
#[utoipa::path(
    delete,
    path = "/v1/users/{name}/groups/{group}",
    params(
        ("name" = String, Path, description = "user name"),
        ("group" = String, Path, description = "computer group name"),
    ),
    responses((status = 200, description = "`{\"user\", \"revoked\", \"had_it\"}`", body = Object)),
)]
async fn revoke(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path((name, group)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let result = state
        .catalog
        .revoke_group(&name, &group)
        .await
        .map_err(catalog_error);
    let had = audited(
        &state,
        &access,
        "user.revoke",
        &format!("{name} - {group}"),
        result,
    )
    .await?;
    Ok(Json(serde_json::json!({ "user": name, "revoked": group, "had_it": had })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewPassword {
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
}

/// Longest and shortest console passwords.
const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=1024;

/// Sets a user's console password (argon2id). Admins set anyone's; a user their own.
#[utoipa::path(
    post,
    path = "/v1/users/{name}/password",
    params(("name" = String, Path, description = "user name")),
    request_body = NewPassword,
    responses((status = 200, description = "`{\"user\", \"password\": \"set\"}`", body = Object)),
)]
async fn set_password(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Json(new): Json<NewPassword>,
) -> Result<Response, ApiError> {
    if name != access.name() {
        access.require(Role::Admin)?;
    } else {
        access.require(Role::Viewer)?;
    }
    let result = async {
        if !PASSWORD_LEN.contains(&new.password.chars().count()) {
            return Err(ApiError::bad_request(format!(
                "a password has {} to {} characters",
                PASSWORD_LEN.start(),
                PASSWORD_LEN.end()
            )));
        }
        let password = new.password;
        let phc = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(ApiError::internal)??;
        state
            .catalog
            .set_password_hash(&name, &phc)
            .await
            .map_err(catalog_error)
    }
    .await;
    audited(&state, &access, "user.password", &name, result).await?;
    Ok(Json(serde_json::json!({ "user": name, "password": "set" })).into_response())
}

/// An argon2id PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) with a random salt.
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(ApiError::internal)?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(ApiError::internal)?
        .to_string())
}

/// Whether `password` matches a PHC string made by [`hash_password`].
pub fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc).is_ok_and(|hash| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

// --- tokens ---------------------------------------------------------------------------------

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TokenParams {
    user: Option<String>,
}

/// A user's own tokens; an admin's view of everyone's (or one user's).
#[utoipa::path(
    get,
    path = "/v1/tokens",
    params(TokenParams),
    responses((status = 200, description = "tokens (never their secrets)", body = [TokenInfo])),
)]
async fn list_tokens(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<TokenParams>,
) -> Result<Response, ApiError> {
    let user = match params.user.as_deref() {
        Some(u) if u == access.name() => {
            access.require(Role::Viewer)?;
            Some(u)
        }
        Some(u) => {
            access.require(Role::Admin)?;
            Some(u)
        }
        None if access.caller.role == Role::Admin => {
            access.require(Role::Admin)?;
            None
        }
        None => {
            access.require(Role::Viewer)?;
            Some(access.name())
        }
    };
    let tokens = state.catalog.tokens(user).await.map_err(catalog_error)?;
    Ok(Json(tokens).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewToken {
    user: Option<String>,
    label: Option<String>,
    expires_in_secs: Option<u64>,
}

/// Longest token lifetime: ten years.
const MAX_TOKEN_SECS: u64 = 10 * 366 * 24 * 3600;

/// Makes a token and answers it once; only its sha256 and prefix are kept.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    request_body = NewToken,
    responses(
        (
            status = 201,
            description = "`{\"token\", \"info\"}`: the token, shown this once",
            body = Object,
        ),
    ),
)]
async fn create_token(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(new): Json<NewToken>,
) -> Result<Response, ApiError> {
    let user = new.user.clone().unwrap_or_else(|| access.name().to_owned());
    if user == access.name() {
        access.require(Role::Viewer)?;
    } else {
        access.require(Role::Admin)?;
    }
    let result = async {
        let expires_ms = match new.expires_in_secs {
            None => None,
            Some(s) if (1..=MAX_TOKEN_SECS).contains(&s) => {
                Some(snapq_core::catalog::now_ms() + (s as i64) * 1000)
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "a token expires after 1 second to 10 years",
                ));
            }
        };
        let token = crate::token::generate_api_token();
        let info = state
            .catalog
            .create_token(
                &user,
                new.label.as_deref(),
                &crate::token::api_token_prefix(&token),
                &super::sha256_hex(&token),
                expires_ms,
            )
            .await
            .map_err(catalog_error)?;
        Ok((token, info))
    }
    .await;
    let (token, info) = audited(&state, &access, "token.create", &user, result).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "token": token, "info": info })),
    )
        .into_response())
}

/// Revokes a token: one's own, or (admins) anyone's. Someone else's token is, to a non-admin,
/// a token that does not exist.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    params(("id" = i64, Path, description = "token id")),
    responses((status = 200, description = "the revoked token's id", body = Object)),
)]
async fn revoke_token(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || {
        ApiError::not_found(format!(
            "no token with id {:?}; `snapq tokens list` shows them",
            id.chars().take(40).collect::<String>()
        ))
    };
    let token = match id.parse::<i64>() {
        Ok(n) => state.catalog.token(n).await.map_err(catalog_error)?,
        Err(_) => None,
    };
    match &token {
        Some(t) if t.user == access.name() => access.require(Role::Viewer)?,
        _ if access.caller.role == Role::Admin => access.require(Role::Admin)?,
        _ => {
            access.require(Role::Viewer)?;
            return Err(not_found());
        }
    }
    let result = match token {
        None => Err(not_found()),
        Some(t) => state
            .catalog
            .revoke_token(t.id, &format!("revoked by {}", access.name()))
            .await
            .map_err(catalog_error)
            .map(|revoked| (t, revoked)),
    };
    let (t, revoked) = audited(&state, &access, "token.revoke", &id, result).await?;
    Ok(Json(serde_json::json!({
        "id": t.id, "user": t.user, "revoked": true, "already_revoked": !revoked
    }))
    .into_response())
}

// --- computer groups ------------------------------------------------------------------------

/// Computer groups with their rules and member counts.
#[utoipa::path(
    get,
    path = "/v1/groups",
    responses((status = 200, description = "groups", body = [Object])),
)]
async fn list_groups(
    access: Access,
    State(state): State<Arc<ServerState>>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let groups = state.catalog.groups().await.map_err(catalog_error)?;
    let endpoints = state
        .catalog
        .search_endpoints("")
        .await
        .map_err(catalog_error)?;
    let listed: Vec<serde_json::Value> = groups
        .iter()
        .map(|g| {
            let compiled = g.rules.compile();
            let members = endpoints
                .iter()
                .filter(|e| compiled.matches(&e.facts()))
                .count();
            let mut v = serde_json::to_value(g).expect("a group serializes");
            v["member_count"] = members.into();
            v
        })
        .collect();
    Ok(Json(listed).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewGroup {
    /// 1 to 64 letters, digits and `-_.@`, starting with a letter or digit.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$", example = "web")]
    name: String,
    #[serde(flatten)]
    #[schema(inline)]
    rules: GroupRules,
}

/// Adds a computer group: hostname globs, networks, labels and fixed members.
#[utoipa::path(
    post,
    path = "/v1/groups",
    request_body = NewGroup,
    responses(
        (status = 201, description = "the group", body = Group),
        (status = 409, description = "a group of that name exists", body = ErrorBody),
    ),
)]
async fn add_group(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(new): Json<NewGroup>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let result = state
        .catalog
        .add_group(&new.name, &new.rules)
        .await
        .map_err(catalog_error);
    let group = audited(&state, &access, "group.add", &new.name, result).await?;
    Ok((StatusCode::CREATED, Json(group)).into_response())
}

/// A group with its members now.
#[utoipa::path(
    get,
    path = "/v1/groups/{name}",
    params(("name" = String, Path, description = "computer group name")),
    responses((status = 200, description = "`{\"group\", \"members\"}`", body = Object)),
)]
async fn show_group(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let group = state
        .catalog
        .group(&name)
        .await
        .map_err(catalog_error)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no group named {:?}; `snapq groups list` shows them",
                name.chars().take(64).collect::<String>()
            ))
        })?;
    let members: Vec<serde_json::Value> = state
        .catalog
        .members(&group.rules)
        .await
        .map_err(catalog_error)?
        .iter()
        .map(|e| serde_json::json!({ "hostname": e.hostname, "ips": e.ips, "labels": e.labels }))
        .collect();
    Ok(Json(serde_json::json!({ "group": group, "members": members })).into_response())
}

/// Removes a computer group; users lose it.
#[utoipa::path(
    delete,
    path = "/v1/groups/{name}",
    params(("name" = String, Path, description = "computer group name")),
    responses((status = 200, description = "`{\"removed\": name}`", body = Object)),
)]
async fn remove_group(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    let result = state
        .catalog
        .remove_group(&name)
        .await
        .map_err(catalog_error);
    audited(&state, &access, "group.remove", &name, result).await?;
    Ok(Json(serde_json::json!({ "removed": name })).into_response())
}

// --- audit ----------------------------------------------------------------------------------

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    /// Entries at or after this time (epoch ms).
    since_ms: Option<i64>,
    /// Entries before this time (epoch ms); after `since_ms`.
    until_ms: Option<i64>,
    /// Only what this user did.
    user: Option<String>,
    /// An action (`user.add`) or a family of them (`user`).
    action: Option<String>,
    limit: Option<u32>,
}

/// The audit log, newest first.
#[utoipa::path(
    get,
    path = "/v1/audit",
    params(AuditParams),
    responses((status = 200, description = "audit entries", body = [AuditEntry])),
)]
async fn audit_list(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<AuditParams>,
) -> Result<Response, ApiError> {
    access.require(Role::Admin)?;
    if let (Some(since), Some(until)) = (params.since_ms, params.until_ms)
        && until <= since
    {
        return Err(ApiError::bad_request(format!(
            "empty time window: `until_ms` ({until}) must be after `since_ms` ({since}); `since_ms` is inclusive, `until_ms` exclusive"
        )));
    }
    let entries = state
        .catalog
        .audit_list(&AuditFilter {
            since_ms: params.since_ms,
            until_ms: params.until_ms,
            actor: params.user,
            action: params.action,
            limit: params.limit.unwrap_or(100),
        })
        .await
        .map_err(catalog_error)?;
    Ok(Json(entries).into_response())
}

/// Who the caller is and what the server is like, for `snapq doctor` and scripts: name, role,
/// groups, the token's expiry, the server's version and clock, and its free disk.
#[utoipa::path(
    get,
    path = "/v1/whoami",
    responses(
        (
            status = 200,
            description = "`user`, `role`, `groups`, `token`, `server` (version, time, free disk)",
            body = Object,
        ),
    ),
)]
async fn whoami(
    access: Access,
    State(state): State<Arc<ServerState>>,
) -> Result<Response, ApiError> {
    access.require(Role::Viewer)?;
    let name = access.name().to_owned();
    let user = state.catalog.user(&name).await.map_err(catalog_error)?;
    let token = state
        .catalog
        .tokens(Some(&name))
        .await
        .map_err(catalog_error)?
        .into_iter()
        .find(|t| t.id == access.caller.token_id);
    let free = snapq_core::disk::free_bytes(state.services.store.root()).ok();
    Ok(Json(serde_json::json!({
        "user": name,
        "role": access.caller.role,
        "groups": user.map(|u| u.groups).unwrap_or_default(),
        "token": token,
        "server": {
            "version": env!("CARGO_PKG_VERSION"),
            "time_ms": snapq_core::catalog::now_ms(),
            "free_bytes": free,
            "capture_reserve_bytes": state.config.capture_reserve_bytes,
        },
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_argon2id_with_a_salt_and_verify() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(verify_password("correct horse", &a));
        assert!(!verify_password("correct horse!", &a));
        assert!(!verify_password("correct horse", "not a hash"));
    }
}
