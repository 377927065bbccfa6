//! The watcher's single task: turns notify events, timer ticks and rescans into submissions.
//!
//! Events are only hints about which paths to look at; what decides is a fresh `stat`. A path becomes
//! *pending* when something suggests it is being written (an event, or a rescan that finds it unsubmitted)
//! and leaves that state when its identity has not changed for the quiet period (submit), when it
//! disappears (forget), or when it is renamed into place (submit at once).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use snapq_core::writers::Writers;

use crate::probe::{self, FileId};
use crate::{Candidate, WaitingFile};

pub(crate) type SubmitFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
pub(crate) type SubmitFn = Arc<dyn Fn(Candidate) -> SubmitFuture + Send + Sync>;

/// Requests from the [`crate::Watcher`] handle.
pub(crate) enum Command {
    /// Rescan now and answer once nothing is pending any more.
    Idle(oneshot::Sender<()>),
    /// Answer with the files that are waiting and why.
    Status(oneshot::Sender<Vec<WaitingFile>>),
}

/// Events come from notify's own thread through this; the flag records that the channel was full and
/// events were dropped, which the tracker answers with a rescan (as it does for an inotify overflow).
pub(crate) struct EventSource {
    pub(crate) watcher: Option<RecommendedWatcher>,
    pub(crate) events: mpsc::Receiver<notify::Result<notify::Event>>,
    pub(crate) missed: Arc<AtomicBool>,
}

pub(crate) struct Tracker {
    pub(crate) dir: PathBuf,
    pub(crate) quiet_period: Duration,
    pub(crate) rescan_interval: Duration,
    pub(crate) submit: SubmitFn,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) pending: HashMap<PathBuf, Pending>,
    /// What was handed to `submit` successfully in this run, to not hand it over twice.
    pub(crate) submitted: HashMap<PathBuf, FileId>,
    pub(crate) idle_waiters: Vec<oneshot::Sender<()>>,
}

pub(crate) struct Pending {
    /// The identity seen at the last probe; `None` until the first probe after an event.
    id: Option<FileId>,
    /// When the path was last seen changing (event or different identity).
    last_change: Instant,
    /// The file stopped changing, but the kernel says a process still has it open for writing.
    writer_open: bool,
}

impl Pending {
    fn new(id: Option<FileId>, now: Instant) -> Self {
        Self {
            id,
            last_change: now,
            writer_open: false,
        }
    }
}

impl Tracker {
    pub(crate) async fn run(mut self, mut source: EventSource) {
        self.rescan(&mut source.watcher).await;

        let mut rescan =
            tokio::time::interval_at(Instant::now() + self.rescan_interval, self.rescan_interval);
        rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let tick_period =
            (self.quiet_period / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let listening = source.watcher.is_some();

        loop {
            tokio::select! {
                biased;
                _ = self.stop.changed() => break,
                Some(first) = source.events.recv(), if listening => {
                    let mut batch = vec![first];
                    while batch.len() < 4096 {
                        match source.events.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                    if self.handle_events(batch).await {
                        self.rescan(&mut source.watcher).await;
                    }
                }
                Some(command) = self.commands.recv() => match command {
                    Command::Idle(reply) => {
                        self.idle_waiters.push(reply);
                        self.rescan(&mut source.watcher).await;
                    }
                    Command::Status(reply) => {
                        let _ = reply.send(self.waiting());
                    }
                },
                _ = rescan.tick() => self.rescan(&mut source.watcher).await,
                _ = tick.tick(), if !self.pending.is_empty() => self.check_pending().await,
            }
            if source.missed.swap(false, Ordering::Relaxed) {
                tracing::warn!("event buffer overflowed; rescanning the drop folder");
                self.rescan(&mut source.watcher).await;
            }
            if self.pending.is_empty() {
                for waiter in self.idle_waiters.drain(..) {
                    let _ = waiter.send(());
                }
            }
        }
        tracing::debug!("drop-folder watcher stopped");
    }

    fn stopping(&self) -> bool {
        !matches!(self.stop.has_changed(), Ok(false))
    }

    fn is_ours(&self, path: &Path) -> bool {
        path.parent() == Some(self.dir.as_path())
            && path.file_name().is_some_and(probe::is_candidate_name)
    }

    /// The files not handed over yet, oldest change first.
    fn waiting(&self) -> Vec<WaitingFile> {
        let now = Instant::now();
        let mut files: Vec<WaitingFile> = self
            .pending
            .iter()
            .map(|(path, pending)| WaitingFile {
                path: path.clone(),
                len: pending.id.map(|id| id.len),
                unchanged_for: now.duration_since(pending.last_change),
                writer_open: pending.writer_open,
            })
            .collect();
        files.sort_by_key(|f| std::cmp::Reverse(f.unchanged_for));
        files
    }

    fn forget(&mut self, path: &Path) {
        self.pending.remove(path);
        self.submitted.remove(path);
    }

    fn touch(&mut self, path: PathBuf) {
        let now = Instant::now();
        self.pending
            .entry(path)
            .and_modify(|pending| pending.last_change = now)
            .or_insert(Pending::new(None, now));
    }

    /// Applies a batch of notify events; returns whether a rescan is needed (overflow, backend error).
    async fn handle_events(&mut self, batch: Vec<notify::Result<notify::Event>>) -> bool {
        let mut need_rescan = false;
        let mut renamed_in = Vec::new();
        let mut closed = Vec::new();
        for event in batch {
            let event = match event {
                Ok(event) => event,
                Err(err) => {
                    tracing::warn!(error = %err, "file notification error; rescanning the drop folder");
                    need_rescan = true;
                    continue;
                }
            };
            need_rescan |= event.need_rescan();
            match event.kind {
                // inotify's MovedTo, or the second half of a paired rename: the file arrived finished.
                EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                    renamed_in.extend(event.paths);
                }
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                    let mut paths = event.paths.into_iter();
                    if let Some(from) = paths.next() {
                        self.forget(&from);
                    }
                    renamed_in.extend(paths);
                }
                EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
                    for path in &event.paths {
                        self.forget(path);
                    }
                }
                // Backends that cannot tell the two halves of a rename apart (FSEvents): the probe
                // decides; a path that is no longer there was the source.
                EventKind::Modify(ModifyKind::Name(_)) => renamed_in.extend(event.paths),
                // The writer closed the file: if no other writer has it open, it is complete.
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                    for path in event.paths {
                        if self.is_ours(&path) {
                            self.touch(path.clone());
                            closed.push(path);
                        }
                    }
                }
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any => {
                    for path in event.paths {
                        if self.is_ours(&path) {
                            self.touch(path);
                        }
                    }
                }
                EventKind::Access(_) | EventKind::Other => {}
            }
        }

        renamed_in.retain(|path| self.is_ours(path));
        if !renamed_in.is_empty() {
            for (path, id) in probe_batch(renamed_in).await {
                self.pending.remove(&path);
                match id {
                    Some(id) => self.submit_if_new(path, id).await,
                    None => self.forget(&path),
                }
            }
        }
        closed.retain(|path| self.pending.contains_key(path));
        if !closed.is_empty() {
            for (path, id, writers) in probe_writers_batch(closed).await {
                match (id, writers) {
                    (None, _) => self.forget(&path),
                    (Some(id), Writers::None) => {
                        self.pending.remove(&path);
                        self.submit_if_new(path, id).await;
                    }
                    // Still open elsewhere, or the kernel cannot tell: the quiet period decides.
                    (Some(_), _) => {}
                }
            }
        }
        need_rescan
    }

    /// Probes every pending path; submits those unchanged for the quiet period that no process
    /// has open for writing (as far as the kernel can tell).
    async fn check_pending(&mut self) {
        let now = Instant::now();
        let paths: Vec<PathBuf> = self.pending.keys().cloned().collect();
        let mut quiet = Vec::new();
        for (path, probed) in probe_batch(paths).await {
            let Some(pending) = self.pending.get_mut(&path) else {
                continue;
            };
            match probed {
                None => self.forget(&path),
                Some(id) if pending.id != Some(id) => {
                    pending.id = Some(id);
                    pending.last_change = now;
                }
                Some(_) => {
                    if now.duration_since(pending.last_change) >= self.quiet_period {
                        quiet.push(path);
                    }
                }
            }
        }
        let mut ready = Vec::new();
        if !quiet.is_empty() {
            for (path, id, writers) in probe_writers_batch(quiet).await {
                let Some(pending) = self.pending.get_mut(&path) else {
                    continue;
                };
                match id {
                    None => self.forget(&path),
                    Some(id) if pending.id != Some(id) => {
                        pending.id = Some(id);
                        pending.last_change = now;
                    }
                    Some(_) if writers == Writers::Open => {
                        if !pending.writer_open {
                            tracing::info!(path = %path.display(), "unchanged but still open for writing; waiting for the writer to close it");
                        }
                        pending.writer_open = true;
                    }
                    Some(id) => {
                        self.pending.remove(&path);
                        ready.push((path, id));
                    }
                }
            }
        }
        // Oldest first, so a big drop is handed over roughly in the order it arrived.
        ready.sort_by_key(|(_, id)| id.mtime);
        for (path, id) in ready {
            if self.stopping() {
                break;
            }
            self.submit_if_new(path, id).await;
        }
    }

    /// Lists the folder and queues every file not yet submitted in its current version. Recreates the
    /// folder (and its notification watch) if someone removed it.
    async fn rescan(&mut self, watcher: &mut Option<RecommendedWatcher>) {
        let dir = self.dir.clone();
        let found = match tokio::task::spawn_blocking(move || probe::scan(&dir)).await {
            Ok(Ok(found)) => found,
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                self.recreate_dir(watcher);
                return;
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot list the drop folder; will try again at the next rescan");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "drop-folder scan panicked; will try again at the next rescan");
                return;
            }
        };

        let present: HashSet<&PathBuf> = found.iter().map(|(path, _)| path).collect();
        self.submitted.retain(|path, _| present.contains(path));
        let now = Instant::now();
        for (path, id) in found {
            if self.submitted.get(&path) == Some(&id) {
                continue;
            }
            // A first sighting waits a whole quiet period: the file may still be growing.
            self.pending
                .entry(path)
                .or_insert(Pending::new(Some(id), now));
        }
        tracing::debug!(
            pending = self.pending.len(),
            submitted = self.submitted.len(),
            "rescanned"
        );
    }

    #[tracing::instrument(skip_all, fields(dir = %self.dir.display()))]
    fn recreate_dir(&mut self, watcher: &mut Option<RecommendedWatcher>) {
        self.pending.clear();
        self.submitted.clear();
        if let Err(err) = std::fs::create_dir_all(&self.dir) {
            tracing::warn!(error = %err, "the drop folder is gone and cannot be recreated; will try again at the next rescan");
            return;
        }
        tracing::warn!("the drop folder was removed; recreated it");
        if let Some(watcher) = watcher.as_mut() {
            let _ = watcher.unwatch(&self.dir);
            if let Err(err) = watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                tracing::warn!(error = %err, "cannot watch the recreated drop folder; relying on rescans");
            }
        }
    }

    #[tracing::instrument(skip_all, fields(path = %path.display(), len = id.len))]
    async fn submit_if_new(&mut self, path: PathBuf, id: FileId) {
        if self.submitted.get(&path) == Some(&id) {
            return;
        }
        let candidate = Candidate::new(path.clone(), id);
        // Its own task: a panicking callback is a failed submission to retry, not a dead watcher.
        match tokio::spawn((self.submit)(candidate)).await {
            Ok(Ok(())) => {
                tracing::debug!("submitted");
                self.submitted.insert(path, id);
            }
            Ok(Err(err)) => {
                tracing::info!(error = %err, "submission failed; will retry at the next rescan");
            }
            Err(err) => {
                tracing::warn!(error = %err, "submission panicked; will retry at the next rescan");
            }
        }
    }
}

/// Probes paths and asks the kernel whether each still has a writer, on the blocking pool.
async fn probe_writers_batch(paths: Vec<PathBuf>) -> Vec<(PathBuf, Option<FileId>, Writers)> {
    let probed = tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|path| {
                let writers = snapq_core::writers::writers(&path);
                let id = probe::probe(&path);
                (path, id, writers)
            })
            .collect()
    })
    .await;
    probed.unwrap_or_else(|err| {
        tracing::warn!(error = %err, "file probe panicked; the next rescan will catch up");
        Vec::new()
    })
}

async fn probe_batch(paths: Vec<PathBuf>) -> Vec<(PathBuf, Option<FileId>)> {
    match tokio::task::spawn_blocking(move || probe::probe_all(paths)).await {
        Ok(probed) => probed,
        Err(err) => {
            tracing::warn!(error = %err, "file probe panicked; the next rescan will catch up");
            Vec::new()
        }
    }
}
