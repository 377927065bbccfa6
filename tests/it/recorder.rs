//! The real Linux recorder through the agent: what it says it records, as root (kernel events)
//! and as an unprivileged user (polling, said in the log and in `/v1/endpoint`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{AgentOptions, BIN, TestAgent, TestServer};

/// `nobody`: an unprivileged user every Linux has.
const NOBODY: u32 = 65534;

/// The agent's `recorder_modes`, over its TLS API pinned to the certificate in `data_dir`.
async fn recorder_modes(addr: SocketAddr, token: &str, data_dir: &Path) -> serde_json::Value {
    let pin = snapq::tls::cert_pin(&data_dir.join("certs/httpPublicCert.pem")).unwrap();
    let body: serde_json::Value = snapq::tls::client(&snapq::tls::Trust::Pin(pin))
        .unwrap()
        .get(format!("https://{addr}/v1/endpoint"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["recorder_modes"].clone()
}

#[tokio::test]
async fn the_agent_reports_kernel_events_when_root_and_polling_when_run_as_an_unprivileged_user() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let agent = TestAgent::spawn_with(AgentOptions {
            simulate: None,
            ..AgentOptions::default()
        });
        let modes = recorder_modes(agent.addr, &agent.token, &agent.data_dir).await;
        if modes["process"] == "kernel events" {
            assert_eq!(modes["file"], "kernel events", "{modes}");
            assert_eq!(modes["network"], "polling every 50 ms", "{modes}");
        } else {
            eprintln!("kernel events unavailable as root here: {modes}");
        }
    } else {
        eprintln!("not root: only the unprivileged fallback is tested");
    }

    // Unprivileged: as `nobody` when we are root, else as ourselves.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "agent",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--hostname",
        "plain-01",
        "--poll-ms",
        "50",
    ])
    .env("SNAPQ_AGENT_TOKEN", "test-agent-token")
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if root {
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        cmd.uid(NOBODY).gid(NOBODY);
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines
            .next()
            .expect("the unprivileged agent exited before listening")
            .unwrap();
        if let Some(a) = line.strip_prefix("snapq agent listening on ") {
            break a.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let modes = recorder_modes(addr, "test-agent-token", dir.path()).await;
    assert_eq!(modes["process"], "polling every 50 ms", "{modes}");
    assert_eq!(modes["file"], "not recorded", "{modes}");
    let said = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the agent logs its fallback at start");
        if line.contains("falls back") {
            break line;
        }
    };
    assert!(
        said.contains("polling every 50 ms") && said.contains("CAP_NET_ADMIN"),
        "{said}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_show_reports_the_recorders_mode_per_event_type() {
    let server = TestServer::spawn();
    let _agent = TestAgent::spawn_with(AgentOptions {
        hostname: "linux-01".into(),
        simulate: None,
        extra: server.enroll_args(),
        ..AgentOptions::default()
    });
    server.wait_online("linux-01").await;
    let (code, stdout, stderr) = server.cli(&["endpoints", "show", "linux-01"]);
    assert_eq!(code, 0, "{stderr}");
    let process = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("process ") && !l.starts_with("counts"))
        .unwrap_or_else(|| panic!("no recorder mode for process: {stdout}"));
    assert!(
        process.contains("kernel events") || process.contains("polling every 50 ms"),
        "{stdout}"
    );
    assert!(stdout.contains("recorder"), "{stdout}");
    let (code, stdout, _) = server.cli(&["endpoints", "show", "linux-01", "--json"]);
    assert_eq!(code, 0);
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        shown["live"]["recorder_modes"]["network"]
            .as_str()
            .unwrap()
            .starts_with("polling"),
        "{shown}"
    );
}
