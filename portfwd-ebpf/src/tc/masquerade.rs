//! The source port a new flow gets towards its container.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use portfwd_common::{Addr, CtKey, FAMILY_V4, IPPROTO_TCP};

use super::service::Backend;
use crate::{conntrack, maps::SCRATCH, packet::Packet};

/// A source port for a new flow seen by the container as coming from the
/// client (or, `masquerade`, from the host address the container dialed):
/// the client's own when no live flow to this container uses it from that
/// address (nor, masqueraded, a host socket), else one of a few others (a
/// bounded loop, for the verifier).
#[inline(never)]
pub(super) fn masquerade_port(
    ctx: &TcContext,
    pkt: &Packet,
    backend: &Backend,
    addr: &Addr,
) -> Option<u16> {
    // The host's own address (hairpin, NAT46; not the client's own, kept by
    // an external flow): a host socket may hold the port. Derived here, not
    // passed: LLVM counts more than five arguments for this function.
    let host_side = addr.words != pkt.saddr.words;
    // Its own clock read (a coarse one, a few ns): the caller's `now` would
    // be a sixth argument, and a BPF function takes five at most (LLVM
    // counts this one's arguments after its own rewrites).
    let now = conntrack::now();
    // The candidate key lives in scratch memory: this call is the deepest
    // of the hairpin path, where the 512-byte stack runs out.
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU memory that only this program run uses.
    let key = unsafe { &mut (*scratch).key };
    key.saddr = backend.addr;
    key.daddr = *addr;
    key.sport = backend.port;
    key.proto = pkt.proto;
    key.family = backend.family;
    key._pad = 0;
    let mut port = u16::from_be(pkt.sport);
    for attempt in 1..=8u16 {
        key.dport = port.to_be();
        match conntrack::lookup(key, now) {
            // A hairpin or NAT46 flow's address is the host's own: a host
            // socket may already hold this port towards the container.
            None if host_side && host_socket_uses(ctx, key) => {}
            None => return Some(port.to_be()),
            // This very flow's reply entry (its forward entry expired or
            // was evicted alone): its port stays.
            // SAFETY: a pointer into the map value, valid for this run.
            Some(entry) if conntrack::is_reply_of(unsafe { &*entry }, pkt) => {
                return Some(port.to_be());
            }
            Some(_) => {}
        }
        // Another port in the ephemeral range.
        port = 32768 + port.wrapping_add(attempt.wrapping_mul(7919)) % 28232;
    }
    None
}

/// Whether a socket of the host (the namespace of the interface the packet
/// came in on) would receive the packets of `key`, a candidate reply key
/// (container -> host address and port): a connection between the same
/// ends (established, opening, or in TIME_WAIT), or a socket listening or
/// bound on that address and port. Such a port must not be given to a
/// hairpin flow: its reply entry would take that socket's packets, and the
/// container would see the flow's SYN on its side of the host's connection.
/// Looked up rather than avoided by a reserved range: the host binds ports
/// anywhere, and the kernel's automatic range is a per-namespace setting.
// Not inlined, the tuple in scratch memory: one frame of its own, the
// smallest, at the bottom of the hairpin chain (program, `start_flow`,
// `masquerade_port`, this).
#[inline(never)]
fn host_socket_uses(ctx: &TcContext, key: &CtKey) -> bool {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        // Cannot happen (index 0 exists); taken, so no port goes unchecked.
        return true;
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
    // released at once (the verifier insists).
    unsafe {
        let sock = if key.proto == IPPROTO_TCP {
            // skc: TIME_WAIT and request sockets count too.
            bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        };
        if sock.is_null() {
            return false;
        }
        bpf_sk_release(sock.cast());
    }
    true
}
