//! The drop folder under real copies: stalled writers, files written in two runs, copy tools, and
//! getting a file back out of quarantine.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ingest::wait_snapshots;
use crate::support::{TestServer, eventually, files_under, snapshot_file};

fn quarantine_entries(server: &TestServer) -> Vec<Value> {
    let (code, stdout, stderr) = server.cli(&["quarantine", "list", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str::<Value>(&stdout)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

/// Files in `quarantine/` (each entry is the file plus its `.reason.json`).
fn quarantine_files(server: &TestServer) -> Vec<PathBuf> {
    files_under(&server.data_dir.join("quarantine"))
}

/// Waits until no ingest job is waiting or running (settle checks included).
async fn ingests_settled(server: &TestServer) {
    eventually(
        Duration::from_secs(60),
        "every ingest job to finish",
        || async {
            let (_, jobs) = server.get("/v1/queue/jobs?kind=ingest").await;
            let busy = jobs.as_array()?.iter().any(|j| {
                matches!(
                    j["state"].as_str(),
                    Some("pending" | "running" | "retrying")
                )
            });
            (!busy).then_some(())
        },
    )
    .await;
}

/// A writer copies `content` into `target`, stalling for `stall` with the file open halfway.
async fn stall_test(stall: Duration) {
    let server = TestServer::spawn_with(&["--watch-quiet-ms", "300", "--watch-settle-secs", "2"]);
    let tmp = tempfile::tempdir().unwrap();
    let source = snapshot_file(tmp.path(), "stall-01", 20_000);
    let content = std::fs::read(&source).unwrap();
    let target = server
        .data_dir
        .join("watch")
        .join(source.file_name().unwrap());

    let mut writer = std::fs::File::create(&target).unwrap();
    writer.write_all(&content[..content.len() / 2]).unwrap();
    writer.flush().unwrap();
    let stalled_at = Instant::now();
    // While the writer stalls, the status says the file waits on it.
    eventually(
        Duration::from_secs(20),
        "queue status to say a writer holds the file",
        || async {
            let (_, status) = server.get("/v1/queue/status").await;
            status["watch"]["waiting"]
                .as_array()?
                .iter()
                .any(|w| w["writer_open"] == true)
                .then_some(())
        },
    )
    .await;
    let (code, text, _) = server.cli(&["queue", "status"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("waiting for its writer to close it"),
        "{text}"
    );
    // The network hiccup itself: the writer is away this long with the file open.
    tokio::time::sleep((stalled_at + stall).saturating_duration_since(Instant::now())).await;
    let (_, groups) = server.get("/v1/snapshots").await;
    assert_eq!(
        groups.as_array().unwrap().len(),
        0,
        "taken while still open"
    );
    assert!(quarantine_files(&server).is_empty());

    writer.write_all(&content[content.len() / 2..]).unwrap();
    drop(writer);
    let all = wait_snapshots(&server, 1).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["events"], 20_000);
    assert_eq!(all[0]["origin"], "watch");
    ingests_settled(&server).await;
    assert!(quarantine_files(&server).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_that_stalls_5_s_with_the_file_open_is_ingested_once_and_never_quarantined() {
    stall_test(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_that_stalls_30_s_with_the_file_open_is_ingested_once_and_never_quarantined() {
    stall_test(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_in_two_runs_is_ingested_once_when_complete() {
    let server = TestServer::spawn_with(&["--watch-quiet-ms", "300", "--watch-settle-secs", "10"]);
    let tmp = tempfile::tempdir().unwrap();
    let source = snapshot_file(tmp.path(), "tworuns-01", 20_000);
    let content = std::fs::read(&source).unwrap();
    let target = server
        .data_dir
        .join("watch")
        .join(source.file_name().unwrap());

    std::fs::write(&target, &content[..content.len() / 2]).unwrap();
    // The copy tool's gap between its two runs; the first half is judged meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(quarantine_files(&server).is_empty(), "quarantined mid-copy");
    let mut again = std::fs::OpenOptions::new()
        .append(true)
        .open(&target)
        .unwrap();
    again.write_all(&content[content.len() / 2..]).unwrap();
    drop(again);

    let all = wait_snapshots(&server, 1).await;
    assert_eq!(all[0]["events"], 20_000);
    // The settle check of the first half ends without a quarantine.
    ingests_settled(&server).await;
    assert!(
        quarantine_files(&server).is_empty(),
        "{:?}",
        quarantine_files(&server)
    );
    let (_, groups) = server.get("/v1/snapshots").await;
    assert_eq!(groups[0]["snapshots"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_file_whose_writer_never_comes_back_is_quarantined_after_the_settle_period() {
    let server = TestServer::spawn_with(&["--watch-quiet-ms", "300", "--watch-settle-secs", "3"]);
    let tmp = tempfile::tempdir().unwrap();
    let source = snapshot_file(tmp.path(), "cut-01", 5_000);
    let content = std::fs::read(&source).unwrap();
    let name = source.file_name().unwrap().to_string_lossy().into_owned();
    let target = server.data_dir.join("watch").join(&name);
    std::fs::write(&target, &content[..content.len() / 3]).unwrap();
    let closed = Instant::now();

    // First judged "settling", not quarantined ...
    let first: Value = eventually(
        Duration::from_secs(20),
        "the first check to defer its verdict",
        || async {
            let (_, jobs) = server.get("/v1/queue/jobs?kind=ingest&state=done").await;
            let id = jobs.as_array()?.last()?["id"].as_str()?.to_owned();
            let (_, ingest) = server.get(&format!("/v1/ingests/{id}")).await;
            (ingest["state"] == "settling").then_some(ingest)
        },
    )
    .await;
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .contains("may still be arriving"),
        "{first}"
    );
    assert!(quarantine_entries(&server).is_empty());
    assert!(target.exists());

    // ... then quarantined once it stayed unchanged through the settle period.
    let entry = eventually(
        Duration::from_secs(30),
        "the truncated file to be quarantined",
        || async { quarantine_entries(&server).into_iter().next() },
    )
    .await;
    assert!(closed.elapsed() >= Duration::from_secs(3));
    assert_eq!(entry["name"], name.as_str());
    assert_eq!(entry["size"], content.len() / 3);
    let reason = entry["reason"].as_str().unwrap();
    assert!(reason.contains("stopped changing"), "{reason}");
    assert!(!target.exists());
}

/// Copies `file` into the drop folder under `name` by renaming it in (complete at once).
fn drop_as(server: &TestServer, file: &Path, name: &str) {
    let staging = server.data_dir.join(format!(".staging-{name}"));
    std::fs::copy(file, &staging).unwrap();
    std::fs::rename(&staging, server.data_dir.join("watch").join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn quarantined_files_can_be_listed_shown_retried_under_a_fixed_name_and_deleted() {
    let server = TestServer::spawn_with(&["--watch-settle-secs", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let good = snapshot_file(tmp.path(), "qa-01", 1_000);
    let good_name = good.file_name().unwrap().to_str().unwrap().to_owned();

    // A good snapshot under a name a person typed: quarantined at once (no copy cures a name).
    drop_as(&server, &good, "qa-01 export.db");
    let entry = eventually(Duration::from_secs(20), "the misnamed file", || async {
        quarantine_entries(&server).into_iter().next()
    })
    .await;
    let id = entry["id"].as_str().unwrap().to_owned();
    assert!(
        entry["reason"]
            .as_str()
            .unwrap()
            .contains("bad snapshot name")
    );
    assert_eq!(entry["origin"], "watch");
    let (code, stdout, _) = server.cli(&["quarantine", "show", &id, "--json"]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["size"], std::fs::metadata(&good).unwrap().len());
    assert_eq!(
        shown["rejection"]["sha256"],
        snapq_core::verify::sha256_file(&good).unwrap().as_str()
    );

    // A hostile --as is refused; the right name ingests it and closes the entry.
    let (code, _, stderr) = server.cli(&["quarantine", "retry", &id, "--as", "../x.db"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not a snapshot name"), "{stderr}");
    let (code, _, stderr) = server.cli(&["quarantine", "retry", &id, "--as", &good_name]);
    assert_eq!(code, 0, "{stderr}");
    let all = wait_snapshots(&server, 1).await;
    assert_eq!(all[0]["hostname"], "qa-01");
    assert_eq!(all[0]["events"], 1_000);
    ingests_settled(&server).await;
    assert!(quarantine_entries(&server).is_empty());
    assert!(quarantine_files(&server).is_empty());
    let (code, _, stderr) = server.cli(&["quarantine", "show", &id]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no quarantined file"), "{stderr}");

    // A file that is still bad goes back with its new reason, under a new entry.
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, b"this is not a database").unwrap();
    drop_as(&server, &junk, "junk_2026_01_01T00.00.00.000Z.db");
    let first = eventually(Duration::from_secs(30), "the junk file", || async {
        quarantine_entries(&server).into_iter().next()
    })
    .await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    let (code, _, stderr) = server.cli(&["quarantine", "retry", &first_id]);
    assert_eq!(code, 0, "{stderr}");
    let second = eventually(Duration::from_secs(30), "the junk file again", || async {
        quarantine_entries(&server)
            .into_iter()
            .find(|e| e["id"] != first_id.as_str())
    })
    .await;
    assert!(second["reason"].as_str().unwrap().contains("not an SQLite"));
    assert_eq!(
        quarantine_entries(&server).len(),
        1,
        "the old entry is closed"
    );
    assert_eq!(
        quarantine_files(&server).len(),
        2,
        "one file and its reason"
    );

    // Deleting asks first; with --yes it removes file and reason.
    let second_id = second["id"].as_str().unwrap();
    let (code, _, _) = server.cli(&["quarantine", "delete", second_id]);
    assert_eq!(code, 2, "no terminal to confirm on, no --yes");
    let (code, _, stderr) = server.cli(&["quarantine", "delete", second_id, "--yes"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(quarantine_entries(&server).is_empty());
    assert!(quarantine_files(&server).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_made_with_cp_and_rsync_are_each_ingested_once() {
    let server = TestServer::spawn();
    let watch = server.data_dir.join("watch");
    let tmp = tempfile::tempdir().unwrap();
    let big = snapshot_file(tmp.path(), "copy-01", 200_000);
    let status = std::process::Command::new("cp")
        .arg(&big)
        .arg(&watch)
        .status()
        .unwrap();
    assert!(status.success());
    let mut expected = 1;
    let small = snapshot_file(tmp.path(), "rsync-01", 20_000);
    match std::process::Command::new("rsync")
        .arg("-a")
        .arg(&small)
        .arg(&watch)
        .status()
    {
        Ok(status) => {
            assert!(status.success());
            expected += 1;
        }
        Err(e) => eprintln!("skipping the rsync half of this test: rsync cannot run here ({e})"),
    }
    let all = wait_snapshots(&server, expected).await;
    assert_eq!(all.len(), expected);
    assert!(
        all.iter()
            .any(|s| s["hostname"] == "copy-01" && s["events"] == 200_000)
    );
    ingests_settled(&server).await;
    assert!(quarantine_files(&server).is_empty());
    assert!(files_under(&watch).is_empty());
}
