//! The path from the host to a container: the interface the kernel routes
//! to it through, with the reply program attached.

use std::{net::IpAddr, path::Path};

use anyhow::Result;

use super::{
    StateLock, link_bits,
    links::{attach_backend, is_uplink},
};
use crate::host::netlink;

/// The interface the kernel routes to the container through, with the reply
/// program attached to it (unless it is an uplink, whose own program handles
/// replies, or a default-route interface, where containers do not live).
/// 0 when the container is not reachable through an interface.
pub(crate) fn prepare_backend_path(
    pin_dir: &Path,
    container_ip: IpAddr,
    lock: &StateLock,
) -> Result<u32> {
    prepare_backend_path_with(pin_dir, container_ip, lock, &mut None)
}

/// `prepare_backend_path` for many containers: `default_routes` keeps the
/// interfaces of the default routes once dumped (a dump of the whole route
/// table, not to be repeated per container).
pub(crate) fn prepare_backend_path_with(
    pin_dir: &Path,
    container_ip: IpAddr,
    lock: &StateLock,
    default_routes: &mut Option<Vec<String>>,
) -> Result<u32> {
    let Some(ifindex) = netlink::route_oif(container_ip)? else {
        return Ok(0);
    };
    let ifname = netlink::ifname(ifindex)?;
    if ifname == "lo" {
        return Ok(0);
    }
    if is_uplink(pin_dir, &ifname) {
        return Ok(ifindex);
    }
    let default_routes = match default_routes {
        Some(names) => names,
        None => default_routes.insert(netlink::default_route_interfaces()?),
    };
    if !default_routes.contains(&ifname) && attach_backend(pin_dir, &ifname, lock)? {
        // Best effort: unlisted, the interface is redirected to through the
        // neighbour subsystem, and the next follow of the host lists it.
        link_bits::add(pin_dir, ifindex, &ifname).ok();
    }
    Ok(ifindex)
}
