//! Snapshots that arrive whole: uploads over HTTPS, rejected files, deletion, and TLS itself.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::support::{TestServer, eventually, files_under, run_snapq, snapshot_file};

fn quarantined(server: &TestServer) -> Vec<PathBuf> {
    files_under(&server.data_dir.join("quarantine"))
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_and_connect_ingests_once_and_a_second_upload_is_a_duplicate() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let file = snapshot_file(tmp.path(), "field-pc", 3_000);
    let path = file.to_str().unwrap();

    let (code, stdout, stderr) = server.cli(&["upload", path, "--connect", "--json"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let result: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result[0]["ingest"]["state"], "complete");
    let snap = &result[0]["snapshot"];
    assert_eq!(snap["origin"], "upload");
    assert_eq!(snap["hostname"], "field-pc");
    assert_eq!(snap["events"], 3_000);
    let stored = server
        .data_dir
        .join("snapshots/field-pc")
        .join(file.file_name().unwrap());
    assert_eq!(
        snapq_core::verify::sha256_file(&stored).unwrap(),
        snapq_core::verify::sha256_file(&file).unwrap()
    );

    let (code, stdout, _) = server.cli(&["upload", path, "--connect", "--json"]);
    assert_eq!(code, 0);
    let again: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(again[0]["ingest"]["state"], "duplicate");
    assert_eq!(again[0]["snapshot"]["id"], snap["id"]);
    assert_eq!(files_under(&server.data_dir.join("snapshots")).len(), 1);
    assert!(files_under(&server.data_dir.join("incoming")).is_empty());

    // The endpoint known only from its upload is listed, offline, with its capture count.
    let (_, groups) = server.get("/v1/snapshots").await;
    assert_eq!(groups[0]["hostname"], "field-pc");
    assert_eq!(groups[0]["captures"], 1);
    let (_, endpoints) = server.get("/v1/endpoints").await;
    assert_eq!(endpoints[0]["online"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_files_are_quarantined_with_their_reason_and_nothing_stored_is_harmed() {
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let good = snapshot_file(tmp.path(), "web-01", 1_000);
    let (code, _, stderr) = server.cli(&["upload", good.to_str().unwrap(), "--connect"]);
    assert_eq!(code, 0, "{stderr}");

    let bytes = std::fs::read(&good).unwrap();
    let plain = tmp.path().join("plain.db");
    rusqlite::Connection::open(&plain)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty_2026_01_01T00.00.00.000Z.db", Vec::new(), "empty"),
        (
            "text_2026_01_01T00.00.00.000Z.db",
            b"just some text, renamed".to_vec(),
            "not an SQLite",
        ),
        (
            "cut_2026_01_01T00.00.00.000Z.db",
            bytes[..bytes.len() / 3].to_vec(),
            "damaged",
        ),
        (
            "plain_2026_01_01T00.00.00.000Z.db",
            std::fs::read(&plain).unwrap(),
            "recorder",
        ),
    ];
    for (name, content, reason) in &cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, content).unwrap();
        let (code, stdout, _) =
            server.cli(&["upload", path.to_str().unwrap(), "--connect", "--json"]);
        assert_eq!(code, 1, "{name}");
        let result: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(result[0]["ingest"]["state"], "quarantined", "{name}");
        let why = result[0]["ingest"]["reason"].as_str().unwrap();
        assert!(why.contains(reason), "{name}: {why}");
        let reason_file = quarantined(&server)
            .into_iter()
            .find(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.starts_with(name) && n.ends_with(".reason.json")
            })
            .unwrap_or_else(|| panic!("no reason file for {name}"));
        let written: Value = serde_json::from_slice(&std::fs::read(reason_file).unwrap()).unwrap();
        assert!(written["reason"].as_str().unwrap().contains(reason));
        assert_eq!(written["size"], content.len());
    }
    // The good snapshot is untouched and still the only one.
    assert_eq!(files_under(&server.data_dir.join("snapshots")).len(), 1);
    let (_, groups) = server.get("/v1/snapshots").await;
    assert_eq!(groups.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_upload_names_are_refused_before_any_byte_is_stored() {
    let server = TestServer::spawn();
    let long = format!("{}_2026_01_01T00.00.00.000Z.db", "a".repeat(300));
    for name in [
        "../../etc/passwd_2026_01_01T00.00.00.000Z.db",
        "/abs_2026_01_01T00.00.00.000Z.db",
        "a\u{0}b_2026_01_01T00.00.00.000Z.db",
        "ctl\u{7}_2026_01_01T00.00.00.000Z.db",
        long.as_str(),
        "web_2026_02_30T00.00.00.000Z.db",
        "web_2026-01-01T00:00:00Z.db",
        "web.db",
    ] {
        let response = server
            .client()
            .post(format!(
                "{}/v1/uploads?name={}",
                server.url(),
                form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
            ))
            .bearer_auth(&server.token)
            .body(vec![0u8; 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name:?}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("not a snapshot name")
        );
    }
    assert!(files_under(&server.data_dir.join("incoming")).is_empty());
    assert!(files_under(&server.data_dir.join("snapshots")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_interrupted_uploads_leave_nothing_behind() {
    let server = TestServer::spawn_with(&["--upload-max-mib", "1"]);
    let url = format!(
        "{}/v1/uploads?name=big_2026_01_01T00.00.00.000Z.db",
        server.url()
    );
    // What a user sees: `snapq upload` of a file over the limit fails with the reason.
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big_2026_01_01T00.00.00.000Z.db");
    std::fs::write(&big, vec![1u8; 3 << 20]).unwrap();
    let (code, stdout, stderr) = server.cli(&["upload", big.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("larger than the upload limit of 1.0 MiB") && stderr.contains("HTTP 413"),
        "{stderr}"
    );
    // A body without a declared length is cut off at the limit with the same answer.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..12).map(|_| Ok(vec![1u8; 256 * 1024])).collect();
    let response = server
        .client()
        .post(&url)
        .bearer_auth(&server.token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("the server answers an oversized upload");
    assert_eq!(response.status(), 413);
    // A body that breaks off mid-stream.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(vec![2u8; 256 * 1024]),
        Err(std::io::Error::other("cable pulled")),
    ];
    let broken = server
        .client()
        .post(url.replace("big", "cut"))
        .bearer_auth(&server.token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    // The client's own body failed: the user sees their upload error out, and nothing is kept.
    let error = broken.expect_err("a body that breaks off cannot be accepted");
    assert!(
        snapq_core::agent_client::error_chain(&error).contains("cable pulled"),
        "{error:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the spool to be cleaned",
        || async {
            files_under(&server.data_dir.join("incoming"))
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let (_, jobs) = server.get("/v1/queue/jobs").await;
    assert_eq!(jobs.as_array().unwrap().len(), 0);
    // Wrong or missing tokens cannot upload at all.
    for token in [None, Some("wrong")] {
        let mut request = server
            .client()
            .post(url.replace("big", "tok"))
            .body(vec![0u8; 10]);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        assert_eq!(request.send().await.unwrap().status(), 401);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_snapshots_removes_file_and_entry_idempotently_and_is_audited() {
    if !crate::support::catalog_in_data_dir(
        "deleting_snapshots_removes_file_and_entry_idempotently_and_is_audited",
    ) {
        return;
    }
    let server = TestServer::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for (host, n) in [("web-01", 500), ("web-01", 600), ("web-02", 700)] {
        let file = snapshot_file(tmp.path(), host, n);
        let (code, stdout, _) =
            server.cli(&["upload", file.to_str().unwrap(), "--connect", "--json"]);
        assert_eq!(code, 0);
        let r: Value = serde_json::from_str(&stdout).unwrap();
        ids.push(r[0]["snapshot"]["id"].as_i64().unwrap());
    }
    // Not from a terminal and without --yes: a usage error, nothing deleted.
    let first = ids[0].to_string();
    let (code, _, stderr) = server.cli(&["snapshots", "delete", &first]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--yes"));
    let (code, _, stderr) = server.cli(&["snapshots", "delete", "999999", "--yes"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no snapshot with id 999999"), "{stderr}");
    assert_eq!(files_under(&server.data_dir.join("snapshots")).len(), 3);

    // Two deletes of the same snapshot at once: it goes, once, and nothing errors.
    let delete_first = || {
        let (url, dir, id) = (server.url(), server.data_dir.clone(), first.clone());
        tokio::task::spawn_blocking(move || {
            let dir = dir.to_str().unwrap().to_owned();
            run_snapq(&[
                "snapshots",
                "delete",
                &id,
                "--yes",
                "--server",
                &url,
                "--data-dir",
                &dir,
            ])
        })
    };
    let (a, b) = tokio::join!(delete_first(), delete_first());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.0 == 0 || b.0 == 0, "{a:?} {b:?}");
    for r in [&a, &b] {
        assert!(r.0 == 0 || r.2.contains("no snapshot with id"), "{r:?}");
    }
    let (_, groups) = server.get("/v1/snapshots?endpoint=web-01").await;
    assert_eq!(groups[0]["captures"], 1);

    let (code, stdout, _) = server.cli(&["snapshots", "delete", "--endpoint", "web-01", "--yes"]);
    assert_eq!(code, 0, "{stdout}");
    let remaining = files_under(&server.data_dir.join("snapshots"));
    assert_eq!(remaining.len(), 1);
    assert!(remaining[0].to_string_lossy().contains("web-02"));
    let (_, groups) = server.get("/v1/snapshots?endpoint=web-01").await;
    assert_eq!(groups.as_array().unwrap().len(), 0);

    let audit: i64 = rusqlite::Connection::open(server.data_dir.join("catalog.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM audit WHERE action = 'snapshot.delete' AND actor = 'admin'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let rows: Vec<String> = {
        let conn = rusqlite::Connection::open(server.data_dir.join("catalog.db")).unwrap();
        let mut stmt = conn
            .prepare("SELECT action || ' ' || target || ' ' || result FROM audit")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(audit, 2, "{rows:#?}");

    // An id is never given twice: delete the newest snapshot, store another, and the old id
    // still names nothing (a stale `snapshots delete ID` cannot hit the new one).
    let newest = ids[2].to_string();
    let (code, _, stderr) = server.cli(&["snapshots", "delete", &newest, "--yes"]);
    assert_eq!(code, 0, "{stderr}");
    eventually(
        Duration::from_secs(20),
        "the newest snapshot deleted",
        || async {
            let (status, _) = server.get(&format!("/v1/snapshots/{newest}")).await;
            (status == 404).then_some(())
        },
    )
    .await;
    let file = snapshot_file(tmp.path(), "web-03", 800);
    let (code, stdout, _) = server.cli(&["upload", file.to_str().unwrap(), "--connect", "--json"]);
    assert_eq!(code, 0);
    let r: Value = serde_json::from_str(&stdout).unwrap();
    let next = r[0]["snapshot"]["id"].as_i64().unwrap();
    assert!(next > ids[2], "id {next} reused after deleting {}", ids[2]);
    let (status, _) = server.get(&format!("/v1/snapshots/{newest}")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_the_tls_port_is_told_to_use_https() {
    let server = TestServer::spawn();
    let response = reqwest::Client::new()
        .get(format!("http://{}/status", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("https://"));
    // The server keeps serving.
    let status: Value = server
        .client()
        .get(format!("{}/status", server.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["healthy"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_supplied_certificate_pair_is_served_after_a_restart() {
    let mut server = TestServer::spawn();
    let generated =
        snapq::tls::cert_pin(&server.data_dir.join("certs/httpPublicCert.pem")).unwrap();
    let mine =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(
        server.data_dir.join("certs/httpPublicCert.pem"),
        mine.cert.pem(),
    )
    .unwrap();
    std::fs::write(
        server.data_dir.join("certs/httpPrivKey.pem"),
        mine.signing_key.serialize_pem(),
    )
    .unwrap();
    server.crash_and_restart();
    let pin = snapq::tls::cert_pin(&server.data_dir.join("certs/httpPublicCert.pem")).unwrap();
    assert_ne!(pin, generated);
    // A client pinned to the old certificate is refused; the new pin works.
    let old = snapq::tls::client(&snapq::tls::Trust::Pin(generated)).unwrap();
    assert!(
        old.get(format!("{}/status", server.url()))
            .send()
            .await
            .is_err()
    );
    let new = snapq::tls::client(&snapq::tls::Trust::Pin(pin.clone())).unwrap();
    assert_eq!(
        new.get(format!("{}/status", server.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The enroll token now carries the new pin, and the CLI pins the new certificate itself.
    let enroll = std::fs::read_to_string(server.data_dir.join("enroll.token")).unwrap();
    assert!(enroll.trim().ends_with(&pin));
    let (code, _, stderr) = server.cli(&["queue", "status"]);
    assert_eq!(code, 0, "{stderr}");
    // Without a pin or a CA the CLI does not trust a self-signed server.
    let (code, _, stderr) = run_snapq(&[
        "queue",
        "status",
        "--server",
        &server.url(),
        "--token",
        &server.token,
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot reach") || stderr.contains("certificate"),
        "{stderr}"
    );
}

/// Waits until the catalog lists `n` snapshots, returning the flat list.
pub(crate) async fn wait_snapshots(server: &TestServer, n: usize) -> Vec<Value> {
    eventually(
        Duration::from_secs(30),
        "the drop folder to be ingested",
        || async {
            let (_, groups) = server.get("/v1/snapshots").await;
            let all: Vec<Value> = groups
                .as_array()?
                .iter()
                .flat_map(|g| g["snapshots"].as_array().cloned().unwrap_or_default())
                .collect();
            (all.len() >= n).then_some(all)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drop_folder_ingests_renamed_and_slowly_copied_files_once_each() {
    let server = TestServer::spawn_with(&["--watch-quiet-ms", "400", "--watch-settle-secs", "1"]);
    let watch = server.data_dir.join("watch");
    let tmp = tempfile::tempdir().unwrap();
    let first = snapshot_file(tmp.path(), "drop-01", 2_000);
    let name = first.file_name().unwrap().to_owned();
    let bytes = std::fs::read(&first).unwrap();

    // Renamed in: ingested at once, with origin `watch`, and moved out of the folder.
    std::fs::rename(&first, watch.join(&name)).unwrap();
    let all = wait_snapshots(&server, 1).await;
    assert_eq!(all[0]["origin"], "watch");
    assert_eq!(all[0]["events"], 2_000);
    assert!(!watch.join(&name).exists());

    // Written in place slowly: never taken early or quarantined as truncated.
    let second = snapshot_file(tmp.path(), "drop-02", 20_000);
    let content = std::fs::read(&second).unwrap();
    let target = watch.join(second.file_name().unwrap());
    {
        use std::io::Write;
        let mut out = std::fs::File::create(&target).unwrap();
        for chunk in content.chunks(content.len() / 8 + 1) {
            out.write_all(chunk).unwrap();
            out.flush().unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    let all = wait_snapshots(&server, 2).await;
    assert!(
        all.iter()
            .any(|s| s["hostname"] == "drop-02" && s["events"] == 20_000)
    );
    assert!(
        quarantined(&server).is_empty(),
        "{:?}",
        quarantined(&server)
    );

    // The first file dropped again, and uploaded once more: duplicates, stored once.
    std::fs::write(watch.join(&name), &bytes).unwrap();
    let again = tmp.path().join(&name);
    std::fs::write(&again, &bytes).unwrap();
    let (code, stdout, _) = server.cli(&["upload", again.to_str().unwrap(), "--connect", "--json"]);
    assert_eq!(code, 0);
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r[0]["ingest"]["state"], "duplicate");
    eventually(
        Duration::from_secs(20),
        "the dropped duplicate to be handled",
        || async { (!watch.join(&name).exists()).then_some(()) },
    )
    .await;
    assert_eq!(files_under(&server.data_dir.join("snapshots")).len(), 2);
    assert_eq!(wait_snapshots(&server, 2).await.len(), 2);

    // A bad file dropped in is quarantined with its reason.
    std::fs::write(
        watch.join("junk_2026_01_01T00.00.00.000Z.db"),
        b"not sqlite",
    )
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "the junk file to be quarantined",
        || async {
            quarantined(&server)
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".reason.json"))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn files_waiting_in_the_drop_folder_at_start_up_are_ingested() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let watch = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&watch).unwrap();
    let file = snapshot_file(tmp.path(), "early-bird", 1_500);
    std::fs::rename(&file, watch.join(file.file_name().unwrap())).unwrap();
    let server = TestServer::spawn_in(
        &data,
        &[
            "--watch",
            watch.to_str().unwrap(),
            "--watch-quiet-ms",
            "200",
        ],
    );
    let all = wait_snapshots(&server, 1).await;
    assert_eq!(all[0]["hostname"], "early-bird");
    assert_eq!(all[0]["origin"], "watch");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_signed_pair_is_trusted_through_ca_cert_and_agents_through_server_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut server = TestServer::spawn();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let certs = server.data_dir.join("certs");
    std::fs::write(certs.join("httpPublicCert.pem"), leaf.pem()).unwrap();
    std::fs::write(certs.join("httpPrivKey.pem"), leaf_key.serialize_pem()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    server.crash_and_restart();

    // A client elsewhere: no data directory to pin from, the CA file instead.
    let (code, stdout, stderr) = run_snapq(&[
        "endpoints",
        "list",
        "--json",
        "--server",
        &server.url(),
        "--token",
        server.token.trim(),
        "--ca-cert",
        ca_file.to_str().unwrap(),
        "--data-dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "[]");

    // An agent that verifies the server with the CA file instead of the enroll token's pin.
    let secret = server.enroll_secret();
    let _agent = crate::support::TestAgent::spawn_with(crate::support::AgentOptions {
        hostname: "ca-trusting".into(),
        simulate: Some(10),
        prefill: 0,
        extra: vec![
            "--server".into(),
            server.url(),
            "--enroll-token".into(),
            secret,
            "--server-ca".into(),
            ca_file.to_str().unwrap().into(),
            "--heartbeat-secs".into(),
            "1".into(),
        ],
    });
    server.wait_online("ca-trusting").await;
}
