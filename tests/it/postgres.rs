//! `snapq serve --database postgres://…`: the catalog in PostgreSQL (issue 11). Each test gets a
//! schema of its own from `snapq_testpg`; without a PostgreSQL the tests say they were skipped.
//! (`SNAPQ_IT_ON_POSTGRES=1` runs the whole suite that way; these run in every `cargo test`.)

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{BIN, TestServer, finish_within};

/// `snapq serve` on a fresh data directory and `url`, expected to exit: (code, stderr).
async fn serve_fails(url: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--database", url])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, _, err) = finish_within(child, Duration::from_secs(30)).await;
    (code, err)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_keeps_its_catalog_in_postgres_and_finds_it_again_after_a_restart() {
    let Some(db) = snapq_testpg::schema_or_skip("serve --database").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let mut server = TestServer::spawn_in(&data, &["--database", &db.url]);
    let (_, status) = server.get("/status").await;
    assert_eq!(status["catalog"], "postgres", "{status}");
    assert!(status["node"].as_str().unwrap().contains(':'), "{status}");
    let _agent = server.online_agent("pg-01", 2_000).await;
    let (code, out, err) = server.cli(&["capture", "pg-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let captured: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(captured[0]["state"], "complete", "{captured}");
    let (code, _, err) = server.cli(&["users", "add", "ana", "--role", "viewer"]);
    assert_eq!(code, 0, "{err}");

    // The rows are in PostgreSQL, not in the data directory.
    assert!(!data.join("catalog.db").exists());
    server.crash_and_restart();
    let (_, snaps) = server.get("/v1/snapshots").await;
    assert_eq!(snaps[0]["hostname"], "pg-01", "{snaps}");
    assert_eq!(snaps[0]["snapshots"][0]["state"], "complete", "{snaps}");
    let (_, users) = server.get("/v1/users").await;
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert!(names.contains(&"ana"), "{users}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_database_url_stops_the_server_with_the_reason() {
    // Not PostgreSQL: a usage error before anything starts.
    let (code, err) = serve_fails("mysql://root@127.0.0.1/snapq").await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("only PostgreSQL is supported"), "{err}");
    // Nothing listens there: exit 1, naming the database without its password.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, err) =
        serve_fails(&format!("postgres://snapq:hunter2@127.0.0.1:{port}/snapq")).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("opening the catalog in PostgreSQL at postgres://snapq:***@127.0.0.1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catalog_migrated_by_a_newer_snapq_is_refused() {
    let Some(db) = snapq_testpg::schema_or_skip("newer catalog schema").await else {
        return;
    };
    // A first start migrates the schema; a later snapq added a migration this one does not know.
    drop(TestServer::spawn_with(&["--database", &db.url]));
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000000, 'from the future', TRUE, '\\x00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let (code, err) = serve_fails(&db.url).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("newer than this snapq"), "{err}");
    assert!(err.contains("29991231000000"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_starting_at_once_on_an_empty_database_both_migrate_it_safely() {
    let Some(db) = snapq_testpg::schema_or_skip("concurrent migrations").await else {
        return;
    };
    let url = db.url.clone();
    let other = std::thread::spawn(move || TestServer::spawn_with(&["--database", &url]));
    let first = TestServer::spawn_with(&["--database", &db.url]);
    let second = other.join().unwrap();
    for node in [&first, &second] {
        let response = node.request("GET", "/status").send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    // The migrations were applied once, both successfully.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(applied.len(), files, "{applied:?}");
    assert!(applied.iter().all(|(_, ok)| *ok), "{applied:?}");
}

/// Copies the files that make a node the same service to every agent and user: its TLS pair,
/// tokens and the key agents' credentials derive from.
fn share_identity(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to.join("certs")).unwrap();
    for entry in std::fs::read_dir(from.join("certs")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join("certs").join(entry.file_name())).unwrap();
    }
    for file in ["admin.token", "enroll.token", "agents.key"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_over_one_catalog_and_store_each_serve_what_the_other_captured() {
    let Some(db) = snapq_testpg::schema_or_skip("two nodes").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("shared-store");
    // One drop folder both nodes watch, as two nodes mounting one share would.
    let drop_dir = tmp.path().join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let flags = [
        "--database",
        &db.url,
        "--store",
        store.to_str().unwrap(),
        "--watch",
        drop_dir.to_str().unwrap(),
        "--watch-quiet-ms",
        "200",
    ];
    let a = TestServer::spawn_in(&tmp.path().join("a"), &flags);
    share_identity(&a.data_dir, &tmp.path().join("b"));
    // B's queue commits asynchronously: the nodes work together either way.
    let b_flags: Vec<&str> = flags
        .iter()
        .copied()
        .chain(["--queue-async-commit"])
        .collect();
    let b = TestServer::spawn_in(&tmp.path().join("b"), &b_flags);
    let (_, status_a) = a.get("/status").await;
    let (_, status_b) = b.get("/status").await;
    assert_ne!(status_a["node"], status_b["node"]);
    // The queue status of either node lists both, each with its heartbeat, and says which one
    // answered.
    let (_, queue) = a.get("/v1/queue/status").await;
    let nodes = queue["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{queue}");
    assert_eq!(nodes[0]["node"], status_a["node"], "{queue}");
    assert_eq!(nodes[0]["this_node"], true, "{queue}");
    assert_eq!(nodes[1]["node"], status_b["node"], "{queue}");
    assert_eq!(nodes[1]["this_node"], false, "{queue}");
    for n in nodes {
        assert_eq!(n["silent"], false, "{queue}");
        assert!(n["heartbeat_age_ms"].as_i64().unwrap() < 30_000, "{queue}");
        assert!(
            n["kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k == "capture"),
            "{queue}"
        );
    }
    let (code, out, err) = b.cli(&["queue", "status"]);
    assert_eq!(code, 0, "{err}");
    for node in [&status_a["node"], &status_b["node"]] {
        assert!(out.contains(node.as_str().unwrap()), "{out}");
    }
    assert!(
        out.contains(&format!("* {}", status_b["node"].as_str().unwrap())),
        "{out}"
    );

    let _agent = a.online_agent("pg-02", 2_000).await;
    // Node B sees the endpoint node A enrolled, and captures it with the shared agents' key.
    b.wait_online("pg-02").await;
    // A live connection opened through node A pages the endpoint's events through node B.
    let (code, made) = a
        .post(
            "/v1/connections",
            serde_json::json!({ "targets": ["pg-02"] }),
        )
        .await;
    assert_eq!(code, 201, "{made}");
    let conn = made[0]["id"].as_i64().unwrap();
    let (code, page) = b
        .get(&format!(
            "/v1/connections/{conn}/events?type=process&limit=10"
        ))
        .await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["events"].as_array().unwrap().len(), 10, "{page}");
    let (code, out, err) = b.cli(&["capture", "pg-02", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let through_b: Value = serde_json::from_str(&out).unwrap();
    let id = through_b[0]["id"].as_i64().unwrap();
    assert_eq!(through_b[0]["state"], "complete", "{through_b}");
    // Node A lists and serves the file node B stored.
    let (_, shown) = a.get(&format!("/v1/snapshots/{id}")).await;
    assert_eq!(shown["state"], "complete", "{shown}");
    let (code, bytes) = a.get_bytes(&format!("/v1/snapshots/{id}/file")).await;
    assert_eq!(code, 200);
    assert_eq!(bytes.len() as u64, shown["size"].as_u64().unwrap());
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    // An export made on node A is written to the shared store: node B serves and deletes it.
    let (code, export) = a
        .post(
            "/v1/exports",
            serde_json::json!({ "snapshot": id, "format": "jsonl", "types": ["process"] }),
        )
        .await;
    assert_eq!(code, 202, "{export}");
    let export_id = export["id"].as_i64().unwrap();
    let export = crate::support::eventually(Duration::from_secs(60), "the export", || async {
        let (_, e) = b.get(&format!("/v1/exports/{export_id}")).await;
        (e["state"] != "queued" && e["state"] != "running").then_some(e)
    })
    .await;
    assert_eq!(export["state"], "complete", "{export}");
    let (code, text) = b.get_bytes(&format!("/v1/exports/{export_id}/file")).await;
    assert_eq!(code, 200);
    let text = String::from_utf8(text).unwrap();
    assert_eq!(text.len() as u64, export["bytes"].as_u64().unwrap());
    assert!(text.lines().count() > 10, "{text}");
    let written = crate::support::files_under(&store.join(".exports"));
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(crate::support::files_under(&a.data_dir.join("exports")).is_empty());
    let (code, _) = crate::support::call(
        &b,
        Some(&b.token),
        "DELETE",
        &format!("/v1/exports/{export_id}"),
        None,
    )
    .await;
    assert!(code == 200 || code == 204, "{code}");
    assert!(crate::support::files_under(&store.join(".exports")).is_empty());
    // Uploads through node B are ingested, whichever node's worker runs each ingest job: the
    // spool is on the shared store.
    for i in 1..=4 {
        let file = crate::support::snapshot_file(tmp.path(), &format!("up-{i:02}"), 100);
        let (code, out, err) = b.cli(&["upload", file.to_str().unwrap(), "--connect", "--json"]);
        assert_eq!(code, 0, "{out}{err}");
        let result: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(result[0]["ingest"]["state"], "complete", "{result}");
    }
    let (_, uploaded) = a.get("/v1/snapshots?endpoint=up-03").await;
    assert_eq!(
        uploaded[0]["snapshots"][0]["state"], "complete",
        "{uploaded}"
    );
    // Nothing was written under either node's own data directory.
    assert!(crate::support::files_under(&a.data_dir.join("snapshots")).is_empty());
    assert!(crate::support::files_under(&b.data_dir.join("snapshots")).is_empty());
    assert!(
        store.join(".incoming").is_dir(),
        "uploads spool on the shared store"
    );
    assert!(crate::support::files_under(&store.join(".incoming")).is_empty());

    // Files dropped into the folder both nodes watch are each ingested once: both watchers see
    // every file, and its ingest job is keyed by the file's version in the shared queue.
    let dropped: Vec<String> = (1..=6).map(|i| format!("drop-{i:02}")).collect();
    for host in &dropped {
        let file = crate::support::snapshot_file(tmp.path(), host, 100);
        let tmp_name = drop_dir.join(".copying");
        std::fs::copy(&file, &tmp_name).unwrap();
        std::fs::rename(&tmp_name, drop_dir.join(file.file_name().unwrap())).unwrap();
    }
    crate::support::eventually(Duration::from_secs(60), "the dropped files", || async {
        let (_, all) = a.get("/v1/snapshots").await;
        let done = all
            .as_array()?
            .iter()
            .filter(|g| {
                g["hostname"]
                    .as_str()
                    .is_some_and(|h| h.starts_with("drop-"))
            })
            .filter(|g| g["snapshots"][0]["state"] == "complete")
            .count();
        (done == dropped.len() && crate::support::files_under(&drop_dir).is_empty()).then_some(())
    })
    .await;
    for host in &dropped {
        let (_, shown) = b.get(&format!("/v1/snapshots?endpoint={host}")).await;
        let snaps = shown[0]["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 1, "{shown}");
        assert_eq!(snaps[0]["origin"], "watch", "{shown}");
    }
    let (_, jobs) = a.get("/v1/queue/jobs?kind=ingest&limit=1000").await;
    let watched: Vec<&Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["requested_by"] == "watch")
        .collect();
    assert_eq!(watched.len(), dropped.len(), "{jobs}");
    assert!(watched.iter().all(|j| j["state"] == "done"), "{jobs}");
    let quarantined = crate::support::files_under(&a.data_dir.join("quarantine"))
        .into_iter()
        .chain(crate::support::files_under(&b.data_dir.join("quarantine")))
        .collect::<Vec<_>>();
    assert!(quarantined.is_empty(), "{quarantined:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn db_migrate_moves_a_single_node_catalog_into_postgres_keeping_ids() {
    let Some(db) = snapq_testpg::schema_or_skip("db migrate").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let data_arg = data.to_str().unwrap();
    // A single node on SQLite (an empty --database: also under SNAPQ_IT_ON_POSTGRES) with an
    // endpoint, a snapshot, a user and a group.
    let mut server = TestServer::spawn_in(&data, &["--database", ""]);
    let listen = server.addr.to_string();
    let _agent = server.online_agent("mv-01", 1_000).await;
    let (code, out, err) = server.cli(&["capture", "mv-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let first: Value = serde_json::from_str(&out).unwrap();
    let first_id = first[0]["id"].as_i64().unwrap();
    for args in [
        &["users", "add", "ana", "--role", "viewer"][..],
        &["groups", "add", "mv", "--hostname", "mv-*"],
    ] {
        let (code, _, err) = server.cli(args);
        assert_eq!(code, 0, "{err}");
    }

    // Refused while the server runs: it holds the data directory.
    let migrate = |json: bool| {
        let mut args = vec!["db", "migrate", "--from", data_arg, "--to", &db.url];
        if json {
            args.push("--json");
        }
        crate::support::run_snapq(&args)
    };
    let (code, _, err) = migrate(true);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another snapq serve"), "{err}");

    server.kill();
    let (code, out, err) = migrate(true);
    assert_eq!(code, 0, "{err}");
    let copied: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(copied["copied"]["snapshots"], 1, "{copied}");
    assert_eq!(copied["copied"]["endpoints"], 1, "{copied}");
    assert_eq!(copied["copied"]["computer_groups"], 1, "{copied}");
    // The queue came too: the capture's job with its attempt.
    assert_eq!(copied["queue"]["jobs"], 1, "{copied}");
    assert_eq!(copied["queue"]["attempts"], 1, "{copied}");
    // Twice is refused: the target is no longer empty.
    let (code, _, err) = migrate(false);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not empty"), "{err}");

    // The same node on PostgreSQL finds everything, and new ids follow the copied ones.
    let store = data.join("snapshots");
    let server = TestServer::spawn_in(
        &data,
        &[
            "--database",
            &db.url,
            "--store",
            store.to_str().unwrap(),
            "--listen",
            &listen,
        ],
    );
    let (_, shown) = server.get(&format!("/v1/snapshots/{first_id}")).await;
    assert_eq!(shown["state"], "complete", "{shown}");
    let (_, users) = server.get("/v1/users").await;
    assert!(users.to_string().contains("\"ana\""), "{users}");
    let job = shown["job_id"].as_str().unwrap();
    let (status, detail) = server.get(&format!("/v1/queue/jobs/{job}")).await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["state"], "done", "{detail}");
    let (code, out, err) = server.cli(&["capture", "mv-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let second: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(second[0]["id"].as_i64().unwrap(), first_id + 1, "{second}");
    assert_eq!(second[0]["state"], "complete", "{second}");
}

/// Two nodes' captures share one store: a reservation counts what every node holds, and a dead
/// node's lapses with its lease.
#[tokio::test(flavor = "multi_thread")]
async fn disk_reservations_count_every_nodes_captures_and_lapse_when_a_node_stops() {
    use snapq_core::catalog::{Catalog, Origin};
    let Some(db) = snapq_testpg::schema_or_skip("shared disk reservations").await else {
        return;
    };
    // Two nodes: two pools on the one catalog.
    let node_a = Catalog::connect_postgres(&db.url).await.unwrap();
    let node_b = Catalog::connect_postgres(&db.url).await.unwrap();
    let endpoint = node_a.ensure_endpoint("res-01").await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            node_a
                .create_snapshot(endpoint.id, Origin::Capture, "admin")
                .await
                .unwrap(),
        );
    }
    // 900 bytes usable: node A's capture holds 600, so node B's 500 does not fit...
    assert_eq!(node_a.reserve_disk(ids[0], 600, 900).await.unwrap(), Ok(()));
    assert_eq!(
        node_b.reserve_disk(ids[1], 500, 900).await.unwrap(),
        Err(600)
    );
    // ...but 300 does, and then nothing more.
    assert_eq!(node_b.reserve_disk(ids[1], 300, 900).await.unwrap(), Ok(()));
    assert_eq!(node_b.reserve_disk(ids[2], 1, 900).await.unwrap(), Err(900));
    // Node A's capture ends: its share returns.
    node_a.release_disk(ids[0]).await.unwrap();
    assert_eq!(node_b.reserve_disk(ids[2], 600, 900).await.unwrap(), Ok(()));
    // A node that dies stops renewing: once its lease is past, its bytes no longer count.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query("UPDATE snapshots SET reserved_until_ms = 1 WHERE id = $1")
        .bind(ids[2])
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(node_a.reserve_disk(ids[0], 600, 900).await.unwrap(), Ok(()));
    // Progress renews a lease: the renewed one keeps counting.
    node_a.set_snapshot_progress(ids[0], 10, 600).await.unwrap();
    assert_eq!(
        node_b.reserve_disk(ids[2], 600, 900).await.unwrap(),
        Err(900)
    );
}

/// The fault: one of three nodes SIGKILLed mid-batch. The batch completes, every endpoint
/// captured exactly once, no partial file, the dead node's jobs finished by the others.
#[tokio::test(flavor = "multi_thread")]
async fn one_of_three_nodes_killed_mid_batch_and_the_batch_completes_once_per_endpoint() {
    let Some(db) = snapq_testpg::schema_or_skip("three nodes, one killed").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    // A and C run one capture at a time, so B, with six, holds most of the batch's six at once
    // whichever node claims first.
    let spawn = |dir: &std::path::Path, captures: &str| {
        TestServer::spawn_in(
            dir,
            &[
                "--database",
                &db.url,
                "--store",
                store.to_str().unwrap(),
                "--capture-rate-kib",
                "1024",
                "--capture-concurrency",
                captures,
                "--job-orphan-secs",
                "5",
                "--job-retry-base-ms",
                "200",
            ],
        )
    };
    let a = spawn(&tmp.path().join("a"), "1");
    share_identity(&a.data_dir, &tmp.path().join("b"));
    share_identity(&a.data_dir, &tmp.path().join("c"));
    let mut b = spawn(&tmp.path().join("b"), "6");
    let c = spawn(&tmp.path().join("c"), "1");
    let _sim =
        crate::fleet::fleet_sim(&a, &tmp.path().join("fleet"), "tri", 12, &["--db-mib", "3"]);
    for i in 1..=12 {
        a.wait_online(&format!("tri-{i:02}")).await;
    }
    let (code, _, err) = a.cli(&["groups", "add", "tri", "--hostname", "tri-*"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = c.cli(&[
        "fleet",
        "capture",
        "--group",
        "tri",
        "--yes",
        "--max-concurrency",
        "6",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["batch_id"]
        .as_i64()
        .unwrap();
    // Kill node B while it holds a running capture of the batch, read from the shared queue
    // (its workers carry B's pid), after another capture finished.
    let b_pid = i64::from(b.child.id());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let on_b: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM snapq_jobs j JOIN snapq_workers w ON w.id = j.lock_by
             WHERE j.status = 'Running' AND j.job_type = $1 AND w.pid = $2",
        )
        .bind(snapq_jobs::JobKind::Capture.queue_name())
        .bind(b_pid)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let (_, batch) = a.get(&format!("/v1/fleet/batches/{id}")).await;
        if on_b > 0 && batch["totals"]["done"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "node B never ran a capture while another had finished: {batch}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.kill();
    let batch =
        crate::support::eventually(Duration::from_secs(300), "the batch to end", || async {
            let (_, batch) = a.get(&format!("/v1/fleet/batches/{id}")).await;
            (!matches!(batch["state"].as_str(), Some("running" | "paused"))).then_some(batch)
        })
        .await;
    assert_eq!(batch["state"], "complete", "{batch}");
    assert_eq!(batch["totals"]["done"], 12, "{batch}");
    let (_, groups) = c.get("/v1/snapshots").await;
    for g in groups.as_array().unwrap() {
        assert_eq!(g["snapshots"].as_array().unwrap().len(), 1, "{g}");
        assert_eq!(g["snapshots"][0]["state"], "complete", "{g}");
    }
    let partials: Vec<_> = crate::support::files_under(&store)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with('.') && name != snapq_core::store::MARKER
        })
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
}

/// A shared store whose file system is not mounted leaves an empty mount point: captures fail
/// with that reason instead of filling the local disk, nothing is marked complete, and a restart
/// refuses to start until it is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_is_not_mounted_fails_captures_with_the_reason_and_stops_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("mnt");
    let data = tmp.path().join("server");
    let flags = [
        "--store",
        store.to_str().unwrap(),
        "--job-max-attempts",
        "1",
        "--database",
        "",
    ];
    let mut server = TestServer::spawn_in(&data, &flags);
    let _agent = server.online_agent("nfs-01", 1_000).await;
    let (code, out, err) = server.cli(&["capture", "nfs-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");

    // Unmounted: the mount point is an empty directory again.
    let away = tmp.path().join("away");
    std::fs::rename(&store, &away).unwrap();
    std::fs::create_dir(&store).unwrap();
    let (_, out, err) = server.cli(&["capture", "nfs-01", "--yes", "--wait", "--json"]);
    let failed: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    assert_eq!(failed[0]["state"], "failed", "{failed}");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("is its file system mounted"),
        "{failed}"
    );
    assert!(crate::support::files_under(&store).is_empty());

    // A restart refuses while it is away...
    server.kill();
    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .args(flags)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, _, err) = finish_within(child, Duration::from_secs(30)).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is its file system mounted"), "{err}");
    // ...and starts once it is back, with the first snapshot there.
    std::fs::remove_dir(&store).unwrap();
    std::fs::rename(&away, &store).unwrap();
    let server = TestServer::spawn_in(&data, &flags);
    let (_, snaps) = server.get("/v1/snapshots").await;
    let states: Vec<&str> = snaps[0]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["state"].as_str())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "complete").count(),
        1,
        "{snaps}"
    );
}

/// libfaketime's multithreaded library, where Debian's `faketime` package puts it.
fn libfaketime() -> Option<std::path::PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.is_file())
}

/// A node whose clock runs 30 s ahead (libfaketime) is neither taken for dead by the others nor
/// holds its jobs back from them: the queue keeps to the database's clock. Node B (ahead, one
/// capture at a time, slow) queues a second capture while it is busy with a first; node A (on
/// time) runs it at once instead of 30 s later, and no capture is re-queued as an orphan.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_clock_is_30_s_ahead_is_not_taken_for_dead_and_its_jobs_run_anywhere() {
    let Some(db) = snapq_testpg::schema_or_skip("a node's clock 30 s off").await else {
        return;
    };
    let Some(lib) = libfaketime() else {
        eprintln!("skipped: libfaketime is not installed (Debian's `faketime` package)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let flags = [
        "--database",
        &db.url,
        "--store",
        store.to_str().unwrap(),
        "--job-orphan-secs",
        "5",
    ];
    let b_flags: Vec<&str> = flags
        .iter()
        .copied()
        .chain(["--capture-concurrency", "1", "--capture-rate-kib", "128"])
        .collect();
    let b = TestServer::spawn_in_env(
        &tmp.path().join("b"),
        &b_flags,
        &[
            ("LD_PRELOAD", lib.to_str().unwrap()),
            ("FAKETIME", "+30s"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    // B's clock is ahead: its HTTP Date header says so.
    let date = b.request("GET", "/status").send().await.unwrap().headers()["date"]
        .to_str()
        .unwrap()
        .to_owned();
    let b_now = chrono::DateTime::parse_from_rfc2822(&date).unwrap();
    let ahead = b_now.timestamp() - chrono::Utc::now().timestamp();
    assert!((25..=35).contains(&ahead), "node B is {ahead} s ahead");

    let _sim =
        crate::fleet::fleet_sim(&b, &tmp.path().join("fleet"), "skew", 2, &["--db-mib", "3"]);
    b.wait_online("skew-01").await;
    b.wait_online("skew-02").await;
    let capture = |host: &'static str| {
        let b = &b;
        async move {
            let (code, queued) = b
                .post("/v1/captures", serde_json::json!({ "hosts": [host] }))
                .await;
            assert_eq!(code, 202, "{queued}");
            queued[0]["snapshot_id"].as_i64().unwrap()
        }
    };
    // B alone: it takes the first capture (3 MiB at 128 KiB/s, about 24 s).
    let first = capture("skew-01").await;
    b.wait_transfer_started(first).await;
    share_identity(&b.data_dir, &tmp.path().join("a"));
    let a = TestServer::spawn_in(&tmp.path().join("a"), &flags);
    // B queues a second capture while its one capture worker is busy: A runs it well before B
    // could, or before A's clock reached the 30-s-late time B's own clock would have given it.
    let queued_at = std::time::Instant::now();
    let second = capture("skew-02").await;
    crate::support::eventually(Duration::from_secs(15), "the second capture", || async {
        let (_, s) = a.get(&format!("/v1/snapshots/{second}")).await;
        (s["state"] == "complete").then_some(())
    })
    .await;
    let (_, s) = a.get(&format!("/v1/snapshots/{first}")).await;
    assert_ne!(
        s["state"],
        "complete",
        "node B finished first after {:?}: {s}",
        queued_at.elapsed()
    );
    // Neither node judges the other dead: both heartbeat on the database's clock.
    let (_, status_a) = a.get("/status").await;
    let (_, status_b) = b.get("/status").await;
    let (_, queue) = a.get("/v1/queue/status").await;
    let nodes = queue["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{queue}");
    for n in nodes {
        assert_eq!(n["silent"], false, "{queue}");
        assert!(n["heartbeat_age_ms"].as_i64().unwrap() < 5_000, "{queue}");
    }
    assert!(nodes.iter().any(|n| n["node"] == status_a["node"]));
    assert!(nodes.iter().any(|n| n["node"] == status_b["node"]));
    // The first capture ends on B, in one attempt: never re-queued as an orphan of a dead node.
    let done =
        crate::support::eventually(Duration::from_secs(120), "the first capture", || async {
            let (_, s) = a.get(&format!("/v1/snapshots/{first}")).await;
            matches!(s["state"].as_str(), Some("complete" | "failed")).then_some(s)
        })
        .await;
    assert_eq!(done["state"], "complete", "{done}");
    let (_, jobs) = a.get("/v1/queue/jobs?kind=capture&limit=100").await;
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(
        jobs.iter()
            .all(|j| j["attempts"] == 1 && j["state"] == "done"),
        "{jobs:?}"
    );
}

/// PostgreSQL restarted (a private cluster, `pg_ctl restart -m fast`: every connection cut) while
/// captures run: the server reconnects, every capture completes once, nothing partial is left.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_while_captures_run_and_each_completes_once() {
    let cluster = match snapq_testpg::Cluster::start("restart") {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: PostgreSQL restart test: {why}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::spawn_in(
        &tmp.path().join("server"),
        &[
            "--database",
            &cluster.url,
            "--capture-rate-kib",
            "512",
            "--job-retry-base-ms",
            "200",
        ],
    );
    let _sim = crate::fleet::fleet_sim(
        &server,
        &tmp.path().join("fleet"),
        "pgr",
        4,
        &["--db-mib", "3"],
    );
    let hosts: Vec<String> = (1..=4).map(|i| format!("pgr-{i:02}")).collect();
    for h in &hosts {
        server.wait_online(h).await;
    }
    let (code, queued) = server
        .post("/v1/captures", serde_json::json!({ "hosts": hosts }))
        .await;
    assert_eq!(code, 202, "{queued}");
    let ids: Vec<i64> = queued
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["snapshot_id"].as_i64().unwrap())
        .collect();
    server.wait_transfer_started(ids[0]).await;
    cluster.restart().expect("restarting PostgreSQL");
    // The captures were running across the restart (about 6 s each at 512 KiB/s).
    let mut unfinished = 0;
    for id in &ids {
        let (_, s) = server.get(&format!("/v1/snapshots/{id}")).await;
        unfinished += usize::from(s["state"] != "complete");
    }
    assert!(
        unfinished > 0,
        "every capture ended before PostgreSQL restarted"
    );
    for id in &ids {
        let snap = crate::support::eventually(Duration::from_secs(120), "the capture", || async {
            let (code, s) = server.get(&format!("/v1/snapshots/{id}")).await;
            (code == 200 && matches!(s["state"].as_str(), Some("complete" | "failed"))).then_some(s)
        })
        .await;
        assert_eq!(snap["state"], "complete", "{snap}");
    }
    let (_, groups) = server.get("/v1/snapshots").await;
    for g in groups.as_array().unwrap() {
        assert_eq!(g["snapshots"].as_array().unwrap().len(), 1, "{g}");
    }
    let (_, jobs) = server.get("/v1/queue/jobs?kind=capture&limit=100").await;
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 4, "{jobs:?}");
    assert!(jobs.iter().all(|j| j["state"] == "done"), "{jobs:?}");
    let partials: Vec<_> = crate::support::files_under(&server.data_dir.join("snapshots"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
}

/// A read-only bind mount of a directory, unmounted when dropped.
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    /// `Err` says why this machine cannot mount (not root, no CAP_SYS_ADMIN in a container).
    fn new(dir: &std::path::Path) -> Result<ReadOnlyMount, String> {
        let run = |args: &[&str]| {
            let out = Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .output()
                .map_err(|e| format!("running mount: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            }
        };
        run(&["--bind"])?;
        let mounted = ReadOnlyMount(dir.to_owned());
        run(&["-o", "remount,ro,bind"])?;
        Ok(mounted)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// A shared store that went read-only (a read-only bind mount over it, as an NFS export turned
/// read-only would be): a capture fails with that reason and nothing is written or marked
/// complete; once it is writable again, captures complete.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_store_fails_captures_with_the_reason_and_marks_nothing_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("nfs");
    let flags = [
        "--store",
        store.to_str().unwrap(),
        "--job-max-attempts",
        "1",
        "--database",
        "",
    ];
    let server = TestServer::spawn_in(&tmp.path().join("server"), &flags);
    let _agent = server.online_agent("ro-01", 1_000).await;
    let before = crate::support::files_under(&store);
    let mount = match ReadOnlyMount::new(&store) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: cannot mount the store read-only here: {why}");
            return;
        }
    };
    let (_, out, err) = server.cli(&["capture", "ro-01", "--yes", "--wait", "--json"]);
    let failed: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    assert_eq!(failed[0]["state"], "failed", "{failed}");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("Read-only file system"),
        "{failed}"
    );
    assert_eq!(crate::support::files_under(&store), before);
    let (_, snaps) = server.get("/v1/snapshots").await;
    assert!(
        snaps
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["snapshots"].as_array().unwrap())
            .all(|s| s["state"] != "complete"),
        "{snaps}"
    );
    drop(mount);
    let (code, out, err) = server.cli(&["capture", "ro-01", "--yes", "--wait", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done[0]["state"], "complete", "{done}");
}
