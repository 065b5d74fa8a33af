//! Planning a publication: which host ports it takes, and whether it
//! conflicts with what is already published. Pure: the caller says which
//! ports host sockets hold.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, bail};

use super::{HostPorts, Mapping, Protocol, PublishSpec};
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
    let mut planned: Vec<Mapping> = Vec::new();
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
                    })
                    .collect()
            };
            let taken_by = |m: &Mapping| {
                existing
                    .iter()
                    .chain(&planned)
                    .find(|o| m.conflicts_with(o))
                    .cloned()
            };
            let chosen = if matches!(spec.host_ports, HostPorts::Each(_)) {
                let wanted = build(candidates.start);
                if let Some((new, old)) = wanted.iter().find_map(|m| taken_by(m).map(|o| (m, o))) {
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
                wanted
            } else {
                let free = candidates.iter().find(|&port| {
                    !in_use(spec.protocol, port)
                        && build(port).iter().all(|m| taken_by(m).is_none())
                });
                match free {
                    Some(port) => build(port),
                    None => bail!("{spec}: no free host port in {candidates}"),
                }
            };
            planned.extend(chosen);
        }
    }
    Ok(planned)
}
