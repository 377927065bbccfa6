//! Hashing executables off the event thread: a first-seen binary can take a second to hash, and
//! meanwhile short-lived processes must still be read from `/proc` as their events arrive.
//!
//! The recorder holds the executable open (through `/proc/PID/exe`, so it stays readable after the
//! process exits or the file is replaced) and hands it here; finished hashes are picked up at the
//! next batch and written into the rows that wait for them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};

use sha2::{Digest, Sha256};

/// (device, inode, mtime, size) of an executable: the cache key of its hash.
pub(super) type HashKey = (u64, u64, i64, u64);

/// The sha256 of `file` as hex, `None` if it cannot be read.
pub(super) fn sha256_of(file: &mut File) -> Option<String> {
    let mut hasher = Sha256::new();
    io::copy(file, &mut hasher)
        .ok()
        .map(|_| hex::encode(hasher.finalize()))
}

/// A hashing thread; it ends when this is dropped.
#[derive(Debug)]
pub(super) struct Hasher {
    requests: Sender<(HashKey, File)>,
    results: Receiver<(HashKey, Option<String>)>,
    in_flight: HashSet<HashKey>,
}

impl Hasher {
    pub(super) fn spawn() -> io::Result<Hasher> {
        let (req_tx, req_rx) = mpsc::channel::<(HashKey, File)>();
        let (res_tx, res_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("snapq-hasher".into())
            .spawn(move || {
                for (key, mut file) in req_rx {
                    if res_tx.send((key, sha256_of(&mut file))).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Hasher {
            requests: req_tx,
            results: res_rx,
            in_flight: HashSet::new(),
        })
    }

    /// Queues `file` for hashing unless the same key is already queued.
    pub(super) fn request(&mut self, key: HashKey, file: File) {
        if self.in_flight.insert(key) && self.requests.send((key, file)).is_err() {
            self.in_flight.remove(&key);
        }
    }

    /// Moves finished hashes into `cache`.
    pub(super) fn collect(&mut self, cache: &mut HashMap<HashKey, Option<String>>) {
        while let Ok((key, hash)) = self.results.try_recv() {
            self.in_flight.remove(&key);
            cache.insert(key, hash);
        }
    }
}
