//! New flows: a packet that matches no tracked flow opens one when it is a
//! SYN or a UDP datagram to a published port whose allowlist (if any)
//! admits its source.

use aya_ebpf::programs::TcContext;
use portfwd_common::{
    ALLOW_SERVICE_BITS, CtValue, IPPROTO_TCP, SERVICE_FLAG_HAS_ALLOWLIST,
    SERVICE_FLAG_REFUSE_SILENTLY, ServiceKey, Stat, TRACE_PATH_CONTAINERS, TRACE_PATH_UPLINK,
};

use super::{
    masquerade::masquerade_port,
    service::{Backend, find_service, forged_source, is_host_address, services_generation},
    translate::{add_connection, finish, finish_nat46, ifindex_of},
};
use crate::{
    clock, conntrack, fragments,
    maps::{ALLOW, SCRATCH},
    nat46,
    packet::{self, End, FIRST_FRAGMENT, Packet, TCP_ACK, TCP_SYN},
    reply, trace,
    verdict::{DROP, NEXT, count},
};

/// Counts a packet that could have been ours and tells `portfwd trace`.
// Not inlined: its locals stay out of `start_flow`'s frame.
#[inline(never)]
fn note(ctx: &TcContext, pkt: &Packet, masquerade: bool, stat: Stat) {
    count(stat);
    let path = if masquerade {
        TRACE_PATH_CONTAINERS
    } else {
        TRACE_PATH_UPLINK
    };
    trace::stat(ctx, pkt, path, stat);
}

pub(super) fn is_new_tcp(pkt: &Packet) -> bool {
    pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A packet that matches no tracked flow: a new flow if it opens one to a
/// published port. `closing`: the forward entry of the flow whose ports a
/// SYN reuses (`tc::ingress`), else null.
// Not inlined (nor are the other steps): each BPF function gets its own
// stack frame, and one frame holding every step's locals exceeds 512 bytes.
// Long on purpose: the verifier forces its shape. Its steps are already
// calls of their own where that helps the stack; cutting the rest into
// more calls would pass their values as more than five arguments (a BPF
// call's limit) or through scratch memory, and its 320-byte frame is the
// deepest chains' largest part. On 6.1, which rounds each frame up to 32
// bytes, program 32 + this 320 + `masquerade_port` 128 + `host_socket` 32
// is 512 of 512: nothing more fits below it, and the program's own frame
// must stay within 32 bytes (see `tc::ingress`).
#[inline(never)]
pub(super) fn start_flow(
    ctx: &TcContext,
    pkt: &Packet,
    masquerade: bool,
    closing: *mut CtValue,
) -> i32 {
    let opens = pkt.proto != IPPROTO_TCP || is_new_tcp(pkt);
    // From containers, an untracked TCP packet that opens nothing is a reply
    // on a socket-path connection: out at once, without a service lookup.
    if masquerade && !opens {
        return NEXT;
    }
    // Read before the mapping is: a removal after the lookup then comes
    // with a newer generation, and the flow looks its mapping up again.
    let generation = services_generation();
    let Some((service, backend)) = find_service(ctx, pkt) else {
        return NEXT;
    };
    // A source no host sends from (multicast, broadcast, unspecified): a
    // martian, which the kernel would drop. Translated, the container's
    // answer would go back to it (a NAT46 container sees the host's address
    // instead, and answers through the host to a multicast group).
    if pkt.martian_source() {
        note(ctx, pkt, masquerade, Stat::DroppedMartianSource);
        return DROP;
    }
    // From an uplink, a source that is one of the host's own addresses is
    // forged: its reply entry could capture the host's own connections.
    if !masquerade && is_host_address(pkt.family, &pkt.saddr) {
        note(ctx, pkt, masquerade, Stat::DroppedLocalSource);
        return DROP;
    }
    // Only a SYN opens a TCP flow. Anything else to a published port is a
    // flow conntrack lost (evicted or expired): counted, and left to the
    // host, which resets it.
    if !opens {
        note(ctx, pkt, masquerade, Stat::UntrackedMidflow);
        return NEXT;
    }
    // A source that the host routes through another interface: forged
    // (see `forged_source`), and dropped before the allowlist judges it or
    // a refusal answers it.
    if let Some(stat) = forged_source(ctx, pkt, masquerade) {
        note(ctx, pkt, masquerade, stat);
        return DROP;
    }
    match refused(ctx, pkt, masquerade, &service, &backend) {
        Refusal::Allowed => {}
        Refusal::Dropped => return DROP,
        Refusal::Answer => return reply::ANSWER,
    }
    // Between families, only IPv6 clients of IPv4 containers (`nat46`).
    let nat46 = backend.family != pkt.family;
    if nat46 {
        let verdict = nat46::start(ctx, pkt, &service);
        if verdict != nat46::TRANSLATE {
            return verdict;
        }
    }
    // The source the container will see: for a hairpin flow the dialed host
    // address, else the client itself; with a port that no other flow to
    // this container uses from that address, so that the reply keys never
    // clash. An external client keeps its own port unless another flow to
    // the same container (through another published port) has it: then it
    // gets another, as netfilter's NAT clash resolution does.
    // A NAT46 flow, the host's IPv4 address towards the container.
    let now = clock::now();
    // `Nat` in scratch memory, field by field: on the stack it made this
    // frame too large (see above).
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return NEXT;
    };
    let masq_addr = match (nat46, masquerade) {
        // SAFETY: per-CPU memory that only this program run uses, where
        // `nat46::start` left the source it found.
        (true, _) => unsafe { &(*scratch).nat46_source },
        (false, true) => &pkt.daddr,
        (false, false) => &pkt.saddr,
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let nat = unsafe { &mut (*scratch).nat };
    nat.backend = backend.addr;
    nat.backend_family = backend.family;
    nat.backend_port = backend.port;
    nat.backend_ifindex = backend.ifindex;
    // SAFETY: reading a context field, checked by the verifier.
    nat.client_ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The client's own port, unless `masquerade_port` says otherwise.
    nat.masq = None;
    nat.generation = generation;
    // A SYN reopening a closing flow takes its entries over when it can
    // (then its port is its own), else forgets them.
    let reopened = match (closing.is_null(), masquerade || nat46) {
        (true, _) => None,
        (false, false) => conntrack::reopen(pkt, closing, &service, nat),
        (false, true) => {
            conntrack::forget(pkt, closing);
            None
        }
    };
    let created = match reopened {
        Some(forward) => Ok(forward),
        None => {
            let Some(port) = masquerade_port(ctx, pkt, &backend, masq_addr) else {
                note(ctx, pkt, masquerade, Stat::RewriteFailed);
                return NEXT;
            };
            if masquerade || nat46 || port != pkt.sport {
                nat.masq = Some((*masq_addr, port));
            }
            conntrack::create(pkt, &service, nat, now)
        }
    };
    let Ok(forward) = created else {
        // Untracked, the replies could not be translated back: do not start.
        note(ctx, pkt, masquerade, Stat::RewriteFailed);
        return NEXT;
    };
    if pkt.fragment == FIRST_FRAGMENT {
        // SAFETY: the entry just inserted, in scratch memory.
        fragments::remember(
            pkt,
            unsafe { &*forward },
            backend.ifindex,
            ifindex_of(ctx),
            now,
        );
    }
    count(Stat::FlowNew);
    // SAFETY: the entry just inserted, in scratch memory.
    trace::flow_new(ctx, pkt, masquerade, unsafe { &*forward });
    add_connection(&service, pkt.len);
    if nat46 {
        // SAFETY: the entry just inserted, in scratch memory.
        return finish_nat46(ctx, pkt, unsafe { &*forward }, backend.ifindex, now);
    }
    if let Some((addr, port)) = nat.masq
        && !packet::rewrite(ctx, pkt, End::Source, &addr, port)
    {
        count(Stat::RewriteFailed);
        return DROP;
    }
    finish(
        ctx,
        pkt,
        End::Destination,
        &backend.addr,
        backend.port,
        backend.ifindex,
        now,
    )
}

#[repr(u8)]
enum Refusal {
    Allowed,
    /// Dropped silently (`--refuse drop`): counted and traced.
    Dropped,
    /// To be answered as a closed port would (`reply::refuse`).
    Answer,
}

/// Whether a new flow is refused by the mapping's source allowlist, which
/// judges the packet's source (for a hairpin flow, the container's own
/// address), and how. One lookup, only for mappings with a list.
// Not inlined, and the LPM key in scratch memory: with the key in a frame,
// either `start_flow`'s frame grows or this one, which calls `note` and the
// trace, makes the deepest chain reach the 512-byte limit.
#[inline(never)]
fn refused(
    ctx: &TcContext,
    pkt: &Packet,
    masquerade: bool,
    service: &ServiceKey,
    backend: &Backend,
) -> Refusal {
    if backend.flags & SERVICE_FLAG_HAS_ALLOWLIST == 0 {
        return Refusal::Allowed;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Refusal::Allowed;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let key = unsafe { &mut (*scratch).allow_key };
    key.prefix_len = ALLOW_SERVICE_BITS + 128;
    key.data.service = *service;
    key.data.client = pkt.saddr;
    if ALLOW.get(&*key).is_some() {
        return Refusal::Allowed;
    }
    if backend.flags & SERVICE_FLAG_REFUSE_SILENTLY == 0 {
        return Refusal::Answer;
    }
    note(ctx, pkt, masquerade, Stat::RefusedNotAllowed);
    Refusal::Dropped
}
