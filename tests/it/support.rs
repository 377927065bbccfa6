//! Helpers that start real snapq processes on port 0 and talk to them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_snapq");

/// Polls `check` until it returns `Some`, failing the test with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `snapq ARGS` and waits for its `WHO listening on ADDR` line (`snapq agent`,
/// `snapq server`); also returns the lines it printed before that one.
fn spawn_listening(
    who: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Child, SocketAddr, Vec<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting snapq");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut before = Vec::new();
    let addr = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("snapq {args:?} exited before listening"))
            .unwrap();
        if let Some(addr) = line.strip_prefix(&format!("{who} listening on ")) {
            break addr.trim().parse().unwrap();
        }
        before.push(line);
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr, before)
}

/// A real `snapq agent` process on a loopback port with its own data directory.
pub struct TestAgent {
    pub child: Child,
    pub addr: SocketAddr,
    pub token: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub struct AgentOptions {
    pub hostname: String,
    /// `None` runs the real Linux recorder.
    pub simulate: Option<u32>,
    pub prefill: u64,
    pub extra: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            hostname: "web-01".into(),
            simulate: Some(200),
            prefill: 0,
            extra: Vec::new(),
        }
    }
}

impl TestAgent {
    pub fn spawn() -> TestAgent {
        Self::spawn_with(AgentOptions::default())
    }

    pub fn spawn_with(options: AgentOptions) -> TestAgent {
        let tmp = tempfile::tempdir().unwrap();
        let mut agent = Self::spawn_in(tmp.path(), &options);
        agent._tmp = Some(tmp);
        agent
    }

    /// Starts an agent on an existing data directory (e.g. to restart one).
    pub fn spawn_in(data_dir: &Path, options: &AgentOptions) -> TestAgent {
        let token = "test-agent-token";
        let data = data_dir.to_str().unwrap().to_owned();
        let mut args = vec![
            "agent".to_owned(),
            "--data-dir".into(),
            data,
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--hostname".into(),
            options.hostname.clone(),
            "--prefill-events".into(),
            options.prefill.to_string(),
        ];
        if let Some(rate) = options.simulate {
            args.extend(["--simulate".into(), rate.to_string()]);
        } else {
            args.extend(["--poll-ms".into(), "50".into()]);
        }
        args.extend(options.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, addr, _) =
            spawn_listening("snapq agent", &args, &[("SNAPQ_AGENT_TOKEN", token)]);
        TestAgent {
            child,
            addr,
            token: token.into(),
            data_dir: data_dir.to_owned(),
            _tmp: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    /// The sha256 of the certificate the agent's API presents.
    pub fn cert_sha256(&self) -> String {
        snapq::tls::cert_pin(&self.data_dir.join("certs/httpPublicCert.pem")).unwrap()
    }

    /// An HTTPS client that trusts exactly this agent's certificate.
    pub fn client(&self) -> reqwest::Client {
        snapq::tls::client(&snapq::tls::Trust::Pin(self.cert_sha256())).unwrap()
    }

    /// GET with the agent's token, returning status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        send_json(self.client().get(self.url(path)).bearer_auth(&self.token)).await
    }

    pub async fn post(&self, path: &str) -> (u16, serde_json::Value) {
        send_json(self.client().post(self.url(path)).bearer_auth(&self.token)).await
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a request, returning the status and the JSON body (`null` when there is none).
async fn send_json(request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Runs `snapq ARGS` to completion: (exit code, stdout, stderr).
pub fn run_snapq(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits for `child` to exit, killing it and failing the test after `limit`.
pub async fn finish_within(
    mut child: std::process::Child,
    limit: Duration,
) -> (i32, String, String) {
    let started = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a downloaded snapshot and counts its events over every event table.
pub fn count_events(path: &Path) -> u64 {
    snapq_core::verify::verify_snapshot(path).unwrap().events
}

/// A real `snapq serve` process on a loopback port with its own data directory.
pub struct TestServer {
    pub child: Child,
    pub addr: SocketAddr,
    /// What it printed before it said it was listening (e.g. the metrics address).
    pub banner: Vec<String>,
    pub data_dir: PathBuf,
    pub token: String,
    pub enroll_token: String,
    args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    pub fn spawn() -> TestServer {
        Self::spawn_with(&[])
    }

    /// Starts a server with extra `snapq serve` flags.
    pub fn spawn_with(extra: &[&str]) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let mut server = Self::spawn_in(tmp.path(), extra);
        server._tmp = Some(tmp);
        server
    }

    pub fn spawn_in(data_dir: &Path, extra: &[&str]) -> TestServer {
        Self::spawn_in_env(data_dir, extra, &[])
    }

    /// [`TestServer::spawn_in`] with more environment variables for the server process (they
    /// are not kept for a restart).
    pub fn spawn_in_env(data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> TestServer {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.to_str().unwrap().into(),
        ];
        if let Some(url) = postgres_catalog(data_dir, extra) {
            args.extend(["--database".into(), url]);
        }
        if !extra.contains(&"--online-window-secs") {
            args.extend(["--online-window-secs".into(), "5".into()]);
        }
        // Port 0 unless the caller needs the same address across restarts.
        if !extra.contains(&"--listen") {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, addr, banner) = spawn_listening("snapq server", &refs, envs);
        TestServer {
            child,
            addr,
            banner,
            data_dir: data_dir.to_owned(),
            token: std::fs::read_to_string(data_dir.join("admin.token")).unwrap(),
            enroll_token: std::fs::read_to_string(data_dir.join("enroll.token"))
                .unwrap()
                .trim()
                .to_owned(),
            args,
            _tmp: None,
        }
    }

    /// Kills the server with SIGKILL and starts it again on the same data directory.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        let refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let (child, addr, banner) = spawn_listening("snapq server", &refs, &[]);
        self.child = child;
        self.addr = addr;
        self.banner = banner;
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The secret part of the current enroll token (re-read: an admin may have rotated it), which
    /// agents enroll with.
    pub fn enroll_secret(&self) -> String {
        let token = std::fs::read_to_string(self.data_dir.join("enroll.token")).unwrap();
        token.trim().split('.').next().unwrap().to_owned()
    }

    /// An HTTPS client that trusts exactly this server's certificate.
    pub fn client(&self) -> reqwest::Client {
        let cert = self.data_dir.join("certs/httpPublicCert.pem");
        snapq::tls::client(&snapq::tls::Trust::Pin(
            snapq::tls::cert_pin(&cert).unwrap(),
        ))
        .unwrap()
    }

    /// Agent flags that enroll it with this server, heartbeating every second.
    pub fn enroll_args(&self) -> Vec<String> {
        vec![
            "--server".into(),
            self.url(),
            "--enroll-token".into(),
            self.enroll_token.clone(),
            "--heartbeat-secs".into(),
            "1".into(),
        ]
    }

    /// Runs a client subcommand against this server as the local CLI does: it finds the admin
    /// token and the certificate to pin in the data directory.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        let url = self.url();
        let data_dir = self.data_dir.to_str().unwrap();
        all.extend(["--server", &url, "--data-dir", data_dir]);
        run_snapq(&all)
    }

    /// A request to `path` on this server, with no credentials yet.
    pub fn request(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        self.client()
            .request(method, format!("{}{path}", self.url()))
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        send_json(
            self.client()
                .get(format!("{}{path}", self.url()))
                .bearer_auth(&self.token),
        )
        .await
    }

    /// GETs `path` with the admin token: the status and the body's bytes (a file download).
    pub async fn get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        let response = self
            .client()
            .get(format!("{}{path}", self.url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.bytes().await.unwrap().to_vec())
    }

    /// POSTs `body` as JSON with the admin token.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        send_json(
            self.client()
                .post(format!("{}{path}", self.url()))
                .bearer_auth(&self.token)
                .json(&body),
        )
        .await
    }

    /// Waits until capture `id` has moved its first bytes.
    pub async fn wait_transfer_started(&self, id: i64) {
        eventually(Duration::from_secs(30), "the transfer to start", || async {
            let (_, snap) = self.get(&format!("/v1/snapshots/{id}")).await;
            (snap["bytes_done"].as_u64()? > 0).then_some(())
        })
        .await
    }

    /// A simulated agent named `hostname` with `prefill` events, enrolled with this server and
    /// listed online.
    pub async fn online_agent(&self, hostname: &str, prefill: u64) -> TestAgent {
        let agent = TestAgent::spawn_with(AgentOptions {
            hostname: hostname.into(),
            prefill,
            extra: self.enroll_args(),
            ..Default::default()
        });
        self.wait_online(hostname).await;
        agent
    }

    /// Waits until `hostname` is listed online.
    pub async fn wait_online(&self, hostname: &str) {
        eventually(
            Duration::from_secs(20),
            "the endpoint to come online",
            || async {
                let (_, list) = self.get(&format!("/v1/endpoints?search={hostname}")).await;
                list.as_array()?
                    .iter()
                    .any(|e| e["hostname"] == hostname && e["online"] == true)
                    .then_some(())
            },
        )
        .await
    }

    /// Waits until snapshot `id` is complete or failed, returning it.
    pub async fn wait_snapshot(&self, id: i64, timeout: Duration) -> serde_json::Value {
        eventually(timeout, "the snapshot to finish", || async {
            let (_, snap) = self.get(&format!("/v1/snapshots/{id}")).await;
            matches!(snap["state"].as_str(), Some("complete" | "failed")).then_some(snap)
        })
        .await
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether test servers keep their catalog in `catalog.db` (not with `SNAPQ_IT_ON_POSTGRES`). A
/// test that reads or edits that file itself says it was skipped and returns when not.
pub fn catalog_in_data_dir(test: &str) -> bool {
    let sqlite = std::env::var("SNAPQ_IT_ON_POSTGRES").is_err();
    if !sqlite {
        eprintln!("skipped {test} on a PostgreSQL catalog: it reads catalog.db itself");
    }
    sqlite
}

/// With `SNAPQ_IT_ON_POSTGRES=1`, every test server keeps its catalog in PostgreSQL (a schema of
/// its own from `snapq_testpg`), so the whole suite runs against that backend. The schema is
/// remembered in the data directory: a server restarted on it finds its catalog again.
fn postgres_catalog(data_dir: &Path, extra: &[&str]) -> Option<String> {
    if std::env::var("SNAPQ_IT_ON_POSTGRES").is_err() || extra.contains(&"--database") {
        return None;
    }
    let remembered = data_dir.join(".test-database-url");
    if let Ok(url) = std::fs::read_to_string(&remembered) {
        return Some(url);
    }
    // `schema` is async and tests already run inside a runtime: create it on a thread of its own.
    let db = std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(snapq_testpg::schema())
    })
    .join()
    .unwrap()
    .unwrap_or_else(|why| panic!("SNAPQ_IT_ON_POSTGRES is set but: {why}"));
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(&remembered, &db.url).unwrap();
    Some(db.url)
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A real exported snapshot of a recorder database with `events` events.
pub fn snapshot_file(dir: &Path, hostname: &str, events: u64) -> PathBuf {
    let data = dir.join(format!("agent-{hostname}"));
    std::fs::create_dir_all(&data).unwrap();
    {
        let db = snapq::agent::recorder::RecorderDb::open(
            &data.join("monitor.db"),
            hostname,
            Default::default(),
        )
        .unwrap();
        snapq::agent::recorder::prefill(&db, events).unwrap();
    }
    let out = dir.join(format!("out-{hostname}-{events}"));
    std::fs::create_dir_all(&out).unwrap();
    snapq::agent::export::export(&data, &out, None)
        .unwrap()
        .path
}

/// A request to `server` as `token` (or with none): the status and the JSON body (`null` when
/// there is none).
pub async fn call(
    server: &TestServer,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut request = server.request(method, path);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    send_json(request).await
}

/// Registers an endpoint as an agent's first heartbeat does (its agent is not reachable).
pub async fn register_unreachable(server: &TestServer, hostname: &str, ip: &str) {
    let status = server
        .client()
        .post(format!("{}/v1/agents/heartbeat", server.url()))
        .bearer_auth(server.enroll_secret())
        .json(&serde_json::json!({ "hostname": hostname, "ips": [ip], "api_url": "https://127.0.0.1:1",
                       "cert_sha256": "ab".repeat(32), "labels": [] }))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

/// An OpenMetrics exposition (`/metrics`) as `name{labels}` → value, comments skipped.
pub fn metric_samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}
