//! Endpoint identity and trust, end to end: enrollment binds a hostname to its agent, heartbeats
//! prove it, the server calls agents over TLS pinned at enrollment, and an admin re-keys.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::server::{capture_fails, heartbeat};
use crate::support::{AgentOptions, TestAgent, TestServer, eventually};

fn options(server: &TestServer, hostname: &str) -> AgentOptions {
    AgentOptions {
        hostname: hostname.into(),
        simulate: Some(200),
        prefill: 1_000,
        extra: server.enroll_args(),
    }
}

/// The audit log, oldest first (the API lists newest first).
async fn audit(server: &TestServer) -> Vec<Value> {
    let (status, entries) = server.get("/v1/audit?limit=10000").await;
    assert_eq!(status, 200, "{entries}");
    let mut entries = entries.as_array().unwrap().clone();
    entries.reverse();
    entries
}

fn count(audit: &[Value], action: &str) -> usize {
    audit.iter().filter(|a| a["action"] == action).count()
}

async fn shown(server: &TestServer, host: &str) -> Value {
    server.get(&format!("/v1/endpoints/{host}")).await.1
}

/// Waits until `agent` (web-01) is enrolled with its certificate and has kept its new credential:
/// it keeps it when the answer to its enrolling heartbeat arrives, and a later heartbeat (which
/// must carry it) shows it has. A capture before that can be refused with 401.
async fn wait_enrolled_with_credential(server: &TestServer, agent: &TestAgent) {
    let enrolled = eventually(Duration::from_secs(20), "the agent to enroll", || async {
        let endpoint = shown(server, "web-01").await["endpoint"].clone();
        (endpoint["cert_sha256"] == agent.cert_sha256()).then(|| endpoint["last_seen_ms"].as_i64())
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "a heartbeat with the new credential",
        || async {
            let seen = shown(server, "web-01").await["endpoint"]["last_seen_ms"].as_i64();
            (seen > enrolled).then_some(())
        },
    )
    .await;
}

/// Whether `needle` occurs in the catalog's files (database and WAL).
fn catalog_contains(dir: &Path, needle: &str) -> bool {
    ["catalog.db", "catalog.db-wal"].iter().any(|f| {
        std::fs::read(dir.join(f))
            .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_claiming_an_enrolled_hostname_is_refused_and_the_first_keeps_working() {
    let server = TestServer::spawn();
    let real = TestAgent::spawn_with(options(&server, "web-01"));
    server.wait_online("web-01").await;
    assert_eq!(
        shown(&server, "web-01").await["endpoint"]["cert_sha256"],
        real.cert_sha256()
    );
    // Nothing in catalog.db lets anyone call the agent or pose as it.
    let credential = std::fs::read_to_string(real.data_dir.join("server.credential")).unwrap();
    assert_eq!(credential.trim().len(), 64);
    if crate::support::catalog_in_data_dir("the catalog file holds no credential") {
        assert!(!catalog_contains(&server.data_dir, credential.trim()));
        assert!(!catalog_contains(&server.data_dir, &real.token));
    }

    // The forged heartbeat of the issue: the enroll secret and a made-up address.
    let (status, body) = heartbeat(
        &server,
        &server.enroll_secret(),
        "web-01",
        "https://10.9.9.9:17444",
        &"ab".repeat(32),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("snapq endpoints rekey web-01"), "{error}");
    // A second real agent with the same hostname is refused (and audited) at every heartbeat.
    let impostor = TestAgent::spawn_with(options(&server, "web-01"));
    eventually(
        Duration::from_secs(20),
        "the second agent to be refused",
        || async {
            (count(&audit(&server).await, "endpoint.identity_conflict") >= 2).then_some(())
        },
    )
    .await;
    assert!(!impostor.data_dir.join("server.credential").exists());

    // The endpoint still is the first agent: its live facts come from it, and captures work.
    let endpoint = shown(&server, "web-01").await;
    assert_eq!(endpoint["endpoint"]["cert_sha256"], real.cert_sha256());
    assert_eq!(endpoint["live"]["hostname"], "web-01", "{endpoint}");
    let (code, out, err) = server.cli(&["capture", "web-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");

    // The machine is reimaged: the old agent is gone, an admin re-keys, the new agent enrolls.
    drop(real);
    let (code, out, err) = server.cli(&["endpoints", "rekey", "web-01"]);
    assert_eq!(
        code, 2,
        "a re-key without a terminal needs --yes: {out}{err}"
    );
    let (code, out, err) = server.cli(&["endpoints", "rekey", "web-01", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_enrolled_with_credential(&server, &impostor).await;
    let (code, out, err) = server.cli(&["capture", "web-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let log = audit(&server).await;
    assert_eq!(count(&log, "endpoint.enroll"), 2, "{log:?}");
    assert_eq!(count(&log, "endpoint.rekey"), 1, "{log:?}");
    let conflict = log
        .iter()
        .find(|a| a["action"] == "endpoint.identity_conflict")
        .unwrap();
    assert_eq!(conflict["target"], "web-01");
    assert!(
        conflict["detail"].as_str().unwrap().contains("10.9.9.9"),
        "{conflict}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_presenting_another_certificate_fails_captures_with_a_reason_to_rekey() {
    let server = TestServer::spawn_with(&["--job-max-attempts", "3", "--job-retry-base-ms", "50"]);
    let tmp = tempfile::tempdir().unwrap();
    let options = options(&server, "web-01");
    let mut agent = TestAgent::spawn_in(tmp.path(), &options);
    server.wait_online("web-01").await;
    let enrolled_pin = agent.cert_sha256();
    // Same agent identity (its credential), another certificate.
    agent.kill();
    std::fs::remove_dir_all(tmp.path().join("certs")).unwrap();
    let agent = TestAgent::spawn_in(tmp.path(), &options);
    assert_ne!(agent.cert_sha256(), enrolled_pin);
    eventually(
        Duration::from_secs(20),
        "the server to notice the other certificate",
        || async {
            let live = &shown(&server, "web-01").await["live"];
            live["error"]
                .as_str()
                .is_some_and(|e| e.contains("not the pinned one"))
                .then_some(())
        },
    )
    .await;
    let (snap, job) = capture_fails(&server, "web-01", "snapq endpoints rekey web-01").await;
    assert_eq!(job["attempt_log"].as_array().unwrap().len(), 1, "{job}");
    assert!(
        snap["error"].as_str().unwrap().contains(&enrolled_pin),
        "{snap}"
    );

    // Re-keyed, the agent enrolls again with its new certificate and captures work.
    let (code, out, err) = server.cli(&["endpoints", "rekey", "web-01", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_enrolled_with_credential(&server, &agent).await;
    let (code, out, err) = server.cli(&["capture", "web-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_enroll_token_admits_no_one_with_the_old_one_and_enrolled_agents_keep_working() {
    let server = TestServer::spawn();
    let _agent = TestAgent::spawn_with(options(&server, "web-01"));
    server.wait_online("web-01").await;
    let old = server.enroll_secret();
    let (code, out, err) = server.cli(&["enroll-token", "rotate", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let rotated: Value = serde_json::from_str(&out).unwrap();
    let token = rotated["enroll_token"].as_str().unwrap();
    let on_disk = std::fs::read_to_string(server.data_dir.join("enroll.token")).unwrap();
    assert_eq!(on_disk.trim(), token);
    let (secret, pin) = token.split_once('.').unwrap();
    assert_ne!(secret, old);
    assert_eq!(pin, server.enroll_token.split_once('.').unwrap().1);

    let pin_of_nobody = "cd".repeat(32);
    let (status, body) = heartbeat(
        &server,
        &old,
        "web-02",
        "https://127.0.0.1:1",
        &pin_of_nobody,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("enroll token"));
    // The enrolled agent's heartbeats still land.
    let seen = shown(&server, "web-01").await["endpoint"]["last_seen_ms"]
        .as_i64()
        .unwrap();
    eventually(Duration::from_secs(10), "another heartbeat", || async {
        (shown(&server, "web-01").await["endpoint"]["last_seen_ms"].as_i64()? > seen).then_some(())
    })
    .await;
    let (status, body) = heartbeat(
        &server,
        secret,
        "web-02",
        "https://127.0.0.1:1",
        &pin_of_nobody,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credential"].as_str().unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_the_agent_port_is_told_to_use_https() {
    let agent = TestAgent::spawn();
    snapq_core::agent_client::install_crypto_provider();
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/endpoint", agent.addr))
        .bearer_auth(&agent.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("use https://"));
    // Over TLS, pinned, the same request is answered.
    let (status, info) = agent.get("/v1/endpoint").await;
    assert_eq!(status, 200, "{info}");
}
