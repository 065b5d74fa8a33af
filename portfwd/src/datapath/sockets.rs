//! Ending the host UDP sockets connected through mappings that are gone
//! (issue 12, defect 4). A host socket translated at `connect()` talks to
//! the container directly, and the kernel runs no hook for its later sends:
//! a connected UDP socket (a resolver, a metrics client) would keep sending
//! to the old container after `unmap` or a re-publish to another one,
//! silently, for as long as it lives.
//!
//! How: one sock_diag dump per family of the host namespace's connected UDP
//! sockets; those connected to a removed mapping's container are
//! candidates (usually there are none, and nothing more is done). For
//! candidates, the `pf_iter_udp` BPF iterator lists the `pf_sock_dialed`
//! storage of every translated UDP socket by cookie (sock_diag reports
//! socket storage for TCP sockets only), and each candidate whose storage
//! says it was translated through a removed mapping is ended with
//! `SOCK_DESTROY`: its owner's next call fails with ECONNABORTED and it is
//! disconnected, so the client connects again, through whatever is
//! published now. Sockets connected straight to a container address, and
//! unconnected UDP sockets (each datagram is translated anew), are left
//! alone.
//!
//! TCP connections are kept: they reach the old container until they close,
//! and fail on their own (a reset, or a timeout) once it is gone, as
//! kube-proxy and Cilium leave them (both end UDP only). Ending them would
//! also cost every TCP unmap a walk of the kernel's whole TCP hash table
//! (about 6 ms per address family on this 24 GiB host).
//!
//! Why the iterator does not end the sockets itself with the
//! `bpf_sock_destroy` kfunc (Linux 6.5, Cilium's way): aya 0.14 loads
//! `iter/` programs, but its object loader (aya-obj 0.3) has no kfunc call
//! relocation (no `BPF_PSEUDO_KFUNC_CALL`, no `.ksyms` externs), so a
//! program of this crate cannot call `bpf_sock_destroy`. sock_diag's
//! `SOCK_DESTROY` needs `CONFIG_INET_DIAG_DESTROY` (on in Debian's and this
//! host's kernels) and works on every kernel portfwd supports, 6.1 included.

use std::{collections::HashMap, io::Read, path::Path};

use anyhow::{Context, Result};
use aya::{Btf, programs::Iter};
use portfwd_common::{Addr, DialedSlot, IPPROTO_UDP, SOCKET_ITERATOR, SockDialed};

use super::{
    links::program_of,
    object::{self, Sizes},
};
use crate::{
    host::sock_diag::{self, InetSocket, TCP_ESTABLISHED},
    model::{Mapping, Protocol},
};

/// What `end_sockets_through` did.
#[derive(Debug, Default)]
pub(crate) struct EndedSockets {
    pub(crate) ended: usize,
    /// Why some sockets that should have ended were kept (the kernel lacks
    /// `CONFIG_INET_DIAG_DESTROY`, or the UDP iterator), if any were.
    pub(crate) why_kept: Option<String>,
}

/// Ends the host UDP sockets connected through any of `removed`.
pub(crate) fn end_sockets_through(pin_dir: &Path, removed: &[Mapping]) -> Result<EndedSockets> {
    let mut report = EndedSockets::default();
    let removed: Vec<&Mapping> = removed
        .iter()
        .filter(|m| m.protocol == Protocol::Udp)
        .collect();
    if removed.is_empty() {
        return Ok(report);
    }
    let mut candidates: Vec<InetSocket> = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let connected = 1 << TCP_ESTABLISHED;
        let sockets = sock_diag::dump(family, IPPROTO_UDP, connected)
            .context("listing the host's UDP sockets (sock_diag)")?;
        candidates.extend(
            sockets
                .into_iter()
                .filter(|socket| removed.iter().any(|m| connected_to(socket, m))),
        );
    }
    if candidates.is_empty() {
        return Ok(report);
    }
    let storage = match translated_udp_sockets(pin_dir) {
        Ok(by_cookie) => by_cookie,
        Err(error) => {
            report.why_kept = Some(format!("listing them failed: {error:#}"));
            return Ok(report);
        }
    };
    for socket in candidates {
        let Some(dialed) = storage.get(&socket.cookie).and_then(|s| read_dialed(s)) else {
            continue;
        };
        if !removed
            .iter()
            .any(|m| connected_through(&socket, &dialed, m))
        {
            continue;
        }
        match sock_diag::destroy(&socket) {
            Ok(()) => report.ended += 1,
            // Closed in the meantime.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => {
                report.why_kept.get_or_insert_with(|| describe(&error));
            }
        }
    }
    Ok(report)
}

/// The UDP sockets the socket programs translated: cookie -> storage, as
/// the `pf_iter_udp` iterator lists them.
fn translated_udp_sockets(pin_dir: &Path) -> Result<HashMap<u64, Vec<u8>>> {
    let name = SOCKET_ITERATOR.name;
    let mut ebpf = object::load(pin_dir, Sizes::default())?;
    let program: &mut Iter = program_of(&mut ebpf, name)?.try_into()?;
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    program
        .load("udp", &btf)
        .with_context(|| format!("loading {name}"))?;
    let link = program
        .attach()
        .with_context(|| format!("attaching {name}"))?;
    let mut output = Vec::new();
    program
        .take_link(link)?
        .into_file()?
        .read_to_end(&mut output)
        .with_context(|| format!("reading {name}"))?;
    const RECORD: usize = 8 + size_of::<SockDialed>();
    Ok(output
        .chunks_exact(RECORD)
        .map(|record| {
            let cookie = u64::from_ne_bytes(record[..8].try_into().unwrap());
            (cookie, record[8..].to_vec())
        })
        .collect())
}

fn describe(error: &std::io::Error) -> String {
    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
        "this kernel cannot end sockets (no CONFIG_INET_DIAG_DESTROY)".into()
    } else {
        format!("ending them failed: {error}")
    }
}

/// Whether `socket` (connected) is connected to `mapping`'s container.
fn connected_to(socket: &InetSocket, mapping: &Mapping) -> bool {
    socket.state == TCP_ESTABLISHED
        && socket.peer_port == mapping.container.port()
        && socket.peer.to_canonical() == mapping.container.ip()
}

/// Whether `socket` is connected to `mapping`'s container because the
/// socket programs translated a connect to `mapping`'s published address
/// (`dialed`: the socket's storage).
fn connected_through(socket: &InetSocket, dialed: &SockDialed, mapping: &Mapping) -> bool {
    connected_to(socket, mapping)
        && dialed
            .slots
            .iter()
            .filter(|slot| slot.family != 0)
            .any(|slot| slot_is(slot, socket, mapping))
}

/// The slot of the backend the socket is connected to, dialed through
/// `mapping`'s published address.
fn slot_is(slot: &DialedSlot, socket: &InetSocket, mapping: &Mapping) -> bool {
    let ip = |addr: &Addr| addr.to_ip(slot.family).map(|ip| ip.to_canonical());
    let backend_port = u16::from_be(slot.backend_port);
    if ip(&slot.backend) != Some(socket.peer.to_canonical()) || backend_port != socket.peer_port {
        return false;
    }
    let Some(dialed) = ip(&slot.dialed) else {
        return false;
    };
    if u16::from_be(slot.dialed_port) != mapping.host.port() {
        return false;
    }
    let host = mapping.host.ip();
    if host.is_unspecified() {
        // A wildcard mapping serves the local addresses of its family.
        host.is_ipv4() == dialed.is_ipv4()
    } else {
        host == dialed
    }
}

fn read_dialed(bytes: &[u8]) -> Option<SockDialed> {
    if bytes.len() < size_of::<SockDialed>() {
        return None;
    }
    // SAFETY: SockDialed is #[repr(C)] and made only of integers (any bit
    // pattern is valid); the length was checked; the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<SockDialed>()) })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use portfwd_common::{FAMILY_V4, FAMILY_V6};

    use super::*;

    fn mapping(host: &str, container: &str) -> Mapping {
        Mapping {
            name: "dns".into(),
            protocol: Protocol::Udp,
            host: host.parse().unwrap(),
            container: container.parse().unwrap(),
            ifindex: 0,
            hold: false,
            allow: None,
        }
    }

    /// The storage the socket programs write for a socket that dialed
    /// `dialed` and was connected to `backend` (as the socket sees both).
    fn storage(family: u8, backend: &str, dialed: &str) -> SockDialed {
        let (backend, dialed): (SocketAddr, SocketAddr) =
            (backend.parse().unwrap(), dialed.parse().unwrap());
        let addr = |ip: IpAddr| Addr::from_ip(ip).1;
        let mut value = SockDialed::default();
        value.slots[0] = DialedSlot {
            backend: addr(backend.ip()),
            dialed: addr(dialed.ip()),
            backend_port: backend.port().to_be(),
            dialed_port: dialed.port().to_be(),
            family,
            _pad: [0; 3],
        };
        value
    }

    fn socket(peer: &str) -> InetSocket {
        InetSocket::connected(IPPROTO_UDP, peer.parse().unwrap(), 1)
    }

    #[test]
    fn a_socket_translated_through_the_mapping_matches_it() {
        let wildcard = mapping("0.0.0.0:47084", "10.0.0.2:5003");
        let v4 = socket("10.0.0.2:5003");
        let dialed = storage(FAMILY_V4, "10.0.0.2:5003", "127.0.0.1:47084");
        assert!(connected_through(&v4, &dialed, &wildcard));
        // Published elsewhere, or dialed through another port: no.
        let exact = mapping("10.9.9.9:47084", "10.0.0.2:5003");
        assert!(!connected_through(&v4, &dialed, &exact));
        let other_port = mapping("0.0.0.0:47085", "10.0.0.2:5003");
        assert!(!connected_through(&v4, &dialed, &other_port));
        // Connected elsewhere since (its storage is stale).
        let moved = socket("10.0.0.3:5003");
        assert!(!connected_through(&moved, &dialed, &wildcard));
    }

    #[test]
    fn dual_stack_sockets_match_the_mapping_of_the_family_they_dialed() {
        let v4_wildcard = mapping("0.0.0.0:47084", "10.0.0.2:5003");
        let v6_wildcard = mapping("[::]:47084", "10.0.0.2:5003");
        // An IPv6 socket that dialed ::ffff:127.0.0.1 talks IPv4.
        let mapped = socket("[::ffff:10.0.0.2]:5003");
        let dialed = storage(
            FAMILY_V6,
            "[::ffff:10.0.0.2]:5003",
            "[::ffff:127.0.0.1]:47084",
        );
        assert!(connected_through(&mapped, &dialed, &v4_wildcard));
        assert!(!connected_through(&mapped, &dialed, &v6_wildcard));
        // One that dialed [::1] reached the IPv4 container through [::].
        let dialed = storage(FAMILY_V6, "[::ffff:10.0.0.2]:5003", "[::1]:47084");
        assert!(connected_through(&mapped, &dialed, &v6_wildcard));
        assert!(!connected_through(&mapped, &dialed, &v4_wildcard));
    }

    #[test]
    fn an_unconnected_socket_never_matches() {
        let wildcard = mapping("0.0.0.0:47084", "10.0.0.2:5003");
        let mut unconnected = socket("10.0.0.2:5003");
        unconnected.state = 7; // TCP_CLOSE: what an unconnected UDP socket shows
        let dialed = storage(FAMILY_V4, "10.0.0.2:5003", "127.0.0.1:47084");
        assert!(!connected_through(&unconnected, &dialed, &wildcard));
    }
}
