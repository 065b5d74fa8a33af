//! The operations behind the commands, as a library: they print nothing,
//! so that other front ends (the CNI plugin) can use them.

use std::{net::IpAddr, path::Path};

use anyhow::{Result, bail};

use crate::{
    holder, host, loader,
    mapping::{self, Mapping, UnmapSelector},
    maps::{PinnedMaps, StateLock},
    netlink,
    publish::PublishSpec,
};

/// How `publish` treats host ports that another process already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOptions {
    /// Refuse (exit 1, nothing changed) to publish a port a host process
    /// holds, naming it. Off for `--force`, and for runtimes that hold their
    /// containers' ports themselves (podman's conmon).
    pub refuse_ports_in_use: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            refuse_ports_in_use: true,
        }
    }
}

/// What `publish` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub mappings: Vec<Mapping>,
    /// Published ports the holder could not bind (another process holds them).
    pub busy_ports: Vec<String>,
}

/// Publishes `specs` for a container, all or nothing; the mappings added.
pub fn publish(
    pin_dir: &Path,
    name: &str,
    container_ip: IpAddr,
    specs: &[PublishSpec],
) -> Result<Vec<Mapping>> {
    Ok(publish_with(
        pin_dir,
        name,
        container_ip,
        specs,
        PublishOptions::default(),
    )?
    .mappings)
}

/// `publish`, with options.
pub fn publish_with(
    pin_dir: &Path,
    name: &str,
    container_ip: IpAddr,
    specs: &[PublishSpec],
    options: PublishOptions,
) -> Result<Published> {
    host::require_root()?;
    let lock = StateLock::acquire(pin_dir)?;
    let mut maps = PinnedMaps::open(pin_dir, &lock)?;
    let existing = maps.mappings()?;
    let mut planned = mapping::plan(name, container_ip, specs, &existing, host::port_in_use)?;
    if options.refuse_ports_in_use {
        for m in &planned {
            if let Err(why) = holder::probe(m.protocol, m.host) {
                bail!(
                    "host port {}/{} on {} is {why}: publish another port, or --force to publish it anyway",
                    m.host.port(),
                    m.protocol,
                    m.host.ip()
                );
            }
        }
    }
    let ifindex = prepare_backend_path(pin_dir, container_ip, &lock)?;
    for m in &mut planned {
        m.ifindex = ifindex;
    }
    // Wildcard mappings serve the host's addresses as they are now.
    maps.sync_local_addrs(&host::local_addresses()?)?;
    maps.add_all(&planned)?;
    drop(maps);
    let busy_ports = holder::sync(pin_dir)?;
    Ok(Published {
        mappings: planned,
        busy_ports,
    })
}

/// What `withdraw` does when a name or selector matches nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Fail, removing nothing (the CLI).
    Error,
    /// Remove what matches (CNI DEL, which must be idempotent).
    Ignore,
}

/// Removes the mappings named `name` and those `selectors` match, all or
/// nothing; the mappings removed.
pub fn withdraw(
    pin_dir: &Path,
    name: Option<&str>,
    selectors: &[UnmapSelector],
    missing: Missing,
) -> Result<Vec<Mapping>> {
    host::require_root()?;
    let lock = StateLock::acquire(pin_dir)?;
    let mut maps = PinnedMaps::open(pin_dir, &lock)?;
    let existing = maps.mappings()?;
    let mut doomed: Vec<Mapping> = Vec::new();
    if let Some(name) = name {
        let named: Vec<&Mapping> = existing.iter().filter(|m| m.name == name).collect();
        if named.is_empty() && missing == Missing::Error {
            bail!("no mapping is named {name:?}");
        }
        doomed.extend(named.into_iter().cloned());
    }
    for selector in selectors {
        let matched: Vec<&Mapping> = existing.iter().filter(|m| selector.matches(m)).collect();
        if matched.is_empty() && missing == Missing::Error {
            bail!("nothing is published on {selector}");
        }
        for m in matched {
            if !doomed.contains(m) {
                doomed.push(m.clone());
            }
        }
    }
    maps.remove_all(&doomed)?;
    drop(maps);
    // Release the ports: the holder closes what is no longer published.
    holder::sync(pin_dir)?;
    Ok(doomed)
}

/// Every mapping, under the state lock.
pub fn mappings(pin_dir: &Path) -> Result<Vec<Mapping>> {
    host::require_root()?;
    let lock = StateLock::acquire(pin_dir)?;
    PinnedMaps::open(pin_dir, &lock)?.mappings()
}

/// The interface the kernel routes to the container through, with the reply
/// program attached to it (unless it is an uplink, whose own program handles
/// replies, or a default-route interface, where containers do not live).
/// 0 when the container is not reachable through an interface.
fn prepare_backend_path(pin_dir: &Path, container_ip: IpAddr, lock: &StateLock) -> Result<u32> {
    let Some(ifindex) = netlink::route_oif(container_ip)? else {
        return Ok(0);
    };
    let ifname = netlink::ifname(ifindex)?;
    if ifname == "lo" {
        return Ok(0);
    }
    if !loader::is_uplink(pin_dir, &ifname)
        && !netlink::default_route_interfaces()?.contains(&ifname)
    {
        loader::attach_backend(pin_dir, &ifname, lock)?;
    }
    Ok(ifindex)
}
