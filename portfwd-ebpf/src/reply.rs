//! Answers the TC programs send themselves, built in place of the packet
//! they answer and sent back out of the interface it came in on: what a
//! closed port gives to a client that a mapping's allowlist refuses (a TCP
//! reset, an ICMP port unreachable), as the kernel would answer it.
//!
//! The answer is built whole in per-CPU memory (`pf_reply`), then the
//! packet is resized and overwritten with it: no packet bytes move inside
//! the skb, and the checksums are computed over that memory with
//! `bpf_csum_diff` (which takes at most 512 bytes at a time).
//!
//! Only Ethernet frames are answered, as only Ethernet frames are parsed
//! (`packet::parse_frame`); the MAC addresses are swapped.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_SHOT, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS},
    helpers::generated::{
        bpf_check_mtu, bpf_csum_diff, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use portfwd_common::{FAMILY_V4, IPPROTO_TCP, Stat};

use crate::{
    maps::REPLY,
    packet::{Packet, TCP_ACK, TCP_RST},
    trace,
    types::{FRAME_ROOM, ReplyScratch},
    verdict::{count, mark_translated},
};

/// What `tc::flow::start_flow` returns for a new flow the allowlist refuses with
/// an answer: not a TC verdict; the program answers (`refuse`) once
/// `start_flow`'s frame is gone, for the stack's sake.
pub(crate) const ANSWER: i32 = 0x7ead;
/// What `too_big` returns for an IPv4 packet without DF: not a verdict; the
/// forwarding path fragments such a packet, and the program decides how it
/// gets there (`tc::fragmented_by_stack`).
pub(crate) const FRAGMENT: i32 = 0x7eae;

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TTL: u8 = 64;
/// `IPTOS_PREC_INTERNETCONTROL`: the kernel's TOS for ICMP errors.
const TOS_INTERNETCONTROL: u8 = 0xc0;
const IPV4_DONT_FRAGMENT: u8 = 0x40;
/// An ICMP error holds as much of the datagram as fits in 576 bytes (IPv4,
/// RFC 1812 4.3.2.3, the kernel's limit) or in the minimum MTU, 1280
/// (IPv6, RFC 4443 2.4 (c)).
const IPV4_ERROR_MAX: usize = 576;
const IPV6_ERROR_MAX: usize = 1280;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// `bpf_skb_store_bytes`: keep a CHECKSUM_COMPLETE skb's csum right.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;

/// The rate limit of ICMP answers, a token bucket per CPU: one answer
/// costs a millisecond of credit, the credit grows with time up to a burst
/// of 50 (the kernel's `icmp_msgs_per_sec` and `icmp_msgs_burst`).
const ANSWER_COST_NS: u64 = 1_000_000;
const BURST_NS: u64 = 50 * ANSWER_COST_NS;

/// `bounded_len`'s largest length, plus one: a mask.
const LEN_MASK: usize = 0x7ff;
/// `bpf_csum_diff` reads at most 512 bytes per call.
const CSUM_CHUNK: usize = 512;

/// Answers a new flow that the mapping's allowlist refuses as a closed port
/// would, out of the interface it came in on; when that cannot be done, or
/// must not (a reset, over the rate limit), the packet is dropped. Counted
/// and traced either way.
// Not inlined: called from the program's own frame, so that its stack adds
// to the program's, not to `start_flow`'s chain.
#[inline(never)]
pub(crate) fn refuse(ctx: &TcContext, pkt: &Packet, path: u8) -> i32 {
    let stat = match answer(ctx, pkt) {
        Ok(()) => Stat::RefusedAnswered,
        Err(stat) => stat,
    };
    count(stat);
    trace::stat(ctx, pkt, path, stat);
    if stat != Stat::RefusedAnswered {
        return TC_ACT_SHOT;
    }
    back(ctx)
}

/// For a packet of a tracked flow about to be redirected to `ifindex`:
/// when it is larger than that interface's MTU (a GSO packet: its
/// segments), the answer a router gives, as the forwarding path would have
/// (`bpf_redirect_neigh` skips its MTU check, and the device would drop
/// the packet silently): "fragmentation needed" with the MTU (IPv4 with
/// DF) or "packet too big" (IPv6), to the sender, about its packet as it
/// sent it; the packet is dropped. `FRAGMENT`: too big, IPv4 without DF
/// (the forwarding path fragments those). None: it fits.
// Not inlined: called from the program's frame, before the translation.
#[inline(never)]
pub(crate) fn too_big(ctx: &TcContext, pkt: &Packet, path: u8, ifindex: u32) -> Option<i32> {
    let mut mtu: u32 = 0;
    // SAFETY: a plain helper call; `mtu` is a local it writes.
    let verdict =
        unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu, 0, BPF_MTU_CHK_SEGS as u64) };
    if verdict <= 0 {
        return None;
    }
    if pkt.family == FAMILY_V4 {
        let flags: [u8; 2] = ctx.load(pkt.l3_off + 6).ok()?;
        if flags[0] & IPV4_DONT_FRAGMENT == 0 {
            return Some(FRAGMENT);
        }
    }
    let stat = match answer_too_big(ctx, pkt, mtu) {
        Ok(()) => Stat::TooBigAnswered,
        Err(stat) => stat,
    };
    count(stat);
    trace::stat(ctx, pkt, path, stat);
    if stat != Stat::TooBigAnswered {
        return Some(TC_ACT_SHOT);
    }
    Some(back(ctx))
}

#[inline(always)]
fn answer_too_big(ctx: &TcContext, pkt: &Packet, mtu: u32) -> Result<(), Stat> {
    let reply = REPLY.get_ptr_mut(0).ok_or(Stat::RewriteFailed)?;
    // SAFETY: per-CPU memory that only this program run uses.
    let reply = unsafe { &mut *reply };
    if !pkt.answerable_source() {
        return Err(Stat::DroppedMartianSource);
    }
    if !rate_allows(reply) {
        return Err(Stat::AnswersRateLimited);
    }
    let len = if pkt.family == FAMILY_V4 {
        let mtu = (mtu.min(u16::MAX as u32) as u16).to_be_bytes();
        icmp_error(
            ctx,
            pkt,
            reply,
            (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED),
            [0, 0, mtu[0], mtu[1]],
        )
    } else {
        icmp_error(
            ctx,
            pkt,
            reply,
            (ICMPV6_PACKET_TOO_BIG, 0),
            mtu.to_be_bytes(),
        )
    }
    .map_err(|_| Stat::RewriteFailed)?;
    send(ctx, reply, len).map_err(|_| Stat::RewriteFailed)
}

/// Sends the answer back out of the interface the packet came in on.
#[inline(always)]
fn back(ctx: &TcContext) -> i32 {
    // Leaving through an uplink, the answer needs no look at egress.
    mark_translated(ctx);
    // SAFETY: reading a context field, checked by the verifier.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain helper call; the egress of the interface it came in on.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Builds the answer in place of the packet.
#[inline(always)]
fn answer(ctx: &TcContext, pkt: &Packet) -> Result<(), Stat> {
    let reply = REPLY.get_ptr_mut(0).ok_or(Stat::RefusedNotAllowed)?;
    // SAFETY: per-CPU memory that only this program run uses (the rate
    // limit fields: only this CPU).
    let reply = unsafe { &mut *reply };
    if !pkt.answerable_source() {
        return Err(Stat::RefusedNotAllowed);
    }
    let len = if pkt.proto == IPPROTO_TCP {
        reset(ctx, pkt, reply)?
    } else {
        if !rate_allows(reply) {
            return Err(Stat::AnswersRateLimited);
        }
        port_unreachable(ctx, pkt, reply)?
    };
    send(ctx, reply, len).map_err(|_| Stat::RefusedNotAllowed)
}

/// Takes one answer's credit from this CPU's bucket, if it has it.
#[inline(always)]
fn rate_allows(reply: &mut ReplyScratch) -> bool {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let earned = now.saturating_sub(reply.last_ns);
    reply.last_ns = now;
    let credit = reply.credit_ns.saturating_add(earned).min(BURST_NS);
    if credit < ANSWER_COST_NS {
        reply.credit_ns = credit;
        return false;
    }
    reply.credit_ns = credit - ANSWER_COST_NS;
    true
}

/// The Ethernet header of the answer (MACs swapped) and the IP header's
/// addresses, swapped; returns the offset of the IP header's end.
#[inline(always)]
fn headers(ctx: &TcContext, pkt: &Packet, frame: &mut [u8; FRAME_ROOM]) -> Result<usize, Stat> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Stat::RefusedNotAllowed)?;
    frame[..6].copy_from_slice(&macs[6..]);
    frame[6..12].copy_from_slice(&macs[..6]);
    let v4 = pkt.family == FAMILY_V4;
    let ethertype = if v4 { ETH_P_IP } else { ETH_P_IPV6 };
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let ip = &mut frame[ETH_HLEN..];
    if v4 {
        ip[..IPV4_HLEN].fill(0);
        ip[0] = 0x45;
        ip[8] = TTL;
        ip[12..16].copy_from_slice(&pkt.daddr.words[0].to_ne_bytes());
        ip[16..20].copy_from_slice(&pkt.saddr.words[0].to_ne_bytes());
        Ok(ETH_HLEN + IPV4_HLEN)
    } else {
        ip[..8].fill(0);
        ip[0] = 0x60;
        ip[7] = TTL;
        for i in 0..4 {
            ip[8 + 4 * i..12 + 4 * i].copy_from_slice(&pkt.daddr.words[i].to_ne_bytes());
            ip[24 + 4 * i..28 + 4 * i].copy_from_slice(&pkt.saddr.words[i].to_ne_bytes());
        }
        Ok(ETH_HLEN + IPV6_HLEN)
    }
}

/// Fills in the IPv4 header's length, protocol and checksum, or the IPv6
/// header's payload length and next header; and the pseudo-header of the
/// transport checksum (IPv6: also ICMPv6's), whose sum is returned.
#[inline(always)]
fn finish_ip(reply: &mut ReplyScratch, v4: bool, proto: u8, payload: usize) -> Result<u32, Stat> {
    let ip = &mut reply.frame[ETH_HLEN..];
    let pseudo = &mut reply.pseudo;
    if v4 {
        ip[2..4].copy_from_slice(&((IPV4_HLEN + payload) as u16).to_be_bytes());
        ip[9] = proto;
        let sum = csum(&ip[..IPV4_HLEN], 0)?;
        ip[10..12].copy_from_slice(&fold(sum).to_ne_bytes());
        // Source, destination, zero, protocol, length.
        pseudo[..8].copy_from_slice(&ip[12..20]);
        pseudo[8] = 0;
        pseudo[9] = proto;
        pseudo[10..12].copy_from_slice(&(payload as u16).to_be_bytes());
        csum(&pseudo[..12], 0)
    } else {
        ip[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        ip[6] = proto;
        // Source, destination, 32-bit length, zeros, next header.
        pseudo[..32].copy_from_slice(&ip[8..40]);
        pseudo[32..36].copy_from_slice(&(payload as u32).to_be_bytes());
        pseudo[36..39].fill(0);
        pseudo[39] = proto;
        csum(&pseudo[..40], 0)
    }
}

/// The reset a closed port gives a TCP segment (RFC 9293 3.10.7.1, as
/// `tcp_v4_send_reset` builds it): with the segment's ACK, seq = its ack;
/// else seq 0 and ack = its seq + its length (SYN and FIN count one).
/// Returns the answer's length.
#[inline(always)]
fn reset(ctx: &TcContext, pkt: &Packet, reply: &mut ReplyScratch) -> Result<usize, Stat> {
    if pkt.tcp_flags & TCP_RST != 0 {
        return Err(Stat::RefusedNotAllowed);
    }
    let (seq, ack, flags) = if pkt.tcp_flags & TCP_ACK != 0 {
        (pkt.ack, 0, TCP_RST)
    } else {
        (0, pkt.seq_end, TCP_RST | TCP_ACK)
    };
    let v4 = pkt.family == FAMILY_V4;
    let l4_off = headers(ctx, pkt, &mut reply.frame)?;
    if v4 {
        reply.frame[ETH_HLEN + 6] = IPV4_DONT_FRAGMENT;
    }
    let pseudo = finish_ip(reply, v4, IPPROTO_TCP, TCP_HLEN)?;
    if l4_off + TCP_HLEN > FRAME_ROOM {
        return Err(Stat::RefusedNotAllowed);
    }
    let tcp = &mut reply.frame[l4_off..l4_off + TCP_HLEN];
    tcp[..2].copy_from_slice(&pkt.dport.to_ne_bytes());
    tcp[2..4].copy_from_slice(&pkt.sport.to_ne_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[13] = flags;
    tcp[14..].fill(0);
    let sum = csum(tcp, pseudo)?;
    tcp[16..18].copy_from_slice(&fold(sum).to_ne_bytes());
    Ok(l4_off + TCP_HLEN)
}

/// The ICMP port unreachable a closed UDP port gives (IPv4 type 3 code 3,
/// IPv6 type 1 code 4). Returns the answer's length.
#[inline(always)]
fn port_unreachable(
    ctx: &TcContext,
    pkt: &Packet,
    reply: &mut ReplyScratch,
) -> Result<usize, Stat> {
    let kind = if pkt.family == FAMILY_V4 {
        (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
    } else {
        (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH)
    };
    icmp_error(ctx, pkt, reply, kind, [0; 4])
}

/// An ICMP error about the packet, of `kind` (type, code) with `rest` (its
/// bytes 5-8), holding the datagram from its IP header on, as much as the
/// RFCs say. Returns the answer's length.
#[inline(always)]
fn icmp_error(
    ctx: &TcContext,
    pkt: &Packet,
    reply: &mut ReplyScratch,
    kind: (u8, u8),
    rest: [u8; 4],
) -> Result<usize, Stat> {
    let v4 = pkt.family == FAMILY_V4;
    let icmp_off = headers(ctx, pkt, &mut reply.frame)?;
    let room = if v4 {
        IPV4_ERROR_MAX - IPV4_HLEN - ICMP_HLEN
    } else {
        IPV6_ERROR_MAX - IPV6_HLEN - ICMP_HLEN
    };
    let quote = ip_end(ctx, pkt)?.saturating_sub(pkt.l3_off).min(room);
    let quote_off = icmp_off + ICMP_HLEN;
    // Bounds the verifier can follow: offset 42 or 62, 1 to 2048 bytes.
    let Some(quote) = bounded_len(quote, room) else {
        return Err(Stat::RefusedNotAllowed);
    };
    if quote_off > ETH_HLEN + IPV6_HLEN + ICMP_HLEN {
        return Err(Stat::RefusedNotAllowed);
    }
    let message_len = ICMP_HLEN + quote;
    // Zeros after the quote, up to a multiple of 4 bytes (the checksum
    // reads whole words); the quote is loaded over the first of them.
    let padding = quote_off + quote;
    if padding + 4 > FRAME_ROOM {
        return Err(Stat::RefusedNotAllowed);
    }
    reply.frame[padding..padding + 4].fill(0);
    let frame = reply.frame.as_mut_ptr();
    // SAFETY: `quote` bytes from `quote_off` lie inside `frame` (checked).
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            pkt.l3_off as u32,
            frame.add(quote_off) as *mut _,
            quote as u32,
        )
    };
    if loaded != 0 {
        return Err(Stat::RefusedNotAllowed);
    }
    let proto = if v4 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
    reply.frame[ETH_HLEN + 1] = if v4 { TOS_INTERNETCONTROL } else { 0 };
    let pseudo = finish_ip(reply, v4, proto, message_len)?;
    // ICMPv4's checksum has no pseudo-header.
    let seed = if v4 { 0 } else { pseudo };
    let icmp = &mut reply.frame[icmp_off..icmp_off + ICMP_HLEN];
    icmp[..4].fill(0);
    icmp[0] = kind.0;
    icmp[1] = kind.1;
    icmp[4..].copy_from_slice(&rest);
    let sum = message_sum(&reply.frame, icmp_off, (message_len + 3) & !3, seed)?;
    reply.frame[icmp_off + 2..icmp_off + 4].copy_from_slice(&fold(sum).to_ne_bytes());
    Ok(quote_off + quote)
}

/// Where the packet's IP datagram ends (its length field; BIG TCP's 0: the
/// skb's end), within the skb.
#[inline(always)]
fn ip_end(ctx: &TcContext, pkt: &Packet) -> Result<usize, Stat> {
    let skb_len = ctx.len() as usize;
    let length = if pkt.family == FAMILY_V4 {
        let total: [u8; 2] = ctx
            .load(pkt.l3_off + 2)
            .map_err(|_| Stat::RefusedNotAllowed)?;
        pkt.l3_off + u16::from_be_bytes(total) as usize
    } else {
        let payload: [u8; 2] = ctx
            .load(pkt.l3_off + 4)
            .map_err(|_| Stat::RefusedNotAllowed)?;
        pkt.l3_off + IPV6_HLEN + u16::from_be_bytes(payload) as usize
    };
    Ok(if length <= pkt.l3_off + IPV6_HLEN || length > skb_len {
        skb_len
    } else {
        length
    })
}

/// The sum of `len` bytes (a multiple of 4) of `frame` from `off` (at most
/// 54), in `CSUM_CHUNK` reads, added to `seed`.
#[inline(always)]
fn message_sum(frame: &[u8; FRAME_ROOM], off: usize, len: usize, seed: u32) -> Result<u32, Stat> {
    let mut sum = seed;
    // Three reads hold the largest message (1240 bytes).
    for chunk in 0..3 {
        let start = chunk * CSUM_CHUNK;
        if start >= len {
            break;
        }
        // Masked (a multiple of 4, at most 1020: no change to the value)
        // after a volatile read, for the same reason as `bounded_len`.
        let size = opaque((len - start).min(CSUM_CHUNK)) & 0x3fc;
        let from = off + start;
        if from + size > FRAME_ROOM {
            return Err(Stat::RefusedNotAllowed);
        }
        sum = csum(&frame[from..from + size], sum)?;
    }
    Ok(sum)
}

/// `len` (at most `max`, at most 2048) in a form whose bounds, 1 to 2048,
/// every verifier follows: the helpers that read or write `len` bytes
/// refuse a length that may be 0. Checked as a plain `len != 0`, LLVM
/// tests a copy of the register, and kernel 6.1's verifier then sees a
/// length from 0; the volatile read keeps LLVM from undoing the mask.
#[inline(always)]
fn bounded_len(len: usize, max: usize) -> Option<usize> {
    let before_last = opaque(len.wrapping_sub(1));
    if before_last >= max {
        return None;
    }
    Some((before_last & LEN_MASK) + 1)
}

/// `value`, read back from the stack: LLVM knows nothing of it after.
#[inline(always)]
fn opaque(value: usize) -> usize {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&value) }
}

/// `bpf_csum_diff` over `bytes` (a multiple of 4, at most 512) added to
/// `seed`: a 32-bit one's complement sum, not folded.
#[inline(always)]
fn csum(bytes: &[u8], seed: u32) -> Result<u32, Stat> {
    // SAFETY: `bytes` is valid memory of its length; the helper only reads.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            bytes.as_ptr() as *mut u32,
            bytes.len() as u32,
            seed,
        )
    };
    if sum < 0 {
        return Err(Stat::RefusedNotAllowed);
    }
    Ok(sum as u32)
}

/// The checksum field of a 32-bit sum, in memory order (the sum was taken
/// over memory in the machine's order, so it is stored in it).
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Resizes the packet to `len` bytes and writes the answer over it: the
/// Ethernet header alone (an ingress skb's CHECKSUM_COMPLETE csum covers
/// the bytes after it), then the rest, keeping that csum right.
#[inline(always)]
fn send(ctx: &TcContext, reply: &mut ReplyScratch, len: usize) -> Result<(), i64> {
    if len < ETH_HLEN + IPV4_HLEN {
        return Err(-1);
    }
    let rest = bounded_len(len - ETH_HLEN, IPV6_ERROR_MAX).ok_or(-1)?;
    let skb = ctx.skb.skb;
    let frame = reply.frame.as_mut_ptr();
    // SAFETY: plain helper calls; `frame` holds `len` bytes (checked).
    unsafe {
        if bpf_skb_change_tail(skb, len as u32, 0) != 0 {
            return Err(-1);
        }
        if bpf_skb_store_bytes(skb as *mut _, 0, frame as *const _, ETH_HLEN as u32, 0) != 0 {
            return Err(-1);
        }
        let rest = bpf_skb_store_bytes(
            skb as *mut _,
            ETH_HLEN as u32,
            frame.add(ETH_HLEN) as *const _,
            rest as u32,
            BPF_F_RECOMPUTE_CSUM,
        );
        if rest != 0 {
            return Err(-1);
        }
    }
    Ok(())
}
