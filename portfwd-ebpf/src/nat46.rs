//! NAT46 on the TC path: IPv6 clients of an IPv4 container (a mapping on
//! an IPv6 host address, `[::]` included, to an IPv4 container: what dockerd
//! asks for when it publishes an IPv4-only container). The packet changes
//! family (`bpf_skb_change_proto`) and gets a fresh header; the container
//! sees the host's IPv4 address towards it as the source (`pf_nat46_src`),
//! with a port chosen as for hairpin flows, as docker-proxy's connections
//! would show it. Replies change back and reach the client from the
//! published address.
//!
//! What is not translated (counted as `dropped_nat46_untranslatable` and
//! dropped): fragments of either family (the translated datagram would need
//! a Fragment header, or lose one), IPv4 headers with options, and UDP
//! datagrams without a checksum: from the container (IPv6 requires one),
//! and from the client (one of 0 is invalid in IPv6, RFC 8200 8.1, and
//! would become IPv4's "no checksum", taken unchecked).
//! Hop limit and TTL are carried over unchanged, as the other paths keep
//! them: the host is the flow's endpoint, not a router on its way.
//!
//! The family switch lives here, in functions of their own: the deepest
//! call chain (`start_flow`) leaves them little stack.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use portfwd_common::{CtValue, FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP, ServiceKey, Stat};

use crate::{
    maps::{NAT46_SRC, SCRATCH},
    packet::{Packet, WHOLE, store_words},
    verdict::count,
};

const ETH_HLEN: usize = 14;
/// The ethertype's offset in the Ethernet header.
const ETH_TYPE_OFF: usize = 12;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPV4_DONT_FRAGMENT: u16 = 0x4000;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

/// `bpf_l4_csum_replace` flags (see `packet`).
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// `bpf_skb_store_bytes`: keep a CHECKSUM_COMPLETE skb's csum right.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;

/// `start`'s answer when the new flow is to be translated: no TC verdict.
pub(crate) const TRANSLATE: i32 = i32::MIN;

/// Whether a new flow from `pkt` to `service`, a mapping of the other
/// family, can be translated: `TRANSLATE`, with the host's IPv4 source for
/// it in scratch memory (`source`); else the verdict (counted). Only IPv6
/// clients of IPv4 containers are: the other way round is passed, as ever.
#[inline(never)]
pub(crate) fn start(ctx: &TcContext, pkt: &Packet, service: &ServiceKey) -> i32 {
    if pkt.family != FAMILY_V6 {
        return TC_ACT_UNSPEC;
    }
    if pkt.fragment != WHOLE || udp_without_checksum(ctx, pkt) != Ok(false) {
        count(Stat::DroppedNat46);
        return TC_ACT_SHOT;
    }
    // SAFETY: the value is copied out at once.
    let (Some(found), Some(scratch)) = (unsafe { NAT46_SRC.get(service) }, SCRATCH.get_ptr_mut(0))
    else {
        count(Stat::PassNat46NoSource);
        return TC_ACT_UNSPEC;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    unsafe { store_words(&mut (*scratch).nat46_source.words, found.words) };
    TRANSLATE
}

/// Translates a packet of a NAT46 flow (`CT_FLAG_NAT46`) to the other
/// family, as its entry `ct` says: an IPv6 packet from the client becomes
/// IPv4 from the masquerade source to the container; an IPv4 reply becomes
/// IPv6 from the published address to the client. False when the packet
/// must be dropped (counted).
#[inline(never)]
pub(crate) fn translate(ctx: &TcContext, pkt: &Packet, ct: &CtValue) -> bool {
    if pkt.fragment != WHOLE {
        count(Stat::DroppedNat46);
        return false;
    }
    let result = if pkt.family == FAMILY_V6 {
        to_v4(ctx, pkt, ct)
    } else {
        to_v6(ctx, pkt, ct)
    };
    match result {
        Ok(()) => true,
        Err(stat) => {
            count(stat);
            false
        }
    }
}

/// IPv6 client -> IPv4 container: from the masquerade source to the
/// container (`ct` is the forward entry).
#[inline(always)]
fn to_v4(ctx: &TcContext, pkt: &Packet, ct: &CtValue) -> Result<(), Stat> {
    // Only the fixed header: `parse` passes other extension headers, and an
    // "atomic" fragment still has its Fragment header.
    if pkt.l3_off != ETH_HLEN || pkt.l4_off != ETH_HLEN + IPV6_HLEN {
        return Err(Stat::DroppedNat46);
    }
    // Version, traffic class, flow label; payload length, next header, hop
    // limit.
    let head: [u8; 8] = ctx.load(ETH_HLEN).map_err(|_| Stat::RewriteFailed)?;
    if udp_without_checksum(ctx, pkt)? {
        return Err(Stat::DroppedNat46);
    }
    let traffic_class = (head[0] << 4) | (head[1] >> 4);
    let payload_len = match u16::from_be_bytes([head[4], head[5]]) as u32 {
        // BIG TCP (`parse` accepts a length of 0 only for it): the skb's.
        0 => ctx.len() - (ETH_HLEN + IPV6_HLEN) as u32,
        length => length,
    };
    // Over 64 KiB: BIG TCP's IPv4 length of 0 (only a GSO skb gets there).
    let total_len = match payload_len + IPV4_HLEN as u32 {
        length if length > 0xffff => 0,
        length => length as u16,
    };
    let (saddr, daddr) = (ct.masq_addr.words[0], ct.nat_addr.words[0]);
    // The header as 16-bit words in packet order, for its checksum.
    let (s, d) = (saddr.to_ne_bytes(), daddr.to_ne_bytes());
    let mut header: [u16; 10] = [
        u16::from_ne_bytes([0x45, traffic_class]),
        total_len.to_be(),
        0,
        IPV4_DONT_FRAGMENT.to_be(),
        u16::from_ne_bytes([head[7], pkt.proto]),
        0,
        u16::from_ne_bytes([s[0], s[1]]),
        u16::from_ne_bytes([s[2], s[3]]),
        u16::from_ne_bytes([d[0], d[1]]),
        u16::from_ne_bytes([d[2], d[3]]),
    ];
    let mut sum = 0u32;
    for word in header {
        sum += word as u32;
    }
    header[5] = !fold(sum);
    // The pseudo-header's change: the addresses (its length and protocol
    // add up the same in both families).
    // Indexed, not a chain of iterators: the verifier cannot bound a walk
    // of pointers into the map value.
    let mut diff = add(saddr, daddr);
    for i in 0..4 {
        diff = add(add(diff, !pkt.saddr.words[i]), !pkt.daddr.words[i]);
    }
    ctx.change_proto(ETH_P_IP.to_be(), 0)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.store(ETH_TYPE_OFF, &ETH_P_IP.to_be(), 0)
        .and_then(|()| ctx.store(ETH_HLEN, &header, BPF_F_RECOMPUTE_CSUM))
        .and_then(|()| {
            transport(
                ctx,
                pkt,
                ETH_HLEN + IPV4_HLEN,
                diff,
                [ct.masq_port, ct.nat_port],
            )
        })
        .map_err(|_| Stat::RewriteFailed)
}

/// IPv4 reply -> IPv6: from the published address to the client (`ct` is
/// the reply entry).
#[inline(always)]
fn to_v6(ctx: &TcContext, pkt: &Packet, ct: &CtValue) -> Result<(), Stat> {
    // Version and header length, TOS, total length, identification,
    // flags and offset, TTL.
    let head: [u8; 9] = ctx.load(ETH_HLEN).map_err(|_| Stat::RewriteFailed)?;
    // Options would not fit in the room the switch makes.
    if pkt.l3_off != ETH_HLEN || head[0] != 0x45 {
        return Err(Stat::DroppedNat46);
    }
    if udp_without_checksum(ctx, pkt)? {
        return Err(Stat::DroppedNat46);
    }
    let payload_len = match u16::from_be_bytes([head[2], head[3]]) as u32 {
        // BIG TCP (`parse` accepts a length of 0 only for it): the skb's.
        0 => ctx.len() - (ETH_HLEN + IPV4_HLEN) as u32,
        // `parse` checked that the length covers the header.
        length => length - IPV4_HLEN as u32,
    };
    let payload_len = if payload_len > 0xffff {
        0
    } else {
        payload_len as u16
    };
    let tos = head[1];
    let (saddr, daddr) = (&ct.nat_addr.words, &ct.masq_addr.words);
    let [length_high, length_low] = payload_len.to_be_bytes();
    let header: [u32; 10] = [
        u32::from_ne_bytes([0x60 | (tos >> 4), tos << 4, 0, 0]),
        u32::from_ne_bytes([length_high, length_low, pkt.proto, head[8]]),
        saddr[0],
        saddr[1],
        saddr[2],
        saddr[3],
        daddr[0],
        daddr[1],
        daddr[2],
        daddr[3],
    ];
    // Indexed: see `to_v4`.
    let mut diff = add(!pkt.saddr.words[0], !pkt.daddr.words[0]);
    for i in 0..4 {
        diff = add(add(diff, saddr[i]), daddr[i]);
    }
    ctx.change_proto(ETH_P_IPV6.to_be(), 0)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.store(ETH_TYPE_OFF, &ETH_P_IPV6.to_be(), 0)
        .and_then(|()| ctx.store(ETH_HLEN, &header, BPF_F_RECOMPUTE_CSUM))
        .and_then(|()| {
            transport(
                ctx,
                pkt,
                ETH_HLEN + IPV6_HLEN,
                diff,
                [ct.nat_port, ct.masq_port],
            )
        })
        .map_err(|_| Stat::RewriteFailed)
}

/// Whether `pkt` is a UDP datagram without a checksum (0), which the
/// other family cannot carry: IPv6 requires one, and IPv4 reads 0 as none.
#[inline(always)]
fn udp_without_checksum(ctx: &TcContext, pkt: &Packet) -> Result<bool, Stat> {
    if pkt.proto != IPPROTO_UDP {
        return Ok(false);
    }
    let check: u16 = ctx
        .load(pkt.l4_off + UDP_CSUM_OFF)
        .map_err(|_| Stat::RewriteFailed)?;
    Ok(check == 0)
}

/// The TCP/UDP header at `l4_off` after the switch: its checksum follows
/// the pseudo-header's change `pseudo_diff`, then the ports change.
#[inline(always)]
fn transport(
    ctx: &TcContext,
    pkt: &Packet,
    l4_off: usize,
    pseudo_diff: u32,
    ports: [u16; 2],
) -> Result<(), i64> {
    let (csum_off, flags) = if pkt.proto == IPPROTO_TCP {
        (l4_off + TCP_CSUM_OFF, 0)
    } else {
        (l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0)
    };
    // A size of 0 in the flags: `to` is a checksum difference. The helper
    // knows whether the skb's checksum is complete, partial or unchecked.
    ctx.l4_csum_replace(csum_off, 0, pseudo_diff as u64, BPF_F_PSEUDO_HDR | flags)?;
    // The ports are not in the pseudo-header: a partial checksum (left to
    // the NIC) must not see them.
    let mut diff = 0u32;
    for (old, new) in [(pkt.sport, ports[0]), (pkt.dport, ports[1])] {
        diff = add(add(diff, (!old) as u32), new as u32);
    }
    ctx.l4_csum_replace(csum_off, 0, diff as u64, flags)?;
    ctx.store(l4_off, &ports, 0)
}

/// One's complement addition of 32-bit words (the end-around carry).
#[inline(always)]
fn add(sum: u32, word: u32) -> u32 {
    let (sum, carry) = sum.overflowing_add(word);
    sum + carry as u32
}

/// A 32-bit one's complement sum folded to 16 bits.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}
