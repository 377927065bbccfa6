//! Parsing fanotify's events (`FAN_REPORT_DFID_NAME`) into [`FanEvent`]s: which directory (a file
//! handle on a filesystem), which name in it, what happened and which process did it.

use super::sys::Fsid;

/// Bytes of `struct fanotify_event_metadata`.
const METADATA_LEN: usize = 24;

/// A directory entry as fanotify reports it: the directory's handle and the entry's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) fsid: Fsid,
    /// `struct file_handle` bytes: `handle_bytes`, `handle_type`, `f_handle`.
    pub(super) handle: Vec<u8>,
    pub(super) name: String,
}

/// One fanotify event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FanEvent {
    pub(super) mask: u64,
    pub(super) pid: i32,
    /// The entry the event is about (`DFID_NAME`), or the old name of a rename.
    pub(super) entry: Option<Entry>,
    /// The new name of a `FAN_RENAME`.
    pub(super) new_entry: Option<Entry>,
    /// The object itself (`FAN_REPORT_FID`; the file for a close, its directory for the others).
    pub(super) object: Option<Entry>,
}

impl FanEvent {
    pub(super) fn overflow(&self) -> bool {
        self.mask & libc::FAN_Q_OVERFLOW != 0
    }

    /// The `file` op this event records, if any (directories are skipped).
    pub(super) fn op(&self) -> Option<&'static str> {
        if self.mask & libc::FAN_ONDIR != 0 {
            return None;
        }
        let m = self.mask;
        if m & libc::FAN_RENAME != 0 {
            Some("rename")
        } else if m & libc::FAN_CREATE != 0 {
            Some("create")
        } else if m & libc::FAN_DELETE != 0 {
            Some("delete")
        } else if m & libc::FAN_CLOSE_WRITE != 0 {
            Some("write")
        } else {
            None
        }
    }
}

fn entry(info: &[u8]) -> Option<Entry> {
    // header (4) | fsid (8) | handle_bytes (4) | handle_type (4) | f_handle | name\0
    let fsid = [
        i32::from_ne_bytes(info.get(4..8)?.try_into().ok()?),
        i32::from_ne_bytes(info.get(8..12)?.try_into().ok()?),
    ];
    let handle_bytes = u32::from_ne_bytes(info.get(12..16)?.try_into().ok()?) as usize;
    let handle_end = 20 + handle_bytes;
    let handle = info.get(12..handle_end)?.to_vec();
    let rest = info.get(handle_end..)?;
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    Some(Entry {
        fsid,
        handle,
        name: String::from_utf8_lossy(&rest[..end]).into_owned(),
    })
}

/// Every event in one `read` of the fanotify descriptor.
pub(super) fn parse(buf: &[u8]) -> Vec<FanEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + METADATA_LEN <= buf.len() {
        let b = &buf[off..];
        let event_len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
        let metadata_len = u16::from_ne_bytes([b[6], b[7]]) as usize;
        if event_len < METADATA_LEN || event_len > b.len() || metadata_len > event_len {
            break;
        }
        let mut ev = FanEvent {
            mask: u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")),
            pid: i32::from_ne_bytes(b[20..24].try_into().expect("4 bytes")),
            entry: None,
            new_entry: None,
            object: None,
        };
        let mut i = metadata_len;
        while i + 4 <= event_len {
            let info_type = b[i];
            let len = u16::from_ne_bytes([b[i + 2], b[i + 3]]) as usize;
            if len < 4 || i + len > event_len {
                break;
            }
            let info = &b[i..i + len];
            match info_type {
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME | libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME => {
                    ev.entry = entry(info);
                }
                libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => ev.new_entry = entry(info),
                libc::FAN_EVENT_INFO_TYPE_FID => ev.object = entry(info),
                _ => {}
            }
            i += len;
        }
        out.push(ev);
        off += event_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: u8, name: &str) -> Vec<u8> {
        let mut v = vec![kind, 0, 0, 0];
        v.extend(7i32.to_ne_bytes());
        v.extend(8i32.to_ne_bytes());
        v.extend(8u32.to_ne_bytes()); // handle_bytes
        v.extend(1i32.to_ne_bytes()); // handle_type
        v.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        v.extend(name.as_bytes());
        v.push(0);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        let len = v.len() as u16;
        v[2..4].copy_from_slice(&len.to_ne_bytes());
        v
    }

    fn event(mask: u64, pid: i32, infos: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![0u8; METADATA_LEN];
        v[4] = 3;
        v[6..8].copy_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        v[8..16].copy_from_slice(&mask.to_ne_bytes());
        v[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        v[20..24].copy_from_slice(&pid.to_ne_bytes());
        for i in infos {
            v.extend(i);
        }
        let len = v.len() as u32;
        v[0..4].copy_from_slice(&len.to_ne_bytes());
        v
    }

    #[test]
    fn fanotify_records_parse_into_ops_names_and_the_acting_pid() {
        let mut buf = event(
            libc::FAN_CREATE,
            42,
            &[info(libc::FAN_EVENT_INFO_TYPE_DFID_NAME, "a.txt")],
        );
        buf.extend(event(
            libc::FAN_RENAME,
            42,
            &[
                info(libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, "a.txt"),
                info(libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME, "b.txt"),
            ],
        ));
        buf.extend(event(libc::FAN_CREATE | libc::FAN_ONDIR, 43, &[]));
        let evs = parse(&buf);
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].op(), Some("create"));
        assert_eq!(evs[0].pid, 42);
        let e = evs[0].entry.as_ref().unwrap();
        assert_eq!(
            (e.fsid, e.name.as_str(), e.handle.len()),
            ([7, 8], "a.txt", 16)
        );
        assert_eq!(evs[1].op(), Some("rename"));
        assert_eq!(evs[1].entry.as_ref().unwrap().name, "a.txt");
        assert_eq!(evs[1].new_entry.as_ref().unwrap().name, "b.txt");
        assert_eq!(evs[2].op(), None, "directories are not file events");
        assert!(parse(&buf[..30]).len() <= 1, "a torn buffer stops cleanly");
    }
}
