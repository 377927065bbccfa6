//! Running snapq in production: `snapq doctor` against a healthy server and against the three
//! things first-time users get wrong (a wrong token, an untrusted certificate, no server), and
//! JSON logs whose job lines carry the job's id and kind, and Prometheus metrics that agree
//! with `queue status`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{BIN, TestServer, metric_samples, run_snapq};

#[test]
fn doctor_passes_a_healthy_server_and_names_the_fix_for_each_mistake() {
    let server = TestServer::spawn();

    let (code, out, err) = server.cli(&["doctor"]);
    assert_eq!(code, 0, "{out}{err}");
    for check in ["server", "certificate", "clock", "token", "disk", "agents"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "no passing {check} check in:\n{out}"
        );
    }
    assert!(
        out.contains("(admin)") && out.contains("every endpoint"),
        "{out}"
    );
    let (code, out, _) = server.cli(&["doctor", "--json"]);
    assert_eq!(code, 0);
    let checks: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        checks
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["verdict"] == "ok"),
        "{checks}"
    );

    // A wrong token: refused, with what to do.
    let (code, out, _) = server.cli(&["doctor", "--token", "snapq_not-a-real-token"]);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_default();
    assert!(line.contains("token") && line.contains("refused"), "{out}");
    assert!(out.contains("snapq tokens create"), "{out}");

    // An untrusted certificate: no pin (another data directory) and the system roots do not
    // know the self-signed one.
    let elsewhere = tempfile::tempdir().unwrap();
    let url = server.url();
    let (code, out, _) = run_snapq(&[
        "doctor",
        "--server",
        &url,
        "--data-dir",
        elsewhere.path().to_str().unwrap(),
        "--token",
        &server.token,
    ]);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_default();
    assert!(
        line.contains("certificate") && line.contains("not trusted"),
        "{out}"
    );
    assert!(out.contains("--ca-cert"), "{out}");

    // No server at all.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, out, _) = run_snapq(&[
        "doctor",
        "--server",
        &format!("https://127.0.0.1:{port}"),
        "--data-dir",
        server.data_dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_default();
    assert!(
        line.contains("server") && line.contains("no snapq server answers"),
        "{out}"
    );
    assert!(out.contains("snapq serve"), "{out}");
}

/// `--log-format json`: one JSON object per line; a job's lines carry its id and kind.
#[test]
fn json_logs_are_one_object_per_line_and_job_lines_name_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("snapq server listening on ")
                .map(str::to_owned)
        })
        .expect("the server says where it listens");
    std::thread::spawn(move || for _ in lines {});
    // Upload a file that is not a database: its ingest job logs the quarantine.
    let junk = tmp.path().join("web-01_2026_11_28T14.03.07.091Z.db");
    std::fs::write(&junk, b"not a database").unwrap();
    let (code, _, err) = run_snapq(&[
        "upload",
        junk.to_str().unwrap(),
        "--connect",
        "--server",
        &format!("https://{addr}"),
        "--data-dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "a junk upload fails: {err}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = child.wait();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    // The job's span is in every line its handler logs (`spans`: outermost first).
    let job_span = lines
        .iter()
        .flat_map(|l| l["spans"].as_array().cloned().unwrap_or_default())
        .find(|s| s["kind"] == "ingest")
        .unwrap_or_else(|| panic!("no log line of the ingest job:\n{stderr}"));
    assert!(
        job_span["job_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{job_span}"
    );
}

async fn scrape_with(server: &TestServer, token: Option<&str>) -> (u16, String, String) {
    let mut request = server.client().get(format!("{}/metrics", server.url()));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, response.text().await.unwrap())
}

/// The job counts of `queue status` as the metric keys they must equal.
fn queue_counts(status: &Value) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for k in status["status"]["kinds"].as_array().unwrap() {
        for state in [
            "pending",
            "running",
            "retrying",
            "done",
            "failed",
            "cancelled",
        ] {
            out.insert(
                format!(
                    "snapq_jobs{{kind=\"{}\",state=\"{state}\"}}",
                    k["kind"].as_str().unwrap()
                ),
                k[state].as_f64().unwrap(),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_by_route_template_and_add_up_with_queue_status() {
    // Four captures at a time, each limited to 20 MiB/s, so the queue holds still while
    // captures run.
    let server = TestServer::spawn_with(&[
        "--capture-concurrency",
        "4",
        "--demo",
        "3",
        "--metrics-listen",
        "127.0.0.1:0",
        "--capture-rate-kib",
        "20480",
    ]);
    server.wait_online("demo-02").await;

    // Admins scrape the API with their token; nobody else does.
    let (status, kind, _) = scrape_with(&server, Some(&server.token)).await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert_eq!(scrape_with(&server, None).await.0, 401);
    let (status, made) = server
        .post(
            "/v1/users",
            json!({ "name": "op", "role": "operator", "groups": [] }),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let (_, token) = server.post("/v1/tokens", json!({ "user": "op" })).await;
    let operator = token["token"].as_str().unwrap();
    assert_eq!(scrape_with(&server, Some(operator)).await.0, 403);

    // A capture, a miss by id, then the numbers.
    let (code, out, err) = server.cli(&["capture", "demo-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let captured: Value = serde_json::from_str(&out).unwrap();
    let size = captured[0]["size"]
        .as_f64()
        .unwrap_or_else(|| panic!("the snapshot's size in {captured}"));
    let (status, _) = server.get("/v1/snapshots/987654").await;
    assert_eq!(status, 404);

    // The plain-HTTP listener needs no token and says the same.
    let url = server
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("snapq metrics on "))
        .expect("the server prints where it serves metrics")
        .to_owned();
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let m = metric_samples(&text);
    let get = |key: &str| -> f64 {
        *m.get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
    };
    assert_eq!(get(r#"snapq_jobs{kind="capture",state="done"}"#), 1.0);
    assert_eq!(get(r#"snapq_job_attempts_total{kind="capture"}"#), 1.0);
    assert_eq!(
        get(r#"snapq_job_attempt_outcomes_total{kind="capture",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"snapq_job_run_seconds_count{kind="capture",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"snapq_job_queue_wait_seconds_count{kind="capture"}"#),
        1.0
    );
    assert!(get("snapq_capture_bytes_total") > 0.0);
    assert_eq!(get("snapq_capture_throughput_bytes_per_second_count"), 1.0);
    assert_eq!(get(r#"snapq_snapshots{state="complete"}"#), 1.0);
    assert_eq!(get("snapq_store_bytes"), size);
    assert_eq!(get("snapq_endpoints_online"), 3.0);
    assert!(get("snapq_store_disk_free_bytes") > 0.0);
    assert_eq!(get("snapq_capture_reserved_bytes"), 0.0);
    assert!(get("snapq_queue_workers") >= 1.0);
    assert!(get("snapq_worker_heartbeat_oldest_age_seconds") < 30.0);
    // Requests by route template, never by the id or name in the path.
    assert!(
        get(r#"snapq_http_requests_total{method="GET",route="/v1/snapshots/{id}",status="404"}"#)
            >= 1.0
    );
    assert!(get(r#"snapq_http_requests_total{method="GET",route="/metrics",status="403"}"#) >= 1.0);
    assert!(
        !text.contains("987654") && !text.contains("route=\"/v1/endpoints/demo"),
        "{text}"
    );

    // Under load the job counts equal `queue status` whenever the queue holds still around a
    // scrape: 200 captures of the three demo endpoints.
    for _ in 0..20 {
        let hosts: Vec<String> = (0..10).map(|i| format!("demo-0{}", i % 3 + 1)).collect();
        let (status, queued) = server.post("/v1/captures", json!({ "hosts": hosts })).await;
        assert_eq!(status, 202, "{queued}");
    }
    let mut agreed_under_load = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let (_, before) = server.get("/v1/queue/status").await;
        let (_, _, text) = scrape_with(&server, Some(&server.token)).await;
        let (_, after) = server.get("/v1/queue/status").await;
        let (before, after) = (queue_counts(&before), queue_counts(&after));
        let scraped = metric_samples(&text);
        let finished = |c: &BTreeMap<String, f64>| {
            c[r#"snapq_jobs{kind="capture",state="done"}"#]
                + c[r#"snapq_jobs{kind="capture",state="failed"}"#]
        };
        if before == after {
            for (key, n) in &before {
                assert_eq!(scraped.get(key), Some(n), "{key} in:\n{text}");
            }
            if finished(&before) < 201.0 {
                agreed_under_load += 1;
            }
        }
        if finished(&after) == 201.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "200 captures did not finish: {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, _, text) = scrape_with(&server, Some(&server.token)).await;
    let m = metric_samples(&text);
    assert!(m[r#"snapq_job_attempts_total{kind="capture"}"#] >= 201.0);
    assert!(
        agreed_under_load > 0,
        "no scrape saw the queue hold still while captures ran"
    );
    println!("{agreed_under_load} scrapes agreed with queue status while captures ran");
}
