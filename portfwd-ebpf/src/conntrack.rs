//! portfwd's own connection tracking for the TC path: two entries per flow,
//! keyed on the whole flow as each direction's packets carry it, in an LRU
//! map (a full map evicts the least recently used flow).
//!
//! Keying replies on the whole flow, not just on the container address,
//! matters: the socket programs also connect host processes to the same
//! containers, and their replies must not be rewritten.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use portfwd_common::{
    Addr, CT_FLAG_CLOSING, CT_FLAG_REPLY, CT_TCP_CLOSING_NS, CT_TCP_IDLE_NS, CT_UDP_IDLE_NS, CtKey,
    CtValue, IPPROTO_TCP, ServiceKey,
};

use crate::{
    maps::CONNTRACK,
    packet::{Packet, TCP_FIN, TCP_RST},
};

/// Refresh `last_seen_ns` at most this often: every write to a shared entry
/// bounces its cache line between CPUs.
const REFRESH_NS: u64 = 1_000_000_000;

pub fn now() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

pub fn key_of(pkt: &Packet) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: 0,
    }
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

/// The reply direction's key of a flow whose forward packet is `pkt`,
/// once its destination is rewritten to `backend:backend_port`.
pub fn reply_key(pkt: &Packet, backend: Addr, backend_port: u16) -> CtKey {
    CtKey {
        saddr: backend,
        daddr: pkt.saddr,
        sport: backend_port,
        dport: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: 0,
    }
}

/// Creates both entries of a new flow. Either both exist afterwards or the
/// flow is not tracked (the caller then passes the packet untouched).
// Inlined: a BPF-to-BPF call takes at most five arguments.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn create(
    pkt: &Packet,
    service: &ServiceKey,
    backend: Addr,
    backend_port: u16,
    backend_ifindex: u32,
    uplink_ifindex: u32,
    now: u64,
) -> Result<(), i32> {
    // One value and one key, rewritten in place for the second entry:
    // the stack is limited to 512 bytes.
    let mut value = CtValue {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        flags: CT_FLAG_REPLY,
        _pad: 0,
        ifindex: uplink_ifindex,
        service: *service,
        last_seen_ns: now,
        closing_since_ns: 0,
    };
    let mut key = reply_key(pkt, backend, backend_port);
    CONNTRACK.insert(&key, &value, 0)?;
    let reply = key;
    value.nat_addr = backend;
    value.nat_port = backend_port;
    value.flags = 0;
    value.ifindex = backend_ifindex;
    key = key_of(pkt);
    if let Err(error) = CONNTRACK.insert(&key, &value, 0) {
        let _ = CONNTRACK.remove(&reply);
        return Err(error);
    }
    Ok(())
}

/// Forgets a flow, given either direction's key and entry.
pub fn remove(key: &CtKey, ct: &CtValue) {
    let other = if ct.flags & CT_FLAG_REPLY != 0 {
        // Reply entry: the forward key is (client -> published address).
        CtKey {
            saddr: key.daddr,
            daddr: ct.nat_addr,
            sport: key.dport,
            dport: ct.nat_port,
            ..*key
        }
    } else {
        CtKey {
            saddr: ct.nat_addr,
            daddr: key.saddr,
            sport: ct.nat_port,
            dport: key.sport,
            ..*key
        }
    };
    let _ = CONNTRACK.remove(key);
    let _ = CONNTRACK.remove(&other);
}
