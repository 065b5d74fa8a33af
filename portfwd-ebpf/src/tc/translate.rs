//! Packets of tracked flows (and later fragments of translated datagrams):
//! rewritten as their conntrack entry says and sent on.

use aya_ebpf::programs::TcContext;
use portfwd_common::{
    Addr, CT_FLAG_ANSWERED, CT_FLAG_ESTABLISHED, CT_FLAG_MASQ, CT_FLAG_NAT46, CT_FLAG_REPLY, CtKey,
    CtValue, FRAGMENT_FLAG_REPLY, IPPROTO_TCP, ServiceKey, Stat, TRACE_PATH_TC,
};

use super::service::services_generation;
use crate::{
    clock,
    conntrack::{self, Touched},
    fragments,
    maps::{COUNTERS, SERVICES},
    nat46,
    packet::{self, End, FIRST_FRAGMENT, LAST_FRAGMENT, Packet},
    trace,
    verdict::{DROP, NEXT, count, deliver, mark_translated},
};

/// The flow's mapping must still exist and still point at the same
/// container: `unmap` (or a remap) stops existing flows, not only new ones.
/// Looked up only when the services changed since the flow last checked
/// (userspace increments the generation after removing mappings).
#[inline(always)]
pub(super) fn still_mapped(ct: &mut CtValue, backend: &Addr, backend_port: u16) -> bool {
    let generation = services_generation();
    if ct.generation == generation {
        return true;
    }
    let mapped = maps_to(&ct.service, backend, backend_port);
    if mapped {
        ct.generation = generation;
    }
    mapped
}

/// Whether the mapping `service` exists and points at `backend`:`port`.
#[inline(always)]
fn maps_to(service: &ServiceKey, backend: &Addr, port: u16) -> bool {
    // SAFETY: the value is read at once.
    match unsafe { SERVICES.get(service) } {
        Some(value) => value.addr == *backend && value.port == port,
        None => false,
    }
}

/// Whether a client's SYN that found the forward entry `entry` opens a new
/// flow in its place (`tc::ingress`): the flow ended (see
/// `conntrack::port_reused_by_syn`), or its mapping no longer points at
/// its container (removed, or moved to another), where any packet of it
/// would stop it: the SYN then opens a flow to where the mapping points
/// now, at once.
// Not inlined: the flags and the lookup stay out of the program's frame,
// which starts `start_flow`'s chain, at 6.1's limit.
#[inline(never)]
pub(super) fn reopens(entry: *const CtValue) -> bool {
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &*entry };
    if conntrack::port_reused_by_syn(ct) {
        return true;
    }
    ct.flags & CT_FLAG_REPLY == 0
        && ct.generation != services_generation()
        && !maps_to(&ct.service, &ct.nat_addr, ct.nat_port)
}

// The entry is used in place, not copied: the stack is limited to 512 bytes.
#[inline(never)]
pub(super) fn translate_forward(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtValue,
) -> i32 {
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &mut *entry };
    let (backend, backend_port) = (ct.nat_addr, ct.nat_port);
    if !still_mapped(ct, &backend, backend_port) {
        conntrack::remove(key, ct, pkt.opening);
        count(Stat::FlowStopped);
        trace::stat(ctx, pkt, TRACE_PATH_TC, Stat::FlowStopped);
        // Untouched, the packet reaches the host: a TCP segment gets a
        // reset (from the held listener, or from no socket once the port
        // is no longer held); a datagram is dropped by the held socket, or
        // answered with an ICMP port unreachable once nothing holds it.
        return NEXT;
    }
    let touched = conntrack::touch(key, entry, pkt, pkt.now);
    // Not redirected: to the stack, which fragments it (`fragmented_by_stack`).
    let ifindex = ct.ifindex & pkt.redirect_mask;
    let verdict = send_translated(ctx, pkt, ct, ifindex, true);
    forget_if_ended(key, touched, pkt.opening);
    // The client's ACK of the container's answer completed the handshake
    // (`conntrack::touch` established the flow), or its datagram followed
    // the container's answer (`conntrack::answered`; a TCP forward entry is
    // never marked so): the flow moves to the main table.
    if pkt.opening
        && touched == Touched::Lives
        && ct.flags & (CT_FLAG_ESTABLISHED | CT_FLAG_ANSWERED) != 0
    {
        conntrack::promote(key, entry, pkt.now);
    }
    verdict
}

#[inline(never)]
pub(super) fn translate_reply(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtValue,
    redirect: bool,
) -> i32 {
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &mut *entry };
    if !still_mapped(ct, &pkt.saddr, pkt.sport) {
        conntrack::remove(key, ct, pkt.opening);
        count(Stat::FlowStopped);
        // A reply of a stopped flow would reach the client from the
        // container's own address: drop it (counted above).
        return DROP;
    }
    let touched = conntrack::touch(key, entry, pkt, pkt.now);
    // (TCP's answer is marked by `touch`.)
    if pkt.opening && pkt.proto != IPPROTO_TCP {
        conntrack::answered(key, ct);
    }
    let ifindex = if redirect { ct.ifindex } else { 0 };
    if ifindex != 0 {
        mark_translated(ctx);
    }
    let verdict = send_translated(ctx, pkt, ct, ifindex, false);
    forget_if_ended(key, touched, pkt.opening);
    verdict
}

/// Removes the entry of a flow whose last packet this was (see
/// `conntrack::Touched`; the other entry is gone already), once the packet
/// is translated: the entry's memory is the map's, and a removed element
/// may be reused at once.
#[inline(always)]
fn forget_if_ended(key: &CtKey, touched: Touched, opening: bool) {
    if touched == Touched::Ended {
        conntrack::remove_from(opening, key);
        count(Stat::FlowEnded);
    }
}

/// What both directions of a tracked flow do last: count the traffic,
/// remember a first fragment, apply (forward) or undo (reply) the hairpin
/// masquerade, then rewrite the NAT end and send the packet on.
/// `forward`: client to container, whose NAT end is the destination.
// Inlined into each caller: its frame stays theirs (no deeper chain).
#[inline(always)]
fn send_translated(
    ctx: &TcContext,
    pkt: &Packet,
    ct: &CtValue,
    ifindex: u32,
    forward: bool,
) -> i32 {
    if ct.flags & CT_FLAG_NAT46 != 0 {
        add_traffic(&ct.service, pkt.len, forward);
        return finish_nat46(ctx, pkt, ct, ifindex, pkt.now);
    }
    if pkt.fragment == FIRST_FRAGMENT {
        fragments::remember(pkt, ct, ifindex, ifindex_of(ctx), pkt.now);
    }
    add_traffic(&ct.service, pkt.len, forward);
    let (masquerade_end, nat_end) = if forward {
        (End::Source, End::Destination)
    } else {
        (End::Destination, End::Source)
    };
    if ct.flags & CT_FLAG_MASQ != 0
        && !packet::rewrite(ctx, pkt, masquerade_end, &ct.masq_addr, ct.masq_port)
    {
        count(Stat::RewriteFailed);
        return DROP;
    }
    finish(
        ctx,
        pkt,
        nat_end,
        &ct.nat_addr,
        ct.nat_port,
        ifindex,
        pkt.now,
    )
}

/// Rewrites the packet and sends it on: redirected to `ifindex` through the
/// neighbour subsystem when known, else back to the stack. `now`: the
/// packet's clock read.
// Inlined: a BPF-to-BPF call takes at most five arguments.
#[inline(always)]
pub(super) fn finish(
    ctx: &TcContext,
    pkt: &Packet,
    end: End,
    addr: &Addr,
    port: u16,
    ifindex: u32,
    now: u64,
) -> i32 {
    if !packet::rewrite(ctx, pkt, end, addr, port) {
        // A half-rewritten packet must not leave: its checksums are wrong.
        count(Stat::RewriteFailed);
        return DROP;
    }
    deliver(ctx, ifindex, now)
}

/// Translates a packet of a NAT46 flow to the other family and sends it
/// on (see `finish`); a packet that cannot be translated is dropped.
#[inline(always)]
pub(super) fn finish_nat46(
    ctx: &TcContext,
    pkt: &Packet,
    ct: &CtValue,
    ifindex: u32,
    now: u64,
) -> i32 {
    if !nat46::translate(ctx, pkt, ct) {
        return DROP;
    }
    deliver(ctx, ifindex, now)
}

/// A later fragment: translated like its datagram's first fragment, if that
/// was translated (see `fragments`); else passed and counted as `untracked`.
/// `redirect`: sent where the first went (ingress), or left to the stack.
#[inline(never)]
pub(super) fn translate_fragment(
    ctx: &TcContext,
    pkt: &Packet,
    untracked: Option<Stat>,
    redirect: bool,
) -> i32 {
    let now = clock::now();
    let Some(value) = fragments::lookup(pkt, ifindex_of(ctx), now) else {
        if let Some(stat) = untracked {
            count(stat);
        }
        return NEXT;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let value = unsafe { &*value };
    if !packet::rewrite_addresses(ctx, pkt, &value.saddr, &value.daddr) {
        count(Stat::RewriteFailed);
        return DROP;
    }
    let reply = value.flags & FRAGMENT_FLAG_REPLY != 0;
    if reply && redirect && value.ifindex != 0 {
        mark_translated(ctx);
    }
    add_traffic(&value.service, pkt.len, !reply);
    count(if reply {
        Stat::FragmentOut
    } else {
        Stat::FragmentIn
    });
    let ifindex = if redirect { value.ifindex } else { 0 };
    if pkt.fragment == LAST_FRAGMENT {
        fragments::forget(pkt);
    }
    deliver(ctx, ifindex, now)
}

/// The interface the packet is on (in at ingress, out at egress).
pub(super) fn ifindex_of(ctx: &TcContext) -> u32 {
    // SAFETY: reading a context field, checked by the verifier.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Counts a packet of the mapping's traffic (`inbound`: client to
/// container).
pub(super) fn add_traffic(service: &ServiceKey, bytes: u32, inbound: bool) {
    add_to_counters(service, bytes, inbound, 0);
}

/// Counts a new flow's first packet: a connection, and inbound traffic.
pub(super) fn add_connection(service: &ServiceKey, bytes: u32) {
    add_to_counters(service, bytes, true, 1);
}

/// One lookup of the mapping's counters per packet, even a flow's first.
#[inline(always)]
fn add_to_counters(service: &ServiceKey, bytes: u32, inbound: bool, connections: u64) {
    if let Some(counters) = COUNTERS.get_ptr_mut(service) {
        // SAFETY: per-CPU value, only this CPU writes it.
        let counters = unsafe { &mut *counters };
        counters.connections += connections;
        if inbound {
            counters.packets_in += 1;
            counters.bytes_in += bytes as u64;
        } else {
            counters.packets_out += 1;
            counters.bytes_out += bytes as u64;
        }
    }
}
