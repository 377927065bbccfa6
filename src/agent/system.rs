//! Facts about the machine the agent runs on: addresses and operating system.

use std::ffi::CStr;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The machine's non-loopback IP addresses, or the loopback ones if that is all it has.
pub fn ip_addresses() -> Vec<String> {
    let mut all = Vec::new();
    let mut ifaddrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free exactly once.
    unsafe {
        if libc::getifaddrs(&mut ifaddrs) != 0 {
            return all;
        }
        let mut cursor = ifaddrs;
        while !cursor.is_null() {
            let addr = (*cursor).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        all.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).to_string());
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        all.push(Ipv6Addr::from(sin6.sin6_addr.s6_addr).to_string());
                    }
                    _ => {}
                }
            }
            cursor = (*cursor).ifa_next;
        }
        libc::freeifaddrs(ifaddrs);
    }
    let external: Vec<String> = all
        .iter()
        .filter(|a| !a.starts_with("127.") && a.as_str() != "::1" && !a.starts_with("fe80"))
        .cloned()
        .collect();
    if external.is_empty() { all } else { external }
}

/// `PRETTY_NAME` from os-release with the kernel, e.g. `Debian GNU/Linux 12 (bookworm), Linux 6.1.0`.
pub fn os_description() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    // SAFETY: uname fills a zeroed struct of NUL-terminated arrays.
    let kernel = unsafe {
        let mut uts: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut uts) == 0 {
            format!(
                "{} {}",
                CStr::from_ptr(uts.sysname.as_ptr()).to_string_lossy(),
                CStr::from_ptr(uts.release.as_ptr()).to_string_lossy()
            )
        } else {
            String::new()
        }
    };
    if kernel.is_empty() {
        pretty
    } else {
        format!("{pretty}, {kernel}")
    }
}

/// The machine's hostname, as the agent's default endpoint name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
