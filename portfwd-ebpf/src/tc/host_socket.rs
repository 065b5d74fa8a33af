//! The host's own sockets, as its stack would find them for a packet from a
//! container to a host address.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use portfwd_common::{CtKey, FAMILY_V4, IPPROTO_TCP};

use crate::{maps::SCRATCH, packet::TCP_SYN};

/// `host_socket`'s answer when the host has no socket for the packet (the
/// kernel's socket states start at 1).
pub(super) const NO_SOCKET: u32 = 0;
/// `host_socket`'s answer for a UDP socket, whose state is no TCP state:
/// one that owns no packet (`owns_packet`).
const UDP_SOCKET: u32 = TCP_LISTEN;

// The kernel's TCP states (`bpf_sock.state`), those `owns_packet` names.
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_LISTEN: u32 = 10;
const TCP_CLOSING: u32 = 11;

/// Whether the host's TCP socket in `state`, whose ends a container's
/// packet with `tcp_flags` matches exactly, is where that packet belongs
/// beyond doubt: a connection that carries data, opened or closing.
/// Not a socket in TIME_WAIT: a hairpin flow may reuse its ends (`map`
/// binds a published port over such leftovers of an earlier service), and
/// only the flow's translation reaches the container's server. Not a
/// request socket either (the host's half-open answer to the container):
/// both are left to the conntrack, which knows them for the host's when it
/// has no flow of theirs. A connection the host is opening owns only the
/// container's SYN-ACK: a container that holds those ends already (a
/// hairpin flow masqueraded to the same address and port, which the host's
/// choice of port cannot see) answers the SYN with an ACK of that flow,
/// which is the flow's, and which the opening socket would answer with a
/// reset that ends the flow.
pub(super) fn owns_packet(state: u32, tcp_flags: u8) -> bool {
    match state {
        TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSE_WAIT | TCP_LAST_ACK
        | TCP_CLOSING => true,
        TCP_SYN_SENT => tcp_flags & TCP_SYN != 0,
        _ => false,
    }
}

/// The state of the socket of the host (the namespace of the interface the
/// packet came in on) that would receive the packets of `key`, whose source
/// is a container and destination a host address and port: a connection
/// between the same ends (established, opening or closing, in TIME_WAIT,
/// a request socket), else one listening on the destination; for UDP,
/// `UDP_SOCKET` when one is bound to it; `NO_SOCKET` when there is none.
// Not inlined, the tuple in scratch memory: one frame of its own, the
// smallest, at the bottom of the hairpin chain (program, `start_flow`,
// `masquerade_port`, this).
#[inline(never)]
pub(super) fn host_socket(ctx: &TcContext, key: &CtKey) -> u32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        // Cannot happen (index 0 exists). A state that owns no packet, so
        // that no port goes unchecked and no packet skips the conntrack.
        return TCP_LISTEN;
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
    let (ctx, netns) = (ctx.as_ptr(), BPF_F_CURRENT_NETNS as u64);
    // SAFETY: the tuple is valid memory of `size` bytes; a socket found is
    // released at once (the verifier insists). The state is read in the
    // TCP branch alone: the verifier rewrites a socket field's load for
    // the kind of pointer it reads through (here a `sock_common`, a field
    // every kind of socket has), so one load cannot serve both lookups.
    unsafe {
        if key.proto == IPPROTO_TCP {
            // skc: TIME_WAIT and request sockets count too.
            let sock = bpf_skc_lookup_tcp(ctx, tuple, size, netns, 0);
            if sock.is_null() {
                return NO_SOCKET;
            }
            let state = (*sock).state;
            bpf_sk_release(sock.cast());
            state
        } else {
            let sock = bpf_sk_lookup_udp(ctx, tuple, size, netns, 0);
            if sock.is_null() {
                return NO_SOCKET;
            }
            bpf_sk_release(sock.cast());
            UDP_SOCKET
        }
    }
}
