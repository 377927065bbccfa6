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
    world_with(&[]).await
}

/// [`world`] with more `snapq serve` flags.
async fn world_with(flags: &[&str]) -> TestServer {
    // A wide online window: the demo endpoints heartbeat every 10 s.
    let mut args = vec![
        "--demo",
        "3",
        "--job-max-attempts",
        "1",
        "--online-window-secs",
        "60",
    ];
    args.extend(flags);
    let server = TestServer::spawn_with(&args);
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
    sign_in_with(b, server, user, PASSWORD).await;
}

async fn sign_in_with(b: &Browser, server: &TestServer, user: &str, password: &str) {
    b.goto(&server.url()).await;
    b.type_into("#username", user).await;
    b.type_into("#password", password).await;
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

// --- Admin actions, keep, time windows, a capture's progress, Queue and Fleet actions ----------

/// Captures at this rate take seconds (a demo database of about 2.6 MiB: some 20 s): long
/// enough to watch, pause or cancel them, also on a loaded machine.
const SLOW_CAPTURES: [&str; 2] = ["--capture-rate-kib", "128"];

/// For watching a bar part way: some 80 s per capture, since starting a browser and signing in can
/// take much of 20 s on a loaded machine (the bar was once missed, the capture already complete).
const SLOWER_CAPTURES: [&str; 2] = ["--capture-rate-kib", "32"];

/// Gives the bootstrap admin the console password [`PASSWORD`].
async fn admin_password(server: &TestServer) {
    admin(
        server,
        "POST",
        "/v1/users/admin/password",
        Some(json!({ "password": PASSWORD })),
    )
    .await;
}

/// Answers the confirmation whose title says `title`: yes or no.
async fn confirm(b: &Browser, title: &str, yes: bool) {
    b.wait_text("#modal-title", title).await;
    b.click(if yes { "#confirm-yes" } else { "#confirm-no" })
        .await;
    wait_hidden(b, "#modal").await;
}

/// Waits until the element `css` is hidden.
async fn wait_hidden(b: &Browser, css: &str) {
    eventually(Duration::from_secs(10), css, || async {
        let hidden = b
            .execute(
                "return document.querySelector(arguments[0]).hidden;",
                json!([css]),
            )
            .await;
        (hidden == json!(true)).then_some(())
    })
    .await;
}

/// The value of the form field `css`.
async fn value(b: &Browser, css: &str) -> String {
    let v = b
        .execute(
            "return document.querySelector(arguments[0]).value;",
            json!([css]),
        )
        .await;
    v.as_str().unwrap_or_default().to_owned()
}

/// The texts of the cells matching `css` (read in one go, in the page).
async fn texts(b: &Browser, css: &str) -> Vec<String> {
    let texts = b
        .execute(
            "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent);",
            json!([css]),
        )
        .await;
    serde_json::from_value(texts).unwrap()
}

/// The user as the API shows them.
async fn user(server: &TestServer, name: &str) -> serde_json::Value {
    let (status, shown) = server.get(&format!("/v1/users/{name}")).await;
    assert_eq!(status, 200, "{shown}");
    shown["user"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capture_shows_a_live_progress_bar_in_saved_evidence_then_complete() {
    let server = world_with(&SLOWER_CAPTURES).await;
    let queued = admin(
        &server,
        "POST",
        "/v1/captures",
        Some(json!({ "hosts": ["demo-01"] })),
    )
    .await;
    let snap = queued[0]["snapshot_id"].as_i64().unwrap();
    with_browser("capture_progress", async |b| {
        sign_in(b, &server, "op").await;
        b.goto(&format!("{}/#/snapshots/demo-01", server.url()))
            .await;
        let row = format!("tr.snapshot[data-id='{snap}']");
        let bar = |row: String| async move {
            let v = b
                .execute(
                    "const p = document.querySelector(arguments[0] + ' progress.snap-progress');
                     return p ? [p.value, p.max, p.parentElement.textContent] : null;",
                    json!([row]),
                )
                .await;
            let (done, total) = (v[0].as_f64()?, v[1].as_f64()?);
            (done > 0.0 && done < total).then(|| (done, v[2].as_str().unwrap_or("").to_owned()))
        };
        // Part way through the transfer: a bar and the bytes so far of the whole.
        let (first, text) = eventually(Duration::from_secs(60), "the bar part way", || {
            bar(row.clone())
        })
        .await;
        assert!(text.contains(" / ") && text.contains("iB"), "{text}");
        // It moves while the user watches.
        eventually(Duration::from_secs(60), "the bar to move on", || async {
            bar(row.clone())
                .await
                .and_then(|(done, _)| (done > first).then_some(()))
        })
        .await;
        // And ends complete, without a bar.
        eventually(Duration::from_secs(300), "complete", || async {
            let state = texts(b, &format!("{row} td.state")).await;
            state
                .first()
                .is_some_and(|s| s.starts_with("complete"))
                .then_some(())
        })
        .await;
        assert!(b.find_all(&format!("{row} progress")).await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_capture_is_cancelled_from_the_queue_page_after_a_confirmation() {
    let server = world_with(&SLOW_CAPTURES).await;
    let queued = admin(
        &server,
        "POST",
        "/v1/captures",
        Some(json!({ "hosts": ["demo-02"] })),
    )
    .await;
    let job = queued[0]["job_id"].as_str().unwrap().to_owned();
    with_browser("queue_cancel", async |b| {
        sign_in(b, &server, "op").await;
        b.click("#nav-queue").await;
        let row = format!("tr.job[data-id='{job}']");
        // No: the job goes on.
        b.click(&format!("{row} button.cancel")).await;
        confirm(b, &format!("Cancel job {job}?"), false).await;
        b.wait(&format!("{row} button.cancel")).await;
        let (_, j) = server.get(&format!("/v1/queue/jobs/{job}")).await;
        assert_ne!(j["state"], "cancelled", "{j}");
        // Yes: it ends cancelled, and may be retried.
        b.click(&format!("{row} button.cancel")).await;
        confirm(b, &format!("Cancel job {job}?"), true).await;
        b.wait_text(&format!("{row} td.state"), "cancelled").await;
        b.wait(&format!("{row} button.retry")).await;
        assert!(b.find_all(&format!("{row} button.cancel")).await.is_empty());
    })
    .await;
    let (_, j) = server.get(&format!("/v1/queue/jobs/{job}")).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    let (_, entries) = server.get("/v1/audit?action=queue.cancel").await;
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
async fn a_fleet_batch_is_paused_and_resumed_from_the_fleet_page() {
    let server = world_with(&SLOW_CAPTURES).await;
    let batch = admin(
        &server,
        "POST",
        "/v1/fleet/batches",
        Some(json!({ "group": "team", "max_concurrency": 1 })),
    )
    .await["batch_id"]
        .as_i64()
        .unwrap();
    let state = || async {
        let (_, b) = server.get(&format!("/v1/fleet/batches/{batch}")).await;
        b["state"].as_str().unwrap_or_default().to_owned()
    };
    with_browser("fleet_pause_resume", async |b| {
        sign_in(b, &server, "op").await;
        b.click("#nav-fleet").await;
        let row = format!("#batches tr.batch[data-id='{batch}']");
        b.click(&format!("{row}[data-state=running] button.pause"))
            .await;
        b.wait_text("#message", &format!("Paused batch {batch}"))
            .await;
        b.wait(&format!("{row}[data-state=paused] button.resume"))
            .await;
        assert!(b.find_all(&format!("{row} button.pause")).await.is_empty());
        assert_eq!(state().await, "paused");
        b.click(&format!("{row} button.resume")).await;
        b.wait_text("#message", &format!("Resumed batch {batch}"))
            .await;
        b.wait(&format!("{row}[data-state=running] button.pause"))
            .await;
        assert_eq!(state().await, "running");
    })
    .await;
    let (_, entries) = server.get("/v1/audit?action=fleet").await;
    for action in ["fleet.pause", "fleet.resume"] {
        assert!(
            entries
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["actor"] == "op" && e["action"] == action && e["result"] == "ok"),
            "{action}: {entries}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_changes_a_role_grants_a_group_sets_a_password_and_removes_a_user() {
    let server = world().await;
    admin_password(&server).await;
    admin(
        &server,
        "POST",
        "/v1/groups",
        Some(json!({ "name": "web", "hostnames": ["web-*"] })),
    )
    .await;
    const NEW_PASSWORD: &str = "newbie's own secret";
    with_browser("admin_users", async |b| {
        sign_in(b, &server, "admin").await;
        b.click("#nav-admin").await;
        let vw = "#users tr.user[data-name=vw]";
        // A role change asks first; No changes nothing.
        b.click(&format!("{vw} select.role option[value=operator]"))
            .await;
        confirm(b, "Change the role of vw to operator?", false).await;
        assert_eq!(value(b, &format!("{vw} select.role")).await, "viewer");
        assert_eq!(user(&server, "vw").await["role"], "viewer");
        b.click(&format!("{vw} select.role option[value=operator]"))
            .await;
        confirm(b, "Change the role of vw to operator?", true).await;
        b.wait_text("#message", "vw is now operator").await;
        assert_eq!(value(b, &format!("{vw} select.role")).await, "operator");
        assert_eq!(user(&server, "vw").await["role"], "operator");
        // Grant group web, then revoke it (after a confirmation).
        b.click(&format!("{vw} select.grant-pick option[value=web]"))
            .await;
        b.click(&format!("{vw} button.grant")).await;
        b.wait(&format!("{vw} .granted[data-group=web]")).await;
        let mut groups: Vec<String> =
            serde_json::from_value(user(&server, "vw").await["groups"].clone()).unwrap();
        groups.sort();
        assert_eq!(groups, ["team", "web"]);
        b.click(&format!(
            "{vw} .granted[data-group=web] button.revoke-group"
        ))
        .await;
        confirm(b, "Revoke group web from vw?", true).await;
        wait_gone(b, &format!("{vw} .granted[data-group=web]")).await;
        assert_eq!(user(&server, "vw").await["groups"], json!(["team"]));
        // A new user, with a password set here, signs in with it.
        b.type_into("#new-user", "newbie").await;
        b.click("#add-user").await;
        let newbie = "#users tr.user[data-name=newbie]";
        b.wait_text(&format!("{newbie} td.password"), "none").await;
        b.click(&format!("{newbie} button.set-password")).await;
        b.type_into("#new-password", NEW_PASSWORD).await;
        b.type_into("#new-password-again", NEW_PASSWORD).await;
        confirm(b, "Set the console password of newbie?", true).await;
        b.wait_text("#message", "Password of newbie set").await;
        b.wait_text(&format!("{newbie} td.password"), "set").await;
        b.click("#signout").await;
        b.wait("#signin").await;
        sign_in_with(b, &server, "newbie", NEW_PASSWORD).await;
        b.wait_text("#whoami", "newbie (viewer)").await;
        b.click("#signout").await;
        b.wait("#signin").await;
        // Removing asks first; then the user is gone. Nobody removes themselves here.
        sign_in(b, &server, "admin").await;
        b.click("#nav-admin").await;
        assert!(
            b.find_all("#users tr.user[data-name=admin] button.remove-user")
                .await
                .is_empty()
        );
        b.click(&format!("{newbie} button.remove-user")).await;
        confirm(b, "Remove user newbie?", true).await;
        b.wait_text("#message", "Removed user newbie").await;
        wait_gone(b, newbie).await;
    })
    .await;
    let (status, _) = server.get("/v1/users/newbie").await;
    assert_eq!(status, 404);
    let signin = server
        .client()
        .post(format!("{}/v1/session", server.url()))
        .json(&json!({ "username": "newbie", "password": NEW_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(signin.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_makes_a_token_for_another_user_and_filters_the_audit_where_hostile_text_stays_text()
 {
    let server = world().await;
    admin_password(&server).await;
    let whoami = |token: String| {
        let server = &server;
        async move {
            let r = server
                .client()
                .get(format!("{}/v1/whoami", server.url()))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let hostile = "\"><img src=x onerror=alert(1)>";
    let label = "<script>alert(1)</script>";
    with_browser("admin_tokens_audit", async |b| {
        sign_in(b, &server, "admin").await;
        b.click("#nav-admin").await;
        // A token for op, with a hostile label: shown once, and it stands for op.
        b.click("#token-user option[value=op]").await;
        b.type_into("#token-label", label).await;
        b.click("#create-token").await;
        b.wait_text("#token-once", "for op").await;
        let made = b.text("#new-token").await;
        assert!(made.starts_with("snapq_"), "{made}");
        let (status, me) = whoami(made.clone()).await;
        assert_eq!((status, &me["user"]), (200, &json!("op")), "{me}");
        let row = "#tokens tr.token[data-user=op]";
        assert!(
            texts(b, &format!("{row} td"))
                .await
                .contains(&label.to_owned())
        );
        // Revoking asks first; then the token stops working, and is no longer on show.
        b.click(&format!("{row} button.revoke")).await;
        confirm(b, "Revoke token", true).await;
        b.wait_text("#message", "Revoked token").await;
        assert!(b.find_all("#new-token").await.is_empty());
        assert_eq!(whoami(made).await.0, 401);
        // A hostile user or group name is refused; the refusal and its audit entry are text.
        b.type_into("#new-user", hostile).await;
        b.click("#add-user").await;
        let refused = b.wait_text("#message.error", "must start with").await;
        assert!(refused.contains("<img src=x"), "{refused}");
        b.type_into("#group-name", hostile).await;
        b.click("#add-group").await;
        b.wait_text("#message.error", "group name").await;
        b.click("#audit-apply").await;
        b.wait_texts("#audit tr.audit td.cell", "the refusals", |t| {
            t.iter().filter(|c| c.as_str() == hostile).count() == 2
        })
        .await;
        assert!(b.find_all("#main img, #main script").await.is_empty());
        assert_eq!(b.alert_text().await, None, "a dialog opened");
        // Filters: an action family; a user who did none of it; time windows.
        let actions = "#audit tr.audit td:nth-child(3)";
        b.type_into("#audit-action", "token").await;
        b.click("#audit-apply").await;
        let found = b
            .wait_texts(actions, "token actions only", |t| {
                t.iter().all(|a| a.starts_with("token."))
                    && ["token.create", "token.revoke"]
                        .iter()
                        .all(|a| t.iter().any(|x| x == a))
            })
            .await;
        b.type_into("#audit-user", "op").await;
        b.click("#audit-apply").await;
        b.wait_text("#audit-status", "0 entries").await;
        assert!(b.find_all("#audit tr.audit").await.is_empty());
        b.clear("#audit-user").await;
        b.type_into("#audit-since", "2000-01-01 00:00:00Z").await;
        b.type_into("#audit-until", "2100-01-01 00:00:00Z").await;
        b.click("#audit-apply").await;
        b.wait_texts(actions, "all of them in the window", |t| t == found)
            .await;
        b.clear("#audit-until").await;
        b.type_into("#audit-until", "2000-01-02 00:00:00Z").await;
        b.click("#audit-apply").await;
        b.wait_text("#audit-status", "0 entries").await;
        // An empty window says so, and shows no entries.
        b.clear("#audit-since").await;
        b.type_into("#audit-since", "2000-01-03 00:00:00Z").await;
        b.click("#audit-apply").await;
        let said = b
            .wait_text("#audit-status.error", "Empty time window")
            .await;
        assert!(
            said.contains(
                "Until (2000-01-02 00:00:00Z) must be later than Since (2000-01-03 00:00:00Z)"
            ),
            "{said}"
        );
        assert!(b.find_all("#audit tr.audit").await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_and_viewers_get_no_admin_page_and_no_admin_buttons() {
    let server = world().await;
    for user in ["op", "vw"] {
        with_browser(&format!("no_admin_page_{user}"), async |b| {
            sign_in(b, &server, user).await;
            let shown = b
                .execute(
                    "return !document.querySelector('#nav-admin').hidden;",
                    json!([]),
                )
                .await;
            assert_eq!(shown, json!(false));
            b.goto(&format!("{}/#/admin", server.url())).await;
            let said = b.wait_text("#page-error", "admin").await;
            assert!(said.contains("role"), "{said}");
            assert!(
                b.find_all(
                    "#users, #tokens, #audit, button.remove-user, select.role, #create-token"
                )
                .await
                .is_empty()
            );
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_and_unkeep_mark_a_snapshot_row_and_viewers_see_the_mark_only() {
    let server = world().await;
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = crate::access::ingested(&server, tmp.path(), "demo-03").await;
    let kept = || async {
        let (_, s) = server.get(&format!("/v1/snapshots/{snap}")).await;
        s
    };
    let row = format!("tr.snapshot[data-id='{snap}']");
    with_browser("keep_unkeep", async |b| {
        sign_in(b, &server, "op").await;
        b.goto(&format!("{}/#/snapshots/demo-03", server.url()))
            .await;
        assert!(b.find_all(&format!("{row} .kept")).await.is_empty());
        b.click(&format!("{row} button.keep")).await;
        b.wait_text(&format!("{row} .kept"), "kept").await;
        b.wait_text("#message", "schedules never prune it").await;
        let s = kept().await;
        assert_eq!(
            (&s["kept"], &s["kept_by"]),
            (&json!(true), &json!("op")),
            "{s}"
        );
        b.click(&format!("{row} button.unkeep")).await;
        wait_gone(b, &format!("{row} .kept")).await;
        b.wait(&format!("{row} button.keep")).await;
        assert_eq!(kept().await["kept"], false);
    })
    .await;
    admin(&server, "POST", &format!("/v1/snapshots/{snap}/keep"), None).await;
    with_browser("keep_viewer", async |b| {
        sign_in(b, &server, "vw").await;
        b.goto(&format!("{}/#/snapshots/demo-03", server.url()))
            .await;
        b.wait_text(&format!("{row} .kept"), "kept").await;
        assert!(b.find_all("button.keep, button.unkeep").await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn since_and_until_narrow_the_events_grid_and_its_export_and_an_empty_window_is_refused() {
    let server = world().await;
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = crate::access::ingested(&server, tmp.path(), "demo-02").await;
    let id = admin(
        &server,
        "POST",
        &format!("/v1/snapshots/{snap}/connect"),
        None,
    )
    .await["id"]
        .as_i64()
        .unwrap();
    with_browser("time_window", async |b| {
        sign_in(b, &server, "op").await;
        b.goto(&format!("{}/#/grid/{id}", server.url())).await;
        b.wait("#events tr.event").await;
        // Newest first: a window from the 10th row's time up to (not including) the 3rd's.
        let all = column(b, "ts").await;
        assert!(all.len() > 10, "{all:?}");
        let (since, until) = (all[9].clone(), all[2].clone());
        let inside: Vec<&String> = all.iter().filter(|t| **t >= since && **t < until).collect();
        assert!(!inside.is_empty() && inside.len() < all.len(), "{all:?}");
        b.type_into("#since", &since).await;
        b.type_into("#until", &until).await;
        b.click("#apply").await;
        let shown = eventually(Duration::from_secs(30), "the window", || async {
            let now = column(b, "ts").await;
            (now.len() == inside.len()).then_some(now)
        })
        .await;
        assert!(shown.iter().all(|t| *t >= since && *t < until), "{shown:?}");
        b.wait_text("#page-info", &format!("{} rows", inside.len()))
            .await;
        // The export takes the same window.
        b.click("#export").await;
        b.wait("#export-download").await;
        let csv = b
            .execute(
                "const r = await fetch(document.querySelector('#export-download').href); return await r.text();",
                json!([]),
            )
            .await;
        let csv = csv.as_str().unwrap();
        assert_eq!(csv.lines().count(), 1 + inside.len(), "{csv}");
        // Until before since: the grid says why and shows no rows.
        b.clear("#since").await;
        b.clear("#until").await;
        b.type_into("#since", &until).await;
        b.type_into("#until", &since).await;
        b.click("#apply").await;
        let said = b.wait_text("#message.error", "Empty time window").await;
        assert!(said.contains("must be later than Since"), "{said}");
        wait_gone(b, "#events tr.event").await;
        // A time it cannot read says what to type.
        b.clear("#until").await;
        b.type_into("#until", "last tuesday").await;
        b.click("#apply").await;
        b.wait_text("#message.error", "is not a time").await;
        // Cleared, the window is gone.
        b.clear("#since").await;
        b.clear("#until").await;
        b.click("#apply").await;
        b.wait_text("#page-info", &format!("{} rows", all.len()))
            .await;
    })
    .await;
}
