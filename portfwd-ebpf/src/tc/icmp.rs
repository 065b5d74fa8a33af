//! ICMP errors about translated flows, translated like the flow (issue 11,
//! case 8). An error quotes the packet it is about; when that packet is
//! one the TC programs translated, the error must reach the other side in
//! its view, or path MTU discovery (and every other ICMP signal) breaks:
//!
//! - an error arriving on an uplink about a reply the host sent
//!   (embedded `host:P -> client`, e.g. "fragmentation needed" from a
//!   router with a smaller MTU) goes to the container as if about its own
//!   packet: outer destination and embedded source become the container's
//!   address and port (embedded destination: the masquerade address, for a
//!   masqueraded flow);
//! - an error a container sends about a client's packet (embedded
//!   `client -> container:p`) goes to the client as the host's: outer
//!   source and embedded destination become the published address and
//!   port; so does one the host's own stack sends about such a packet
//!   (it leaves through an uplink: translated at its egress).
//!
//! The flow is found by the embedded tuple, reversed: the conntrack entry
//! of the direction opposite to the quoted packet's. The outer IP header's
//! checksum, the ICMP checksum and the embedded IPv4 header's checksum are
//! kept right (incrementally); the embedded TCP/UDP checksum is not (it
//! covers data the error does not hold whole, and no receiver checks it).
//! Only Ethernet frames without IPv6 extension headers, as `packet`; a
//! quoted IPv6 packet may have a Fragment header right after its fixed
//! header (as `packet` follows one), other extension headers not.

use aya_ebpf::programs::TcContext;
use portfwd_common::{
    Addr, CT_FLAG_HOST, CT_FLAG_MASQ, CT_FLAG_NAT46, CT_FLAG_REPLY, CtValue, FAMILY_V4, FAMILY_V6,
    IPPROTO_TCP, IPPROTO_UDP, Stat,
};

use super::{
    service::{ContainerLink, container_link},
    translate::still_mapped,
};
use crate::{
    clock, conntrack,
    maps::SCRATCH,
    packet::{IPPROTO_FRAGMENT, IPV6_FRAGMENT_HLEN},
    verdict::{count, deliver, mark_translated},
};

/// Where `translate_error` runs, which decides which errors are ours there:
/// in on an uplink, in on a container's link, or out of an uplink.
pub(super) const ARRIVING_ON_UPLINK: u8 = 0;
pub(super) const ARRIVING_ON_CONTAINER_LINK: u8 = 1;
pub(super) const LEAVING: u8 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const ICMP_HLEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMP_CSUM_OFF: usize = 2;
const IPV4_CSUM_OFF: usize = 10;
const IPV4_SADDR_OFF: usize = 12;
const IPV4_DADDR_OFF: usize = 16;
const IPV6_SADDR_OFF: usize = 8;
const IPV6_DADDR_OFF: usize = 24;
/// The offset bits of a Fragment header's offset-and-flags field.
const FRAGMENT_OFFSET_MASK: u16 = 0xfff8;
/// `bpf_l4_csum_replace`: the changed field is in the pseudo-header.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `bpf_skb_store_bytes`: keep a CHECKSUM_COMPLETE skb's csum right.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;

/// An ICMP error and the packet it quotes.
struct Error {
    family: u8,
    /// The outer addresses.
    saddr: Addr,
    daddr: Addr,
    icmp_off: usize,
    /// The quoted IP header and its transport header.
    inner_off: usize,
    inner_l4_off: usize,
    inner_saddr: Addr,
    inner_daddr: Addr,
    /// Network byte order.
    inner_sport: u16,
    inner_dport: u16,
    inner_proto: u8,
}

/// For a packet that is not TCP or UDP: if it is an ICMP error about a
/// translated flow, the error translated and the verdict; else None (not
/// ours). `AT`: where it runs. `LEAVING`: at an uplink's egress, where only
/// the errors the host's own stack sends about a client's translated packet
/// are ours (e.g. "host unreachable" when the container is gone, "time
/// exceeded" from the forwarding path): they quote the packet as translated
/// (`client -> container:p`), and go on to the client translated, in the
/// view of the address it used.
///
/// An error goes to the sender of the packet it quotes: one addressed
/// elsewhere is no error about that packet, and is not ours (translated,
/// it would leave in the host's name to wherever a forger chose). One
/// about a client's packet is in the container's name (the container's,
/// or a router's on its side): in on an uplink or on another container's
/// link, it is forged where the mapping reaches its container through
/// another interface (on an uplink, as the flow's own packets are:
/// `tc::forged_in_containers_name`), and dropped.
// Not inlined: called from the program's frame; its locals stay out of
// the TCP/UDP path. `AT` a constant, not an argument: one function per
// program, each with the frame it had (an argument grew it by 32 bytes, to
// 480 of 512 with `rewrite`).
#[inline(never)]
pub(super) fn translate_error<const AT: u8>(ctx: &TcContext) -> Option<i32> {
    let error = parse(ctx)?;
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU memory that only this program run uses.
    let key = unsafe { &mut (*scratch).key };
    // The quoted packet, reversed: the flow's other direction.
    key.saddr = error.inner_daddr;
    key.daddr = error.inner_saddr;
    key.sport = error.inner_dport;
    key.dport = error.inner_sport;
    key.proto = error.inner_proto;
    key.family = error.family;
    key._pad = 0;
    let now = clock::now();
    let entry = conntrack::lookup_any(key, now)?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &*entry };
    // A NAT46 flow's error would have to change family with its quote
    // (ICMPv6 <-> ICMP, both headers rebuilt): not done, it passes as it
    // came. Rewritten in place, it would carry IPv6 addresses cut to IPv4.
    if ct.flags & (CT_FLAG_HOST | CT_FLAG_NAT46) != 0
        || (AT == LEAVING && ct.flags & CT_FLAG_REPLY == 0)
    {
        return None;
    }
    if AT != LEAVING && ct.flags & CT_FLAG_REPLY != 0 && came_in_elsewhere(ctx, ct) {
        return Some(aya_ebpf::bindings::TC_ACT_SHOT);
    }
    if mapping_moved(entry, &error) {
        return Some(aya_ebpf::bindings::TC_ACT_SHOT);
    }
    if !rewrite(ctx, &error, ct) {
        // A half-rewritten error must not leave: its checksums are wrong.
        count(Stat::RewriteFailed);
        return Some(aya_ebpf::bindings::TC_ACT_SHOT);
    }
    count(Stat::IcmpErrorTranslated);
    if AT == LEAVING {
        return Some(aya_ebpf::bindings::TC_ACT_UNSPEC);
    }
    if ct.flags & CT_FLAG_REPLY != 0 && ct.ifindex != 0 {
        mark_translated(ctx);
    }
    Some(deliver(ctx, ct.ifindex, now))
}

/// Whether an error in the container's name (its flow's reply entry `ct`)
/// is forged: it came in on an interface (an uplink, or another
/// container's link) other than the one the mapping reaches the container
/// through, where the container's own errors and its routers' come in.
/// Counted. On another container's link, it is a co-tenant's (the strict
/// rule that new flows from container links follow, see
/// `service::forged_source`); on a bridge that several containers share,
/// the programs cannot tell one from another.
// Not inlined: the mapping lookup's locals would take slots of
// `translate_error`'s frame, which starts its deepest chain (with
// `rewrite`), at 6.1's 512-byte limit.
#[inline(never)]
fn came_in_elsewhere(ctx: &TcContext, ct: &CtValue) -> bool {
    let forged = matches!(container_link(ctx, &ct.service), ContainerLink::Other);
    if forged {
        count(Stat::DroppedContainerSource);
    }
    forged
}

/// Whether the mapping of the flow whose entry `entry` the error matched
/// no longer points at the flow's container (removed, or moved
/// elsewhere): the flow stops at its next packet, and its errors are
/// dropped (counted as `flows_stopped`, as its replies are): translated,
/// one would go to an address that may be another container's by now;
/// passed as it came, one would carry the container's address out. Asked
/// as the flow's packets ask it (`translate::still_mapped`: looked up only
/// when the services changed since the flow last checked). The container
/// is the flow's translation (a forward entry), or the quoted packet's
/// destination (a reply entry: the quote is the client's packet to it).
// Not inlined: the lookup's locals stay out of `translate_error`'s frame
// (see `came_in_elsewhere`).
#[inline(never)]
fn mapping_moved(entry: *mut CtValue, e: &Error) -> bool {
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &mut *entry };
    let (backend, port) = if ct.flags & CT_FLAG_REPLY == 0 {
        (ct.nat_addr, ct.nat_port)
    } else {
        (e.inner_daddr, e.inner_dport)
    };
    let moved = !still_mapped(ct, &backend, port);
    if moved {
        count(Stat::FlowStopped);
    }
    moved
}

/// The error's headers, if it is an ICMP error quoting a TCP or UDP packet
/// and addressed to that packet's sender.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Error> {
    // SAFETY: reading a context field, checked by the verifier.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let error = match protocol {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => None,
    }?;
    // An error goes to the sender of the packet it quotes (see
    // `translate_error`).
    (error.daddr.words == error.inner_saddr.words).then_some(error)
}

fn parse_v4(ctx: &TcContext) -> Option<Error> {
    let outer: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
    // Not a fragment (an error is small), ICMP.
    if outer[0] >> 4 != 4 || outer[9] != IPPROTO_ICMP || outer[6] & 0x3f != 0 || outer[7] != 0 {
        return None;
    }
    let icmp_off = ETH_HLEN + ((outer[0] & 0x0f) as usize) * 4;
    let icmp: [u8; 2] = ctx.load(icmp_off).ok()?;
    if icmp[0] != ICMP_DEST_UNREACH && icmp[0] != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_off = icmp_off + ICMP_HLEN;
    let inner: [u8; 20] = ctx.load(inner_off).ok()?;
    let inner_proto = inner[9];
    if inner[0] >> 4 != 4 || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP) {
        return None;
    }
    let inner_l4_off = inner_off + ((inner[0] & 0x0f) as usize) * 4;
    let ports: [u16; 2] = ctx.load(inner_l4_off).ok()?;
    let word = |h: &[u8; 20], i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    Some(Error {
        family: FAMILY_V4,
        saddr: Addr::v4(word(&outer, IPV4_SADDR_OFF)),
        daddr: Addr::v4(word(&outer, IPV4_DADDR_OFF)),
        icmp_off,
        inner_off,
        inner_l4_off,
        inner_saddr: Addr::v4(word(&inner, IPV4_SADDR_OFF)),
        inner_daddr: Addr::v4(word(&inner, IPV4_DADDR_OFF)),
        inner_sport: ports[0],
        inner_dport: ports[1],
        inner_proto,
    })
}

fn parse_v6(ctx: &TcContext) -> Option<Error> {
    let outer: [u32; 10] = ctx.load(ETH_HLEN).ok()?;
    let first = outer[1].to_ne_bytes();
    if outer[0].to_ne_bytes()[0] >> 4 != 6 || first[2] != IPPROTO_ICMPV6 {
        return None;
    }
    let icmp_off = ETH_HLEN + IPV6_HLEN;
    let icmp: [u8; 2] = ctx.load(icmp_off).ok()?;
    if !matches!(
        icmp[0],
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
    ) {
        return None;
    }
    let inner_off = icmp_off + ICMP_HLEN;
    let inner: [u32; 10] = ctx.load(inner_off).ok()?;
    let mut inner_proto = inner[1].to_ne_bytes()[2];
    let mut inner_l4_off = inner_off + IPV6_HLEN;
    // A datagram's first fragment (its sender fragmented a large UDP reply,
    // say) is quoted with its Fragment header before the transport header,
    // which only the first fragment holds (its offset is 0).
    if inner_proto == IPPROTO_FRAGMENT {
        let fragment: [u8; IPV6_FRAGMENT_HLEN] = ctx.load(inner_l4_off).ok()?;
        if u16::from_be_bytes([fragment[2], fragment[3]]) & FRAGMENT_OFFSET_MASK != 0 {
            return None;
        }
        inner_proto = fragment[0];
        inner_l4_off += IPV6_FRAGMENT_HLEN;
    }
    if inner[0].to_ne_bytes()[0] >> 4 != 6
        || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP)
    {
        return None;
    }
    let ports: [u16; 2] = ctx.load(inner_l4_off).ok()?;
    Some(Error {
        family: FAMILY_V6,
        saddr: Addr::v6([outer[2], outer[3], outer[4], outer[5]]),
        daddr: Addr::v6([outer[6], outer[7], outer[8], outer[9]]),
        icmp_off,
        inner_off,
        inner_l4_off,
        inner_saddr: Addr::v6([inner[2], inner[3], inner[4], inner[5]]),
        inner_daddr: Addr::v6([inner[6], inner[7], inner[8], inner[9]]),
        inner_sport: ports[0],
        inner_dport: ports[1],
        inner_proto,
    })
}

/// Rewrites the error into the view of the side it goes to (see the
/// module's documentation); whether every write succeeded.
// A bool, not the `Result` of `rewrite_headers`: returned through memory,
// the `Result` left a stack pointer in r0 at one exit, which the verifier
// refuses ("cannot return stack pointer to the caller").
#[inline(never)]
fn rewrite(ctx: &TcContext, e: &Error, ct: &CtValue) -> bool {
    rewrite_headers(ctx, e, ct).is_ok()
}

#[inline(always)]
fn rewrite_headers(ctx: &TcContext, e: &Error, ct: &CtValue) -> Result<(), i64> {
    let masq = ct.flags & CT_FLAG_MASQ != 0;
    if ct.flags & CT_FLAG_REPLY == 0 {
        // About a reply the host sent (host:P -> client): to the container,
        // about its own packet (container:p -> client or masquerade).
        inner_address(ctx, e, true, &ct.nat_addr, ct.nat_port)?;
        if masq {
            inner_address(ctx, e, false, &ct.masq_addr, ct.masq_port)?;
            // Sent by the client itself (a container, hairpin): from the
            // address the container knows it by.
            if e.saddr == e.inner_daddr {
                outer_address(ctx, e, IpEnd::Source, &ct.masq_addr)?;
            }
        }
        outer_address(ctx, e, IpEnd::Destination, &ct.nat_addr)?;
    } else {
        // About a client's packet the container got (client or
        // masquerade -> container:p): to the client, from the host.
        inner_address(ctx, e, false, &ct.nat_addr, ct.nat_port)?;
        if masq {
            inner_address(ctx, e, true, &ct.masq_addr, ct.masq_port)?;
            outer_address(ctx, e, IpEnd::Destination, &ct.masq_addr)?;
        }
        // Sent by the container itself (not by a router on its way).
        if e.saddr == e.inner_daddr {
            outer_address(ctx, e, IpEnd::Source, &ct.nat_addr)?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum IpEnd {
    Source,
    Destination,
}

/// An address of the outer header: the IPv4 header checksum follows; the
/// ICMPv6 checksum covers it through its pseudo-header (ICMPv4's does not).
#[inline(always)]
fn outer_address(ctx: &TcContext, e: &Error, end: IpEnd, to: &Addr) -> Result<(), i64> {
    let from = match end {
        IpEnd::Source => &e.saddr,
        IpEnd::Destination => &e.daddr,
    };
    if from == to {
        return Ok(());
    }
    if e.family == FAMILY_V4 {
        let off = ETH_HLEN
            + match end {
                IpEnd::Source => IPV4_SADDR_OFF,
                IpEnd::Destination => IPV4_DADDR_OFF,
            };
        let (old, new) = (from.words[0], to.words[0]);
        ctx.l3_csum_replace(ETH_HLEN + IPV4_CSUM_OFF, old as u64, new as u64, 4)?;
        ctx.store(off, &new, 0)?;
    } else {
        let off = ETH_HLEN
            + match end {
                IpEnd::Source => IPV6_SADDR_OFF,
                IpEnd::Destination => IPV6_DADDR_OFF,
            };
        for i in 0..4 {
            let (old, new) = (from.words[i], to.words[i]);
            if old != new {
                ctx.l4_csum_replace(
                    e.icmp_off + ICMP_CSUM_OFF,
                    old as u64,
                    new as u64,
                    BPF_F_PSEUDO_HDR | 4,
                )?;
            }
        }
        ctx.store(off, &to.words, BPF_F_RECOMPUTE_CSUM)?;
    }
    Ok(())
}

/// The quoted packet's source (`source`) or destination address and port.
/// Inside the ICMP message, so its checksum follows as for data (no
/// pseudo-header); a quoted IPv4 header's own checksum follows its
/// address, and as the two changes cancel out in the ICMP checksum, only
/// the port changes that. The skb's CHECKSUM_COMPLETE csum stays right:
/// each change inside the message is cancelled by its checksum's.
#[inline(always)]
fn inner_address(
    ctx: &TcContext,
    e: &Error,
    source: bool,
    to: &Addr,
    to_port: u16,
) -> Result<(), i64> {
    let (from, from_port, port_off) = if source {
        (&e.inner_saddr, e.inner_sport, e.inner_l4_off)
    } else {
        (&e.inner_daddr, e.inner_dport, e.inner_l4_off + 2)
    };
    let icmp_csum = e.icmp_off + ICMP_CSUM_OFF;
    if from != to {
        if e.family == FAMILY_V4 {
            let off = e.inner_off
                + if source {
                    IPV4_SADDR_OFF
                } else {
                    IPV4_DADDR_OFF
                };
            let (old, new) = (from.words[0], to.words[0]);
            ctx.l3_csum_replace(e.inner_off + IPV4_CSUM_OFF, old as u64, new as u64, 4)?;
            ctx.store(off, &new, 0)?;
        } else {
            let off = e.inner_off
                + if source {
                    IPV6_SADDR_OFF
                } else {
                    IPV6_DADDR_OFF
                };
            for i in 0..4 {
                let (old, new) = (from.words[i], to.words[i]);
                if old != new {
                    ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 4)?;
                }
            }
            ctx.store(off, &to.words, 0)?;
        }
    }
    if from_port != to_port {
        ctx.l4_csum_replace(icmp_csum, from_port as u64, to_port as u64, 2)?;
        ctx.store(port_off, &to_port, 0)?;
    }
    Ok(())
}
