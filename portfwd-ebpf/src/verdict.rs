//! What the TC programs do with a packet once it is decided: count it,
//! send it on (redirected, or to the stack), mark a translated reply. Used
//! by `tc` and by the modules it calls (`icmp`, `reply`), which import this
//! rather than `tc`: no import cycle.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::{bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use portfwd_common::{Stat, TRANSLATED_MARK};

use crate::maps::{PEER_LINKS, STATS};

/// Not ours: let the next TC program (or the stack) have it.
pub(crate) const NEXT: i32 = TC_ACT_UNSPEC;
pub(crate) const DROP: i32 = TC_ACT_SHOT;

/// Sends a rewritten packet on: redirected to `ifindex` when known, else
/// back to the stack. Called with an `ifindex` at ingress only: a redirect
/// into the peer is refused (the packet dropped) at egress.
#[inline(always)]
pub(crate) fn deliver(ifindex: u32) -> i32 {
    if ifindex == 0 {
        count(Stat::ToStack);
        return TC_ACT_OK;
    }
    count(Stat::Redirected);
    redirect(ifindex)
}

/// Into the container's namespace when `ifindex` is a veth towards it
/// (`PEER_LINKS`): the packet is received there in this same pass, as if
/// the veth had carried it. Else through the neighbour subsystem, which
/// routes and fills in the link-layer header.
// Not inlined: the lookup's key gets its own frame, not one more slot in
// `start_flow`'s, whose chain is at 6.1's 512-byte limit.
#[inline(never)]
fn redirect(ifindex: u32) -> i32 {
    // SAFETY: the value is not read.
    if unsafe { PEER_LINKS.get(&ifindex) }.is_some() {
        count(Stat::RedirectedToPeer);
        // SAFETY: plain arguments.
        return unsafe { bpf_redirect_peer(ifindex, 0) as i32 };
    }
    // SAFETY: no parameters: the kernel resolves the next hop itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
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
