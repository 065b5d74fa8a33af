//! IP fragments on the TC path. Only a datagram's first fragment carries
//! the TCP/UDP header, so only it can be matched to a flow. When a first
//! fragment is translated, the addresses it was given are remembered under
//! (addresses, protocol, IP identification) as the fragments carry them; the
//! later fragments of the same datagram get the same addresses (and the
//! IPv4 header checksum), and go where the first went. The L4 checksum
//! covers the whole datagram, but it lives in the first fragment, whose
//! rewrite already applied the pseudo-header change.
//!
//! Entries live until the datagram's last fragment (the one without "more
//! fragments") is translated, at most `FRAGMENT_TIMEOUT_NS`, in an LRU map,
//! and serve only fragments that come in on the interface the first one
//! came in on. Forgotten at the last fragment, they leave the map's free
//! elements to the next datagrams: a map that every datagram left full
//! took each new one's element from the LRU's lists by eviction. A later fragment that
//! arrives before its first (reordered on the way) matches nothing: it is
//! passed to the host untouched and counted, and its datagram is lost (the
//! sender's retry, or the application's, carries it). Nothing is held back:
//! a queue of early fragments would cost memory and per-CPU state for a case
//! that a LAN almost never shows.

use portfwd_common::{
    CT_FLAG_MASQ, CT_FLAG_REPLY, CtValue, FRAGMENT_FLAG_CLASH, FRAGMENT_FLAG_REPLY,
    FRAGMENT_TIMEOUT_NS, FragmentKey, FragmentValue,
};

use crate::{
    maps::{FRAGMENTS, SCRATCH},
    packet::Packet,
};

/// The key of `pkt`'s datagram, written in scratch memory.
#[inline(always)]
fn key_of(pkt: &Packet) -> Option<&'static mut FragmentKey> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU memory that only this program run uses; the key's
    // field only.
    let key = unsafe { &mut (*scratch).frag_key };
    set_key(key, pkt);
    Some(key)
}

fn set_key(key: &mut FragmentKey, pkt: &Packet) {
    key.saddr = pkt.saddr;
    key.daddr = pkt.daddr;
    key.id = pkt.frag_id;
    key.proto = pkt.proto;
    key.family = pkt.family;
    key._pad = 0;
}

/// Remembers how the first fragment `pkt` of a datagram is translated, from
/// the conntrack entry `ct` of its own direction; `ifindex` is where it is
/// redirected (0: the stack routes it). Best effort: when the map refuses,
/// the later fragments are passed and counted.
// Not inlined: its locals stay out of the translating functions' frames.
#[inline(never)]
pub(crate) fn remember(pkt: &Packet, ct: &CtValue, ifindex: u32, ingress_ifindex: u32, now: u64) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU memory that only this program run uses; fields other
    // than the packet and the conntrack entry under construction.
    let (key, value) = unsafe { (&mut (*scratch).frag_key, &mut (*scratch).frag_value) };
    let masq = ct.flags & CT_FLAG_MASQ != 0;
    if ct.flags & CT_FLAG_REPLY != 0 {
        value.saddr = ct.nat_addr;
        value.daddr = if masq { ct.masq_addr } else { pkt.daddr };
        value.flags = FRAGMENT_FLAG_REPLY;
    } else {
        value.saddr = if masq { ct.masq_addr } else { pkt.saddr };
        value.daddr = ct.nat_addr;
        value.flags = 0;
    }
    value.service = ct.service;
    value.ifindex = ifindex;
    value.ingress_ifindex = ingress_ifindex;
    value.first_seen_ns = now;
    set_key(key, pkt);
    // Another live datagram with this key, translated otherwise (two
    // clients behind one address, or a forger, with one identification):
    // its later fragments and this one's look alike, so neither's go
    // anywhere (the host's reassembly would lose both), where replacing its
    // entry would deliver them into this datagram's container. Until the
    // entry expires: a first fragment sent again (a duplicate on the way, a
    // forger's) does not take a clash back. The entry then stays until a
    // new datagram replaces it or the LRU takes its room (no last fragment
    // is translated to forget it).
    if let Some(other) = FRAGMENTS.get_ptr_mut(&*key) {
        // SAFETY: a pointer into the map value, valid for this program run.
        let other = unsafe { &mut *other };
        if now.saturating_sub(other.first_seen_ns) <= FRAGMENT_TIMEOUT_NS
            && (other.flags & FRAGMENT_FLAG_CLASH != 0
                || other.saddr != value.saddr
                || other.daddr != value.daddr
                || other.ifindex != value.ifindex)
        {
            other.flags |= FRAGMENT_FLAG_CLASH;
            return;
        }
    }
    let _ = FRAGMENTS.insert(key, value, 0);
}

/// The datagram of the first fragment `pkt`, remembered as redirected,
/// went to the stack instead (a new flow's, too big for the container's
/// link: `tc::new_flow`): its later fragments follow it there.
#[inline(never)]
pub(crate) fn to_stack(pkt: &Packet) {
    let Some(key) = key_of(pkt) else {
        return;
    };
    if let Some(value) = FRAGMENTS.get_ptr_mut(key) {
        // SAFETY: a pointer into the map value, valid for this program run.
        unsafe { (*value).ifindex = 0 };
    }
}

/// Forgets the datagram of `pkt`, its last fragment (see the module doc): a
/// middle fragment that comes after it (reordered on the way) matches
/// nothing, as one that comes before the first.
#[inline(always)]
pub(crate) fn forget(pkt: &Packet) {
    if let Some(key) = key_of(pkt) {
        let _ = FRAGMENTS.remove(key);
    }
}

/// The translation of the later fragment `pkt`'s datagram, if its first
/// fragment was translated less than `FRAGMENT_TIMEOUT_NS` ago.
#[inline(always)]
pub(crate) fn lookup(pkt: &Packet, ingress_ifindex: u32, now: u64) -> Option<*const FragmentValue> {
    let key = key_of(pkt)?;
    let value = FRAGMENTS.get_ptr(key)?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let (first_seen, ingress) = unsafe { ((*value).first_seen_ns, (*value).ingress_ifindex) };
    // SAFETY: as above.
    let clash = unsafe { (*value).flags } & FRAGMENT_FLAG_CLASH != 0;
    if now.saturating_sub(first_seen) > FRAGMENT_TIMEOUT_NS || ingress != ingress_ifindex || clash {
        return None;
    }
    Some(value)
}
