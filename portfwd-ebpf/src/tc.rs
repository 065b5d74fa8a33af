//! TC programs: external clients reaching a published port.
//!
//! - `pf_tc_uplink_in` (uplink ingress): a new TCP (SYN) or UDP flow to a
//!   published (address, port, protocol) gets its destination rewritten to
//!   the container and is tracked; later packets of tracked flows follow
//!   their entry. Rewritten packets are redirected straight to the
//!   container's interface when it is known, skipping the host's forwarding
//!   path (so `ip_forward` may be off).
//! - `pf_tc_backend_in` (ingress of the interface towards the containers):
//!   replies of tracked flows get their source rewritten back to the
//!   published address and are redirected to the uplink the flow came in on.
//! - `pf_tc_uplink_out` (uplink egress): the same reverse translation for
//!   replies that reached the uplink through the host's routing instead.
//!
//! Packets that are not ours go on untouched (TC_ACT_UNSPEC: the next
//! program or the stack decides), and every kind of untouched packet that
//! could have been ours is counted in the stats map.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, TC_ACT_OK, TC_ACT_SHOT,
        TC_ACT_UNSPEC, bpf_fib_lookup,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use portfwd_common::{
    Addr, CT_FLAG_CLOSING, CT_FLAG_REPLY, CtKey, CtValue, FAMILY_V4, IPPROTO_TCP, STAT_FLOW_NEW,
    STAT_FLOW_STOPPED, STAT_REDIRECTED, STAT_REWRITE_FAILED, STAT_TO_STACK, ServiceKey,
};

use crate::{
    conntrack,
    maps::{COUNTERS, SERVICES, STATS},
    packet::{self, End, Packet, TCP_ACK, TCP_SYN},
};

/// Not ours: let the next TC program (or the stack) have it.
const NEXT: i32 = TC_ACT_UNSPEC;
const PACKET_HOST: u32 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[classifier]
pub fn pf_tc_uplink_in(ctx: TcContext) -> i32 {
    // Frames not addressed to this host's MAC (promiscuous mode) are not ours.
    // SAFETY: reading a context field, checked by the verifier.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return NEXT;
    }
    let Some(pkt) = parse_or_count(&ctx) else {
        return NEXT;
    };
    let now = conntrack::now();
    let key = conntrack::key_of(&pkt);
    if let Some(entry) = conntrack::lookup(&key, now) {
        // SAFETY: a pointer into the map value, valid for this program run.
        let flags = unsafe { (*entry).flags };
        if flags & CT_FLAG_REPLY != 0 {
            // The container sits behind this uplink: its replies come in here.
            return translate_reply(&ctx, &pkt, &key, entry, true);
        }
        // A SYN on a closing flow is the client reusing its port: a new flow.
        if !(is_new_tcp(&pkt) && flags & CT_FLAG_CLOSING != 0) {
            return translate_forward(&ctx, &pkt, &key, entry);
        }
    }
    start_flow(&ctx, &pkt, now)
}

#[classifier]
pub fn pf_tc_backend_in(ctx: TcContext) -> i32 {
    reply_path(&ctx, true)
}

#[classifier]
pub fn pf_tc_uplink_out(ctx: TcContext) -> i32 {
    reply_path(&ctx, false)
}

fn reply_path(ctx: &TcContext, redirect: bool) -> i32 {
    let Ok(pkt) = packet::parse(ctx) else {
        return NEXT;
    };
    let key = conntrack::key_of(&pkt);
    match conntrack::lookup(&key, conntrack::now()) {
        // SAFETY: a pointer into the map value, valid for this program run.
        Some(entry) if unsafe { (*entry).flags } & CT_FLAG_REPLY != 0 => {
            translate_reply(ctx, &pkt, &key, entry, redirect)
        }
        _ => NEXT,
    }
}

fn parse_or_count(ctx: &TcContext) -> Option<Packet> {
    match packet::parse(ctx) {
        Ok(pkt) => Some(pkt),
        Err(reason) => {
            count(reason);
            None
        }
    }
}

fn is_new_tcp(pkt: &Packet) -> bool {
    pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A packet that matches no tracked flow: a new flow if it opens one to a
/// published port.
// Not inlined (nor are the other steps): each BPF function gets its own
// stack frame, and one frame holding every step's locals exceeds 512 bytes.
#[inline(never)]
fn start_flow(ctx: &TcContext, pkt: &Packet, now: u64) -> i32 {
    // Only a SYN opens a TCP flow: anything else without an entry belongs to
    // a connection of the host itself (or one we stopped).
    if pkt.proto == IPPROTO_TCP && !is_new_tcp(pkt) {
        return NEXT;
    }
    let Some((service, backend)) = find_service(ctx, pkt) else {
        return NEXT;
    };
    // No NAT between families: an IPv4 client cannot reach an IPv6 container.
    if backend.family != pkt.family {
        return NEXT;
    }
    // SAFETY: reading a context field, checked by the verifier.
    let uplink = unsafe { (*ctx.skb.skb).ifindex };
    if conntrack::create(
        pkt,
        &service,
        backend.addr,
        backend.port,
        backend.ifindex,
        uplink,
        now,
    )
    .is_err()
    {
        // Untracked, the replies could not be translated back: do not start.
        count(STAT_REWRITE_FAILED);
        return NEXT;
    }
    count(STAT_FLOW_NEW);
    if let Some(counters) = COUNTERS.get_ptr_mut(&service) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { (*counters).connections += 1 };
    }
    finish(
        ctx,
        pkt,
        End::Destination,
        &backend.addr,
        backend.port,
        backend.ifindex,
    )
}

struct Backend {
    addr: Addr,
    port: u16,
    family: u8,
    ifindex: u32,
}

/// The mapping for the packet's destination: exact address first, then the
/// family's wildcard when the destination is one of this host's addresses.
fn find_service(ctx: &TcContext, pkt: &Packet) -> Option<(ServiceKey, Backend)> {
    let exact = ServiceKey::new(pkt.family, pkt.daddr, pkt.dport, pkt.proto);
    // SAFETY: values are copied out at once (the map is not preallocated,
    // so a concurrent delete cannot recycle the element under us).
    if let Some(value) = unsafe { SERVICES.get(&exact) } {
        return Some((exact, backend_of(value)));
    }
    let wildcard = exact.wildcard();
    let value = unsafe { SERVICES.get(&wildcard) }?;
    if !is_local_destination(ctx, pkt) {
        return None;
    }
    Some((wildcard, backend_of(value)))
}

fn backend_of(value: &portfwd_common::ServiceValue) -> Backend {
    Backend {
        addr: value.addr,
        port: value.port,
        family: value.family,
        ifindex: value.ifindex,
    }
}

/// Asks the kernel's FIB whether the destination is this host (not a
/// snapshot of addresses that goes stale). A local destination is "not
/// forwarded". When forwarding is disabled on the interface the lookup
/// stops there; then the host routes nothing through it, so a packet that
/// reached us for a published port can only be for this host.
#[inline(never)]
fn is_local_destination(ctx: &TcContext, pkt: &Packet) -> bool {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) query.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = if pkt.family == FAMILY_V4 {
        AF_INET
    } else {
        AF_INET6
    };
    params.l4_protocol = pkt.proto;
    params.sport = pkt.sport;
    params.dport = pkt.dport;
    // SAFETY: reading a context field, checked by the verifier.
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if pkt.family == FAMILY_V4 {
        params.__bindgen_anon_3.ipv4_src = pkt.saddr.words[0];
        params.__bindgen_anon_4.ipv4_dst = pkt.daddr.words[0];
    } else {
        params.__bindgen_anon_3.ipv6_src = pkt.saddr.words;
        params.__bindgen_anon_4.ipv6_dst = pkt.daddr.words;
    }
    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 || rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64
}

/// The flow's mapping must still exist and still point at the same
/// container: `unmap` (or a remap) stops existing flows, not only new ones.
fn still_mapped(ct: &CtValue, backend: &Addr, backend_port: u16) -> bool {
    // SAFETY: the value is read at once.
    match unsafe { SERVICES.get(&ct.service) } {
        Some(value) => value.addr == *backend && value.port == backend_port,
        None => false,
    }
}

// The entry is used in place, not copied: the stack is limited to 512 bytes.
#[inline(never)]
fn translate_forward(ctx: &TcContext, pkt: &Packet, key: &CtKey, entry: *mut CtValue) -> i32 {
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &*entry };
    if !still_mapped(ct, &ct.nat_addr, ct.nat_port) {
        conntrack::remove(key, ct);
        count(STAT_FLOW_STOPPED);
        // Untouched, the packet meets no listener on the host: the client
        // gets a reset (TCP) or an ICMP error (UDP).
        return NEXT;
    }
    conntrack::touch(entry, pkt, conntrack::now());
    add_traffic(&ct.service, pkt.len, true);
    finish(
        ctx,
        pkt,
        End::Destination,
        &ct.nat_addr,
        ct.nat_port,
        ct.ifindex,
    )
}

#[inline(never)]
fn translate_reply(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtValue,
    redirect: bool,
) -> i32 {
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &*entry };
    if !still_mapped(ct, &pkt.saddr, pkt.sport) {
        conntrack::remove(key, ct);
        count(STAT_FLOW_STOPPED);
        // A reply of a stopped flow would reach the client from the
        // container's own address: drop it (counted above).
        return TC_ACT_SHOT as i32;
    }
    conntrack::touch(entry, pkt, conntrack::now());
    add_traffic(&ct.service, pkt.len, false);
    let ifindex = if redirect { ct.ifindex } else { 0 };
    finish(ctx, pkt, End::Source, &ct.nat_addr, ct.nat_port, ifindex)
}

/// Rewrites the packet and sends it on: redirected to `ifindex` through the
/// neighbour subsystem when known, else back to the stack.
// Inlined: a BPF-to-BPF call takes at most five arguments.
#[inline(always)]
fn finish(ctx: &TcContext, pkt: &Packet, end: End, addr: &Addr, port: u16, ifindex: u32) -> i32 {
    if packet::rewrite(ctx, pkt, end, addr, port).is_err() {
        // A half-rewritten packet must not leave: its checksums are wrong.
        count(STAT_REWRITE_FAILED);
        return TC_ACT_SHOT as i32;
    }
    if ifindex == 0 {
        count(STAT_TO_STACK);
        return TC_ACT_OK as i32;
    }
    count(STAT_REDIRECTED);
    // SAFETY: no parameters: the kernel resolves the next hop itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

fn add_traffic(service: &ServiceKey, bytes: u32, inbound: bool) {
    if let Some(counters) = COUNTERS.get_ptr_mut(service) {
        // SAFETY: per-CPU value, only this CPU writes it.
        let counters = unsafe { &mut *counters };
        if inbound {
            counters.packets_in += 1;
            counters.bytes_in += bytes as u64;
        } else {
            counters.packets_out += 1;
            counters.bytes_out += bytes as u64;
        }
    }
}

fn count(stat: u32) {
    if let Some(value) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *value += 1 };
    }
}
