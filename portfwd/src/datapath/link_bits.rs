//! The bitmaps of interfaces towards containers that the TC programs read:
//! - every one, with the reply program attached and not an uplink
//!   (`pf_container_link_bits`, see `portfwd_common::CONTAINER_LINKS`): a
//!   new flow on an uplink from a source routed through one is forged;
//! - those of them that the programs redirect through straight into the
//!   container's namespace (`pf_peer_link_bits`, see
//!   `portfwd_common::PEER_LINKS`): veths into another namespace where
//!   nothing on the way would be skipped (`into_peer`).
//!
//! Kept in line with the host by `follow_host` and when the reply program
//! is attached to a new interface. A map pinned by a build without it is
//! absent until `up`: then there is nothing to keep (the programs of that
//! build do not read it).

use std::{
    borrow::{Borrow, BorrowMut},
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::AsFd,
    path::Path,
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, IterableMap, Map, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use portfwd_common::{
    BACKEND_PROGRAMS, CONTAINER_LINKS, MapDef, PEER_LINKS, UPLINK_PROGRAMS, link_bit,
};

use super::{batch, kernel, links::tc_attachments};
use crate::host::netlink;

/// The bitmap `bitmap`, if this instance has it.
fn open(pin_dir: &Path, bitmap: &MapDef) -> Result<Option<Array<MapData, u32>>> {
    let path = pin_dir.join(bitmap.name);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = Array::try_from(Map::Array(data))
        .with_context(|| format!("{} has an unexpected layout", bitmap.name))?;
    Ok(Some(map))
}

/// The interfaces a bitmap lists: its words read in a few batched calls
/// (one at a time, 65,536 system calls, took about 18 ms), or one at a time
/// on a kernel that refuses them.
fn read<T: Borrow<MapData>>(map: &Array<T, u32>) -> BTreeSet<u32> {
    let words: Vec<(u32, u32)> = match batch::lookup_all(map.map().fd().as_fd()) {
        Ok(words) => words,
        Err(_) => (0u32..)
            .zip(map.iter())
            .filter_map(|(word, bits)| Some((word, bits.ok()?)))
            .collect(),
    };
    words
        .into_iter()
        .filter(|(_, bits)| *bits != 0)
        .flat_map(|(word, bits)| {
            (0..32)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| word * 32 + bit)
        })
        .collect()
}

/// Lists the interface in a bitmap (`listed`) or takes it off. An index
/// beyond the bitmap cannot be listed (into the peer: it stays on the
/// neighbour path).
pub(super) fn set_listed<T: BorrowMut<MapData>>(
    map: &mut Array<T, u32>,
    ifindex: u32,
    listed: bool,
) -> Result<()> {
    let (word, bit) = link_bit(ifindex);
    if word >= map.len() {
        return Ok(());
    }
    let old = map.get(&word, 0)?;
    let new = if listed { old | bit } else { old & !bit };
    if new != old {
        map.set(word, new, 0)
            .with_context(|| format!("listing interface {ifindex} in a bitmap of links"))?;
    }
    Ok(())
}

/// Which interfaces the bitmap lists, asked one interface at a time (one
/// word read each: every change command asks about the attached
/// interfaces). None are listed when the map is absent or unreadable.
pub(crate) struct Listed(Option<Array<MapData, u32>>);

impl Listed {
    pub(crate) fn open(pin_dir: &Path) -> Self {
        Listed(open(pin_dir, &PEER_LINKS).ok().flatten())
    }

    pub(crate) fn contains(&self, ifindex: u32) -> bool {
        let Some(map) = &self.0 else {
            return false;
        };
        let (word, bit) = link_bit(ifindex);
        map.get(&word, 0).is_ok_and(|bits| bits & bit != 0)
    }
}

/// Lists exactly the interfaces with the reply program (and not the
/// uplink's), and of them those that redirect into their peer now.
pub(crate) fn sync(pin_dir: &Path) -> Result<()> {
    let towards_containers: BTreeMap<u32, String> = tc_attachments(pin_dir)
        .into_iter()
        .filter(|(_, programs)| {
            let has = |name: &str| programs.iter().any(|program| program == name);
            has(BACKEND_PROGRAMS[0].name) && !has(UPLINK_PROGRAMS[0].name)
        })
        .filter_map(|(ifname, _)| Some((netlink::ifindex(&ifname).ok()?, ifname)))
        .collect();
    if let Some(mut map) = open(pin_dir, &CONTAINER_LINKS)? {
        list_exactly(&mut map, &towards_containers.keys().copied().collect())?;
    }
    if let Some(mut map) = open(pin_dir, &PEER_LINKS)? {
        list_exactly(&mut map, &into_peer(&towards_containers)?)?;
    }
    Ok(())
}

/// Makes `map` list exactly `wanted`.
fn list_exactly(map: &mut Array<MapData, u32>, wanted: &BTreeSet<u32>) -> Result<()> {
    let listed = read(map);
    for ifindex in listed.iter().filter(|i| !wanted.contains(i)) {
        // Gone meanwhile: as good as removed.
        set_listed(map, *ifindex, false)?;
    }
    for ifindex in wanted.iter().filter(|i| !listed.contains(i)) {
        set_listed(map, *ifindex, true)?;
    }
    Ok(())
}

/// Lists `ifname` (the reply program just attached to it) as an interface
/// towards containers, and if it redirects into its peer, as such.
pub(crate) fn add(pin_dir: &Path, ifindex: u32, ifname: &str) -> Result<()> {
    if let Some(mut map) = open(pin_dir, &CONTAINER_LINKS)? {
        set_listed(&mut map, ifindex, true)?;
    }
    let Some(mut map) = open(pin_dir, &PEER_LINKS)? else {
        return Ok(());
    };
    if !into_peer(&BTreeMap::from([(ifindex, ifname.to_owned())]))?.is_empty() {
        set_listed(&mut map, ifindex, true)?;
    }
    Ok(())
}

/// Of `interfaces` (index -> name), those that redirect into their peer:
/// what the host's links say (`netlink::links_into_peer`); no TCX program
/// on their egress, which a redirect into the peer would skip (a kernel
/// without TCX has none; a failed query lists nothing); and IPv4
/// forwarding on, without which the programs cannot learn the next hop's
/// address (`bpf_fib_lookup` answers only for a forwarding interface) and
/// redirect every packet through the neighbour subsystem.
fn into_peer(interfaces: &BTreeMap<u32, String>) -> Result<BTreeSet<u32>> {
    let found = netlink::links_into_peer(|index| interfaces.contains_key(&index))?;
    Ok(found
        .into_iter()
        .filter(|index| {
            let ifname = &interfaces[index];
            let no_tcx_egress = match SchedClassifier::query_tcx(ifname, TcAttachType::Egress) {
                Ok((_, programs)) => programs.is_empty(),
                // A kernel without TCX has no such programs; on one with
                // TCX, a query that fails says nothing, and the interface
                // stays on the neighbour path.
                Err(_) => !kernel::tcx_supported(),
            };
            let forwarding =
                fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"))
                    .is_ok_and(|value| value.trim() == "1");
            no_tcx_egress && forwarding
        })
        .collect())
}
