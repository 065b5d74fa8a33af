//! Events for `portfwd trace`, written into the `pf_trace` ring buffer
//! while the `pf_trace_on` switch is on, and only for the events and
//! packets its filters pass. Off, an event costs one array lookup; events
//! are rare anyway (new flows, drops, packets passed untranslated), never
//! per packet of a tracked flow. A full ring buffer drops the event and
//! counts it (`trace_events_lost`): tracing never slows the data path.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    programs::TcContext,
};
use portfwd_common::{
    Addr, CT_FLAG_MASQ, CtValue, DialedSlot, ServiceKey, Stat, TRACE_FLOW_NEW,
    TRACE_PATH_CONTAINERS, TRACE_PATH_UPLINK, TRACE_SOCKET, TRACE_STAT, TraceEvent,
};

use crate::{
    maps::{STATS, TRACE, TRACE_ON},
    packet::{Packet, store_words},
};

/// Whether an event about `pkt` is wanted now.
#[inline(always)]
fn wanted(pkt: &Packet, is_drop: bool) -> bool {
    let Some(config) = TRACE_ON.get(0) else {
        return false;
    };
    config.enabled == 1
        && (config.port == 0 || config.port == pkt.sport || config.port == pkt.dport)
        && (config.proto == 0 || config.proto == pkt.proto)
        && (config.drops_only == 0 || is_drop)
}

/// A reserved event with the packet's tuple filled in, or None (not wanted,
/// or no room: counted).
#[inline(always)]
fn event(
    ctx: &TcContext,
    pkt: &Packet,
    kind: u8,
    path: u8,
    is_drop: bool,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<TraceEvent>> {
    if !wanted(pkt, is_drop) {
        return None;
    }
    let Some(mut entry) = TRACE.reserve::<TraceEvent>(0) else {
        if let Some(lost) = STATS.get_ptr_mut(Stat::TraceLost.index()) {
            // SAFETY: per-CPU value, only this CPU writes it.
            unsafe { *lost += 1 };
        }
        return None;
    };
    // The entry is ring buffer memory: written field by field, no copy on
    // the stack.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, writable TraceEvent.
    unsafe {
        (*e).time_ns = bpf_ktime_get_ns();
        (*e).saddr = pkt.saddr;
        (*e).daddr = pkt.daddr;
        store_words(&mut (*e).nat_addr.words, [0; 4]);
        store_words(&mut (*e).masq_addr.words, [0; 4]);
        (*e).sport = pkt.sport;
        (*e).dport = pkt.dport;
        (*e).nat_port = 0;
        (*e).masq_port = 0;
        (*e).kind = kind;
        (*e).family = pkt.family;
        (*e).proto = pkt.proto;
        (*e).path = path;
        (*e).stat = 0;
        (*e).ifindex = (*ctx.skb.skb).ifindex;
        (*e).pid = 0;
    }
    Some(entry)
}

/// A new flow, translated as its forward entry says (`from_containers`: a
/// hairpin flow, masqueraded).
#[inline(never)]
pub(crate) fn flow_new(ctx: &TcContext, pkt: &Packet, from_containers: bool, forward: &CtValue) {
    let path = if from_containers {
        TRACE_PATH_CONTAINERS
    } else {
        TRACE_PATH_UPLINK
    };
    let Some(mut entry) = event(ctx, pkt, TRACE_FLOW_NEW, path, false) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, writable TraceEvent.
    unsafe {
        (*e).nat_addr = forward.nat_addr;
        (*e).nat_port = forward.nat_port;
        (*e).stat = forward.flags as u32;
        if forward.flags & CT_FLAG_MASQ != 0 {
            (*e).masq_addr = forward.masq_addr;
            (*e).masq_port = forward.masq_port;
        }
    }
    entry.submit(0);
}

/// A packet counted under `stat`: dropped, or passed untranslated though
/// it could have been ours.
#[inline(never)]
pub(crate) fn stat(ctx: &TcContext, pkt: &Packet, path: u8, stat: Stat) {
    // Every stat traced is a drop or a packet passed untranslated (a
    // stopped flow's packet goes on untouched).
    let Some(mut entry) = event(ctx, pkt, TRACE_STAT, path, true) else {
        return;
    };
    // SAFETY: `e` points to a reserved, writable TraceEvent.
    unsafe { (*entry.as_mut_ptr()).stat = stat.index() };
    entry.submit(0);
}

/// A host socket's destination, translated at connect() or at an
/// unconnected UDP send (`path`): `slot` holds what was dialed and where it
/// now goes.
pub(crate) fn socket(proto: u8, path: u8, slot: &DialedSlot) {
    socket_event(proto, path, slot, false);
}

/// A host process's connect() or send to `key` refused by the mapping's
/// allowlist (the syscall fails with EPERM): a drop, shown with `--drops`.
#[inline(never)]
pub(crate) fn socket_refused(proto: u8, path: u8, key: &ServiceKey) {
    let slot = DialedSlot {
        dialed: key.addr,
        backend: Addr::UNSPECIFIED,
        dialed_port: key.port,
        backend_port: 0,
        family: key.family,
        _pad: [0; 3],
    };
    socket_event(proto, path, &slot, true);
}

#[inline(never)]
fn socket_event(proto: u8, path: u8, slot: &DialedSlot, refused: bool) {
    let Some(config) = TRACE_ON.get(0) else {
        return;
    };
    let wanted = config.enabled == 1
        && (config.drops_only == 0 || refused)
        && (config.port == 0
            || config.port == slot.dialed_port
            || config.port == slot.backend_port)
        && (config.proto == 0 || config.proto == proto);
    if !wanted {
        return;
    }
    let Some(mut entry) = TRACE.reserve::<TraceEvent>(0) else {
        if let Some(lost) = STATS.get_ptr_mut(Stat::TraceLost.index()) {
            // SAFETY: per-CPU value, only this CPU writes it.
            unsafe { *lost += 1 };
        }
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, writable TraceEvent.
    unsafe {
        (*e).time_ns = bpf_ktime_get_ns();
        (*e).saddr = Addr::UNSPECIFIED;
        (*e).daddr = slot.dialed;
        (*e).nat_addr = slot.backend;
        (*e).masq_addr = Addr::UNSPECIFIED;
        (*e).sport = 0;
        (*e).dport = slot.dialed_port;
        (*e).nat_port = slot.backend_port;
        (*e).masq_port = 0;
        (*e).kind = if refused { TRACE_STAT } else { TRACE_SOCKET };
        (*e).family = slot.family;
        (*e).proto = proto;
        (*e).path = path;
        (*e).stat = if refused {
            Stat::RefusedHostProcess.index()
        } else {
            0
        };
        (*e).ifindex = 0;
        (*e).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    }
    entry.submit(0);
}
