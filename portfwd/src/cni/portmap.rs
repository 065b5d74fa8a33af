//! portmap's behaviour in portfwd's terms: one mapping name per
//! attachment, and the publications a set of port mappings asks for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portfwd_common::NAME_LEN;

use super::{
    config::{ContainerAddrs, PortMap},
    spec::CniError,
};
use crate::{
    error::cni_code as code,
    model::{HostPorts, PortRange, PublishSpec},
};

/// The name of an attachment's mappings: `<CNI_CONTAINERID>/<CNI_IFNAME>`,
/// which the CNI spec makes unique per attachment. When that exceeds the
/// 64 bytes a mapping name holds (podman's and containerd's IDs are 64 hex
/// digits), the ID is shortened to a prefix plus `~` and a hash of the whole
/// ID: `<ID prefix>~<8 hex digits>/<ifname>`, e.g.
/// `73aac9b3093f7b14af23965d8d93a330aae356cc6012b9d14c~1b2c3d4e/eth0`.
pub(crate) fn attachment_name(container_id: &str, ifname: &str) -> String {
    let suffix = format!("/{ifname}");
    let room = NAME_LEN - suffix.len();
    if container_id.len() <= room {
        return format!("{container_id}{suffix}");
    }
    // FNV-1a, folded to 32 bits: stable across builds and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let folded = (hash ^ (hash >> 32)) as u32;
    let mut cut = room - 9;
    while !container_id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{folded:08x}{suffix}", &container_id[..cut])
}

/// The publications of one attachment: for each container address, the
/// specs that forward to it. With one address family, a mapping without
/// hostIP is what `portfwd map` does with no host address (an IPv4
/// container: the IPv4 and the IPv6 wildcard). A dual-stack container gets
/// each family's wildcard forwarded to its own address of that family.
pub(crate) fn publications(
    maps: &[PortMap],
    addrs: ContainerAddrs,
) -> Result<Vec<(IpAddr, Vec<PublishSpec>)>, CniError> {
    let (v4, v6) = (addrs.v4.map(IpAddr::V4), addrs.v6.map(IpAddr::V6));
    let mut v4_specs = Vec::new();
    let mut v6_specs = Vec::new();
    let spec = |host_ip: Option<IpAddr>, m: &PortMap| PublishSpec {
        host_ip,
        host_ports: HostPorts::Each(PortRange::single(m.host_port)),
        container_ports: PortRange::single(m.container_port),
        protocol: m.protocol,
    };
    for m in maps {
        match (m.host_ip, v4, v6) {
            (_, None, None) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "prevResult has no IP address for the container: portfwd must be chained \
                     after a plugin that configures one (e.g. bridge with host-local)",
                ));
            }
            (None, Some(_), Some(_)) => {
                v4_specs.push(spec(Some(Ipv4Addr::UNSPECIFIED.into()), m));
                v6_specs.push(spec(Some(Ipv6Addr::UNSPECIFIED.into()), m));
            }
            (None, Some(_), None) => v4_specs.push(spec(None, m)),
            (None, None, Some(_)) => v6_specs.push(spec(None, m)),
            (Some(IpAddr::V4(_)), Some(_), _) => v4_specs.push(spec(m.host_ip, m)),
            (Some(IpAddr::V4(ip)), None, Some(v6)) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "hostIP {ip} is IPv4 but the container has only an IPv6 address ({v6})"
                    ),
                ));
            }
            (Some(IpAddr::V6(_)), _, Some(_)) => v6_specs.push(spec(m.host_ip, m)),
            // An IPv6 host address to an IPv4-only container: its
            // IPv4-mapped address, as `portfwd map` does.
            (Some(IpAddr::V6(_)), Some(_), None) => v4_specs.push(spec(m.host_ip, m)),
        }
    }
    let mut out = Vec::new();
    if let (Some(ip), false) = (v4, v4_specs.is_empty()) {
        out.push((ip, v4_specs));
    }
    if let (Some(ip), false) = (v6, v6_specs.is_empty()) {
        out.push((ip, v6_specs));
    }
    Ok(out)
}
