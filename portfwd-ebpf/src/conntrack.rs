//! portfwd's own connection tracking for the TC path: two entries per flow,
//! keyed on the whole flow as each direction's packets carry it, in an LRU
//! map (a full map evicts the least recently used flow).
//!
//! Keying replies on the whole flow, not just on the container address,
//! matters: the socket programs also connect host processes to the same
//! containers, and their replies must not be rewritten.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use portfwd_common::{
    Addr, CT_FLAG_CLOSING, CT_FLAG_MASQ, CT_FLAG_REPLY, CT_TCP_CLOSING_NS, CT_TCP_IDLE_NS,
    CT_UDP_IDLE_NS, CtKey, CtValue, FragmentKey, FragmentValue, IPPROTO_TCP, ServiceKey,
};

use crate::{
    maps::{CONNTRACK, SCRATCH},
    packet::{Packet, TCP_FIN, TCP_RST},
};

/// Per-CPU memory of one TC program run (the `pf_scratch` map): the parsed
/// packet and its flow key, and a conntrack entry under construction.
///
/// The verifier limits the stack of a whole BPF-to-BPF call chain to 512
/// bytes; kept in the main frame, the packet and its key made the chain
/// `tc program -> start_flow -> rewrite` too deep (and how deep depends on
/// the LLVM that links the object). Kernel 6.1's verifier, which counts
/// each frame rounded up to 32 bytes, rejected it at 544. Here they cost no
/// stack at all: the deepest chain needs 448 bytes there.
pub struct Scratch {
    pub pkt: Packet,
    pub flow_key: CtKey,
    pub key: CtKey,
    pub value: CtValue,
    pub frag_key: FragmentKey,
    pub frag_value: FragmentValue,
}

/// Refresh `last_seen_ns` at most this often: every write to a shared entry
/// bounces its cache line between CPUs.
const REFRESH_NS: u64 = 1_000_000_000;

pub fn now() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// The live entry for this packet's flow, or None (absent or expired).
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer is into the map value, valid for this program run.
    let value = unsafe { &*entry };
    if expired(key.proto, value, now) {
        return None;
    }
    Some(entry)
}

fn expired(proto: u8, ct: &CtValue, now: u64) -> bool {
    let idle = now.saturating_sub(ct.last_seen_ns);
    if proto == IPPROTO_TCP {
        if ct.flags & CT_FLAG_CLOSING != 0 {
            return now.saturating_sub(ct.closing_since_ns) > CT_TCP_CLOSING_NS;
        }
        idle > CT_TCP_IDLE_NS
    } else {
        idle > CT_UDP_IDLE_NS
    }
}

/// Records that a packet of the flow went by: refreshes the idle timer and
/// notes the start of a TCP close. Other CPUs may write the same entry; a
/// lost update only shifts a timestamp.
pub fn touch(entry: *mut CtValue, pkt: &Packet, now: u64) {
    // SAFETY: the pointer is into the map value, valid for this program run.
    let ct = unsafe { &mut *entry };
    if now.saturating_sub(ct.last_seen_ns) > REFRESH_NS {
        ct.last_seen_ns = now;
    }
    if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 && ct.flags & CT_FLAG_CLOSING == 0 {
        ct.flags |= CT_FLAG_CLOSING;
        ct.closing_since_ns = now;
    }
}

/// Where a new flow goes: the container, and for a hairpin flow the
/// source it is masqueraded to.
pub struct Nat {
    pub backend: Addr,
    pub backend_port: u16,
    pub backend_ifindex: u32,
    /// The interface the flow came in on (its replies go back there).
    pub client_ifindex: u32,
    /// Hairpin: the (host address, port) the client is rewritten to.
    pub masq: Option<(Addr, u16)>,
}

/// The key of the packet's own flow (the forward direction of a new one).
pub fn set_key(key: &mut CtKey, pkt: &Packet) {
    key.saddr = pkt.saddr;
    key.daddr = pkt.daddr;
    key.sport = pkt.sport;
    key.dport = pkt.dport;
    key.proto = pkt.proto;
    key.family = pkt.family;
    key._pad = 0;
}

/// The key of the reply direction: the container answering whoever it saw
/// as the client (the client itself, or the masquerade address).
fn set_reply_key(key: &mut CtKey, pkt: &Packet, nat: &Nat) {
    let (client, client_port) = nat.masq.unwrap_or((pkt.saddr, pkt.sport));
    key.saddr = nat.backend;
    key.daddr = client;
    key.sport = nat.backend_port;
    key.dport = client_port;
    key.proto = pkt.proto;
    key.family = pkt.family;
    key._pad = 0;
}

/// Creates both entries of a new flow. Either both exist afterwards or the
/// flow is not tracked (the caller then passes the packet untouched). On
/// success, the forward entry as inserted (in scratch memory, valid until
/// the next `create`).
// Inlined into its one caller, whose values it reuses; the entry itself is
// built in scratch memory (the stack is limited to 512 bytes).
#[inline(always)]
pub fn create(
    pkt: &Packet,
    service: &ServiceKey,
    nat: &Nat,
    now: u64,
) -> Result<*const CtValue, i32> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(-1)?;
    // SAFETY: per-CPU memory that only this program run uses; fields other
    // than the packet (which `pkt` may point to).
    let (key, value) = unsafe { (&mut (*scratch).key, &mut (*scratch).value) };
    let (masq_flag, masq_addr, masq_port) = match nat.masq {
        Some((addr, port)) => (CT_FLAG_MASQ, addr, port),
        None => (0, Addr::UNSPECIFIED, 0),
    };
    // Field by field: a struct literal would be built on the stack first.
    set_reply_key(key, pkt, nat);
    value.nat_addr = pkt.daddr;
    value.nat_port = pkt.dport;
    value.flags = CT_FLAG_REPLY | masq_flag;
    value._pad = 0;
    value.ifindex = nat.client_ifindex;
    value.service = *service;
    value.masq_addr = pkt.saddr;
    value.masq_port = pkt.sport;
    value._pad2 = 0;
    value.last_seen_ns = now;
    value.closing_since_ns = 0;
    CONNTRACK.insert(&*key, &*value, 0)?;
    // The forward entry: the same, but for the other direction.
    value.nat_addr = nat.backend;
    value.nat_port = nat.backend_port;
    value.flags = masq_flag;
    value.ifindex = nat.backend_ifindex;
    value.masq_addr = masq_addr;
    value.masq_port = masq_port;
    set_key(key, pkt);
    if let Err(error) = CONNTRACK.insert(&*key, &*value, 0) {
        set_reply_key(key, pkt, nat);
        let _ = CONNTRACK.remove(&*key);
        return Err(error);
    }
    Ok(&*value)
}

/// Forgets a flow, given either direction's key and entry.
pub fn remove(key: &CtKey, ct: &CtValue) {
    let masq = ct.flags & CT_FLAG_MASQ != 0;
    let other = if ct.flags & CT_FLAG_REPLY != 0 {
        // Reply entry (container -> client as it saw it): the forward key is
        // (client -> published address); with masquerade the client is in
        // masq_addr.
        let (client, client_port) = if masq {
            (ct.masq_addr, ct.masq_port)
        } else {
            (key.daddr, key.dport)
        };
        CtKey {
            saddr: client,
            daddr: ct.nat_addr,
            sport: client_port,
            dport: ct.nat_port,
            ..*key
        }
    } else {
        let (client, client_port) = if masq {
            (ct.masq_addr, ct.masq_port)
        } else {
            (key.saddr, key.sport)
        };
        CtKey {
            saddr: ct.nat_addr,
            daddr: client,
            sport: ct.nat_port,
            dport: client_port,
            ..*key
        }
    };
    let _ = CONNTRACK.remove(key);
    let _ = CONNTRACK.remove(&other);
}
