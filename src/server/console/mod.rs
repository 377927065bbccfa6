//! The web console: static pages embedded in the binary and served at `/`, and the sign-in
//! routes they use. The console is a client of the JSON API (`/v1/...`) with a session cookie in
//! place of a bearer token: it adds no second path to the data, so every scope and role check
//! of `access.rs` applies to it unchanged.
//!
//! The pages are hand-written HTML, CSS and JavaScript under `assets/` (no build step, no
//! library, no network): `include_str!` puts them in the binary. Every value from an endpoint or
//! a snapshot is rendered with `textContent`, never as markup, and the Content-Security-Policy
//! ([`security_headers`]) allows only the console's own script, so injected markup could not run
//! script even if it got in.

mod session;

use axum::extract::Path;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use session::ConsoleState;
pub(crate) use session::{principal, secret};

use super::api::{ApiRoute, Auth, route};
use crate::http::ApiError;

/// The console's routes: its pages (public: they hold no data) and the session.
pub(super) fn routes() -> Vec<ApiRoute> {
    use Auth::{Public, User};
    vec![
        route(Method::GET, "/", Public, index),
        route(Method::GET, "/console/{file}", Public, asset),
        route(Method::POST, "/v1/session", Public, session::sign_in),
        route(Method::GET, "/v1/session", User, session::current),
        route(Method::DELETE, "/v1/session", User, session::sign_out),
    ]
}

/// The console's routes in the OpenAPI document (`super::openapi`).
#[derive(utoipa::OpenApi)]
#[openapi(paths(index, asset, session::sign_in, session::current, session::sign_out))]
pub(super) struct Doc;

/// The embedded files: name, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
];

const INDEX: &str = include_str!("assets/index.html");

/// The web console's page (its script and style come from `/console/{file}`).
#[utoipa::path(
    get,
    path = "/",
    responses((
        status = 200,
        description = "the console's page",
        content_type = "text/html; charset=utf-8",
        body = String
    )),
)]
async fn index() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        INDEX,
    )
        .into_response()
}

/// One of the console's embedded files.
#[utoipa::path(
    get,
    path = "/console/{file}",
    params(("file" = String, Path, description = "the file's name", example = "app.js")),
    responses(
        (
            status = 200,
            description = "the file",
            content(
                (String = "text/javascript; charset=utf-8"),
                (String = "text/css; charset=utf-8"),
            )
        ),
        (status = 404, description = "no console file of that name", body = super::openapi::ErrorBody),
    ),
)]
async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            *body,
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no console file {:?}",
                file.chars().take(80).collect::<String>()
            ),
        )
        .into_response(),
    }
}

/// The Content-Security-Policy of every answer: only the console's own script and style, no
/// inline script, no framing, requests only to this server.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// A layer for every answer of the server: the console's security headers (harmless on JSON),
/// and no caching of anything unless a route says otherwise.
pub async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}
