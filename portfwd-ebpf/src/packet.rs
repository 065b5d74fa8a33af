//! Reading the headers of a packet at TC, and rewriting its addresses and
//! ports with incremental checksum updates.
//!
//! Headers are read in place (direct packet access) when they lie in the
//! skb's linear part, as they almost always do, else with
//! `bpf_skb_load_bytes` (non-linear skbs; a short packet is then just an
//! error): a helper call per read cost more than the parse itself.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_fib_lookup},
    programs::TcContext,
};
use portfwd_common::{Addr, FAMILY_V4, FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP, Stat};

/// `bpf_fib_lookup`'s parameters, 8-aligned so that they can be cleared
/// eight bytes at a time (the verifier refuses misaligned stack stores).
#[repr(C, align(8))]
pub(crate) struct FibParams(pub(crate) bpf_fib_lookup);

impl FibParams {
    /// Makes `storage` an all-zero query (an empty one) by eight 8-byte
    /// stores, and gives it out. Zeroed any other way (`core::mem::zeroed`,
    /// or returned by value), the 64 bytes become a call of `memset`, which
    /// this target builds as a loop of one-byte stores: some 320
    /// instructions on every packet redirected into a container. Volatile,
    /// or LLVM merges the stores back into that call.
    #[inline(always)]
    pub(crate) fn clear(storage: &mut MaybeUninit<Self>) -> &mut bpf_fib_lookup {
        let words = storage.as_mut_ptr().cast::<u64>();
        for i in 0..size_of::<Self>() / 8 {
            // SAFETY: within `storage`, 8-aligned (the type's alignment).
            unsafe { words.add(i).write_volatile(0) };
        }
        // SAFETY: every byte was written; all-zero is a valid value.
        unsafe { &mut storage.assume_init_mut().0 }
    }
}

/// `AF_INET`, `AF_INET6`: the families of `bpf_fib_lookup`.
pub(crate) const AF_INET: u8 = 2;
pub(crate) const AF_INET6: u8 = 10;
pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;

pub(crate) const IPV4_DADDR_OFF: usize = 16;
pub(crate) const IPV4_SADDR_OFF: usize = 12;
const IPV4_CSUM_OFF: usize = 10;
pub(crate) const IPV6_SADDR_OFF: usize = 8;
pub(crate) const IPV6_DADDR_OFF: usize = 24;
const IPV6_HLEN: usize = 40;

const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// `bpf_l4_csum_replace` flags: the changed field is part of the
/// pseudo-header; a zero UDP checksum means "none" and must stay zero.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// `bpf_skb_store_bytes` flag: update `skb->csum` for the bytes changed.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;

/// Writes `words` (an address) to `to` one word at a time. A plain
/// assignment between places the compiler cannot tell apart (two pointers
/// into map values, or one into a map value and one onto the stack)
/// becomes a call of `memmove`, a loop over each byte: the verifier then
/// walks 16 rounds of it at every visit of the caller, and its visits are
/// many (a tenth of `pf_tc_uplink_in`'s walk went to `memmove` and
/// `memset`). Volatile, so that the compiler does not merge the stores
/// back into such a call.
#[inline(always)]
pub(crate) fn store_words(to: &mut [u32; 4], words: [u32; 4]) {
    for (slot, word) in to.iter_mut().zip(words) {
        // SAFETY: a valid, aligned place of a `u32`.
        unsafe { core::ptr::write_volatile(slot, word) };
    }
}

/// The parts of a TCP or UDP packet that portfwd looks at.
pub(crate) struct Packet {
    pub family: u8,
    pub proto: u8,
    pub saddr: Addr,
    pub daddr: Addr,
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// TCP (0 for UDP), in host byte order: the sequence number, the
    /// acknowledgment number (meaningful with `TCP_ACK`), and the sequence
    /// number after the segment (its data, SYN and FIN counted).
    pub seq: u32,
    pub ack: u32,
    pub seq_end: u32,
    pub l3_off: usize,
    pub l4_off: usize,
    /// Bytes of the packet, for the counters.
    pub len: u32,
    /// `WHOLE`, `FIRST_FRAGMENT`, `LATER_FRAGMENT` or `LAST_FRAGMENT`.
    pub fragment: u8,
    /// The IP identification of a fragment's datagram (IPv4: 16 bits; IPv6:
    /// the Fragment header's 32).
    pub frag_id: u32,
    /// When the packet matched a tracked flow (`conntrack::now`): the clock
    /// is read once, on a hit. 0 until then.
    pub now: u64,
    /// It came in on an uplink (`pf_tc_uplink_in`), from outside the host,
    /// and not from a container reached through that uplink (see
    /// `tc::service::ContainerLink`): a packet in a container's name here
    /// cannot set that container's mark.
    pub from_uplink: bool,
    /// Its flow's entry is in `CONNTRACK_OPENING` (a flow whose client has
    /// not yet shown it receives the container's packets), not in
    /// `CONNTRACK`: set by `conntrack::find`.
    pub opening: bool,
    /// A client's packet: all ones when it may be redirected to its flow's
    /// interface, 0 when it goes to the stack (`tc::fragmented_by_stack`);
    /// `translate_forward` masks the entry's interface with it, and
    /// `tc::new_flow` reads it back after `start_flow`. A mask read from
    /// memory, not a bool argument: with the interface 0 on one path and
    /// read from the entry on the other, 6.1's verifier pruned the second
    /// path as the first and then removed the redirect after a NAT46
    /// rewrite as dead code (every NAT46 packet after the SYN went to the
    /// stack). Read from memory, the verifier knows the value on no path.
    pub redirect_mask: u32,
}

/// Not a fragment (or an IPv6 "atomic" fragment, offset 0 and no more).
pub(crate) const WHOLE: u8 = 0;
/// Offset 0 with more to come: it carries the TCP/UDP header.
pub(crate) const FIRST_FRAGMENT: u8 = 1;
/// A fragment after the first with more to come: no transport header,
/// ports unknown (zero).
pub(crate) const LATER_FRAGMENT: u8 = 2;
/// A fragment after the first without more to come (the datagram's last
/// bytes): as `LATER_FRAGMENT`.
pub(crate) const LAST_FRAGMENT: u8 = 3;

impl Packet {
    /// A fragment after the first (`LATER_FRAGMENT`, `LAST_FRAGMENT`).
    pub(crate) fn is_later_fragment(&self) -> bool {
        self.fragment >= LATER_FRAGMENT
    }

    /// Whether the source is one no host sends from: unspecified (IPv4
    /// 0.0.0.0/8, IPv6 ::), multicast (224.0.0.0/4, ff00::/8) or the
    /// broadcast address. The kernel drops such a packet as a martian (RFC
    /// 1122 3.2.1.3, RFC 4291 2.5.2 and 2.7), and no answer may go to it.
    pub(crate) fn martian_source(&self) -> bool {
        let first = self.saddr.words[0].to_ne_bytes();
        if self.family == FAMILY_V4 {
            first[0] == 0 || (224..240).contains(&first[0]) || first == [255; 4]
        } else {
            first[0] == 0xff || self.saddr.words == [0; 4]
        }
    }

    /// Whether an answer (a reset, an ICMP error) may go to the source:
    /// not a martian, nor an IPv4 class E address (RFC 1122 3.2.2, RFC
    /// 4443 2.4 (e)).
    pub(crate) fn answerable_source(&self) -> bool {
        !self.martian_source()
            && (self.family != FAMILY_V4 || self.saddr.words[0].to_ne_bytes()[0] < 240)
    }
}

const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;
pub(crate) const IPPROTO_FRAGMENT: u8 = 44;
pub(crate) const IPV6_FRAGMENT_HLEN: usize = 8;

/// Why a packet is passed untouched (or, for `Stat::DroppedLoopback`,
/// dropped): its stats counter.
pub(crate) type PassReason = Stat;

/// Parses an Ethernet frame carrying IPv4 or IPv6 and TCP or UDP into `out`
/// (per-CPU scratch memory: see `types::Scratch`).
///
/// A packet with a loopback source or destination is refused first, before
/// anything else about it is looked at (fragments and extension headers
/// included): the TC programs only see packets from outside the host, where
/// a loopback address is always forged.
// Not inlined: its locals stay out of the callers' frames.
#[inline(never)]
pub(crate) fn parse(ctx: &TcContext, out: &mut Packet) -> Result<(), PassReason> {
    *out = parse_frame(ctx)?;
    Ok(())
}

#[inline(always)]
fn parse_frame(ctx: &TcContext) -> Result<Packet, PassReason> {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: reading a context field, checked by the verifier. skb->protocol
    // is the ethertype after any VLAN tag the driver took off.
    let protocol = u16::from_be(unsafe { (*skb).protocol } as u16);
    match protocol {
        ETH_P_IP => parse_ipv4(ctx, ETH_HLEN),
        ETH_P_IPV6 => parse_ipv6(ctx, ETH_HLEN),
        _ => Err(Stat::PassNotIp),
    }
}

fn parse_ipv4(ctx: &TcContext, l3_off: usize) -> Result<Packet, PassReason> {
    let header: [u8; 20] = read(ctx, l3_off)?;
    if header[0] >> 4 != 4 {
        return Err(Stat::PassNotIp);
    }
    if header[IPV4_SADDR_OFF] == 127 || header[IPV4_DADDR_OFF] == 127 {
        return Err(Stat::DroppedLoopback);
    }
    let header_len = ((header[0] & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Err(Stat::PassTruncated);
    }
    // The datagram must fit in the frame (trailing padding is fine) and hold
    // its own header; a length beyond the frame would make us read and
    // rewrite bytes that are not part of it.
    let total_len = match u16::from_be_bytes([header[2], header[3]]) as usize {
        0 if big_tcp(ctx, header[9]) => ctx.len() as usize - l3_off,
        length => length,
    };
    if total_len < header_len || l3_off + total_len > ctx.len() as usize {
        return Err(Stat::PassTruncated);
    }
    let word =
        |i: usize| u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (saddr, daddr) = (
        Addr::v4(word(IPV4_SADDR_OFF)),
        Addr::v4(word(IPV4_DADDR_OFF)),
    );
    let proto = header[9];
    // Only the first fragment carries the ports: later ones follow the
    // translation of their first (see `fragments`).
    let flags_offset = u16::from_be_bytes([header[6], header[7]]);
    let frag_id = u16::from_be_bytes([header[4], header[5]]) as u32;
    let more = flags_offset & IPV4_MORE_FRAGMENTS != 0;
    if flags_offset & IPV4_OFFSET_MASK != 0 {
        let fragment = if more { LATER_FRAGMENT } else { LAST_FRAGMENT };
        return later_fragment(
            ctx, FAMILY_V4, proto, saddr, daddr, l3_off, frag_id, fragment,
        );
    }
    let fragment = if more { FIRST_FRAGMENT } else { WHOLE };
    let mut pkt = transport(
        ctx,
        FAMILY_V4,
        proto,
        saddr,
        daddr,
        l3_off,
        l3_off + header_len,
        l3_off + total_len,
    )?;
    pkt.fragment = fragment;
    pkt.frag_id = frag_id;
    Ok(pkt)
}

/// Whether an IP length of 0 means BIG TCP: GRO (kernel 6.3+) aggregates a
/// TCP flow's packets into GSO skbs over 64 KiB, whose IPv4 `tot_len` or
/// IPv6 `payload_len` is 0 and whose length is the skb's (the kernel's own
/// `iph_totlen` and `ipv6_payload_len` read it so). Otherwise a length of 0
/// is malformed. Passed untouched, a BIG TCP packet of a tracked flow would
/// leave untranslated mid-flow.
#[inline(always)]
fn big_tcp(ctx: &TcContext, proto: u8) -> bool {
    // SAFETY: reading a context field, checked by the verifier.
    proto == IPPROTO_TCP && unsafe { (*ctx.skb.skb).gso_size } != 0
}

/// `T` read from the packet at `offset`: in place when the linear part holds
/// it, else through `bpf_skb_load_bytes`. Not for a single byte: LLVM turns
/// `start + 1 <= end` into `start < end`, which the verifier does not take as
/// a proof that the byte is there.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, PassReason> {
    // Bounded for the verifier (headers end well before 256 bytes).
    if offset < 256 {
        let (start, end) = (ctx.data() + offset, ctx.data_end());
        if start + size_of::<T>() <= end {
            // SAFETY: inside the packet's linear part (checked just above).
            return Ok(unsafe { (start as *const T).read_unaligned() });
        }
    }
    ctx.load(offset).map_err(|_| Stat::PassTruncated)
}

/// A fragment after the first (`fragment`: `LATER_FRAGMENT` or
/// `LAST_FRAGMENT`): only addresses, protocol and identification.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn later_fragment(
    ctx: &TcContext,
    family: u8,
    proto: u8,
    saddr: Addr,
    daddr: Addr,
    l3_off: usize,
    frag_id: u32,
    fragment: u8,
) -> Result<Packet, PassReason> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Stat::PassFragment);
    }
    Ok(Packet {
        family,
        proto,
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        seq: 0,
        ack: 0,
        seq_end: 0,
        l3_off,
        l4_off: l3_off,
        len: ctx.len(),
        fragment,
        frag_id,
        now: 0,
        from_uplink: false,
        opening: false,
        redirect_mask: 0,
    })
}

fn parse_ipv6(ctx: &TcContext, l3_off: usize) -> Result<Packet, PassReason> {
    let header: [u32; 10] = read(ctx, l3_off)?;
    let first = header[0].to_ne_bytes();
    if first[0] >> 4 != 6 {
        return Err(Stat::PassNotIp);
    }
    let saddr = Addr::v6([header[2], header[3], header[4], header[5]]);
    let daddr = Addr::v6([header[6], header[7], header[8], header[9]]);
    if saddr.is_loopback(FAMILY_V6) || daddr.is_loopback(FAMILY_V6) {
        return Err(Stat::DroppedLoopback);
    }
    let second = header[1].to_ne_bytes();
    let next_header = second[2];
    let l3_end = match u16::from_be_bytes([second[0], second[1]]) as usize {
        0 if big_tcp(ctx, next_header) => ctx.len() as usize,
        length => l3_off + IPV6_HLEN + length,
    };
    if l3_end > ctx.len() as usize {
        return Err(Stat::PassTruncated);
    }
    // A Fragment header right after the fixed header is followed (the
    // common case: the sender's own fragmentation); other extension headers
    // are passed untouched: translating them would need a bounded walk for
    // little gain.
    let (mut proto, mut l4_off, mut fragment, mut frag_id) =
        (next_header, l3_off + IPV6_HLEN, WHOLE, 0);
    if next_header == IPPROTO_FRAGMENT {
        let header: [u8; IPV6_FRAGMENT_HLEN] = read(ctx, l3_off + IPV6_HLEN)?;
        proto = header[0];
        l4_off += IPV6_FRAGMENT_HLEN;
        frag_id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let offset_more = u16::from_be_bytes([header[2], header[3]]);
        if offset_more & !0x7 != 0 {
            let fragment = if offset_more & 1 != 0 {
                LATER_FRAGMENT
            } else {
                LAST_FRAGMENT
            };
            return later_fragment(
                ctx, FAMILY_V6, proto, saddr, daddr, l3_off, frag_id, fragment,
            );
        }
        if offset_more & 1 != 0 {
            fragment = FIRST_FRAGMENT;
        }
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(match proto {
            0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 => Stat::PassIpv6Extension,
            _ => Stat::PassNotTcpUdp,
        });
    }
    let mut pkt = transport(ctx, FAMILY_V6, proto, saddr, daddr, l3_off, l4_off, l3_end)?;
    pkt.fragment = fragment;
    pkt.frag_id = frag_id;
    Ok(pkt)
}

// Inlined: eight arguments (a BPF call takes five).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transport(
    ctx: &TcContext,
    family: u8,
    proto: u8,
    saddr: Addr,
    daddr: Addr,
    l3_off: usize,
    l4_off: usize,
    l3_end: usize,
) -> Result<Packet, PassReason> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Stat::PassNotTcpUdp);
    }
    // The whole fixed transport header, checksum included, must be there:
    // a packet we could not rewrite must not start a flow.
    let l4_min = if proto == IPPROTO_TCP { 20 } else { 8 };
    if l4_off + l4_min > l3_end {
        return Err(Stat::PassTruncated);
    }
    // TCP: the ports through the flags in one read.
    let (ports, tcp_flags, seq, ack, seq_end) = if proto == IPPROTO_TCP {
        let head: [u8; TCP_FLAGS_OFF + 1] = read(ctx, l4_off)?;
        let port = |i: usize| u16::from_ne_bytes([head[i], head[i + 1]]);
        let word = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let flags = head[TCP_FLAGS_OFF];
        // A data offset below the fixed header's 5 words is malformed;
        // the length then counts from the fixed header's end.
        let header_len = ((head[TCP_FLAGS_OFF - 1] >> 4) as usize * 4).max(20);
        let mut length = l3_end.saturating_sub(l4_off).saturating_sub(header_len) as u32;
        length += (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        let seq = word(4);
        (
            [port(0), port(2)],
            flags,
            seq,
            word(8),
            seq.wrapping_add(length),
        )
    } else {
        (read::<[u16; 2]>(ctx, l4_off)?, 0, 0, 0, 0)
    };
    Ok(Packet {
        family,
        proto,
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
        seq,
        ack,
        seq_end,
        l3_off,
        l4_off,
        len: ctx.len(),
        fragment: WHOLE,
        frag_id: 0,
        now: 0,
        from_uplink: false,
        opening: false,
        redirect_mask: 0,
    })
}

/// IPv4: writes the address and the IPv4 header checksum in place, once
/// the TCP/UDP checksum was updated (by the helper, which knows whether the
/// skb's checksum is complete, partial or unchecked, and which made the
/// headers up to that checksum writable and linear). Two helper calls fewer
/// per rewrite; a CHECKSUM_COMPLETE skb's csum stays right, because the
/// header checksum cancels the address change. The header is at a constant
/// offset (it follows an Ethernet header: see `parse_frame`). Nothing is
/// written at a variable offset (see `store_port`): kernel 6.1's verifier
/// loses the bound of a variable offset that the compiler spills to the
/// stack.
#[inline(always)]
fn store_v4_address(ctx: &TcContext, end: End, to: u32) -> Result<(), i64> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + 20 > data_end {
        return Err(-1);
    }
    let addr_off = match end {
        End::Source => IPV4_SADDR_OFF,
        End::Destination => IPV4_DADDR_OFF,
    };
    let ip = data + ETH_HLEN;
    // SAFETY: inside the packet (checked against data_end above).
    unsafe {
        let addr = (ip + addr_off) as *mut u32;
        let check = (ip + IPV4_CSUM_OFF) as *mut u16;
        let from = addr.read_unaligned();
        check.write_unaligned(csum_replace4(check.read_unaligned(), from, to));
        addr.write_unaligned(to);
    }
    Ok(())
}

/// Writes a port: in place when the transport header follows an IPv4
/// header without options (a constant offset, the ports' word read and
/// written whole, so that which port changes is not an offset either: see
/// `store_v4_address` on 6.1's verifier and variable offsets), else with
/// the store helper. The checksum helper before it made the header
/// writable. One helper call fewer on nearly every rewrite.
#[inline(always)]
fn store_port(ctx: &TcContext, pkt: &Packet, end: End, port: u16) -> Result<(), i64> {
    const L4_OFF: usize = ETH_HLEN + 20;
    if pkt.family == FAMILY_V4 && pkt.l4_off == L4_OFF {
        let (data, data_end) = (ctx.data(), ctx.data_end());
        if data + L4_OFF + 4 > data_end {
            return Err(-1);
        }
        // SAFETY: inside the packet (checked against data_end above).
        unsafe {
            let ports = (data + L4_OFF) as *mut [u16; 2];
            let mut value = ports.read_unaligned();
            match end {
                End::Source => value[0] = port,
                End::Destination => value[1] = port,
            }
            ports.write_unaligned(value);
        }
        return Ok(());
    }
    let port_off = pkt.l4_off
        + match end {
            End::Source => 0,
            End::Destination => 2,
        };
    ctx.store(port_off, &port, 0)
}

/// An Internet checksum after a 32-bit word of what it covers changed from
/// `from` to `to` (RFC 1624), all in the packet's byte order.
#[inline(always)]
fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let mut sum = (!check) as u32 + (!from & 0xffff) + (!from >> 16) + (to & 0xffff) + (to >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Gives a later fragment the addresses of its translated first fragment:
/// the IPv4 header checksum follows; there is no transport header (and so
/// no L4 checksum: its pseudo-header change was applied to the first).
#[inline(never)]
pub(crate) fn rewrite_addresses(ctx: &TcContext, pkt: &Packet, saddr: &Addr, daddr: &Addr) -> bool {
    rewrite_address(ctx, pkt, End::Source, saddr).is_ok()
        && rewrite_address(ctx, pkt, End::Destination, daddr).is_ok()
}

#[inline(always)]
fn rewrite_address(ctx: &TcContext, pkt: &Packet, end: End, addr: &Addr) -> Result<(), i64> {
    let old = match end {
        End::Source => &pkt.saddr,
        End::Destination => &pkt.daddr,
    };
    if old == addr {
        return Ok(());
    }
    if pkt.family == FAMILY_V4 {
        let addr_off = pkt.l3_off
            + match end {
                End::Source => IPV4_SADDR_OFF,
                End::Destination => IPV4_DADDR_OFF,
            };
        let (from, to) = (old.words[0], addr.words[0]);
        ctx.l3_csum_replace(pkt.l3_off + IPV4_CSUM_OFF, from as u64, to as u64, 4)?;
        ctx.store(addr_off, &to, 0)?;
    } else {
        let addr_off = pkt.l3_off
            + match end {
                End::Source => IPV6_SADDR_OFF,
                End::Destination => IPV6_DADDR_OFF,
            };
        // IPv6 has no header checksum to cancel the change out: with
        // BPF_F_RECOMPUTE_CSUM the helper keeps a CHECKSUM_COMPLETE skb's
        // csum right.
        ctx.store(addr_off, &addr.words, BPF_F_RECOMPUTE_CSUM)?;
    }
    Ok(())
}

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port, updating the IPv4
/// header checksum and the TCP/UDP checksum (whose pseudo-header covers the
/// addresses) incrementally. The kernel helpers keep checksums right
/// whether the packet's checksum is complete or left to the NIC (partial).
///
/// True when the packet was rewritten. A function of its own, so that its
/// locals stay out of its callers' frames (the stack is limited to 512
/// bytes); a bool, as a Result would be a sixth BPF argument.
#[inline(never)]
pub(crate) fn rewrite(ctx: &TcContext, pkt: &Packet, end: End, addr: &Addr, port: u16) -> bool {
    rewrite_fields(ctx, pkt, end, addr, port).is_ok()
}

#[inline(always)]
fn rewrite_fields(
    ctx: &TcContext,
    pkt: &Packet,
    end: End,
    addr: &Addr,
    port: u16,
) -> Result<(), i64> {
    let (old_addr, old_port) = match end {
        End::Source => (pkt.saddr, pkt.sport),
        End::Destination => (pkt.daddr, pkt.dport),
    };
    let csum_off = pkt.l4_off
        + if pkt.proto == IPPROTO_TCP {
            TCP_CSUM_OFF
        } else {
            UDP_CSUM_OFF
        };
    let l4_flags = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    // An address word changes the TCP/UDP checksum through the pseudo-header.
    let pseudo_header_word = |from: u32, to: u32| {
        ctx.l4_csum_replace(
            csum_off,
            from as u64,
            to as u64,
            BPF_F_PSEUDO_HDR | l4_flags | 4,
        )
    };
    if pkt.family == FAMILY_V4 {
        // The address itself is written last, in place (`store_v4_address`).
        pseudo_header_word(old_addr.words[0], addr.words[0])?;
    } else {
        let addr_off = pkt.l3_off
            + match end {
                End::Source => IPV6_SADDR_OFF,
                End::Destination => IPV6_DADDR_OFF,
            };
        // One word at a time: the helper takes 2- or 4-byte differences.
        for i in 0..4 {
            let (from, to) = (old_addr.words[i], addr.words[i]);
            if from != to {
                pseudo_header_word(from, to)?;
            }
        }
        // IPv6 has no header checksum to cancel the change out: with
        // BPF_F_RECOMPUTE_CSUM the helper keeps a CHECKSUM_COMPLETE skb's
        // csum right.
        ctx.store(addr_off, &addr.words, BPF_F_RECOMPUTE_CSUM)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, old_port as u64, port as u64, l4_flags | 2)?;
        store_port(ctx, pkt, end, port)?;
    }
    if pkt.family == FAMILY_V4 {
        store_v4_address(ctx, end, addr.words[0])?;
    }
    Ok(())
}
