//! Saved evidence and export jobs against a real server: hostile cell text, empty results, a
//! server killed mid-export, a cancel, someone else's export or evidence, evidence outliving its
//! snapshot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{TestServer, eventually, files_under};

/// Process command lines a spreadsheet must never run, and text a CSV must carry intact.
const HOSTILE: [&str; 7] = [
    "=HYPERLINK(\"http://x\")",
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "a, \"quoted\", comma",
    "line one\nline two\r\n\ttabbed",
    "ünïcödé 日本語 🚀",
];

/// A snapshot file of `hostname` with `prefill` simulated events plus one process per hostile
/// command line (ids 1_000_001...).
fn hostile_snapshot(dir: &Path, hostname: &str, prefill: u64) -> PathBuf {
    let data = dir.join(format!("agent-{hostname}"));
    std::fs::create_dir_all(&data).unwrap();
    {
        let db = snapq::agent::recorder::RecorderDb::open(
            &data.join("monitor.db"),
            hostname,
            Default::default(),
        )
        .unwrap();
        snapq::agent::recorder::prefill(&db, prefill).unwrap();
    }
    {
        let conn = rusqlite::Connection::open(data.join("monitor.db")).unwrap();
        for (i, cmdline) in HOSTILE.iter().enumerate() {
            conn.execute(
                "INSERT INTO process (id, ts, pid, ppid, path, cmdline, user) VALUES (?1, ?2, ?3, 1, '/bin/sh', ?4, 'mallory')",
                rusqlite::params![1_000_001 + i as i64, 1_700_000_000_000i64 + i as i64, 4242 + i as i64, cmdline],
            )
            .unwrap();
        }
    }
    let out = dir.join(format!("out-{hostname}"));
    std::fs::create_dir_all(&out).unwrap();
    snapq::agent::export::export(&data, &out, None)
        .unwrap()
        .path
}

/// Uploads a snapshot file as admin and waits for it: its snapshot id.
async fn upload(server: &TestServer, file: &Path) -> i64 {
    let name = file.file_name().unwrap().to_str().unwrap();
    let response = server
        .client()
        .post(format!("{}/v1/uploads?name={name}", server.url()))
        .bearer_auth(&server.token)
        .body(std::fs::read(file).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ingest = eventually(Duration::from_secs(60), "the ingest", || async {
        let (_, i) = server.get(&format!("/v1/ingests/{job}")).await;
        (i["state"] != "pending").then_some(i)
    })
    .await;
    assert_eq!(ingest["state"], "complete", "{ingest}");
    ingest["snapshot_id"].as_i64().unwrap()
}

async fn call(
    server: &TestServer,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}{path}", server.url());
    let mut request = match method {
        "GET" => server.client().get(url),
        "POST" => server.client().post(url),
        "DELETE" => server.client().delete(url),
        other => panic!("no helper for {other}"),
    };
    request = request.bearer_auth(token);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until export `id` ends; returns it.
async fn finished(server: &TestServer, id: i64) -> Value {
    eventually(Duration::from_secs(120), "the export to end", || async {
        let (_, e) = server.get(&format!("/v1/exports/{id}")).await;
        matches!(
            e["state"].as_str(),
            Some("complete" | "failed" | "cancelled")
        )
        .then_some(e)
    })
    .await
}

fn export_files(server: &TestServer) -> Vec<PathBuf> {
    files_under(&server.data_dir.join("exports"))
}

fn python_csv_rows(path: &Path) -> Vec<Vec<String>> {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import csv, json, sys\n\
             with open(sys.argv[1], newline='', encoding='utf-8') as f:\n\
             \x20   print(json.dumps(list(csv.reader(f))))",
        )
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The text of every cell of an XLSX sheet, read with Python's zipfile (no extra dependency).
fn xlsx_sheet_xml(path: &Path, sheet: u32) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import zipfile, sys\nprint(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]).decode())")
        .arg(path)
        .arg(format!("xl/worksheets/sheet{sheet}.xml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_guard_formulas_and_keep_hostile_text_intact_in_every_format() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let snap = upload(&server, &hostile_snapshot(tmp.path(), "exp-web-01", 200)).await;
    let snap = snap.to_string();
    let filter = ["--type", "process", "--where", "user eq mallory"];

    // CSV through the CLI, downloaded with -o; read back with the csv crate and with Python.
    let csv_path = tmp.path().join("out.csv");
    let mut args = vec!["export", "--snapshot", &snap, "--format", "csv", "-o"];
    args.push(csv_path.to_str().unwrap());
    args.extend(filter);
    let (code, out, err) = server.cli(&args);
    assert_eq!(code, 0, "{out}{err}");
    let mut reader = csv::Reader::from_path(&csv_path).unwrap();
    let header = reader.headers().unwrap().clone();
    let cmd = header.iter().position(|h| h == "cmdline").unwrap();
    assert_eq!(&header[0], "type");
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), HOSTILE.len());
    let by_crate: Vec<String> = rows.iter().map(|r| r[cmd].to_owned()).collect();
    let expected: Vec<String> = HOSTILE
        .iter()
        .map(|h| {
            if h.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                format!("'{h}")
            } else {
                h.to_string()
            }
        })
        .collect();
    assert_eq!(by_crate, expected);
    let by_python = python_csv_rows(&csv_path);
    assert_eq!(by_python[0], header.iter().collect::<Vec<_>>());
    let python_cmds: Vec<String> = by_python[1..].iter().map(|r| r[cmd].clone()).collect();
    assert_eq!(python_cmds, expected);
    assert!(rows.iter().all(|r| &r[0] == "process"));

    // JSON Lines: every value exactly as recorded (no guard: it is not a spreadsheet).
    let jsonl = tmp.path().join("out.jsonl");
    let mut args = vec!["export", "--snapshot", &snap, "--format", "jsonl", "-o"];
    args.push(jsonl.to_str().unwrap());
    args.extend(filter);
    let (code, out, err) = server.cli(&args);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cmds: Vec<&str> = lines
        .iter()
        .map(|l| l["cmdline"].as_str().unwrap())
        .collect();
    assert_eq!(cmds, HOSTILE);
    assert_eq!(lines[0]["user"], "mallory");

    // XLSX: a zip whose sheet holds every text as a string cell (never a formula).
    let xlsx = tmp.path().join("out.xlsx");
    let mut args = vec!["export", "--snapshot", &snap, "--format", "xlsx", "-o"];
    args.push(xlsx.to_str().unwrap());
    args.extend(filter);
    let (code, out, err) = server.cli(&args);
    assert_eq!(code, 0, "{out}{err}");
    let sheet = xlsx_sheet_xml(&xlsx, 1);
    assert!(!sheet.contains("<f>"), "no formula cells: {sheet}");
    assert!(
        sheet.contains(&xml_escape("=HYPERLINK(\"http://x\")")),
        "{sheet}"
    );
    assert!(sheet.contains("ünïcödé 日本語 🚀"), "{sheet}");

    // Listed, with rows and bytes; no partial file left anywhere.
    let (code, out, _) = server.cli(&["exports", "list", "--json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "complete" && e["rows"] == HOSTILE.len())
    );
    let files = export_files(&server);
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| !f.to_string_lossy().contains(".partial"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_of_zero_rows_is_a_valid_file_with_only_its_header() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let snap = upload(&server, &hostile_snapshot(tmp.path(), "exp-web-02", 100)).await;
    let snap = snap.to_string();
    // SQL-looking text is a value like any other: it matches nothing and breaks nothing.
    let nothing = "cmdline eq x' OR '1'='1' --";
    for format in ["csv", "jsonl", "xlsx"] {
        let out_path = tmp.path().join(format!("empty.{format}"));
        let (code, out, err) = server.cli(&[
            "export",
            "--snapshot",
            &snap,
            "--type",
            "process",
            "--where",
            nothing,
            "--format",
            format,
            "-o",
            out_path.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{format}: {out}{err}");
        match format {
            "csv" => {
                let rows = python_csv_rows(&out_path);
                assert_eq!(rows.len(), 1, "{rows:?}");
                assert_eq!(rows[0][0], "type");
                assert!(rows[0].contains(&"cmdline".to_owned()));
            }
            "jsonl" => assert_eq!(std::fs::read(&out_path).unwrap().len(), 0),
            _ => {
                let sheet = xlsx_sheet_xml(&out_path, 1);
                assert!(sheet.contains("cmdline"), "{sheet}");
                assert!(!sheet.contains("<row r=\"2\""), "{sheet}");
            }
        }
    }
}

/// Found by schemathesis: the 416 of a range outside the file was labelled with the export's
/// format (`application/jsonl`) though its body is the JSON error.
#[tokio::test(flavor = "multi_thread")]
async fn a_range_outside_an_export_file_answers_a_json_416() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let snap = upload(&server, &hostile_snapshot(tmp.path(), "exp-web-03", 100)).await;
    let (status, export) = call(
        &server,
        &server.token,
        "POST",
        "/v1/exports",
        Some(json!({ "snapshot": snap, "format": "jsonl", "types": ["process"] })),
    )
    .await;
    assert_eq!(status, 202, "{export}");
    let export = finished(&server, export["id"].as_i64().unwrap()).await;
    assert_eq!(export["state"], "complete", "{export}");
    let response = server
        .client()
        .get(format!("{}/v1/exports/{}/file", server.url(), export["id"]))
        .bearer_auth(&server.token)
        .header("Range", "bytes=999999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 416);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert!(response.headers().get("content-disposition").is_none());
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("outside"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_export_requests_are_refused_with_what_to_do() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let snap = upload(&server, &hostile_snapshot(tmp.path(), "exp-web-03", 50)).await;
    let snap = snap.to_string();
    for (args, says) in [
        (
            vec!["--type", "process", "--where", "colour eq red"],
            "unknown field `colour`",
        ),
        (
            vec!["--type", "process", "--where", "path like x"],
            "unknown operator `like`",
        ),
        (vec!["--type", "process", "--where", "pid gt many"], "pid"),
        (vec!["--type", "proc"], "unknown event type `proc`"),
        (
            vec!["--type", "process", "--since", "last tuesday"],
            "RFC 3339",
        ),
        (vec!["--type", "process", "--sort", "-colour"], "`colour`"),
    ] {
        let mut all = vec!["export", "--snapshot", &snap, "--format", "csv"];
        all.extend(args.iter().copied());
        let (code, out, err) = server.cli(&all);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, _, err) = server.cli(&["export", "--snapshot", &snap, "--format", "pdf"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = server.cli(&["export", "--snapshot", "999", "--format", "csv"]);
    assert_eq!(code, 1);
    assert!(err.contains("no snapshot with id 999"), "{err}");
    // No job ran for any of them.
    let (_, list) = server.get("/v1/exports").await;
    assert_eq!(list, json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_killed_mid_export_reruns_it_into_one_complete_file_and_no_partial() {
    let mut server = TestServer::spawn_with(&["--export-max-rows-per-sec", "2000"]);
    let tmp = tempfile::tempdir().unwrap();
    let snap = upload(&server, &hostile_snapshot(tmp.path(), "exp-web-04", 6_000)).await;
    let (status, export) = call(
        &server,
        &server.token.clone(),
        "POST",
        "/v1/exports",
        Some(json!({ "snapshot": snap, "format": "csv" })),
    )
    .await;
    assert_eq!(status, 202, "{export}");
    let id = export["id"].as_i64().unwrap();
    eventually(
        Duration::from_secs(30),
        "the export to write rows",
        || async {
            let (_, e) = server.get(&format!("/v1/exports/{id}")).await;
            (e["state"] == "running" && e["rows"].as_u64()? > 0).then_some(())
        },
    )
    .await;
    let partials: Vec<PathBuf> = export_files(&server);
    assert_eq!(partials.len(), 1, "{partials:?}");
    assert!(partials[0].to_string_lossy().ends_with(".partial"));

    server.crash_and_restart();
    let done = finished(&server, id).await;
    assert_eq!(done["state"], "complete", "{done}");
    let files = export_files(&server);
    assert_eq!(files.len(), 1, "one file, no partial: {files:?}");
    let path = &files[0];
    assert_eq!(
        path.file_name().unwrap().to_str().unwrap(),
        done["file_name"].as_str().unwrap()
    );
    let rows = csv::Reader::from_path(path).unwrap().records().count() as u64;
    assert_eq!(rows, done["rows"].as_u64().unwrap());
    let total: u64 =
        snapq_core::verify::verify_snapshot(&files_under(&server.data_dir.join("snapshots"))[0])
            .unwrap()
            .events;
    assert_eq!(rows, total, "every event once");

    // Downloadable with Range, as a resuming client asks.
    let response = server
        .client()
        .get(format!("{}/v1/exports/{id}/file", server.url()))
        .bearer_auth(&server.token)
        .header("Range", "bytes=0-3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"type");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_export_leaves_no_file() {
    let server = TestServer::spawn_with(&["--export-max-rows-per-sec", "500"]);
    let tmp = tempfile::tempdir().unwrap();
    let snap = upload(&server, &hostile_snapshot(tmp.path(), "exp-web-05", 3_000)).await;
    let (status, export) = call(
        &server,
        &server.token.clone(),
        "POST",
        "/v1/exports",
        Some(json!({ "snapshot": snap, "format": "xlsx" })),
    )
    .await;
    assert_eq!(status, 202, "{export}");
    let id = export["id"].as_i64().unwrap();
    let job = export["job_id"].as_str().unwrap().to_owned();
    eventually(
        Duration::from_secs(30),
        "the export to write rows",
        || async {
            let (_, e) = server.get(&format!("/v1/exports/{id}")).await;
            (e["rows"].as_u64()? > 0).then_some(())
        },
    )
    .await;
    let (code, out, err) = server.cli(&["queue", "cancel", &job]);
    assert_eq!(code, 0, "{out}{err}");
    let done = finished(&server, id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    eventually(
        Duration::from_secs(10),
        "the partial file to go",
        || async { export_files(&server).is_empty().then_some(()) },
    )
    .await;
    let (status, body) = call(
        &server,
        &server.token.clone(),
        "GET",
        &format!("/v1/exports/{id}/file"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{body}");
}

/// An operator granted only `team` (hostnames `exp-in-*`): their token.
async fn outsider(server: &TestServer) -> String {
    let admin = server.token.clone();
    let (s, _) = call(
        server,
        &admin,
        "POST",
        "/v1/groups",
        Some(json!({ "name": "team", "hostnames": ["exp-in-*"] })),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        server,
        &admin,
        "POST",
        "/v1/users",
        Some(json!({ "name": "op", "role": "operator", "groups": ["team"] })),
    )
    .await;
    assert!(s < 300);
    let (s, made) = call(
        server,
        &admin,
        "POST",
        "/v1/tokens",
        Some(json!({ "user": "op" })),
    )
    .await;
    assert!(s < 300, "{made}");
    made["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn evidence_outlives_its_snapshot_and_is_invisible_outside_its_groups() {
    let server = TestServer::spawn();
    let admin = server.token.clone();
    let tmp = tempfile::tempdir().unwrap();
    let snap = upload(&server, &hostile_snapshot(tmp.path(), "exp-out-01", 100)).await;
    let snap_s = snap.to_string();

    let (code, out, err) = server.cli(&[
        "evidence",
        "save",
        "--snapshot",
        &snap_s,
        "process:1000001",
        "process:1000005",
        "--note",
        "payload, \"quoted\"",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let saved: Value = serde_json::from_str(&out).unwrap();
    let evidence_id = saved[0]["id"].as_i64().unwrap();
    assert_eq!(saved[0]["event"]["cmdline"], HOSTILE[0]);
    assert_eq!(saved[0]["saved_by"], "admin");
    assert_eq!(saved[0]["source_kind"], "snapshot");
    // Refs that are not there, or not refs at all.
    let (code, _, err) = server.cli(&[
        "evidence",
        "save",
        "--snapshot",
        &snap_s,
        "process:99999999",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no process event 99999999"), "{err}");
    let (code, _, err) = server.cli(&["evidence", "save", "--snapshot", &snap_s, "process;1"]);
    assert_eq!(code, 1);
    assert!(err.contains("TYPE:ID"), "{err}");

    // Through the snapshot opened as a connection: the same rows as the snapshot itself.
    let (code, out, err) = server.cli(&["live", "open", &snap_s, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let opened: Value = serde_json::from_str(&out).unwrap();
    let conn = opened["id"]
        .as_i64()
        .or(opened[0]["id"].as_i64())
        .unwrap()
        .to_string();
    let via_conn = tmp.path().join("via-connection.csv");
    let (code, out, err) = server.cli(&[
        "export",
        "--connection",
        &conn,
        "--type",
        "process",
        "--where",
        "user eq mallory",
        "--format",
        "csv",
        "-o",
        via_conn.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(python_csv_rows(&via_conn).len(), 1 + HOSTILE.len());

    // An export of the evidence, and someone else's view of both.
    let (status, export) = call(
        &server,
        &admin,
        "POST",
        "/v1/exports",
        Some(json!({ "evidence": true, "endpoint": "exp-out-01", "format": "csv" })),
    )
    .await;
    assert_eq!(status, 202, "{export}");
    let export_id = export["id"].as_i64().unwrap();
    assert_eq!(finished(&server, export_id).await["state"], "complete");
    let op = outsider(&server).await;
    for path in [
        format!("/v1/evidence/{evidence_id}"),
        format!("/v1/exports/{export_id}"),
        format!("/v1/exports/{export_id}/file"),
    ] {
        let (status, body) = call(&server, &op, "GET", &path, None).await;
        assert_eq!(status, 404, "{path}: {body}");
        let missing = path.replace(&format!("/{evidence_id}"), "/987654");
        let missing = if missing == path {
            path.replace(&format!("/{export_id}"), "/987654")
        } else {
            missing
        };
        let (status, missing_body) = call(&server, &op, "GET", &missing, None).await;
        assert_eq!(status, 404);
        let id = path.rsplit('/').find(|p| p.parse::<i64>().is_ok()).unwrap();
        assert_eq!(
            body["error"].as_str().unwrap().replace(id, "ID"),
            missing_body["error"]
                .as_str()
                .unwrap()
                .replace("987654", "ID"),
            "outside looks exactly like missing"
        );
    }
    let (status, body) = call(
        &server,
        &op,
        "DELETE",
        &format!("/v1/evidence/{evidence_id}"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (_, listed) = call(&server, &op, "GET", "/v1/evidence", None).await;
    assert_eq!(listed, json!([]));
    let (_, listed) = call(&server, &op, "GET", "/v1/exports", None).await;
    assert_eq!(listed, json!([]));

    // The snapshot goes; the evidence stays, with every column.
    let (code, out, err) = server.cli(&["snapshots", "delete", &snap_s, "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(
        Duration::from_secs(30),
        "the snapshot to be deleted",
        || async {
            let (status, _) = server.get(&format!("/v1/snapshots/{snap}")).await;
            (status == 404).then_some(())
        },
    )
    .await;
    let (code, out, err) = server.cli(&["evidence", "show", &evidence_id.to_string(), "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["event"]["cmdline"], HOSTILE[0]);
    assert_eq!(shown["event"]["user"], "mallory");
    assert_eq!(shown["note"], "payload, \"quoted\"");

    // An evidence export after the snapshot is gone still has both events, guarded.
    let out_path = tmp.path().join("evidence.csv");
    let (code, out, err) = server.cli(&[
        "export",
        "--evidence",
        "--endpoint",
        "exp-out-01",
        "--format",
        "csv",
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let rows = python_csv_rows(&out_path);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let cmd = rows[0].iter().position(|h| h == "cmdline").unwrap();
    let note = rows[0].iter().position(|h| h == "note").unwrap();
    assert_eq!(rows[1][cmd], format!("'{}", HOSTILE[0]));
    assert_eq!(rows[1][note], "payload, \"quoted\"");

    // The events filters apply to evidence as to a snapshot: a condition, a sort, and the same
    // error for a field no event type has.
    let export_evidence = |extra: &[&str], name: &str| {
        let path = tmp.path().join(name);
        let mut args = vec!["export", "--evidence", "--endpoint", "exp-out-01"];
        args.extend_from_slice(extra);
        args.extend(["--format", "csv", "-o", path.to_str().unwrap()]);
        let (code, out, err) = server.cli(&args);
        (code, format!("{out}{err}"), path)
    };
    let (code, said, path) = export_evidence(&["--where", "id eq 1000005"], "one.csv");
    assert_eq!(code, 0, "{said}");
    let rows = python_csv_rows(&path);
    let id = rows[0].iter().position(|h| h == "id").unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1][id], "1000005");
    let (code, said, path) = export_evidence(&["--type", "process", "--sort", "-id"], "sorted.csv");
    assert_eq!(code, 0, "{said}");
    let rows = python_csv_rows(&path);
    let id = rows[0].iter().position(|h| h == "id").unwrap();
    let ids: Vec<String> = rows[1..].iter().map(|r| r[id].clone()).collect();
    assert_eq!(ids, ["1000005", "1000001"]);
    let (code, said, _) = export_evidence(&["--where", "colour eq red"], "bad.csv");
    assert_ne!(code, 0);
    assert!(said.contains("colour"), "{said}");

    let (code, _, err) = server.cli(&["evidence", "delete", &evidence_id.to_string()]);
    assert_eq!(code, 2, "asks for --yes: {err}");
    let (code, out, err) = server.cli(&["evidence", "delete", &evidence_id.to_string(), "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    let (status, _) = server.get(&format!("/v1/evidence/{evidence_id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_connection_saves_evidence_and_exports_every_matching_event_of_the_agent() {
    let server = TestServer::spawn();
    let _agent = crate::support::TestAgent::spawn_with(crate::support::AgentOptions {
        hostname: "exp-live-01".into(),
        simulate: Some(50),
        prefill: 5_000,
        extra: server.enroll_args(),
    });
    server.wait_online("exp-live-01").await;
    let admin = server.token.clone();
    let (status, made) = call(
        &server,
        &admin,
        "POST",
        "/v1/connections",
        Some(json!({ "targets": ["exp-live-01"] })),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let conn = made[0]["id"].as_i64().unwrap().to_string();

    // Evidence through the connection: the agent's event, every column.
    let (status, page) = call(
        &server,
        &admin,
        "GET",
        &format!("/v1/connections/{conn}/events?type=process&limit=1&sort=id"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let first = page["events"][0].clone();
    let reference = format!("process:{}", first["id"]);
    let (code, out, err) = server.cli(&[
        "evidence",
        "save",
        "--connection",
        &conn,
        &reference,
        "--note",
        "first process",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let saved: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(saved[0]["event"], first);
    assert_eq!(saved[0]["source_kind"], "endpoint");
    assert_eq!(saved[0]["connection_id"], conn.as_str());

    // A live export pages through the agent: every process event recorded before it started,
    // once, in ts order.
    let out_path = tmp_file("live.csv");
    let (code, out, err) = server.cli(&[
        "export",
        "--connection",
        &conn,
        "--type",
        "process",
        "--where",
        "pid gte 0",
        "--format",
        "csv",
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let mut reader = csv::Reader::from_path(&out_path).unwrap();
    let id_col = reader
        .headers()
        .unwrap()
        .iter()
        .position(|h| h == "id")
        .unwrap();
    let ids: Vec<i64> = reader
        .records()
        .map(|r| r.unwrap()[id_col].parse().unwrap())
        .collect();
    let unique: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice");
    assert!(ids.len() > 2_000 / 10, "{} rows", ids.len());
    assert!(ids.contains(&first["id"].as_i64().unwrap()));
    let _ = std::fs::remove_file(&out_path);

    // A connection that is closed is refused, saying how to reconnect.
    let (code, _, err) = server.cli(&["live", "close", &conn]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = server.cli(&[
        "export",
        "--connection",
        &conn,
        "--type",
        "process",
        "--format",
        "csv",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("snapq live reconnect"), "{err}");
}

fn tmp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("snapq-export-test-{}-{name}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_exports_are_pruned_after_the_retention_period() {
    // 0.00003 days is about 2.6 s.
    let server = TestServer::spawn_with(&["--export-retention-days", "0.00003"]);
    let tmp = tempfile::tempdir().unwrap();
    let snap = upload(&server, &hostile_snapshot(tmp.path(), "exp-web-06", 50)).await;
    let (status, export) = call(
        &server,
        &server.token.clone(),
        "POST",
        "/v1/exports",
        Some(json!({ "snapshot": snap, "format": "jsonl" })),
    )
    .await;
    assert_eq!(status, 202, "{export}");
    let id = export["id"].as_i64().unwrap();
    assert_eq!(finished(&server, id).await["state"], "complete");
    eventually(
        Duration::from_secs(30),
        "the export to be pruned",
        || async {
            let (status, _) = server.get(&format!("/v1/exports/{id}")).await;
            (status == 404 && export_files(&server).is_empty()).then_some(())
        },
    )
    .await;
    let (_, audit) = server.get("/v1/audit?action=export").await;
    assert!(
        audit.to_string().contains("export.expire"),
        "the pruning is audited: {audit}"
    );
}
