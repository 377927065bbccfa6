//! The chaos test: a real `snapq serve` and a real `snapq fleet-sim`, captures, uploads,
//! drop-folder files and deletes flowing, and the server SIGKILLed at random moments and
//! started again. At the end every request has ended in exactly one terminal state, every
//! complete snapshot's file matches its catalog sha256, the store holds no hidden or partial
//! file and no unregistered one, no job is left running, and nothing waits forgotten in
//! `incoming/` or the drop folder.
//!
//! `chaos_run` is shared with `benches/chaos.rs` (50 kills); CI runs the short test below.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;

use crate::support::{BIN, TestServer, files_under, snapshot_file};

pub struct Chaos {
    pub kills: usize,
    pub endpoints: u32,
    /// Longest pause between one round's requests and the kill.
    pub max_pause: Duration,
    /// How long everything may take to settle after the last restart.
    pub settle: Duration,
    /// Each capture's download rate: slow enough that kills land mid-transfer, too.
    pub capture_rate_kib: u32,
}

#[derive(Debug, Default)]
pub struct ChaosReport {
    pub kills: usize,
    pub captures: usize,
    pub uploads: usize,
    pub drops: usize,
    pub deletes: usize,
    /// Requests refused because the server was being killed (not counted above).
    pub refused: usize,
    /// Time from SIGKILL to the restarted server listening, each kill.
    pub restarts: Vec<Duration>,
    /// Jobs running at the moment of each kill (the kill cut them off).
    pub running_at_kill: Vec<u64>,
    /// From the last restart until every job had ended.
    pub settle: Duration,
    pub total: Duration,
}

/// A free loopback port, so the fleet's heartbeats reach the server across restarts.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Fleet(Child);

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_fleet(server: &TestServer, dir: &Path, count: u32) -> Fleet {
    let mut child = Command::new(BIN)
        .args([
            "fleet-sim",
            "--count",
            &count.to_string(),
            "--prefix",
            "chaos",
        ])
        .args([
            "--server",
            &server.url(),
            "--enroll-token",
            &server.enroll_token,
        ])
        .args(["--data-dir", dir.to_str().unwrap()])
        .args(["--prefill-events", "20000", "--events-per-sec", "100"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting snapq fleet-sim");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut listening = 0;
    while listening < count {
        let line = lines
            .next()
            .expect("fleet-sim exited before listening")
            .unwrap();
        if line.contains(" listening on ") {
            listening += 1;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Fleet(child)
}

async fn post(server: &TestServer, path: &str, body: &Value) -> Option<Value> {
    let response = server
        .client()
        .post(format!("{}{path}", server.url()))
        .bearer_auth(&server.token)
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

async fn upload(server: &TestServer, file: &Path) -> Option<String> {
    let name = file.file_name()?.to_str()?.to_owned();
    let bytes = std::fs::read(file).unwrap();
    let response = server
        .client()
        .post(format!("{}/v1/uploads?name={name}", server.url()))
        .bearer_auth(&server.token)
        .body(bytes)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if response.status() != 202 {
        return None;
    }
    let queued: Value = response.json().await.ok()?;
    Some(queued["job_id"].as_str()?.to_owned())
}

async fn get(server: &TestServer, path: &str) -> Option<Value> {
    let (status, body) = server.get(path).await;
    (status == 200).then_some(body)
}

async fn all_snapshots(server: &TestServer) -> Vec<Value> {
    let Some(groups) = get(server, "/v1/snapshots").await else {
        return Vec::new();
    };
    groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["snapshots"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Runs the whole scenario and checks its end state; panics naming what went wrong.
pub async fn chaos_run(chaos: &Chaos) -> ChaosReport {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let drop_dir = tmp.path().join("drop");
    let files = tmp.path().join("files");
    std::fs::create_dir_all(&drop_dir).unwrap();
    std::fs::create_dir_all(&files).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = TestServer::spawn_in(
        &data,
        &[
            "--listen",
            &listen,
            "--watch",
            drop_dir.to_str().unwrap(),
            "--watch-quiet-ms",
            "200",
            "--job-retry-base-ms",
            "100",
            "--job-max-attempts",
            "100",
            "--capture-rate-kib",
            &chaos.capture_rate_kib.to_string(),
        ],
    );
    let _fleet = start_fleet(&server, &tmp.path().join("fleet"), chaos.endpoints);
    let hosts: Vec<String> = (1..=chaos.endpoints)
        .map(|i| format!("chaos-{i:02}"))
        .collect();
    for host in &hosts {
        server.wait_online(host).await;
    }

    let mut rng = rand::rng();
    let mut report = ChaosReport {
        kills: chaos.kills,
        ..ChaosReport::default()
    };
    // snapshot id → capture job id
    let mut captures: BTreeMap<i64, String> = BTreeMap::new();
    let mut uploads: Vec<String> = Vec::new();
    let mut dropped: Vec<String> = Vec::new();
    let mut deleted: HashSet<i64> = HashSet::new();
    let mut deleted_names: HashSet<String> = HashSet::new();
    let mut attempted: HashSet<i64> = HashSet::new();
    for round in 0..chaos.kills {
        // Captures of the whole fleet.
        match post(
            &server,
            "/v1/captures",
            &serde_json::json!({ "hosts": hosts }),
        )
        .await
        {
            Some(queued) => {
                for q in queued.as_array().unwrap() {
                    captures.insert(
                        q["snapshot_id"].as_i64().unwrap(),
                        q["job_id"].as_str().unwrap().to_owned(),
                    );
                }
            }
            None => report.refused += 1,
        }
        // An upload and a drop-folder file, each a distinct real export.
        let up = snapshot_file(&files, &format!("up-{round:03}"), 2_000);
        match upload(&server, &up).await {
            Some(job) => uploads.push(job),
            None => report.refused += 1,
        }
        let dropped_file = snapshot_file(&files, &format!("drop-{round:03}"), 2_000);
        let name = dropped_file.file_name().unwrap().to_owned();
        // Written elsewhere, then renamed in: the watcher sees a whole file.
        std::fs::rename(&dropped_file, drop_dir.join(&name)).unwrap();
        dropped.push(name.to_string_lossy().into_owned());
        // Delete one complete snapshot.
        let complete: Vec<(i64, String)> = all_snapshots(&server)
            .await
            .iter()
            .filter(|s| s["state"] == "complete")
            .filter_map(|s| Some((s["id"].as_i64()?, s["name"].as_str()?.to_owned())))
            .filter(|(id, _)| !attempted.contains(id))
            .collect();
        if !complete.is_empty() {
            let (id, name) = complete[rng.random_range(0..complete.len())].clone();
            // A kill may cut the answer off after the job is queued: such a snapshot may or
            // may not be gone; an acknowledged delete must have happened.
            attempted.insert(id);
            deleted_names.insert(name);
            if post(
                &server,
                "/v1/snapshots/delete",
                &serde_json::json!({ "ids": [id] }),
            )
            .await
            .is_some()
            {
                deleted.insert(id);
            } else {
                report.refused += 1;
            }
        }
        // Kill at a random moment of what is now in flight.
        let pause = rng.random_range(0..=chaos.max_pause.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let running = match get(&server, "/v1/queue/status").await {
            Some(status) => status["running"].as_array().map_or(0, |r| r.len() as u64),
            None => 0,
        };
        report.running_at_kill.push(running);
        let killed = Instant::now();
        server.crash_and_restart();
        report.restarts.push(killed.elapsed());
    }
    report.captures = captures.len();
    report.uploads = uploads.len();
    report.drops = dropped.len();
    report.deletes = deleted.len();

    // Everything settles: no job waits or runs, and the drop folder is empty.
    let settle_started = Instant::now();
    loop {
        let mut unfinished = Vec::new();
        for state in ["pending", "running", "retrying"] {
            if let Some(jobs) = get(&server, &format!("/v1/queue/jobs?state={state}")).await {
                unfinished.extend(jobs.as_array().cloned().unwrap_or_default());
            }
        }
        let drop_left = std::fs::read_dir(&drop_dir).unwrap().count();
        if unfinished.is_empty() && drop_left == 0 {
            break;
        }
        assert!(
            settle_started.elapsed() < chaos.settle,
            "not settled after {:?}: {} jobs unfinished ({}), {drop_left} files in the drop folder",
            chaos.settle,
            unfinished.len(),
            serde_json::to_string(&unfinished.iter().take(3).collect::<Vec<_>>()).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.settle = settle_started.elapsed();
    check_end_state(
        &server,
        &captures,
        &uploads,
        &dropped,
        &deleted,
        &attempted,
        &deleted_names,
    )
    .await;
    report.total = started.elapsed();
    report
}

async fn check_end_state(
    server: &TestServer,
    captures: &BTreeMap<i64, String>,
    uploads: &[String],
    dropped: &[String],
    deleted: &HashSet<i64>,
    attempted: &HashSet<i64>,
    deleted_names: &HashSet<String>,
) {
    let snapshots = all_snapshots(server).await;
    let by_id: BTreeMap<i64, &Value> = snapshots
        .iter()
        .filter_map(|s| Some((s["id"].as_i64()?, s)))
        .collect();
    let job = |id: String| async move {
        get(server, &format!("/v1/queue/jobs/{id}"))
            .await
            .unwrap_or_else(|| panic!("job {id} is unknown"))
    };
    // Captures of healthy endpoints: every one complete and its job done, or deleted.
    for (id, job_id) in captures {
        let detail = job(job_id.clone()).await;
        if deleted.contains(id) {
            assert!(
                !by_id.contains_key(id),
                "deleted snapshot {id} still listed"
            );
            continue;
        }
        if attempted.contains(id) && !by_id.contains_key(id) {
            continue;
        }
        let snap = by_id
            .get(id)
            .unwrap_or_else(|| panic!("capture {id} has no catalog row"));
        assert_eq!(
            (snap["state"].as_str(), detail["state"].as_str()),
            (Some("complete"), Some("done")),
            "capture {id}: {snap} / job {detail}"
        );
    }
    // Uploads: ingested (or a duplicate), with their jobs done.
    for job_id in uploads {
        let ingest = get(server, &format!("/v1/ingests/{job_id}"))
            .await
            .unwrap_or_else(|| panic!("upload {job_id} has no ingest row"));
        let detail = job(job_id.clone()).await;
        assert!(
            matches!(ingest["state"].as_str(), Some("complete" | "duplicate"))
                && detail["state"] == "done",
            "upload {job_id}: {ingest} / job {detail}"
        );
    }
    // Dropped files: each is a snapshot (unless deleted since).
    let names: HashSet<&str> = snapshots
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    let missing: Vec<&String> = dropped
        .iter()
        .filter(|n| !names.contains(n.as_str()) && !deleted_names.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "dropped files never ingested: {missing:?}"
    );
    // The store: exactly the complete snapshots, each with its catalog sha256; nothing hidden.
    let store = server.data_dir.join("snapshots");
    let mut expected: BTreeMap<PathBuf, String> = BTreeMap::new();
    for s in &snapshots {
        if s["state"] == "complete" {
            let path = store
                .join(s["hostname"].as_str().unwrap())
                .join(s["name"].as_str().unwrap());
            expected.insert(path, s["sha256"].as_str().unwrap().to_owned());
        }
    }
    let mut on_disk: Vec<PathBuf> = files_under(&store);
    on_disk.sort();
    assert_eq!(
        on_disk,
        expected.keys().cloned().collect::<Vec<_>>(),
        "the store holds other files than the complete snapshots (hidden, partial or orphaned)"
    );
    for (path, sha256) in &expected {
        assert_eq!(
            &snapq_core::verify::sha256_file(path).unwrap(),
            sha256,
            "{} does not match its catalog sha256",
            path.display()
        );
    }
    // Every other catalog row ended, too.
    for s in &snapshots {
        assert!(
            matches!(s["state"].as_str(), Some("complete" | "failed")),
            "snapshot stuck: {s}"
        );
    }
    let incoming: Vec<_> = std::fs::read_dir(server.data_dir.join("incoming"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(incoming.is_empty(), "forgotten in incoming/: {incoming:?}");
}

#[cfg(test)]
#[tokio::test(flavor = "multi_thread")]
async fn every_request_survives_five_server_sigkills_at_random_moments() {
    let report = chaos_run(&Chaos {
        kills: 5,
        endpoints: 6,
        max_pause: Duration::from_millis(1500),
        settle: Duration::from_secs(60),
        capture_rate_kib: 2048,
    })
    .await;
    assert_eq!(report.kills, 5);
    assert!(report.captures > 0 && report.uploads > 0, "{report:?}");
    // The kills did cut work off (else this test would prove nothing).
    assert!(report.running_at_kill.iter().sum::<u64>() > 0, "{report:?}");
}
