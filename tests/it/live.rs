//! Live connections end to end: real `snapq serve` and `snapq agent` processes, the events grid
//! on a live endpoint and on a stored snapshot through the same engine, and every bad input and
//! fault the issue names for them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{AgentOptions, TestAgent, TestServer, eventually, snapshot_file};

/// A request as the admin: status and JSON body.
async fn call(server: &TestServer, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_as(server, &server.token, method, path, body).await
}

async fn call_as(
    server: &TestServer,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}{path}", server.url());
    let mut request = match method {
        "GET" => server.client().get(url),
        "POST" => server.client().post(url),
        "DELETE" => server.client().delete(url),
        other => panic!("no helper for {other}"),
    };
    request = request.bearer_auth(token.trim());
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn agent_options(server: &TestServer, hostname: &str, prefill: u64) -> AgentOptions {
    AgentOptions {
        hostname: hostname.into(),
        simulate: Some(50),
        prefill,
        extra: server.enroll_args(),
    }
}

/// Connects to `target` (hostname or IP); returns the connection.
async fn connect(server: &TestServer, target: &str) -> Value {
    let (status, made) = call(
        server,
        "POST",
        "/v1/connections",
        Some(json!({ "targets": [target] })),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    made[0].clone()
}

/// Uploads `file` and waits for its ingest: the snapshot id.
async fn ingest(server: &TestServer, file: &Path) -> i64 {
    let name = file.file_name().unwrap().to_str().unwrap().to_owned();
    let response = server
        .client()
        .post(format!("{}/v1/uploads?name={name}", server.url()))
        .bearer_auth(&server.token)
        .body(std::fs::read(file).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = eventually(Duration::from_secs(60), "the ingest", || async {
        let (_, i) = server.get(&format!("/v1/ingests/{job}")).await;
        (i["state"] != "pending").then_some(i)
    })
    .await;
    assert_eq!(done["state"], "complete", "{done}");
    done["snapshot_id"].as_i64().unwrap()
}

async fn open_snapshot(server: &TestServer, id: i64) -> Value {
    let (status, c) = call(server, "POST", &format!("/v1/snapshots/{id}/connect"), None).await;
    assert_eq!(status, 201, "{c}");
    c
}

async fn page(server: &TestServer, conn: i64, query: &str) -> (u16, Value) {
    call(
        server,
        "GET",
        &format!("/v1/connections/{conn}/events?{query}"),
        None,
    )
    .await
}

/// The store path of snapshot `id`.
async fn store_path(server: &TestServer, id: i64) -> PathBuf {
    let (_, snap) = server.get(&format!("/v1/snapshots/{id}")).await;
    let name = snap["name"].as_str().unwrap();
    let host = snap["hostname"].as_str().unwrap();
    server.data_dir.join("snapshots").join(host).join(name)
}

/// Replaces snapshot `id`'s stored file by a copy changed with `sql` (what a hostile or damaged
/// store would hold).
async fn tamper(server: &TestServer, id: i64, sql: &str) {
    let path = store_path(server, id).await;
    let tmp = path.with_extension("tamper");
    std::fs::copy(&path, &tmp).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    {
        let conn = rusqlite::Connection::open(&tmp).unwrap();
        conn.execute_batch(sql).unwrap();
    }
    std::fs::rename(&tmp, &path).unwrap();
}

fn filter_cases() -> Vec<(&'static str, &'static str)> {
    vec![
        ("type=process&where=colour%20eq%20red", "colour"),
        ("type=process&where=path%20like%20bash", "like"),
        ("type=process&where=pid%20gt%20many", "pid"),
        ("type=process&where=path", "path"),
        ("type=nosuch", "nosuch"),
        ("type=process&sort=-nosuch", "nosuch"),
        ("type=process&limit=0", "limit"),
        ("type=process&since=yesterday", "since"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_connection_pages_events_with_the_agents_filters_errors_and_cursors() {
    let server = TestServer::spawn();
    let agent = TestAgent::spawn_with(agent_options(&server, "live-01", 3_000));
    server.wait_online("live-01").await;

    // Connect by IP address: the endpoint the agent reported.
    let (_, endpoint) = server.get("/v1/endpoints/live-01").await;
    let ip = endpoint["endpoint"]["ips"][0].as_str().unwrap().to_owned();
    let c = connect(&server, &ip).await;
    assert_eq!(c["status"], "active", "{c}");
    assert_eq!(c["endpoint"], "live-01");
    assert!(c["db_bytes"].as_u64().unwrap() > 0, "{c}");
    assert!(c["events"].as_u64().unwrap() >= 3_000, "{c}");
    assert!(c["oldest_ts"].as_i64().is_some() && c["newest_ts"].as_i64().is_some());
    let id = c["id"].as_i64().unwrap();

    // A page through the server is the page the agent gives (same engine, same cursor walk).
    let query = "type=process&sort=id&limit=10";
    let (status, first) = page(&server, id, query).await;
    assert_eq!(status, 200, "{first}");
    let (_, direct) = agent.get(&format!("/v1/events?{query}")).await;
    assert_eq!(first["events"], direct["events"]);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (status, second) = page(&server, id, &format!("{query}&cursor={cursor}")).await;
    assert_eq!(status, 200, "{second}");
    assert!(second["events"][0]["id"].as_i64() > first["events"][9]["id"].as_i64());

    // Bad filters: 400 with the agent's own message, never an empty page.
    for (bad, names) in filter_cases() {
        let (status, via_server) = page(&server, id, bad).await;
        let (agent_status, via_agent) = agent.get(&format!("/v1/events?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {via_server}");
        assert_eq!(agent_status, 400, "{bad}: {via_agent}");
        assert_eq!(via_server["error"], via_agent["error"], "{bad}");
        assert!(
            via_server["error"].as_str().unwrap().contains(names),
            "{bad}: {via_server}"
        );
    }
    // SQL-looking values are searched for, not run.
    for sql in ["x' OR 1=1 --", "'; DROP TABLE process; --", "%"] {
        let w: String =
            form_urlencoded::byte_serialize(format!("path co {sql}").as_bytes()).collect();
        let (status, p) = page(&server, id, &format!("type=process&where={w}")).await;
        assert_eq!(status, 200, "{sql}: {p}");
        assert_eq!(p["events"], json!([]), "{sql}");
    }
    let (status, after) = page(&server, id, query).await;
    assert_eq!(status, 200);
    assert_eq!(after["events"], first["events"], "the table is still there");

    // Summary and tree through the connection.
    let (status, summary) = call(
        &server,
        "GET",
        &format!("/v1/connections/{id}/summary"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{summary}");
    assert!(summary["total"].as_u64().unwrap() >= 3_000);
    let child = first["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["parent_id"].is_i64())
        .cloned()
        .unwrap_or_else(|| first["events"][0].clone());
    let (status, tree) = call(
        &server,
        "GET",
        &format!("/v1/connections/{id}/tree?process={}", child["id"]),
        None,
    )
    .await;
    assert_eq!(status, 200, "{tree}");
    assert_eq!(tree["process"]["id"], child["id"]);

    // Queries count as activity (recorded to the second).
    let before = c["last_activity_ms"].as_i64().unwrap();
    eventually(
        Duration::from_secs(10),
        "a query to count as activity",
        || async {
            assert_eq!(page(&server, id, "limit=1").await.0, 200);
            let (_, shown) = call(&server, "GET", &format!("/v1/connections/{id}"), None).await;
            (shown["last_activity_ms"].as_i64().unwrap() > before).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cursor_from_another_query_or_another_connection_is_refused() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let a = ingest(&server, &snapshot_file(tmp.path(), "cur-a", 500)).await;
    let b = ingest(&server, &snapshot_file(tmp.path(), "cur-b", 500)).await;
    let ca = open_snapshot(&server, a).await["id"].as_i64().unwrap();
    let cb = open_snapshot(&server, b).await["id"].as_i64().unwrap();
    let (_, first) = page(&server, ca, "type=process&limit=5").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();

    let (status, ok) = page(
        &server,
        ca,
        &format!("type=process&limit=5&cursor={cursor}"),
    )
    .await;
    assert_eq!(status, 200, "{ok}");
    let (status, other_query) = page(
        &server,
        ca,
        &format!("type=process&sort=id&limit=5&cursor={cursor}"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        other_query["error"]
            .as_str()
            .unwrap()
            .contains("different query"),
        "{other_query}"
    );
    let (status, other_conn) = page(
        &server,
        cb,
        &format!("type=process&limit=5&cursor={cursor}"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        other_conn["error"]
            .as_str()
            .unwrap()
            .contains("another connection"),
        "{other_conn}"
    );
    let (status, garbage) = page(&server, ca, "type=process&cursor=zzz").await;
    assert_eq!(status, 400, "{garbage}");
}

#[tokio::test(flavor = "multi_thread")]
async fn someone_elses_connection_answers_the_404_of_a_missing_id() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let inside = ingest(&server, &snapshot_file(tmp.path(), "team-01", 100)).await;
    let outside = ingest(&server, &snapshot_file(tmp.path(), "other-01", 100)).await;
    let c_in = open_snapshot(&server, inside).await["id"].as_i64().unwrap();
    let c_out = open_snapshot(&server, outside).await["id"]
        .as_i64()
        .unwrap();
    call(
        &server,
        "POST",
        "/v1/groups",
        Some(json!({ "name": "team", "hostnames": ["team-*"] })),
    )
    .await;
    call(
        &server,
        "POST",
        "/v1/users",
        Some(json!({ "name": "op", "role": "operator", "groups": ["team"] })),
    )
    .await;
    let (_, made) = call(&server, "POST", "/v1/tokens", Some(json!({ "user": "op" }))).await;
    let op = made["token"].as_str().unwrap().to_owned();

    let (status, _) = call_as(
        &server,
        &op,
        "GET",
        &format!("/v1/connections/{c_in}/events"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, theirs) = call_as(
        &server,
        &op,
        "GET",
        &format!("/v1/connections/{c_out}/events"),
        None,
    )
    .await;
    let (missing_status, missing) =
        call_as(&server, &op, "GET", "/v1/connections/99999/events", None).await;
    assert_eq!((status, missing_status), (404, 404));
    assert_eq!(
        theirs["error"]
            .as_str()
            .unwrap()
            .replace(&c_out.to_string(), "N"),
        missing["error"].as_str().unwrap().replace("99999", "N")
    );
    let (_, list) = call_as(&server, &op, "GET", "/v1/connections", None).await;
    let ids: Vec<i64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [c_in]);
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_and_timed_out_connections_answer_409_saying_how_to_reconnect() {
    // Idle after 6 s.
    let server = TestServer::spawn_with(&["--connection-idle-minutes", "0.1"]);
    let tmp = tempfile::tempdir().unwrap();
    let snap = ingest(&server, &snapshot_file(tmp.path(), "idle-01", 200)).await;
    let id = open_snapshot(&server, snap).await["id"].as_i64().unwrap();
    assert_eq!(page(&server, id, "limit=1").await.0, 200);

    let timed_out = eventually(Duration::from_secs(20), "the idle time-out", || async {
        let (_, c) = call(&server, "GET", &format!("/v1/connections/{id}"), None).await;
        (c["status"] == "timed_out").then_some(c)
    })
    .await;
    assert!(
        timed_out["reason"].as_str().unwrap().contains("no use for"),
        "{timed_out}"
    );
    let (status, refused) = page(&server, id, "limit=1").await;
    assert_eq!(status, 409, "{refused}");
    let message = refused["error"].as_str().unwrap();
    assert!(
        message.contains(&format!("reconnect with `snapq live reconnect {id}`")),
        "{message}"
    );
    assert!(message.contains("timed_out"), "{message}");

    let (status, back) = call(
        &server,
        "POST",
        &format!("/v1/connections/{id}/reconnect"),
        None,
    )
    .await;
    assert_eq!(
        (status, back["status"].as_str()),
        (200, Some("active")),
        "{back}"
    );
    assert_eq!(page(&server, id, "limit=1").await.0, 200);

    let (status, _) = call(&server, "DELETE", &format!("/v1/connections/{id}"), None).await;
    assert_eq!(status, 200);
    let (_, list) = call(&server, "GET", "/v1/connections", None).await;
    assert_eq!(list, json!([]), "a closed connection leaves the list");
    let (status, refused) = call(
        &server,
        "GET",
        &format!("/v1/connections/{id}/summary"),
        None,
    )
    .await;
    assert_eq!(status, 409);
    assert!(
        refused["error"].as_str().unwrap().contains("is closed")
            && refused["error"]
                .as_str()
                .unwrap()
                .contains("snapq live reconnect"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_use_interrupts_the_connection_and_a_reconnect_after_it_returns_works()
{
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let options = agent_options(&server, "gone-01", 1_000);
    let mut agent = TestAgent::spawn_in(tmp.path(), &options);
    server.wait_online("gone-01").await;
    let c = connect(&server, "gone-01").await;
    let id = c["id"].as_i64().unwrap();
    assert_eq!(page(&server, id, "limit=5").await.0, 200);

    agent.kill();
    let started = Instant::now();
    let (status, failed) = page(&server, id, "limit=5").await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status, 502, "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("gone-01"),
        "{failed}"
    );
    let (_, shown) = call(&server, "GET", &format!("/v1/connections/{id}"), None).await;
    assert_eq!(shown["status"], "unexpected_interruption", "{shown}");
    let (status, refused) = page(&server, id, "limit=5").await;
    assert_eq!(status, 409, "{refused}");

    let _agent = TestAgent::spawn_in(tmp.path(), &options);
    // The agent listens on a new port; its heartbeat tells the server.
    eventually(
        Duration::from_secs(30),
        "a reconnect to the returned agent",
        || async {
            let (_, c) = call(
                &server,
                "POST",
                &format!("/v1/connections/{id}/reconnect"),
                None,
            )
            .await;
            (c["status"] == "active").then_some(())
        },
    )
    .await;
    let (status, p) = page(&server, id, "limit=5").await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["events"].as_array().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_whose_tables_are_views_is_refused_and_the_server_keeps_answering() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let good = ingest(&server, &snapshot_file(tmp.path(), "views-ok", 200)).await;
    let viewed = ingest(&server, &snapshot_file(tmp.path(), "views-proc", 200)).await;
    let expensive = ingest(&server, &snapshot_file(tmp.path(), "views-exp", 200)).await;
    tamper(
        &server,
        viewed,
        "ALTER TABLE process RENAME TO process_real;
         CREATE VIEW process AS SELECT * FROM process_real;",
    )
    .await;
    // A `file` that is a view costing billions of rows if anyone ran it.
    tamper(
        &server,
        expensive,
        "DROP TABLE file;
         CREATE VIEW file AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n)
           SELECT x AS id, x AS ts, NULL AS process_id, 'create' AS op, 'p' AS path,
                  NULL AS new_path, 0 AS size FROM n;",
    )
    .await;
    for (snap, table) in [(viewed, "process"), (expensive, "file")] {
        let c = open_snapshot(&server, snap).await;
        assert_eq!(c["status"], "failed_to_connect", "{c}");
        let reason = c["reason"].as_str().unwrap();
        assert!(reason.contains(&format!("`{table}` is a view")), "{reason}");
        let (status, refused) = page(&server, c["id"].as_i64().unwrap(), "").await;
        assert_eq!(status, 409, "{refused}");
    }
    let ok = open_snapshot(&server, good).await;
    assert_eq!(ok["status"], "active");
    assert_eq!(
        page(&server, ok["id"].as_i64().unwrap(), "limit=3").await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expensive_snapshot_query_is_stopped_by_its_time_budget_and_the_server_keeps_answering()
{
    let server = TestServer::spawn_with(&["--query-budget-ms", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let big = ingest(&server, &snapshot_file(tmp.path(), "budget-01", 200_000)).await;
    let id = open_snapshot(&server, big).await["id"].as_i64().unwrap();
    // Every row of every condition is read: far more than a millisecond.
    let scan = "type=file&any=true&where=path%20co%20zzz-none&where=new_path%20co%20zzz-none&where=op%20ew%20zzz";
    let (status, stopped) = page(&server, id, scan).await;
    assert_eq!(status, 504, "{stopped}");
    assert!(
        stopped["error"].as_str().unwrap().contains("time budget"),
        "{stopped}"
    );
    let (status, _) = server.get("/status").await;
    assert_eq!(status, 200);
    let (_, c) = call(&server, "GET", &format!("/v1/connections/{id}"), None).await;
    assert_eq!(
        c["status"], "active",
        "a slow query does not break the connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_survive_a_server_restart_or_become_interrupted_when_the_agent_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = TestServer::spawn_in(tmp.path(), &[]);
    let files = tempfile::tempdir().unwrap();
    let snap = ingest(&server, &snapshot_file(files.path(), "keep-01", 100)).await;
    let kept = open_snapshot(&server, snap).await["id"].as_i64().unwrap();
    let mut agent = TestAgent::spawn_with(agent_options(&server, "lost-01", 100));
    server.wait_online("lost-01").await;
    let lost = connect(&server, "lost-01").await["id"].as_i64().unwrap();

    agent.kill();
    server.crash_and_restart();
    let (_, c) = call(&server, "GET", &format!("/v1/connections/{kept}"), None).await;
    assert_eq!(c["status"], "active", "{c}");
    assert_eq!(page(&server, kept, "limit=2").await.0, 200);
    let gone = eventually(
        Duration::from_secs(30),
        "the re-check after the restart",
        || async {
            let (_, c) = call(&server, "GET", &format!("/v1/connections/{lost}"), None).await;
            (c["status"] == "unexpected_interruption").then_some(c)
        },
    )
    .await;
    assert!(
        gone["reason"].as_str().unwrap().contains("restarted"),
        "{gone}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_connects_lists_pages_draws_trees_and_captures() {
    let server = TestServer::spawn();
    let _agent = TestAgent::spawn_with(agent_options(&server, "cli-01", 500));
    server.wait_online("cli-01").await;

    let (code, out, err) = server.cli(&["live", "connect", "cli-01"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cli-01") && out.contains("active"), "{out}");
    let (code, out, _) = server.cli(&["live", "list", "--json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    let id = list[0]["id"].as_i64().unwrap().to_string();

    let (code, out, err) = server.cli(&[
        "events",
        "--connection",
        &id,
        "--type",
        "process",
        "--limit",
        "5",
        "--sort",
        "-id",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("CMDLINE"),
        "{out}"
    );
    assert!(err.contains("--cursor"), "{err}");

    let (code, out, _) = server.cli(&["events", "--connection", &id, "--limit", "3", "--json"]);
    assert_eq!(code, 0);
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 3);
    let pid = page["events"][0]["id"].to_string();

    let (code, _, err) = server.cli(&["events", "--connection", &id, "--where", "colour eq red"]);
    assert_eq!(code, 1);
    assert!(err.contains("colour"), "{err}");

    let (code, out, err) = server.cli(&["events", "summary", "--connection", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("process") && out.contains("total"), "{out}");
    let (code, out, err) = server.cli(&["events", "tree", "--connection", &id, &pid]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("this process"), "{out}");

    let (code, out, err) =
        server.cli(&["live", "capture", &id, "--yes", "--wait", "--timeout", "60"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("complete"), "{out}");

    let (code, _, _) = server.cli(&["live", "close", &id]);
    assert_eq!(code, 0);
    let (code, _, err) = server.cli(&["events", "--connection", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("snapq live reconnect"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_connect_opens_the_ingested_snapshot_for_queries() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let file = snapshot_file(tmp.path(), "up-01", 300);
    let (code, out, err) = server.cli(&["upload", file.to_str().unwrap(), "--connect", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let result: Value = serde_json::from_str(&out).unwrap();
    let conn = &result[0]["connection"];
    assert_eq!(conn["status"], "active", "{result}");
    assert_eq!(conn["target"]["kind"], "snapshot");
    let id = conn["id"].as_i64().unwrap();
    let (status, p) = page(&server, id, "type=process&limit=2").await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["events"].as_array().unwrap().len(), 2);
}
