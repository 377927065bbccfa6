//! Who may do what: users, roles, tokens, computer groups and the scoping of every route, against
//! a real server. The access table walks the router's own route list, so a route added without a
//! row here fails `the_access_table_covers_every_route_for_every_kind_of_caller`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{TestServer, call, eventually, register_unreachable as register};

const INSIDE: &str = "acc-in-01";
const OUTSIDE: &str = "acc-out-01";

/// A request as the bootstrap admin; panics unless it succeeds.
pub(crate) async fn admin(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Value {
    let (status, value) = call(server, Some(&server.token), method, path, body).await;
    assert!(status < 300, "{method} {path}: {status} {value}");
    value
}

async fn token_for(server: &TestServer, user: &str, extra: Value) -> (String, i64) {
    let mut body = json!({ "user": user });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let made = admin(server, "POST", "/v1/tokens", Some(body)).await;
    (
        made["token"].as_str().unwrap().to_owned(),
        made["info"]["id"].as_i64().unwrap(),
    )
}

/// Queues a capture of `host` as admin (its agent is unreachable, so it fails): a fresh
/// snapshot and job of that endpoint. Returns (snapshot id, job id).
async fn fresh_capture(server: &TestServer, host: &str) -> (i64, String) {
    let queued = admin(
        server,
        "POST",
        "/v1/captures",
        Some(json!({ "hosts": [host] })),
    )
    .await;
    (
        queued[0]["snapshot_id"].as_i64().unwrap(),
        queued[0]["job_id"].as_str().unwrap().to_owned(),
    )
}

/// Uploads a real snapshot of `host` as admin and waits for it: (snapshot id, ingest job id).
pub(crate) async fn ingested(
    server: &TestServer,
    dir: &std::path::Path,
    host: &str,
) -> (i64, String) {
    let file = crate::support::snapshot_file(dir, host, 200);
    let name = file.file_name().unwrap().to_str().unwrap().to_owned();
    let response = server
        .client()
        .post(format!("{}/v1/uploads?name={name}", server.url()))
        .bearer_auth(&server.token)
        .body(std::fs::read(&file).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ingest = eventually(Duration::from_secs(30), "the ingest", || async {
        let (_, i) = server.get(&format!("/v1/ingests/{job}")).await;
        (i["state"] != "pending").then_some(i)
    })
    .await;
    assert_eq!(ingest["state"], "complete", "{ingest}");
    (ingest["snapshot_id"].as_i64().unwrap(), job)
}

/// Uploads a file that is not a database, named for `host`, as admin, and waits until it is
/// quarantined: its ingest (and quarantine entry) id.
async fn quarantined(server: &TestServer, host: &str, n: usize) -> String {
    let name = format!(
        "{host}_2026_10_01T10.{:02}.{:02}.000Z.db",
        n / 60 % 60,
        n % 60
    );
    let response = server
        .client()
        .post(format!("{}/v1/uploads?name={name}", server.url()))
        .bearer_auth(&server.token)
        .body(b"not a database".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(Duration::from_secs(30), "the quarantine", || async {
        let (_, i) = server.get(&format!("/v1/ingests/{job}")).await;
        (i["state"] == "quarantined").then_some(())
    })
    .await;
    job
}

/// A server with an inside and an outside endpoint, group `team` holding the inside one, an
/// operator and a viewer granted `team`, and the operator's revoked and expired tokens.
struct World {
    server: TestServer,
    operator: String,
    viewer: String,
    revoked: String,
    expired: String,
    snap: [i64; 2],
    ingest: [String; 2],
    job: [String; 2],
    quarantine: [String; 2],
    export: [i64; 2],
    evidence: [i64; 2],
    /// A fleet batch and a schedule of `team` (inside) and of `others` (outside).
    batch: [i64; 2],
    schedule: [String; 2],
    _tmp: tempfile::TempDir,
}

/// Queues an export of a snapshot as admin: its id.
async fn fresh_export(server: &TestServer, snap: i64) -> i64 {
    let made = admin(
        server,
        "POST",
        "/v1/exports",
        Some(json!({ "snapshot": snap, "format": "csv" })),
    )
    .await;
    made["id"].as_i64().unwrap()
}

/// Saves the first process of a snapshot as evidence, as admin: its id.
async fn fresh_evidence(server: &TestServer, snap: i64) -> i64 {
    let saved = admin(
        server,
        "POST",
        "/v1/evidence",
        Some(json!({ "snapshot": snap, "events": ["process:1"] })),
    )
    .await;
    saved[0]["id"].as_i64().unwrap()
}

async fn world() -> World {
    let server = TestServer::spawn_with(&["--job-max-attempts", "1"]);
    register(&server, INSIDE, "10.9.1.5").await;
    register(&server, OUTSIDE, "10.7.1.5").await;
    admin(
        &server,
        "POST",
        "/v1/groups",
        Some(json!({ "name": "team", "hostnames": ["acc-in-*"] })),
    )
    .await;
    for (name, role) in [("op", "operator"), ("vw", "viewer"), ("owner", "viewer")] {
        admin(
            &server,
            "POST",
            "/v1/users",
            Some(json!({ "name": name, "role": role, "groups": ["team"] })),
        )
        .await;
    }
    let (operator, _) = token_for(&server, "op", json!({ "label": "laptop" })).await;
    let (viewer, _) = token_for(&server, "vw", json!({})).await;
    let (revoked, revoked_id) = token_for(&server, "op", json!({})).await;
    admin(&server, "DELETE", &format!("/v1/tokens/{revoked_id}"), None).await;
    let (expired, _) = token_for(&server, "op", json!({ "expires_in_secs": 1 })).await;
    let tmp = tempfile::tempdir().unwrap();
    let (snap_in, ingest_in) = ingested(&server, tmp.path(), INSIDE).await;
    let (snap_out, ingest_out) = ingested(&server, tmp.path(), OUTSIDE).await;
    let (_, job_in) = fresh_capture(&server, INSIDE).await;
    let (_, job_out) = fresh_capture(&server, OUTSIDE).await;
    let quarantine = [
        quarantined(&server, INSIDE, 0).await,
        quarantined(&server, OUTSIDE, 1).await,
    ];
    let export = [
        fresh_export(&server, snap_in).await,
        fresh_export(&server, snap_out).await,
    ];
    let evidence = [
        fresh_evidence(&server, snap_in).await,
        fresh_evidence(&server, snap_out).await,
    ];
    admin(
        &server,
        "POST",
        "/v1/groups",
        Some(json!({ "name": "others", "hostnames": ["acc-out-*"] })),
    )
    .await;
    let mut batch = [0; 2];
    let mut schedule = [String::new(), String::new()];
    for (side, group) in ["team", "others"].into_iter().enumerate() {
        let b = admin(
            &server,
            "POST",
            "/v1/fleet/batches",
            Some(json!({ "group": group, "expire_secs": 3600 })),
        )
        .await;
        batch[side] = b["batch_id"].as_i64().unwrap();
        schedule[side] = format!("sched-{group}");
        admin(
            &server,
            "POST",
            "/v1/schedules",
            Some(json!({ "name": schedule[side], "cron": "0 3 * * *", "group": group })),
        )
        .await;
    }
    // The expiring token has lived its second by now, or soon.
    eventually(Duration::from_secs(10), "the token to expire", || async {
        let (status, _) = call(&server, Some(&expired), "GET", "/v1/endpoints", None).await;
        (status == 401).then_some(())
    })
    .await;
    World {
        server,
        operator,
        viewer,
        revoked,
        expired,
        snap: [snap_in, snap_out],
        ingest: [ingest_in, ingest_out],
        job: [job_in, job_out],
        quarantine,
        export,
        evidence,
        batch,
        schedule,
        _tmp: tmp,
    }
}

/// What a cell expects: `A` passed authorization (2xx, or 409 for a state the action does not
/// apply to), or exactly this status.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    A,
    S(u16),
}
use Expect::{A, S};

/// The callers of the table, in column order.
const CALLERS: [&str; 8] = [
    "admin",
    "operator inside",
    "operator outside",
    "viewer inside",
    "viewer outside",
    "revoked token",
    "expired token",
    "no token",
];

const X: Expect = S(401);
const N: Expect = S(404);
const F: Expect = S(403);
/// Every user may (their own things, or listings filtered to what they see).
const EVERYONE: [Expect; 8] = [A, A, A, A, A, X, X, X];
/// Viewer and above, inside their groups.
const VIEW: [Expect; 8] = [A, A, N, A, N, X, X, X];
/// Operator and above, inside their groups.
const OPERATE: [Expect; 8] = [A, A, N, F, N, X, X, X];
/// Admins only.
const ADMIN: [Expect; 8] = [A, F, F, F, F, X, X, X];

fn table() -> Vec<(&'static str, &'static str, [Expect; 8])> {
    vec![
        ("GET", "/status", [S(200); 8]),
        ("GET", "/v1/openapi.json", [S(200); 8]),
        ("POST", "/v1/agents/heartbeat", [X; 8]),
        ("GET", "/v1/endpoints", EVERYONE),
        ("GET", "/v1/endpoints/{host}", VIEW),
        ("POST", "/v1/captures", OPERATE),
        ("GET", "/v1/snapshots", EVERYONE),
        ("GET", "/v1/snapshots/summary", EVERYONE),
        ("GET", "/v1/snapshots/{id}", VIEW),
        ("GET", "/v1/snapshots/{id}/file", VIEW),
        ("POST", "/v1/snapshots/delete", OPERATE),
        ("POST", "/v1/uploads", OPERATE),
        ("GET", "/v1/ingests/{job_id}", VIEW),
        ("GET", "/v1/queue/status", EVERYONE),
        ("GET", "/v1/queue/jobs", EVERYONE),
        ("GET", "/v1/queue/jobs/{id}", VIEW),
        ("POST", "/v1/queue/jobs/{id}/retry", OPERATE),
        ("POST", "/v1/queue/jobs/{id}/cancel", OPERATE),
        ("GET", "/v1/users", ADMIN),
        ("POST", "/v1/users", ADMIN),
        ("GET", "/v1/users/{name}", ADMIN),
        ("DELETE", "/v1/users/{name}", ADMIN),
        ("POST", "/v1/users/{name}/role", ADMIN),
        ("POST", "/v1/users/{name}/groups", ADMIN),
        ("DELETE", "/v1/users/{name}/groups/{group}", ADMIN),
        ("POST", "/v1/users/{name}/password", ADMIN),
        ("GET", "/v1/tokens", EVERYONE),
        ("POST", "/v1/tokens", EVERYONE),
        // Someone else's token: to a non-admin it does not exist.
        ("DELETE", "/v1/tokens/{id}", [A, N, N, N, N, X, X, X]),
        ("GET", "/v1/groups", ADMIN),
        ("POST", "/v1/groups", ADMIN),
        ("GET", "/v1/groups/{name}", ADMIN),
        ("DELETE", "/v1/groups/{name}", ADMIN),
        ("GET", "/v1/audit", ADMIN),
        ("GET", "/v1/whoami", EVERYONE),
        ("GET", "/metrics", ADMIN),
        ("GET", "/v1/quarantine", EVERYONE),
        ("GET", "/v1/quarantine/{id}", VIEW),
        ("POST", "/v1/quarantine/{id}/retry", OPERATE),
        ("POST", "/v1/quarantine/delete", OPERATE),
        ("POST", "/v1/exports", OPERATE),
        ("GET", "/v1/exports", EVERYONE),
        ("GET", "/v1/exports/{id}", VIEW),
        ("GET", "/v1/exports/{id}/file", VIEW),
        ("DELETE", "/v1/exports/{id}", OPERATE),
        ("POST", "/v1/evidence", OPERATE),
        ("GET", "/v1/evidence", EVERYONE),
        ("GET", "/v1/evidence/{id}", VIEW),
        ("DELETE", "/v1/evidence/{id}", OPERATE),
        ("GET", "/v1/connections", EVERYONE),
        ("POST", "/v1/connections", OPERATE),
        ("GET", "/v1/connections/{id}", VIEW),
        // A snapshot connection: reading snapshots is a viewer's right.
        ("DELETE", "/v1/connections/{id}", VIEW),
        ("POST", "/v1/connections/{id}/reconnect", VIEW),
        ("GET", "/v1/connections/{id}/events", VIEW),
        ("GET", "/v1/connections/{id}/summary", VIEW),
        ("GET", "/v1/connections/{id}/tree", VIEW),
        ("POST", "/v1/connections/{id}/capture", OPERATE),
        ("POST", "/v1/snapshots/{id}/connect", VIEW),
        // Batches and schedules belong to their computer group (granted, or 404).
        ("GET", "/v1/fleet/batches", EVERYONE),
        ("POST", "/v1/fleet/batches", OPERATE),
        ("GET", "/v1/fleet/batches/{id}", VIEW),
        ("POST", "/v1/fleet/batches/{id}/pause", OPERATE),
        ("POST", "/v1/fleet/batches/{id}/resume", OPERATE),
        ("POST", "/v1/fleet/batches/{id}/cancel", OPERATE),
        ("GET", "/v1/schedules", EVERYONE),
        ("POST", "/v1/schedules", OPERATE),
        ("GET", "/v1/schedules/{name}", VIEW),
        ("DELETE", "/v1/schedules/{name}", OPERATE),
        ("POST", "/v1/schedules/{name}/pause", OPERATE),
        ("POST", "/v1/schedules/{name}/resume", OPERATE),
        ("POST", "/v1/schedules/{name}/run", OPERATE),
        ("POST", "/v1/snapshots/{id}/keep", OPERATE),
        ("POST", "/v1/snapshots/{id}/unkeep", OPERATE),
        ("POST", "/v1/endpoints/{host}/rekey", ADMIN),
        ("POST", "/v1/endpoints/{host}/forget", ADMIN),
        // The web console: its pages are public (they hold no data); signing in is public and
        // a wrong password is 401 for everyone; the session routes take a token or a cookie.
        ("GET", "/", [S(200); 8]),
        ("GET", "/console/{file}", [S(200); 8]),
        ("POST", "/v1/session", [X; 8]),
        ("GET", "/v1/session", EVERYONE),
        ("DELETE", "/v1/session", EVERYONE),
        // Last: it changes the enroll secret the fixtures register endpoints with.
        ("POST", "/v1/enroll-token/rotate", ADMIN),
    ]
}

/// The concrete request of one cell: its path and body, with fresh targets where the request
/// changes or consumes them.
async fn request_for(
    w: &World,
    method: &str,
    template: &str,
    inside: bool,
    n: usize,
) -> (String, Option<Value>) {
    let s = &w.server;
    let side = if inside { 0 } else { 1 };
    let host = if inside { INSIDE } else { OUTSIDE };
    let fresh_user = || async {
        let name = format!("cell-user-{n}");
        admin(
            s,
            "POST",
            "/v1/users",
            Some(json!({ "name": name, "role": "viewer", "groups": ["team"] })),
        )
        .await;
        name
    };
    let fresh_group = || async {
        let name = format!("cell-group-{n}");
        admin(s, "POST", "/v1/groups", Some(json!({ "name": name }))).await;
        name
    };
    match (method, template) {
        ("POST", "/v1/agents/heartbeat") => (
            template.into(),
            Some(
                json!({ "hostname": host, "api_url": "https://127.0.0.1:1", "cert_sha256": "ab".repeat(32) }),
            ),
        ),
        (_, "/v1/endpoints/{host}") => (format!("/v1/endpoints/{host}"), None),
        (_, "/v1/endpoints/{host}/rekey" | "/v1/endpoints/{host}/forget") => {
            let fresh = format!("{host}-cell-{n}");
            register(s, &fresh, "10.9.9.9").await;
            (template.replace("{host}", &fresh), None)
        }
        ("POST", "/v1/captures") => (template.into(), Some(json!({ "hosts": [host] }))),
        (_, "/v1/snapshots/{id}") => (format!("/v1/snapshots/{}", w.snap[side]), None),
        ("POST", "/v1/connections") => (template.into(), Some(json!({ "targets": [host] }))),
        (_, "/v1/snapshots/{id}/connect") => {
            (format!("/v1/snapshots/{}/connect", w.snap[side]), None)
        }
        (_, path) if path.starts_with("/v1/connections/{id}") => {
            // The side's snapshot connection, opened (again) as admin: a closed one reopens.
            let opened = admin(
                s,
                "POST",
                &format!("/v1/snapshots/{}/connect", w.snap[side]),
                None,
            )
            .await;
            let id = opened["id"].as_i64().unwrap();
            let mut path = path.replace("{id}", &id.to_string());
            if path.ends_with("/tree") {
                let page = admin(
                    s,
                    "GET",
                    &format!("/v1/connections/{id}/events?type=process&limit=1"),
                    None,
                )
                .await;
                path.push_str(&format!("?process={}", page["events"][0]["id"]));
            }
            (path, None)
        }
        (_, "/v1/snapshots/{id}/file") => (format!("/v1/snapshots/{}/file", w.snap[side]), None),
        ("POST", "/v1/snapshots/delete") => {
            let (snap, _) = fresh_capture(s, host).await;
            (template.into(), Some(json!({ "ids": [snap] })))
        }
        ("POST", "/v1/uploads") => (
            format!(
                "/v1/uploads?name={host}_2026_11_28T14.03.{:02}.{:03}Z.db",
                n / 1000 % 60,
                n % 1000
            ),
            None,
        ),
        (_, "/v1/ingests/{job_id}") => (format!("/v1/ingests/{}", w.ingest[side]), None),
        (_, "/v1/queue/jobs/{id}") => (format!("/v1/queue/jobs/{}", w.job[side]), None),
        (_, "/v1/queue/jobs/{id}/retry" | "/v1/queue/jobs/{id}/cancel") => {
            let (_, job) = fresh_capture(s, host).await;
            (template.replace("{id}", &job), None)
        }
        ("POST", "/v1/users") => (
            template.into(),
            Some(json!({ "name": format!("new-user-{n}"), "role": "viewer" })),
        ),
        (_, "/v1/users/{name}") => (format!("/v1/users/{}", fresh_user().await), None),
        (_, "/v1/users/{name}/role") => (
            format!("/v1/users/{}/role", fresh_user().await),
            Some(json!({ "role": "operator" })),
        ),
        (_, "/v1/users/{name}/groups") => {
            let (user, group) = (fresh_user().await, fresh_group().await);
            (
                format!("/v1/users/{user}/groups"),
                Some(json!({ "group": group })),
            )
        }
        (_, "/v1/users/{name}/groups/{group}") => (
            format!("/v1/users/{}/groups/team", fresh_user().await),
            None,
        ),
        (_, "/v1/users/{name}/password") => (
            format!("/v1/users/{}/password", fresh_user().await),
            Some(json!({ "password": "a long enough password" })),
        ),
        ("POST", "/v1/tokens") => (template.into(), Some(json!({ "label": "table" }))),
        (_, "/v1/tokens/{id}") => {
            let (_, id) = token_for(s, "owner", json!({})).await;
            (format!("/v1/tokens/{id}"), None)
        }
        ("POST", "/v1/groups") => (
            template.into(),
            Some(json!({ "name": format!("new-group-{n}"), "cidrs": ["10.9.0.0/16"] })),
        ),
        (_, "/v1/groups/{name}") => (format!("/v1/groups/{}", fresh_group().await), None),
        (_, "/v1/quarantine/{id}") => (format!("/v1/quarantine/{}", w.quarantine[side]), None),
        (_, "/v1/quarantine/{id}/retry") => (
            format!(
                "/v1/quarantine/{}/retry",
                quarantined(s, host, 100 + n).await
            ),
            Some(json!({})),
        ),
        ("POST", "/v1/quarantine/delete") => (
            template.into(),
            Some(json!({ "ids": [quarantined(s, host, 100 + n).await] })),
        ),
        ("POST", "/v1/exports") => (
            template.into(),
            Some(json!({ "snapshot": w.snap[side], "format": "csv" })),
        ),
        ("GET", "/v1/exports/{id}") => (format!("/v1/exports/{}", w.export[side]), None),
        ("DELETE", "/v1/exports/{id}") => (
            format!("/v1/exports/{}", fresh_export(s, w.snap[side]).await),
            None,
        ),
        (_, "/v1/exports/{id}/file") => (format!("/v1/exports/{}/file", w.export[side]), None),
        ("POST", "/v1/evidence") => (
            template.into(),
            Some(json!({ "snapshot": w.snap[side], "events": ["process:1"] })),
        ),
        ("GET", "/v1/evidence/{id}") => (format!("/v1/evidence/{}", w.evidence[side]), None),
        ("DELETE", "/v1/evidence/{id}") => (
            format!("/v1/evidence/{}", fresh_evidence(s, w.snap[side]).await),
            None,
        ),
        ("POST", "/v1/fleet/batches") => (
            template.into(),
            Some(json!({ "group": if inside { "team" } else { "others" } })),
        ),
        (_, "/v1/fleet/batches/{id}")
        | (_, "/v1/fleet/batches/{id}/pause")
        | (_, "/v1/fleet/batches/{id}/resume")
        | (_, "/v1/fleet/batches/{id}/cancel") => {
            (template.replace("{id}", &w.batch[side].to_string()), None)
        }
        ("POST", "/v1/schedules") => (
            template.into(),
            Some(
                json!({ "name": format!("cell-sched-{n}"), "cron": "0 3 * * *",
                         "group": if inside { "team" } else { "others" } }),
            ),
        ),
        ("DELETE", "/v1/schedules/{name}") => {
            let name = format!("cell-sched-del-{n}");
            admin(
                s,
                "POST",
                "/v1/schedules",
                Some(json!({ "name": name, "cron": "0 3 * * *",
                             "group": if inside { "team" } else { "others" } })),
            )
            .await;
            (format!("/v1/schedules/{name}"), None)
        }
        (_, "/v1/schedules/{name}")
        | (_, "/v1/schedules/{name}/pause")
        | (_, "/v1/schedules/{name}/resume")
        | (_, "/v1/schedules/{name}/run") => (template.replace("{name}", &w.schedule[side]), None),
        (_, "/console/{file}") => ("/console/app.js".into(), None),
        ("POST", "/v1/session") => (
            template.into(),
            // A name of its own per cell, so no cell waits for another's failures.
            Some(json!({ "username": format!("nobody-{n}"), "password": "wrong password" })),
        ),
        (_, "/v1/snapshots/{id}/keep" | "/v1/snapshots/{id}/unkeep") => {
            (template.replace("{id}", &w.snap[side].to_string()), None)
        }
        (_, path) => {
            assert!(!path.contains('{'), "no fixture for {method} {path}");
            (path.into(), None)
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_table_covers_every_route_for_every_kind_of_caller() {
    let w = world().await;
    let table = table();

    let routes: BTreeSet<String> = snapq::server::api::route_list()
        .into_iter()
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    let rows: BTreeSet<String> = table.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    assert_eq!(
        routes.difference(&rows).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "routes without a row in the access table"
    );
    assert_eq!(
        rows.difference(&routes).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "rows for routes the router does not have"
    );

    let tokens: [Option<&str>; 8] = [
        Some(&w.server.token),
        Some(&w.operator),
        Some(&w.operator),
        Some(&w.viewer),
        Some(&w.viewer),
        Some(&w.revoked),
        Some(&w.expired),
        None,
    ];
    let mut failures = Vec::new();
    let mut n = 0;
    for (method, template, expected) in &table {
        for (col, expect) in expected.iter().enumerate() {
            n += 1;
            let inside = !CALLERS[col].ends_with("outside");
            let (path, body) = request_for(&w, method, template, inside, n).await;
            let (status, value) = if *template == "/v1/uploads" {
                let mut r = w
                    .server
                    .client()
                    .post(format!("{}{path}", w.server.url()))
                    .body(b"not a database, quarantined when it is let in".to_vec());
                if let Some(t) = tokens[col] {
                    r = r.bearer_auth(t);
                }
                let response = r.send().await.unwrap();
                let status = response.status().as_u16();
                (status, response.json().await.unwrap_or(Value::Null))
            } else {
                call(&w.server, tokens[col], method, &path, body).await
            };
            let ok = match expect {
                A => (200..300).contains(&status) || status == 409,
                S(code) => status == *code,
            };
            if !ok {
                failures.push(format!(
                    "{method} {template} as {}: expected {expect:?}, got {status} {value}",
                    CALLERS[col]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_sees_nothing_outside_their_groups_and_gets_the_404_of_a_missing_id() {
    let w = world().await;
    let s = &w.server;
    let op = Some(w.operator.as_str());

    // Listings, search by name and by IP show only the inside endpoint.
    let (_, all) = call(s, op, "GET", "/v1/endpoints", None).await;
    let hosts: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, [INSIDE]);
    let (_, by_ip) = call(s, op, "GET", "/v1/endpoints?search=10.7.1", None).await;
    assert_eq!(by_ip, json!([]), "search by the outside endpoint's IP");
    let (_, by_ip) = call(s, op, "GET", "/v1/endpoints?search=10.9.1", None).await;
    assert_eq!(by_ip[0]["hostname"], INSIDE);
    let (_, snaps) = call(s, op, "GET", "/v1/snapshots", None).await;
    let groups: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(groups, [INSIDE]);
    let (status, _) = call(
        s,
        op,
        "GET",
        &format!("/v1/snapshots?endpoint={OUTSIDE}"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Jobs and queue counts: only the inside endpoint's.
    let (_, jobs) = call(s, op, "GET", "/v1/queue/jobs?limit=1000", None).await;
    let ids: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&w.job[0].as_str()), "{jobs}");
    assert!(!ids.contains(&w.job[1].as_str()), "{jobs}");
    assert!(!ids.contains(&w.ingest[1].as_str()), "{jobs}");
    let (_, admin_status) = call(s, Some(&s.token), "GET", "/v1/queue/status", None).await;
    let (_, op_status) = call(s, op, "GET", "/v1/queue/status", None).await;
    let total = |v: &Value| -> u64 {
        v["status"]["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                [
                    "pending",
                    "running",
                    "retrying",
                    "done",
                    "failed",
                    "cancelled",
                ]
                .iter()
                .map(|f| k[f].as_u64().unwrap())
                .sum::<u64>()
            })
            .sum()
    };
    // Per endpoint: an ingest, a capture, a quarantined upload and an export; admins also see
    // the two fleet jobs of the world's batches (a fleet job has no endpoint).
    assert_eq!(total(&admin_status), 10, "{admin_status}");
    assert_eq!(total(&op_status), 4, "{op_status}");
    let (_, entries) = call(s, op, "GET", "/v1/quarantine", None).await;
    assert_eq!(entries.as_array().unwrap().len(), 1, "{entries}");
    assert_eq!(entries[0]["id"], w.quarantine[0].as_str());

    // Outside ids answer exactly what a missing id answers.
    let (snap_out, job_out, ingest_out) = (w.snap[1].to_string(), &w.job[1], &w.ingest[1]);
    let (export_out, evidence_out) = (w.export[1].to_string(), w.evidence[1].to_string());
    for (template, outside, missing) in [
        ("/v1/endpoints/ID", OUTSIDE, "no-such-host"),
        ("/v1/snapshots/ID", snap_out.as_str(), "999999"),
        ("/v1/snapshots/ID/file", snap_out.as_str(), "999999"),
        ("/v1/queue/jobs/ID", job_out.as_str(), "no-such-job"),
        ("/v1/ingests/ID", ingest_out.as_str(), "no-such-job"),
        ("/v1/exports/ID", export_out.as_str(), "999999"),
        ("/v1/exports/ID/file", export_out.as_str(), "999999"),
        ("/v1/evidence/ID", evidence_out.as_str(), "999999"),
    ] {
        let (s1, b1) = call(s, op, "GET", &template.replace("ID", outside), None).await;
        let (s2, b2) = call(s, op, "GET", &template.replace("ID", missing), None).await;
        assert_eq!((s1, s2), (404, 404), "{template}: {b1}");
        assert_eq!(
            b1["error"].as_str().unwrap().replace(outside, "ID"),
            b2["error"].as_str().unwrap().replace(missing, "ID"),
            "{template} outside the groups tells more than a missing id"
        );
    }
    let (status, body) = call(
        s,
        op,
        "POST",
        "/v1/captures",
        Some(json!({ "hosts": [OUTSIDE] })),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (_, missing) = call(
        s,
        op,
        "POST",
        "/v1/captures",
        Some(json!({ "hosts": ["no-such-host"] })),
    )
    .await;
    assert_eq!(
        body["error"].as_str().unwrap().replace(OUTSIDE, "H"),
        missing["error"]
            .as_str()
            .unwrap()
            .replace("no-such-host", "H")
    );

    // A viewer inside is told which role it needs.
    let (status, body) = call(
        s,
        Some(&w.viewer),
        "POST",
        "/v1/captures",
        Some(json!({ "hosts": [INSIDE] })),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        body["error"].as_str().unwrap().contains("operator role"),
        "{body}"
    );

    // The download an operator may make is the stored file.
    let response = s
        .client()
        .get(format!("{}/v1/snapshots/{}/file", s.url(), w.snap[0]))
        .bearer_auth(&w.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.unwrap();
    let (_, snap) = s.get(&format!("/v1/snapshots/{}", w.snap[0])).await;
    assert_eq!(bytes.len() as u64, snap["size"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_expired_and_orphaned_tokens_get_401_saying_which() {
    let w = world().await;
    let s = &w.server;
    let message = |v: &Value| v["error"].as_str().unwrap_or_default().to_owned();

    let (status, body) = call(s, Some(&w.revoked), "GET", "/v1/endpoints", None).await;
    assert_eq!(status, 401);
    assert!(message(&body).contains("revoked"), "{body}");
    let (status, body) = call(s, Some(&w.expired), "GET", "/v1/endpoints", None).await;
    assert_eq!(status, 401);
    assert!(message(&body).contains("expired"), "{body}");
    let (status, body) = call(s, Some("snapq_0000"), "GET", "/v1/endpoints", None).await;
    assert_eq!(status, 401);
    assert!(message(&body).contains("unknown token"), "{body}");

    // Removing a user stops their token at once, and says why.
    assert_eq!(
        call(s, Some(&w.viewer), "GET", "/v1/endpoints", None)
            .await
            .0,
        200
    );
    let (code, out, err) = s.cli(&["users", "remove", "vw", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    let (status, body) = call(s, Some(&w.viewer), "GET", "/v1/endpoints", None).await;
    assert_eq!(status, 401);
    assert!(message(&body).contains("vw was removed"), "{body}");
    // A new user of the same name does not bring the old token back.
    admin(
        s,
        "POST",
        "/v1/users",
        Some(json!({ "name": "vw", "role": "admin" })),
    )
    .await;
    assert_eq!(
        call(s, Some(&w.viewer), "GET", "/v1/endpoints", None)
            .await
            .0,
        401
    );

    // Tokens carry the visible prefix and are listed with it, never whole.
    assert!(w.operator.starts_with("snapq_"));
    assert_eq!(
        call(s, Some(&w.operator), "GET", "/v1/endpoints", None)
            .await
            .0,
        200
    );
    let (code, out, _) = s.cli(&["tokens", "list", "--user", "op", "--json"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&w.operator));
    let listed: Value = serde_json::from_str(&out).unwrap();
    let laptop = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == "laptop")
        .unwrap();
    assert_eq!(laptop["prefix"].as_str().unwrap(), &w.operator[..12]);
    assert!(laptop["last_used_ms"].is_i64(), "{laptop}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_names_and_cidrs_that_do_not_parse_are_refused_clearly() {
    let server = TestServer::spawn();
    let long = "x".repeat(10_000);
    for (path, body, why) in [
        (
            "/v1/users",
            json!({ "name": "eve\u{1b}[2J", "role": "viewer" }),
            "control characters",
        ),
        (
            "/v1/users",
            json!({ "name": long, "role": "viewer" }),
            "at most 64",
        ),
        (
            "/v1/users",
            json!({ "name": "eve", "role": "root" }),
            "unknown role",
        ),
        (
            "/v1/groups",
            json!({ "name": "g\nroot" }),
            "control characters",
        ),
        ("/v1/groups", json!({ "name": long }), "at most 64"),
        (
            "/v1/groups",
            json!({ "name": "g", "cidrs": ["10.0.0.0/33"] }),
            "CIDR",
        ),
        (
            "/v1/groups",
            json!({ "name": "g", "cidrs": ["ten.0.0.0/8"] }),
            "CIDR",
        ),
    ] {
        let (status, value) = call(&server, Some(&server.token), "POST", path, Some(body)).await;
        assert_eq!(status, 400, "{value}");
        let message = value["error"].as_str().unwrap();
        assert!(message.contains(why), "{message}");
        assert!(
            message.len() < 300,
            "the error echoes the whole input: {message}"
        );
    }
    let (_, users) = server.get("/v1/users").await;
    assert_eq!(
        users.as_array().unwrap().len(),
        1,
        "only the admin: {users}"
    );
    let (_, groups) = server.get("/v1/groups").await;
    assert_eq!(groups, json!([]));

    // The CLI refuses a bad CIDR as a usage error before asking the server.
    let (code, _, err) = server.cli(&["groups", "add", "lab", "--cidr", "10.1.0.0/40"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CIDR \"10.1.0.0/40\""), "{err}");
    let (code, _, err) = server.cli(&["tokens", "create", "--expires", "soon"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("30d"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn users_tokens_and_groups_from_the_cli_scope_an_operator_and_are_audited() {
    if !crate::support::catalog_in_data_dir(
        "users_tokens_and_groups_from_the_cli_scope_an_operator_and_are_audited",
    ) {
        return;
    }
    let server = TestServer::spawn();
    register(&server, "web-01", "10.1.2.3").await;
    register(&server, "db-01", "10.2.0.9").await;
    let ok = |(code, out, err): (i32, String, String)| {
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    ok(server.cli(&[
        "groups",
        "add",
        "web",
        "--hostname",
        "web-*",
        "--cidr",
        "10.9.0.0/16",
    ]));
    let listed: Value =
        serde_json::from_str(&ok(server.cli(&["groups", "list", "--json"]))).unwrap();
    assert_eq!(listed[0]["member_count"], 1);
    let shown: Value =
        serde_json::from_str(&ok(server.cli(&["groups", "show", "web", "--json"]))).unwrap();
    assert_eq!(shown["members"][0]["hostname"], "web-01");

    ok(server.cli(&[
        "users", "add", "alice", "--role", "viewer", "--group", "web",
    ]));
    ok(server.cli(&["users", "set-role", "alice", "operator"]));
    let token = ok(server.cli(&[
        "tokens",
        "create",
        "--user",
        "alice",
        "--name",
        "ci",
        "--expires",
        "30d",
    ]));
    let token = token.trim();
    assert!(token.starts_with("snapq_") && token.len() > 40, "{token}");

    // Alice, an operator of group web, sees web-01 only, from the CLI too.
    let as_alice = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--token", token]);
        server.cli(&all)
    };
    let seen: Value =
        serde_json::from_str(&ok(as_alice(&["endpoints", "list", "--json"]))).unwrap();
    assert_eq!(seen.as_array().unwrap().len(), 1);
    assert_eq!(seen[0]["hostname"], "web-01");
    let (code, _, err) = as_alice(&["users", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("needs the admin role"), "{err}");
    // Alice's own tokens are hers to list.
    let mine: Value = serde_json::from_str(&ok(as_alice(&["tokens", "list", "--json"]))).unwrap();
    assert_eq!(mine.as_array().unwrap().len(), 1);

    // Granting db makes db-01 reachable; revoking takes it away again.
    ok(server.cli(&["groups", "add", "db", "--member", "db-01"]));
    ok(server.cli(&["users", "grant", "alice", "db"]));
    let seen: Value =
        serde_json::from_str(&ok(as_alice(&["endpoints", "list", "--json"]))).unwrap();
    assert_eq!(seen.as_array().unwrap().len(), 2);
    ok(server.cli(&["users", "revoke", "alice", "db"]));
    let seen: Value =
        serde_json::from_str(&ok(as_alice(&["endpoints", "list", "--json"]))).unwrap();
    assert_eq!(seen.as_array().unwrap().len(), 1);

    // A password read from stdin is stored as argon2id, never in clear.
    let mut child = std::process::Command::new(crate::support::BIN)
        .args([
            "users",
            "passwd",
            "alice",
            "--server",
            &server.url(),
            "--data-dir",
        ])
        .arg(&server.data_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hunter2-but-longer\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value =
        serde_json::from_str(&ok(server.cli(&["users", "show", "alice", "--json"]))).unwrap();
    assert_eq!(shown["user"]["has_password"], true);
    for file in ["catalog.db", "catalog.db-wal"] {
        let bytes = std::fs::read(server.data_dir.join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(18).any(|w| w == b"hunter2-but-longer"),
            "{file}"
        );
    }

    // Every change is in the audit log, with who and how it ended.
    let audit: Value = serde_json::from_str(&ok(
        server.cli(&["audit", "list", "--user", "admin", "--json"])
    ))
    .unwrap();
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "group.add",
        "user.add",
        "user.role",
        "token.create",
        "user.grant",
        "user.revoke",
        "user.password",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
    let users_only: Value = serde_json::from_str(&ok(server.cli(&[
        "audit", "list", "--action", "user", "--since", "1h", "--json",
    ])))
    .unwrap();
    assert!(
        users_only
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["action"].as_str().unwrap().starts_with("user."))
    );
    // A time window: everything above happened within the last hour, and an empty window is
    // refused with why.
    let older: Value = serde_json::from_str(&ok(
        server.cli(&["audit", "list", "--until", "1h", "--json"])
    ))
    .unwrap();
    assert_eq!(older, serde_json::json!([]));
    let (code, _, err) = server.cli(&["audit", "list", "--since", "1h", "--until", "2h"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("must be after"), "{err}");
    let (code, _, err) = as_alice(&["audit", "list"]);
    assert_eq!(code, 1, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_admin_token_file_revokes_the_old_token_at_the_next_start() {
    let mut server = TestServer::spawn();
    let old = server.token.clone();
    assert!(old.starts_with("snapq_"), "{old}");
    std::fs::remove_file(server.data_dir.join("admin.token")).unwrap();
    server.crash_and_restart();
    let new = std::fs::read_to_string(server.data_dir.join("admin.token")).unwrap();
    assert_ne!(new, old);
    let (status, body) = call(&server, Some(&old), "GET", "/v1/endpoints", None).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("admin.token was replaced"),
        "{body}"
    );
    let (status, _) = call(&server, Some(&new), "GET", "/v1/users", None).await;
    assert_eq!(status, 200);
    // The bootstrap admin cannot be removed or demoted.
    let (status, _) = call(&server, Some(&new), "DELETE", "/v1/users/admin", None).await;
    assert_eq!(status, 409);
}
