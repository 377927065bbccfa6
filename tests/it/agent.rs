//! The endpoint side, end to end: a real `snapq agent` process over loopback HTTP.

use std::time::Duration;

use serde_json::Value;

use crate::support::{AgentOptions, TestAgent, count_events, eventually, run_snapq};

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Downloads a staged snapshot into `dir` (following the copy while the agent still writes it),
/// then waits for the staging to be `ready` and checks the bytes have the sha256 it reports.
/// Returns the path and the finished staging.
async fn download(
    agent: &TestAgent,
    id: &str,
    dir: &std::path::Path,
) -> (std::path::PathBuf, Value) {
    let response = agent
        .client()
        .get(agent.url(&format!("/v1/snapshots/{id}")))
        .bearer_auth(&agent.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.unwrap();
    let path = dir.join(format!("{id}.db"));
    std::fs::write(&path, &bytes).unwrap();
    let (status, staged) = agent
        .get(&format!("/v1/snapshots/{id}/info?wait_ms=30000"))
        .await;
    assert_eq!(status, 200, "{staged}");
    assert_eq!(staged["state"], "ready", "{staged}");
    assert_eq!(
        snapq_core::verify::sha256_file(&path).unwrap(),
        staged["sha256"].as_str().unwrap()
    );
    assert_eq!(bytes.len() as u64, staged["size"].as_u64().unwrap());
    (path, staged)
}

#[tokio::test(flavor = "multi_thread")]
async fn real_recorder_sees_a_command_and_its_snapshot_holds_the_staged_event_count() {
    let agent = TestAgent::spawn_with(AgentOptions {
        simulate: None,
        ..AgentOptions::default()
    });
    let marker = format!("snapq-it-{}", std::process::id());
    // Runs long enough to be seen even when a loaded machine slows the recorder's /proc scans.
    let mut command = std::process::Command::new("sh")
        .args(["-c", &format!("sleep 5; echo {marker} > /dev/null")])
        .spawn()
        .unwrap();
    let filter = encode(&format!("cmdline co {marker}"));
    let found = eventually(
        Duration::from_secs(40),
        "the recorder to see the command",
        || async {
            let (status, page) = agent
                .get(&format!("/v1/events?type=process&where={filter}"))
                .await;
            assert_eq!(status, 200, "{page}");
            let events = page["events"].as_array().unwrap().clone();
            (!events.is_empty()).then_some(events)
        },
    )
    .await;
    assert!(
        found[0]["path"].as_str().unwrap().ends_with("sh"),
        "{found:?}"
    );
    assert!(command.wait().unwrap().success());

    let (status, staged) = agent.post("/v1/snapshots").await;
    assert_eq!(status, 201, "{staged}");
    let tmp = tempfile::tempdir().unwrap();
    let (path, staged) = download(&agent, staged["id"].as_str().unwrap(), tmp.path()).await;
    assert_eq!(count_events(&path), staged["events"].as_u64().unwrap());
    let copy = snapq_core::verify::open_snapshot(&path).unwrap();
    let n: i64 = copy
        .query_row(
            "SELECT count(*) FROM process WHERE instr(cmdline, ?1) > 0",
            [&marker],
            |r| r.get(0),
        )
        .unwrap();
    assert!(n >= 1, "the snapshot lacks the command the test ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_stay_consistent_while_the_simulator_writes() {
    let agent = TestAgent::spawn_with(AgentOptions {
        simulate: Some(2000),
        prefill: 50_000,
        ..AgentOptions::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let (status, staged) = agent.post("/v1/snapshots").await;
        assert_eq!(status, 201, "{staged}");
        let (path, staged) = download(&agent, staged["id"].as_str().unwrap(), tmp.path()).await;
        let events = count_events(&path);
        assert_eq!(events, staged["events"].as_u64().unwrap());
        assert!(events >= 50_000);
    }
    // The recorder kept writing: the live database has moved on past the snapshot.
    let (_, info) = agent.get("/v1/endpoint").await;
    assert_eq!(info["hostname"], "web-01");
    assert!(info["disk_free_bytes"].as_u64().unwrap() > 0);
    assert!(info["db_bytes"].as_u64().unwrap() > 0);

    // Its own metrics count what it wrote and the three stagings.
    let text = agent
        .client()
        .get(agent.url("/metrics"))
        .bearer_auth(&agent.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = crate::support::metric_samples(&text);
    let get = |key: &str| *m.get(key).unwrap_or_else(|| panic!("no {key} in:\n{text}"));
    assert!(get(r#"snapq_agent_events_written_total{type="process"}"#) > 0.0);
    assert_eq!(get("snapq_agent_staging_seconds_count"), 3.0);
    assert_eq!(get("snapq_agent_staging_writer_hold_seconds_count"), 3.0);
    assert!(get("snapq_agent_writer_wait_seconds_count") > 0.0);
    assert!(get("snapq_agent_recorder_database_bytes") > 0.0);
    let unauthenticated = agent
        .client()
        .get(agent.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn staged_copies_download_in_ranges_and_can_be_deleted() {
    let agent = TestAgent::spawn_with(AgentOptions {
        prefill: 5_000,
        ..AgentOptions::default()
    });
    let (_, staged) = agent.post("/v1/snapshots").await;
    let id = staged["id"].as_str().unwrap();
    let size = staged["size"].as_u64().unwrap();
    let url = agent.url(&format!("/v1/snapshots/{id}"));
    let ranged = |range: String| {
        agent
            .client()
            .get(&url)
            .bearer_auth(&agent.token)
            .header("Range", range)
            .send()
    };
    let first = ranged("bytes=0-99".into()).await.unwrap();
    assert_eq!(first.status(), 206);
    assert_eq!(
        first.headers()["content-range"].to_str().unwrap(),
        format!("bytes 0-99/{size}")
    );
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{id}\""));
    assert_eq!(first.bytes().await.unwrap().len(), 100);

    let tail = ranged(format!("bytes={}-", size - 10)).await.unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap().len(), 10);

    let beyond = ranged(format!("bytes={size}-")).await.unwrap();
    assert_eq!(beyond.status(), 416);
    assert_eq!(
        beyond.headers()["content-range"].to_str().unwrap(),
        format!("bytes */{size}")
    );

    let delete = |id: String| {
        agent
            .client()
            .delete(agent.url(&format!("/v1/snapshots/{id}")))
            .bearer_auth(&agent.token)
            .send()
    };
    assert_eq!(delete(id.into()).await.unwrap().status(), 204);
    assert_eq!(delete(id.into()).await.unwrap().status(), 404);
    let (status, body) = agent.get(&format!("/v1/snapshots/{id}")).await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no staged snapshot")
    );
    let (status, _) = agent.get("/v1/snapshots/..%2F..%2Fmonitor").await;
    assert_eq!(status, 404);
    let (status, _) = agent.get(&format!("/v1/snapshots/{id}/info")).await;
    assert_eq!(status, 404);
    let (_, other) = agent.post("/v1/snapshots").await;
    let other = other["id"].as_str().unwrap();
    let (status, body) = agent
        .get(&format!("/v1/snapshots/{other}/info?wait_ms=soon"))
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("wait_ms"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_snapshot_requests_at_once_both_get_a_valid_copy() {
    let agent = TestAgent::spawn_with(AgentOptions {
        prefill: 20_000,
        ..AgentOptions::default()
    });
    let (a, b) = tokio::join!(agent.post("/v1/snapshots"), agent.post("/v1/snapshots"));
    assert_eq!((a.0, b.0), (201, 201), "{a:?} {b:?}");
    assert_ne!(a.1["id"], b.1["id"]);
    let tmp = tempfile::tempdir().unwrap();
    for staged in [a.1, b.1] {
        let (path, staged) = download(&agent, staged["id"].as_str().unwrap(), tmp.path()).await;
        assert_eq!(count_events(&path), staged["events"].as_u64().unwrap());
    }
    let (_, list) = agent.get("/v1/snapshots").await;
    assert_eq!(list.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_needs_the_right_token() {
    let agent = TestAgent::spawn();
    for (token, path) in [
        (None, "/v1/endpoint"),
        (Some("wrong"), "/v1/endpoint"),
        (Some("wrong"), "/v1/events"),
        (None, "/v1/snapshots"),
    ] {
        let mut request = agent.client().get(agent.url(path));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{token:?} {path}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("bearer token"));
    }
    let staged = agent
        .client()
        .post(agent.url("/v1/snapshots"))
        .send()
        .await
        .unwrap();
    assert_eq!(staged.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_queries_get_clear_errors_naming_what_is_valid() {
    let agent = TestAgent::spawn_with(AgentOptions {
        prefill: 2_000,
        ..AgentOptions::default()
    });
    let cases: &[(String, &str)] = &[
        ("type=bogus".into(), "process"),
        (
            format!("type=process&where={}", encode("colour eq red")),
            "cmdline",
        ),
        (
            format!("type=process&where={}", encode("path like bash")),
            "co",
        ),
        ("type=process&since=yesterday".into(), "RFC 3339"),
        ("type=process&limit=1000000".into(), "limit"),
        ("type=process&limit=ten".into(), "limit"),
        ("type=process&cursor=garbage".into(), "cursor"),
        ("type=process&sort=-colour".into(), "sort"),
        ("type=process&bogus=1".into(), "valid"),
    ];
    for (query, hint) in cases {
        let (status, body) = agent.get(&format!("/v1/events?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(hint), "{query}: {message}");
    }

    // A cursor from one query is refused by another.
    let (_, page) = agent.get("/v1/events?type=dns&limit=5").await;
    let cursor = encode(page["next_cursor"].as_str().unwrap());
    let (status, body) = agent
        .get(&format!("/v1/events?type=file&limit=5&cursor={cursor}"))
        .await;
    assert_eq!(status, 400, "{body}");

    // SQL-looking values are data: no error, no rows, tables intact.
    let (status, body) = agent
        .get(&format!(
            "/v1/events?type=process&where={}",
            encode("path eq x' OR 1=1; DROP TABLE process; --")
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"].as_array().unwrap().len(), 0);
    let (_, summary) = agent.get("/v1/events/summary").await;
    assert!(summary["counts"]["process"].as_u64().unwrap() > 0);

    let (status, _) = agent.get("/v1/processes/999999999/tree").await;
    assert_eq!(status, 404);
    let (status, _) = agent.get("/v1/processes/abc/tree").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_follow_their_cursor_and_process_trees_link_up() {
    let agent = TestAgent::spawn_with(AgentOptions {
        prefill: 3_000,
        simulate: Some(1),
        ..AgentOptions::default()
    });
    let (_, summary) = agent.get("/v1/events/summary").await;
    let until = summary["newest_ts"].as_i64().unwrap() + 1;
    let expected = {
        let (_, all) = agent
            .get(&format!(
                "/v1/events?type=network&until={until}&limit=10000"
            ))
            .await;
        all["events"].as_array().unwrap().len()
    };
    assert!(expected > 50);
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = format!("/v1/events?type=network&until={until}&limit=37");
        if let Some(c) = &cursor {
            q += &format!("&cursor={}", encode(c));
        }
        let (status, page) = agent.get(&q).await;
        assert_eq!(status, 200, "{page}");
        for e in page["events"].as_array().unwrap() {
            assert!(seen.insert(e["id"].as_i64().unwrap()), "duplicate row");
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), expected);

    let (_, page) = agent
        .get(&format!(
            "/v1/events?type=process&where={}&limit=1",
            encode("parent_id gt 0")
        ))
        .await;
    let child = &page["events"][0];
    let (status, tree) = agent
        .get(&format!("/v1/processes/{}/tree", child["id"]))
        .await;
    assert_eq!(status, 200, "{tree}");
    assert_eq!(tree["process"]["id"], child["id"]);
    assert_eq!(
        tree["ancestors"].as_array().unwrap().last().unwrap()["id"],
        child["parent_id"]
    );
}

#[test]
fn the_agent_refuses_a_corrupt_database_and_leaves_it_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("monitor.db");
    std::fs::write(&db, b"this is a text file, not SQLite").unwrap();
    let data = tmp.path().to_str().unwrap();
    let (code, _, stderr) = run_snapq(&[
        "agent",
        "--data-dir",
        data,
        "--listen",
        "127.0.0.1:0",
        "--hostname",
        "web-01",
        "--simulate",
        "10",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("monitor.db"), "{stderr}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        b"this is a text file, not SQLite"
    );
}

#[test]
fn the_agent_refuses_a_data_dir_it_cannot_write() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let data = file.join("data");
    let (code, _, stderr) = run_snapq(&[
        "agent",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--simulate",
        "10",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("data directory"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_export_is_consistent_and_named_while_the_recorder_runs() {
    let agent = TestAgent::spawn_with(AgentOptions {
        hostname: "field_pc.corp".into(),
        simulate: Some(2000),
        prefill: 20_000,
        ..AgentOptions::default()
    });
    let out = tempfile::tempdir().unwrap();
    let data = agent.data_dir.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = run_snapq(&[
        "agent",
        "export",
        "--data-dir",
        &data,
        "--out",
        out.path().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let exported: Value = serde_json::from_str(&stdout).unwrap();
    let path = std::path::PathBuf::from(exported["path"].as_str().unwrap());
    let name: snapq_core::SnapshotName =
        path.file_name().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(name.hostname(), "field_pc.corp");
    assert_eq!(count_events(&path), exported["events"].as_u64().unwrap());
    assert_eq!(
        snapq_core::verify::sha256_file(&path).unwrap(),
        exported["sha256"].as_str().unwrap()
    );
    // Only the finished file is there: no temporary left behind.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);

    let missing = out.path().join("nope");
    let (code, _, stderr) = run_snapq(&[
        "agent",
        "export",
        "--data-dir",
        &data,
        "--out",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn another_process_reading_the_live_database_does_not_break_later_snapshots() {
    let agent = TestAgent::spawn_with(AgentOptions {
        simulate: Some(2000),
        prefill: 20_000,
        ..AgentOptions::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let db = agent.data_dir.join("monitor.db");
    for round in 0..3 {
        let (status, staged) = agent.post("/v1/snapshots").await;
        assert_eq!(status, 201, "round {round}: {staged}");
        let (path, staged) = download(&agent, staged["id"].as_str().unwrap(), tmp.path()).await;
        assert_eq!(count_events(&path), staged["events"].as_u64().unwrap());
        // An analyst's sqlite3 (another process) opens the live file and closes it again: if the
        // agent had lost its locks, this close would checkpoint and delete the live WAL.
        let status = std::process::Command::new(crate::support::BIN)
            .args([
                "agent",
                "export",
                "--data-dir",
                agent.data_dir.to_str().unwrap(),
                "--out",
            ])
            .arg(tmp.path())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let conn = rusqlite::Connection::open(&db).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM dns", [], |r| r.get(0))
            .unwrap();
        assert!(n > 0);
        drop(conn);
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        assert!(
            std::path::Path::new(&wal).exists(),
            "round {round}: the live WAL was deleted"
        );
    }
}
