//! Fleet captures end to end: a real `snapq serve`, real `snapq fleet-sim` endpoints, batches
//! and schedules driven from the CLI, and every bad input and fault the issue names.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{BIN, TestServer, eventually, files_under};

/// Kills the server with SIGKILL and starts it again on the same data directory, flags and
/// address. The one place a test reuses a port: `fleet-sim` endpoints heartbeat to the URL they
/// were started with, so a restarted server must answer there. The address is the one the kernel
/// picked for port 0 at the first start, reused the moment the killed process has released it
/// (the server's listener sets SO_REUSEADDR, so its connections in TIME_WAIT do not block it).
fn crash_and_restart_in_place(server: &mut TestServer, extra: &[&str]) {
    crash_and_restart_in_place_after(server, extra, |_| {});
}

/// The same, with `while_down` run on the data directory between the kill and the start (to
/// leave the catalog as a kill at a precise moment would).
fn crash_and_restart_in_place_after(
    server: &mut TestServer,
    extra: &[&str],
    while_down: impl FnOnce(&Path),
) {
    let listen = server.addr.to_string();
    let data = server.data_dir.clone();
    server.kill();
    while_down(&data);
    let mut args = vec!["--listen", listen.as_str()];
    args.extend(extra);
    *server = TestServer::spawn_in(&data, &args);
    assert_eq!(server.addr.to_string(), listen);
}

/// A running `snapq fleet-sim`.
pub(crate) struct FleetSim(Child);

impl Drop for FleetSim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `count` simulated endpoints `PREFIX-01…` heartbeating every second.
pub(crate) fn fleet_sim(
    server: &TestServer,
    dir: &Path,
    prefix: &str,
    count: u32,
    extra: &[&str],
) -> FleetSim {
    let mut child = Command::new(BIN)
        .args([
            "fleet-sim",
            "--count",
            &count.to_string(),
            "--prefix",
            prefix,
        ])
        .args([
            "--server",
            &server.url(),
            "--enroll-token",
            &server.enroll_token,
        ])
        .args(["--data-dir", dir.to_str().unwrap(), "--heartbeat-secs", "1"])
        .args(["--prefill-events", "3000", "--events-per-sec", "20"])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting snapq fleet-sim");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut listening = 0;
    while listening < count {
        let line = lines
            .next()
            .expect("fleet-sim exited before listening")
            .unwrap();
        if line.contains(" listening on ") {
            listening += 1;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    FleetSim(child)
}

fn host(prefix: &str, i: u32) -> String {
    format!("{prefix}-{i:02}")
}

async fn wait_all_online(server: &TestServer, prefix: &str, count: u32) {
    for i in 1..=count {
        server.wait_online(&host(prefix, i)).await;
    }
}

/// Runs the CLI and parses its `--json` output.
fn cli_json(server: &TestServer, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = server.cli(&all);
    assert_eq!(code, 0, "snapq {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn add_group(server: &TestServer, name: &str, glob: &str) {
    let (code, _, err) = server.cli(&["groups", "add", name, "--hostname", glob]);
    assert_eq!(code, 0, "{err}");
}

/// Starts a batch of `group` from the CLI: its id.
fn start_batch(server: &TestServer, group: &str, extra: &[&str]) -> i64 {
    let mut args = vec!["fleet", "capture", "--group", group, "--yes"];
    args.extend(extra);
    cli_json(server, &args)["batch_id"].as_i64().unwrap()
}

async fn batch(server: &TestServer, id: i64) -> Value {
    let (status, b) = server.get(&format!("/v1/fleet/batches/{id}")).await;
    assert_eq!(status, 200, "{b}");
    b
}

async fn wait_batch_end(server: &TestServer, id: i64, timeout: Duration) -> Value {
    eventually(timeout, "the batch to end", || async {
        let b = batch(server, id).await;
        (!matches!(b["state"].as_str(), Some("running" | "paused"))).then_some(b)
    })
    .await
}

/// Complete snapshots per hostname.
async fn complete_snapshots(server: &TestServer) -> std::collections::BTreeMap<String, Vec<Value>> {
    let (_, groups) = server.get("/v1/snapshots").await;
    let mut out = std::collections::BTreeMap::new();
    for g in groups.as_array().unwrap() {
        let snaps: Vec<Value> = g["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "complete")
            .cloned()
            .collect();
        out.insert(g["hostname"].as_str().unwrap().to_owned(), snaps);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_captures_every_endpoint_of_its_group_once_under_its_concurrency_cap() {
    let server = TestServer::spawn();
    let dir = tempfile::tempdir().unwrap();
    let _fleet = fleet_sim(&server, dir.path(), "web", 4, &[]);
    let _other = fleet_sim(&server, &dir.path().join("db"), "db", 1, &[]);
    wait_all_online(&server, "web", 4).await;
    add_group(&server, "web", "web-*");

    let (code, out, err) = server.cli(&[
        "fleet",
        "capture",
        "--group",
        "web",
        "--max-concurrency",
        "2",
        "--yes",
        "--wait",
        "--timeout",
        "120",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let b: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b["state"], "complete", "{b}");
    assert_eq!(b["totals"]["total"], 4);
    assert_eq!(b["totals"]["done"], 4);
    assert!(b["totals"]["bytes"].as_u64().unwrap() > 0);
    assert!(b["reason"].as_str().unwrap().contains("all 4"), "{b}");
    for item in b["items"].as_array().unwrap() {
        assert_eq!(item["state"], "done", "{item}");
    }
    // Each endpoint of the group captured exactly once; the other group's not at all.
    let snaps = complete_snapshots(&server).await;
    for i in 1..=4 {
        assert_eq!(snaps[&host("web", i)].len(), 1, "{snaps:?}");
    }
    assert!(!snaps.contains_key("db-01"));

    // The batch's jobs: its fleet job and one capture per endpoint.
    let id = b["id"].as_i64().unwrap();
    let jobs = cli_json(&server, &["queue", "list", "--batch", &id.to_string()]);
    let kinds: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "fleet").count(), 1, "{jobs}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "capture").count(),
        4,
        "{jobs}"
    );
    // Listed, and the human views name the outcome.
    let (code, out, _) = server.cli(&["fleet", "show", &id.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("web-01") && out.contains("done"), "{out}");
    let list = cli_json(&server, &["fleet", "list"]);
    assert_eq!(list[0]["id"], id);
    // Audited.
    let audit = cli_json(&server, &["audit", "list", "--action", "fleet"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "fleet.capture"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_batch_and_schedule_input_is_a_usage_error_that_says_what_is_wrong() {
    let server = TestServer::spawn();
    add_group(&server, "web", "web-*");
    let (code, _, err) = server.cli(&[
        "fleet",
        "capture",
        "--group",
        "web",
        "--max-concurrency",
        "0",
        "--yes",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--max-concurrency must be at least 1"),
        "{err}"
    );
    let (code, _, err) = server.cli(&[
        "fleet",
        "capture",
        "--group",
        "web",
        "--failure-limit",
        "150%",
        "--yes",
    ]);
    assert_eq!(code, 2, "{err}");

    // An invalid cron expression: the error points at the field.
    let (code, _, err) = server.cli(&[
        "schedule",
        "add",
        "nightly",
        "--cron",
        "0 25 * * *",
        "--group",
        "web",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("field 2 (hour) \"25\""), "{err}");
    assert!(err.contains("0 25 * * *\n    ^^"), "{err}");
    // An unknown time zone.
    let (code, _, err) = server.cli(&[
        "schedule",
        "add",
        "nightly",
        "--cron",
        "0 2 * * *",
        "--tz",
        "Mars/Olympus",
        "--group",
        "web",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown time zone \"Mars/Olympus\""), "{err}");
    // The server refuses the same without the CLI.
    let response = server
        .client()
        .post(format!("{}/v1/schedules", server.url()))
        .bearer_auth(&server.token)
        .json(&json!({ "name": "x", "cron": "61 * * * *", "group": "web" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("field 1 (minute)"),
        "{body}"
    );
    let response = server
        .client()
        .post(format!("{}/v1/fleet/batches", server.url()))
        .bearer_auth(&server.token)
        .json(&json!({ "group": "web", "max_concurrency": 0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // A group that does not exist: 404 naming it, nothing started.
    let (code, _, err) = server.cli(&["fleet", "capture", "--group", "nope", "--yes"]);
    assert_eq!(code, 1);
    assert!(err.contains("no computer group \"nope\""), "{err}");
    let list = cli_json(&server, &["fleet", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_that_matches_nothing_ends_complete_with_zero_endpoints() {
    let server = TestServer::spawn();
    add_group(&server, "nobody", "zzz-*");
    let (code, out, err) = server.cli(&[
        "fleet",
        "capture",
        "--group",
        "nobody",
        "--yes",
        "--wait",
        "--timeout",
        "60",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let b: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b["state"], "complete", "{b}");
    assert_eq!(b["totals"]["total"], 0);
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("matched no endpoints"),
        "{b}"
    );
}

/// Registers an endpoint whose agent never answers and that stops heartbeating: offline.
async fn register_offline(server: &TestServer, hostname: &str) {
    let status = server
        .client()
        .post(format!("{}/v1/agents/heartbeat", server.url()))
        .bearer_auth(server.enroll_secret())
        .json(
            &json!({ "hostname": hostname, "ips": ["10.1.1.1"], "api_url": "https://127.0.0.1:1",
                       "cert_sha256": "ab".repeat(32), "labels": [] }),
        )
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_endpoints_wait_until_the_batch_expires_and_are_skipped_with_the_reason() {
    let server = TestServer::spawn();
    let dir = tempfile::tempdir().unwrap();
    let _fleet = fleet_sim(&server, dir.path(), "app", 2, &[]);
    wait_all_online(&server, "app", 2).await;
    // Enrolled once, silent since: offline (its last heartbeat leaves the 5 s window).
    register_offline(&server, "app-99").await;
    // Known only from an uploaded snapshot: no agent to call.
    let file = crate::support::snapshot_file(dir.path(), "app-50", 100);
    let (code, _, err) = server.cli(&["upload", file.to_str().unwrap(), "--connect"]);
    assert_eq!(code, 0, "{err}");
    add_group(&server, "app", "app-*");
    eventually(Duration::from_secs(20), "app-99 to go offline", || async {
        let (_, list) = server.get("/v1/endpoints?search=app-99").await;
        (list[0]["online"] == false).then_some(())
    })
    .await;
    let id = start_batch(&server, "app", &["--expire", "12s"]);
    let b = wait_batch_end(&server, id, Duration::from_secs(90)).await;
    assert_eq!(b["state"], "expired", "{b}");
    assert_eq!(b["totals"]["done"], 2, "{b}");
    assert_eq!(b["totals"]["skipped"], 2, "{b}");
    let uploaded = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["hostname"] == "app-50")
        .unwrap();
    assert!(
        uploaded["error"]
            .as_str()
            .unwrap()
            .contains("no agent is enrolled"),
        "{uploaded}"
    );
    let skipped = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["hostname"] == "app-99")
        .unwrap();
    assert_eq!(skipped["state"], "skipped");
    assert!(
        skipped["error"]
            .as_str()
            .unwrap()
            .contains("offline until the batch expired"),
        "{skipped}"
    );
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("1 endpoint(s) not captured")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_that_go_offline_mid_batch_are_captured_once_they_are_back() {
    let server = TestServer::spawn_with(&["--job-retry-base-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    let _a = fleet_sim(&server, &dir.path().join("a"), "mix", 2, &[]);
    let b_dir = dir.path().join("b");
    let fleet_b = fleet_sim(&server, &b_dir, "late", 2, &[]);
    wait_all_online(&server, "mix", 2).await;
    wait_all_online(&server, "late", 2).await;
    let (code, _, err) = server.cli(&[
        "groups",
        "add",
        "both",
        "--hostname",
        "mix-*",
        "--hostname",
        "late-*",
    ]);
    assert_eq!(code, 0, "{err}");
    // The late endpoints go offline just as the batch starts...
    drop(fleet_b);
    let id = start_batch(
        &server,
        "both",
        &["--max-concurrency", "1", "--expire", "10m"],
    );
    eventually(
        Duration::from_secs(60),
        "the online ones to finish",
        || async {
            let b = batch(&server, id).await;
            let items = b["items"].as_array()?.clone();
            let mix_done = items
                .iter()
                .filter(|i| {
                    i["hostname"].as_str().is_some_and(|h| h.starts_with("mix"))
                        && i["state"] == "done"
                })
                .count();
            (mix_done == 2).then_some(())
        },
    )
    .await;
    // ...so the batch waits for them, still running.
    let b = batch(&server, id).await;
    assert_eq!(b["state"], "running", "{b}");
    // They come back (same data directories, same identities) and are captured.
    let _b_again = fleet_sim(&server, &b_dir, "late", 2, &[]);
    let b = wait_batch_end(&server, id, Duration::from_secs(120)).await;
    assert_eq!(b["state"], "complete", "{b}");
    assert_eq!(b["totals"]["done"], 4, "{b}");
    let snaps = complete_snapshots(&server).await;
    for h in ["mix-01", "mix-02", "late-01", "late-02"] {
        assert_eq!(snaps[h].len(), 1, "{h}: {snaps:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_killed_mid_batch_finishes_it_after_restart_capturing_each_endpoint_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let flags = ["--capture-rate-kib", "2048", "--job-retry-base-ms", "200"];
    let mut server = TestServer::spawn_in(&data, &flags);
    let _fleet = fleet_sim(
        &server,
        &tmp.path().join("fleet"),
        "kill",
        6,
        &["--db-mib", "3"],
    );
    wait_all_online(&server, "kill", 6).await;
    add_group(&server, "kill", "kill-*");
    let id = start_batch(&server, "kill", &["--max-concurrency", "2"]);
    // Kill it while some captures are done and others are mid-transfer.
    eventually(Duration::from_secs(120), "a capture to finish", || async {
        let b = batch(&server, id).await;
        (b["totals"]["done"].as_u64()? >= 1 && b["totals"]["running"].as_u64()? >= 1).then_some(())
    })
    .await;
    crash_and_restart_in_place(&mut server, &flags);
    let b = wait_batch_end(&server, id, Duration::from_secs(240)).await;
    assert_eq!(b["state"], "complete", "{b}");
    assert_eq!(b["totals"]["done"], 6, "{b}");
    // Every endpoint captured exactly once: one snapshot row each, all complete, no partials.
    let (_, groups) = server.get("/v1/snapshots").await;
    for g in groups.as_array().unwrap() {
        let snaps = g["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 1, "{g}");
        assert_eq!(snaps[0]["state"], "complete", "{g}");
    }
    assert_eq!(groups.as_array().unwrap().len(), 6);
    let partials: Vec<_> = files_under(&data.join("snapshots"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
}

/// The narrowest crash window of a batch: an item's snapshot row and running state are written
/// (one transaction) and the server is killed before its capture job is queued. After the restart
/// the batch queues that capture under the item's key and completes: no failure, one snapshot
/// per endpoint. (Made deterministic by writing that moment's catalog while the server is down.)
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_item_killed_between_its_snapshot_row_and_its_capture_job_is_captured_after_a_restart()
 {
    if !crate::support::catalog_in_data_dir(
        "a_batch_item_killed_between_its_snapshot_row_and_its_capture_job_is_captured_after_a_restart",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let flags = ["--capture-rate-kib", "256", "--job-retry-base-ms", "200"];
    let mut server = TestServer::spawn_in(&data, &flags);
    let _fleet = fleet_sim(
        &server,
        &tmp.path().join("fleet"),
        "gap",
        2,
        &["--db-mib", "3"],
    );
    wait_all_online(&server, "gap", 2).await;
    add_group(&server, "gap", "gap-*");
    // One capture at a time, each ~12 s at 256 KiB/s: the second endpoint waits its turn.
    let id = start_batch(&server, "gap", &["--max-concurrency", "1"]);
    let waiting = eventually(
        Duration::from_secs(60),
        "one capture running, one waiting",
        || async {
            let b = batch(&server, id).await;
            if b["totals"]["running"] != 1 || b["totals"]["queued"] != 1 {
                return None;
            }
            let item = b["items"]
                .as_array()?
                .iter()
                .find(|i| i["state"] == "queued")?;
            Some(item["hostname"].as_str()?.to_owned())
        },
    )
    .await;
    let mut dispatched = 0i64;
    crash_and_restart_in_place_after(&mut server, &flags, |data| {
        let catalog = rusqlite::Connection::open(data.join("catalog.db")).unwrap();
        dispatched = catalog
            .query_row(
                "INSERT INTO snapshots (endpoint_id, state, origin, requested_by, created_ms)
                 SELECT id, 'queued', 'capture', 'admin', 1 FROM endpoints WHERE hostname = ?1
                 RETURNING id",
                [&waiting],
                |r| r.get(0),
            )
            .unwrap();
        let changed = catalog
            .execute(
                "UPDATE batch_items SET state = 'running', snapshot_id = ?1
                 WHERE batch_id = ?2 AND hostname = ?3 AND state = 'queued'",
                rusqlite::params![dispatched, id, waiting],
            )
            .unwrap();
        assert_eq!(
            changed, 1,
            "{waiting} was still waiting when the server was killed"
        );
    });
    let b = wait_batch_end(&server, id, Duration::from_secs(180)).await;
    assert_eq!(b["state"], "complete", "{b}");
    assert_eq!(b["totals"]["done"], 2, "{b}");
    let (_, snap) = server.get(&format!("/v1/snapshots/{dispatched}")).await;
    assert_eq!(
        snap["state"], "complete",
        "the dispatched row is the one captured: {snap}"
    );
    let (_, groups) = server.get("/v1/snapshots").await;
    for g in groups.as_array().unwrap() {
        assert_eq!(g["snapshots"].as_array().unwrap().len(), 1, "{g}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_removed_while_its_batch_runs_ends_the_batch_cancelled_with_the_reason() {
    let server = TestServer::spawn();
    let dir = tempfile::tempdir().unwrap();
    let _fleet = fleet_sim(&server, dir.path(), "gone", 1, &[]);
    wait_all_online(&server, "gone", 1).await;
    register_offline(&server, "gone-77").await;
    add_group(&server, "gone", "gone-*");
    eventually(Duration::from_secs(20), "gone-77 to go offline", || async {
        let (_, list) = server.get("/v1/endpoints?search=gone-77").await;
        (list[0]["online"] == false).then_some(())
    })
    .await;
    let id = start_batch(&server, "gone", &["--expire", "1h"]);
    eventually(
        Duration::from_secs(60),
        "the online endpoint's capture",
        || async {
            let b = batch(&server, id).await;
            (b["totals"]["done"] == 1).then_some(())
        },
    )
    .await;
    let (code, _, err) = server.cli(&["groups", "remove", "gone", "--yes"]);
    assert_eq!(code, 0, "{err}");
    let b = wait_batch_end(&server, id, Duration::from_secs(30)).await;
    assert_eq!(b["state"], "cancelled", "{b}");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("group gone was removed"),
        "{b}"
    );
    assert_eq!(b["totals"]["skipped"], 1, "{b}");
    assert_eq!(b["totals"]["done"], 1, "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reserve_beyond_the_free_space_fails_captures_before_writing_and_pauses_the_batch() {
    // A reserve larger than any disk: every capture finds too little free space (runs without
    // root; the disk really filling mid-batch is the tmpfs test below).
    let server = TestServer::spawn_with(&["--capture-reserve-mib", "1000000000"]);
    let dir = tempfile::tempdir().unwrap();
    let _fleet = fleet_sim(&server, dir.path(), "full", 4, &[]);
    wait_all_online(&server, "full", 4).await;
    add_group(&server, "full", "full-*");
    let id = start_batch(
        &server,
        "full",
        &["--max-concurrency", "1", "--failure-limit", "2"],
    );
    let b = eventually(Duration::from_secs(60), "the batch to pause", || async {
        let b = batch(&server, id).await;
        (b["state"] == "paused").then_some(b)
    })
    .await;
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("reaching the failure limit 2"),
        "{b}"
    );
    assert_eq!(b["totals"]["failed"], 2, "{b}");
    assert_eq!(b["totals"]["queued"], 2, "{b}");
    for item in b["items"].as_array().unwrap() {
        if item["state"] == "failed" {
            assert!(
                item["error"]
                    .as_str()
                    .unwrap()
                    .contains("insufficient disk space"),
                "{item}"
            );
        }
    }
    // Nothing partial was left in the store.
    let partials: Vec<_> = files_under(&server.data_dir.join("snapshots"))
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
    // Queue status shows the paused batch with its progress; cancel ends it.
    let (code, out, _) = server.cli(&["queue", "status"]);
    assert_eq!(code, 0);
    assert!(out.contains("batches:") && out.contains("paused"), "{out}");
    let (code, _, err) = server.cli(&["fleet", "cancel", &id.to_string(), "--yes"]);
    assert_eq!(code, 0, "{err}");
    let b = wait_batch_end(&server, id, Duration::from_secs(30)).await;
    assert_eq!(b["state"], "cancelled", "{b}");
    assert_eq!(b["totals"]["skipped"], 2, "{b}");
}

/// A small tmpfs mounted on `dir`, unmounted (lazily, so a process still in it cannot stop
/// that) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounting needs root (CAP_SYS_ADMIN): the error says why it could not.
    fn mount(dir: &Path, bytes: u64) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let size = format!("size={bytes},mode=0700");
        run_mount(&["-t", "tmpfs", "-o", &size, "snapq-test"], dir)?;
        Ok(Tmpfs(dir.to_owned()))
    }

    /// Shrinks (or grows) it to `bytes`, keeping what it holds.
    fn resize(&self, bytes: u64) {
        run_mount(&["-o", &format!("remount,size={bytes}")], &self.0).unwrap();
    }
}

fn run_mount(args: &[&str], dir: &Path) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(())
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_fills_mid_batch_fails_the_later_captures_before_writing_and_pauses_the_batch()
{
    // The snapshot store is a file system of its own, a small one.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let store = data.join("snapshots");
    let tmpfs = match Tmpfs::mount(&store, 64 << 20) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "skipping: this test needs a small tmpfs for the store, and mount failed: {e}"
            );
            return;
        }
    };
    let server = TestServer::spawn_in(&data, &["--capture-reserve-mib", "0"]);
    let _fleet = fleet_sim(
        &server,
        &tmp.path().join("fleet"),
        "fill",
        6,
        &["--db-mib", "2"],
    );
    wait_all_online(&server, "fill", 6).await;
    add_group(&server, "fill", "fill-*");
    // Room for two of these databases and a half: the first captures fit, then the disk is full.
    let biggest = (1..=6)
        .map(|i| {
            let dir = tmp.path().join("fleet").join(host("fill", i));
            snapq::agent::staging::db_bytes(&snapq::layout::AgentDir::new(dir).monitor_db())
        })
        .max()
        .unwrap();
    tmpfs.resize(biggest * 5 / 2);
    let id = start_batch(
        &server,
        "fill",
        &["--max-concurrency", "1", "--failure-limit", "2"],
    );
    let b = eventually(Duration::from_secs(120), "the batch to pause", || async {
        let b = batch(&server, id).await;
        (b["state"] != "running").then_some(b)
    })
    .await;
    assert_eq!(b["state"], "paused", "{b}");
    let done = b["totals"]["done"].as_u64().unwrap();
    assert!((1..=3).contains(&done), "the disk filled mid-batch: {b}");
    assert_eq!(b["totals"]["failed"], 2, "{b}");
    assert_eq!(b["totals"]["queued"].as_u64().unwrap(), 6 - done - 2, "{b}");
    // The pause says why, and which cause to fix.
    let reason = b["reason"].as_str().unwrap();
    assert!(reason.contains("reaching the failure limit 2"), "{b}");
    assert!(reason.contains("insufficient disk space"), "{b}");
    // Each failed capture failed before writing a byte, with the disk reason.
    let (_, groups) = server.get("/v1/snapshots").await;
    let snapshots: Vec<&Value> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["snapshots"].as_array().unwrap())
        .collect();
    for item in b["items"].as_array().unwrap() {
        if item["state"] != "failed" {
            continue;
        }
        let error = item["error"].as_str().unwrap();
        let h = item["hostname"].as_str().unwrap();
        assert!(
            error.contains(&format!("insufficient disk space for the {h} snapshot")),
            "{item}"
        );
        let snap = snapshots
            .iter()
            .find(|s| s["id"] == item["snapshot_id"])
            .unwrap();
        assert_eq!(snap["state"], "failed", "{snap}");
        assert_eq!(snap["bytes_done"], 0, "{snap}");
    }
    // Nothing partial in the store: only the complete snapshots' files, each whole.
    let files = files_under(&store);
    let complete: Vec<&&Value> = snapshots
        .iter()
        .filter(|s| s["state"] == "complete")
        .collect();
    assert_eq!(complete.len() as u64, done, "{groups}");
    assert_eq!(files.len() as u64, done, "{files:?}");
    for s in complete {
        let name = s["name"].as_str().unwrap();
        let file = files
            .iter()
            .find(|f| f.file_name().unwrap().to_string_lossy().starts_with(name))
            .unwrap_or_else(|| panic!("{name} is not in the store: {files:?}"));
        assert_eq!(
            std::fs::metadata(file).unwrap().len(),
            s["size"].as_u64().unwrap()
        );
        snapq_core::verify::verify_snapshot(file).unwrap();
    }
    // `snapshots list` agrees: nothing half-written is listed complete.
    let listed = cli_json(&server, &["snapshots", "list"]);
    let listed_complete = listed
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["snapshots"].as_array().unwrap())
        .filter(|s| s["state"] == "complete")
        .count();
    assert_eq!(listed_complete as u64, done, "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_a_flaky_fleet_completes_capturing_every_endpoint_once_after_retries() {
    // Captures of 2 MiB at 1 MiB/s: the batch runs while the offline ones are away.
    let server =
        TestServer::spawn_with(&["--job-retry-base-ms", "200", "--capture-rate-kib", "1024"]);
    let dir = tempfile::tempdir().unwrap();
    // Half of this fleet misbehaves (`snapq::agent::fleet::flaky_for`): flaky-01 and flaky-05 cut
    // their first two downloads mid-transfer, flaky-02 and flaky-04 go offline for 9-11 s a few
    // seconds after they start.
    let _fleet = fleet_sim(
        &server,
        dir.path(),
        "flaky",
        5,
        &["--flaky", "50", "--db-mib", "2"],
    );
    for i in 1..=5 {
        let h = host("flaky", i);
        eventually(
            Duration::from_secs(20),
            "the endpoint to enroll",
            || async {
                let (_, list) = server.get(&format!("/v1/endpoints?search={h}")).await;
                list.as_array()?
                    .iter()
                    .any(|e| e["hostname"] == h)
                    .then_some(())
            },
        )
        .await;
    }
    add_group(&server, "flaky", "flaky-*");
    let id = start_batch(
        &server,
        "flaky",
        &["--max-concurrency", "2", "--expire", "10m"],
    );
    // While it runs, queue status shows it with its progress.
    eventually(
        Duration::from_secs(60),
        "queue status to show the running batch",
        || async {
            let (code, out, _) = server.cli(&["queue", "status"]);
            assert_eq!(code, 0);
            out.lines()
                .any(|l| {
                    l.trim_start().starts_with(&id.to_string())
                        && l.contains("flaky")
                        && l.contains("running")
                        && l.contains("total 5")
                })
                .then_some(())
        },
    )
    .await;
    // An endpoint goes away while the batch runs; the batch waits for it.
    eventually(
        Duration::from_secs(60),
        "a flaky endpoint to go offline mid-batch",
        || async {
            let (_, list) = server.get("/v1/endpoints?search=flaky").await;
            let away = list.as_array()?.iter().any(|e| e["online"] == false);
            (away && batch(&server, id).await["state"] == "running").then_some(())
        },
    )
    .await;
    let b = wait_batch_end(&server, id, Duration::from_secs(240)).await;
    assert_eq!(b["state"], "complete", "{b}");
    assert_eq!(b["totals"]["done"], 5, "{b}");
    let snaps = complete_snapshots(&server).await;
    for i in 1..=5 {
        assert_eq!(snaps[&host("flaky", i)].len(), 1, "{snaps:?}");
    }
    // The cut downloads were retried (and resumed from their partial file): their capture
    // jobs show the interrupted attempts before the one that finished.
    let jobs = cli_json(&server, &["queue", "list", "--batch", &id.to_string()]);
    let mut interrupted = 0;
    for j in jobs.as_array().unwrap() {
        if j["kind"] != "capture" {
            continue;
        }
        assert_eq!(j["state"], "done", "{j}");
        let detail = cli_json(&server, &["queue", "show", j["id"].as_str().unwrap()]);
        let log = detail["attempt_log"].as_array().unwrap();
        let cut = log
            .iter()
            .filter(|a| {
                a["outcome"] == "transient"
                    && a["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("download interrupted"))
            })
            .count();
        if cut > 0 {
            assert_eq!(log.last().unwrap()["outcome"], "ok", "{detail}");
            assert!(j["attempts"].as_u64().unwrap() > 1, "{detail}");
        }
        interrupted += cut;
    }
    assert!(interrupted >= 2, "no cut download was retried: {jobs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_show_says_whether_a_snapshot_is_kept_and_by_whom() {
    let server = TestServer::spawn();
    let dir = tempfile::tempdir().unwrap();
    let file = crate::support::snapshot_file(dir.path(), "show-01", 100);
    let (code, out, err) = server.cli(&["upload", file.to_str().unwrap(), "--connect", "--json"]);
    assert_eq!(code, 0, "{err}");
    let uploaded: Value = serde_json::from_str(&out).unwrap();
    let id = uploaded[0]["snapshot"]["id"].as_i64().unwrap().to_string();

    let shown = cli_json(&server, &["snapshots", "show", &id]);
    assert_eq!(shown["kept"], false, "{shown}");
    assert!(shown["kept_by"].is_null(), "{shown}");
    let (code, out, _) = server.cli(&["snapshots", "show", &id]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["kept", "no"]),
        "{out}"
    );

    let (code, _, err) = server.cli(&["snapshots", "keep", &id]);
    assert_eq!(code, 0, "{err}");
    let shown = cli_json(&server, &["snapshots", "show", &id]);
    assert_eq!(shown["kept"], true, "{shown}");
    assert_eq!(shown["kept_by"], "admin", "{shown}");
    assert!(shown["kept_ms"].as_i64().unwrap() > 0, "{shown}");
    let (_, out, _) = server.cli(&["snapshots", "show", &id]);
    let line = out.lines().find(|l| l.starts_with("kept")).unwrap();
    assert!(line.contains("yes, never pruned (marked by admin"), "{out}");

    let (code, _, err) = server.cli(&["snapshots", "unkeep", &id]);
    assert_eq!(code, 0, "{err}");
    let shown = cli_json(&server, &["snapshots", "show", &id]);
    assert_eq!(shown["kept"], false, "{shown}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_schedules_on_one_group_in_the_same_minute_each_start_exactly_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = TestServer::spawn_in(&tmp.path().join("server"), &[]);
    let _fleet = fleet_sim(&server, &tmp.path().join("fleet"), "cron", 2, &[]);
    wait_all_online(&server, "cron", 2).await;
    add_group(&server, "cron", "cron-*");
    for name in ["every-a", "every-b"] {
        let s = cli_json(
            &server,
            &[
                "schedule",
                "add",
                name,
                "--cron",
                "* * * * *",
                "--tz",
                "Europe/Berlin",
                "--group",
                "cron",
            ],
        );
        assert!(s["next_run_utc"].as_str().unwrap().ends_with("UTC"), "{s}");
    }
    // The next minute's tick: one batch per schedule.
    let batches = eventually(
        Duration::from_secs(100),
        "both schedules to tick",
        || async {
            let (_, list) = server.get("/v1/fleet/batches").await;
            let list = list.as_array()?.clone();
            let names: std::collections::BTreeSet<_> = list
                .iter()
                .filter_map(|b| b["schedule_name"].as_str().map(str::to_owned))
                .collect();
            (names.len() == 2).then_some(list)
        },
    )
    .await;
    let ticks = |list: &Value, name: &str| -> Vec<i64> {
        list.as_array()
            .unwrap()
            .iter()
            .filter(|b| b["schedule_name"] == name)
            .map(|b| b["tick_ms"].as_i64().unwrap())
            .collect()
    };
    let first_tick = ticks(&Value::Array(batches.clone()), "every-a")[0];
    // A restart right after does not tick the same minute again. Nothing shows that the
    // restarted scheduler has looked at its schedules, except its next tick: wait for that one
    // (the minute after), then no minute may have two batches.
    crash_and_restart_in_place(&mut server, &[]);
    let after = eventually(
        Duration::from_secs(100),
        "both schedules' next tick after the restart",
        || async {
            let (_, list) = server.get("/v1/fleet/batches").await;
            ["every-a", "every-b"]
                .iter()
                .all(|name| ticks(&list, name).iter().any(|t| *t > first_tick))
                .then_some(list)
        },
    )
    .await;
    for name in ["every-a", "every-b"] {
        let mut t = ticks(&after, name);
        let n = t.len();
        t.sort();
        t.dedup();
        assert_eq!(t.len(), n, "a tick ran twice: {after}");
    }
    assert!(batches.len() >= 2);
    let list = cli_json(&server, &["schedule", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(!list[0]["last_batch"].is_null(), "{list}");
    for name in ["every-a", "every-b"] {
        let (code, _, err) = server.cli(&["schedule", "pause", name]);
        assert_eq!(code, 0, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tick_while_the_previous_batch_runs_is_recorded_skipped() {
    let server = TestServer::spawn();
    register_offline(&server, "slow-01").await;
    add_group(&server, "slow", "slow-*");
    eventually(Duration::from_secs(20), "slow-01 to go offline", || async {
        let (_, list) = server.get("/v1/endpoints?search=slow-01").await;
        (list[0]["online"] == false).then_some(())
    })
    .await;
    let (code, _, err) = server.cli(&[
        "schedule",
        "add",
        "slow",
        "--cron",
        "0 3 * * *",
        "--group",
        "slow",
        "--expire",
        "1h",
    ]);
    assert_eq!(code, 0, "{err}");
    let first = cli_json(&server, &["schedule", "run", "slow"]);
    assert_eq!(first["state"], "running", "{first}");
    // A manual run is the tick of its millisecond: in the (unlikely) same millisecond as the
    // first, the server answers that this tick already has its batch; run again then.
    let second = eventually(
        Duration::from_secs(10),
        "a second run with its own tick",
        || async {
            let (code, out, err) = server.cli(&["schedule", "run", "slow", "--json"]);
            if code != 0 {
                assert!(err.contains("already has its batch"), "{err}");
                return None;
            }
            Some(serde_json::from_str::<Value>(&out).unwrap())
        },
    )
    .await;
    assert_eq!(second["state"], "skipped", "{second}");
    assert!(
        second["reason"].as_str().unwrap().contains(&format!(
            "previous batch {} of schedule slow was still running",
            first["id"]
        )),
        "{second}"
    );
    let show = cli_json(&server, &["schedule", "show", "slow"]);
    assert_eq!(show["batches"].as_array().unwrap().len(), 2, "{show}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keep_rule_prunes_older_snapshots_through_audited_delete_jobs_but_never_kept_ones() {
    let server = TestServer::spawn();
    let dir = tempfile::tempdir().unwrap();
    let _fleet = fleet_sim(&server, dir.path(), "keep", 2, &[]);
    wait_all_online(&server, "keep", 2).await;
    add_group(&server, "keep", "keep-*");
    // Two earlier captures of each endpoint; one of keep-01's is marked keep.
    for _ in 0..2 {
        let id = start_batch(&server, "keep", &[]);
        let b = wait_batch_end(&server, id, Duration::from_secs(90)).await;
        assert_eq!(b["state"], "complete", "{b}");
    }
    let before = complete_snapshots(&server).await;
    let kept = before["keep-01"].last().unwrap()["id"].as_i64().unwrap();
    let (code, _, err) = server.cli(&["snapshots", "keep", &kept.to_string()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = server.cli(&[
        "schedule",
        "add",
        "prune",
        "--cron",
        "0 4 * * *",
        "--group",
        "keep",
        "--keep-last",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let run = cli_json(&server, &["schedule", "run", "prune"]);
    let b = wait_batch_end(
        &server,
        run["id"].as_i64().unwrap(),
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(b["state"], "complete", "{b}");
    // The newest of each endpoint stays, and the kept one.
    let after = eventually(Duration::from_secs(60), "the prune", || async {
        let s = complete_snapshots(&server).await;
        (s["keep-01"].len() == 2 && s["keep-02"].len() == 1).then_some(s)
    })
    .await;
    assert!(
        after["keep-01"].iter().any(|s| s["id"] == kept),
        "{after:?}"
    );
    // The listing marks the kept one, and only it.
    for s in after.values().flatten() {
        assert_eq!(s["kept"], s["id"] == kept, "{s}");
    }
    let audit = cli_json(&server, &["audit", "list", "--action", "retention"]);
    assert!(!audit.as_array().unwrap().is_empty(), "{audit}");
    let audit = cli_json(&server, &["audit", "list", "--action", "snapshot.delete"]);
    assert_eq!(audit.as_array().unwrap().len(), 3, "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tick_missed_while_the_server_was_down_runs_once_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let mut server = TestServer::spawn_in(&data, &[]);
    add_group(&server, "missed", "missed-*");
    let (code, _, err) = server.cli(&[
        "schedule",
        "add",
        "minutely",
        "--cron",
        "* * * * *",
        "--group",
        "missed",
        "--expire",
        "10m",
    ]);
    assert_eq!(code, 0, "{err}");
    let added_ms = chrono::Utc::now().timestamp_millis();
    server.kill();
    // Down across the next minute's tick. A sleep on purpose: what must pass is wall-clock time
    // while no server runs, and there is nothing to poll.
    let next_minute = (added_ms / 60_000 + 1) * 60_000;
    let wait = (next_minute - chrono::Utc::now().timestamp_millis()).max(0) as u64 + 1500;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    server.crash_and_restart();
    let batches = eventually(
        Duration::from_secs(20),
        "the missed tick's batch",
        || async {
            let (_, list) = server.get("/v1/fleet/batches").await;
            let list = list.as_array()?.clone();
            (!list.is_empty()).then_some(list)
        },
    )
    .await;
    // Exactly one batch for the missed minute (a later minute may have ticked since).
    let missed: Vec<_> = batches
        .iter()
        .filter(|b| b["tick_ms"].as_i64() == Some(next_minute))
        .collect();
    assert_eq!(missed.len(), 1, "{batches:?}");
    assert_eq!(missed[0]["schedule_name"], "minutely");
    server.cli(&["schedule", "pause", "minutely"]);
}
