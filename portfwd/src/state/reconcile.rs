//! Bringing the maps in line with the recorded state.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Result;

use super::Store;
use crate::{
    datapath::PinnedMaps,
    model::{Mapping, Record},
};

/// What a reconciliation changed in the maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Fixes {
    pub(crate) added: Vec<Mapping>,
    pub(crate) removed: Vec<Mapping>,
}

/// Makes the maps hold exactly `records` (entries that differ in their
/// container are replaced). The caller holds the state lock.
pub(crate) fn reconcile(
    maps: &mut PinnedMaps,
    records: &[Record],
    mut ifindex_of: impl FnMut(IpAddr) -> u32,
) -> Result<Fixes> {
    let wanted: BTreeSet<Record> = records.iter().cloned().collect();
    let current: Vec<Mapping> = maps.mappings()?;
    let have: BTreeSet<Record> = current.iter().map(Record::from).collect();
    let removed: Vec<Mapping> = current
        .iter()
        .filter(|m| !wanted.contains(&Record::from(*m)))
        .cloned()
        .collect();
    let added: Vec<Mapping> = wanted
        .difference(&have)
        .map(|r| {
            let mut m = r.to_mapping();
            m.ifindex = ifindex_of(r.container_ip);
            m
        })
        .collect();
    maps.remove_all(&removed)?;
    maps.add_all(&added)?;
    Ok(Fixes { added, removed })
}

/// Finishes or undoes a change that a killed process left half done: the
/// maps go back to the state file. Called under the state lock by every
/// command that reads or changes mappings. Returns what it fixed.
/// Mappings it puts back get their interface from `ifindex_of`, as new ones
/// do (the TC path redirects to it).
pub(crate) fn recover(
    store: &Store,
    maps: &mut PinnedMaps,
    ifindex_of: impl FnMut(IpAddr) -> u32,
) -> Result<Option<Fixes>> {
    if !store.has_pending() {
        return Ok(None);
    }
    let records = store.load()?.unwrap_or_default();
    let fixes = reconcile(maps, &records, ifindex_of)?;
    store.abort();
    Ok(Some(fixes))
}
