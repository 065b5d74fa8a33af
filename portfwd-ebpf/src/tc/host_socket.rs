//! The host's own sockets, as its stack would find them for a packet from a
//! container to a host address.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use portfwd_common::{CtKey, FAMILY_V4, IPPROTO_TCP};

use crate::maps::SCRATCH;

/// The kernel's `TCP_LISTEN` (`bpf_sock.state`).
const TCP_LISTEN: u32 = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum HostSocket {
    None,
    /// A socket listening or bound on the destination (address and port),
    /// or a UDP socket of the same ends.
    Bound,
    /// A TCP connection between the very ends of the packet: established,
    /// opening, closing or in TIME_WAIT.
    Connected,
}

/// The socket of the host (the namespace of the interface the packet came
/// in on) that would receive the packets of `key`, whose source is a
/// container and destination a host address and port.
///
/// Looked up rather than avoided by a reserved range of ports: the host
/// binds ports anywhere, and the kernel's automatic range is a
/// per-namespace setting.
// Not inlined, the tuple in scratch memory: one frame of its own, the
// smallest, at the bottom of the hairpin chain (program, `start_flow`,
// `masquerade_port`, this).
#[inline(never)]
pub(super) fn host_socket(ctx: &TcContext, key: &CtKey) -> HostSocket {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        // Cannot happen (index 0 exists). Bound: no port goes unchecked,
        // and no packet skips the conntrack.
        return HostSocket::Bound;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let tuple = unsafe { &mut (*scratch).sock_tuple };
    // The tuple is the packet as the host would receive it: from the
    // container (saddr, sport) to the host address (daddr, dport).
    let size = if key.family == FAMILY_V4 {
        // SAFETY: plain integers; the union's IPv4 member is written whole.
        let ipv4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        ipv4.saddr = key.saddr.words[0];
        ipv4.daddr = key.daddr.words[0];
        ipv4.sport = key.sport;
        ipv4.dport = key.dport;
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        // SAFETY: as above, the IPv6 member.
        let ipv6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        ipv6.saddr = key.saddr.words;
        ipv6.daddr = key.daddr.words;
        ipv6.sport = key.sport;
        ipv6.dport = key.dport;
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } as u32;
    // SAFETY: the tuple is valid memory of `size` bytes; a socket found is
    // released at once (the verifier insists), after reading its state,
    // a field every kind of socket has (`sock_common`).
    unsafe {
        let sock: *mut bpf_sock = if key.proto == IPPROTO_TCP {
            // skc: TIME_WAIT and request sockets count too.
            bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        };
        if sock.is_null() {
            return HostSocket::None;
        }
        let connected = key.proto == IPPROTO_TCP && (*sock).state != TCP_LISTEN;
        bpf_sk_release(sock.cast());
        if connected {
            HostSocket::Connected
        } else {
            HostSocket::Bound
        }
    }
}
