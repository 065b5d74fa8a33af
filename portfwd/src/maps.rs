//! Typed access to the pinned maps: the whole state of portfwd. Every
//! command that changes them holds an exclusive lock on the pin directory, so
//! concurrent CLI processes never interleave their read-check-write steps.

use std::{fs::File, net::IpAddr, path::Path};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use nix::fcntl::{Flock, FlockArg};
use portfwd_common::{
    Addr, CONFIG_MAP, Config, LOCAL_ADDRS_MAP, LocalAddrKey, SERVICES_MAP, ServiceKey, ServiceValue,
};

use crate::mapping::Mapping;

/// Insert only when the key is absent (BPF_NOEXIST).
const NO_EXIST: u64 = 1;

/// An exclusive lock on the pin directory, held until dropped.
pub struct StateLock(#[allow(dead_code)] Flock<File>);

impl StateLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
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
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    local_addrs: HashMap<MapData, LocalAddrKey, u8>,
    config: Array<MapData, Config>,
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
    pub fn open(dir: &Path, _lock: &StateLock) -> Result<Self> {
        let services = HashMap::try_from(Map::HashMap(open_pin(dir, SERVICES_MAP)?)).context(
            "the services map has an unexpected layout (built by another portfwd version?)",
        )?;
        let local_addrs = HashMap::try_from(Map::HashMap(open_pin(dir, LOCAL_ADDRS_MAP)?))
            .context("the local addresses map has an unexpected layout")?;
        let config = Array::try_from(Map::Array(open_pin(dir, CONFIG_MAP)?))
            .context("the config map has an unexpected layout")?;
        Ok(PinnedMaps {
            services,
            local_addrs,
            config,
        })
    }

    /// Every mapping, sorted by host port, protocol and address.
    pub fn mappings(&self) -> Result<Vec<Mapping>> {
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
    pub fn add_all(&mut self, mappings: &[Mapping]) -> Result<()> {
        for (done, mapping) in mappings.iter().enumerate() {
            if let Err(error) = self
                .services
                .insert(mapping.key(), mapping.value(), NO_EXIST)
            {
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
    pub fn remove_all(&mut self, mappings: &[Mapping]) -> Result<()> {
        for (done, mapping) in mappings.iter().enumerate() {
            if let Err(error) = self.services.remove(&mapping.key()) {
                for restored in &mappings[..done] {
                    let _ = self
                        .services
                        .insert(restored.key(), restored.value(), NO_EXIST);
                }
                return Err(anyhow!("removing {mapping}: {error}"));
            }
        }
        Ok(())
    }

    fn remove_keys(&mut self, keys: impl Iterator<Item = ServiceKey>) -> Result<()> {
        for key in keys {
            self.services.remove(&key)?;
        }
        Ok(())
    }

    /// Makes the local addresses map hold exactly `addresses`.
    pub fn sync_local_addrs(&mut self, addresses: &[IpAddr]) -> Result<()> {
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

    pub fn set_config(&mut self, config: Config) -> Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing the config map")?;
        Ok(())
    }

    pub fn config(&self) -> Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }
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
