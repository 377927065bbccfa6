//! The watcher against real folders and real file operations: what gets submitted, when, and how often.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapq_watch::{Candidate, WatchConfig, WatchError, Watcher};
use tokio::time::Instant;

const NAME: &str = "web-01_2026_11_28T14.03.07.091Z.db";
const LONG: Duration = Duration::from_secs(600);

/// What the submit callback saw: the candidate, when, and the file's content at that moment.
#[derive(Clone)]
struct Submitted {
    candidate: Candidate,
    at: Instant,
    content: Vec<u8>,
}

#[derive(Clone, Default)]
struct Submissions(Arc<Mutex<Vec<Submitted>>>);

impl Submissions {
    fn all(&self) -> Vec<Submitted> {
        self.0.lock().unwrap().clone()
    }

    fn of(&self, name: &str) -> Vec<Submitted> {
        self.all()
            .into_iter()
            .filter(|s| s.candidate.path.file_name().unwrap() == name)
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .all()
            .iter()
            .map(|s| file_name(&s.candidate.path))
            .collect();
        names.sort();
        names
    }

    fn record(&self, candidate: Candidate) {
        let content = std::fs::read(&candidate.path).unwrap_or_default();
        self.0.lock().unwrap().push(Submitted {
            candidate,
            at: Instant::now(),
            content,
        });
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn config(dir: &Path, quiet_period: Duration, rescan_interval: Duration) -> WatchConfig {
    WatchConfig {
        quiet_period,
        rescan_interval,
        ..WatchConfig::new(dir)
    }
}

async fn start(config: WatchConfig) -> (Watcher, Submissions) {
    let submissions = Submissions::default();
    let recorder = submissions.clone();
    let watcher = snapq_watch::spawn(config, move |candidate| {
        let recorder = recorder.clone();
        async move {
            recorder.record(candidate);
            Ok::<(), std::io::Error>(())
        }
    })
    .await
    .expect("watcher starts");
    (watcher, submissions)
}

/// Polls `done` until it holds, failing the test after a generous deadline.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn idle(watcher: &Watcher) {
    tokio::time::timeout(Duration::from_secs(20), watcher.idle())
        .await
        .expect("watcher becomes idle in time")
        .expect("watcher is running");
}

/// A drop folder plus a staging folder on the same filesystem (so `rename` between them is a move).
fn folders() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("watch");
    let staging = root.path().join("staging");
    std::fs::create_dir(&folder).unwrap();
    std::fs::create_dir(&staging).unwrap();
    (root, folder, staging)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_moved_into_the_folder_is_submitted_at_once() {
    let (_root, folder, staging) = folders();
    // A quiet period far longer than the test: only the rename can have triggered the submission.
    let (watcher, submissions) = start(config(&folder, LONG, LONG)).await;
    assert!(watcher.uses_notify());

    std::fs::write(staging.join(NAME), b"complete snapshot").unwrap();
    std::fs::rename(staging.join(NAME), folder.join(NAME)).unwrap();

    eventually("the moved file", || submissions.of(NAME).len() == 1).await;
    let submitted = &submissions.of(NAME)[0];
    assert_eq!(submitted.content, b"complete snapshot");
    assert_eq!(submitted.candidate.len, 17);
    assert_eq!(submitted.candidate.path, watcher.dir().join(NAME));
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_file_renamed_to_its_final_name_is_submitted_at_once() {
    let (_root, folder, _staging) = folders();
    let (watcher, submissions) = start(config(&folder, LONG, LONG)).await;

    let partial = folder.join(format!("{NAME}.partial"));
    std::fs::write(&partial, b"first half").unwrap();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&partial)
        .unwrap();
    file.write_all(b", second half").unwrap();
    drop(file);
    std::fs::rename(&partial, folder.join(NAME)).unwrap();

    eventually("the renamed file", || submissions.of(NAME).len() == 1).await;
    assert_eq!(submissions.of(NAME)[0].content, b"first half, second half");
    assert_eq!(submissions.names(), vec![NAME.to_string()]);
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_copied_slowly_in_place_is_submitted_once_when_its_writer_closes_it() {
    let (_root, folder, _staging) = folders();
    let quiet = Duration::from_millis(500);
    let (watcher, submissions) = start(config(&folder, quiet, LONG)).await;

    // 30 chunks, 50 ms apart: 1.5 s of copying, three times the quiet period, never quiet that long.
    let path = folder.join(NAME);
    let mut file = std::fs::File::create(&path).unwrap();
    let mut expected = Vec::new();
    for i in 0..30u8 {
        let chunk = vec![i; 1024];
        file.write_all(&chunk).unwrap();
        expected.extend_from_slice(&chunk);
        assert!(
            submissions.of(NAME).is_empty(),
            "submitted while still being written (after chunk {i})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    file.write_all(b"end").unwrap();
    expected.extend_from_slice(b"end");
    let closed = Instant::now();
    drop(file);

    eventually("the copied file", || !submissions.of(NAME).is_empty()).await;
    idle(&watcher).await;
    let seen = submissions.of(NAME);
    assert_eq!(seen.len(), 1, "submitted exactly once");
    assert!(
        seen[0].at >= closed,
        "submitted before the writer closed it"
    );
    assert_eq!(seen[0].candidate.len, expected.len() as u64);
    assert!(
        seen[0].content == expected,
        "submitted with its full content"
    );
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_closed_by_its_writer_is_taken_without_waiting_for_the_quiet_period() {
    let (_root, folder, _staging) = folders();
    // A quiet period far longer than the test: only the close can have triggered the submission.
    let (watcher, submissions) = start(config(&folder, LONG, LONG)).await;
    std::fs::write(folder.join(NAME), b"copied in one go").unwrap();
    eventually("the closed file", || submissions.of(NAME).len() == 1).await;
    assert_eq!(submissions.of(NAME)[0].content, b"copied in one go");
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_that_keeps_the_file_open_holds_it_back_and_says_so() {
    let (_root, folder, _staging) = folders();
    let quiet = Duration::from_millis(200);
    let (watcher, submissions) = start(config(&folder, quiet, LONG)).await;
    let status = watcher.status_handle();

    let path = folder.join(NAME);
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(b"first half, then the network stalls")
        .unwrap();
    file.flush().unwrap();
    // The status reports the file as held by its writer once it went quiet ...
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting = status.waiting().await.unwrap();
        if waiting
            .iter()
            .any(|w| w.path.ends_with(NAME) && w.writer_open)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never said a writer holds {NAME}: {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and it stays unsubmitted however long the stall: ten quiet periods here.
    tokio::time::sleep(quiet * 10).await;
    assert!(
        submissions.of(NAME).is_empty(),
        "taken while its writer still had it open"
    );

    file.write_all(b"; second half").unwrap();
    drop(file);
    eventually("the finished file", || submissions.of(NAME).len() == 1).await;
    idle(&watcher).await;
    assert_eq!(
        submissions.of(NAME)[0].content,
        b"first half, then the network stalls; second half"
    );
    assert!(status.waiting().await.unwrap().is_empty());
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_hidden_and_non_file_entries_are_ignored() {
    let (_root, folder, _staging) = folders();
    let (watcher, submissions) = start(config(&folder, Duration::from_millis(100), LONG)).await;

    for ignored in [
        format!("{NAME}.partial"),
        format!("{NAME}.tmp"),
        format!("{NAME}.TMP"),
        format!("{NAME}.part"),
        format!("{NAME}.filepart"),
        format!("{NAME}.crdownload"),
        format!(".{NAME}"),
        format!(".{NAME}.Xy12Ab"),
    ] {
        std::fs::write(folder.join(ignored), b"not yet").unwrap();
    }
    std::fs::create_dir(folder.join("folder.db")).unwrap();
    std::fs::write(folder.join("folder.db").join(NAME), b"nested").unwrap();
    #[cfg(unix)]
    {
        let outside = folder.parent().unwrap().join("outside.db");
        std::fs::write(&outside, b"server file").unwrap();
        std::os::unix::fs::symlink(&outside, folder.join("link.db")).unwrap();
    }
    std::fs::write(folder.join(NAME), b"real").unwrap();

    idle(&watcher).await;
    assert_eq!(submissions.names(), vec![NAME.to_string()]);
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badly_named_files_are_still_submitted_for_the_ingest_job_to_quarantine() {
    let (_root, folder, _staging) = folders();
    let (watcher, submissions) = start(config(&folder, Duration::from_millis(100), LONG)).await;

    std::fs::write(folder.join("holiday-photo.jpg"), b"jpeg").unwrap();
    std::fs::write(
        folder.join("web-01_2026_13_45T99.99.99.999Z.db"),
        b"bad date",
    )
    .unwrap();

    idle(&watcher).await;
    assert_eq!(
        submissions.names(),
        vec!["holiday-photo.jpg", "web-01_2026_13_45T99.99.99.999Z.db"]
    );
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_already_in_the_folder_at_start_up_are_submitted() {
    let (_root, folder, _staging) = folders();
    let names = [
        "a_2026_01_01T00.00.00.000Z.db",
        "b_2026_01_01T00.00.00.000Z.db",
    ];
    for name in names {
        std::fs::write(folder.join(name), name).unwrap();
    }
    std::fs::write(folder.join("c.db.partial"), b"still copying").unwrap();

    let quiet = Duration::from_millis(200);
    let started = Instant::now();
    let (watcher, submissions) = start(config(&folder, quiet, LONG)).await;

    eventually("the pre-existing files", || submissions.all().len() == 2).await;
    assert_eq!(submissions.names(), names);
    for submitted in submissions.all() {
        assert!(
            submitted.at >= started + quiet,
            "waited one quiet period first"
        );
    }
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_files_dropped_at_once_are_each_submitted_once() {
    let (_root, folder, staging) = folders();
    let (watcher, submissions) = start(config(&folder, Duration::from_millis(200), LONG)).await;

    // Half written in place, half moved in, all in one burst.
    let names: Vec<String> = (0..1000)
        .map(|i| format!("host-{i:04}_2026_11_28T14.03.07.091Z.db"))
        .collect();
    for (i, name) in names.iter().enumerate() {
        if i % 2 == 0 {
            std::fs::write(folder.join(name), name).unwrap();
        } else {
            std::fs::write(staging.join(name), name).unwrap();
            std::fs::rename(staging.join(name), folder.join(name)).unwrap();
        }
    }

    eventually("1000 submissions", || submissions.all().len() >= 1000).await;
    // Two more full rescans must not hand anything over again.
    idle(&watcher).await;
    idle(&watcher).await;

    let mut counts: HashMap<String, usize> = HashMap::new();
    for submitted in submissions.all() {
        assert_eq!(
            submitted.content,
            file_name(&submitted.candidate.path).as_bytes()
        );
        *counts
            .entry(file_name(&submitted.candidate.path))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 1000);
    let repeated: Vec<_> = counts.iter().filter(|(_, count)| **count != 1).collect();
    assert!(
        repeated.is_empty(),
        "submitted more than once: {repeated:?}"
    );
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_changed_after_submission_is_submitted_again() {
    let (_root, folder, _staging) = folders();
    let (watcher, submissions) = start(config(&folder, Duration::from_millis(200), LONG)).await;

    let path = folder.join(NAME);
    std::fs::write(&path, b"version one").unwrap();
    eventually("the first version", || submissions.of(NAME).len() == 1).await;

    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(b", then two").unwrap();
    drop(file);
    eventually("the second version", || submissions.of(NAME).len() == 2).await;
    idle(&watcher).await;

    let seen = submissions.of(NAME);
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].content, b"version one, then two");
    assert_ne!(
        seen[0].candidate.identity_key(),
        seen[1].candidate.identity_key()
    );
    assert_eq!(seen[0].candidate.inode, seen[1].candidate.inode);
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_rescan_finds_files_when_notifications_are_off() {
    let (_root, folder, staging) = folders();
    let config = WatchConfig {
        use_notify: false,
        ..config(
            &folder,
            Duration::from_millis(100),
            Duration::from_millis(200),
        )
    };
    let (watcher, submissions) = start(config).await;
    assert!(!watcher.uses_notify());

    std::fs::write(folder.join("written.db"), b"in place").unwrap();
    std::fs::write(staging.join("moved.db"), b"moved").unwrap();
    std::fs::rename(staging.join("moved.db"), folder.join("moved.db")).unwrap();

    eventually("both files, from rescans", || submissions.all().len() == 2).await;
    assert_eq!(submissions.names(), vec!["moved.db", "written.db"]);
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_submission_is_retried_at_the_next_rescan() {
    let (_root, folder, _staging) = folders();
    let attempts = Arc::new(Mutex::new(Vec::<Candidate>::new()));
    let seen = attempts.clone();
    let config = config(
        &folder,
        Duration::from_millis(100),
        Duration::from_millis(300),
    );
    let watcher = snapq_watch::spawn(config, move |candidate| {
        let seen = seen.clone();
        async move {
            let mut seen = seen.lock().unwrap();
            seen.push(candidate);
            if seen.len() == 1 {
                Err("queue database is locked")
            } else {
                Ok(())
            }
        }
    })
    .await
    .unwrap();

    std::fs::write(folder.join(NAME), b"snapshot").unwrap();
    eventually("a second attempt", || attempts.lock().unwrap().len() >= 2).await;
    idle(&watcher).await;

    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2, "retried once, then left alone");
    assert_eq!(attempts[0], attempts[1]);
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_folder_is_created() {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("data").join("watch");
    let (watcher, submissions) = start(config(&folder, Duration::from_millis(100), LONG)).await;
    assert!(folder.is_dir());

    std::fs::write(folder.join(NAME), b"snapshot").unwrap();
    eventually("the file", || submissions.of(NAME).len() == 1).await;
    watcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_path_that_is_a_file_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let not_a_dir = root.path().join("watch");
    std::fs::write(&not_a_dir, b"oops").unwrap();

    let err = snapq_watch::spawn(WatchConfig::new(&not_a_dir), |_candidate| async {
        Ok::<(), String>(())
    })
    .await
    .unwrap_err();
    assert!(matches!(err, WatchError::NotADirectory { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&*not_a_dir.to_string_lossy()), "{message}");
    assert!(message.contains("not a directory"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rescan_interval_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path(), Duration::from_millis(100), Duration::ZERO);
    let err = snapq_watch::spawn(config, |_candidate| async { Ok::<(), String>(()) })
        .await
        .unwrap_err();
    assert!(matches!(err, WatchError::InvalidConfig(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_folder_is_recreated_and_watched_again() {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("watch");
    let (watcher, submissions) = start(config(
        &folder,
        Duration::from_millis(100),
        Duration::from_millis(200),
    ))
    .await;

    std::fs::remove_dir(&folder).unwrap();
    eventually("the folder to be recreated", || folder.is_dir()).await;
    std::fs::write(folder.join(NAME), b"after recreation").unwrap();
    eventually("the file", || submissions.of(NAME).len() == 1).await;
    watcher.stop().await.unwrap();
}
