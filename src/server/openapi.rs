//! The OpenAPI 3 document of the server API, served at `GET /v1/openapi.json` and committed as
//! `docs/openapi.json`.
//!
//! It is built from the code: each handler carries a `#[utoipa::path]` attribute (its path,
//! parameters, bodies and the answers particular to it) and each route module lists its handlers
//! in a `Doc`. Here the modules' parts are merged, tagged, and completed from the route list
//! itself ([`super::api::routes`]): the security scheme of each route's [`Auth`] and the error
//! answers every route of that kind can give (`{"error": "..."}`, see [`crate::http::ApiError`]).
//! A test keeps the documented paths equal to `api::route_list()` both ways, and the served
//! document equal to the committed file.

use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{self, ContentBuilder, Ref, RefOr, ResponseBuilder};

use super::api::{self, Auth};

/// An error answer: every 4xx and 5xx of the API has this body.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // only its schema is used: `ApiError` writes the body
pub struct ErrorBody {
    /// What went wrong and, where there is one, what to do about it.
    error: String,
}

/// Bytes of a file (an uploaded snapshot, a download).
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // only its schema is used
pub struct Binary(Vec<u8>);

/// The security scheme of user routes: an API token (`snapq tokens create`, or `admin.token`).
const USER_SCHEME: &str = "token";
/// The security scheme of agents' heartbeats: the enroll token's secret, or the agent's credential.
const AGENT_SCHEME: &str = "agent";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "snapq server API",
        description = "The HTTPS API of `snapq serve`: endpoints, live connections, snapshots, uploads, the job queue, exports and evidence, fleet batches and schedules, users, tokens, groups and the audit log. Every error answer is `{\"error\": \"...\"}`.",
        license(name = "Apache-2.0")
    ),
    paths(serve, super::metrics::scrape),
    components(schemas(ErrorBody))
)]
struct Base;

/// The document, built once per process.
pub fn document() -> &'static openapi::OpenApi {
    static DOC: OnceLock<openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(build)
}

/// The document as the committed file holds it: pretty JSON, keys in a stable order, a final
/// newline.
pub fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut text = serde_json::to_string_pretty(document()).expect("the document serializes");
        text.push('\n');
        text
    })
}

fn build() -> openapi::OpenApi {
    let mut doc = Base::openapi();
    doc.paths = openapi::Paths::new();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let parts = [
        ("server", Base::openapi()),
        ("endpoints, snapshots, queue", api::Doc::openapi()),
        ("live connections", super::connections::Doc::openapi()),
        ("agents", super::agents::Doc::openapi()),
        ("quarantine", super::quarantine::Doc::openapi()),
        ("users, tokens, groups, audit", super::admin::Doc::openapi()),
        ("exports and evidence", super::export::doc()),
        ("fleet", super::fleet::Doc::openapi()),
        ("console", super::console::Doc::openapi()),
    ];
    for (tag, mut part) in parts {
        for item in part.paths.paths.values_mut() {
            for op in operations(item) {
                op.tags = Some(vec![tag.to_owned()]);
            }
        }
        // Two modules' types of one name would silently become one schema.
        if let (Some(have), Some(new)) = (&doc.components, &part.components) {
            for (name, schema) in &new.schemas {
                assert!(
                    have.schemas.get(name).is_none_or(|s| s == schema),
                    "two different schemas named {name}: rename one with #[schema(as = ...)]"
                );
            }
        }
        doc.merge(part);
    }
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        USER_SCHEME,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An API token: `snapq tokens create`, or the server's `admin.token`.",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        AGENT_SCHEME,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An agent's credential, or the enroll token's secret for its first heartbeat.",
                ))
                .build(),
        ),
    );
    for (name, _, description) in ERRORS {
        components
            .responses
            .insert(name.to_owned(), error_response(description));
    }
    for route in api::routes() {
        let Some(item) = doc.paths.paths.get_mut(route.path) else {
            continue; // the route-list test names it
        };
        let Some(op) = operation(item, &route.method) else {
            continue;
        };
        complete(op, route.auth);
    }
    doc
}

/// The error answers routes share, as named responses: (name, status, when).
const ERRORS: [(&str, &str, &str); 8] = [
    (
        "BadRequest",
        "400",
        "a malformed request: path, query or body (the message says which)",
    ),
    ("NotJson", "415", "the body is not `application/json`"),
    (
        "WrongFields",
        "422",
        "the JSON body does not have the fields this route takes",
    ),
    (
        "NoToken",
        "401",
        "no token, or a wrong, revoked or expired one",
    ),
    ("Forbidden", "403", "the caller's role may not do this"),
    (
        "NotFound",
        "404",
        "no such target, or one outside the caller's computer groups",
    ),
    (
        "NotAgent",
        "401",
        "no, or a wrong, enroll token or agent credential",
    ),
    (
        "EnrolledElsewhere",
        "409",
        "the hostname is already enrolled by another agent (an admin's `rekey` lets it enroll again)",
    ),
];

/// Adds what every route of its kind shares: the security requirement and the error answers.
fn complete(op: &mut Operation, auth: Auth) {
    let mut errors = vec!["BadRequest"];
    if op
        .request_body
        .as_ref()
        .is_some_and(|b| b.content.contains_key("application/json"))
    {
        errors.extend(["NotJson", "WrongFields"]);
    }
    match auth {
        Auth::Public => op.tags = Some(vec!["server".to_owned()]),
        Auth::Agent => {
            op.security = Some(vec![SecurityRequirement::new(AGENT_SCHEME, [""; 0])]);
            errors.extend(["NotAgent", "EnrolledElsewhere"]);
        }
        Auth::User => {
            op.security = Some(vec![SecurityRequirement::new(USER_SCHEME, [""; 0])]);
            errors.extend(["NoToken", "Forbidden", "NotFound"]);
        }
    }
    for name in errors {
        let (_, status, _) = ERRORS
            .iter()
            .find(|(n, ..)| *n == name)
            .expect("a named error");
        op.responses
            .responses
            .entry((*status).to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    }
}

fn error_response(description: &str) -> RefOr<openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

fn operations(item: &mut openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// The operation of `method` on a path, if documented.
pub fn operation<'a>(
    item: &'a mut openapi::PathItem,
    method: &axum::http::Method,
) -> Option<&'a mut Operation> {
    use axum::http::Method;
    match *method {
        Method::GET => item.get.as_mut(),
        Method::POST => item.post.as_mut(),
        Method::PUT => item.put.as_mut(),
        Method::DELETE => item.delete.as_mut(),
        Method::PATCH => item.patch.as_mut(),
        Method::HEAD => item.head.as_mut(),
        Method::OPTIONS => item.options.as_mut(),
        Method::TRACE => item.trace.as_mut(),
        _ => None,
    }
}

/// This document: the OpenAPI 3 description of the server API; needs no token.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    responses((status = 200, description = "the OpenAPI 3.1 document", body = Object))
)]
pub(super) async fn serve() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document_json(),
    )
        .into_response()
}

/// Every documented operation as (method, path), for the test that compares them with the
/// route list.
pub fn documented() -> Vec<(axum::http::Method, String)> {
    use axum::http::Method;
    let mut out = Vec::new();
    for (path, item) in &document().paths.paths {
        for (method, op) in [
            (Method::GET, &item.get),
            (Method::POST, &item.post),
            (Method::PUT, &item.put),
            (Method::DELETE, &item.delete),
            (Method::PATCH, &item.patch),
            (Method::HEAD, &item.head),
            (Method::OPTIONS, &item.options),
            (Method::TRACE, &item.trace),
        ] {
            if op.is_some() {
                out.push((method, path.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Routes that are served but deliberately left out of the document, with the reason.
    /// (None: agents' heartbeats are documented under their own security scheme.)
    const UNDOCUMENTED: &[(&str, &str, &str)] = &[];

    #[test]
    fn the_document_describes_exactly_the_served_routes() {
        let excluded: BTreeSet<String> = UNDOCUMENTED
            .iter()
            .map(|(m, p, _why)| format!("{m} {p}"))
            .collect();
        let served: BTreeSet<String> = api::route_list()
            .into_iter()
            .map(|(m, p)| format!("{m} {p}"))
            .filter(|r| !excluded.contains(r))
            .collect();
        let documented: BTreeSet<String> = documented()
            .into_iter()
            .map(|(m, p)| format!("{m} {p}"))
            .collect();
        assert_eq!(
            served.difference(&documented).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "routes without a #[utoipa::path] listed in their module's `Doc`"
        );
        assert_eq!(
            documented.difference(&served).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "documented operations the router does not serve"
        );
    }

    #[test]
    fn every_operation_says_who_may_call_it_and_how_it_fails() {
        let doc = document();
        for route in api::routes() {
            let item = doc.paths.paths.get(route.path).unwrap();
            let mut item = item.clone();
            let op = operation(&mut item, &route.method).unwrap();
            let what = format!("{} {}", route.method, route.path);
            let schemes: Vec<String> = op
                .security
                .iter()
                .flatten()
                .map(|s| serde_json::to_string(s).unwrap())
                .collect();
            match route.auth {
                Auth::Public => assert!(schemes.is_empty(), "{what}: {schemes:?}"),
                Auth::User => assert_eq!(schemes, [r#"{"token":[]}"#], "{what}"),
                Auth::Agent => assert_eq!(schemes, [r#"{"agent":[]}"#], "{what}"),
            }
            let codes: Vec<&String> = op.responses.responses.keys().collect();
            assert!(
                codes.iter().any(|c| c.starts_with('2')),
                "{what}: {codes:?}"
            );
            assert!(codes.iter().any(|c| *c == "400"), "{what}: {codes:?}");
            if route.auth == Auth::User {
                for code in ["401", "403", "404"] {
                    assert!(codes.iter().any(|c| *c == code), "{what}: {codes:?}");
                }
            }
        }
    }
}
