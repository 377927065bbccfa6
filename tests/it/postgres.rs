//! `snapq serve --database postgres://…`: the catalog in PostgreSQL (issue 11). Each test gets a
//! schema of its own from `snapq_testpg`; without a PostgreSQL the tests say they were skipped.
//! (`SNAPQ_IT_ON_POSTGRES=1` runs the whole suite that way; these run in every `cargo test`.)

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{AgentOptions, BIN, TestAgent, TestServer, finish_within};

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
    let _agent = TestAgent::spawn_with(AgentOptions {
        hostname: "pg-01".into(),
        prefill: 2_000,
        extra: server.enroll_args(),
        ..Default::default()
    });
    server.wait_online("pg-01").await;
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
