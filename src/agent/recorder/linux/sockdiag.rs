//! The machine's TCP and UDP sockets through `sock_diag` netlink (`inet_diag`), the interface `ss`
//! uses: one dump per family and protocol instead of formatting and parsing `/proc/net/*` text.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::Socket;
use super::sys;

/// Bytes of `struct inet_diag_msg`: family, state, timer, retrans, sockid (48), expires, rqueue,
/// wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 72;

/// Every TCP and UDP socket with an inode, as `(inode, socket)`; an error if the kernel has no
/// `inet_diag` (the caller then reads `/proc/net`).
pub(super) fn sockets() -> std::io::Result<Vec<(u64, Socket)>> {
    let mut out = Vec::new();
    for (family, protocol, name) in [
        (libc::AF_INET as u8, libc::IPPROTO_TCP as u8, "tcp"),
        (libc::AF_INET6 as u8, libc::IPPROTO_TCP as u8, "tcp6"),
        (libc::AF_INET as u8, libc::IPPROTO_UDP as u8, "udp"),
        (libc::AF_INET6 as u8, libc::IPPROTO_UDP as u8, "udp6"),
    ] {
        for (_, payload) in sys::sock_diag_dump(family, protocol)? {
            if let Some(s) = parse(&payload, name) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// One `inet_diag_msg`; inode 0 (no owner, e.g. TIME_WAIT) is skipped.
fn parse(m: &[u8], protocol: &'static str) -> Option<(u64, Socket)> {
    if m.len() < DIAG_MSG_LEN {
        return None;
    }
    let v6 = m[0] == libc::AF_INET6 as u8;
    let state = m[1];
    let id = &m[4..52];
    let port = |o: usize| u16::from_be_bytes([id[o], id[o + 1]]);
    let addr = |o: usize| -> String {
        let b: [u8; 16] = id[o..o + 16].try_into().expect("16 bytes");
        if v6 {
            let ip = Ipv6Addr::from(b);
            match ip.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => ip.to_string(),
            }
        } else {
            Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()
        }
    };
    let inode = u32::from_ne_bytes(m[68..72].try_into().ok()?);
    (inode != 0).then(|| {
        (
            u64::from(inode),
            Socket {
                protocol,
                local_addr: addr(4),
                local_port: port(0),
                remote_addr: addr(20),
                remote_port: port(2),
                state,
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn sock_diag_lists_a_listener_and_a_connection_of_this_test_with_ports_and_states() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let client_port = client.local_addr().unwrap().port();
        let all = match sockets() {
            Ok(all) => all,
            Err(e) => {
                eprintln!("skipped: sock_diag unavailable here: {e}");
                return;
            }
        };
        let listen = all
            .iter()
            .find(|(_, s)| s.local_port == port && s.is_listen())
            .expect("the listener");
        assert_eq!(listen.1.local_addr, "127.0.0.1");
        assert_eq!(listen.1.protocol, "tcp");
        let conn = all
            .iter()
            .find(|(_, s)| s.local_port == client_port && s.remote_port == port)
            .expect("the connection");
        assert!(conn.1.is_established());
        assert_eq!(conn.1.remote_addr, "127.0.0.1");
        assert_ne!(listen.0, conn.0, "distinct inodes");
        // Dump after dump, a socket that stays open is in every one, under the same inode.
        for i in 0..50 {
            let again = sockets().unwrap();
            let n = again.iter().filter(|(inode, _)| *inode == conn.0).count();
            assert_eq!(n, 1, "dump {i}: the open connection appears {n} times");
        }
    }
}
