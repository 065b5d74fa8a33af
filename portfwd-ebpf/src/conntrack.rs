//! portfwd's own connection tracking for the TC path: two entries per flow,
//! keyed on the whole flow as each direction's packets carry it, in an LRU
//! map (a full map evicts the least recently used flow).
//!
//! Keying replies on the whole flow, not just on the container address,
//! matters: the socket programs also connect host processes to the same
//! containers, and their replies must not be rewritten.
//!
//! A flow starts in a table of its own, `CONNTRACK_OPENING`, and moves to
//! `CONNTRACK` once its client showed it receives the container's packets
//! (`promote`): a TCP flow when its handshake completes, a UDP flow at the
//! client's first datagram after the container answered. A flood from
//! spoofed sources, which never complete a handshake nor go on after an
//! answer they do not receive, then churns only the opening table, and no
//! established flow is evicted for it (an LRU evicts the least recently
//! used entries, which are the idle established flows'), as netfilter's
//! full table drops only unassured entries. A flow's two entries are in the
//! same table (between `promote`'s insertions and its removals, in both);
//! `Packet::opening` says which one a packet's flow was found in.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::maps::LruHashMap;

use portfwd_common::{
    Addr, CT_FLAG_ANSWERED, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_FIN, CT_FLAG_HOST,
    CT_FLAG_MASQ, CT_FLAG_NAT46, CT_FLAG_REPLY, CT_MORE_FIN_ACKED, CT_MORE_RESET,
    CT_MORE_SYN_PASSED, CtKey, CtValue, FAMILY_V4, FAMILY_V6, IPPROTO_TCP, MASQ_FLOWS_NONE_AFTER,
    MASQ_FLOWS_STARTED, ServiceKey, Stat,
};

use crate::{
    clock::now,
    maps::{
        BACKEND_PORTS, CONNTRACK, CONNTRACK_OPENING, MASQ_FLOWS, PUBLISHED_PORTS, SCRATCH,
        lacks_port,
    },
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, store_words},
    types::Nat,
    verdict::count,
};

/// `bpf_map_update_elem` flag: only if the key is not there yet.
const BPF_NOEXIST: u64 = 1;

/// Refresh `last_seen_ns` at most this often: every write to a shared entry
/// bounces its cache line between CPUs.
const REFRESH_NS: u64 = 1_000_000_000;

/// The live entry for this packet's flow and the time (read only on a
/// hit), or None (absent or expired). The opening table is asked after a
/// miss in the main one (an expired entry there may be an ended flow's,
/// not yet swept, whose ports a new flow took), and a hit there marks the
/// packet (`Packet::opening`).
#[inline(always)]
pub(crate) fn find(key: &CtKey) -> Option<(*mut CtValue, u64)> {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        let now = now();
        // SAFETY: the pointer is into the map value, valid for this run.
        if !unsafe { &*entry }.expired(key.proto, now) {
            return Some((entry, now));
        }
    }
    let entry = find_opening(key)?;
    Some((entry, now()))
}

/// `find` in the opening table, asked only for a packet that may belong to
/// a flow there: one to a published port (the client's side) or from a
/// container's port of a mapping (the container's), as the port bitmaps
/// say in one array read each. The host's own traffic pays no second
/// lookup. On a hit, the packet (in scratch memory, as `key`) is marked.
// Not inlined, and the packet not an argument: its values would take
// slots of the programs' frames (each within 32 bytes, see
// `tc::flow::start_flow`).
#[inline(never)]
fn find_opening(key: &CtKey) -> Option<*mut CtValue> {
    if lacks_port(&PUBLISHED_PORTS, key.proto, u16::from_be(key.dport))
        && lacks_port(&BACKEND_PORTS, key.proto, u16::from_be(key.sport))
    {
        return None;
    }
    let entry = live(&CONNTRACK_OPENING, key, now())?;
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU memory that only this program run uses: the packet
    // whose key this is. The callers hold it as `pkt`, and read the field
    // after this call.
    unsafe { (*scratch).pkt.opening = true };
    Some(entry)
}

/// The live entry under `key` in the main table, or None (absent or
/// expired).
pub(crate) fn lookup(key: &CtKey, now: u64) -> Option<*mut CtValue> {
    live(&CONNTRACK, key, now)
}

/// The live entry under `key` in either table (the opening table after the
/// main one), or None: for a key that a new flow would take (its
/// reply key), and for ICMP errors, whose flow may be opening.
// Inlined: as a call of its own it made the deepest chain (through
// `masquerade_port`) two frames deeper, past 6.1's 512 bytes.
#[inline(always)]
pub(crate) fn lookup_any(key: &CtKey, now: u64) -> Option<*mut CtValue> {
    match lookup(key, now) {
        Some(entry) => Some(entry),
        None => live(&CONNTRACK_OPENING, key, now),
    }
}

/// The live entry under `key` in `table`, or None (absent or expired).
// Inlined: the map is then a constant at each call (the verifier inlines
// the lookup of a map it knows).
#[inline(always)]
fn live(table: &LruHashMap<CtKey, CtValue>, key: &CtKey, now: u64) -> Option<*mut CtValue> {
    let entry = table.get_ptr_mut(key)?;
    // SAFETY: the pointer is into the map value, valid for this program run.
    if unsafe { &*entry }.expired(key.proto, now) {
        return None;
    }
    Some(entry)
}

/// Removes `key` from the opening table (`opening`) or the main one.
// Not inlined: inlined, the compiler chose the map early and kept its
// pointer across the callers' other calls, and a state that holds one map
// is never the same, for the verifier, as one that holds the other: every
// call below the choice was walked twice.
#[inline(never)]
pub(crate) fn remove_from(opening: bool, key: &CtKey) {
    if opening {
        let _ = CONNTRACK_OPENING.remove(key);
    } else {
        let _ = CONNTRACK.remove(key);
    }
}

/// A flow of the opening table whose client's packet of `key` (entry
/// `entry`) completed its TCP handshake, or came after the container
/// answered its UDP flow (`answered`): both entries move to the main
/// table, where only the LRU's pressure of established flows can evict
/// them. Inserted there first (a packet meanwhile finds them in either),
/// then removed from the opening table. A live entry of another flow under
/// either key in the main table (cannot happen: `masquerade_port` asks
/// both tables for the reply key, and the forward key is the client's)
/// stops the move: the flow stays where it is, and the next packet tries
/// again. Called after the packet is translated: the entry is read no
/// more.
#[inline(never)]
pub(crate) fn promote(key: &CtKey, entry: *mut CtValue, now: u64) {
    // SAFETY: the pointer is into the map value, valid for this program run.
    let ct = unsafe { &*entry };
    let Some((twin_key, twin, true)) = twin_entry_from(true, key, ct) else {
        return;
    };
    if !settle(twin_key, twin, now) {
        return;
    }
    if !settle(key, entry, now) {
        let _ = CONNTRACK.remove(twin_key);
        return;
    }
    let _ = CONNTRACK_OPENING.remove(twin_key);
    let _ = CONNTRACK_OPENING.remove(key);
}

/// The container's packet of a UDP flow in the opening table (its reply
/// entry `ct`, under `key`): both entries are marked answered, and the
/// client's next datagram, which finds the mark on its own entry, moves the
/// flow to the main table (`promote`). One lookup per flow, at its first
/// answer: a one-way flow's datagrams look nothing up.
// Not inlined: the lookup's locals stay out of the callers' frames.
#[inline(never)]
pub(crate) fn answered(key: &CtKey, ct: &mut CtValue) {
    if ct.flags & CT_FLAG_ANSWERED != 0 {
        return;
    }
    ct.flags |= CT_FLAG_ANSWERED;
    if let Some((_, twin, true)) = twin_entry_from(true, key, ct) {
        // SAFETY: a pointer into the map value, valid for this program run.
        unsafe { (*twin).flags |= CT_FLAG_ANSWERED };
    }
}

/// Inserts `value` under `key` in the main table, unless a live entry is
/// there.
#[inline(always)]
fn settle(key: &CtKey, value: *mut CtValue, now: u64) -> bool {
    // SAFETY: the pointer is into the map value, valid for this program run.
    let value = unsafe { &*value };
    if CONNTRACK.insert(key, value, BPF_NOEXIST).is_ok() {
        return true;
    }
    lookup(key, now).is_none() && CONNTRACK.insert(key, value, 0).is_ok()
}

/// Whether the flow of this entry lost its other entry (an LRU eviction,
/// or a one-way flow whose silent direction expired): then this entry is
/// removed, so that the packet starts the flow again (for TCP only a SYN
/// can). Asked at most once per `REFRESH_NS` per entry, and for every SYN;
/// a live twin's idle timer is refreshed with this entry's (not a flow's
/// marked by a reset, which only its sides' packets keep: `touch`), so
/// that the two directions of a one-way flow expire together, and an
/// established flow's reply entry is made established if it is not:
/// `establish`'s write to it, from another CPU, can be lost (to the
/// container's own update of its flags, to userspace rewriting the entry,
/// or to a program of the build before, during an upgrade), and without it
/// the reply entry would end after the SYN timeout while its flow lives
/// on. A container's packet also brings the client's mark up to what the
/// container acknowledges (`catch_up`).
#[inline(always)]
pub(crate) fn orphaned(key: &CtKey, entry: *mut CtValue, pkt: &Packet, syn: bool) -> bool {
    // SAFETY: the pointer is into the map value, valid for this program run.
    let ct = unsafe { &*entry };
    if !syn && pkt.now.saturating_sub(ct.last_seen_ns) <= REFRESH_NS {
        return false;
    }
    check_twin(key, entry, pkt)
}

#[inline(never)]
fn check_twin(key: &CtKey, entry: *mut CtValue, pkt: &Packet) -> bool {
    // SAFETY: the pointer is into the map value, valid for this program run.
    let ct = unsafe { &*entry };
    match twin_entry(key, ct) {
        Some((_, twin, _)) => {
            // Not for a flow marked by a reset, which only its sides'
            // packets keep (`touch`).
            if ct.more_flags & CT_MORE_RESET == 0 {
                // SAFETY: a pointer into the map value, valid for this
                // program run.
                unsafe { (*twin).last_seen_ns = pkt.now };
            }
            let (forward, reply) = if ct.flags & CT_FLAG_REPLY == 0 {
                (entry, twin)
            } else {
                // SAFETY: a pointer into the map value, valid for this
                // program run.
                catch_up(unsafe { &mut *twin }, ct, pkt);
                (twin, entry)
            };
            // SAFETY: pointers into the map values, valid for this program
            // run.
            unsafe {
                if (*forward).flags & CT_FLAG_ESTABLISHED != 0
                    && (*reply).flags & CT_FLAG_ESTABLISHED == 0
                {
                    (*reply).flags |= CT_FLAG_ESTABLISHED;
                }
                // A reset this entry took back (`reset_answered`) whose
                // mark stayed on the twin (the clearing write lost to
                // another CPU's): the flow would end at its first 10 s of
                // silence.
                if ct.more_flags & CT_MORE_RESET == 0
                    && pkt.tcp_flags & TCP_RST == 0
                    && (*twin).more_flags & CT_MORE_RESET != 0
                {
                    (*twin).more_flags &= !CT_MORE_RESET;
                }
            }
            false
        }
        None => {
            remove_from(pkt.opening, key);
            true
        }
    }
}

/// Whether a client's SYN that found the entry `ct` reuses the port of a
/// flow that ended (see `tc::ingress`): a forward entry of a flow closing
/// (both sides sent their FIN, or a reset before it was established), or
/// of a masqueraded one (hairpin, NAT46) whose client sent its FIN or that
/// a reset marked. A SYN on another flow may be forged, and changes nothing
/// of it (`touch`), as netfilter ignores a SYN on an established flow: a
/// client truly reusing its port meets the container's challenge ACK if
/// the container's connection lives, resets it, and its next SYN meets the
/// container's listener, whose SYN-ACK starts the flow again
/// (`restart_at_syn_ack`). A masqueraded flow has no room to remember the
/// SYN (`CT_MORE_SYN_PASSED`), and keeps the earlier rule.
#[inline(always)]
pub(crate) fn port_reused_by_syn(ct: &CtValue) -> bool {
    ct.flags & CT_FLAG_REPLY == 0
        && (ct.flags & CT_FLAG_CLOSING != 0
            || (ct.flags & CT_FLAG_MASQ != 0
                && (ct.flags & CT_FLAG_FIN != 0 || ct.more_flags & CT_MORE_RESET != 0)))
}

/// Refreshes the idle timer of an entry that has no state beyond it (a
/// `CT_FLAG_HOST` entry, UDP only), as `touch` does: at most once per
/// `REFRESH_NS`.
#[inline(always)]
pub(crate) fn refresh(entry: *mut CtValue, now: u64) {
    // SAFETY: the pointer is into the map value, valid for this program run.
    let ct = unsafe { &mut *entry };
    if now.saturating_sub(ct.last_seen_ns) > REFRESH_NS {
        ct.last_seen_ns = now;
    }
}

/// Records that a packet of the flow went by: refreshes the idle timer, and
/// for TCP follows the flow's state: where each side is, to within
/// `SEQ_MARK_STEP` (`advance`); the flow is established, both entries, by
/// the client's answer to the container's (`establish`); each entry is
/// closed by its own side's packets, the flow closing once both sides sent
/// a FIN (a half-close lives on) or at a RST before it is established, each
/// from where its side is (`closes_from_its_side`); a RST on an
/// established flow marks it to end unless a packet from where a side is
/// follows (`reset`); a SYN after the handshake changes nothing but the
/// container's SYN-ACK that acknowledges a client's (`restart_at_syn_ack`).
/// Only those steps need the other entry: the client's first packet after
/// its SYN, a RST and the packet after it, such a SYN-ACK, or any packet of
/// a side that closed already. Other CPUs may write the same entry; a lost
/// update shifts a timestamp, delays a state by a packet, or (the reply
/// entry's establishment) is made good by `check_twin` at the flow's next
/// packet after a second.
#[inline(always)]
pub(crate) fn touch(key: &CtKey, entry: *mut CtValue, pkt: &Packet, now: u64) -> Touched {
    // SAFETY: the pointer is into the map value, valid for this program run.
    let ct = unsafe { &mut *entry };
    if pkt.proto == IPPROTO_TCP && ct.flags & CT_FLAG_CLOSING == 0 {
        if pkt.tcp_flags & TCP_SYN != 0 && past_opening(ct) {
            // A SYN on a flow past its handshake. The client's changes
            // nothing (see `port_reused_by_syn`) but is remembered; the
            // container's SYN-ACK that acknowledges it starts the flow
            // again (`restart_at_syn_ack`).
            if ct.flags & CT_FLAG_REPLY == 0 {
                if pkt.tcp_flags & TCP_ACK == 0 && ct.flags & CT_FLAG_MASQ == 0 {
                    ct.set_passed_syn_end(pkt.seq_end);
                    ct.more_flags |= CT_MORE_SYN_PASSED;
                }
            } else if pkt.tcp_flags & TCP_ACK != 0 {
                restart_at_syn_ack(key, ct, pkt, now);
            }
            return Touched::Lives;
        }
        // A flow marked by a reset lives on only by packets from where its
        // sides are: netfilter refreshes no timeout on a packet outside
        // the window, and one sent blind every few seconds would keep a
        // dead flow for good.
        if ct.more_flags & CT_MORE_RESET != 0 && !from_its_side(ct, pkt) {
            if pkt.tcp_flags & TCP_RST != 0 {
                count(Stat::CloseOutOfWindow);
            }
            return Touched::Lives;
        }
    }
    refresh(entry, now);
    if pkt.proto != IPPROTO_TCP || ct.flags & CT_FLAG_CLOSING != 0 {
        return Touched::Lives;
    }
    if pkt.tcp_flags & TCP_RST != 0 {
        if closes_from_its_side(ct, pkt) {
            reset(key, ct, now);
        }
        return Touched::Lives;
    }
    // Only a packet from where its side is takes a reset back (netfilter
    // too keeps only packets within the window): one sent blind does not.
    if ct.more_flags & CT_MORE_RESET != 0 && from_its_side(ct, pkt) {
        reset_answered(key, ct);
    }
    let moved = advance(ct, pkt);
    if ct.flags & CT_FLAG_FIN != 0 {
        // This side closed before: has the other closed since? A side's
        // own FIN asks only whether it acknowledges the other's (below),
        // so the side that closed first finds out at its next packet, the
        // ACK of the other's FIN; and when both send their FIN at once on
        // two CPUs, each before it sees the other's, whichever side sends
        // next does.
        return after_fin(key, ct, pkt, now);
    }
    // The container's packets mark its answer on the reply entry; the
    // client's first packet after its SYN (its ACK of that answer)
    // establishes the flow, both entries (`establish`): a SYN flood that
    // only the container answers keeps the short timeout of
    // `CT_TCP_SYN_NS`. Written only when it changes, so that the packets of
    // an established flow leave the line clean (the common case).
    let mut flags = ct.flags;
    if flags & CT_FLAG_REPLY != 0 {
        // Before the flow is established: a first answer that is not a
        // SYN-ACK, or a SYN-ACK after another answer, says where the
        // client is (`client_mark_from_answer`). A new flow's first answer,
        // its SYN-ACK, asks nothing.
        if flags & CT_FLAG_ESTABLISHED == 0
            && (flags & CT_FLAG_ANSWERED != 0) == (pkt.tcp_flags & TCP_SYN != 0)
        {
            client_mark_from_answer(key, ct, pkt);
        }
        flags |= CT_FLAG_ANSWERED;
    } else if flags & CT_FLAG_ESTABLISHED == 0
        && pkt.tcp_flags & TCP_SYN == 0
        && establish(key, ct, pkt)
    {
        flags |= CT_FLAG_ESTABLISHED;
    }
    // A FIN closes its side only from that side, as a RST: a forged FIN
    // would make the flow's next SYN (forged too) a client reusing its
    // port, which starts the flow over at a sequence number of the
    // forger's choosing. A FIN on a segment that moved the mark came from
    // there (`advance` moves it only for one that starts where the side
    // is); judged by the mark it moved to, the segment's end, one longer
    // than `SEQ_WINDOW` (BIG TCP's, over 64 KiB) would not fit.
    if pkt.tcp_flags & TCP_FIN != 0 && (moved || closes_from_its_side(ct, pkt)) {
        flags |= CT_FLAG_FIN;
        // The FIN's end, exactly: the other side's ACK of this FIN must
        // say that number.
        ct.set_tcp_next(pkt.seq_end);
        acknowledge_fin_of_twin(key, ct, pkt);
    }
    if flags != ct.flags {
        ct.flags = flags;
    }
    Touched::Lives
}

/// What a packet did to its flow (`touch`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Touched {
    /// The flow goes on (or closes, and its entries wait out the closing
    /// time).
    Lives,
    /// The packet was the flow's last: both sides sent their FIN and each
    /// acknowledged the other's. The other entry is removed already; the
    /// caller translates the packet, then removes this entry.
    Ended,
}

/// The container's answer on a flow not yet established that says where
/// the client is, its acknowledgment; the client's mark goes there:
/// - its first answer when it is not a SYN-ACK: the container holds a
///   connection with these ports already, in TIME_WAIT or alive (the SYN
///   reopened a closing flow: `port_reused_by_syn`). Not where the SYN
///   said, which may be a forger's: its next reset would fit at once while
///   the connection's own no longer did. A client reusing its port against
///   a TIME_WAIT socket gets this ACK, and its reset of it (at that
///   number) fits and closes the flow, which its next SYN reopens;
/// - a SYN-ACK after another answer: that answer was the old connection's
///   (a segment sent before the client's reset reached the container,
///   late behind the client's new SYN), and the SYN-ACK is the new one's.
///
/// Only the container's own packet counts, as in `catch_up`; a client side
/// whose FIN is recorded keeps its exact mark.
#[inline(never)]
fn client_mark_from_answer(key: &CtKey, ct: &CtValue, pkt: &Packet) {
    if pkt.from_uplink || pkt.tcp_flags & TCP_ACK == 0 || pkt.ack == 0 {
        return;
    }
    let Some((_, forward, _)) = twin_entry(key, ct) else {
        return;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let forward = unsafe { &mut *forward };
    if forward.flags & (CT_FLAG_CLOSING | CT_FLAG_FIN) == 0 {
        forward.set_tcp_next(pkt.ack);
    }
}

/// Whether `pkt` acknowledges the FIN of the side whose entry is `other`,
/// exactly its end (that side's mark since its FIN, see `touch`). A FIN's
/// end not known (an entry of an earlier build, whose mark was not set at
/// the FIN) is acknowledged by nothing: that flow waits out its closing
/// time.
#[inline(always)]
fn acknowledges_fin(pkt: &Packet, other: &CtValue) -> bool {
    other.flags & (CT_FLAG_FIN | CT_FLAG_CLOSING) == CT_FLAG_FIN
        && other.tcp_next() != 0
        && pkt.tcp_flags & TCP_ACK != 0
        && pkt.ack == other.tcp_next()
}

/// At a side's FIN: whether it acknowledges the other side's FIN, which
/// the other side sent first (the FIN of a side that closes second
/// normally carries that ACK). Recorded on the other side's entry
/// (`CT_MORE_FIN_ACKED`), for the other side's ACK of this FIN, the
/// flow's last packet, to find. One lookup of the other entry per FIN.
#[inline(never)]
fn acknowledge_fin_of_twin(key: &CtKey, ct: &CtValue, pkt: &Packet) {
    let Some((_, twin, _)) = twin_entry(key, ct) else {
        return;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let twin = unsafe { &mut *twin };
    if acknowledges_fin(pkt, twin) && twin.more_flags & CT_MORE_FIN_ACKED == 0 {
        twin.more_flags |= CT_MORE_FIN_ACKED;
    }
}

/// The client's first packet after its SYN, of the flow of the forward
/// entry `ct`: establishes the reply entry too when the container answered
/// (an entry of an earlier build, established, counts as answered) and the
/// packet acknowledges that answer (`acknowledges`), and says so; else (an
/// ACK sent blind, by a source that never saw the answer, or the reply
/// entry gone) changes nothing. One lookup per flow.
#[inline(never)]
fn establish(key: &CtKey, ct: &CtValue, pkt: &Packet) -> bool {
    let Some((_, twin, _)) = twin_entry_from(pkt.opening, key, ct) else {
        return false;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let twin = unsafe { &mut *twin };
    // A closing reply entry's word holds its closing time, not a mark.
    if twin.flags & (CT_FLAG_ANSWERED | CT_FLAG_ESTABLISHED) == 0
        || twin.flags & CT_FLAG_CLOSING != 0
        || !acknowledges(pkt, twin)
    {
        return false;
    }
    if twin.flags & CT_FLAG_ESTABLISHED == 0 {
        twin.flags |= CT_FLAG_ESTABLISHED;
    }
    true
}

/// How far a reset's or an acknowledgment's number may lag behind what it
/// answers (data in flight), and a sender's segment start ahead of where
/// its side was seen (segments lost on the way here): the largest window
/// without scaling.
const SEQ_WINDOW: u32 = 65_535;

/// How far a side's mark (`CtValue::tcp_next`) may lag its true end: the
/// mark moves once the side has sent this much past it, not at every
/// segment. A write at every segment cost 3–4 % of keep-alive requests per
/// second (five interleaved pairs): elements are not aligned to cache
/// lines, so an entry's written word may share a line with the next
/// element, which another CPU reads, and a written line leaves the other
/// CPU's cache.
const SEQ_MARK_STEP: u32 = 32_768;

/// Whether `number` (a reset's sequence number, an acknowledgment) is near
/// the side whose mark is `mark`: at most `SEQ_WINDOW` behind the mark, or
/// less than `SEQ_MARK_STEP` past it (where the side may be by now). A
/// number forged by a source that does not see the flow falls there once
/// in about 44,000 tries.
#[inline(always)]
fn near(mark: u32, number: u32) -> bool {
    number.wrapping_sub(mark.wrapping_sub(SEQ_WINDOW)) < SEQ_WINDOW + SEQ_MARK_STEP
}

/// Moves the mark of the entry's side on (the packet is not a RST) once
/// the side has sent `SEQ_MARK_STEP` past it, if the packet is where that
/// side is: a segment that starts before the mark (a retransmission) or
/// at most `SEQ_WINDOW` after it. A segment forged elsewhere moves nothing,
/// so that it cannot take the mark to where a forged reset then fits. A
/// side that loses more than `SEQ_MARK_STEP` in one burst before its
/// segments reach the host, with more than `SEQ_WINDOW` in flight, can
/// leave its mark behind (its resets are then passed on, the flow not
/// closed) until the container's acknowledgment brings it back
/// (`catch_up`). Whether it moved the mark.
#[inline(always)]
fn advance(ct: &mut CtValue, pkt: &Packet) -> bool {
    let mark = ct.tcp_next();
    let sets = mark == 0
        || (pkt.tcp_flags & TCP_SYN != 0
            && ct.flags & CT_FLAG_ESTABLISHED == 0
            && (ct.flags & CT_FLAG_REPLY == 0 || !pkt.from_uplink));
    let moves = if sets {
        // Not known yet: the side's first packet since the entry was made
        // (the container's answer), or since an upgrade. Or a SYN (the
        // container's SYN-ACK) before the flow is established, which starts
        // the side's sequence afresh: a client whose SYN met the
        // container's TIME_WAIT socket of an earlier connection got that
        // connection's ACK first, and resets it and sends its SYN again.
        // The container answers from its side: a SYN-ACK of its flow that
        // comes in on an uplink that does not reach it was dropped
        // (`tc::forged_in_containers_name`), and one from an uplink that
        // may not reach it (the mapping knows no interface, or a VLAN tag)
        // sets nothing (the first packet of a side sets its mark wherever it
        // comes from, and the container's own SYN-ACK then sets it again).
        pkt.seq_end != 0
    } else {
        pkt.seq_end.wrapping_sub(mark) as i32 >= SEQ_MARK_STEP as i32
            && pkt.seq.wrapping_sub(mark) as i32 <= SEQ_WINDOW as i32
    };
    if moves {
        ct.set_tcp_next(pkt.seq_end);
    }
    moves
}

/// Moves the client's mark (its entry `forward`) up to the container's
/// acknowledgment in `pkt`, when that is past it: the container received
/// that much, so the client is there at least. This is how a mark left
/// behind comes back (see `advance`): the client's segments after a burst
/// lost before the host start too far past the mark to move it, and
/// when more than `SEQ_WINDOW - SEQ_MARK_STEP` of them came through
/// before the retransmissions, the client's new data starts too far past
/// the mark that the retransmissions left, for good; its resets were then
/// passed on and the flow left to its idle timeout.
///
/// Only the container's own packet counts, as a reset does
/// (`closes_from_its_side`): one from a container link (one that came in
/// on an uplink may be forged) whose sequence number is `near` the
/// container's mark (`reply`, its entry): a neighbour on the container's
/// link that forged the container's ACKs would otherwise walk the client's
/// mark, a window's jump a second, to a number of its choosing, where its
/// forged reset then fits. At most `MAX_CATCH_UP` at once (TCP's largest
/// window), and only on an established flow whose client side is open: a
/// closing entry's word holds its closing time, and a side's FIN end is
/// its mark exactly (`acknowledges_fin`), which no acknowledgment passes.
/// Asked once a second (`orphaned`), so a mark comes back within a second
/// of the container's next packet.
#[inline(always)]
fn catch_up(forward: &mut CtValue, reply: &CtValue, pkt: &Packet) {
    let (mark, container_mark) = (forward.tcp_next(), reply.tcp_next());
    let ahead = pkt.ack.wrapping_sub(mark);
    if pkt.proto == IPPROTO_TCP
        && !pkt.from_uplink
        && pkt.tcp_flags & (TCP_ACK | TCP_RST) == TCP_ACK
        && forward.flags & (CT_FLAG_ESTABLISHED | CT_FLAG_CLOSING | CT_FLAG_FIN)
            == CT_FLAG_ESTABLISHED
        && reply.flags & CT_FLAG_CLOSING == 0
        && mark != 0
        && container_mark != 0
        && near(container_mark, pkt.seq)
        && pkt.ack != 0
        && ahead != 0
        && ahead <= MAX_CATCH_UP
    {
        forward.set_tcp_next(pkt.ack);
    }
}

/// The farthest `catch_up` moves a mark at once: TCP's largest window
/// (65,535 scaled by 2^14).
const MAX_CATCH_UP: u32 = 1 << 30;

/// Whether a RST or a FIN comes from where its side of the flow is
/// (`near` its mark): a socket aborting sends its end, a stack answering a
/// segment sends that segment's acknowledgment, which may lag; a FIN
/// follows the side's data. One forged by a source that cannot see the
/// flow almost never does; it is passed on (the endpoint judges it: Linux
/// answers a near miss with a challenge ACK, RFC 5961) and the flow goes
/// on. A side whose mark is not known (no packet of it seen yet, or an
/// entry of an earlier build) is believed, as before.
/// A close that does not is counted (`Stat::CloseOutOfWindow`).
#[inline(always)]
fn closes_from_its_side(ct: &CtValue, pkt: &Packet) -> bool {
    let fits = from_its_side(ct, pkt);
    if !fits {
        count(Stat::CloseOutOfWindow);
    }
    fits
}

/// Whether the packet's sequence number is `near` where its side (the
/// entry `ct`'s) is, or that is not known.
#[inline(always)]
fn from_its_side(ct: &CtValue, pkt: &Packet) -> bool {
    let mark = ct.tcp_next();
    mark == 0 || near(mark, pkt.seq)
}

/// Whether the client's packet acknowledges the container's answer, whose
/// reply entry is `reply`: an ACK `near` the container's mark. A source
/// that never saw the answer (it forged the SYN's address) cannot know it.
/// An answer whose end is not known (an entry of an earlier build) counts
/// as acknowledged.
#[inline(always)]
fn acknowledges(pkt: &Packet, reply: &CtValue) -> bool {
    let mark = reply.tcp_next();
    mark == 0 || (pkt.tcp_flags & TCP_ACK != 0 && near(mark, pkt.ack))
}

/// A RST from where its sender's side is (`closes_from_its_side`), on an
/// established flow: marked on both entries (`CT_MORE_RESET`), which end
/// after the closing time unless another packet comes first
/// (`reset_answered`), as netfilter lowers an established flow's timeout to
/// 10 s at a reset that is not exactly at its side's end, until the next
/// packet within the window. The mark moves only every `SEQ_MARK_STEP`, so
/// a reset forged blind fits about one try in 44,000, where the receiving
/// stack wants the exact number: it answers one inside its window with a
/// challenge ACK (RFC 5961), which takes the reset back here, and drops one
/// behind it silently (then a flow that stays silent for the closing time
/// ends). The time of the reset is the entries' last packet, refreshed by
/// further resets. A reset before the flow is established (a container
/// refusing the connection) closes it.
#[inline(never)]
fn reset(key: &CtKey, ct: &mut CtValue, now: u64) {
    let Some((_, twin, _)) = twin_entry(key, ct) else {
        // No twin (evicted): nothing could translate the other direction.
        close(ct, now);
        return;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let twin = unsafe { &mut *twin };
    // Either entry says established: the write that establishes the reply
    // entry may be lost to another CPU's (`check_twin` makes it good).
    if (ct.flags | twin.flags) & CT_FLAG_ESTABLISHED == 0 {
        close(ct, now);
        close(twin, now);
        return;
    }
    ct.more_flags |= CT_MORE_RESET;
    ct.last_seen_ns = now;
    twin.more_flags |= CT_MORE_RESET;
    twin.last_seen_ns = now;
}

/// A packet other than a RST on a flow marked by one (`reset`): the flow
/// goes on, both entries unmarked. After a forged reset it is the
/// receiver's challenge ACK, or the next packet of either side; after a
/// genuine one, a packet that was under way, which the side that reset
/// answers with another reset (marked again).
#[inline(never)]
fn reset_answered(key: &CtKey, ct: &mut CtValue) {
    ct.more_flags &= !CT_MORE_RESET;
    if let Some((_, twin, _)) = twin_entry(key, ct) {
        // SAFETY: a pointer into the map value, valid for this program run.
        unsafe { (*twin).more_flags &= !CT_MORE_RESET };
    }
}

/// A packet of a side whose FIN `touch` recorded already: a state change
/// that concerns both entries of the flow (rare: a few packets per flow),
/// so the twin entry is looked up here (and at a FIN,
/// `acknowledge_fin_of_twin`; at a RST, `reset`).
#[inline(never)]
fn after_fin(key: &CtKey, ct: &mut CtValue, pkt: &Packet, now: u64) -> Touched {
    let Some((twin_key, twin, twin_opening)) = twin_entry(key, ct) else {
        // No twin (evicted): nothing could translate the other direction.
        close(ct, now);
        return Touched::Lives;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let twin = unsafe { &mut *twin };
    // One side closed; the flow closes when the other side has too.
    if twin.flags & CT_FLAG_FIN == 0 {
        return Touched::Lives;
    }
    // Both closed, and this packet acknowledges the other side's FIN after
    // the other side acknowledged this one's: the flow's last packet. Its
    // entries go with it, rather than fill the table for the closing time
    // and until the sweep (a busy host's ended flows would make the LRU
    // evict its live idle ones): the other one now (this packet does not
    // read it), this one once the packet is translated (`Touched::Ended`).
    if ct.more_flags & CT_MORE_FIN_ACKED != 0 && acknowledges_fin(pkt, twin) {
        remove_from(twin_opening, twin_key);
        return Touched::Ended;
    }
    // Else (FINs that crossed, neither acknowledging the other; a FIN's end
    // not known) the flow closes, and its entries wait out the closing time
    // for the packets still under way.
    close(ct, now);
    close(twin, now);
    Touched::Lives
}

/// Whether the entry's flow is past its handshake: established, or its
/// side closed or marked by a reset (either implies it was established).
#[inline(always)]
fn past_opening(ct: &CtValue) -> bool {
    ct.flags & (CT_FLAG_ESTABLISHED | CT_FLAG_FIN) != 0 || ct.more_flags & CT_MORE_RESET != 0
}

/// The container's SYN-ACK on a flow past its handshake (its reply entry
/// `ct`): when it acknowledges exactly the client's SYN that passed on the
/// flow (`CT_MORE_SYN_PASSED`), the container holds no connection with
/// these ends any more (a stack answers a SYN on a live connection with an
/// ACK) and accepted the client's new one. Both entries start again where
/// the new connection is: the container's mark after its SYN, the
/// client's after its SYN; answered, not yet established, nothing closed.
/// The translation (addresses, ports, interfaces, mapping) stays. Any
/// other SYN-ACK changes nothing: a retransmission of the flow's own, or
/// one forged in the container's name, which cannot know the client's SYN.
#[inline(never)]
fn restart_at_syn_ack(key: &CtKey, ct: &mut CtValue, pkt: &Packet, now: u64) {
    let Some((_, forward, _)) = twin_entry(key, ct) else {
        return;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let forward = unsafe { &mut *forward };
    if forward.more_flags & CT_MORE_SYN_PASSED == 0
        || forward.flags & CT_FLAG_MASQ != 0
        || pkt.ack != forward.passed_syn_end()
    {
        return;
    }
    // Only plain flows get here (not masqueraded): their flags beyond the
    // state are the direction's.
    forward.start_again(0, pkt.ack, now);
    forward.set_passed_syn_end(0);
    ct.start_again(CT_FLAG_REPLY | CT_FLAG_ANSWERED, pkt.seq_end, now);
    count(Stat::FlowRestarted);
}

fn close(ct: &mut CtValue, now: u64) {
    if ct.flags & CT_FLAG_CLOSING == 0 {
        ct.flags |= CT_FLAG_CLOSING;
        ct.set_closing_since(now);
    }
}

/// The key of the packet's own flow (the forward direction of a new one).
pub(crate) fn set_key(key: &mut CtKey, pkt: &Packet) {
    key.saddr = pkt.saddr;
    key.daddr = pkt.daddr;
    key.sport = pkt.sport;
    key.dport = pkt.dport;
    key.proto = pkt.proto;
    key.family = pkt.family;
    key._pad = 0;
}

/// The key a reply to the packet would have: its own, ends swapped.
fn set_key_of_reply(key: &mut CtKey, pkt: &Packet) {
    set_key(key, pkt);
    (key.saddr, key.daddr) = (key.daddr, key.saddr);
    (key.sport, key.dport) = (key.dport, key.sport);
}

/// The key of the reply direction: the container answering whoever it saw
/// as the client (the client itself, or the masquerade address).
fn set_reply_key(key: &mut CtKey, pkt: &Packet, nat: &Nat) {
    let (client, client_port) = nat.masq.unwrap_or((pkt.saddr, pkt.sport));
    store_words(&mut key.saddr.words, nat.backend.words);
    store_words(&mut key.daddr.words, client.words);
    key.sport = nat.backend_port;
    key.dport = client_port;
    key.proto = pkt.proto;
    key.family = nat.backend_family;
    key._pad = 0;
}

/// Creates both entries of a new flow, in the opening table.
/// Either both exist afterwards or the flow is not tracked (the caller then
/// passes the packet untouched). On success, the forward entry as inserted
/// (in scratch memory, valid until the next `create`).
// Inlined into its one caller, whose values it reuses; the entry itself is
// built in scratch memory (the stack is limited to 512 bytes).
#[inline(always)]
pub(crate) fn create(
    pkt: &Packet,
    service: &ServiceKey,
    nat: &Nat,
    now: u64,
) -> Result<*const CtValue, i32> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(-1)?;
    // SAFETY: per-CPU memory that only this program run uses; fields other
    // than the packet (which `pkt` may point to).
    let (key, value) = unsafe { (&mut (*scratch).key, &mut (*scratch).value) };
    set_reply_key(key, pkt, nat);
    set_reply_value(value, pkt, service, nat, now);
    forget_reply_in_main(key, pkt);
    let table = &CONNTRACK_OPENING;
    // The reply key was checked free (`masquerade_port`); another CPU may
    // have taken it since: never replace a live entry of another flow.
    if table.insert(&*key, &*value, BPF_NOEXIST).is_err() {
        if let Some(existing) = live(table, key, now) {
            // SAFETY: a pointer into the map value, valid for this run.
            if !is_reply_of(unsafe { &*existing }, pkt) {
                return Err(-17);
            }
        }
        // An expired entry, or this very flow's (whose forward entry
        // expired or was evicted alone): replaced.
        table.insert(&*key, &*value, 0)?;
    }
    set_forward_value(value, pkt, nat);
    set_key(key, pkt);
    if let Err(error) = table.insert(&*key, &*value, 0) {
        set_reply_key(key, pkt, nat);
        let _ = table.remove(&*key);
        return Err(error);
    }
    if value.flags & CT_FLAG_MASQ != 0 {
        count_masq_flow();
    }
    Ok(&*value)
}

/// For a flow about to start in the opening table: removes the main
/// table's entry under its reply key if that is the reply entry of a flow
/// with the same client port and published address, a flow that lost its
/// forward entry (evicted, or ended and not yet swept): the packet found no
/// live forward entry. Left there, it would hide the new flow's reply entry
/// from the container's packets (the main table is asked first), and the
/// new flow would never be established. (In one table, `create` replaced
/// it.)
// Not inlined: its locals stay out of `start_flow`'s frame.
#[inline(never)]
fn forget_reply_in_main(key: &CtKey, pkt: &Packet) {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key)
        // SAFETY: a pointer into the map value, valid for this program run.
        && is_reply_of(unsafe { &*entry }, pkt)
    {
        let _ = CONNTRACK.remove(key);
    }
}

/// Counts a masqueraded flow whose entries are in the table (see
/// `portfwd_common::MASQ_FLOWS`): after both insertions, so that a sweep
/// that read the count before this addition finds the entries, and one
/// that read it before them sees the count change.
#[inline(always)]
fn count_masq_flow() {
    if let Some(started) = MASQ_FLOWS.get_ptr_mut(MASQ_FLOWS_STARTED) {
        // SAFETY: a pointer into the map's value. An addition whose result
        // is unused compiles to BPF_XADD (see `sock::claim`).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(started, 1) };
    }
}

/// Whether the table holds no masqueraded flow: the sweep found none, and
/// none started since (see `portfwd_common::MASQ_FLOWS`).
#[inline(always)]
pub(crate) fn holds_no_masq_flow() -> bool {
    match (
        MASQ_FLOWS.get(MASQ_FLOWS_STARTED),
        MASQ_FLOWS.get(MASQ_FLOWS_NONE_AFTER),
    ) {
        (Some(started), Some(none_after)) => {
            portfwd_common::holds_no_masq_flow(*started, *none_after)
        }
        _ => false,
    }
}

/// A reply entry's value (the forward one is made from it).
// Field by field: a struct literal would be built on the stack first.
#[inline(always)]
fn set_reply_value(value: &mut CtValue, pkt: &Packet, service: &ServiceKey, nat: &Nat, now: u64) {
    value.nat_addr = pkt.daddr;
    value.nat_port = pkt.dport;
    value.flags = CT_FLAG_REPLY | flow_flags(pkt, nat);
    value.more_flags = 0;
    value.ifindex = nat.client_ifindex;
    value.service = *service;
    value.masq_addr = pkt.saddr;
    value.masq_port = pkt.sport;
    value.generation = nat.generation;
    value.last_seen_ns = now;
    // The container has sent nothing yet.
    value.closing_or_progress = 0;
}

/// Turns a reply entry's value into the forward one's: the same, but for
/// the other direction.
#[inline(always)]
fn set_forward_value(value: &mut CtValue, pkt: &Packet, nat: &Nat) {
    let (masq_addr, masq_port) = nat.masq.unwrap_or((Addr::UNSPECIFIED, 0));
    store_words(&mut value.nat_addr.words, nat.backend.words);
    value.nat_port = nat.backend_port;
    value.flags &= !CT_FLAG_REPLY;
    value.ifindex = nat.backend_ifindex;
    store_words(&mut value.masq_addr.words, masq_addr.words);
    value.masq_port = masq_port;
    value.set_tcp_next(pkt.seq_end);
}

/// The flags both entries of a new flow have.
#[inline(always)]
fn flow_flags(pkt: &Packet, nat: &Nat) -> u8 {
    let mut flags = if nat.masq.is_some() { CT_FLAG_MASQ } else { 0 };
    if nat.backend_family != pkt.family {
        flags |= CT_FLAG_NAT46;
    }
    flags
}

/// For a SYN reopening a closing flow (`port_reused_by_syn`), whose
/// forward entry `forward` the packet's lookup found: `create`'s work when
/// the new flow goes where the old one went (an external client, no NAT46,
/// which the caller checks; the same container and port; the old flow's
/// reply entry there, so the client keeps its port): both keys stay, and
/// the old entries are rewritten in place. That costs one lookup (the reply entry) where removing and
/// inserting them again cost two deletions and two insertions, each taking
/// an element from the LRU's lists (and, from a full map, evicting one),
/// and the new flow needs no port check (`masquerade_port`). A client that
/// dials again and again soon reuses its ports, within a closing flow's
/// time.
///
/// The forward entry as written (as `create`'s), or None: then the old
/// flow is forgotten whole (`forget`), for `create` to start the new one.
// Not inlined: its locals stay out of `start_flow`'s frame, which has no
// room for them.
#[inline(never)]
pub(crate) fn reopen(
    pkt: &Packet,
    forward: *mut CtValue,
    service: &ServiceKey,
    nat: &Nat,
) -> Option<*const CtValue> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU memory that only this program run uses, not the
    // packet's (which `pkt` may point to). The forward key goes in
    // `flow_key` (which holds it already): `twin_of` builds its key in
    // `key`.
    let forward_key = unsafe { &mut (*scratch).flow_key };
    set_key(forward_key, pkt);
    // SAFETY: a pointer into the map value, valid for this program run.
    let old = unsafe { &mut *forward };
    // The old reply key is then the new flow's (`set_reply_key`): `nat`
    // has no masquerade yet (no port is chosen before `reopen`).
    let same_place = old.flags & (CT_FLAG_MASQ | CT_FLAG_NAT46 | CT_FLAG_REPLY) == 0
        && old.nat_addr == nat.backend
        && old.nat_port == nat.backend_port;
    if same_place && let Some((_, reply, _)) = twin_entry(forward_key, old) {
        // Another CPU may read the entries meanwhile: the addresses and
        // ports they translate to stay (they are in the keys); only the
        // state, times, interfaces and mapping change. The clock is as read
        // for the packet's conntrack hit.
        // SAFETY: a pointer into the map value, valid for this program run.
        let reply = unsafe { &mut *reply };
        restart(
            reply,
            CT_FLAG_REPLY,
            nat.client_ifindex,
            service,
            nat.generation,
            pkt.now,
        );
        restart(
            old,
            0,
            nat.backend_ifindex,
            service,
            nat.generation,
            pkt.now,
        );
        // The client's SYN; the container has sent nothing yet (`restart`).
        old.set_tcp_next(pkt.seq_end);
        return Some(forward);
    }
    remove(forward_key, old, pkt.opening);
    None
}

/// Forgets the closing flow (as in `reopen`) whose forward entry `forward`
/// a SYN with its ports found, when the new flow cannot take its entries
/// over (`reopen`).
/// Its reply entry's key may differ from the new flow's, and left behind it
/// would translate the old container's late packets into the new
/// connection, and its own end (a changed mapping) would remove the new
/// flow's forward entry, its twin by key. An entry under that key that is
/// not the old flow's (another flow took the key after an eviction) stays.
#[inline(never)]
pub(crate) fn forget(pkt: &Packet, forward: *mut CtValue) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in `reopen`.
    let forward_key = unsafe { &mut (*scratch).flow_key };
    set_key(forward_key, pkt);
    // SAFETY: a pointer into the map value, valid for this program run.
    remove(forward_key, unsafe { &*forward }, pkt.opening);
}

/// One entry of a closing flow, made the reopened flow's (`reopen`): its
/// addresses stay, its state and times start again.
#[inline(always)]
fn restart(
    ct: &mut CtValue,
    flags: u8,
    ifindex: u32,
    service: &ServiceKey,
    generation: u16,
    now: u64,
) {
    ct.start_again(flags, 0, now);
    ct.ifindex = ifindex;
    ct.service = *service;
    ct.generation = generation;
}

/// Remembers that the host itself sent `pkt` (leaving by an uplink,
/// untranslated) from a published port, so that its replies are passed to
/// the host, not taken for new flows to the mapping: a `CT_FLAG_HOST` entry
/// under the reply's key, refreshed like any entry. A live entry of a
/// tracked flow under that key is left alone.
#[inline(never)]
pub(crate) fn pass_replies_to(pkt: &Packet, now: u64) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU memory that only this program run uses; fields other
    // than the packet.
    let (key, value) = unsafe { (&mut (*scratch).key, &mut (*scratch).value) };
    set_key_of_reply(key, pkt);
    if let Some(entry) = lookup(key, now) {
        // SAFETY: a pointer into the map value, valid for this program run.
        let ct = unsafe { &mut *entry };
        if ct.flags & CT_FLAG_HOST != 0 && now.saturating_sub(ct.last_seen_ns) > REFRESH_NS {
            ct.last_seen_ns = now;
        }
        return;
    }
    // Field by field: a struct literal would be built on the stack first.
    value.nat_addr = Addr::UNSPECIFIED;
    value.nat_port = 0;
    value.flags = CT_FLAG_HOST;
    value.more_flags = 0;
    value.ifindex = 0;
    value.service = ServiceKey::new(0, Addr::UNSPECIFIED, 0, 0);
    value.masq_addr = Addr::UNSPECIFIED;
    value.masq_port = 0;
    value.generation = 0;
    value.last_seen_ns = now;
    value.closing_or_progress = 0;
    let _ = CONNTRACK.insert(&*key, &*value, 0);
}

/// The key of the other direction's entry, given one direction's key and
/// entry; built in scratch memory (valid until the next use of it).
fn twin_of(key: &CtKey, ct: &CtValue) -> Option<&'static CtKey> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU memory that only this program run uses; the entry
    // under construction is not in use outside `create`.
    let twin = unsafe { &mut (*scratch).key };
    let masq = ct.flags & CT_FLAG_MASQ != 0;
    if ct.flags & CT_FLAG_REPLY != 0 {
        // Reply entry (container -> client as it saw it): the forward key is
        // (client -> published address); with masquerade the client is in
        // masq_addr.
        let (client, client_port) = if masq {
            (ct.masq_addr, ct.masq_port)
        } else {
            (key.daddr, key.dport)
        };
        twin.saddr = client;
        twin.daddr = ct.nat_addr;
        twin.sport = client_port;
        twin.dport = ct.nat_port;
    } else {
        let (client, client_port) = if masq {
            (ct.masq_addr, ct.masq_port)
        } else {
            (key.saddr, key.sport)
        };
        twin.saddr = ct.nat_addr;
        twin.daddr = client;
        twin.sport = ct.nat_port;
        twin.dport = client_port;
    }
    twin.proto = key.proto;
    // A NAT46 flow's other entry is of the other family.
    twin.family = match (ct.flags & CT_FLAG_NAT46 != 0, key.family) {
        (false, family) => family,
        (true, FAMILY_V6) => FAMILY_V4,
        (true, _) => FAMILY_V6,
    };
    twin._pad = 0;
    Some(twin)
}

/// The other direction's entry of the flow of `key` and `ct`, with its key
/// (in scratch memory, see `twin_of`) and whether it is in the opening
/// table, if it is there, live, and is this flow's: after an eviction
/// another flow may hold its key (the same client port through another
/// published port to the same container port), and that flow's entry is
/// not this one's to change or remove. Asked of the main table first, then
/// of the opening one: whichever holds this flow's. An expired entry
/// is not a twin: an ended flow's, not yet swept from the main table, has
/// the same addresses as a new flow of the same client port in the opening
/// table, and taken for its twin it would come back to life in its place.
#[inline(always)]
fn twin_entry(key: &CtKey, ct: &CtValue) -> Option<(&'static CtKey, *mut CtValue, bool)> {
    let twin_key = twin_of(key, ct)?;
    let now = now();
    if let Some(entry) = CONNTRACK.get_ptr_mut(twin_key)
        && pairs(key, ct, entry, now)
    {
        return Some((twin_key, entry, false));
    }
    let entry = CONNTRACK_OPENING.get_ptr_mut(twin_key)?;
    pairs(key, ct, entry, now).then_some((twin_key, entry, true))
}

/// `twin_entry`, asked first of the opening table when the entry of `key`
/// is there (`opening`): a flow's two entries are in the same table (but
/// while `promote` moves them), and the main table's miss is saved on the
/// packets that establish a flow and move it.
#[inline(always)]
fn twin_entry_from(
    opening: bool,
    key: &CtKey,
    ct: &CtValue,
) -> Option<(&'static CtKey, *mut CtValue, bool)> {
    if opening
        && let Some(twin_key) = twin_of(key, ct)
        && let Some(entry) = CONNTRACK_OPENING.get_ptr_mut(twin_key)
        && pairs(key, ct, entry, now())
    {
        return Some((twin_key, entry, true));
    }
    twin_entry(key, ct)
}

/// Whether `entry` is the other entry of the flow of `key` and `ct`, live
/// at `now`.
#[inline(always)]
fn pairs(key: &CtKey, ct: &CtValue, entry: *mut CtValue, now: u64) -> bool {
    // SAFETY: a pointer into the map value, valid for this program run.
    let twin = unsafe { &*entry };
    if twin.expired(key.proto, now) {
        return false;
    }
    // Both entries of a flow have the same masquerade and NAT46 flags
    // (`flow_flags`): a masqueraded reply entry's key for its forward entry
    // is also a plain flow's forward key.
    let same_kind = (twin.flags ^ ct.flags) & (CT_FLAG_MASQ | CT_FLAG_NAT46) == 0;
    same_kind
        && if ct.flags & CT_FLAG_REPLY == 0 {
            // The reply entry of this client and published address.
            twin.flags & CT_FLAG_REPLY != 0
                && twin.masq_addr == key.saddr
                && twin.masq_port == key.sport
                && twin.nat_addr == key.daddr
                && twin.nat_port == key.dport
        } else {
            // The forward entry to this container, from the source it sees.
            twin.flags & CT_FLAG_REPLY == 0
                && twin.nat_addr == key.saddr
                && twin.nat_port == key.sport
                && (twin.flags & CT_FLAG_MASQ == 0
                    || (twin.masq_addr == key.daddr && twin.masq_port == key.dport))
        }
}

/// Whether `ct` is the reply entry of the flow that `pkt` (a forward packet)
/// belongs to: its client and published address are the packet's.
pub(crate) fn is_reply_of(ct: &CtValue, pkt: &Packet) -> bool {
    ct.flags & CT_FLAG_REPLY != 0
        && ct.masq_addr == pkt.saddr
        && ct.masq_port == pkt.sport
        && ct.nat_addr == pkt.daddr
        && ct.nat_port == pkt.dport
}

/// Forgets a flow, given either direction's key and entry, in the opening
/// table (`opening`) or the main one (and its other entry only if that is
/// this flow's, see `twin_entry`).
// Inlined: as a call of its own below `reopen`, it made `start_flow`'s
// chain deeper than 6.1's 512 bytes.
#[inline(always)]
pub(crate) fn remove(key: &CtKey, ct: &CtValue, opening: bool) {
    if let Some((twin, _, twin_opening)) = twin_entry(key, ct) {
        remove_from(twin_opening, twin);
    }
    remove_from(opening, key);
}
