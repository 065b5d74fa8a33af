//! What the TC programs do with a packet once it is decided: count it,
//! send it on (redirected, or to the stack), mark a translated reply. Used
//! by `tc` and by the modules it calls (`icmp`, `reply`), which import this
//! rather than `tc`: no import cycle.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup},
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_load_bytes,
    },
    programs::TcContext,
};
use portfwd_common::{Stat, TRANSLATED_MARK};

use crate::{
    clock,
    maps::{NEXT_HOP_SLOTS, NEXT_HOPS, STATS, is_peer_link},
    packet::{
        AF_INET, AF_INET6, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, FibParams, IPV4_DADDR_OFF,
        IPV4_SADDR_OFF, IPV6_DADDR_OFF, IPV6_SADDR_OFF,
    },
};

/// `BPF_FIB_LOOKUP_OUTPUT`: a lookup as the host would send the packet out
/// by `params.ifindex`, not as a router would forward it in. (The helper
/// still answers only for an interface that forwards: without forwarding,
/// every packet takes the neighbour subsystem.)
const BPF_FIB_LOOKUP_OUTPUT: u32 = 1 << 1;

/// Not ours: let the next TC program (or the stack) have it.
pub(crate) const NEXT: i32 = TC_ACT_UNSPEC;
pub(crate) const DROP: i32 = TC_ACT_SHOT;

/// Sends a rewritten packet on: redirected to `ifindex` when known, else
/// back to the stack. Called with an `ifindex` at ingress only: a redirect
/// into the peer is refused (the packet dropped) at egress.
#[inline(always)]
pub(crate) fn deliver(ctx: &TcContext, ifindex: u32) -> i32 {
    if ifindex == 0 {
        count(Stat::ToStack);
        return TC_ACT_OK;
    }
    count(Stat::Redirected);
    redirect(ctx, ifindex)
}

/// Into the container's namespace when `ifindex` is a veth towards it
/// (`PEER_LINKS`) and the kernel knows the next hop's link-layer address:
/// the frame is addressed as the veth would carry it, then received there
/// in this same pass. Else through the neighbour subsystem, which routes,
/// resolves and fills in the link-layer header itself.
// Not inlined: its locals get a frame of their own, not more slots in
// `start_flow`'s, whose chain is at 6.1's 512-byte limit.
#[inline(never)]
fn redirect(ctx: &TcContext, ifindex: u32) -> i32 {
    if is_peer_link(ifindex) && address_frame(ctx, ifindex) {
        count(Stat::RedirectedToPeer);
        // The veth clears the mark of a packet it carries into another
        // namespace; a redirect into the peer does not (nor before 6.15
        // anything else `skb_scrub_packet` clears). The host's marks, ours
        // (`mark_translated`) among them, must not reach the container.
        // SAFETY: reading a context field, checked by the verifier.
        if unsafe { (*ctx.skb.skb).mark } != 0 {
            ctx.set_mark(0);
        }
        // SAFETY: plain arguments.
        return unsafe { bpf_redirect_peer(ifindex, 0) as i32 };
    }
    // SAFETY: no parameters: the kernel resolves the next hop itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// How long the Ethernet addresses of a frame to a destination, once
/// given by the FIB, are used without asking it again (`NEXT_HOPS`).
const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// Writes the Ethernet addresses the packet would get leaving by
/// `ifindex`: the next hop's (the kernel's neighbour entry for it, as
/// `bpf_redirect_neigh` would use) and the interface's own. A frame keeps
/// them into the container, where a bridge, a macvlan or a packet socket
/// may read them. False, the frame untouched, when the route to the
/// destination leaves by another interface, the neighbour is not (yet)
/// known or the interface does not forward: then the neighbour subsystem
/// must resolve it.
///
/// The FIB's answer is kept in the CPU's slot for the destination
/// (`NEXT_HOPS`) and used for a second: the lookup was a third of
/// `pf_tc_uplink_in`'s time on a packet into a container in real traffic
/// (about 250 of 850 ns). So a changed route or neighbour entry (a
/// container's interface given another address, which keeps its index)
/// reaches the frames within a second; the container's IP stack takes the
/// frames meanwhile (a packet redirected into the peer keeps the type it
/// had on the uplink, to this host). A recreated interface has another
/// index, and another slot.
#[inline(always)]
fn address_frame(ctx: &TcContext, ifindex: u32) -> bool {
    let mut storage = MaybeUninit::uninit();
    let params = FibParams::clear(&mut storage);
    // SAFETY: reading a context field, checked by the verifier.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    // The addresses as rewritten (and, after NAT46, of the new family),
    // loaded straight into `params`: copies would take another 32 bytes of
    // this frame, which ends `start_flow`'s chain. The source only when
    // the FIB is asked.
    // SAFETY: the unions' members are addresses, plain bytes: the IPv6
    // one's 16 bytes cover the IPv4 one.
    let (src, dst) = unsafe {
        (
            &mut *(&raw mut params.__bindgen_anon_3).cast::<[u8; 16]>(),
            &mut *(&raw mut params.__bindgen_anon_4).cast::<[u8; 16]>(),
        )
    };
    let v4 = protocol == u32::from(ETH_P_IP.to_be());
    let loaded = if v4 {
        params.family = AF_INET;
        load(ctx, ETH_HLEN + IPV4_DADDR_OFF, &mut dst[..4])
    } else if protocol == u32::from(ETH_P_IPV6.to_be()) {
        params.family = AF_INET6;
        load(ctx, ETH_HLEN + IPV6_DADDR_OFF, dst)
    } else {
        false
    };
    if !loaded {
        return false;
    }
    // SAFETY: the union's IPv6 member, four words, covers the IPv4 one
    // (the words after it are zero).
    let dst_words = unsafe { params.__bindgen_anon_4.ipv6_dst };
    let now = clock::now();
    let Some(slot) = NEXT_HOPS.get_ptr_mut(next_hop_slot(ifindex, &dst_words)) else {
        return false;
    };
    // SAFETY: a pointer into this CPU's map value, valid for this program
    // run; no other program runs on this CPU meanwhile.
    let slot = unsafe { &mut *slot };
    if slot.ifindex == ifindex
        && slot.family == params.family
        && slot.dst == dst_words
        && now.wrapping_sub(slot.learned_ns) <= NEXT_HOP_TTL_NS
    {
        return ctx.store(0, &slot.macs, 0).is_ok();
    }
    let loaded = if v4 {
        load(ctx, ETH_HLEN + IPV4_SADDR_OFF, &mut src[..4])
    } else {
        load(ctx, ETH_HLEN + IPV6_SADDR_OFF, src)
    };
    params.ifindex = ifindex;
    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = loaded
        && unsafe {
            fib_lookup(
                ctx.as_ptr(),
                params,
                size_of::<bpf_fib_lookup>() as i32,
                BPF_FIB_LOOKUP_OUTPUT,
            )
        } == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    if !rc || params.ifindex != ifindex {
        return false;
    }
    slot.macs[..6].copy_from_slice(&params.dmac);
    slot.macs[6..].copy_from_slice(&params.smac);
    slot.dst = dst_words;
    slot.family = params.family;
    slot.ifindex = ifindex;
    slot.learned_ns = now;
    ctx.store(0, &slot.macs, 0).is_ok()
}

/// The `NEXT_HOPS` slot of a destination leaving by `ifindex`: a
/// multiplicative hash of the address's outer words (an IPv4 address is
/// the first) and the index.
#[inline(always)]
fn next_hop_slot(ifindex: u32, dst: &[u32; 4]) -> u32 {
    (dst[0] ^ dst[3] ^ ifindex).wrapping_mul(0x9e37_79b1) >> (32 - NEXT_HOP_SLOTS.trailing_zeros())
}

/// Marks a reply that is redirected translated, so that the uplink's egress
/// program lets it go at once. Only a packet without a mark: another user's
/// mark is kept (that packet is then looked up at egress, and found
/// translated already).
#[inline(always)]
pub(crate) fn mark_translated(ctx: &TcContext) {
    // SAFETY: reading a context field, checked by the verifier.
    if unsafe { (*ctx.skb.skb).mark } == 0 {
        ctx.set_mark(TRANSLATED_MARK);
    }
}

/// Counts one packet under `stat` (per-CPU).
pub(crate) fn count(stat: Stat) {
    if let Some(value) = STATS.get_ptr_mut(stat.index()) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *value += 1 };
    }
}

/// `to.len()` bytes of the packet at `offset`. Not `TcContext::load_bytes`,
/// which asks for at most what the packet holds: a length the verifier
/// cannot tell from zero.
#[inline(always)]
fn load(ctx: &TcContext, offset: usize, to: &mut [u8]) -> bool {
    // SAFETY: `to` is writable for its length, which the helper checks
    // against the packet.
    unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            offset as u32,
            to.as_mut_ptr().cast(),
            to.len() as u32,
        ) == 0
    }
}
