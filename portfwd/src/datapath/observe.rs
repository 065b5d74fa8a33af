//! Read-only views of the kernel objects for monitoring (`portfwd serve
//! --metrics`): how full each hash map is, and how often each attached
//! program ran. Nothing here takes the state lock or changes anything.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{
        ProgramInfo,
        links::{FdLink, PinnedLink},
    },
};
use portfwd_common::{
    CONNTRACK, CONNTRACK_OPENING, CtKey, CtValue, FRAGMENTS, FragmentKey, FragmentValue,
    LOCAL_ADDRS, LocalAddrKey, MapDef, MapKind, SERVICES, ServiceKey, ServiceValue,
};

use crate::instance;

/// How full one pinned map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MapFill {
    pub(crate) name: &'static str,
    pub(crate) entries: u64,
    pub(crate) capacity: u64,
}

/// The entries of every hash map that grows with traffic or mappings
/// (arrays are always full, per-CPU counters follow the mappings, and
/// socket storage lives and dies with the sockets).
pub(crate) fn map_fill(pin_dir: &Path) -> Result<Vec<MapFill>> {
    let mut fills = vec![
        fill::<ServiceKey, ServiceValue>(pin_dir, &SERVICES)?,
        fill::<LocalAddrKey, u8>(pin_dir, &LOCAL_ADDRS)?,
        fill::<CtKey, CtValue>(pin_dir, &CONNTRACK)?,
        fill::<FragmentKey, FragmentValue>(pin_dir, &FRAGMENTS)?,
    ];
    // Not pinned while the programs of a build before it run.
    if pin_dir.join(CONNTRACK_OPENING.name).exists() {
        fills.insert(3, fill::<CtKey, CtValue>(pin_dir, &CONNTRACK_OPENING)?);
    }
    Ok(fills)
}

/// Counts the keys of one pinned hash map: one `BPF_MAP_GET_NEXT_KEY` per
/// entry (a conntrack table of 500,000 flows takes a fraction of a second).
fn fill<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, def: &MapDef) -> Result<MapFill> {
    let path = pin_dir.join(def.name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let capacity = u64::from(data.info()?.max_entries());
    let map = match def.kind {
        MapKind::LruHash => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    };
    let map: HashMap<MapData, K, V> =
        HashMap::try_from(map).with_context(|| format!("{} has an unexpected layout", def.name))?;
    // A key deleted while we walk ends the walk early: a slight undercount.
    let entries = map.keys().take_while(Result::is_ok).count() as u64;
    Ok(MapFill {
        name: def.name,
        entries,
        capacity,
    })
}

/// How often one of portfwd's programs ran, summed over its attachments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProgramRuns {
    pub(crate) runs: u64,
    pub(crate) run_time: Duration,
    /// Loaded copies (one per attachment for TC programs on some kernels).
    pub(crate) instances: u64,
}

/// The run counts of the programs attached through this instance's pins,
/// by program name. The kernel counts only while run-time statistics are on
/// (`kernel.bpf_stats_enabled=1`, or `portfwd serve --program-stats`).
pub(crate) fn program_runs(pin_dir: &Path) -> BTreeMap<String, ProgramRuns> {
    let mut ids = BTreeSet::new();
    collect_program_ids(&instance::links_dir(pin_dir), &mut ids, 0);
    let mut runs: BTreeMap<String, ProgramRuns> = BTreeMap::new();
    if ids.is_empty() {
        return runs;
    }
    // aya 0.14 opens a program by id only through this iterator.
    for info in aya::programs::loaded_programs().filter_map(Result::ok) {
        if !ids.contains(&info.id()) {
            continue;
        }
        // The kernel keeps 15 bytes of a name: give the ABI's full one.
        let short = info.name_as_str().unwrap_or("?");
        let name = portfwd_common::programs()
            .find(|p| p.name.starts_with(short))
            .map_or(short, |p| p.name)
            .to_owned();
        let entry = runs.entry(name).or_default();
        entry.runs += info.run_count();
        entry.run_time += info.run_time();
        entry.instances += 1;
    }
    runs
}

/// The ids of the programs behind the pins under `dir`: TCX and cgroup
/// links (pinned links) and netlink TC filters (pinned programs).
fn collect_program_ids(dir: &Path, ids: &mut BTreeSet<u32>, depth: usize) {
    // links/tc/<interface>/<program>[/<netlink filter>]: bounded depth.
    if depth > 4 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|entry| entry.path()) {
        if path.is_dir() {
            collect_program_ids(&path, ids, depth + 1);
        } else if let Ok(link) = PinnedLink::from_pin(&path) {
            let link: FdLink = link.into();
            if let Ok(info) = link.info() {
                ids.insert(info.program_id());
            }
        } else if let Ok(info) = ProgramInfo::from_pin(&path) {
            ids.insert(info.id());
        }
    }
}

/// Turns the kernel's per-program run-time statistics on for as long as the
/// returned descriptor is open (`BPF_ENABLE_STATS`): each program run then
/// costs two clock reads more.
pub(crate) fn enable_run_statistics() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("turning on the kernel's BPF run-time statistics")
}
