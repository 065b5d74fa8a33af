//! TC programs: clients outside the host namespace reaching a published
//! port.
//!
//! - `uplink_in` (uplink ingress): a new TCP (SYN) or UDP flow to a
//!   published (address, port, protocol) gets its destination rewritten to
//!   the container and is tracked; later packets of tracked flows follow
//!   their entry. Rewritten packets are redirected straight to the
//!   container's interface when it is known, skipping the host's forwarding
//!   path (so `ip_forward` may be off).
//! - `backend_in` (ingress of the interface towards the containers):
//!   replies of tracked flows get their source rewritten back to the
//!   published address and are redirected to the interface the flow came in
//!   on. It also serves containers that dial a published address of the
//!   host (hairpin): like an external flow, but masqueraded to the dialed
//!   host address, so that the container answering replies through the
//!   host even when the client shares its link (a bridge) or is itself.
//! - `uplink_out` (uplink egress): the reverse translation for replies
//!   that reached the uplink through the host's routing instead. Replies
//!   that an ingress program translated and redirected carry
//!   `TRANSLATED_MARK`, and leave at once.
//!
//! Packets that are not ours go on untouched (TC_ACT_UNSPEC: the next
//! program or the stack decides), and every kind of untouched packet that
//! could have been ours is counted in the stats map.
//!
//! Split by concern: `flow` starts new flows (and judges the allowlist),
//! `service` finds a packet's mapping, `masquerade` picks a flow's source
//! port towards the container, `host_socket` finds the host's own socket
//! for a packet, `translate` rewrites packets of tracked flows and sends
//! them on, `icmp` translates ICMP errors about tracked flows; this module
//! holds the programs themselves. The imports go one way: this module →
//! `flow` → `masquerade` → `host_socket`, this module → `host_socket`,
//! `translate` → `service`, `icmp` → `translate`, `service`.

mod flow;
mod host_socket;
mod icmp;
mod masquerade;
mod service;
mod translate;

use core::ptr;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    programs::TcContext,
};
use portfwd_common::{
    CT_FLAG_HOST, CT_FLAG_MASQ, CT_FLAG_NAT46, CT_FLAG_REPLY, CtKey, CtValue, IPPROTO_TCP,
    IPPROTO_UDP, SERVICE_FLAG_HAS_ALLOWLIST, ServiceKey, Stat, TRACE_PATH_CONTAINERS,
    TRACE_PATH_UPLINK, TRANSLATED_MARK,
};

use self::{
    flow::{is_new_tcp, start_flow},
    host_socket::{host_socket, owns_packet},
    icmp::{ARRIVING_ON_CONTAINER_LINK, ARRIVING_ON_UPLINK, LEAVING, translate_error},
    service::{ContainerLink, container_link, find_service, is_host_address, publishes},
    translate::{reopens, translate_forward, translate_fragment, translate_reply},
};
use crate::{
    clock, conntrack, fragments,
    maps::{PUBLISHED_PORTS, SCRATCH, lacks_port},
    packet::{self, FIRST_FRAGMENT, Packet},
    reply, trace,
    verdict::{DROP, NEXT, count},
};

const PACKET_HOST: u32 = 0;
/// Frames up to this size are not checked against the MTU of the interface
/// they are redirected to: no IP link has a smaller one in practice (576 is
/// IPv4's minimum datagram every host accepts, plus Ethernet).
const TOO_BIG_CHECKED_FROM: u32 = 576 + 14;

pub(crate) fn uplink_in(ctx: TcContext) -> i32 {
    ingress(&ctx, false)
}

pub(crate) fn backend_in(ctx: TcContext) -> i32 {
    ingress(&ctx, true)
}

pub(crate) fn uplink_out(ctx: TcContext) -> i32 {
    routed_reply(&ctx)
}

/// Packets entering the host: tracked flows in either direction, and new
/// flows to published ports (masqueraded when they come from containers).
#[inline(always)]
fn ingress(ctx: &TcContext, from_containers: bool) -> i32 {
    // Frames not addressed to this host's MAC (promiscuous mode) are not ours.
    // SAFETY: reading a context field, checked by the verifier.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return NEXT;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return NEXT;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let (pkt, key) = unsafe { (&mut (*scratch).pkt, &mut (*scratch).flow_key) };
    let path = if from_containers {
        TRACE_PATH_CONTAINERS
    } else {
        TRACE_PATH_UPLINK
    };
    if let Err(verdict) = parse_or_count(ctx, pkt, path) {
        return verdict;
    }
    pkt.from_uplink = !from_containers;
    if pkt.is_later_fragment() {
        let untracked = if from_containers {
            Stat::PassFragmentFromContainers
        } else {
            Stat::PassFragment
        };
        return translate_fragment(ctx, pkt, Some(untracked), true);
    }
    conntrack::set_key(key, pkt);
    if from_containers && conntrack::holds_no_masq_flow() && to_host_service(pkt) {
        count(Stat::PassHostConnection);
        return NEXT;
    }
    // Every way to a new flow leaves this block with the closing flow's
    // entry (or null) and meets at one call of `new_flow`: the verifier
    // walks a function once per call instruction, and `start_flow`'s chain
    // is most of the program.
    let closing = 'tracked: {
        let Some((entry, now)) = conntrack::find(key) else {
            break 'tracked ptr::null_mut();
        };
        pkt.now = now;
        // A host connection that took the ends of a masqueraded flow whose
        // container end is gone: the host's.
        // SAFETY (both reads): a pointer into the map value, valid for this
        // program run.
        if from_containers
            && unsafe { (*entry).flags } & CT_FLAG_MASQ != 0
            && owned_by_host_socket(ctx, pkt, key)
        {
            count(Stat::PassHostConnection);
            return NEXT;
        }
        // Read after the call, not kept across it (nor is the time, which
        // the packet holds): one more value live across it took one more
        // slot of this frame, at 6.1's limit (see below).
        let flags = unsafe { (*entry).flags };
        // A reply to what the host itself sent from a published port (see
        // `routed_reply`): the host's, not a new flow.
        if flags & CT_FLAG_HOST != 0 {
            conntrack::refresh(entry, pkt.now);
            return NEXT;
        }
        // A packet in the container's name from an uplink is checked before
        // anything of the flow is asked or refreshed.
        // SAFETY: a pointer into the map value, valid for this program run
        // (a map value is a valid key).
        if !from_containers
            && flags & CT_FLAG_REPLY != 0
            && forged_in_containers_name(ctx, pkt, unsafe { &(*entry).service })
        {
            return DROP;
        }
        let syn = is_new_tcp(pkt);
        // A SYN on a flow that ended is the client reusing its port, which
        // no live socket of its holds; on a flow whose mapping moved, one
        // for the mapping's new place: a new flow, which takes the old
        // one's entries over or forgets them (`conntrack::reopen`), with
        // or without its other entry. On any other flow it passes on and
        // changes nothing (`conntrack::port_reused_by_syn`).
        if syn && reopens(entry) {
            break 'tracked entry;
        }
        // A flow that lost its other entry (evicted, or expired alone) is
        // forgotten and started again by this packet.
        if conntrack::orphaned(key, entry, pkt, syn) {
            break 'tracked ptr::null_mut();
        }
        // Larger than the interface it goes to: answered, as the
        // forwarding path would (only large packets pay the check), or
        // left to the stack to fragment.
        // The interface and the flags are read from the entry again after
        // calls, not kept: one more value live across them took one more
        // slot of this frame, which starts `start_flow`'s chain, at 6.1's
        // limit. They are the ones an entry keeps (its interface, the
        // direction, masquerade, NAT46).
        // SAFETY (all three reads): a pointer into the map value, valid
        // for this program run.
        let ifindex = unsafe { (*entry).ifindex };
        pkt.redirect_mask = u32::MAX;
        if ifindex != 0
            && pkt.len > TOO_BIG_CHECKED_FROM
            && let Some(verdict) = reply::too_big(ctx, pkt, path, ifindex)
        {
            if verdict != reply::FRAGMENT {
                return verdict;
            }
            if fragmented_by_stack(ctx, pkt, unsafe { (*entry).flags }, path) {
                pkt.redirect_mask = 0;
            }
        }
        if unsafe { (*entry).flags } & CT_FLAG_REPLY != 0 {
            if pkt.redirect_mask == 0 {
                return NEXT;
            }
            return translate_reply(ctx, pkt, key, entry, true);
        }
        return translate_forward(ctx, pkt, key, entry);
    };
    new_flow(ctx, pkt, path, from_containers, closing)
}

/// Whether a packet in the container's name (a flow's reply direction) that
/// came in on an uplink is forged: it is unless the flow's mapping reaches
/// its container through that uplink (`ContainerLink`), and then it is
/// counted and traced. From there, it is the container's as from any
/// container link, and its SYN-ACK may set the container's mark
/// (`conntrack::touch`).
// Not inlined: the trace's locals would take slots of the ingress frame,
// which starts `start_flow`'s chain, at 6.1's 512-byte limit.
#[inline(never)]
fn forged_in_containers_name(ctx: &TcContext, pkt: &mut Packet, service: &ServiceKey) -> bool {
    match container_link(ctx, service) {
        ContainerLink::Other => {
            count(Stat::DroppedContainerSource);
            trace::stat(ctx, pkt, TRACE_PATH_UPLINK, Stat::DroppedContainerSource);
            true
        }
        ContainerLink::This => {
            pkt.from_uplink = false;
            false
        }
        ContainerLink::Unknown => false,
    }
}

/// Whether a packet from a container has the shape of one of an exchange
/// of the host's own: to a host address, on a port that no mapping
/// publishes, and no TCP SYN (which opens a flow or none, and goes on to
/// the conntrack). That is a host process that dialed a published port
/// through the socket path, or the container dialing a host service (its
/// DNS queries to the host's resolver, say). A packet to a port that may
/// be published goes on to the conntrack too: a datagram there may open a
/// hairpin flow, or be one's, and a TCP socket there is a leftover of an
/// earlier service (`map` binds over it), whose ends a hairpin flow to the
/// published port may take again once the container's end is gone (the
/// host's in CLOSE_WAIT). The host's own connections dial from ports its
/// stack chose, never a port the holder binds.
///
/// Only a masqueraded flow's reply entry (hairpin, NAT46) has that shape:
/// a host address, and a port that no mapping publishes as its
/// destination. While the table holds none (`holds_no_masq_flow`, the
/// sweep's finding), such a packet leaves before the conntrack lookup;
/// that saves the lookup on every packet of the local path's connections
/// and exchanges.
#[inline(always)]
fn to_host_service(pkt: &Packet) -> bool {
    !is_new_tcp(pkt)
        && lacks_port(&PUBLISHED_PORTS, pkt.proto, u16::from_be(pkt.dport))
        && is_host_address(pkt.family, &pkt.daddr)
}

/// For a container's packet that a masqueraded flow's entry matched:
/// whether it is of the host's own exchange (`to_host_service`) and a host
/// TCP socket owns it beyond doubt (`owns_packet`), which the flow's entry
/// then does not take. No flow starts with a host socket's ends (a hairpin
/// or NAT46 flow's port towards the container is one that no host socket
/// uses, `masquerade_port`), but a host connection may take a flow's ends
/// once the container's end of the flow is gone, before its entries are.
/// Asked only on such a hit, not before the lookup: the socket lookup cost
/// more than the conntrack's miss (in `bench --prog`, a container's packet
/// to a host port that neither holds went from 262 to 139 ns, a host
/// connection's from 175 to 138), and a hit is a hairpin or NAT46 flow's
/// reply, which paid the socket lookup before as well.
// Not inlined: with it, `pf_tc_backend_in` kept the packet's protocol in
// one more slot of its frame, which starts `start_flow`'s chain, at 6.1's
// limit (see `tc::flow::start_flow`).
#[inline(never)]
fn owned_by_host_socket(ctx: &TcContext, pkt: &Packet, key: &CtKey) -> bool {
    pkt.proto == IPPROTO_TCP
        && to_host_service(pkt)
        && owns_packet(host_socket(ctx, key), pkt.tcp_flags)
}

/// A packet that matches no tracked flow (`start_flow`), or a SYN that
/// reuses the ports of the closing flow whose forward entry is `closing`
/// (else null). A large one is first checked against the MTU of the
/// container's link, as packets of tracked flows are (see
/// `first_packet_too_big`).
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    pkt: &mut Packet,
    path: u8,
    from_containers: bool,
    closing: *mut CtValue,
) -> i32 {
    pkt.redirect_mask = u32::MAX;
    if pkt.len > TOO_BIG_CHECKED_FROM
        && let Some(verdict) = first_packet_too_big(ctx, pkt, path, from_containers)
    {
        if verdict != reply::FRAGMENT {
            return verdict;
        }
        if !from_containers {
            pkt.redirect_mask = 0;
        }
    }
    let verdict = answer_refused(
        ctx,
        pkt,
        path,
        start_flow(ctx, pkt, from_containers, closing),
    );
    // Read back from memory, not kept as a bool: with a bool, the compiler
    // wrote `start_flow`'s call twice (one for each value), and the
    // verifier walks it once per call instruction.
    // SAFETY: a field of the packet's per-CPU memory.
    let to_stack = unsafe { ptr::read_volatile(&pkt.redirect_mask) } == 0;
    // Translated towards the container, it goes to the stack instead, to be
    // fragmented (see `fragmented_by_stack`): the redirect that
    // `start_flow` asked for is not used when the verdict is not
    // TC_ACT_REDIRECT.
    if to_stack && verdict == TC_ACT_REDIRECT {
        count(Stat::TooBigToStack);
        trace::stat(ctx, pkt, path, Stat::TooBigToStack);
        // Its datagram's later fragments follow it (`start_flow`
        // remembered the redirect).
        if pkt.fragment == FIRST_FRAGMENT {
            fragments::to_stack(pkt);
        }
        return TC_ACT_OK;
    }
    verdict
}

/// For the first packet of a new flow (a SYN, a UDP datagram) larger than
/// the MTU of its container's link: `reply::too_big`'s answer, before any
/// flow exists (the sender retries smaller, and that opens the flow), or
/// `reply::FRAGMENT`. Only where the answer gives nothing away: a mapping
/// with an allowlist is not checked (its refusal must come first, and it
/// lives in `start_flow`'s frame), nor a NAT46 flow (the container's IPv4
/// link against an IPv6 packet), nor a forged host source from an uplink
/// (`start_flow` drops it). None: it fits, or it is not checked.
// Not inlined: the mapping lookup's locals stay out of the program's frame.
#[inline(never)]
fn first_packet_too_big(
    ctx: &TcContext,
    pkt: &Packet,
    path: u8,
    from_containers: bool,
) -> Option<i32> {
    if pkt.proto == IPPROTO_TCP && !is_new_tcp(pkt) {
        return None;
    }
    let (_, backend) = find_service(ctx, pkt)?;
    if backend.ifindex == 0
        || backend.family != pkt.family
        || backend.flags & SERVICE_FLAG_HAS_ALLOWLIST != 0
        || (!from_containers && is_host_address(pkt.family, &pkt.saddr))
    {
        return None;
    }
    reply::too_big(ctx, pkt, path, backend.ifindex)
}

/// `start_flow`'s verdict, or for a client the allowlist refuses with an
/// answer, the answer (built here, not in `start_flow`'s deep frame).
#[inline(always)]
fn answer_refused(ctx: &TcContext, pkt: &Packet, path: u8, verdict: i32) -> i32 {
    if verdict == reply::ANSWER {
        return reply::refuse(ctx, pkt, path);
    }
    verdict
}

/// Whether an IPv4 packet without DF, too big for the interface it would be
/// redirected to (`reply::FRAGMENT`), goes to the host's stack instead,
/// whose forwarding path fragments it as a router does (a redirect skips
/// that path, and the link would drop the packet). Towards a container it
/// is translated first; towards a client it goes untranslated: translated,
/// its source would be the host's own (published) address, a martian on
/// input, so the stack forwards the container's packet and the uplink's
/// egress program translates the fragments, as every routed reply. Needs
/// forwarding on the interface it came in on (else the stack drops it, as
/// the link did). Not for hairpin (masqueraded) flows, whose translated
/// source is the host's too and whose replies the stack would deliver
/// locally, nor for NAT46 ones: those are redirected as before.
// Not inlined: its locals stay out of the program's frame.
#[inline(never)]
fn fragmented_by_stack(ctx: &TcContext, pkt: &Packet, flags: u8, path: u8) -> bool {
    if flags & (CT_FLAG_MASQ | CT_FLAG_NAT46) != 0 {
        return false;
    }
    count(Stat::TooBigToStack);
    trace::stat(ctx, pkt, path, Stat::TooBigToStack);
    true
}

/// Uplink egress: replies that reached the uplink through the host's
/// routing rather than a redirect.
fn routed_reply(ctx: &TcContext) -> i32 {
    // Translated at ingress and redirected here: nothing left to do. The
    // mark was ours (set on a packet that had none): cleared.
    // SAFETY: reading a context field, checked by the verifier.
    if unsafe { (*ctx.skb.skb).mark } == TRANSLATED_MARK {
        ctx.set_mark(0);
        return NEXT;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return NEXT;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let (pkt, key) = unsafe { (&mut (*scratch).pkt, &mut (*scratch).flow_key) };
    if let Err(reason) = packet::parse(ctx, pkt) {
        // An ICMP error the host's stack sends about a client's translated
        // packet: translated back to the client's view.
        if reason == Stat::PassNotTcpUdp
            && let Some(verdict) = translate_error::<LEAVING>(ctx)
        {
            return verdict;
        }
        return NEXT;
    }
    if pkt.is_later_fragment() {
        // Egress sees all the host's traffic: untracked fragments are not
        // counted here.
        return translate_fragment(ctx, pkt, None, false);
    }
    conntrack::set_key(key, pkt);
    match conntrack::find(key) {
        // SAFETY: a pointer into the map value, valid for this program run.
        Some((entry, now)) if unsafe { (*entry).flags } & CT_FLAG_REPLY != 0 => {
            pkt.now = now;
            translate_reply(ctx, pkt, key, entry, false)
        }
        Some(_) => NEXT,
        // A UDP datagram the host sends from a published port: a container
        // masqueraded by the host's own NAT, which kept its source port (the
        // kernel's automatic ports may be published ones). Its replies will
        // come to that port and must reach the host's NAT, not the mapping.
        // (TCP needs nothing: only a SYN opens a flow, and a reply is none.)
        None if pkt.proto == IPPROTO_UDP && publishes(pkt.family, &pkt.saddr, pkt.sport) => {
            conntrack::pass_replies_to(pkt, clock::now());
            NEXT
        }
        None => NEXT,
    }
}

/// Parses into `pkt`; for a packet that is not ours, the verdict: passed
/// untouched and counted, or dropped when it carries a loopback address.
/// An ICMP error about a translated flow is translated (`icmp`).
fn parse_or_count(ctx: &TcContext, pkt: &mut Packet, path: u8) -> Result<(), i32> {
    packet::parse(ctx, pkt).map_err(|reason| {
        if reason == Stat::PassNotTcpUdp {
            let translated = if path == TRACE_PATH_UPLINK {
                translate_error::<ARRIVING_ON_UPLINK>(ctx)
            } else {
                translate_error::<ARRIVING_ON_CONTAINER_LINK>(ctx)
            };
            if let Some(verdict) = translated {
                return verdict;
            }
        }
        count(reason);
        if reason == Stat::DroppedLoopback {
            trace::stat(ctx, pkt, path, reason);
            DROP
        } else {
            NEXT
        }
    })
}
