//! Running snapq in production: `snapq doctor` against a healthy server and against the three
//! things first-time users get wrong (a wrong token, an untrusted certificate, no server), and
//! JSON logs whose job lines carry the job's id and kind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::{BIN, TestServer, run_snapq};

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
