//! The server, end to end: real `snapq serve` and `snapq agent` processes over loopback, driven
//! through the CLI and the HTTP API.

use std::time::Duration;

use serde_json::Value;

use crate::support::{AgentOptions, TestAgent, TestServer, count_events, eventually, files_under};

fn agent_for(server: &TestServer, hostname: &str, prefill: u64) -> TestAgent {
    TestAgent::spawn_with(AgentOptions {
        hostname: hostname.into(),
        simulate: Some(500),
        prefill,
        extra: server.enroll_args(),
    })
}

/// Queues captures of `hosts` through the API, returning the snapshot ids.
pub async fn queue_captures(server: &TestServer, hosts: &[&str]) -> Vec<i64> {
    let response = server
        .client()
        .post(format!("{}/v1/captures", server.url()))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({ "hosts": hosts }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let queued: Value = response.json().await.unwrap();
    queued
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["snapshot_id"].as_i64().unwrap())
        .collect()
}

/// Captures `host`, waits for the capture to fail with a reason containing `reason`, and returns
/// the snapshot and its job's detail (with every attempt).
pub async fn capture_fails(server: &TestServer, host: &str, reason: &str) -> (Value, Value) {
    let ids = queue_captures(server, &[host]).await;
    let snap = server.wait_snapshot(ids[0], Duration::from_secs(30)).await;
    assert_eq!(snap["state"], "failed", "{snap}");
    assert!(snap["error"].as_str().unwrap().contains(reason), "{snap}");
    let (_, job) = server
        .get(&format!(
            "/v1/queue/jobs/{}",
            snap["job_id"].as_str().unwrap()
        ))
        .await;
    (snap, job)
}

/// Sends a heartbeat as an agent does (enrolling a new hostname), returning status and body.
pub async fn heartbeat(
    server: &TestServer,
    bearer: &str,
    hostname: &str,
    api_url: &str,
    cert_sha256: &str,
) -> (u16, Value) {
    let response = server
        .client()
        .post(format!("{}/v1/agents/heartbeat", server.url()))
        .bearer_auth(bearer)
        .json(&serde_json::json!({
            "hostname": hostname, "api_url": api_url, "cert_sha256": cert_sha256
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Enrolls an endpoint the way an agent's first heartbeat does, returning the HTTP status.
async fn register(
    server: &TestServer,
    bearer: &str,
    hostname: &str,
    api_url: &str,
    cert_sha256: &str,
) -> u16 {
    heartbeat(server, bearer, hostname, api_url, cert_sha256)
        .await
        .0
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_from_the_cli_stores_a_verified_snapshot_and_lists_it() {
    let server = TestServer::spawn();
    let agent = agent_for(&server, "web-01", 30_000);
    server.wait_online("web-01").await;

    let (code, stdout, stderr) = server.cli(&["capture", "web-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let done: Value = serde_json::from_str(&stdout).unwrap();
    let snap = &done[0];
    assert_eq!(snap["state"], "complete");
    let name = snap["name"].as_str().unwrap();
    let parsed: snapq_core::SnapshotName = name.parse().unwrap();
    assert_eq!(parsed.hostname(), "web-01");
    let path = server.data_dir.join("snapshots/web-01").join(name);
    assert_eq!(
        snapq_core::verify::sha256_file(&path).unwrap(),
        snap["sha256"].as_str().unwrap()
    );
    assert_eq!(count_events(&path), snap["events"].as_u64().unwrap());
    assert!(snap["events"].as_u64().unwrap() >= 30_000);
    // Only finished files in the store, and the agent dropped its staged copy.
    assert_eq!(files_under(&server.data_dir.join("snapshots")), vec![path]);
    let (_, staged) = agent.get("/v1/snapshots").await;
    assert_eq!(staged.as_array().unwrap().len(), 0);

    let (code, stdout, _) = server.cli(&["snapshots", "list", "--json"]);
    assert_eq!(code, 0);
    let groups: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(groups[0]["hostname"], "web-01");
    assert_eq!(groups[0]["captures"], 1);
    assert_eq!(groups[0]["snapshots"][0]["origin"], "capture");
    assert_eq!(groups[0]["snapshots"][0]["requested_by"], "admin");

    let (code, stdout, _) = server.cli(&["snapshots", "list"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("web-01 (1 captures)") && stdout.contains(name),
        "{stdout}"
    );

    let (code, stdout, _) = server.cli(&["queue", "status", "--json"]);
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&stdout).unwrap();
    let capture = status["status"]["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "capture")
        .unwrap()
        .clone();
    assert_eq!(capture["done"], 1);
    // Only the kinds this server runs.
    let mut kinds: Vec<&str> = status["status"]["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["capture", "delete", "export", "fleet", "ingest"]);

    // The request and the outcome are in the audit log, with who asked.
    let (code, stdout, _) = server.cli(&["audit", "list", "--action", "capture", "--json"]);
    assert_eq!(code, 0);
    let audit: Value = serde_json::from_str(&stdout).unwrap();
    let results: Vec<(&str, &str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["actor"].as_str().unwrap(),
                a["target"].as_str().unwrap(),
                a["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(results.contains(&("admin", "web-01", "queued")), "{audit}");
    assert!(results.contains(&("admin", name, "complete")), "{audit}");

    // `endpoints show` reports what the agent says now.
    let (code, stdout, stderr) = server.cli(&["endpoints", "show", "web-01"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("endpoint     web-01") && stdout.contains("status       online"),
        "{stdout}"
    );
    assert!(
        stdout.contains("database") && stdout.contains("process "),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_are_searchable_by_name_and_address_with_an_online_indicator() {
    let server = TestServer::spawn();
    let _a = agent_for(&server, "db-primary", 0);
    let mut b = agent_for(&server, "web-07", 0);
    server.wait_online("db-primary").await;
    server.wait_online("web-07").await;

    let (code, stdout, _) = server.cli(&["endpoints", "search", "web", "--json"]);
    assert_eq!(code, 0);
    let found: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(found.as_array().unwrap().len(), 1);
    assert_eq!(found[0]["hostname"], "web-07");

    b.kill();
    eventually(Duration::from_secs(20), "web-07 to go offline", || async {
        let (_, list) = server.get("/v1/endpoints").await;
        list.as_array()?
            .iter()
            .any(|e| e["hostname"] == "web-07" && e["online"] == false)
            .then_some(())
    })
    .await;
    let (code, stdout, _) = server.cli(&["endpoints", "list"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("○ web-07") && stdout.contains("● db-primary"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn capturing_an_unknown_host_fails_clearly_and_queues_nothing() {
    let server = TestServer::spawn();
    let (code, _, stderr) = server.cli(&["capture", "no-such-host", "--yes"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("unknown endpoint") && stderr.contains("no-such-host"),
        "{stderr}"
    );
    let (_, jobs) = server.get("/v1/queue/jobs").await;
    assert_eq!(jobs.as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_endpoint_is_retried_with_backoff_then_failed_with_the_reason() {
    let server = TestServer::spawn_with(&["--job-max-attempts", "3", "--job-retry-base-ms", "100"]);
    let mut agent = agent_for(&server, "laptop-3", 0);
    server.wait_online("laptop-3").await;
    agent.kill();
    let (_, job) = capture_fails(&server, "laptop-3", "unreachable").await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempt_log"].as_array().unwrap().len(), 3, "{job}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_agent_token_fails_at_once_without_retrying() {
    let server = TestServer::spawn();
    let agent = TestAgent::spawn();
    // Enroll the agent's address by hand: the agent never got the credential, so it refuses it.
    let secret = server.enroll_secret();
    assert_eq!(
        register(
            &server,
            &secret,
            "web-01",
            &agent.url(""),
            &agent.cert_sha256()
        )
        .await,
        200
    );
    let (_, job) = capture_fails(&server, "web-01", "snapq endpoints rekey web-01").await;
    assert_eq!(job["attempt_log"].as_array().unwrap().len(), 1, "{job}");
    // The failure is audited with its reason.
    let failed = eventually(
        Duration::from_secs(10),
        "the failed capture audited",
        || async {
            let (_, audit) = server.get("/v1/audit?action=capture").await;
            audit
                .as_array()?
                .iter()
                .find(|a| a["result"] == "failed")
                .cloned()
        },
    )
    .await;
    assert_eq!(failed["target"], "web-01");
    assert!(
        failed["detail"].as_str().unwrap().contains("rekey"),
        "{failed}"
    );
    // A wrong enroll token cannot register anything.
    assert_eq!(
        register(
            &server,
            "guess",
            "evil",
            "https://127.0.0.1:1",
            &"0".repeat(64)
        )
        .await,
        401
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_larger_than_free_disk_minus_the_reserve_fails_at_once_and_writes_nothing() {
    let free_mib = snapq_core::disk::free_bytes(&std::env::temp_dir()).unwrap() >> 20;
    let reserve = (free_mib + 1024).to_string();
    let server = TestServer::spawn_with(&["--capture-reserve-mib", &reserve]);
    let _agent = agent_for(&server, "web-01", 1_000);
    server.wait_online("web-01").await;
    let ids = queue_captures(&server, &["web-01"]).await;
    let snap = server.wait_snapshot(ids[0], Duration::from_secs(20)).await;
    assert_eq!(snap["state"], "failed");
    let error = snap["error"].as_str().unwrap();
    assert!(
        error.contains("insufficient disk space for the web-01 snapshot"),
        "{error}"
    );
    assert!(
        error.contains("need") && error.contains("reserve"),
        "{error}"
    );
    assert!(files_under(&server.data_dir.join("snapshots")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capture_resumes_after_the_agent_is_killed_mid_transfer() {
    let server = TestServer::spawn_with(&[
        "--capture-rate-kib",
        "2048",
        "--job-retry-base-ms",
        "200",
        "--job-max-attempts",
        "20",
    ]);
    let options = AgentOptions {
        hostname: "web-01".into(),
        simulate: Some(200),
        prefill: 60_000,
        extra: server.enroll_args(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut agent = TestAgent::spawn_in(tmp.path(), &options);
    server.wait_online("web-01").await;
    let ids = queue_captures(&server, &["web-01"]).await;
    server.wait_transfer_started(ids[0]).await;
    agent.kill();
    let _agent = TestAgent::spawn_in(tmp.path(), &options);
    let snap = server.wait_snapshot(ids[0], Duration::from_secs(60)).await;
    assert_eq!(snap["state"], "complete", "{snap}");
    let path = server
        .data_dir
        .join("snapshots/web-01")
        .join(snap["name"].as_str().unwrap());
    assert_eq!(
        snapq_core::verify::sha256_file(&path).unwrap(),
        snap["sha256"].as_str().unwrap()
    );
    let (_, job) = server
        .get(&format!(
            "/v1/queue/jobs/{}",
            snap["job_id"].as_str().unwrap()
        ))
        .await;
    assert!(job["attempt_log"].as_array().unwrap().len() >= 2, "{job}");
    assert_eq!(files_under(&server.data_dir.join("snapshots")).len(), 1);
}

/// An agent that stages fine but serves bytes other than the ones it promised (`serve_len` of
/// them, where it staged 4096), over TLS with a pair in `certs`; returns its address and pin.
pub async fn lying_agent(
    certs: &std::path::Path,
    serve_len: usize,
) -> (std::net::SocketAddr, String, tokio::task::JoinHandle<()>) {
    use axum::routing::{get, post};
    const ID: &str = "0123456789abcdef0123456789abcdef";
    fn staged(state: &str) -> serde_json::Value {
        serde_json::json!({
            "id": ID, "size": 4096, "created_at": "2026-11-28T14:03:07.091Z", "state": state,
            "sha256": (state == "ready").then(|| "00".repeat(32)),
            "events": (state == "ready").then_some(0),
        })
    }
    let app = axum::Router::new()
        .route(
            "/v1/endpoint",
            get(|| async {
                axum::Json(serde_json::json!({
                    "hostname": "liar", "ips": [], "os": "x", "agent_version": "0",
                    "db_bytes": 4096, "events": {}, "oldest_ts": null, "newest_ts": null,
                    "disk_free_bytes": 1u64 << 30
                }))
            }),
        )
        .route(
            "/v1/endpoint/size",
            get(|| async {
                axum::Json(serde_json::json!({"db_bytes": 4096, "disk_free_bytes": 1u64 << 30}))
            }),
        )
        .route(
            "/v1/snapshots",
            post(|| async {
                (
                    axum::http::StatusCode::CREATED,
                    axum::Json(staged("copying")),
                )
            })
            .get(|| async { axum::Json(serde_json::json!([])) }),
        )
        .route(
            "/v1/snapshots/{id}",
            get(move || async move { ([("etag", format!("\"{ID}\""))], vec![7u8; serve_len]) })
                .delete(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route(
            "/v1/snapshots/{id}/info",
            get(|| async { axum::Json(staged("ready")) }),
        );
    let pair = snapq::tls::CertPair::ensure(certs, &["localhost".into()]).unwrap();
    let (config, pin) = (pair.server_config().unwrap(), pair.pin().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        snapq::tls::serve(listener, config, app, std::future::pending())
            .await
            .unwrap();
    });
    (addr, pin, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_do_not_match_the_staged_sha256_are_retried_then_failed_and_never_stored() {
    let server = TestServer::spawn_with(&["--job-max-attempts", "2", "--job-retry-base-ms", "50"]);
    let certs = tempfile::tempdir().unwrap();
    let (addr, pin, _liar) = lying_agent(certs.path(), 4096).await;
    let secret = server.enroll_secret();
    assert_eq!(
        register(&server, &secret, "liar", &format!("https://{addr}"), &pin).await,
        200
    );
    let (_, job) = capture_fails(&server, "liar", "do not match").await;
    assert_eq!(job["attempt_log"].as_array().unwrap().len(), 2, "{job}");
    assert!(files_under(&server.data_dir.join("snapshots")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_sending_more_than_it_staged_is_cut_off_at_the_staged_size() {
    let server = TestServer::spawn_with(&["--job-max-attempts", "3", "--job-retry-base-ms", "50"]);
    let certs = tempfile::tempdir().unwrap();
    let (addr, pin, _liar) = lying_agent(certs.path(), 64 << 20).await;
    let secret = server.enroll_secret();
    assert_eq!(
        register(&server, &secret, "liar", &format!("https://{addr}"), &pin).await,
        200
    );
    let (_, job) = capture_fails(&server, "liar", "more than the 4096 bytes it staged").await;
    assert_eq!(job["attempt_log"].as_array().unwrap().len(), 1, "{job}");
    assert!(files_under(&server.data_dir.join("snapshots")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_recorder_database_fails_the_capture_with_the_endpoints_reason() {
    let server = TestServer::spawn_with(&["--job-max-attempts", "2", "--job-retry-base-ms", "50"]);
    let agent = TestAgent::spawn_with(AgentOptions {
        hostname: "web-01".into(),
        simulate: Some(1),
        prefill: 20_000,
        extra: server.enroll_args(),
    });
    server.wait_online("web-01").await;
    // Checkpoint the prefill into monitor.db completely (as another process may), so the page
    // damaged below is read from there, not from a newer copy in the WAL.
    let db = agent.data_dir.join("monitor.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    let (busy, log, done): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((busy, log, done), (0, 0, 0), "the WAL is empty");
    drop(conn);
    damage_a_middle_page(&db);

    let (snap, job) = capture_fails(&server, "web-01", "could not make a good copy").await;
    let reason = snap["error"].as_str().unwrap();
    assert!(
        reason.contains("web-01") && reason.contains("damaged"),
        "{reason}"
    );
    assert_eq!(job["attempt_log"].as_array().unwrap().len(), 2, "{job}");
    assert!(files_under(&server.data_dir.join("snapshots")).is_empty());
    // The endpoint keeps no bad copy, only the failure, which it reports and refuses to serve.
    assert!(files_under(&agent.data_dir.join("staged")).is_empty());
    let (_, list) = agent.get("/v1/snapshots").await;
    let failed = &list.as_array().unwrap()[0];
    assert_eq!(failed["state"], "failed", "{list}");
    let (status, body) = agent
        .get(&format!("/v1/snapshots/{}", failed["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("failed"), "{body}");
}

/// Overwrites one page in the middle of a database file with garbage.
fn damage_a_middle_page(db: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    let pages = file.metadata().unwrap().len() / 4096;
    assert!(pages > 100, "{pages} pages");
    file.write_all_at(&[0xA5; 4096], pages / 2 * 4096).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_retry_and_cancel_refuse_unknown_and_finished_jobs() {
    let server = TestServer::spawn();
    let (code, _, stderr) = server.cli(&["queue", "retry", "01JUNKJUNKJUNKJUNKJUNKJUNK"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no job"), "{stderr}");
    let (code, _, stderr) = server.cli(&["queue", "cancel", "nope"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no job"), "{stderr}");

    let _agent = agent_for(&server, "web-01", 1_000);
    server.wait_online("web-01").await;
    let ids = queue_captures(&server, &["web-01"]).await;
    let snap = server.wait_snapshot(ids[0], Duration::from_secs(30)).await;
    assert_eq!(snap["state"], "complete", "{snap}");
    let job = snap["job_id"].as_str().unwrap();
    let (code, _, stderr) = server.cli(&["queue", "cancel", job]);
    assert_eq!(code, 1);
    assert!(stderr.contains("done"), "{stderr}");
    let (code, _, stderr) = server.cli(&["queue", "retry", job]);
    assert_eq!(code, 1);
    assert!(stderr.contains("done"), "{stderr}");
    let (code, stdout, _) = server.cli(&["queue", "show", job]);
    assert_eq!(code, 0);
    assert!(stdout.contains("capture"));
}

#[test]
fn the_server_refuses_a_corrupt_catalog_or_queue_and_leaves_it_untouched() {
    for file in ["catalog.db", "queue.db"] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(file);
        std::fs::write(&path, b"definitely not sqlite").unwrap();
        let (code, _, stderr) = crate::support::run_snapq(&[
            "serve",
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(file), "{stderr}");
        assert_eq!(std::fs::read(&path).unwrap(), b"definitely not sqlite");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_captures_survive_a_server_sigkill_and_complete_exactly_once() {
    let mut server = TestServer::spawn_with(&[
        "--capture-rate-kib",
        "1024",
        "--capture-concurrency",
        "20",
        "--job-retry-base-ms",
        "100",
    ]);
    let fleet_dir = tempfile::tempdir().unwrap();
    let mut fleet = std::process::Command::new(crate::support::BIN)
        .args([
            "fleet-sim",
            "--count",
            "20",
            "--server",
            &server.url(),
            "--enroll-token",
            &server.enroll_token,
            "--data-dir",
            fleet_dir.path().to_str().unwrap(),
            "--prefill-events",
            "8000",
        ])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let hosts: Vec<String> = (1..=20).map(|i| format!("sim-{i:02}")).collect();
    for h in &hosts {
        server.wait_online(h).await;
    }
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let ids = queue_captures(&server, &host_refs).await;
    eventually(
        Duration::from_secs(30),
        "transfers to be under way",
        || async {
            let (_, snap) = server.get(&format!("/v1/snapshots/{}", ids[0])).await;
            (snap["bytes_done"].as_u64()? > 0).then_some(())
        },
    )
    .await;
    server.crash_and_restart();
    for id in &ids {
        let snap = server.wait_snapshot(*id, Duration::from_secs(120)).await;
        assert_eq!(snap["state"], "complete", "{snap}");
    }
    let files = files_under(&server.data_dir.join("snapshots"));
    assert_eq!(files.len(), 20, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| !f.to_string_lossy().contains(".partial"))
    );
    let (_, groups) = server.get("/v1/snapshots").await;
    assert_eq!(groups.as_array().unwrap().len(), 20);
    assert!(
        groups
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["captures"] == 1)
    );
    let (_, running) = server.get("/v1/queue/jobs?state=running").await;
    assert_eq!(running.as_array().unwrap().len(), 0);
    let _ = fleet.kill();
    let _ = fleet.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_server_has_endpoints_to_capture_at_once() {
    let server = TestServer::spawn_with(&["--demo", "2"]);
    server.wait_online("demo-01").await;
    server.wait_online("demo-02").await;
    let (code, stdout, stderr) = server.cli(&["capture", "demo-02", "--yes", "--wait"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("demo-02 complete"), "{stdout}");
    let (_, endpoints) = server.get("/v1/endpoints").await;
    assert!(
        endpoints
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["labels"][0] == "demo"),
        "{endpoints}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_snapshot_being_captured_cancels_the_capture_first() {
    let server = TestServer::spawn_with(&["--capture-rate-kib", "256"]);
    let _agent = agent_for(&server, "web-01", 40_000);
    server.wait_online("web-01").await;
    let ids = queue_captures(&server, &["web-01"]).await;
    server.wait_transfer_started(ids[0]).await;
    let (_, snap) = server.get(&format!("/v1/snapshots/{}", ids[0])).await;
    let job = snap["job_id"].as_str().unwrap().to_owned();
    let (code, stdout, stderr) = server.cli(&["snapshots", "delete", &ids[0].to_string(), "--yes"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (status, _) = server.get(&format!("/v1/snapshots/{}", ids[0])).await;
    assert_eq!(status, 404);
    let (_, detail) = server.get(&format!("/v1/queue/jobs/{job}")).await;
    assert_eq!(detail["state"], "cancelled", "{detail}");
    assert!(files_under(&server.data_dir.join("snapshots")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_the_file_flags_win_and_sigterm_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("snapq.toml");
    std::fs::write(
        &config,
        "capture_reserve_mib = 111\nonline_window_secs = 5\nupload_max_mib = 7\n",
    )
    .unwrap();
    let data = tmp.path().join("data");
    let server = TestServer::spawn_in(&data, &["--config", config.to_str().unwrap()]);
    let _agent = agent_for(&server, "web-01", 0);
    server.wait_online("web-01").await;
    let (_, info) = server.get("/v1/endpoints/web-01").await;
    assert_eq!(info["capture_reserve_bytes"], 111u64 << 20, "{info}");
    drop(server);

    // A flag wins over the file.
    let mut server = TestServer::spawn_in(
        &data,
        &[
            "--config",
            config.to_str().unwrap(),
            "--capture-reserve-mib",
            "222",
        ],
    );
    server.wait_online("web-01").await;
    let (_, info) = server.get("/v1/endpoints/web-01").await;
    assert_eq!(info["capture_reserve_bytes"], 222u64 << 20, "{info}");

    // SIGTERM: the server shuts down gracefully and exits 0.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");

    // An unknown key in the file is an error that names it.
    std::fs::write(&config, "capture_reserve_mb = 1\n").unwrap();
    let (code, _, stderr) = crate::support::run_snapq(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 2, "a bad settings file is a usage error: {stderr}");
    assert!(
        stderr.contains("capture_reserve_mb") && stderr.contains("line 1"),
        "{stderr}"
    );

    // So is a wrong type, named with its key and line.
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nupload_max_mib = \"lots\"\n",
    )
    .unwrap();
    let (code, _, stderr) = crate::support::run_snapq(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("upload_max_mib") && stderr.contains("line 2"),
        "{stderr}"
    );
}
