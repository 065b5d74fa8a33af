//! The TC path's connection tracking, read and pruned from userspace
//! (`portfwd conntrack list|flush`, `explain`). The programs keep two
//! entries per flow (see `portfwd-ebpf/src/conntrack.rs`): the forward one,
//! keyed by the packet as the client sends it, and the reply one, keyed by
//! the container's answer. Both carry the mapping's key. A flow's entries
//! are in `pf_ct_opening` until its client shows it receives the
//! container's packets (a TCP handshake completes; a UDP datagram follows
//! the container's answer), then in `pf_conntrack` (see `TABLES`).

use std::{net::SocketAddr, os::fd::AsFd, path::Path, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData};
use portfwd_common::{
    CONNTRACK, CONNTRACK_OPENING, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_FIN, CT_FLAG_HOST,
    CT_FLAG_MASQ, CT_FLAG_NAT46, CT_FLAG_REPLY, CT_MORE_RESET, CtKey, CtValue, FAMILY_V4,
    MASQ_FLOWS, MASQ_FLOWS_NONE_AFTER, MASQ_FLOWS_STARTED, MapDef, ServiceKey,
};
use serde::Serialize;

use super::{batch, maps::NO_EXIST};
use crate::model::Protocol;

/// One tracked flow, as its forward entry describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Flow {
    pub(crate) protocol: Protocol,
    /// The client, as it sent the packet.
    pub(crate) client: SocketAddr,
    /// The published address it dialed.
    pub(crate) published: SocketAddr,
    /// The container endpoint the flow was translated to.
    pub(crate) container: SocketAddr,
    /// The source the container sees: the client itself, or for a hairpin
    /// flow the host address it was masqueraded to (for an IPv6 client of
    /// an IPv4 container, NAT46, the host's IPv4 address towards it).
    pub(crate) container_sees: SocketAddr,
    pub(crate) state: FlowState,
    /// Since the last packet (to about a second: entries are refreshed at
    /// most once a second).
    #[serde(serialize_with = "seconds")]
    pub(crate) idle: Duration,
    #[serde(skip)]
    pub(crate) service: ServiceKey,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 10.0).round() / 10.0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FlowState {
    /// TCP, no answer from the container yet.
    SynSent,
    Established,
    /// One side sent a FIN, the other goes on.
    HalfClosed,
    /// Both sides closed, or a RST before the flow was established: gone
    /// within seconds.
    Closing,
    /// A RST on an established flow: gone within seconds, unless a packet
    /// of either side follows (the reset was forged: the receiver answered
    /// it with a challenge ACK), which makes it established again.
    Reset,
    /// UDP (no states).
    Udp,
}

impl FlowState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FlowState::SynSent => "syn-sent",
            FlowState::Established => "established",
            FlowState::HalfClosed => "half-closed",
            FlowState::Closing => "closing",
            FlowState::Reset => "reset",
            FlowState::Udp => "udp",
        }
    }
}

/// The tables of tracked flows: TCP flows before their handshake completes,
/// and established ones (and UDP). In this order: a flow moves only from
/// the first to the second (inserted there before it is removed here), so
/// a sweep that reads them in turn sees every flow at least once (its
/// masqueraded flows among them, see `sweep_expired`).
const TABLES: [MapDef; 2] = [CONNTRACK_OPENING, CONNTRACK];

fn open(pin_dir: &Path, table: &MapDef) -> Result<HashMap<MapData, CtKey, CtValue>> {
    HashMap::try_from(Map::LruHashMap(open_pin(pin_dir, table.name)?))
        .context("the conntrack map has an unexpected layout (built by another portfwd version?)")
}

/// The tables pinned under `pin_dir`. The main one must be (opening it
/// fails otherwise); the opening one is missing while the programs of a
/// build before it run (they keep every flow in the main one).
fn present_tables(pin_dir: &Path) -> impl Iterator<Item = &'static MapDef> {
    TABLES
        .iter()
        .filter(move |table| table.name == CONNTRACK.name || pin_dir.join(table.name).exists())
}

/// Each table of `present_tables`, opened.
pub(super) fn open_tables(pin_dir: &Path) -> Result<Vec<HashMap<MapData, CtKey, CtValue>>> {
    present_tables(pin_dir)
        .map(|table| open(pin_dir, table))
        .collect()
}

/// The map pinned under `pin_dir` as `name`.
fn open_pin(pin_dir: &Path, name: &str) -> Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("opening {} (is portfwd up?)", path.display()))
}

/// The clock the programs stamp entries with (`bpf_ktime_get*_ns`).
fn monotonic_now() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default();
    now.as_nanos() as u64
}

/// Whether the programs would still use this entry (they expire entries
/// lazily, at the next lookup, so dead ones linger in the map).
fn live(key: &CtKey, value: &CtValue, now: u64) -> bool {
    !value.expired(key.proto, now)
}

fn decode(key: &CtKey, value: &CtValue, now: u64) -> Option<Flow> {
    let protocol = Protocol::from_number(key.proto)?;
    let at = |addr: &portfwd_common::Addr, port: u16, family: u8| {
        Some(SocketAddr::new(addr.to_ip(family)?, u16::from_be(port)))
    };
    // The container's side of a NAT46 flow is IPv4, its client's IPv6.
    let container_family = if value.flags & CT_FLAG_NAT46 != 0 {
        FAMILY_V4
    } else {
        key.family
    };
    let client = at(&key.saddr, key.sport, key.family)?;
    let container_sees = if value.flags & CT_FLAG_MASQ != 0 {
        at(&value.masq_addr, value.masq_port, container_family)?
    } else {
        client
    };
    let state = match protocol {
        Protocol::Udp => FlowState::Udp,
        Protocol::Tcp if value.flags & CT_FLAG_CLOSING != 0 => FlowState::Closing,
        Protocol::Tcp if value.more_flags & CT_MORE_RESET != 0 => FlowState::Reset,
        Protocol::Tcp if value.flags & CT_FLAG_ESTABLISHED == 0 => FlowState::SynSent,
        Protocol::Tcp if value.flags & CT_FLAG_FIN != 0 => FlowState::HalfClosed,
        Protocol::Tcp => FlowState::Established,
    };
    Some(Flow {
        protocol,
        client,
        published: at(&key.daddr, key.dport, key.family)?,
        container: at(&value.nat_addr, value.nat_port, container_family)?,
        container_sees,
        state,
        idle: Duration::from_nanos(now.saturating_sub(value.last_seen_ns)),
        service: value.service,
    })
}

/// Every entry of the map, once each. The kernel's walk of a hash map
/// restarts from the first key when the key it stands on is deleted (by the
/// programs, or an LRU eviction): entries are deduplicated and the walk is
/// bounded. An entry that disappears before it is read is skipped.
fn entries(map: &HashMap<MapData, CtKey, CtValue>) -> Result<Vec<(CtKey, CtValue)>> {
    let capacity = map.map().info()?.max_entries() as usize;
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::new();
    for key in map.keys().take(2 * capacity) {
        let key = key.context("walking the conntrack map")?;
        if !seen.insert(key) {
            continue;
        }
        if let Ok(value) = map.get(&key, 0) {
            entries.push((key, value));
        }
    }
    Ok(entries)
}

/// The live flows, oldest activity last.
pub(crate) fn flows(pin_dir: &Path) -> Result<Vec<Flow>> {
    let mut entries = Vec::new();
    for table in open_tables(pin_dir)? {
        entries.extend(all_entries(&table)?);
    }
    let now = monotonic_now();
    let mut flows: Vec<Flow> = entries
        .into_iter()
        // Reply entries are the other half of a listed flow; host entries
        // (`CT_FLAG_HOST`) mark the host's own NAT, not a flow of a mapping.
        .filter(|(key, value)| {
            value.flags & (CT_FLAG_REPLY | CT_FLAG_HOST) == 0 && live(key, value, now)
        })
        .filter_map(|(key, value)| decode(&key, &value, now))
        .collect();
    flows.sort_by_key(|f| f.idle);
    Ok(flows)
}

/// Removes the entries that the programs would no longer use (a flow
/// closed or timed out): they expire lazily, at their next lookup, so
/// otherwise they stay until the LRU evicts them, and under churn it evicts
/// by age alone: a live flow idle for longer than the map takes to fill
/// goes with the dead ones. An entry goes only when it has been dead for
/// `SWEEP_MARGIN_NS`, and it is taken out and looked at in one step
/// (`batch::take`): an entry that a flow wrote since the read (a client
/// reusing its port opened a new flow with the same key) is put back. The
/// work is paced: `pause` is called after each read of up to `batch::CHUNK`
/// entries and every `SWEEP_STEP` dead ones, so that a caller can spread a
/// pass that removes a burst of closed flows instead of taking the CPU and
/// its cache at once. The number of entries removed.
///
/// A pass also tells the programs whether the table holds a masqueraded
/// flow (see `portfwd_common::MASQ_FLOWS`): the count of such flows started
/// is read first, and a pass that sees none writes it (plus one) back as
/// the count after which there were none. A flow started meanwhile has
/// changed the count, and the mark does not hold. One seen clears the
/// mark, in case a program that does not count them (an earlier version's,
/// during an upgrade) made it. Both tables are swept (a masqueraded flow
/// may be opening).
pub(crate) fn sweep_expired(pin_dir: &Path, mut pause: impl FnMut()) -> Result<usize> {
    // Without the map (pinned by a build before it), the pass only sweeps.
    let mut masq_flows = open_masq_flows(pin_dir).ok();
    let started = masq_flows
        .as_ref()
        .and_then(|map| map.get(&MASQ_FLOWS_STARTED, 0).ok());
    let mut masq_seen = false;
    let mut removed = 0;
    for table in present_tables(pin_dir) {
        let (seen, swept) = sweep_table(pin_dir, table, &mut pause)?;
        masq_seen |= seen;
        removed += swept;
    }
    if let (Some(map), Some(started)) = (masq_flows.as_mut(), started) {
        let none_after = if masq_seen {
            0
        } else {
            started.wrapping_add(1)
        };
        map.set(MASQ_FLOWS_NONE_AFTER, none_after, 0)?;
    }
    Ok(removed)
}

/// One table's sweep (see `sweep_expired`): whether it holds a
/// masqueraded flow, and how many entries it removed.
fn sweep_table(pin_dir: &Path, table: &MapDef, mut pause: impl FnMut()) -> Result<(bool, usize)> {
    let reader = open(pin_dir, table)?;
    let mut writer = open(pin_dir, table)?;
    let mut masq_seen = false;
    let mut removed = 0;
    let mut sweep = |keys: &[CtKey], values: &[CtValue]| {
        masq_seen |= values.iter().any(|value| value.flags & CT_FLAG_MASQ != 0);
        let now = monotonic_now();
        let dead = keys
            .iter()
            .zip(values)
            .filter(|(key, value)| !live_long_ago(key, value, now));
        for (n, (key, _)) in dead.enumerate() {
            if n > 0 && n % SWEEP_STEP == 0 {
                pause();
            }
            if remove_if_dead(&mut writer, key) {
                removed += 1;
            }
        }
        pause();
    };
    if batch::lookup_chunks(reader.map().fd().as_fd(), &mut sweep).is_err() {
        // A kernel without the batch commands: one entry at a time.
        for chunk in entries(&reader)?.chunks(batch::CHUNK) {
            let (keys, values): (Vec<CtKey>, Vec<CtValue>) = chunk.iter().copied().unzip();
            sweep(&keys, &values);
        }
    }
    Ok((masq_seen, removed))
}

fn open_masq_flows(pin_dir: &Path) -> Result<Array<MapData, u64>> {
    Array::try_from(Map::Array(open_pin(pin_dir, MASQ_FLOWS.name)?))
        .context("the masqueraded flows map has an unexpected layout")
}

/// Dead entries between two pauses of a sweep (see `sweep_expired`).
const SWEEP_STEP: usize = 256;

/// How long an entry must have been dead before the sweep removes it: more
/// than the programs' clock lags `CLOCK_MONOTONIC` (the coarse clock, a
/// tick behind) and than the two entries of a flow may differ by (a live
/// entry refreshes its twin at most once a second, `REFRESH_NS` in the
/// programs), so that the sweep never takes an entry the programs would
/// still use or revive.
const SWEEP_MARGIN_NS: u64 = 3_000_000_000;

/// Whether the entry was still live `SWEEP_MARGIN_NS` ago, or is now.
fn live_long_ago(key: &CtKey, value: &CtValue, now: u64) -> bool {
    live(key, value, now.saturating_sub(SWEEP_MARGIN_NS))
}

/// Removes `key`'s entry if it is still dead: taken out and looked at in
/// one step, put back if a flow wrote it since (unless another took the
/// key meanwhile). On a kernel without that step (before 5.14), a lookup
/// then a delete, with a window of two system calls.
fn remove_if_dead(map: &mut HashMap<MapData, CtKey, CtValue>, key: &CtKey) -> bool {
    match batch::take::<CtKey, CtValue>(map.map().fd().as_fd(), key) {
        Ok(Some(value)) if live_long_ago(key, &value, monotonic_now()) => {
            // A failure means another flow holds the key now: it stays.
            map.insert(key, value, NO_EXIST).ok();
            false
        }
        Ok(taken) => taken.is_some(),
        Err(_) => {
            let dead = map
                .get(key, 0)
                .is_ok_and(|value| !live_long_ago(key, &value, monotonic_now()));
            dead && map.remove(key).is_ok()
        }
    }
}

/// Every entry, in a few batch calls (a full table of 524,288 entries: 128
/// calls), or one entry at a time on a kernel that refuses them.
fn all_entries(map: &HashMap<MapData, CtKey, CtValue>) -> Result<Vec<(CtKey, CtValue)>> {
    match batch::lookup_all(map.map().fd().as_fd()) {
        Ok(entries) => Ok(entries),
        Err(_) => entries(map),
    }
}

/// Removes both entries of every flow (live or not) of the mappings whose
/// keys `selected` accepts; the number of flows removed.
pub(crate) fn forget_flows(
    pin_dir: &Path,
    selected: impl Fn(&ServiceKey) -> bool,
) -> Result<usize> {
    let mut flows = 0;
    for mut map in open_tables(pin_dir)? {
        let doomed: Vec<(CtKey, bool)> = all_entries(&map)?
            .into_iter()
            .filter(|(_, value)| selected(&value.service))
            .map(|(key, value)| (key, value.flags & CT_FLAG_REPLY == 0))
            .collect();
        for (key, forward) in doomed {
            // Gone already (the programs, or LRU eviction): nothing to do.
            if map.remove(&key).is_ok() && forward {
                flows += 1;
            }
        }
    }
    Ok(flows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portfwd_common::{Addr, CT_TCP_CLOSING_NS, CT_TCP_SYN_NS, FAMILY_V4};

    fn v4(a: [u8; 4]) -> Addr {
        Addr::v4(u32::from_ne_bytes(a))
    }

    #[test]
    fn entries_decode_to_flows_and_expire_as_the_programs_decide() {
        let key = CtKey {
            saddr: v4([192, 0, 2, 7]),
            daddr: v4([10, 0, 0, 1]),
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
            proto: 6,
            family: FAMILY_V4,
            _pad: 0,
        };
        let mut value = CtValue {
            nat_addr: v4([10, 88, 0, 5]),
            nat_port: 80u16.to_be(),
            flags: CT_FLAG_ESTABLISHED,
            last_seen_ns: 1_000_000_000,
            ..CtValue::default()
        };
        let now = 3_000_000_000;
        let flow = decode(&key, &value, now).unwrap();
        assert_eq!(flow.client, "192.0.2.7:40000".parse().unwrap());
        assert_eq!(flow.published, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(flow.container, "10.88.0.5:80".parse().unwrap());
        assert_eq!(flow.container_sees, flow.client);
        assert_eq!(flow.state, FlowState::Established);
        assert_eq!(flow.idle, Duration::from_secs(2));
        assert!(live(&key, &value, now));
        // Hairpin: the container sees the masquerade address.
        value.flags |= CT_FLAG_MASQ;
        value.masq_addr = v4([10, 88, 0, 1]);
        value.masq_port = 61000u16.to_be();
        let flow = decode(&key, &value, now).unwrap();
        assert_eq!(flow.container_sees, "10.88.0.1:61000".parse().unwrap());
        // NAT46: an IPv6 client, an IPv4 container.
        let mut key6 = key;
        key6.family = portfwd_common::FAMILY_V6;
        key6.saddr = "fd00::7".parse::<std::net::Ipv6Addr>().unwrap().into();
        key6.daddr = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().into();
        let mut value46 = value;
        value46.flags |= CT_FLAG_NAT46;
        let flow = decode(&key6, &value46, now).unwrap();
        assert_eq!(flow.client, "[fd00::7]:40000".parse().unwrap());
        assert_eq!(flow.published, "[fd00::1]:8080".parse().unwrap());
        assert_eq!(flow.container, "10.88.0.5:80".parse().unwrap());
        assert_eq!(flow.container_sees, "10.88.0.1:61000".parse().unwrap());
        // A closing flow lives 10 s after its close, a SYN-only one 60 s.
        value.flags = CT_FLAG_CLOSING | CT_FLAG_ESTABLISHED;
        value.set_closing_since(9_000_000_000);
        assert!(live(&key, &value, 9_000_000_000 + CT_TCP_CLOSING_NS));
        assert!(!live(&key, &value, 10_000_000_000 + CT_TCP_CLOSING_NS));
        // A mark written into a closing entry (by a packet that another CPU
        // handled as the flow closed): the last packet's time stands in for
        // the closing time, which the mark overwrote.
        value.last_seen_ns = 5_000_000_000;
        value.set_tcp_next(7_000);
        assert!(live(&key, &value, 5_000_000_000 + CT_TCP_CLOSING_NS));
        assert!(!live(&key, &value, 6_000_000_000 + CT_TCP_CLOSING_NS));
        // An established flow after a reset lives 10 s after its last
        // packet, its mark kept.
        value.flags = CT_FLAG_ESTABLISHED;
        value.more_flags = CT_MORE_RESET;
        assert_eq!(decode(&key, &value, now).unwrap().state, FlowState::Reset);
        assert!(live(&key, &value, 5_000_000_000 + CT_TCP_CLOSING_NS));
        assert!(!live(&key, &value, 6_000_000_000 + CT_TCP_CLOSING_NS));
        value.more_flags = 0;
        value.last_seen_ns = 1_000_000_000;
        value.flags = 0;
        assert_eq!(decode(&key, &value, now).unwrap().state, FlowState::SynSent);
        assert!(!live(&key, &value, 2_000_000_000 + CT_TCP_SYN_NS));
    }
}
