//! Rootless publishing: what the service does for an unprivileged caller
//! (identified by the kernel, `SO_PEERCRED`), checked against the
//! administrator's policy and the ownership of the target namespace.
//!
//! A rootless mapping is an ordinary mapping to the namespace end of a way
//! in (`host::netns`), named `u<UID>.<NAME>`: `list` shows its owner, and a
//! user sees and removes only their own. Its way in is found again from
//! its address alone (the pool slot names the host end, `pfr<N>`), so a
//! restarted service still knows which mappings lose their namespace.

use std::{collections::HashMap, ffi::CString, fs, io, net::IpAddr, path::Path, sync::Mutex};

use anyhow::{Result, anyhow, bail};
use nix::unistd::{Gid, Group, Uid, User, getgrouplist};

use super::publish::{self, PublishOptions};
use crate::{
    error::Error,
    host::netns::{self, Netns},
    model::{
        Allowlist, Mapping, PortRange, Protocol, PublishSpec, UnmapSelector,
        rootless::{self, MapRequest, Policy, Pool, Slot},
    },
};

/// Who asks: from `SO_PEERCRED`, never from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl Caller {
    fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// A policy file, parsed.
pub(crate) struct LoadedPolicy {
    policy: Policy,
    ports: PortRange,
    pub(crate) pool: Pool,
}

/// Reads the policy; None when there is no file (no rootless publishing).
/// Read at each request, so that an administrator's change applies at once.
pub(crate) fn load_policy(path: &Path) -> Result<Option<LoadedPolicy>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("reading the rootless policy {}: {e}", path.display()),
    };
    let (policy, ports, pool) = Policy::parse(&text)
        .map_err(|e| anyhow!("the rootless policy {} is invalid: {e}", path.display()))?;
    Ok(Some(LoadedPolicy {
        policy,
        ports,
        pool,
    }))
}

/// The ways in this service made, by namespace (its nsfs inode, unique
/// while the namespace lives; a way in lives exactly as long). One lock
/// serialises rootless changes; it is taken after a request was read, never
/// across a client's read.
#[derive(Default)]
pub(crate) struct WaysIn {
    by_netns: Mutex<HashMap<(u64, u64), Slot>>,
}

impl WaysIn {
    /// Forgets the ways in whose host end is gone (their namespace went).
    pub(crate) fn forget_gone(&self) -> Vec<Slot> {
        let mut ways = self.lock();
        let gone: Vec<Slot> = ways
            .values()
            .filter(|s| !netns::link_exists(&s.host_ifname()))
            .copied()
            .collect();
        ways.retain(|_, s| !gone.contains(s));
        gone
    }

    /// Deletes the host's rules of the ways in named `host_ifs` that are
    /// gone. Under the lock: a way in made meanwhile with such a name keeps
    /// its rules.
    pub(crate) fn remove_rules_of_gone(&self, host_ifs: &[String]) -> Result<()> {
        let _ways = self.lock();
        for name in host_ifs {
            if !netns::link_exists(name) {
                netns::unblock_forwarding_from(name)?;
            }
        }
        Ok(())
    }

    /// Deletes the host's rules of the ways in that are gone, whoever made
    /// them: those of namespaces that ended while no service ran (the
    /// veth went with the namespace, its rules stayed). Their names.
    pub(crate) fn remove_rules_left(&self) -> Result<Vec<String>> {
        let gone: Vec<String> = netns::ways_in_with_rules()?
            .into_iter()
            .filter(|name| !netns::link_exists(name))
            .collect();
        self.remove_rules_of_gone(&gone)?;
        Ok(gone)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Slot>> {
        // A panic while holding the lock leaves a map that is still valid.
        self.by_netns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether the caller may publish at all; the policy then applies.
fn admit(caller: Caller, policy_path: &Path) -> Result<Option<LoadedPolicy>> {
    let loaded = load_policy(policy_path)?;
    if caller.is_root() {
        return Ok(loaded);
    }
    let Some(loaded) = loaded else {
        bail!(
            "rootless publishing is not enabled on this host (no policy file {})",
            policy_path.display()
        );
    };
    let user = User::from_uid(Uid::from_raw(caller.uid)).ok().flatten();
    let name = user.as_ref().map(|u| u.name.clone()).unwrap_or_default();
    let mut groups = vec![caller.gid];
    if let Some(user) = &user
        && let Ok(cname) = CString::new(user.name.as_str())
        && let Ok(list) = getgrouplist(&cname, user.gid)
    {
        groups.extend(list.iter().map(|g| g.as_raw()));
    }
    let groups: Vec<(u32, String)> = groups
        .into_iter()
        .map(|gid| {
            let name = Group::from_gid(Gid::from_raw(gid))
                .ok()
                .flatten()
                .map(|g| g.name)
                .unwrap_or_default();
            (gid, name)
        })
        .collect();
    if !loaded.policy.admits(caller.uid, &name, &groups) {
        bail!(
            "uid {} may not publish: the rootless policy {} lists neither the user nor a group of theirs",
            caller.uid,
            policy_path.display()
        );
    }
    Ok(Some(loaded))
}

/// Checks the planned mappings against the policy: host ports, host
/// addresses, and the caller's count.
fn check_policy(
    caller: Caller,
    loaded: &LoadedPolicy,
    planned: &[Mapping],
    existing: &[Mapping],
) -> Result<()> {
    for m in planned {
        if !loaded.ports.contains(m.host.port()) {
            bail!(
                "host port {} is outside the ports the policy allows ({})",
                m.host.port(),
                loaded.ports
            );
        }
        if let Some(why) = loaded.policy.refuses_address(m.host.ip()) {
            bail!(why);
        }
    }
    let owned = existing
        .iter()
        .filter(|m| rootless::owned_by(m, caller.uid))
        .count();
    if owned + planned.len() > loaded.policy.max_mappings {
        bail!(
            "uid {} would have {} mappings, more than the policy's max_mappings ({})",
            caller.uid,
            owned + planned.len(),
            loaded.policy.max_mappings
        );
    }
    Ok(())
}

/// `map --netns ...` for `caller`: the lines to print.
pub(crate) fn map(
    pin_dir: &Path,
    policy_path: &Path,
    ways: &WaysIn,
    caller: Caller,
    request: &MapRequest,
) -> Result<Vec<String>> {
    let loaded = admit(caller, policy_path)?;
    let (specs, allow) = parse_map_request(request)?;
    let target = request.netns.as_str();
    let netns = open_target(caller, target)?;
    let pool = match &loaded {
        Some(loaded) => loaded.pool,
        None => Pool::new(rootless::DEFAULT_POOL_V4, rootless::DEFAULT_POOL_V6)
            .map_err(|e| anyhow!(e))?,
    };

    let mut by_netns = ways.lock();
    sweep_gone(pin_dir)?;
    let slot = way_in(&mut by_netns, &netns, &pool)?;
    // At each map: a way in an older service made gets them too.
    netns::route_forwarded_replies(&netns)?;
    let full_name = format!(
        "{}{}",
        rootless::owner_prefix(caller.uid),
        request
            .name
            .clone()
            .unwrap_or_else(|| format!("ns{}", slot.index))
    );
    // IPv6 host addresses go to the namespace's IPv6 address; the rest
    // (IPv4 and the wildcards of both families) to its IPv4 one, as a
    // rootful `portfwd map` of an IPv4 container does.
    let (v6, v4): (Vec<PublishSpec>, Vec<PublishSpec>) = specs
        .into_iter()
        .partition(|s| matches!(s.host_ip, Some(IpAddr::V6(ip)) if !ip.is_unspecified()));
    let options = PublishOptions {
        refuse_ports_in_use: true,
        allow,
        ..PublishOptions::default()
    };
    let check = |planned: &[Mapping], existing: &[Mapping]| match &loaded {
        Some(loaded) if !caller.is_root() => check_policy(caller, loaded, planned, existing),
        _ => Ok(()),
    };
    let families = [(v4, IpAddr::V4(slot.ns_v4)), (v6, IpAddr::V6(slot.ns_v6))];
    let published = publish_families(pin_dir, &full_name, families, &options, &check, &netns)?;
    Ok(published
        .iter()
        .map(|m| {
            format!(
                "published {}: {}/{} -> {} (port {} in {target})",
                m.name,
                m.host,
                m.protocol,
                m.container,
                m.container.port()
            )
        })
        .collect())
}

/// The request's PUBLISH specs and allowlist, checked before anything is
/// opened.
fn parse_map_request(request: &MapRequest) -> Result<(Vec<PublishSpec>, Option<Allowlist>)> {
    let specs = request
        .publish
        .iter()
        .map(|text| text.parse::<PublishSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(name) = &request.name {
        rootless::check_user_name(name).map_err(Error::usage)?;
    }
    // An allowlist only narrows who reaches the user's own mapping.
    let allow = if request.allow.is_empty() {
        None
    } else {
        let list = Allowlist::parse(&request.allow).map_err(Error::usage)?;
        Some(Allowlist {
            refuse: request.refuse.unwrap_or_default(),
            ..list
        })
    };
    Ok((specs, allow))
}

/// Opens the namespace `target` names, which must be the caller's (root:
/// any but the host's).
fn open_target(caller: Caller, target: &str) -> Result<Netns> {
    let netns = Netns::open(target).map_err(|e| Error::usage(format!("{e:#}")))?;
    let owner = netns.owner_uid()?;
    if !caller.is_root() && owner != caller.uid {
        bail!(
            "the network namespace {target} is not yours (its user namespace belongs to uid {owner})"
        );
    }
    if netns.is_own()? {
        bail!(
            "{target} is the host's network namespace: publish with `portfwd map ADDRESS` instead"
        );
    }
    Ok(netns)
}

/// The policy's check of planned mappings against the existing ones.
type PolicyCheck<'a> = dyn Fn(&[Mapping], &[Mapping]) -> Result<()> + 'a;

/// Publishes each family's specs to the namespace's address of that
/// family, and routes their UDP replies through the way in. All or
/// nothing: on an error, what was published goes again.
fn publish_families(
    pin_dir: &Path,
    name: &str,
    families: [(Vec<PublishSpec>, IpAddr); 2],
    options: &PublishOptions,
    check: &PolicyCheck<'_>,
    netns: &Netns,
) -> Result<Vec<Mapping>> {
    let mut done: Vec<Mapping> = Vec::new();
    for (specs, ip) in families {
        if specs.is_empty() {
            continue;
        }
        let result = publish::publish_checked(pin_dir, name, ip, &specs, options.clone(), check)
            .and_then(|published| {
                done.extend(published.mappings.iter().cloned());
                route_udp_replies(netns, &published.mappings)
            });
        if let Err(error) = result {
            if !done.is_empty() {
                publish::withdraw_these(pin_dir, &done).ok();
            }
            return Err(error);
        }
    }
    Ok(done)
}

/// The rules that send the replies of the published UDP ports through the
/// way in (see `host::netns::route_udp_replies`), one per container port
/// range.
fn route_udp_replies(netns: &Netns, mappings: &[Mapping]) -> Result<()> {
    let mut ports: Vec<u16> = mappings
        .iter()
        .filter(|m| m.protocol == Protocol::Udp)
        .map(|m| m.container.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    // Consecutive ports make one range (a published range, one rule).
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for port in ports {
        match ranges.last_mut() {
            Some((_, end)) if u32::from(*end) + 1 == u32::from(port) => *end = port,
            _ => ranges.push((port, port)),
        }
    }
    for range in ranges {
        netns::route_udp_replies(netns, range)?;
    }
    Ok(())
}

/// The way into `netns`: the one made before, or a new one in the first
/// free slot of the pool.
fn way_in(by_netns: &mut HashMap<(u64, u64), Slot>, netns: &Netns, pool: &Pool) -> Result<Slot> {
    if let Some(slot) = by_netns.get(&netns.id) {
        if netns::link_exists(&slot.host_ifname()) {
            return Ok(*slot);
        }
        by_netns.remove(&netns.id);
    }
    if let Some(slot) = found_again(netns, pool)? {
        by_netns.insert(netns.id, slot);
        return Ok(slot);
    }
    // Bounded by the pool; a taken slot has its host end.
    // The mappings of an ended namespace go before its slot is given again
    // (else they would lead into the new namespace).
    let slot = (0..pool.capacity())
        .filter_map(|index| pool.slot(index))
        .find(|slot| {
            !by_netns.values().any(|s| s.index == slot.index)
                && !netns::link_exists(&slot.host_ifname())
        })
        .ok_or_else(|| anyhow!("the rootless address pool is exhausted"))?;
    netns::create_way_in(netns, &slot)?;
    by_netns.insert(netns.id, slot);
    Ok(slot)
}

/// The way into `netns` that a service made before it was restarted. Its
/// slot's addresses must be the current pool's (an administrator may
/// have changed the pool since).
fn found_again(netns: &Netns, pool: &Pool) -> Result<Option<Slot>> {
    let Some(host_if) = netns::existing_way_in(netns)? else {
        return Ok(None);
    };
    let slot = Slot::index_of(&host_if).and_then(|index| pool.slot(index));
    let routed_there = |slot: &Slot| {
        way_in_of_address(IpAddr::V4(slot.ns_v4)).as_deref() == Some(host_if.as_str())
    };
    match slot.filter(routed_there) {
        Some(slot) => Ok(Some(slot)),
        None => bail!(
            "the way into this namespace ({host_if}) has addresses outside the rootless pool: \
             restart the namespace to get a new one"
        ),
    }
}

/// `unmap` for `caller`: a user names only their own mappings.
pub(crate) fn unmap(
    pin_dir: &Path,
    caller: Caller,
    name: Option<&str>,
    selectors: &[String],
) -> Result<Vec<String>> {
    let selectors = selectors
        .iter()
        .map(|text| text.parse::<UnmapSelector>())
        .collect::<Result<Vec<_>, _>>()?;
    let visible: Vec<Mapping> = super::mappings(pin_dir)?
        .into_iter()
        .filter(|m| caller.is_root() || rootless::owned_by(m, caller.uid))
        .collect();
    let full_name = name.map(|n| {
        if caller.is_root() {
            n.to_owned()
        } else {
            format!("{}{n}", rootless::owner_prefix(caller.uid))
        }
    });
    let mut doomed: Vec<Mapping> = Vec::new();
    if let Some(full_name) = &full_name {
        let named: Vec<&Mapping> = visible.iter().filter(|m| &m.name == full_name).collect();
        if named.is_empty() {
            bail!(
                "no mapping of yours is named {:?}",
                name.unwrap_or_default()
            );
        }
        doomed.extend(named.into_iter().cloned());
    }
    for selector in &selectors {
        let matched: Vec<&Mapping> = visible.iter().filter(|m| selector.matches(m)).collect();
        if matched.is_empty() {
            bail!("nothing of yours is published on {selector}");
        }
        for m in matched {
            if !doomed.contains(m) {
                doomed.push(m.clone());
            }
        }
    }
    let removed = publish::withdraw_these(pin_dir, &doomed)?;
    Ok(removed
        .iter()
        .map(|m| {
            format!(
                "removed {}: {}/{} -> {}",
                m.name, m.host, m.protocol, m.container
            )
        })
        .collect())
}

/// `list` for `caller`: theirs (root: every mapping). Mappings whose
/// namespace ended are removed first, so that none is ever listed.
pub(crate) fn list(pin_dir: &Path, caller: Caller) -> Result<Vec<Mapping>> {
    sweep_gone(pin_dir)?;
    Ok(super::mappings(pin_dir)?
        .into_iter()
        .filter(|m| caller.is_root() || rootless::owned_by(m, caller.uid))
        .collect())
}

/// The host end (`pfr<N>`) of the way in a rootless mapping goes
/// through: the interface the host routes its container address to. None
/// when that is no way in (any more): its namespace ended, and with it
/// the veth and its route.
fn way_in_of(mapping: &Mapping) -> Option<String> {
    way_in_of_address(mapping.container.ip())
}

/// The host end of the way in `ip` is routed through, if it is one.
fn way_in_of_address(ip: IpAddr) -> Option<String> {
    let index = crate::host::netlink::route_oif(ip).ok()??;
    let name = crate::host::netlink::ifname(index).ok()?;
    Slot::is_host_ifname(&name).then_some(name)
}

/// Removes the rootless mappings whose way in is gone (their namespace
/// ended). Told by the route to the mapping's address, not by the policy's
/// pool, which the administrator may change.
pub(crate) fn sweep_gone(pin_dir: &Path) -> Result<Vec<Mapping>> {
    let gone: Vec<Mapping> = super::mappings(pin_dir)?
        .into_iter()
        .filter(|m| rootless::is_rootless_name(&m.name) && way_in_of(m).is_none())
        .collect();
    if gone.is_empty() {
        return Ok(gone);
    }
    publish::withdraw_these(pin_dir, &gone)
}

/// The host ends of the ways in the published mappings use, to watch.
pub(crate) fn ways_in_use(pin_dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = super::mappings(pin_dir)?
        .iter()
        .filter(|m| rootless::is_rootless_name(&m.name))
        .filter_map(way_in_of)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}
