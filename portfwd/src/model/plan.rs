//! Planning a publication: which host ports it takes, and whether it
//! conflicts with what is already published. Pure: the caller says which
//! ports host sockets hold.
//!
//! Linear in the size of the request plus what is published: published
//! mappings are indexed by (protocol, port, family), so a conflict check is
//! a lookup; automatic ports and pools are searched with one cursor per
//! range, so each candidate port is looked at once per command, never once
//! per container port; and a request for more ports than its range holds
//! fails before any search.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::{Result, bail};

use super::{HostPorts, Mapping, PortRange, Protocol, PublishSpec};
use crate::error::Error;

/// The host addresses one PUBLISH asks for. No host address means every
/// address: the IPv4 and the IPv6 wildcard (an IPv6 socket reaches an IPv4
/// container through its IPv4-mapped address; an IPv4 socket cannot reach an
/// IPv6 container, so an IPv6 container gets only the IPv6 wildcard).
fn host_ips(spec: &PublishSpec, container: IpAddr) -> Result<Vec<IpAddr>> {
    match (spec.host_ip, container) {
        (None, IpAddr::V4(_)) => Ok(vec![
            Ipv4Addr::UNSPECIFIED.into(),
            Ipv6Addr::UNSPECIFIED.into(),
        ]),
        (None, IpAddr::V6(_)) => Ok(vec![Ipv6Addr::UNSPECIFIED.into()]),
        (Some(IpAddr::V4(host)), IpAddr::V6(_)) => bail!(Error::usage(format!(
            "{spec}: an IPv4 host address ({host}) cannot forward to an IPv6 container ({container})"
        ))),
        (Some(ip), _) => Ok(vec![ip]),
    }
}

/// Turns PUBLISH specs into the mappings to add, all or nothing: explicit
/// host ports must not conflict with `existing` (nor with each other);
/// automatic ports and pools take the first port that conflicts with
/// nothing and that `in_use` does not report as bound by a host socket.
pub(crate) fn plan(
    name: &str,
    container_ip: IpAddr,
    specs: &[PublishSpec],
    existing: &[Mapping],
    in_use: impl Fn(Protocol, u16) -> bool,
) -> Result<Vec<Mapping>> {
    Planner::new(existing).plan(name, container_ip, specs, in_use)
}

/// Where a mapping of the index lives.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Existing(usize),
    Planned(usize),
}

/// Mappings that conflict only on one (protocol, port, family: IPv4 or not).
pub(crate) type PortKey = (Protocol, u16, bool);

/// The (protocol, port, family) of every mapping `specs` ask for, when every
/// spec names its host ports (no automatic port, no pool): mappings on other
/// ports cannot conflict with them. None otherwise, or for a spec that
/// planning refuses (it says why).
pub(crate) fn explicit_ports(specs: &[PublishSpec], container_ip: IpAddr) -> Option<Vec<PortKey>> {
    let mut keys = Vec::new();
    for spec in specs {
        if !matches!(spec.host_ports, HostPorts::Each(_)) {
            return None;
        }
        let ips = host_ips(spec, container_ip).ok()?;
        for (candidates, _) in spec.expand() {
            keys.extend(
                ips.iter()
                    .map(|ip| (spec.protocol, candidates.start, ip.is_ipv4())),
            );
        }
    }
    Some(keys)
}

/// Plans several publications against one set of published mappings
/// (`apply` plans one per container), each seeing the ones planned before.
pub(crate) struct Planner<'a> {
    existing: &'a [Mapping],
    planned: Vec<Mapping>,
    by_port: HashMap<PortKey, Vec<Slot>>,
    /// One cursor per search: the ports before it are taken (by a planned
    /// or published mapping, or a host socket), and stay so.
    cursors: HashMap<Search, u16>,
}

fn port_key(m: &Mapping) -> PortKey {
    (m.protocol, m.host.port(), m.host.is_ipv4())
}

impl<'a> Planner<'a> {
    pub(crate) fn new(existing: &'a [Mapping]) -> Self {
        let mut by_port: HashMap<PortKey, Vec<Slot>> = HashMap::with_capacity(existing.len());
        for (i, m) in existing.iter().enumerate() {
            by_port
                .entry(port_key(m))
                .or_default()
                .push(Slot::Existing(i));
        }
        Planner {
            existing,
            planned: Vec::new(),
            by_port,
            cursors: HashMap::new(),
        }
    }

    fn get(&self, slot: Slot) -> &Mapping {
        match slot {
            Slot::Existing(i) => &self.existing[i],
            Slot::Planned(i) => &self.planned[i],
        }
    }

    /// The published or planned mapping `m` would conflict with, if any.
    fn taken_by(&self, m: &Mapping) -> Option<&Mapping> {
        self.by_port
            .get(&port_key(m))?
            .iter()
            .map(|&slot| self.get(slot))
            .find(|o| m.conflicts_with(o))
    }

    fn take(&mut self, mappings: Vec<Mapping>) {
        for m in mappings {
            let slot = Slot::Planned(self.planned.len());
            self.by_port.entry(port_key(&m)).or_default().push(slot);
            self.planned.push(m);
        }
    }

    /// Plans one container's publications, all or nothing: on an error,
    /// nothing of this call stays planned.
    pub(crate) fn plan(
        &mut self,
        name: &str,
        container_ip: IpAddr,
        specs: &[PublishSpec],
        in_use: impl Fn(Protocol, u16) -> bool,
    ) -> Result<Vec<Mapping>> {
        let before = self.planned.len();
        let result = self.plan_specs(name, container_ip, specs, in_use);
        if result.is_err() {
            for m in self.planned.drain(before..) {
                let key = port_key(&m);
                if let Some(slots) = self.by_port.get_mut(&key) {
                    slots.retain(|s| !matches!(s, Slot::Planned(i) if *i >= before));
                }
            }
            // The ports given back may be before a cursor.
            self.cursors.clear();
        }
        result.map(|()| self.planned[before..].to_vec())
    }

    /// As `plan`, for a caller that gives up at the first error and takes
    /// every mapping planned at the end (`into_planned`), without a copy of
    /// each call's: how many mappings this call planned.
    pub(crate) fn plan_more(
        &mut self,
        name: &str,
        container_ip: IpAddr,
        specs: &[PublishSpec],
        in_use: impl Fn(Protocol, u16) -> bool,
    ) -> Result<usize> {
        let before = self.planned.len();
        self.plan_specs(name, container_ip, specs, in_use)?;
        Ok(self.planned.len() - before)
    }

    /// Every mapping planned, in the order planned.
    pub(crate) fn into_planned(self) -> Vec<Mapping> {
        self.planned
    }

    fn plan_specs(
        &mut self,
        name: &str,
        container_ip: IpAddr,
        specs: &[PublishSpec],
        in_use: impl Fn(Protocol, u16) -> bool,
    ) -> Result<()> {
        check_counts(specs, container_ip)?;
        for spec in specs {
            let ips = host_ips(spec, container_ip)?;
            for (candidates, container_port) in spec.expand() {
                let build = |port: u16| -> Vec<Mapping> {
                    ips.iter()
                        .map(|&ip| Mapping {
                            name: name.to_owned(),
                            protocol: spec.protocol,
                            host: SocketAddr::new(ip, port),
                            container: SocketAddr::new(container_ip, container_port),
                            ifindex: 0,
                            hold: true,
                            allow: None,
                        })
                        .collect()
                };
                if matches!(spec.host_ports, HostPorts::Each(_)) {
                    let wanted = build(candidates.start);
                    for new in &wanted {
                        if let Some(old) = self.taken_by(new) {
                            bail!(
                                "{}/{} on {} is already published by {:?} ({} -> {})",
                                new.host.port(),
                                new.protocol,
                                new.host.ip(),
                                old.name,
                                old.host,
                                old.container
                            );
                        }
                    }
                    self.take(wanted);
                    continue;
                }
                let search = (candidates, spec.protocol, ips.clone());
                let start = self
                    .cursors
                    .get(&search)
                    .copied()
                    .unwrap_or(candidates.start);
                let free = (start..=candidates.end).find(|&port| {
                    build(port).iter().all(|m| self.taken_by(m).is_none())
                        && !in_use(spec.protocol, port)
                });
                // The next container port starts after this one.
                let next = free.map_or(candidates.end, |p| p.saturating_add(1).min(candidates.end));
                self.cursors.insert(search, next);
                let Some(port) = free else {
                    bail!("{spec}: no free host port in {candidates}");
                };
                self.take(build(port));
            }
        }
        Ok(())
    }
}

/// An automatic-port or pool search: the candidate range, the protocol and
/// the host addresses.
type Search = (PortRange, Protocol, Vec<IpAddr>);

/// Refuses, before any search, a request for more automatic or pool ports
/// than their range holds.
fn check_counts(specs: &[PublishSpec], container_ip: IpAddr) -> Result<()> {
    let mut asked: HashMap<Search, (u32, &PublishSpec)> = HashMap::new();
    for spec in specs {
        if matches!(spec.host_ports, HostPorts::Each(_)) {
            continue;
        }
        let ips = host_ips(spec, container_ip)?;
        let candidates = match spec.host_ports {
            HostPorts::Pool(pool) => pool,
            _ => super::AUTO_PORTS,
        };
        let count = asked
            .entry((candidates, spec.protocol, ips))
            .or_insert((0, spec));
        count.0 += spec.container_ports.len();
        if count.0 > candidates.len() {
            bail!(Error::usage(format!(
                "{spec}: {} host ports are asked for from {candidates}, which has {}",
                count.0,
                candidates.len()
            )));
        }
    }
    Ok(())
}
