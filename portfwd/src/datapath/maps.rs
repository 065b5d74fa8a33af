//! Typed access to the pinned maps: the whole state of portfwd. Every
//! command that changes them holds the state lock (`lock.rs`).

use std::{borrow::BorrowMut, collections::BTreeMap, net::IpAddr, os::fd::AsFd, path::Path};

use anyhow::{Context, Result, anyhow};
use aya::maps::{
    Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use portfwd_common::{
    ALLOW, Addr, AllowKey, BACKEND_PORTS, CONFIG, COUNTERS, Config, LOCAL_ADDR_BITS, LOCAL_ADDRS,
    LocalAddrKey, MappingCounters, NAT46_SRC, PUBLISHED_PORTS, SERVICES, SERVICES_GEN, STATS,
    ServiceKey, ServiceValue, Stat, local_addr_bit, port_bit,
};

use super::StateLock;
use crate::model::{Allowlist, Mapping};

/// Insert only when the key is absent (BPF_NOEXIST).
pub(super) const NO_EXIST: u64 = 1;

/// From this many mappings on, a change writes the services map in
/// batches (see `PinnedMaps::insert_batched`).
const BATCH_FROM: usize = 64;

/// The pinned maps. Opening them takes a held `StateLock` as proof that
/// this process is the only writer.
pub(crate) struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    local_addrs: HashMap<MapData, LocalAddrKey, u8>,
    /// None on an instance an earlier build made, until `up` with this
    /// one creates it (its programs, which read the bits, come with it).
    local_addr_bits: Option<Array<MapData, u32>>,
    config: Array<MapData, Config>,
    counters: PerCpuHashMap<MapData, ServiceKey, MappingCounters>,
    stats: PerCpuArray<MapData, u64>,
    services_gen: Array<MapData, u64>,
    published_ports: Array<MapData, u32>,
    backend_ports: Array<MapData, u32>,
    allow: LpmTrie<MapData, AllowKey, u8>,
    nat46_src: HashMap<MapData, ServiceKey, Addr>,
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
        // Optional: the other commands of this build must work (CNI DEL
        // above all) on an instance an earlier build made, before `up`
        // brings this build's programs and the map with them.
        let local_addr_bits = if dir.join(LOCAL_ADDR_BITS.name).exists() {
            let map = Array::try_from(Map::Array(open_pin(dir, LOCAL_ADDR_BITS.name)?))
                .context("the local address bits map has an unexpected layout")?;
            Some(map)
        } else {
            None
        };
        let config = Array::try_from(Map::Array(open_pin(dir, CONFIG.name)?))
            .context("the config map has an unexpected layout")?;
        let counters = PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pin(dir, COUNTERS.name)?))
            .context("the counters map has an unexpected layout")?;
        let stats = PerCpuArray::try_from(Map::PerCpuArray(open_pin(dir, STATS.name)?))
            .context("the stats map has an unexpected layout")?;
        let services_gen = Array::try_from(Map::Array(open_pin(dir, SERVICES_GEN.name)?))
            .context("the services generation map has an unexpected layout")?;
        let published_ports = Array::try_from(Map::Array(open_pin(dir, PUBLISHED_PORTS.name)?))
            .context("the published ports map has an unexpected layout")?;
        let backend_ports = Array::try_from(Map::Array(open_pin(dir, BACKEND_PORTS.name)?))
            .context("the backend ports map has an unexpected layout")?;
        let allow = LpmTrie::try_from(Map::LpmTrie(open_pin(dir, ALLOW.name)?))
            .context("the allowlist map has an unexpected layout")?;
        let nat46_src = HashMap::try_from(Map::HashMap(open_pin(dir, NAT46_SRC.name)?))
            .context("the NAT46 sources map has an unexpected layout")?;
        Ok(PinnedMaps {
            allow,
            nat46_src,
            services,
            local_addrs,
            local_addr_bits,
            config,
            counters,
            stats,
            services_gen,
            published_ports,
            backend_ports,
        })
    }

    /// Every entry of the services map: in a few batched calls, or (on a
    /// kernel that refuses them) one entry at a time.
    fn service_entries(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        let fd = IterableMap::map(&self.services).fd().as_fd();
        match super::batch::lookup_all(fd) {
            Ok(entries) => Ok(entries),
            Err(_) => self
                .services
                .iter()
                .collect::<Result<_, _>>()
                .context("reading the services map"),
        }
    }

    /// Every mapping, sorted by host port, protocol and address.
    pub(crate) fn mappings(&self) -> Result<Vec<Mapping>> {
        let mut mappings = Vec::new();
        for (key, value) in self.service_entries()? {
            // Entries this build cannot decode are not ours to show or touch.
            if let Some(mapping) = Mapping::from_entry(&key, &value) {
                mappings.push(mapping);
            }
        }
        let mut networks = self.allowlists()?;
        for m in &mut mappings {
            let key = m.key();
            if let Some(allow) = &mut m.allow {
                allow.networks = networks.remove(&key).unwrap_or_default();
                allow.networks.sort();
            }
        }
        mappings.sort_by_key(|m| (m.host.port(), m.protocol, m.host.is_ipv6(), m.host.ip()));
        Ok(mappings)
    }

    /// The mapping published on `key`, if any, its allowlist included: one
    /// lookup (and a walk of the allowlist map for a mapping that has one).
    pub(crate) fn mapping(&self, key: &ServiceKey) -> Result<Option<Mapping>> {
        let value = match self.services.get(key, 0) {
            Ok(value) => value,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(error) => return Err(error).context("reading the services map"),
        };
        let Some(mut mapping) = Mapping::from_entry(key, &value) else {
            return Ok(None);
        };
        if let Some(allow) = &mut mapping.allow {
            for entry in self.allow.keys() {
                let entry = entry.context("reading the allowlist map")?;
                let data = entry.data();
                if data.service == *key
                    && let Some(network) = Allowlist::network_of(entry.prefix_len(), &data)
                {
                    allow.networks.push(network);
                }
            }
            allow.networks.sort();
        }
        Ok(Some(mapping))
    }

    /// The networks of every allowlist, by mapping.
    fn allowlists(
        &self,
    ) -> Result<std::collections::HashMap<ServiceKey, Vec<crate::model::Network>>> {
        let mut by_service: std::collections::HashMap<ServiceKey, Vec<_>> = Default::default();
        for key in self.allow.keys() {
            let key = key.context("reading the allowlist map")?;
            let data = key.data();
            if let Some(network) = Allowlist::network_of(key.prefix_len(), &data) {
                by_service.entry(data.service).or_default().push(network);
            }
        }
        Ok(by_service)
    }

    /// Writes a mapping's allowlist networks (those left for its key by a
    /// removal that failed half-way are gone: see `forget_allowlists`).
    fn set_allowlist(&mut self, mapping: &Mapping) -> Result<(), MapError> {
        let service = mapping.key();
        let Some(allow) = &mapping.allow else {
            return Ok(());
        };
        for (prefix_len, key) in allow.keys(&service) {
            self.allow.insert(&LpmKey::new(prefix_len, key), 1, 0)?;
        }
        Ok(())
    }

    /// Removes a mapping's allowlist networks; failures are ignored (a
    /// stale network is removed when the key is published again).
    fn forget_allowlist(&mut self, service: &ServiceKey) {
        self.forget_allowlists(std::slice::from_ref(service));
    }

    /// Removes the allowlist networks of every mapping of `services`, in one
    /// walk of the allowlist map (not one per mapping: a large change would
    /// walk it thousands of times).
    fn forget_allowlists(&mut self, services: &[ServiceKey]) {
        let services: std::collections::HashSet<&ServiceKey> = services.iter().collect();
        let stale: Vec<LpmKey<AllowKey>> = self
            .allow
            .keys()
            .filter_map(Result::ok)
            .filter(|key| services.contains(&key.data().service))
            .collect();
        for key in stale {
            self.allow.remove(&key).ok();
        }
    }

    /// Adds every mapping or, on any failure, none: entries added before the
    /// failure are removed again.
    pub(crate) fn add_all(&mut self, mappings: &[Mapping]) -> Result<()> {
        self.mark_ports(mappings)?;
        let keys: Vec<ServiceKey> = mappings.iter().map(Mapping::key).collect();
        self.forget_allowlists(&keys);
        // Counters first, so that the programs count from the first packet.
        if let Err((failed, error)) = self.zero_counters(&keys, possible_cpus()?) {
            keys.iter().for_each(|key| self.forget_counters(key));
            return Err(describe_insert_error(error, &mappings[failed]));
        }
        if mappings.len() >= BATCH_FROM && self.insert_batched(mappings, &keys).is_ok() {
            return Ok(());
        }
        for (done, mapping) in mappings.iter().enumerate() {
            // The allowlist before the entry whose flag says to look it up,
            // so that no client is refused while it is written.
            let inserted = self
                .set_nat46_source(mapping)
                .and_then(|()| self.set_allowlist(mapping))
                .and_then(|()| {
                    self.services
                        .insert(mapping.key(), mapping.value(), NO_EXIST)
                });
            if let Err(error) = inserted {
                keys[done..]
                    .iter()
                    .for_each(|key| self.forget_counters(key));
                self.nat46_src.remove(&mapping.key()).ok();
                self.forget_allowlist(&mapping.key());
                let undo = self.remove_keys(keys[..done].iter().copied());
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

    /// The services entries of a large change in a few batched calls
    /// (10,000 single inserts are most of what a 10,000-port `map` costs),
    /// each mapping's NAT46 source and allowlist written before them. The
    /// batch command takes no BPF_NOEXIST: that the keys are absent rests
    /// on the planner, which found them in no mapping of the state file,
    /// and the services map holds exactly the state file's mappings while
    /// the lock is held (a change a killed command left half done is
    /// rolled back before anything is planned). On a failure (a full map),
    /// what this wrote is removed again and the caller inserts one entry at
    /// a time, which names the mapping that failed, and why.
    fn insert_batched(&mut self, mappings: &[Mapping], keys: &[ServiceKey]) -> Result<(), ()> {
        let written = mappings.iter().try_for_each(|mapping| {
            self.set_nat46_source(mapping)
                .and_then(|()| self.set_allowlist(mapping))
        });
        let values: Vec<ServiceValue> = mappings.iter().map(Mapping::value).collect();
        let inserted = written.is_ok()
            && super::batch::update_all(
                IterableMap::map(&self.services).fd().as_fd(),
                keys,
                bytemuck::cast_slice(&values),
                size_of::<ServiceValue>(),
            )
            .is_ok();
        if inserted {
            return Ok(());
        }
        for key in keys {
            // Absent (not written before the failure): nothing to undo.
            self.services.remove(key).ok();
            self.nat46_src.remove(key).ok();
        }
        self.forget_allowlists(keys);
        Err(())
    }

    /// Sets the counters of `keys` to zero: in a few batched calls, or (on a
    /// kernel that refuses them, or a failure half-way: a full map) one at a
    /// time, which says which key failed, and why.
    fn zero_counters(&mut self, keys: &[ServiceKey], cpus: usize) -> Result<(), (usize, MapError)> {
        // One value per possible CPU, each 8-byte aligned (40 bytes already).
        let value_len = size_of::<MappingCounters>().next_multiple_of(8) * cpus;
        let zeros = vec![0u8; keys.len() * value_len];
        let fd = IterableMap::map(&self.counters).fd().as_fd();
        if super::batch::update_all(fd, keys, &zeros, value_len).is_ok() {
            return Ok(());
        }
        for (i, key) in keys.iter().enumerate() {
            zeroed_per_cpu(cpus)
                .and_then(|zeroed| self.counters.insert(key, zeroed, 0))
                .map_err(|error| (i, error))?;
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
        self.services_changed()?;
        // Counters go only once every entry is gone; flows of the removed
        // mappings stop at their next packet (the programs check the map).
        let keys: Vec<ServiceKey> = mappings.iter().map(Mapping::key).collect();
        for key in &keys {
            self.forget_counters(key);
            // Only IPv6 host addresses have one (see `set_nat46_source`).
            if key.family != portfwd_common::FAMILY_V4 {
                self.nat46_src.remove(key).ok();
            }
        }
        self.forget_allowlists(&keys);
        Ok(())
    }

    /// Tells the TC programs that mappings were removed: tracked flows look
    /// their mapping up again at their next packet (until then they skip
    /// that lookup). Only after the removal: a flow that checked in between
    /// would otherwise keep a mapping that is gone.
    fn services_changed(&mut self) -> Result<()> {
        let generation = self.services_gen.get(&0, 0).unwrap_or(0);
        self.services_gen
            .set(0, generation.wrapping_add(1), 0)
            .context("updating the services generation")
    }

    /// Removes a mapping's counters. A failure is ignored: the entry is
    /// then stale but harmless (adding the mapping again resets it).
    fn forget_counters(&mut self, key: &ServiceKey) {
        self.counters.remove(key).ok();
    }

    /// Points an existing mapping's entry at another interface (and a NAT46
    /// mapping at the host's IPv4 address towards its container now).
    pub(crate) fn set_ifindex(&mut self, mapping: &Mapping, ifindex: u32) -> Result<()> {
        let mut updated = mapping.clone();
        updated.ifindex = ifindex;
        self.set_nat46_source(mapping)
            .with_context(|| format!("updating {mapping}"))?;
        const EXIST: u64 = 2;
        self.services
            .insert(updated.key(), updated.value(), EXIST)
            .with_context(|| format!("updating {mapping}"))?;
        Ok(())
    }

    /// For a mapping of an IPv4 container on an IPv6 host address (NAT46 on
    /// the TC path, see `portfwd-ebpf/src/nat46.rs`): the host's IPv4
    /// address towards the container, which the container sees IPv6 clients
    /// come from. Without a route to the container (or one without a
    /// source), none: the TC path then leaves IPv6 clients untranslated
    /// (`explain` says so), the socket path serves the host as ever.
    fn set_nat46_source(&mut self, mapping: &Mapping) -> Result<(), MapError> {
        let key = mapping.key();
        let source = match (mapping.host.ip(), mapping.container.ip()) {
            (IpAddr::V6(_), IpAddr::V4(container)) => nat46_source(container),
            _ => None,
        };
        match source {
            Some(source) => self.nat46_src.insert(key, Addr::from(source), 0),
            // Only IPv6 host addresses ever have one (a stale one, of a
            // mapping removed half-way, is removed): no call for the others.
            None if mapping.host.is_ipv6() => {
                self.nat46_src.remove(&key).ok();
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The host's IPv4 address that a NAT46 mapping's container sees IPv6
    /// clients come from; None when there is none (or not a NAT46 mapping).
    pub(crate) fn nat46_source(&self, mapping: &Mapping) -> Option<std::net::Ipv4Addr> {
        let addr = self.nat46_src.get(&mapping.key(), 0).ok()?;
        match addr.to_ip(portfwd_common::FAMILY_V4)? {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
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
        let keys: Vec<ServiceKey> = keys.collect();
        for key in &keys {
            self.services.remove(key)?;
            self.forget_counters(key);
        }
        self.forget_allowlists(&keys);
        self.services_changed()
    }

    /// Whether the programs take `ip` for one of the host's addresses: in
    /// the local addresses map, and its bit set (a map without the bits is
    /// an earlier build's, whose programs do not read them).
    pub(crate) fn is_recorded_host_address(&self, ip: IpAddr) -> Result<bool> {
        let (family, addr) = Addr::from_ip(ip);
        let key = LocalAddrKey::new(family, addr);
        if self.local_addrs.get(&key, 0).is_err() {
            return Ok(false);
        }
        let Some(bitmap) = &self.local_addr_bits else {
            return Ok(true);
        };
        let (word, bit) = local_addr_bit(family, &addr);
        Ok(bitmap.get(&word, 0)? & bit != 0)
    }

    /// Makes the local addresses map hold exactly `addresses`, and their
    /// bits (`LOCAL_ADDR_BITS`) say so: an address's bit is set before the
    /// address enters the map and cleared after it left, so that the
    /// programs, which ask the map only when the bit is set, never miss
    /// an address it holds. A bit that a wanted address lacks (written by
    /// an earlier build's holder, which knew no bits) is set too.
    pub(crate) fn sync_local_addrs(&mut self, addresses: &[IpAddr]) -> Result<()> {
        let wanted: Vec<LocalAddrKey> = addresses
            .iter()
            .map(|&ip| {
                let (family, addr) = Addr::from_ip(ip);
                LocalAddrKey::new(family, addr)
            })
            .collect();
        let present: Vec<LocalAddrKey> = self.local_addrs.keys().filter_map(Result::ok).collect();
        let mut current = BTreeMap::new();
        if let Some(bitmap) = &self.local_addr_bits {
            for word in local_addr_words(&wanted).into_keys() {
                current.insert(word, bitmap.get(&word, 0)?);
            }
        }
        let change = LocalAddrChange::new(&present, &wanted, &current);
        for (&word, &bits) in &change.bits_first {
            self.set_local_addr_word(word, bits)?;
        }
        for key in &change.gone {
            self.local_addrs.remove(key)?;
        }
        for key in &change.added {
            self.local_addrs
                .insert(key, 1, 0)
                .context("updating the local addresses map (more than its capacity?)")?;
        }
        for (&word, &bits) in &change.bits_last {
            self.set_local_addr_word(word, bits)?;
        }
        Ok(())
    }

    /// Sets the bits of every address in the local addresses map (after an
    /// upgrade from a build without them, whose `up` creates their map
    /// empty), before any program that reads them is attached. A bit of an
    /// address gone stays until a sync writes its word (a set bit only
    /// costs the programs a lookup).
    pub(crate) fn rebuild_local_addr_bits(&mut self) -> Result<()> {
        let present: Vec<LocalAddrKey> = self.local_addrs.keys().filter_map(Result::ok).collect();
        match &mut self.local_addr_bits {
            Some(bitmap) => set_bits(bitmap, local_addr_words(&present)),
            None => Ok(()),
        }
    }

    /// Writes a word of the bits; nothing without the map (an earlier
    /// build's programs run, which do not read it).
    fn set_local_addr_word(&mut self, word: u32, bits: u32) -> Result<()> {
        if let Some(bitmap) = &mut self.local_addr_bits {
            bitmap
                .set(word, bits, 0)
                .context("writing the local address bits map")?;
        }
        Ok(())
    }

    /// Sets the bits of `mappings`' host ports in `PUBLISHED_PORTS` and of
    /// their container ports in `BACKEND_PORTS` (before their entries
    /// exist, so that the socket programs never skip a published port or
    /// a translated socket's peer); one read and one write per word that
    /// changes.
    fn mark_ports(&mut self, mappings: &[Mapping]) -> Result<()> {
        let mut published: BTreeMap<u32, u32> = BTreeMap::new();
        let mut backends: BTreeMap<u32, u32> = BTreeMap::new();
        for m in mappings {
            let proto = m.key().proto;
            let (word, bit) = port_bit(proto, m.host.port());
            *published.entry(word).or_default() |= bit;
            let (word, bit) = port_bit(proto, m.container.port());
            *backends.entry(word).or_default() |= bit;
        }
        set_bits(&mut self.published_ports, published)?;
        set_bits(&mut self.backend_ports, backends)
    }

    /// `up`: makes the published-ports bits exactly those of the services
    /// map (clears the bits of ports no longer published), and adds the
    /// services' container ports to the backend-ports bits (which are
    /// never cleared: see `BACKEND_PORTS`).
    pub(crate) fn rebuild_port_bits(&mut self) -> Result<()> {
        let mut published = vec![0u32; PUBLISHED_PORTS.max_entries as usize];
        let mut backends: BTreeMap<u32, u32> = BTreeMap::new();
        for (key, value) in self.service_entries()? {
            let (word, bit) = port_bit(key.proto, u16::from_be(key.port));
            published[word as usize] |= bit;
            let (word, bit) = port_bit(key.proto, u16::from_be(value.port));
            *backends.entry(word).or_default() |= bit;
        }
        for (word, bits) in (0u32..).zip(published) {
            if self.published_ports.get(&word, 0)? != bits {
                self.published_ports.set(word, bits, 0)?;
            }
        }
        set_bits(&mut self.backend_ports, backends)
    }

    pub(crate) fn set_config(&mut self, config: Config) -> Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing the config map")?;
        Ok(())
    }
}

/// How `PinnedMaps::sync_local_addrs` takes the local addresses map from
/// the addresses it holds to those wanted, in four steps: the words of
/// `LOCAL_ADDR_BITS` where a wanted address lacks its bit (an added one,
/// or one an earlier build's holder added without it) are written first,
/// with their bits as they are plus those of every address present or
/// wanted; the addresses gone leave the map, the added ones enter it; the
/// words that the addresses gone touched are written last, with the bits
/// of the wanted ones only. So at every step each address in the map whose
/// bit was set keeps it, and after the first step each wanted one has it.
/// Only what changes is written: every change syncs, and the addresses
/// rarely change.
#[derive(Debug, Default, PartialEq, Eq)]
struct LocalAddrChange {
    bits_first: BTreeMap<u32, u32>,
    gone: Vec<LocalAddrKey>,
    added: Vec<LocalAddrKey>,
    bits_last: BTreeMap<u32, u32>,
}

impl LocalAddrChange {
    /// `current`: the words of the bitmap that the wanted addresses touch,
    /// as they are.
    fn new(
        present: &[LocalAddrKey],
        wanted: &[LocalAddrKey],
        current: &BTreeMap<u32, u32>,
    ) -> Self {
        let gone: Vec<LocalAddrKey> = present
            .iter()
            .filter(|key| !wanted.contains(key))
            .copied()
            .collect();
        let added: Vec<LocalAddrKey> = wanted
            .iter()
            .filter(|key| !present.contains(key))
            .copied()
            .collect();
        let meanwhile = local_addr_words(present.iter().chain(wanted));
        let after = local_addr_words(wanted);
        let bits_first = after
            .iter()
            .filter_map(|(&word, &bits)| {
                let now = current.get(&word).copied().unwrap_or(0);
                (now & bits != bits).then(|| (word, now | meanwhile[&word]))
            })
            .collect();
        let bits_last = local_addr_words(&gone)
            .into_keys()
            .map(|word| (word, after.get(&word).copied().unwrap_or(0)))
            .collect();
        LocalAddrChange {
            bits_first,
            gone,
            added,
            bits_last,
        }
    }
}

/// The words of `LOCAL_ADDR_BITS` that `keys` set (word index → bits).
fn local_addr_words<'a>(keys: impl IntoIterator<Item = &'a LocalAddrKey>) -> BTreeMap<u32, u32> {
    let mut words = BTreeMap::new();
    for key in keys {
        let (word, bit) = local_addr_bit(key.family, &key.addr);
        *words.entry(word).or_default() |= bit;
    }
    words
}

/// Adds `bits` (word index → bits) to a bitmap (also the packet cases'
/// own, `tc_fixture`).
pub(super) fn set_bits<T: BorrowMut<MapData>>(
    bitmap: &mut Array<T, u32>,
    bits: BTreeMap<u32, u32>,
) -> Result<()> {
    for (word, bits) in bits {
        let old = bitmap.get(&word, 0)?;
        if old | bits != old {
            bitmap.set(word, old | bits, 0)?;
        }
    }
    Ok(())
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

/// The host's IPv4 address towards `container`: the source of its route.
/// A failed lookup counts as none (the mapping still serves the host).
fn nat46_source(container: std::net::Ipv4Addr) -> Option<std::net::Ipv4Addr> {
    match crate::host::netlink::route_source(container.into()) {
        Ok(Some(IpAddr::V4(source))) => Some(source),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::Ipv4Addr};

    use portfwd_common::FAMILY_V4;

    use super::*;

    fn v4(last: u32) -> LocalAddrKey {
        let ip = Ipv4Addr::from(0x0a00_0000 + last);
        LocalAddrKey::new(FAMILY_V4, Addr::from(ip))
    }

    /// Addresses of which the first two share a word of the bitmap, and
    /// the next two a bit: the steps must keep a shared word's or bit's
    /// other address.
    fn colliding() -> Vec<LocalAddrKey> {
        let candidates: Vec<LocalAddrKey> = (1..200_000).map(v4).collect();
        let bit = |key: &LocalAddrKey| local_addr_bit(key.family, &key.addr);
        let same_word = candidates
            .iter()
            .flat_map(|a| candidates[..64].iter().map(move |b| (a, b)))
            .find(|(a, b)| a != b && bit(a).0 == bit(b).0 && bit(a).1 != bit(b).1)
            .expect("two addresses in one word");
        let first = candidates[0];
        let same_bit = candidates[1..]
            .iter()
            .find(|b| bit(b) == bit(&first))
            .expect("two addresses on one bit");
        vec![*same_word.0, *same_word.1, first, *same_bit]
    }

    /// Every address of `keys` has its bit set in `bitmap`.
    fn assert_bits_cover<'a>(
        keys: impl IntoIterator<Item = &'a LocalAddrKey>,
        bitmap: &BTreeMap<u32, u32>,
        step: &str,
    ) {
        for key in keys {
            let (word, bit) = local_addr_bit(key.family, &key.addr);
            let bits = bitmap.get(&word).copied().unwrap_or(0);
            assert_ne!(bits & bit, 0, "{step}: {key:?} has its bit clear");
        }
    }

    /// The sync's steps, played on a model of the two maps from every
    /// subset of some addresses to every other, the bitmap as a sync of
    /// this build leaves it or missing the bits of addresses an earlier
    /// build's holder added: at each step, every address in the map keeps
    /// the bit it had, and has one once it is wanted and the first step is
    /// done; at the end every address has its bit, and the bitmap's words
    /// that changed hold exactly the bits of the wanted addresses.
    #[test]
    fn no_address_in_the_map_ever_has_its_bit_clear() {
        let addresses = [colliding(), vec![v4(7), v4(1 << 20)]].concat();
        let subset = |mask: u32| -> Vec<LocalAddrKey> {
            (0..addresses.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| addresses[i])
                .collect()
        };
        let all = 1u32 << addresses.len();
        for from in 0..all {
            let present = subset(from);
            // Without bits: none, the first present address, all of them.
            let unbitted = [
                vec![],
                present.iter().take(1).copied().collect(),
                present.clone(),
            ];
            for to in 0..all {
                let wanted = subset(to);
                for without in &unbitted {
                    let bitted: Vec<LocalAddrKey> = present
                        .iter()
                        .filter(|key| !without.contains(key))
                        .copied()
                        .collect();
                    play_sync(&present, &wanted, &bitted);
                }
            }
        }
    }

    /// One sync from `present` (of which `bitted` have their bits) to
    /// `wanted`, its invariants checked after each step.
    fn play_sync(present: &[LocalAddrKey], wanted: &[LocalAddrKey], bitted: &[LocalAddrKey]) {
        let mut map: HashSet<LocalAddrKey> = present.iter().copied().collect();
        let mut bitmap = local_addr_words(bitted);
        let current: BTreeMap<u32, u32> = local_addr_words(wanted)
            .into_keys()
            .map(|word| (word, bitmap.get(&word).copied().unwrap_or(0)))
            .collect();
        let change = LocalAddrChange::new(present, wanted, &current);
        let kept = |map: &HashSet<LocalAddrKey>| -> Vec<LocalAddrKey> {
            map.iter()
                .filter(|key| bitted.contains(key) || wanted.contains(key))
                .copied()
                .collect()
        };
        assert_bits_cover(bitted, &bitmap, "before");
        bitmap.extend(&change.bits_first);
        assert_bits_cover(&kept(&map), &bitmap, "bits first");
        assert_bits_cover(wanted, &bitmap, "bits first");
        for key in &change.gone {
            map.remove(key);
            assert_bits_cover(&kept(&map), &bitmap, "removing");
        }
        for key in &change.added {
            map.insert(*key);
            assert_bits_cover(&kept(&map), &bitmap, "adding");
        }
        bitmap.extend(&change.bits_last);
        assert_bits_cover(&map, &bitmap, "bits last");
        assert_eq!(map, wanted.iter().copied().collect());
        let exact = local_addr_words(wanted);
        for word in change.bits_last.keys() {
            let expected = exact.get(word).copied().unwrap_or(0);
            assert_eq!(bitmap.get(word).copied().unwrap_or(0), expected);
        }
    }

    /// Nothing is written when the addresses stay as they are, their bits
    /// set.
    #[test]
    fn an_unchanged_set_of_addresses_writes_nothing() {
        let addresses = colliding();
        let current = local_addr_words(&addresses);
        let change = LocalAddrChange::new(&addresses, &addresses, &current);
        assert_eq!(change, LocalAddrChange::default());
    }

    /// Addresses that an earlier build's holder added without their bits
    /// get them from the next sync, which changes nothing else.
    #[test]
    fn a_sync_sets_the_bits_an_earlier_build_left_out() {
        let addresses = colliding();
        let change = LocalAddrChange::new(&addresses, &addresses, &BTreeMap::new());
        assert_eq!(change.bits_first, local_addr_words(&addresses));
        assert!(change.gone.is_empty() && change.added.is_empty() && change.bits_last.is_empty());
    }
}
