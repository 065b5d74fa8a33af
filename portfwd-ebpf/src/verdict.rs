//! What the TC programs do with a packet once it is decided: count it,
//! send it on (redirected, or to the stack), mark a translated reply. Used
//! by `tc` and by the modules it calls (`icmp`, `reply`), which import this
//! rather than `tc`: no import cycle.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use portfwd_common::{Stat, TRANSLATED_MARK};

use crate::{
    maps::{NEXT_HOP_SLOTS, NEXT_HOPS, PEER_LINKS, STATS, lists_link},
    packet::{
        AF_INET, AF_INET6, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, FibParams, IPV4_DADDR_OFF,
        IPV4_SADDR_OFF, IPV6_DADDR_OFF, IPV6_SADDR_OFF, store_words,
    },
    types::NextHop,
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
/// `now`: the packet's clock read (`clock::now`).
#[inline(always)]
pub(crate) fn deliver(ctx: &TcContext, ifindex: u32, now: u64) -> i32 {
    if ifindex == 0 {
        count(Stat::ToStack);
        return TC_ACT_OK;
    }
    count(Stat::Redirected);
    redirect(ctx, ifindex, now)
}

/// Into the container's namespace when `ifindex` is a veth towards it
/// (`PEER_LINKS`) and the kernel knows the next hop's link-layer address:
/// the frame is addressed as the veth would carry it, then received there
/// in this same pass. Else through the neighbour subsystem, which resolves
/// the next hop's link-layer address and fills in the header: told the
/// next hop when the FIB gave it (`next_hop`), so that the packet is not
/// routed again (a reply to an uplink saves the kernel's route lookup);
/// else the kernel routes it too.
// Not inlined: its locals get a frame of their own, not more slots in
// `start_flow`'s, whose chain is at 6.1's 512-byte limit.
#[inline(never)]
fn redirect(ctx: &TcContext, ifindex: u32, now: u64) -> i32 {
    let Some(hop) = next_hop(ctx, ifindex, now) else {
        // SAFETY: no parameters: the kernel routes and resolves itself.
        return unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 };
    };
    // SAFETY: a pointer into this CPU's map value, valid for this program
    // run; no other program runs on this CPU meanwhile.
    let hop = unsafe { &mut *hop };
    if lists_link(&PEER_LINKS, ifindex) && write_macs(ctx, &hop.macs) {
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
    // SAFETY: the next hop is a `bpf_redir_neigh` of the size passed.
    unsafe {
        bpf_redirect_neigh(
            ifindex,
            &mut hop.gateway,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

/// How long the FIB's answer for a packet's addresses and interface is
/// used without asking it again (`NEXT_HOPS`).
const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// Where a packet leaving by `ifindex` goes next, as the FIB says: the
/// next hop's address (a gateway, or the destination itself on the link)
/// and the Ethernet addresses of the frame (the kernel's neighbour entry
/// for the next hop, and the interface's own), which a frame into a
/// container keeps: a bridge, a macvlan or a packet socket there may read
/// them. None when the route to the destination leaves by another
/// interface, the neighbour is not (yet) known or the interface does not
/// forward: then the kernel must route and resolve it. The query is the
/// packet's addresses and the interface, so rules on the source take part,
/// rules on a mark, the TOS or the protocol do not. (The kernel's own
/// routing of the packet, which this spares, saw those; at TC ingress the
/// host's netfilter has not marked the packet yet, and a reply carries
/// portfwd's own mark.)
///
/// The answer is kept in the CPU's slot for the packet's addresses and
/// interface (`NEXT_HOPS`) and used for a second: the lookup was a third
/// of `pf_tc_uplink_in`'s time on a packet into a container in real
/// traffic (about 250 of 850 ns). So a changed route or neighbour entry (a
/// container's interface given another address, which keeps its index)
/// reaches the packets within a second; meanwhile the container's IP stack
/// takes their frames (a packet redirected into the peer keeps the type it
/// had on the uplink, to this host), and the neighbour subsystem still
/// resolves a next hop that changed its link-layer address. A recreated
/// interface has another index, and another slot.
#[inline(always)]
fn next_hop(ctx: &TcContext, ifindex: u32, now: u64) -> Option<*mut NextHop> {
    let mut storage = MaybeUninit::uninit();
    let params = FibParams::clear(&mut storage);
    // SAFETY: reading a context field, checked by the verifier.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    // The addresses as rewritten (and, after NAT46, of the new family),
    // loaded straight into `params`: copies would take another 32 bytes of
    // this frame, which ends `start_flow`'s chain.
    // SAFETY: the unions' members are addresses, plain bytes: the IPv6
    // one's 16 bytes cover the IPv4 one.
    let (src, dst) = unsafe {
        (
            &mut *(&raw mut params.__bindgen_anon_3).cast::<[u8; 16]>(),
            &mut *(&raw mut params.__bindgen_anon_4).cast::<[u8; 16]>(),
        )
    };
    // Read in place: the rewrite of a flow's packet made the headers up to
    // the TCP/UDP checksum linear (the helpers it calls pull them). A
    // packet whose addresses are not all in the linear part (a later IPv6
    // fragment whose source alone was rewritten may be one) is left to the
    // kernel, which routes it: slower, never wrong. Two helper calls fewer
    // per redirect.
    let family = if protocol == u32::from(ETH_P_IP.to_be()) {
        if !read_in_place(ctx, ETH_HLEN + IPV4_SADDR_OFF, &mut src[..4])
            || !read_in_place(ctx, ETH_HLEN + IPV4_DADDR_OFF, &mut dst[..4])
        {
            return None;
        }
        AF_INET
    } else if protocol == u32::from(ETH_P_IPV6.to_be()) {
        if !read_in_place(ctx, ETH_HLEN + IPV6_SADDR_OFF, src)
            || !read_in_place(ctx, ETH_HLEN + IPV6_DADDR_OFF, dst)
        {
            return None;
        }
        AF_INET6
    } else {
        return None;
    };
    // SAFETY: the unions' IPv6 members, four words, cover the IPv4 ones
    // (the words after them are zero).
    let (src_words, dst_words) = unsafe {
        (
            &params.__bindgen_anon_3.ipv6_src,
            &params.__bindgen_anon_4.ipv6_dst,
        )
    };
    let slot = NEXT_HOPS.get_ptr_mut(next_hop_slot(ifindex, src_words, dst_words))?;
    // SAFETY: a pointer into this CPU's map value, valid for this program
    // run; no other program runs on this CPU meanwhile.
    let hop = unsafe { &mut *slot };
    if hop.ifindex == ifindex
        && hop.family == family
        && hop.dst == *dst_words
        && hop.src == *src_words
        && now.wrapping_sub(hop.learned_ns) <= NEXT_HOP_TTL_NS
    {
        return (hop.answered != 0).then_some(slot);
    }
    // The slot is taken for these addresses before the FIB writes over
    // the destination in `params`, unanswered until it answers: fewer
    // values held across the call keep this frame within 6.1's stack.
    store_words(&mut hop.src, *src_words);
    store_words(&mut hop.dst, *dst_words);
    hop.family = family;
    hop.ifindex = ifindex;
    hop.answered = 0;
    hop.learned_ns = now;
    params.family = family;
    params.ifindex = ifindex;
    // Not 0, which would check this skb's length against the MTU of the
    // FIB's interface (kernels from 5.12 then compare this length
    // instead): one oversize packet would leave the slot unanswered for
    // the second. The length is the callers' concern: `reply::too_big`
    // checks the packets of tracked flows and most first packets; the
    // first datagram of a mapping with an allowlist, or of a NAT46 flow,
    // larger than the container's MTU goes into the peer, whose stack
    // takes it (before, the veth dropped it silently).
    params.__bindgen_anon_1.tot_len = 1;
    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            params,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    // No answer is remembered too, for the second: else each packet would
    // pay the lookup on top of the kernel's own routing. Except a neighbour
    // not known yet, which the kernel resolves for this very packet: the
    // next one asks again (a new container's first connection goes into
    // the peer from its second packet on).
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        hop.learned_ns = 0;
    }
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || params.ifindex != ifindex {
        return None;
    }
    hop.macs[..6].copy_from_slice(&params.dmac);
    hop.macs[6..].copy_from_slice(&params.smac);
    // The FIB wrote the next hop over the destination, and its family over
    // the query's (an IPv4 route through an IPv6 gateway).
    hop.gateway.nh_family = u32::from(params.family);
    // SAFETY: as above, the IPv6 member covers the IPv4 one.
    hop.gateway.__bindgen_anon_1.ipv6_nh = unsafe { params.__bindgen_anon_4.ipv6_dst };
    hop.answered = 1;
    Some(slot)
}

/// The `NEXT_HOPS` slot of a packet's addresses leaving by `ifindex`: a
/// multiplicative hash of the addresses' outer words (an IPv4 address is
/// the first) and the index.
#[inline(always)]
fn next_hop_slot(ifindex: u32, src: &[u32; 4], dst: &[u32; 4]) -> u32 {
    (src[0] ^ src[3] ^ dst[0] ^ dst[3] ^ ifindex).wrapping_mul(0x9e37_79b1)
        >> (32 - NEXT_HOP_SLOTS.trailing_zeros())
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

/// `to.len()` bytes of the packet's linear part at `offset`, if it holds
/// them. Not `packet::read`, whose load-helper fallback returns its value
/// through a temporary: 32 more bytes in this frame, which ends
/// `start_flow`'s chain, took it to 544 of 6.1's 512 bytes
/// (`every_programs_deepest_call_chain_fits_older_verifiers_stack`).
#[inline(always)]
fn read_in_place(ctx: &TcContext, offset: usize, to: &mut [u8]) -> bool {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + offset + to.len() > data_end {
        return false;
    }
    // SAFETY: inside the packet's linear part (checked just above).
    unsafe {
        core::ptr::copy_nonoverlapping((data + offset) as *const u8, to.as_mut_ptr(), to.len())
    };
    true
}

/// The frame's Ethernet addresses, written in place (the rewrite made the
/// header writable); false for a frame too short to hold them.
#[inline(always)]
fn write_macs(ctx: &TcContext, macs: &[u8; 12]) -> bool {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + macs.len() > data_end {
        return false;
    }
    // Three words, not one copy of 12 bytes: that was a call of `memmove`,
    // a byte loop (see `packet::store_words`). Unaligned: the frame's
    // alignment is the driver's.
    let (words, _) = macs.as_chunks::<4>();
    for (i, word) in words.iter().enumerate() {
        // SAFETY: inside the packet's linear part (checked just above).
        unsafe {
            (data as *mut u32)
                .add(i)
                .write_unaligned(u32::from_ne_bytes(*word))
        };
    }
    true
}
