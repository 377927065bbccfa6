//! The web console in a real browser: headless Debian chromium driven through chromedriver
//! (`webdriver.rs`) against a real `snapq serve --demo 3`. Each test signs in as a user of
//! group `team` (`demo-*`); `other-01` is an endpoint outside it. Without chromium the tests
//! say they were skipped; a failing test leaves a screenshot under `target/tmp/`.

use std::time::Duration;

use serde_json::json;

use crate::access::admin;
use crate::console::{PASSWORD, console_user};
use crate::support::{TestServer, eventually, register_unreachable as register};
use crate::webdriver::{Browser, shots_dir, with_browser};

/// `snapq serve --demo 3`, group `team` of the demo endpoints, operator `op` and viewer `vw`
/// granted it, and `other-01` outside it.
async fn world() -> TestServer {
    // A wide online window: the demo endpoints heartbeat every 10 s.
    let server = TestServer::spawn_with(&[
        "--demo",
        "3",
        "--job-max-attempts",
        "1",
        "--online-window-secs",
        "60",
    ]);
    register(&server, "other-01", "10.77.0.1").await;
    admin(
        &server,
        "POST",
        "/v1/groups",
        Some(json!({ "name": "team", "hostnames": ["demo-*"] })),
    )
    .await;
    console_user(&server, "op", "operator", &["team"]).await;
    console_user(&server, "vw", "viewer", &["team"]).await;
    for host in ["demo-01", "demo-02", "demo-03"] {
        server.wait_online(host).await;
    }
    server
}

async fn sign_in(b: &Browser, server: &TestServer, user: &str) {
    b.goto(&server.url()).await;
    b.type_into("#username", user).await;
    b.type_into("#password", PASSWORD).await;
    b.click("#signin-submit").await;
    b.wait_text("#whoami", user).await;
}

/// A live connection to `host` opened as admin: its id.
async fn connection(server: &TestServer, host: &str) -> i64 {
    let made = admin(
        server,
        "POST",
        "/v1/connections",
        Some(json!({ "targets": [host] })),
    )
    .await;
    made[0]["id"].as_i64().unwrap()
}

/// Waits until no element matches `css`.
async fn wait_gone(b: &Browser, css: &str) {
    let deadline = std::time::Instant::now() + crate::webdriver::WAIT;
    while !b.find_all(css).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "{css} is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The texts of a column of the events grid (read in one go, in the page).
async fn column(b: &Browser, col: &str) -> Vec<String> {
    let texts = b
        .execute(
            "return [...document.querySelectorAll('#events td[data-col=' + arguments[0] + ']')].map((e) => e.textContent);",
            json!([col]),
        )
        .await;
    serde_json::from_value(texts).unwrap()
}

/// Saves a screenshot for the README (`docs/`) when SNAPQ_UPDATE_SCREENSHOTS is set, and
/// always under `target/tmp/console-screenshots/`.
async fn doc_screenshot(b: &Browser, name: &str) {
    b.screenshot(&shots_dir().join(name)).await;
    if std::env::var_os("SNAPQ_UPDATE_SCREENSHOTS").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        b.screenshot(&docs.join(name)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_signs_in_finds_endpoints_as_they_type_and_connects() {
    let server = world().await;
    with_browser("type_ahead_and_connect", async |b| {
        sign_in(b, &server, "op").await;
        b.type_into("#search", "demo-0").await;
        let matches = b
            .wait_texts("#matches li.match", "three matches", |t| t.len() == 3)
            .await;
        assert!(
            matches.iter().all(|m| m.starts_with("demo-0")),
            "{matches:?}"
        );
        assert_eq!(b.find_all("#matches li.match .dot.online").await.len(), 3);
        // An endpoint outside the user's groups is never offered, by name or by IP.
        for text in ["other-01", "10.77.0.1"] {
            b.clear("#search").await;
            b.type_into("#search", text).await;
            b.wait("#matches li.none").await;
            assert!(b.find_all("#matches li.match").await.is_empty(), "{text}");
        }
        b.clear("#search").await;
        b.type_into("#search", "demo-02").await;
        b.wait_texts("#matches li.match", "demo-02", |t| t.len() == 1)
            .await;
        b.click("#matches li.match").await;
        b.click("#connect").await;
        let row = b.wait_text("#connections tr.connection", "demo-02").await;
        assert!(row.contains("active"), "{row}");
        b.clear("#search").await;
        b.type_into("#search", "demo-0").await;
        b.wait_texts("#matches li.match", "three matches", |t| t.len() == 3)
            .await;
        doc_screenshot(b, "console-live-endpoints.png").await;
        b.execute(
            "document.querySelector('#connections a.endpoint-link').click(); return 1;",
            json!([]),
        )
        .await;
        b.wait_text("#tabs", "process (").await;
        // Back in the list: select it, connect again, then delete (close) it.
        b.click("#nav-live").await;
        b.click("#connections tr.connection input.select").await;
        b.click("#reconnect-selected").await;
        b.wait_text("#message", "Reconnected 1 connection(s)").await;
        b.click("#connections tr.connection input.select").await;
        b.click("#delete-selected").await;
        b.wait_text("#message", "Closed 1 connection(s)").await;
        wait_gone(b, "#connections tr.connection").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_events_grid_filters_shows_a_tree_saves_evidence_and_exports_csv() {
    let server = world().await;
    let id = connection(&server, "demo-01").await;
    with_browser("events_grid", async |b| {
        sign_in(b, &server, "op").await;
        b.goto(&format!("{}/#/grid/{id}", server.url())).await;
        b.wait("#events tr.event").await;
        // Pages (newest first): the next page is older, and previous comes back to the newest
        // (a live endpoint keeps recording, so the first page may have moved on meanwhile).
        let first = column(b, "ts").await;
        b.click("#next").await;
        b.wait_text("#page-info", "page 2").await;
        let second = column(b, "ts").await;
        assert!(second[0] <= first[first.len() - 1], "{first:?} then {second:?}");
        b.click("#prev").await;
        b.wait_text("#page-info", "page 1").await;
        let again = column(b, "ts").await;
        assert!(again[0] >= first[0], "{first:?} then {again:?}");
        // Sort by pid, ascending: the column's values come in order.
        b.click("#events th[data-field=pid]").await;
        b.wait_text("#events th[data-field=pid]", "▲").await;
        let pids: Vec<i64> = column(b, "pid")
            .await
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert!(pids.is_sorted(), "{pids:?}");
        b.click("#events th[data-field=ts]").await;
        b.wait_text("#events th[data-field=ts]", "▲").await;
        b.click("#events th[data-field=ts]").await;
        b.wait_text("#events th[data-field=ts]", "▼").await;
        // Filter `cmdline co WORD`, a word of the newest process's command line (the demo
        // endpoints simulate Linux or Windows).
        let first = column(b, "cmdline").await;
        let word = first[0]
            .split_whitespace()
            .filter(|w| !w.contains('"'))
            .max_by_key(|w| w.len())
            .unwrap()
            .to_owned();
        b.click("#add-filter").await;
        b.type_into("#filters .f-value", &word).await;
        b.click("#apply").await;
        let matching = eventually(Duration::from_secs(30), "only matching rows", || async {
            let cells = column(b, "cmdline").await;
            let rows = b.text("#page-info").await;
            (!cells.is_empty() && cells.iter().all(|c| c.contains(&word)) && rows.contains(&format!("{} rows", cells.len())))
                .then_some(cells)
        })
        .await;
        assert!(matching.len() >= 2, "{matching:?}");
        doc_screenshot(b, "console-events-grid.png").await;
        // The process tree of the first row.
        let boxes = b.find_all("#events input.select-event").await;
        b.click_el(&boxes[0]).await;
        b.click("#tree").await;
        b.wait("#tree-view li.this").await;
        // Two rows saved as evidence, with a note.
        b.click_el(&boxes[1]).await;
        b.type_into("#evidence-note", "suspicious").await;
        b.click("#save-evidence").await;
        b.wait_text("#message", "Saved 2 event(s)").await;
        // Export CSV, with its progress and a download link that works with the session.
        b.click("#export").await;
        b.wait("#export-download").await;
        let got = b
            .execute(
                "const a = document.querySelector('#export-download'); const r = await fetch(a.href); return [r.status, await r.text()];",
                json!([]),
            )
            .await;
        assert_eq!(got[0], 200, "{got}");
        let csv = got[1].as_str().unwrap();
        let mut lines = csv.lines();
        assert!(lines.next().unwrap().contains("cmdline"), "{csv}");
        assert!(lines.all(|l| l.contains(&word)), "{csv}");
        // The saved evidence is under Saved Evidence > Events.
        b.click("#nav-evidence").await;
        let rows = b
            .wait_texts("#evidence-table tr.evidence", "two saved events", |t| {
                t.len() == 2
            })
            .await;
        assert!(rows.iter().all(|r| r.contains("suspicious")), "{rows:?}");
        // Filterable, and exportable.
        b.type_into("#evidence-filter", "no such text anywhere").await;
        wait_gone(b, "#evidence-table tr.evidence").await;
        b.clear("#evidence-filter").await;
        b.type_into("#evidence-filter", "suspicious").await;
        b.wait_texts("#evidence-table tr.evidence", "both again", |t| t.len() == 2)
            .await;
        b.click("#export").await;
        let link = b.text("#export-download").await;
        assert!(link.contains(".csv"), "{link}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_asks_with_size_and_free_disk_and_the_snapshot_completes() {
    let server = world().await;
    let id = connection(&server, "demo-03").await;
    with_browser("capture", async |b| {
        sign_in(b, &server, "op").await;
        b.goto(&format!("{}/#/grid/{id}", server.url())).await;
        b.click("#capture").await;
        let size = b.wait_text("#capture-size", "Database size: ").await;
        assert!(!size.contains("unknown"), "{size}");
        b.wait_text("#capture-free", "Free disk on the server")
            .await;
        b.click("#confirm-yes").await;
        b.click("#capture-progress").await;
        b.wait_texts("tr.snapshot td.state", "a complete snapshot", |t| {
            t.iter().any(|s| s.starts_with("complete"))
        })
        .await;
        let count = b.text(".snap-group[data-host=demo-03] .captures").await;
        assert_eq!(count, "1 capture(s)");
        // Every endpoint's: listed with its count, collapsed; expanding one reads its snapshots.
        b.click("#all-endpoints").await;
        wait_gone(b, "tr.snapshot").await;
        let count = b.text(".snap-group[data-host=demo-03] .captures").await;
        assert_eq!(count, "1 capture(s)");
        b.click(".snap-group[data-host=demo-03] button.expand")
            .await;
        b.wait_texts(
            ".snap-group[data-host=demo-03] tr.snapshot td.state",
            "its snapshot",
            |t| t.len() == 1 && t[0].starts_with("complete"),
        )
        .await;
    })
    .await;
}

/// A snapshot of `host` whose newest processes have hostile command lines.
fn hostile_snapshot(dir: &std::path::Path, host: &str) -> std::path::PathBuf {
    let file = crate::support::snapshot_file(dir, host, 200);
    let db = rusqlite::Connection::open(&file).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for (i, cmdline) in [
        "<script>alert(1)</script>",
        "\"><img src=x onerror=alert(1)>",
    ]
    .iter()
    .enumerate()
    {
        db.execute(
            "INSERT INTO process (ts, pid, ppid, path, cmdline, user) VALUES (?1, ?2, 1, '/bin/sh', ?3, 'eve')",
            rusqlite::params![now + i as i64, 6660 + i as i64, cmdline],
        )
        .unwrap();
    }
    drop(db);
    file
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_and_connect_lands_in_the_grid_where_hostile_text_stays_text_and_delete_works() {
    let server = world().await;
    let tmp = tempfile::tempdir().unwrap();
    let file = hostile_snapshot(tmp.path(), "demo-01");
    with_browser("upload_connect_delete", async |b| {
        sign_in(b, &server, "op").await;
        b.click("#nav-snapshots").await;
        b.type_into("#upload-file", file.to_str().unwrap()).await;
        b.click("#upload-connect").await;
        b.wait("#events tr.event").await;
        let url = b.execute("return location.hash;", json!([])).await;
        assert!(url.as_str().unwrap().starts_with("#/grid/"), "{url}");
        let cells = column(b, "cmdline").await;
        assert!(
            cells.contains(&"<script>alert(1)</script>".to_owned()),
            "{cells:?}"
        );
        assert!(
            cells.contains(&"\"><img src=x onerror=alert(1)>".to_owned()),
            "{cells:?}"
        );
        assert_eq!(b.alert_text().await, None, "a dialog opened");
        assert!(b.find_all("#events img, #events script").await.is_empty());
        // Delete the snapshot from Saved Evidence > Snapshots.
        b.goto(&format!("{}/#/snapshots/demo-01", server.url()))
            .await;
        b.wait("tr.snapshot button.delete").await;
        let snap = b
            .execute(
                "return document.querySelector('tr.snapshot').dataset.id;",
                json!([]),
            )
            .await;
        let snap = snap.as_str().unwrap().to_owned();
        b.click(&format!("tr.snapshot[data-id='{snap}'] button.delete"))
            .await;
        b.click("#confirm-yes").await;
        wait_gone(b, &format!("tr.snapshot[data-id='{snap}']")).await;
        assert_eq!(b.alert_text().await, None);
    })
    .await;
    let (status, _) = server.get("/v1/snapshots/999999").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_a_snapshot_shows_the_reason_from_quarantine() {
    let server = world().await;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("demo-01_2026_10_01T10.00.00.000Z.db");
    std::fs::write(&file, b"this is not a database at all").unwrap();
    with_browser("upload_quarantined", async |b| {
        sign_in(b, &server, "op").await;
        b.click("#nav-snapshots").await;
        b.type_into("#upload-file", file.to_str().unwrap()).await;
        b.click("#upload-connect").await;
        let status = b.wait_text("#upload-status", "was not stored").await;
        assert!(status.contains("quarantined"), "{status}");
        let reason = status.split("): ").nth(1).unwrap_or("");
        assert!(reason.len() > 5 && reason != "no reason given", "{status}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_job_is_retried_from_the_queue_page() {
    let server = world().await;
    register(&server, "demo-99", "10.9.9.99").await;
    let queued = admin(
        &server,
        "POST",
        "/v1/captures",
        Some(json!({ "hosts": ["demo-99"] })),
    )
    .await;
    let job = queued[0]["job_id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(60), "the capture to fail", || async {
        let (_, j) = server.get(&format!("/v1/queue/jobs/{job}")).await;
        (j["state"] == "failed").then_some(())
    })
    .await;
    with_browser("queue_retry", async |b| {
        sign_in(b, &server, "op").await;
        b.click("#nav-queue").await;
        b.click(&format!("tr.job[data-id='{job}'] button.retry"))
            .await;
        b.wait_text("#message", "retry").await;
    })
    .await;
    let (_, entries) = server.get("/v1/audit?action=queue.retry").await;
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "op" && e["target"] == job.as_str() && e["result"] == "ok"),
        "{entries}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_finds_no_capture_or_delete_and_a_forged_post_is_rejected() {
    let server = world().await;
    let queued = admin(
        &server,
        "POST",
        "/v1/captures",
        Some(json!({ "hosts": ["demo-02"] })),
    )
    .await;
    let snap = queued[0]["snapshot_id"].as_i64().unwrap();
    eventually(Duration::from_secs(60), "the capture", || async {
        let (_, s) = server.get(&format!("/v1/snapshots/{snap}")).await;
        (s["state"] == "complete").then_some(())
    })
    .await;
    let opened = admin(
        &server,
        "POST",
        &format!("/v1/snapshots/{snap}/connect"),
        None,
    )
    .await;
    let id = opened["id"].as_i64().unwrap();
    with_browser("viewer", async |b| {
        sign_in(b, &server, "vw").await;
        b.wait("#search").await;
        assert!(b.find_all("#connect, #delete-selected").await.is_empty());
        b.goto(&format!("{}/#/grid/{id}", server.url())).await;
        b.wait("#events tr.event").await;
        assert!(
            b.find_all("#capture, #save-evidence, #export")
                .await
                .is_empty()
        );
        b.goto(&format!("{}/#/snapshots/demo-02", server.url())).await;
        b.wait("tr.snapshot").await;
        assert!(
            b.find_all("button.delete, button.delete-all, #upload")
                .await
                .is_empty()
        );
        // Forged: without the CSRF token, and with it but as a viewer.
        let forged = b
            .execute(
                &format!(
                    "const post = (h) => fetch('/v1/snapshots/delete', {{ method: 'POST', headers: Object.assign({{ 'Content-Type': 'application/json' }}, h), body: JSON.stringify({{ ids: [{snap}] }}) }}).then((r) => r.status);
                     const me = await (await fetch('/v1/session')).json();
                     return [await post({{}}), await post({{ 'X-CSRF-Token': me.csrf_token }})];"
                ),
                json!([]),
            )
            .await;
        assert_eq!(forged, json!([403, 403]));
    })
    .await;
    let (_, s) = server.get(&format!("/v1/snapshots/{snap}")).await;
    assert_eq!(s["state"], "complete", "the snapshot is still there");
}

#[tokio::test(flavor = "multi_thread")]
async fn someone_elses_connection_snapshot_or_export_is_a_not_found_page() {
    let server = world().await;
    let other = connection(&server, "other-01").await;
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = crate::access::ingested(&server, tmp.path(), "other-01").await;
    let export = admin(
        &server,
        "POST",
        "/v1/exports",
        Some(json!({ "snapshot": snap, "format": "csv" })),
    )
    .await["id"]
        .as_i64()
        .unwrap();
    with_browser("not_found", async |b| {
        sign_in(b, &server, "op").await;
        for page in [
            format!("grid/{other}"),
            format!("snapshot/{snap}"),
            format!("export/{export}"),
            "grid/999999".into(),
        ] {
            b.goto(&format!("{}/#/live", server.url())).await;
            b.wait("#search").await;
            b.goto(&format!("{}/#/{page}", server.url())).await;
            let text = b.wait_text("#notfound", "Not found").await;
            assert!(!text.contains("other-01"), "{page}: {text}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_manages_users_tokens_and_groups_reads_the_audit_and_watches_the_fleet() {
    let server = world().await;
    admin(
        &server,
        "POST",
        "/v1/users/admin/password",
        Some(json!({ "password": PASSWORD })),
    )
    .await;
    let batch = admin(
        &server,
        "POST",
        "/v1/fleet/batches",
        Some(json!({ "group": "team" })),
    )
    .await["batch_id"]
        .as_i64()
        .unwrap();
    admin(
        &server,
        "POST",
        "/v1/schedules",
        Some(json!({ "name": "nightly", "cron": "0 3 * * *", "group": "team" })),
    )
    .await;
    with_browser("admin_and_fleet", async |b| {
        sign_in(b, &server, "admin").await;
        b.click("#nav-admin").await;
        b.type_into("#new-user", "newbie").await;
        b.click("#add-user").await;
        b.wait("#users tr.user[data-name=newbie]").await;
        b.click("#create-token").await;
        let token = b.text("#new-token").await;
        assert!(token.starts_with("snapq_"), "{token}");
        b.type_into("#group-name", "web").await;
        b.type_into("#group-hosts", "web-*").await;
        b.click("#add-group").await;
        b.wait_text("#groups", "web-*").await;
        // Shown once: the page drawn again has no token on it.
        assert!(b.find_all("#new-token").await.is_empty());
        b.wait_text("#audit", "console.signin").await;
        b.click("#nav-fleet").await;
        b.wait(&format!("#batches tr.batch[data-id='{batch}']"))
            .await;
        b.wait_text("#schedules tr.schedule", "nightly").await;
        b.click(&format!(
            "#batches tr.batch[data-id='{batch}'] a.batch-link"
        ))
        .await;
        b.wait_texts("#batch-outcomes tr.item", "three outcomes", |t| {
            t.len() == 3
        })
        .await;
    })
    .await;
    with_browser("no_admin_for_operators", async |b| {
        sign_in(b, &server, "op").await;
        let shown = b
            .execute(
                "return !document.querySelector('#nav-admin').hidden;",
                json!([]),
            )
            .await;
        assert_eq!(shown, json!(false));
    })
    .await;
}
