//! A running recorder thread and the way to stop it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A recorder running on its own thread. Stops (and joins) on [`RecorderHandle::stop`] or drop.
#[derive(Debug)]
pub struct RecorderHandle {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    written: Arc<AtomicU64>,
}

/// What the recorder thread sees: a stop signal it can wait on, and a counter of events written.
pub(crate) struct Ticker {
    stop: Receiver<()>,
    pub(crate) written: Arc<AtomicU64>,
}

impl Ticker {
    /// Waits until `deadline`; `false` once the recorder should stop.
    pub(crate) fn wait_until(&self, deadline: Instant) -> bool {
        let timeout = deadline.saturating_duration_since(Instant::now());
        matches!(
            self.stop.recv_timeout(timeout),
            Err(RecvTimeoutError::Timeout)
        )
    }

    pub(crate) fn add_written(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl RecorderHandle {
    /// Starts `body` on a named thread.
    pub(crate) fn spawn(name: &str, body: impl FnOnce(Ticker) + Send + 'static) -> RecorderHandle {
        let (tx, rx) = mpsc::channel();
        let written = Arc::new(AtomicU64::new(0));
        let ticker = Ticker {
            stop: rx,
            written: written.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(ticker))
            .expect("spawning a recorder thread");
        RecorderHandle {
            stop: Some(tx),
            thread: Some(thread),
            written,
        }
    }

    /// Events (and updates) written so far.
    pub fn events_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether the recorder thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the recorder and waits for its last batch to be written.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("a recorder thread panicked");
        }
    }
}

impl Drop for RecorderHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How long to wait for the next tick of a loop that runs every `interval`.
pub(crate) fn next_tick(last: Instant, interval: Duration) -> Instant {
    let next = last + interval;
    let now = Instant::now();
    if next < now { now } else { next }
}
