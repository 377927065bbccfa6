//! Parsing the process-events connector's messages (`<linux/cn_proc.h>`) into [`ProcEvent`]s.
//!
//! One netlink datagram holds one or more `nlmsghdr` + `cn_msg` + `proc_event`. Threads are
//! reported like processes (`pid` ≠ `tgid`); the caller keeps only whole processes.

use super::sys::{CN_MSG_HDR, NLMSG_HDR};

const PROC_EVENT_NONE: u32 = 0;
const PROC_EVENT_FORK: u32 = 0x1;
const PROC_EVENT_EXEC: u32 = 0x2;
const PROC_EVENT_UID: u32 = 0x4;
const PROC_EVENT_COMM: u32 = 0x200;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// `what`, `cpu`, `timestamp_ns` before the event's own fields.
const EVENT_HDR: usize = 16;

/// One event from the kernel, `ts_ns` on `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ProcEvent {
    /// The answer to the subscription: `err` 0 means events will flow.
    Ack {
        err: u32,
    },
    Fork {
        ts_ns: u64,
        parent_tgid: i32,
        child_pid: i32,
        child_tgid: i32,
    },
    Exec {
        ts_ns: u64,
        pid: i32,
        tgid: i32,
    },
    Uid {
        ts_ns: u64,
        pid: i32,
        tgid: i32,
        euid: u32,
    },
    Comm {
        pid: i32,
        tgid: i32,
        comm: String,
    },
    Exit {
        ts_ns: u64,
        pid: i32,
        tgid: i32,
        /// The wait status (`exit_code << 8` or the signal number).
        status: u32,
    },
}

/// The exit code a shell would see: the code for a normal exit, minus the signal number for a
/// process killed by a signal (as Python's `returncode` does).
pub(super) fn exit_code(status: u32) -> i64 {
    let sig = status & 0x7f;
    if sig == 0 {
        i64::from((status >> 8) & 0xff)
    } else {
        -i64::from(sig)
    }
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn i32_at(b: &[u8], o: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Every event in one datagram; unknown or short messages are skipped.
pub(super) fn parse(datagram: &[u8]) -> Vec<ProcEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDR <= datagram.len() {
        let Some(len) = u32_at(datagram, off).map(|l| l as usize) else {
            break;
        };
        if len < NLMSG_HDR || off + len > datagram.len() {
            break;
        }
        let msg = &datagram[off..off + len];
        if let Some(ev) = parse_one(&msg[NLMSG_HDR..]) {
            out.push(ev);
        }
        off += len.div_ceil(4) * 4;
    }
    out
}

/// One `cn_msg` with its `proc_event`.
fn parse_one(cn: &[u8]) -> Option<ProcEvent> {
    let ev = cn.get(CN_MSG_HDR..)?;
    let what = u32_at(ev, 0)?;
    let ts_ns = u64_at(ev, 8)?;
    let d = ev.get(EVENT_HDR..)?;
    Some(match what {
        PROC_EVENT_NONE => ProcEvent::Ack { err: u32_at(d, 0)? },
        PROC_EVENT_FORK => ProcEvent::Fork {
            ts_ns,
            parent_tgid: i32_at(d, 4)?,
            child_pid: i32_at(d, 8)?,
            child_tgid: i32_at(d, 12)?,
        },
        PROC_EVENT_EXEC => ProcEvent::Exec {
            ts_ns,
            pid: i32_at(d, 0)?,
            tgid: i32_at(d, 4)?,
        },
        PROC_EVENT_UID => ProcEvent::Uid {
            ts_ns,
            pid: i32_at(d, 0)?,
            tgid: i32_at(d, 4)?,
            euid: u32_at(d, 12)?,
        },
        PROC_EVENT_COMM => {
            let raw = d.get(8..24)?;
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            ProcEvent::Comm {
                pid: i32_at(d, 0)?,
                tgid: i32_at(d, 4)?,
                comm: String::from_utf8_lossy(&raw[..end]).into_owned(),
            }
        }
        PROC_EVENT_EXIT => ProcEvent::Exit {
            ts_ns,
            pid: i32_at(d, 0)?,
            tgid: i32_at(d, 4)?,
            status: u32_at(d, 8)?,
        },
        _ => return None,
    })
}

#[cfg(test)]
pub(super) fn message(what: u32, ts_ns: u64, data: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + CN_MSG_HDR + EVENT_HDR + data.len();
    let mut m = vec![0u8; len];
    m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    let ev = NLMSG_HDR + CN_MSG_HDR;
    m[ev..ev + 4].copy_from_slice(&what.to_ne_bytes());
    m[ev + 8..ev + 16].copy_from_slice(&ts_ns.to_ne_bytes());
    m[ev + EVENT_HDR..].copy_from_slice(data);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|i| i.to_ne_bytes()).collect()
    }

    #[test]
    fn connector_messages_parse_into_fork_exec_comm_and_exit_with_its_code() {
        let mut dgram = message(PROC_EVENT_FORK, 5, &ints(&[10, 10, 11, 11]));
        dgram.extend(message(PROC_EVENT_EXEC, 6, &ints(&[11, 11])));
        let mut comm = ints(&[11, 11]);
        comm.extend(b"true\0\0\0\0\0\0\0\0\0\0\0\0");
        dgram.extend(message(PROC_EVENT_COMM, 6, &comm));
        dgram.extend(message(
            PROC_EVENT_EXIT,
            7,
            &ints(&[11, 11, 3 << 8, 17, 10, 10]),
        ));
        let evs = parse(&dgram);
        assert_eq!(
            evs,
            vec![
                ProcEvent::Fork {
                    ts_ns: 5,
                    parent_tgid: 10,
                    child_pid: 11,
                    child_tgid: 11
                },
                ProcEvent::Exec {
                    ts_ns: 6,
                    pid: 11,
                    tgid: 11
                },
                ProcEvent::Comm {
                    pid: 11,
                    tgid: 11,
                    comm: "true".into()
                },
                ProcEvent::Exit {
                    ts_ns: 7,
                    pid: 11,
                    tgid: 11,
                    status: 3 << 8
                },
            ]
        );
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(9), -9, "killed by SIGKILL");
        assert!(
            parse(&dgram[..10]).is_empty(),
            "a short datagram is skipped"
        );
    }
}
