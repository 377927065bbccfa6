//! The few Linux syscalls the kernel-event recorder needs, each in a small safe wrapper: the
//! process-events connector (netlink `NETLINK_CONNECTOR`, `CN_IDX_PROC`), fanotify with file
//! handles and names, `open_by_handle_at`, and `poll`.
//!
//! Everything `unsafe` in the recorder lives here. Parsing of what the kernel sends is in safe code
//! (`procs.rs`, `files.rs`) over byte slices.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `NETLINK_CONNECTOR` from `<linux/netlink.h>` (not in the `libc` crate for glibc targets).
const NETLINK_CONNECTOR: libc::c_int = 11;
/// `SO_RCVBUFFORCE` from `<asm-generic/socket.h>` (x86, arm, riscv; root may exceed rmem_max).
const SO_RCVBUFFORCE: libc::c_int = 33;
/// `NLMSG_DONE`: the connector expects its requests with this netlink type.
const NLMSG_DONE: u16 = 3;
/// Bytes of `struct nlmsghdr`.
pub(super) const NLMSG_HDR: usize = 16;
/// Bytes of `struct cn_msg` (without its payload).
pub(super) const CN_MSG_HDR: usize = 20;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Wraps a descriptor a syscall just returned (`>= 0`).
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful syscall that created it; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn set_int_opt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed; the kernel only reads it.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn get_int_opt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    })?;
    Ok(value)
}

/// A netlink socket subscribed to the kernel's process events.
#[derive(Debug)]
pub(super) struct ProcConnector {
    fd: OwnedFd,
    /// The receive buffer the kernel granted, in bytes.
    pub(super) rcvbuf: usize,
    /// Whether `SO_RCVBUFFORCE` was allowed (else `SO_RCVBUF`, capped by `net.core.rmem_max`).
    pub(super) forced: bool,
}

impl ProcConnector {
    /// Opens the socket, sizes its receive buffer to `rcvbuf` bytes, joins `CN_IDX_PROC` and sends
    /// `PROC_CN_MCAST_LISTEN`. The kernel answers the subscription with an ack that
    /// [`super::procs::parse`] reports as [`super::procs::ProcEvent::Ack`].
    pub(super) fn open(rcvbuf: usize) -> io::Result<ProcConnector> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = owned(cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_CONNECTOR,
            )
        })?);
        let want = i32::try_from(rcvbuf).unwrap_or(i32::MAX);
        let forced = set_int_opt(&fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, want).is_ok();
        if !forced {
            set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, want)?;
        }
        let rcvbuf = get_int_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF)? as usize;
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::CN_IDX_PROC;
        // SAFETY: `addr` is a valid sockaddr_nl and its size is passed.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let mut msg = Vec::with_capacity(NLMSG_HDR + CN_MSG_HDR + 4);
        let total = (NLMSG_HDR + CN_MSG_HDR + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes()); // nlmsg_len
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes()); // nlmsg_type
        msg.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        msg.extend_from_slice(&libc::CN_IDX_PROC.to_ne_bytes()); // id.idx
        msg.extend_from_slice(&libc::CN_VAL_PROC.to_ne_bytes()); // id.val
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&libc::PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: `msg` is valid for reads of its length.
        cvt_size(unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) })?;
        Ok(ProcConnector { fd, rcvbuf, forced })
    }

    /// One datagram into `buf`, without blocking. `WouldBlock` when none is queued; `ENOBUFS`
    /// (raw OS error) when the kernel dropped messages because the buffer was full.
    pub(super) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        cvt_size(unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        })
    }

    pub(super) fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }
}

/// Which of `fds` are readable, waiting at most `timeout`. Interrupted waits count as "none".
pub(super) fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfds` is valid for reads and writes of `pfds.len()` entries.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// A filesystem identifier as fanotify reports it (`__kernel_fsid_t`).
pub(super) type Fsid = [i32; 2];

/// A fanotify group reporting directory file handles and names.
#[derive(Debug)]
pub(super) struct Fanotify {
    fd: OwnedFd,
    /// One open directory per marked filesystem, to resolve its file handles.
    mounts: Vec<(Fsid, OwnedFd)>,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

impl Fanotify {
    /// `fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_REPORT_FID | …)`; needs
    /// `CAP_SYS_ADMIN` for the filesystem marks that follow.
    pub(super) fn new() -> io::Result<Fanotify> {
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_UNLIMITED_QUEUE
            | libc::FAN_REPORT_DFID_NAME
            | libc::FAN_REPORT_FID;
        // SAFETY: plain fanotify_init(2) call; the result is checked.
        let fd = owned(cvt(unsafe {
            libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint)
        })?);
        Ok(Fanotify {
            fd,
            mounts: Vec::new(),
        })
    }

    /// Marks the whole filesystem that holds `path` for `mask`, and keeps a directory of it open
    /// to resolve handles. Marking a second path of an already marked filesystem is harmless.
    pub(super) fn mark_filesystem(&mut self, path: &Path, mask: u64) -> io::Result<()> {
        let c = c_path(path)?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        cvt(unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                mask,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        })?;
        // SAFETY: `c` is a NUL-terminated path; the result is checked.
        let dir = owned(cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?);
        // SAFETY: statfs is plain data; all-zero is valid and the kernel fills it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `dir` is open and `st` is valid for writes.
        cvt(unsafe { libc::fstatfs(dir.as_raw_fd(), &raw mut st) })?;
        // SAFETY: fsid_t is two ints (`__val`), which the libc crate keeps private; same layout.
        let fsid: Fsid = unsafe { std::mem::transmute::<libc::fsid_t, Fsid>(st.f_fsid) };
        if !self.mounts.iter().any(|(f, _)| *f == fsid) {
            self.mounts.push((fsid, dir));
        }
        Ok(())
    }

    /// Reads queued events into `buf` without blocking; `WouldBlock` when there are none.
    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        cvt_size(unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    pub(super) fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// Opens (`O_PATH`) the object a handle names (`struct file_handle` bytes as the kernel
    /// reported them: `handle_bytes`, `handle_type`, `f_handle`). Needs `CAP_DAC_READ_SEARCH`.
    /// Fails when the object is gone or on an unmarked filesystem.
    fn open_handle(&self, fsid: Fsid, handle: &[u8]) -> io::Result<OwnedFd> {
        let Some((_, mount)) = self.mounts.iter().find(|(f, _)| *f == fsid) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "event on a filesystem that was not marked",
            ));
        };
        if handle.len() < 8 {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let declared = u32::from_ne_bytes(handle[0..4].try_into().expect("4 bytes")) as usize;
        if declared + 8 > handle.len() {
            return Err(io::ErrorKind::InvalidData.into());
        }
        // The kernel's file_handle has a flexible array; copy it into 8-aligned storage.
        let mut storage = vec![0u64; handle.len().div_ceil(8)];
        // SAFETY: `storage` has at least `handle.len()` bytes; the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                handle.as_ptr(),
                storage.as_mut_ptr().cast::<u8>(),
                handle.len(),
            );
        }
        // SAFETY: `storage` holds a complete file_handle (header plus `handle_bytes` bytes, checked
        // above) and is aligned for it; the kernel only reads it.
        let fd = cvt(unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                storage.as_mut_ptr().cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        })?;
        Ok(owned(fd))
    }

    /// The current path of the directory (or file) a handle names.
    pub(super) fn handle_path(&self, fsid: Fsid, handle: &[u8]) -> io::Result<PathBuf> {
        let fd = self.open_handle(fsid, handle)?;
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// The current size of the regular file a handle names (`None` for anything else).
    pub(super) fn handle_size(&self, fsid: Fsid, handle: &[u8]) -> io::Result<Option<u64>> {
        let fd = self.open_handle(fsid, handle)?;
        let file = std::fs::File::from(fd);
        let m = file.metadata()?;
        Ok(m.is_file().then_some(m.len()))
    }
}

/// Whether this process has capability `cap` (a `CAP_*` number) in its effective set.
pub(super) fn has_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << cap) != 0)
}

pub(super) const CAP_DAC_READ_SEARCH: u32 = 2;
pub(super) const CAP_NET_ADMIN: u32 = 12;
pub(super) const CAP_SYS_ADMIN: u32 = 21;

/// `CLOCK_REALTIME − CLOCK_MONOTONIC` in ns: turns the connector's timestamps into wall time.
pub(super) fn monotonic_offset_ns() -> i128 {
    let now = |clock| {
        // SAFETY: timespec is plain data; all-zero is valid.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: `ts` is valid for writes; clock ids are constants.
        unsafe { libc::clock_gettime(clock, &raw mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_MONOTONIC` now, in ns (the clock of the connector's timestamps).
pub(super) fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data; all-zero is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Sets the calling thread's nice value (lower is more CPU); needs `CAP_SYS_NICE` to go below 0.
pub(super) fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id; the result is checked.
    cvt(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) }).map(drop)
}

/// `NETLINK_SOCK_DIAG` and `SOCK_DIAG_BY_FAMILY` from `<linux/sock_diag.h>`.
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;

/// One `sock_diag` dump of the `family`/`protocol` sockets in any state: every netlink message
/// the kernel answered with, as `(type, payload)`. Needs no privileges (as `ss`).
pub(super) fn sock_diag_dump(family: u8, protocol: u8) -> io::Result<Vec<(u16, Vec<u8>)>> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = owned(cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    })?);
    // nlmsghdr + inet_diag_req_v2 (family, protocol, ext, pad, states, 48-byte sockid).
    let mut msg = Vec::with_capacity(NLMSG_HDR + 56);
    msg.extend_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[family, protocol, 0, 0]);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    msg.extend_from_slice(&[0u8; 48]);
    // SAFETY: `msg` is valid for reads of its length.
    cvt_size(unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) })?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n =
            cvt_size(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) })?;
        if n == 0 {
            return Ok(out);
        }
        let mut off = 0;
        while off + NLMSG_HDR <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < NLMSG_HDR || off + len > n {
                break;
            }
            match kind {
                3 => return Ok(out), // NLMSG_DONE
                2 => {
                    // NLMSG_ERROR: a negative errno follows the header.
                    let err = i32::from_ne_bytes(
                        buf[off + NLMSG_HDR..off + NLMSG_HDR + 4]
                            .try_into()
                            .expect("4 bytes"),
                    );
                    return Err(io::Error::from_raw_os_error(-err));
                }
                _ => out.push((kind, buf[off + NLMSG_HDR..off + len].to_vec())),
            }
            off += len.div_ceil(4) * 4;
        }
    }
}

/// Puts the calling thread in the `SCHED_RR` real-time class at `priority` (needs
/// `CAP_SYS_NICE`); the kernel's real-time throttling still leaves 5 % of each second to others.
pub(super) fn set_thread_realtime(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is valid for reads; pid 0 is the calling thread.
    cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &raw const param) }).map(drop)
}

/// Back to the normal scheduling class (`SCHED_OTHER`) for the calling thread.
pub(super) fn set_thread_normal() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is valid for reads; pid 0 is the calling thread.
    cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &raw const param) }).map(drop)
}

/// CPU time the calling thread has used, in ns.
pub(super) fn thread_cpu_ns() -> u64 {
    // SAFETY: timespec is plain data; all-zero is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
