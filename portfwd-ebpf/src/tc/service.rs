//! The mapping a packet is for: the services map, by exact address or by
//! the family's wildcard when the destination is one of the host's own.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_DIRECT, bpf_fib_lookup,
    },
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::TcContext,
};
use portfwd_common::{Addr, FAMILY_V4, IPPROTO_UDP, ServiceKey, ServiceValue, Stat};

pub(super) use crate::maps::is_host_address;
use crate::{
    maps::{CONTAINER_LINKS, PUBLISHED_PORTS, SERVICES, SERVICES_GEN, lacks_port, lists_link},
    packet::{AF_INET, AF_INET6, FibParams, Packet},
};

pub(super) struct Backend {
    pub(super) addr: Addr,
    pub(super) port: u16,
    pub(super) family: u8,
    /// `SERVICE_FLAG_*`.
    pub(super) flags: u8,
    pub(super) ifindex: u32,
}

/// The mapping for the packet's destination: exact address first, then the
/// family's wildcard when the destination is one of this host's addresses.
/// A port that no mapping publishes (`pf_published_ports`) is left after
/// one array read instead of the two hash lookups: most packets that match
/// no flow (the host's own traffic on an uplink, a container's datagrams to
/// the host) are to such ports.
// Inlined: called from `start_flow` and `tc::first_packet_too_big`, it
// would otherwise become a call of its own, and `start_flow`, this and
// `is_local_destination` would make a chain over the 512-byte stack.
#[inline(always)]
pub(super) fn find_service(ctx: &TcContext, pkt: &Packet) -> Option<(ServiceKey, Backend)> {
    // An unspecified destination is a martian; its key would be the
    // wildcard's.
    if pkt.daddr.is_unspecified()
        || lacks_port(&PUBLISHED_PORTS, pkt.proto, u16::from_be(pkt.dport))
    {
        return None;
    }
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

fn backend_of(value: &ServiceValue) -> Backend {
    Backend {
        addr: value.addr,
        port: value.port,
        family: value.family,
        flags: value.flags,
        ifindex: value.ifindex,
    }
}

/// Whether the destination is this host: the kernel's FIB does not forward
/// it, and it is one of the host's addresses (`pf_local_addrs`, kept
/// current by the port holder). Neither alone will do: "not forwarded" also
/// means broadcast, multicast or no route at all, and when forwarding is off
/// on the ingress interface the helper says so before it looks at the
/// route (though IPv6 may still forward through a per-interface
/// `force_forwarding`, kernel 6.17), so a packet routed through the host to
/// another machine would be taken for ours. The map is asked first: a
/// packet routed through the host to a port that a wildcard mapping
/// publishes is then left without the FIB lookup.
#[inline(never)]
fn is_local_destination(ctx: &TcContext, pkt: &Packet) -> bool {
    if !is_host_address(pkt.family, &pkt.daddr) {
        return false;
    }
    let mut storage = MaybeUninit::uninit();
    let params = FibParams::clear(&mut storage);
    // SAFETY: reading a context field, checked by the verifier.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    ask_about(params, pkt, ingress, Way::Onwards);
    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), params, size_of::<bpf_fib_lookup>() as i32, 0) };
    // "Not forwarded" also covers broadcast, multicast and "no route": the
    // host's addresses decided those above.
    rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 || rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64
}

/// Whether a new flow's source is forged, by where the host routes it: a
/// reverse-path check, as the kernel's `rp_filter` makes, on new flows only.
/// The FIB is asked for the source as if a packet to it came in where this
/// one did (`bpf_fib_lookup`, its `ifindex` the ingress one), in the table
/// of that interface (the main table, or its VRF's: `BPF_FIB_LOOKUP_DIRECT`)
/// without the routing rules, which choose where traffic goes, not where
/// an address lives: a rule sending a bridge's traffic through a VPN
/// (`iif`), or one that stops a rootless user's way in from forwarding
/// (`prohibit`), would otherwise answer for every source.
/// - From a container link, a source routed through any other interface
///   is not the container's (strict, as `rp_filter=1`): a co-tenant
///   sending in another client's name, to pass an allowlist or to have
///   the container answer that client (`dropped_spoofed_source`).
/// - From an uplink, a source routed to a container is (through any
///   interface towards containers, `pf_container_link_bits`): the
///   container's own packets come in on its link
///   (`dropped_container_source`). Any other source passes: routes that
///   differ between uplinks are common, and the kernel's default (loose)
///   check allows them too.
///
/// No route, a route to no interface (local, unreachable), forwarding off
/// on the interface (the FIB answers only for a forwarding interface) and
/// an IPv6 link-local source (which the FIB does not route: every link
/// has fe80::/64) decide nothing; nor does a test run, whose skb came in
/// on no interface.
// Not inlined: the query's 64 bytes stay out of `start_flow`'s frame,
// which is at 6.1's limit with the chain below it (see `start_flow`); this
// frame is not below that chain's deepest part.
#[inline(never)]
pub(super) fn forged_source(ctx: &TcContext, pkt: &Packet, from_containers: bool) -> Option<Stat> {
    // SAFETY: reading a context field, checked by the verifier.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut storage = MaybeUninit::uninit();
    let params = FibParams::clear(&mut storage);
    ask_about(params, pkt, ingress, Way::Back);
    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            params,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_DIRECT,
        )
    };
    // A missing neighbour entry comes after the route's interface is known
    // (on kernels before 6.2 without the fix's backport, the answer then
    // keeps the ingress index: such a source passes).
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return None;
    }
    let via = params.ifindex;
    if via == ingress {
        None
    } else if from_containers {
        Some(Stat::DroppedSpoofedSource)
    } else if lists_link(&CONTAINER_LINKS, via) {
        Some(Stat::DroppedContainerSource)
    } else {
        None
    }
}

/// Which way `ask_about` asks the FIB about a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Where the packet goes.
    Onwards,
    /// Where a packet back to its source would go: its ends swapped.
    Back,
}

/// Fills `params` (cleared) to ask the FIB about `pkt` the `way` given, as
/// if it came in on `ifindex`. Its `tot_len` is 1, not 0, which would check
/// this skb's length against the MTU of the FIB's interface (see
/// `verdict::next_hop`): the callers ask about routes, not sizes.
#[inline(always)]
fn ask_about(params: &mut bpf_fib_lookup, pkt: &Packet, ifindex: u32, way: Way) {
    let ((src, sport), (dst, dport)) = match way {
        Way::Onwards => ((&pkt.saddr, pkt.sport), (&pkt.daddr, pkt.dport)),
        Way::Back => ((&pkt.daddr, pkt.dport), (&pkt.saddr, pkt.sport)),
    };
    params.l4_protocol = pkt.proto;
    params.sport = sport;
    params.dport = dport;
    params.ifindex = ifindex;
    params.__bindgen_anon_1.tot_len = 1;
    if pkt.family == FAMILY_V4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src.words[0];
        params.__bindgen_anon_4.ipv4_dst = dst.words[0];
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = src.words;
        params.__bindgen_anon_4.ipv6_dst = dst.words;
    }
}

/// The services generation (`pf_services_gen`), truncated as flows keep it.
#[inline(always)]
pub(super) fn services_generation() -> u16 {
    SERVICES_GEN
        .get(0)
        .map_or(0, |generation| *generation as u16)
}

/// Whether UDP `addr:port` is published, by an exact or a wildcard mapping
/// (a port without its bit in `pf_published_ports` after one array read).
/// The wildcard counts for any source, not only the host's addresses: a
/// datagram routed through the host from another machine's address and
/// such a port gets an entry too, which is harmless (its replies go to
/// the host, which routes them, and skip the mapping lookup), whereas
/// asking `pf_local_addrs` would open a window after the host gains an
/// address, until the holder records it, in which a masqueraded
/// container's replies to that address would open a flow to the mapping.
#[inline(never)]
pub(super) fn publishes(family: u8, addr: &Addr, port: u16) -> bool {
    if lacks_port(&PUBLISHED_PORTS, IPPROTO_UDP, u16::from_be(port)) {
        return false;
    }
    let exact = ServiceKey::new(family, *addr, port, IPPROTO_UDP);
    // SAFETY: only the presence of the values is read.
    unsafe { SERVICES.get(&exact).is_some() || SERVICES.get(&exact.wildcard()).is_some() }
}

/// Whether a packet in a tracked flow's container's name (its reply
/// direction) that came in on the uplink of `ctx` can be the container's.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ContainerLink {
    /// The flow's mapping reaches its container through this very
    /// interface (a container behind an uplink): its packets come in here.
    This,
    /// Through another interface: the container's own packets come in on
    /// that one (to `pf_tc_backend_in`), so this one is forged. A forger
    /// on the client's link could otherwise answer a flow in the
    /// container's name (its first mark, `CT_FLAG_ANSWERED`) before the
    /// container did, or when it never does (stopped, or its listen queue
    /// full), and establish a spoofed flow with its own ACK.
    Other,
    /// Not known: the mapping knows no interface, or is gone (the flow's
    /// own check, `still_mapped`, then stops it), or the frame carries a
    /// VLAN tag: a container reached through a VLAN interface of this
    /// uplink sends its packets in here, tagged, under the VLAN
    /// interface's index in the mapping, and the programs cannot tell that
    /// from a forger's tag.
    Unknown,
}

#[inline(always)]
pub(super) fn container_link(ctx: &TcContext, service: &ServiceKey) -> ContainerLink {
    // SAFETY: reading context fields, checked by the verifier.
    let (ifindex, tagged) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).vlan_present != 0) };
    // SAFETY: the value is read at once.
    match unsafe { SERVICES.get(service) } {
        Some(mapping) if mapping.ifindex == ifindex => ContainerLink::This,
        Some(mapping) if mapping.ifindex != 0 && !tagged => ContainerLink::Other,
        _ => ContainerLink::Unknown,
    }
}
