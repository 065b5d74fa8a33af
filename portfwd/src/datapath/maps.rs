//! Typed access to the pinned maps: the whole state of portfwd. Every
//! command that changes them holds an exclusive lock on the pin directory, so
//! concurrent CLI processes never interleave their read-check-write steps.

use std::{fs::File, net::IpAddr, path::Path};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use nix::fcntl::{Flock, FlockArg};
use portfwd_common::{
    Addr, CONFIG, COUNTERS, Config, LOCAL_ADDRS, LocalAddrKey, MappingCounters, SERVICES, STATS,
    ServiceKey, ServiceValue, Stat,
};

use crate::model::Mapping;

/// Insert only when the key is absent (BPF_NOEXIST).
const NO_EXIST: u64 = 1;

/// An exclusive lock on the pin directory, held until dropped.
pub(crate) struct StateLock(#[allow(dead_code)] Flock<File>);

impl StateLock {
    /// The lock if it is free now, None if another process holds it.
    pub(crate) fn try_acquire(dir: &Path) -> Result<Option<Self>> {
        let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(StateLock(lock))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(anyhow!("locking {}: {errno}", dir.display())),
        }
    }

    pub(crate) fn acquire(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "portfwd is not up ({} does not exist): run `portfwd up` first",
                dir.display()
            );
        }
        let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| anyhow!("locking {}: {errno}", dir.display()))?;
        Ok(StateLock(lock))
    }
}

/// The pinned maps. Opening them takes a held `StateLock` as proof that
/// this process is the only writer.
pub(crate) struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    local_addrs: HashMap<MapData, LocalAddrKey, u8>,
    config: Array<MapData, Config>,
    counters: PerCpuHashMap<MapData, ServiceKey, MappingCounters>,
    stats: PerCpuArray<MapData, u64>,
}

fn open_pin(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|error| {
        if !path.exists() {
            anyhow!(
                "portfwd is not up (no {} under {}): run `portfwd up` first",
                name,
                dir.display()
            )
        } else {
            anyhow!("opening the pinned map {}: {error}", path.display())
        }
    })
}

impl PinnedMaps {
    /// Opens the maps pinned under `dir`, which `_lock` holds.
    pub(crate) fn open(dir: &Path, _lock: &StateLock) -> Result<Self> {
        Self::open_unlocked(dir)
    }

    /// Opens the maps without the lock: only for reading, by a process that
    /// must not wait for the lock (the port holder, which the CLI waits for
    /// while it holds the lock).
    pub(crate) fn open_unlocked(dir: &Path) -> Result<Self> {
        let services = HashMap::try_from(Map::HashMap(open_pin(dir, SERVICES.name)?)).context(
            "the services map has an unexpected layout (built by another portfwd version?)",
        )?;
        let local_addrs = HashMap::try_from(Map::HashMap(open_pin(dir, LOCAL_ADDRS.name)?))
            .context("the local addresses map has an unexpected layout")?;
        let config = Array::try_from(Map::Array(open_pin(dir, CONFIG.name)?))
            .context("the config map has an unexpected layout")?;
        let counters = PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pin(dir, COUNTERS.name)?))
            .context("the counters map has an unexpected layout")?;
        let stats = PerCpuArray::try_from(Map::PerCpuArray(open_pin(dir, STATS.name)?))
            .context("the stats map has an unexpected layout")?;
        Ok(PinnedMaps {
            services,
            local_addrs,
            config,
            counters,
            stats,
        })
    }

    /// Every mapping, sorted by host port, protocol and address.
    pub(crate) fn mappings(&self) -> Result<Vec<Mapping>> {
        let mut mappings = Vec::new();
        for entry in self.services.iter() {
            let (key, value) = entry.context("reading the services map")?;
            // Entries this build cannot decode are not ours to show or touch.
            if let Some(mapping) = Mapping::from_entry(&key, &value) {
                mappings.push(mapping);
            }
        }
        mappings.sort_by_key(|m| (m.host.port(), m.protocol, m.host.is_ipv6(), m.host.ip()));
        Ok(mappings)
    }

    /// Adds every mapping or, on any failure, none: entries added before the
    /// failure are removed again.
    pub(crate) fn add_all(&mut self, mappings: &[Mapping]) -> Result<()> {
        let cpus = possible_cpus()?;
        for (done, mapping) in mappings.iter().enumerate() {
            // Counters first, so that the programs count from the first packet.
            let inserted = self
                .counters
                .insert(mapping.key(), zeroed_per_cpu(cpus)?, 0)
                .and_then(|()| {
                    self.services
                        .insert(mapping.key(), mapping.value(), NO_EXIST)
                });
            if let Err(error) = inserted {
                self.forget_counters(&mapping.key());
                let undo = self.remove_keys(mappings[..done].iter().map(Mapping::key));
                let error = describe_insert_error(error, mapping);
                return match undo {
                    Ok(()) => Err(error),
                    Err(undo_error) => Err(error.context(format!(
                        "and rolling back the entries added before it failed too: {undo_error}"
                    ))),
                };
            }
        }
        Ok(())
    }

    /// Removes every mapping or, on any failure, none: removed entries are
    /// put back.
    pub(crate) fn remove_all(&mut self, mappings: &[Mapping]) -> Result<()> {
        for (done, mapping) in mappings.iter().enumerate() {
            if let Err(error) = self.services.remove(&mapping.key()) {
                let lost: Vec<String> = mappings[..done]
                    .iter()
                    .filter(|m| self.services.insert(m.key(), m.value(), NO_EXIST).is_err())
                    .map(Mapping::to_string)
                    .collect();
                let error = anyhow!("removing {mapping}: {error}");
                if lost.is_empty() {
                    return Err(error);
                }
                return Err(error.context(format!(
                    "and putting back what was removed before failed for {}",
                    lost.join(", ")
                )));
            }
        }
        // Counters go only once every entry is gone; flows of the removed
        // mappings stop at their next packet (the programs check the map).
        for mapping in mappings {
            self.forget_counters(&mapping.key());
        }
        Ok(())
    }

    /// Removes a mapping's counters. A failure is ignored: the entry is
    /// then stale but harmless (adding the mapping again resets it).
    fn forget_counters(&mut self, key: &ServiceKey) {
        self.counters.remove(key).ok();
    }

    /// Points an existing mapping's entry at another interface.
    pub(crate) fn set_ifindex(&mut self, mapping: &Mapping, ifindex: u32) -> Result<()> {
        let mut updated = mapping.clone();
        updated.ifindex = ifindex;
        const EXIST: u64 = 2;
        self.services
            .insert(updated.key(), updated.value(), EXIST)
            .with_context(|| format!("updating {mapping}"))?;
        Ok(())
    }

    /// The interface the TC path redirects a mapping's new flows to.
    pub(crate) fn service_ifindex(&self, key: &ServiceKey) -> Option<u32> {
        self.services.get(key, 0).ok().map(|value| value.ifindex)
    }

    /// A mapping's traffic, summed over CPUs.
    pub(crate) fn counters(&self, mapping: &Mapping) -> MappingCounters {
        let mut sum = MappingCounters::default();
        if let Ok(per_cpu) = self.counters.get(&mapping.key(), 0) {
            for c in per_cpu.iter() {
                sum.packets_in += c.packets_in;
                sum.bytes_in += c.bytes_in;
                sum.packets_out += c.packets_out;
                sum.bytes_out += c.bytes_out;
                sum.connections += c.connections;
            }
        }
        sum
    }

    /// The TC programs' stats, summed over CPUs.
    pub(crate) fn stats(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|&stat| {
                // A stats map created by an older build may be shorter.
                let sum = self
                    .stats
                    .get(&stat.index(), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (stat, sum)
            })
            .collect()
    }

    fn remove_keys(&mut self, keys: impl Iterator<Item = ServiceKey>) -> Result<()> {
        for key in keys {
            self.services.remove(&key)?;
            self.forget_counters(&key);
        }
        Ok(())
    }

    /// Makes the local addresses map hold exactly `addresses`.
    pub(crate) fn sync_local_addrs(&mut self, addresses: &[IpAddr]) -> Result<()> {
        let wanted: Vec<LocalAddrKey> = addresses
            .iter()
            .map(|&ip| {
                let (family, addr) = Addr::from_ip(ip);
                LocalAddrKey::new(family, addr)
            })
            .collect();
        let stale: Vec<LocalAddrKey> = self
            .local_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.contains(key))
            .collect();
        for key in &stale {
            self.local_addrs.remove(key)?;
        }
        for key in &wanted {
            self.local_addrs
                .insert(key, 1, 0)
                .context("updating the local addresses map (more than its capacity?)")?;
        }
        Ok(())
    }

    pub(crate) fn set_config(&mut self, config: Config) -> Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing the config map")?;
        Ok(())
    }
}

fn possible_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, error)| anyhow!("{what}: {error}"))
}

fn zeroed_per_cpu(cpus: usize) -> Result<PerCpuValues<MappingCounters>, MapError> {
    PerCpuValues::try_from(vec![MappingCounters::default(); cpus]).map_err(MapError::from)
}

fn describe_insert_error(error: MapError, mapping: &Mapping) -> anyhow::Error {
    if let MapError::SyscallError(syscall) = &error {
        match syscall.io_error.raw_os_error() {
            Some(libc::EEXIST) => {
                return anyhow!(
                    "{}/{} on {} is already published",
                    mapping.host.port(),
                    mapping.protocol,
                    mapping.host.ip()
                );
            }
            Some(libc::E2BIG) | Some(libc::ENOMEM) => {
                return anyhow!("cannot add {mapping}: the services map is full");
            }
            _ => {}
        }
    }
    anyhow!("adding {mapping}: {error}")
}
