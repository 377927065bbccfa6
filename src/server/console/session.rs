//! Signing in to the web console: username and password (argon2id, set with `snapq users
//! passwd`), a session cookie, CSRF protection and the delay after failed sign-ins.
//!
//! The story: `POST /v1/session` checks the password (after the delay this username has earned
//! by failing), starts a session whose random secret goes to the browser in an `HttpOnly`,
//! `Secure`, `SameSite=Strict` cookie and whose sha256 goes to the catalog, and answers the CSRF
//! token. From then on [`super::super::access::authenticate`] accepts the cookie in place of a
//! bearer token ([`principal`]): the same `Caller`, the same scope checks. A request that changes
//! something (anything but GET and HEAD) with the cookie must carry the CSRF token in
//! `X-CSRF-Token`; the token is derived from the session secret, so it is bound to the session and
//! a page on another site can neither read nor forge it. `DELETE /v1/session` signs out: the row
//! is deleted, so the old cookie is worth nothing even if someone kept it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use snapq_core::access::Role;
use snapq_core::catalog::{Principal, now_ms};

use crate::http::ApiError;
use crate::server::ServerState;
use crate::server::access::Access;

/// The cookie's name. The `__Host-` prefix makes browsers insist on `Secure`, `Path=/` and no
/// `Domain`, so no other host or path can plant or shadow it.
pub const COOKIE: &str = "__Host-snapq_session";
/// The header a cookie-authenticated request that changes something carries the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session ends this long after sign-in whatever happens.
const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A session ends after this long without a request.
const IDLE: Duration = Duration::from_secs(30 * 60);
/// Failures per username that cost nothing; each further attempt waits its turn.
const FREE_FAILURES: u32 = 3;
/// How long failures are remembered.
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Most usernames remembered at once (older ones are forgotten first).
const MAX_TRACKED: usize = 10_000;

/// The delay before the next attempt of a username that has failed `failures` times.
fn delay(failures: u32) -> Duration {
    match failures {
        f if f < FREE_FAILURES => Duration::ZERO,
        f if f < 10 => Duration::from_secs(1),
        _ => Duration::from_secs(5),
    }
}

struct Failures {
    count: u32,
    first: Instant,
    /// When the next attempt may be judged; attempts queue behind each other, so sending many
    /// at once is no faster than sending them one by one.
    next: Instant,
}

/// The console's memory: failed sign-ins per username.
#[derive(Default)]
pub struct ConsoleState {
    failures: Mutex<HashMap<String, Failures>>,
}

impl ConsoleState {
    /// Takes this username's turn: how long to wait before judging the attempt.
    fn turn(&self, user: &str) -> Duration {
        let now = Instant::now();
        let mut map = self.failures.lock().expect("sign-in failures lock");
        if map.len() >= MAX_TRACKED {
            map.retain(|_, f| now.duration_since(f.first) < FAILURE_WINDOW);
        }
        let Some(f) = map.get_mut(user) else {
            return Duration::ZERO;
        };
        if now.duration_since(f.first) >= FAILURE_WINDOW {
            map.remove(user);
            return Duration::ZERO;
        }
        let d = delay(f.count);
        if d.is_zero() {
            return d;
        }
        let at = f.next.max(now) + d;
        f.next = at;
        at.duration_since(now)
    }

    /// Records a failure: the username's failure count in the window.
    fn failed(&self, user: &str) -> u32 {
        let now = Instant::now();
        let mut map = self.failures.lock().expect("sign-in failures lock");
        let f = map.entry(user.to_owned()).or_insert(Failures {
            count: 0,
            first: now,
            next: now,
        });
        f.count += 1;
        f.count
    }

    fn succeeded(&self, user: &str) {
        self.failures
            .lock()
            .expect("sign-in failures lock")
            .remove(user);
    }
}

/// The session secret a request's cookie carries, if any.
pub fn secret(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The CSRF token of a session: derived from its secret, so it needs no storage and is worth
/// nothing without the cookie.
pub fn csrf_token(secret: &str) -> String {
    crate::server::sha256_hex(&format!("snapq-console-csrf\0{secret}"))
}

fn unauthorized(message: &str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, message).into_response()
}

/// The principal of a cookie-authenticated request, for `access::authenticate`: 401 for a
/// session that is unknown, signed out or expired; 403 for a request that changes something
/// without the session's CSRF token (audited).
pub async fn principal(
    state: &ServerState,
    secret: &str,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
) -> Result<Principal, Response> {
    let found = state
        .catalog
        .session(&crate::server::sha256_hex(secret), IDLE.as_millis() as i64)
        .await
        .map_err(|e| ApiError::internal(e).into_response())?;
    let Some((_, principal)) = found else {
        return Err(unauthorized(
            "your console session ended (signed out or expired); sign in again",
        ));
    };
    if *method != Method::GET && *method != Method::HEAD {
        let given = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !crate::http::same_secret(given, &csrf_token(secret)) {
            let what = if given.is_empty() { "missing" } else { "wrong" };
            state
                .audit(
                    &principal.name,
                    "console.csrf",
                    &format!("{method} {path}"),
                    "refused",
                    Some(&format!("{what} CSRF token")),
                )
                .await;
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{what} CSRF token: a console request that changes something must send the session's token in X-CSRF-Token; reload the console"
                ),
            )
            .into_response());
        }
    }
    Ok(principal)
}

fn cookie(secret: &str, max_age: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={secret}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        max_age.as_secs()
    ))
    .expect("a cookie of hex and fixed text")
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(super) struct SignIn {
    username: String,
    password: String,
}

/// A PHC string no password matches, verified when the user does not exist or has no password,
/// so that a wrong username costs as much time as a wrong password.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        crate::server::admin::hash_password(&hex::encode(rand::random::<[u8; 16]>()))
            .unwrap_or_default()
    })
}

/// A request from a page of another origin (the browser says so in `Origin`) is refused.
fn foreign_origin(headers: &HeaderMap) -> bool {
    let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST))
    else {
        return false;
    };
    match (origin.to_str(), host.to_str()) {
        (Ok(origin), Ok(host)) => origin != format!("https://{host}"),
        _ => true,
    }
}

/// What a sign-in answers (beside the session cookie).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // only its schema is used
pub(super) struct SessionStarted {
    user: String,
    /// Send it as `X-CSRF-Token` with every change made with the session cookie.
    csrf_token: String,
    /// When the session ends at the latest (ms since the epoch).
    expires_ms: i64,
}

/// Who is signed in.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // only its schema is used
pub(super) struct SessionInfo {
    user: String,
    #[schema(value_type = String, example = "operator")]
    role: String,
    groups: Vec<String>,
    /// Whether the caller came with the session cookie (else a bearer token).
    session: bool,
    /// The session's CSRF token (`null` for a bearer token, which needs none).
    csrf_token: Option<String>,
}

/// What a sign-out answers.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // only its schema is used
pub(super) struct SignedOut {
    /// Whether a session ended (false for a bearer token or an already ended session).
    signed_out: bool,
}

/// `POST /v1/session {"username", "password"}`: signs in. Public: it is how a browser gets a
/// credential. Every attempt is audited; failures slow down that username's next attempts.
#[utoipa::path(
    post,
    path = "/v1/session",
    request_body = SignIn,
    responses(
        (status = 201, description = "signed in: the session cookie is set", body = SessionStarted),
        (status = 401, description = "wrong username or password", body = crate::server::openapi::ErrorBody),
        (status = 403, description = "sent from a page of another origin", body = crate::server::openapi::ErrorBody),
    ),
)]
pub(super) async fn sign_in(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Json(form): Json<SignIn>,
) -> Result<Response, ApiError> {
    if foreign_origin(&headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "sign-in from a page of another origin refused",
        ));
    }
    let user: String = form.username.trim().chars().take(64).collect();
    let wait = state.console.turn(&user);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let phc = state
        .catalog
        .password_hash(&user)
        .await
        .map_err(ApiError::internal)?;
    let known = phc.is_some();
    let phc = phc.unwrap_or_else(|| decoy_hash().to_owned());
    let password = form.password;
    let matches =
        tokio::task::spawn_blocking(move || crate::server::admin::verify_password(&password, &phc))
            .await
            .map_err(ApiError::internal)?;
    if !(known && matches) {
        let failures = state.console.failed(&user);
        state
            .audit(
                &user,
                "console.signin",
                &user,
                "refused",
                Some(&format!(
                    "wrong username or password ({failures} failure(s) in {} minutes{})",
                    FAILURE_WINDOW.as_secs() / 60,
                    if failures >= FREE_FAILURES {
                        "; next attempts are delayed"
                    } else {
                        ""
                    }
                )),
            )
            .await;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong username or password (an admin sets one with `snapq users passwd NAME`)",
        ));
    }
    state.console.succeeded(&user);
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let expires_ms = now_ms() + LIFETIME.as_millis() as i64;
    let created = state
        .catalog
        .create_session(&user, &crate::server::sha256_hex(&secret), expires_ms)
        .await
        .map_err(ApiError::internal)?;
    if created.is_none() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong username or password",
        ));
    }
    state
        .audit(&user, "console.signin", &user, "ok", None)
        .await;
    let mut response = (
        StatusCode::CREATED,
        Json(serde_json::json!({
            "user": user,
            "csrf_token": csrf_token(&secret),
            "expires_ms": expires_ms,
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie(&secret, LIFETIME));
    Ok(response)
}

/// `GET /v1/session`: who is signed in, their role and groups, and the CSRF token (with a
/// session cookie; a bearer token gets none, since it needs none).
#[utoipa::path(
    get,
    path = "/v1/session",
    responses((status = 200, description = "who is signed in", body = SessionInfo)),
)]
pub(super) async fn current(
    access: Access,
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    access.require(Role::Viewer)?;
    let by_session = access.caller.token_id < 0;
    let csrf = if by_session {
        secret(&headers).map(|s| csrf_token(&s))
    } else {
        None
    };
    let user = state
        .catalog
        .user(access.name())
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({
        "user": access.name(),
        "role": access.caller.role,
        "groups": user.map(|u| u.groups).unwrap_or_default(),
        "session": by_session,
        "csrf_token": csrf,
    }))
    .into_response())
}

/// `DELETE /v1/session`: signs out (the session row is deleted and the cookie cleared).
#[utoipa::path(
    delete,
    path = "/v1/session",
    responses((status = 200, description = "signed out: the cookie is cleared", body = SignedOut)),
)]
pub(super) async fn sign_out(
    access: Access,
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    access.require(Role::Viewer)?;
    let ended = match secret(&headers).filter(|_| access.caller.token_id < 0) {
        Some(secret) => state
            .catalog
            .end_session(&crate::server::sha256_hex(&secret))
            .await
            .map_err(ApiError::internal)?,
        None => false,
    };
    if ended {
        state
            .audit(access.name(), "console.signout", access.name(), "ok", None)
            .await;
    }
    let mut response = Json(serde_json::json!({ "signed_out": ended })).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie("", Duration::ZERO));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others_and_the_csrf_token_is_bound_to_it() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; __Host-snapq_session=abc123; c=d"),
        );
        assert_eq!(secret(&headers).as_deref(), Some("abc123"));
        assert_ne!(csrf_token("abc123"), csrf_token("abc124"));
        assert_eq!(csrf_token("abc123"), csrf_token("abc123"));
    }

    /// The catalog side of a session's end: idle, past its expiry, signed out, or its user
    /// removed; an unknown user gets none.
    #[tokio::test]
    async fn a_session_ends_when_idle_expired_signed_out_or_its_user_is_removed() {
        use snapq_core::catalog::Catalog;
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
        catalog.add_user("ana", Role::Viewer, &[]).await.unwrap();
        let later = now_ms() + 3_600_000;
        let minute = 60_000;
        assert_eq!(
            catalog.create_session("ghost", "s0", later).await.unwrap(),
            None
        );
        catalog
            .create_session("ana", "s1", later)
            .await
            .unwrap()
            .unwrap();
        let (id, who) = catalog.session("s1", minute).await.unwrap().unwrap();
        assert_eq!(
            (who.name.as_str(), who.role, who.token_id),
            ("ana", Role::Viewer, -id)
        );
        // Unused for longer than the idle time: gone, also for a later, longer idle time.
        assert!(catalog.session("s1", -1).await.unwrap().is_none());
        assert!(catalog.session("s1", minute).await.unwrap().is_none());
        catalog
            .create_session("ana", "s2", now_ms() - 1)
            .await
            .unwrap()
            .unwrap();
        assert!(
            catalog.session("s2", minute).await.unwrap().is_none(),
            "expired"
        );
        catalog
            .create_session("ana", "s3", later)
            .await
            .unwrap()
            .unwrap();
        assert!(catalog.end_session("s3").await.unwrap());
        assert!(!catalog.end_session("s3").await.unwrap());
        assert!(
            catalog.session("s3", minute).await.unwrap().is_none(),
            "signed out"
        );
        catalog
            .create_session("ana", "s4", later)
            .await
            .unwrap()
            .unwrap();
        catalog.remove_user("ana").await.unwrap();
        assert!(
            catalog.session("s4", minute).await.unwrap().is_none(),
            "user removed"
        );
    }

    #[test]
    fn failed_sign_ins_cost_nothing_at_first_then_queue_up() {
        let console = ConsoleState::default();
        for _ in 0..FREE_FAILURES {
            assert!(console.turn("eve").is_zero());
            console.failed("eve");
        }
        let first = console.turn("eve");
        let second = console.turn("eve");
        assert!(first >= Duration::from_millis(900), "{first:?}");
        assert!(second >= first + Duration::from_millis(900), "{second:?}");
        assert!(console.turn("bob").is_zero(), "other users are not slowed");
        console.succeeded("eve");
        assert!(console.turn("eve").is_zero());
    }
}
