//! Crash windows: a server stopped at any moment resumes every job, keeps the catalog in step
//! with the queue, and never shows or loses a file.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::{TestServer, eventually, files_under, snapshot_file};

/// Enrolls an endpoint the way an agent's first heartbeat does: its API at `api_url`, presenting
/// the certificate whose sha256 is `pin`.
async fn register(server: &TestServer, hostname: &str, api_url: &str, pin: &str) {
    let status = server
        .client()
        .post(format!("{}/v1/agents/heartbeat", server.url()))
        .bearer_auth(server.enroll_secret())
        .json(&serde_json::json!({ "hostname": hostname, "api_url": api_url, "cert_sha256": pin }))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

/// Queues a capture of `host` through the API, returning its snapshot id and job id.
async fn queue_capture(server: &TestServer, host: &str) -> (i64, String) {
    let response = server
        .client()
        .post(format!("{}/v1/captures", server.url()))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({ "hosts": [host] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let queued: Value = response.json().await.unwrap();
    (
        queued[0]["snapshot_id"].as_i64().unwrap(),
        queued[0]["job_id"].as_str().unwrap().to_owned(),
    )
}

/// What a scripted agent does and saw.
#[derive(Default)]
struct Script {
    /// `/info` calls answered 503 before the verdict is given.
    info_unavailable: usize,
    info_calls: AtomicUsize,
    range_refused: AtomicUsize,
}

const STAGED_ID: &str = "00112233445566778899aabbccddeeff";

/// An agent that stages `bytes` (a real recorder export) and serves them with `Range` and an
/// ETag like the real one (416 for a range past the end), but answers its verdict only after
/// `info_unavailable` refusals. Served over TLS with a pair in `certs`; returns its address and
/// the certificate's pin.
async fn scripted_agent(
    bytes: Vec<u8>,
    script: Arc<Script>,
    certs: &std::path::Path,
) -> (std::net::SocketAddr, String) {
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    let bytes = Arc::new(bytes);
    let size = bytes.len() as u64;
    let sha256 = {
        let mut h = snapq_core::verify::Hasher::default();
        h.update(&bytes);
        h.finish()
    };
    let staged = move |state: &str| {
        serde_json::json!({
            "id": STAGED_ID, "size": size, "created_at": "2026-11-28T14:03:07.091Z",
            "state": state, "sha256": (state == "ready").then(|| sha256.clone()),
            "events": (state == "ready").then_some(0),
        })
    };
    let (s1, s2) = (staged.clone(), staged.clone());
    let (sc1, sc2) = (script.clone(), script.clone());
    let app = axum::Router::new()
        .route(
            "/v1/endpoint/size",
            get(move || async move {
                axum::Json(serde_json::json!({"db_bytes": size, "disk_free_bytes": 1u64 << 30}))
            }),
        )
        .route(
            "/v1/snapshots",
            post(move || async move { (StatusCode::CREATED, axum::Json(s1("copying"))) }),
        )
        .route(
            "/v1/snapshots/{id}",
            get(move |headers: HeaderMap| {
                let (bytes, script) = (bytes.clone(), sc1.clone());
                async move {
                    let etag = [(header::ETAG, format!("\"{STAGED_ID}\""))];
                    let from = headers
                        .get(header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok());
                    match from {
                        None => (StatusCode::OK, etag, bytes.to_vec()).into_response(),
                        Some(from) if from >= bytes.len() => {
                            script.range_refused.fetch_add(1, Ordering::SeqCst);
                            (
                                StatusCode::RANGE_NOT_SATISFIABLE,
                                axum::Json(serde_json::json!({"error": "range outside the file"})),
                            )
                                .into_response()
                        }
                        Some(from) => (StatusCode::PARTIAL_CONTENT, etag, bytes[from..].to_vec())
                            .into_response(),
                    }
                }
            })
            .delete(|| async { StatusCode::NO_CONTENT }),
        )
        .route(
            "/v1/snapshots/{id}/info",
            get(move || {
                let (script, staged) = (sc2.clone(), s2.clone());
                async move {
                    let n = script.info_calls.fetch_add(1, Ordering::SeqCst);
                    if n < script.info_unavailable {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(serde_json::json!({"error": "busy"})),
                        )
                            .into_response()
                    } else {
                        axum::Json(staged("ready")).into_response()
                    }
                }
            }),
        );
    let pair = snapq::tls::CertPair::ensure(certs, &["localhost".into()]).unwrap();
    let (config, pin) = (pair.server_config().unwrap(), pair.pin().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        snapq::tls::serve(listener, config, app, std::future::pending())
            .await
            .unwrap()
    });
    (addr, pin)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capture_whose_download_finished_before_the_verdict_resumes_to_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let file = snapshot_file(tmp.path(), "web-09", 300);
    let bytes = std::fs::read(&file).unwrap();
    let script = Arc::new(Script {
        info_unavailable: 1,
        ..Script::default()
    });
    let (addr, pin) =
        scripted_agent(bytes.clone(), script.clone(), &tmp.path().join("certs")).await;
    let server = TestServer::spawn_with(&["--job-retry-base-ms", "50", "--job-max-attempts", "3"]);
    register(&server, "web-09", &format!("https://{addr}"), &pin).await;
    let (id, _) = queue_capture(&server, "web-09").await;
    let snap = server.wait_snapshot(id, Duration::from_secs(30)).await;
    assert_eq!(snap["state"], "complete", "{snap}");
    let stored = server
        .data_dir
        .join("snapshots/web-09")
        .join(snap["name"].as_str().unwrap());
    assert_eq!(std::fs::read(&stored).unwrap(), bytes);
    assert_eq!(script.range_refused.load(Ordering::SeqCst), 0);
    assert_eq!(
        files_under(&server.data_dir.join("snapshots")),
        vec![stored]
    );
}

/// Enrolls `hostname` with its API at a loopback address where nothing listens: connections are
/// refused (a transient error), so its captures retry.
async fn register_unreachable(server: &TestServer, hostname: &str) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let certs = tempfile::tempdir().unwrap();
    let pin = snapq::tls::CertPair::ensure(certs.path(), &["localhost".into()])
        .unwrap()
        .pin()
        .unwrap();
    register(server, hostname, &format!("https://{addr}"), &pin).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_retrying_capture_fails_its_snapshot_and_ends_the_cli_wait() {
    let server =
        TestServer::spawn_with(&["--job-retry-base-ms", "300", "--job-max-attempts", "50"]);
    register_unreachable(&server, "web-09").await;
    let url = server.url();
    let data_dir = server.data_dir.to_str().unwrap().to_owned();
    let mut waiting = std::process::Command::new(crate::support::BIN)
        .args(["capture", "web-09", "--yes", "--wait", "--timeout", "60"])
        .args(["--server", &url, "--data-dir", &data_dir])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (snapshot, job) = eventually(Duration::from_secs(20), "a retrying capture", || async {
        let (_, list) = server.get("/v1/queue/jobs?kind=capture").await;
        let job = list.as_array()?.first()?.clone();
        (job["state"] == "retrying").then(|| {
            (
                job["args"]["snapshot_id"].as_i64().unwrap(),
                job["id"].as_str().unwrap().to_owned(),
            )
        })
    })
    .await;
    let (code, out, err) = server.cli(&["queue", "cancel", &job]);
    assert_eq!(code, 0, "{out}{err}");
    let snap = server
        .wait_snapshot(snapshot, Duration::from_secs(10))
        .await;
    assert_eq!(snap["state"], "failed", "{snap}");
    assert!(
        snap["error"].as_str().unwrap().contains("cancelled"),
        "{snap}"
    );
    // The CLI wait ends with the job, long before its --timeout.
    let waited = std::time::Instant::now();
    let status = loop {
        if let Some(status) = waiting.try_wait().unwrap() {
            break status;
        }
        if waited.elapsed() > Duration::from_secs(10) {
            let _ = waiting.kill();
            panic!("`snapq capture --wait` still waits for a cancelled capture");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(1));
    let mut out = String::new();
    std::io::Read::read_to_string(&mut waiting.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("web-09 failed: cancelled"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_wait_gives_up_at_its_timeout_and_says_the_capture_goes_on() {
    let server =
        TestServer::spawn_with(&["--job-retry-base-ms", "300", "--job-max-attempts", "50"]);
    register_unreachable(&server, "web-09").await;
    let started = std::time::Instant::now();
    let (code, out, err) = server.cli(&["capture", "web-09", "--yes", "--wait", "--timeout", "2"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(out.contains("--timeout ran out"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_server_on_the_same_data_dir_is_refused_before_it_claims_anything() {
    let server = TestServer::spawn();
    let data_dir = server.data_dir.to_str().unwrap();
    let second = std::process::Command::new(crate::support::BIN)
        .args(["serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (code, out, err) = finish_within(second, Duration::from_secs(20)).await;
    assert_eq!(code, 1, "{out}{err}");
    let pid = server.child.id();
    assert!(
        err.contains(&format!("another snapq serve (pid {pid}) is using")),
        "{err}"
    );
    // The first server is unharmed.
    let (status, _) = server.get("/v1/queue/status").await;
    assert_eq!(status, 200);
}

/// Waits for `child` to exit, killing it and failing the test after `limit`.
async fn finish_within(mut child: std::process::Child, limit: Duration) -> (i32, String, String) {
    let started = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Uploads `file` with `snapq upload --connect`, returning its exit code and output.
fn upload_connect(server: &TestServer, file: &std::path::Path) -> (i32, String, String) {
    server.cli(&[
        "upload",
        file.to_str().unwrap(),
        "--connect",
        "--timeout",
        "30",
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_already_in_the_store_with_the_same_bytes_is_registered_not_quarantined() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let file = snapshot_file(tmp.path(), "web-07", 500);
    let name = file.file_name().unwrap().to_str().unwrap().to_owned();
    // A crash after the move and before the registration leaves exactly this.
    let stored = server.data_dir.join("snapshots/web-07").join(&name);
    std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
    std::fs::copy(&file, &stored).unwrap();
    let (code, out, err) = upload_connect(&server, &file);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("web-07"), "{out}");
    assert!(files_under(&server.data_dir.join("quarantine")).is_empty());
    let (_, groups) = server.get("/v1/snapshots?endpoint=web-07").await;
    let snaps: Vec<Value> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["snapshots"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(snaps.len(), 1, "{groups}");
    assert_eq!(snaps[0]["state"], "complete");
    assert_eq!(
        snaps[0]["sha256"].as_str().unwrap(),
        snapq_core::verify::sha256_file(&stored).unwrap()
    );
    assert_eq!(
        files_under(&server.data_dir.join("snapshots")),
        vec![stored]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_of_the_same_name_with_other_bytes_never_replaces_the_stored_one() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let file = snapshot_file(tmp.path(), "web-07", 500);
    let name = file.file_name().unwrap().to_str().unwrap().to_owned();
    let stored = server.data_dir.join("snapshots/web-07").join(&name);
    std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
    let other = snapshot_file(&tmp.path().join("other"), "web-07", 700);
    std::fs::copy(&other, &stored).unwrap();
    let before = std::fs::read(&stored).unwrap();
    let (code, out, err) = upload_connect(&server, &file);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("sha256 differs"), "{out}");
    assert_eq!(std::fs::read(&stored).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watched_file_whose_ingest_died_is_tried_again_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let watch = tmp.path().join("drop");
    std::fs::create_dir_all(&watch).unwrap();
    let args = [
        "--watch",
        watch.to_str().unwrap(),
        "--watch-quiet-ms",
        "100",
        "--job-max-attempts",
        "1",
    ];
    let mut server = TestServer::spawn_in(&data, &args);
    // The store cannot take web-05's files: a plain file sits where its directory goes, so
    // the only attempt fails the way a full disk would (transient, but the last one).
    let blocker = data.join("snapshots/web-05");
    std::fs::write(&blocker, b"in the way").unwrap();
    let file = snapshot_file(tmp.path(), "web-05", 300);
    let name = file.file_name().unwrap().to_owned();
    std::fs::rename(&file, watch.join(&name)).unwrap();
    let job = eventually(Duration::from_secs(20), "the ingest to die", || async {
        let (_, jobs) = server.get("/v1/queue/jobs?kind=ingest&state=failed").await;
        Some(jobs.as_array()?.first()?["id"].as_str()?.to_owned())
    })
    .await;
    // Its ingest row follows the job: failed with the job's reason, not pending forever.
    let ingest = eventually(
        Duration::from_secs(10),
        "the ingest row to fail",
        || async {
            let (_, ingest) = server.get(&format!("/v1/ingests/{job}")).await;
            (ingest["state"] != "pending").then_some(ingest)
        },
    )
    .await;
    assert_eq!(ingest["state"], "failed", "{ingest}");
    assert!(
        ingest["reason"].as_str().unwrap().contains("web-05"),
        "{ingest}"
    );
    assert!(watch.join(&name).exists());
    std::fs::remove_file(&blocker).unwrap();
    server.crash_and_restart();
    eventually(
        Duration::from_secs(20),
        "the file to be ingested",
        || async {
            let (_, groups) = server.get("/v1/snapshots?endpoint=web-05").await;
            let any = groups.as_array()?.iter().any(|g| {
                g["snapshots"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["state"] == "complete"))
            });
            any.then_some(())
        },
    )
    .await;
    assert!(!watch.join(&name).exists());
}

/// A capture asked for just before the server was killed: its row written, its job queued or
/// not yet, the row not yet linked to its job (the request never got its answer). After the
/// restart the capture is carried out: a queued job is found again under its key, never queued
/// twice, and a row without a job gets one.
#[tokio::test(flavor = "multi_thread")]
async fn a_capture_killed_between_its_row_and_its_job_is_carried_out_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let flags = ["--job-retry-base-ms", "300", "--job-max-attempts", "50"];
    let mut server = TestServer::spawn_in(&data, &flags);
    let _agent = crate::support::TestAgent::spawn_with(crate::support::AgentOptions {
        hostname: "web-01".into(),
        prefill: 2_000,
        extra: server.enroll_args(),
        ..Default::default()
    });
    server.wait_online("web-01").await;
    // A capture whose job exists and keeps retrying: its endpoint does not answer.
    register_unreachable(&server, "web-09").await;
    let (queued, job) = queue_capture(&server, "web-09").await;

    let listen = server.addr.to_string();
    server.kill();
    let catalog = rusqlite::Connection::open(data.join("catalog.db")).unwrap();
    catalog
        .execute(
            "UPDATE snapshots SET state = 'queued', job_id = NULL WHERE id = ?1",
            [queued],
        )
        .unwrap();
    let row_only: i64 = catalog
        .query_row(
            "INSERT INTO snapshots (endpoint_id, state, origin, requested_by, created_ms)
             SELECT id, 'queued', 'capture', 'admin', 1 FROM endpoints WHERE hostname = 'web-01'
             RETURNING id",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(catalog);
    let mut args = vec!["--listen", listen.as_str()];
    args.extend(flags);
    let server = TestServer::spawn_in(&data, &args);

    let snap = server.wait_snapshot(row_only, Duration::from_secs(60)).await;
    assert_eq!(snap["state"], "complete", "{snap}");
    let (_, snap) = server.get(&format!("/v1/snapshots/{queued}")).await;
    assert_eq!(snap["job_id"], job.as_str(), "{snap}");
    assert_ne!(snap["state"], "failed", "{snap}");
    let (_, jobs) = server.get("/v1/queue/jobs?kind=capture").await;
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 2, "one job per capture: {jobs:?}");
}
