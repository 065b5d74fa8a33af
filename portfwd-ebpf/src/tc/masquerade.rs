//! The source port a new flow gets towards its container.

use aya_ebpf::programs::TcContext;
use portfwd_common::Addr;

use super::{
    host_socket::{NO_SOCKET, host_socket},
    service::Backend,
};
use crate::{clock, conntrack, maps::SCRATCH, packet::Packet};

/// A source port for a new flow seen by the container as coming from the
/// client (or, `masquerade`, from the host address the container dialed):
/// the client's own when no live flow to this container uses it from that
/// address (nor, masqueraded, a host socket), else one of a few others (a
/// bounded loop, for the verifier) in the ephemeral range, in an order of
/// the client's own (`spread`): clients that share a source port (a
/// hairpin or NAT46 flow's all share one address towards the container)
/// do not compete for the same few, and no forger can take a port's few
/// for every client that uses it.
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
    let now = clock::now();
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
    let spread = spread(&pkt.saddr, port);
    for attempt in 1..=8u32 {
        key.dport = port.to_be();
        match conntrack::lookup_any(key, now) {
            // A hairpin or NAT46 flow's address is the host's own: a host
            // socket may already hold this port towards the container. Not
            // a port for this flow then: its reply entry would take that
            // socket's packets, and the container would see the flow's SYN
            // on its side of the host's connection. Looked up rather than
            // avoided by a reserved range of ports: the host binds ports
            // anywhere, and the kernel's automatic range is a per-namespace
            // setting.
            None if host_side && host_socket(ctx, key) != NO_SOCKET => {}
            None => return Some(port.to_be()),
            // This very flow's reply entry (its forward entry expired or
            // was evicted alone): its port stays.
            // SAFETY: a pointer into the map value, valid for this run.
            Some(entry) if conntrack::is_reply_of(unsafe { &*entry }, pkt) => {
                return Some(port.to_be());
            }
            Some(_) => {}
        }
        // Another port in the ephemeral range (7919 is prime to its size:
        // the steps reach every port).
        port = (EPHEMERAL_START + spread.wrapping_add(attempt * 7919) % EPHEMERAL_PORTS) as u16;
    }
    None
}

/// Linux's default ephemeral range, 32768–60999.
const EPHEMERAL_START: u32 = 32_768;
const EPHEMERAL_PORTS: u32 = 28_232;

/// Where in the ephemeral range a client's other ports start: a mix of its
/// address and port. Deterministic, so that two CPUs starting the same
/// flow at once settle on the same port.
#[inline(always)]
fn spread(client: &Addr, port: u16) -> u32 {
    let mut mix = u32::from(port);
    for word in client.words {
        mix = (mix ^ word).wrapping_mul(0x9e37_79b1);
        mix ^= mix >> 15;
    }
    mix
}
