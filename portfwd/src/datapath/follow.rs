//! Following the host's interfaces as they are deleted and recreated (a
//! restarted container gets a new veth under the same name; an uplink is
//! recreated by a driver reload or a network manager).
//!
//! The kernel removes a TC attachment with its interface: a TCX link stays
//! pinned but attaches nothing (it is "severed"; `BPF_LINK_UPDATE` on it
//! fails with ENOLINK), a netlink filter just goes. An interface recreated
//! under the same name has a new index and none of portfwd's programs. So
//! each pinned attachment is checked against the interface its pin is named
//! after:
//! - attached: the pin's interface is the one with that name now;
//! - severed: an interface with that name exists, but not the one the pin
//!   is on: the programs are attached again to it;
//! - gone: no interface has that name. An uplink's pins stay, as the record
//!   that it is wanted (it is attached again when it comes back; `detach`
//!   forgets it); the reply program's pins go (`map` attaches it wherever
//!   the container is routed through next).
//!
//! Then every mapping's interface is looked up again (the TC path
//! redirects straight to it), and tracked flows that redirect to an
//! interface that no longer exists are pointed at the mapping's new
//! interface (forward direction) or handed to the routing stack (replies).

use std::{collections::HashMap, net::IpAddr, path::Path};

use anyhow::Result;
use aya::Ebpf;
use portfwd_common::{CT_FLAG_REPLY, CtKey, CtValue, ProgramDef, ServiceKey, UPLINK_PROGRAMS};

use super::{
    PinnedMaps, StateLock,
    backend::prepare_backend_path_with,
    conntrack,
    install::check_uplink,
    link_bits,
    links::{attach_tc, tc_attachments, tcx_link_ifindex, unpin_links_in},
    object, tc_attach,
};
use crate::{host::netlink, instance, model::Mapping};

/// Whether a pinned TC attachment is still on the interface of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkState {
    Attached,
    /// The interface was deleted and another was created under its name.
    Severed,
    /// No interface has that name.
    Gone,
}

impl LinkState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LinkState::Attached => "attached",
            LinkState::Severed => "severed",
            LinkState::Gone => "gone",
        }
    }
}

/// The TC programs pinned for one interface, and whether the kernel still
/// runs them there.
#[derive(Debug, Clone)]
pub(crate) struct TcLink {
    pub(crate) ifname: String,
    pub(crate) programs: Vec<String>,
    pub(crate) state: LinkState,
    /// Packets redirected to it go straight into its peer's namespace
    /// (`pf_peer_link_bits`).
    pub(crate) into_peer: bool,
}

impl TcLink {
    /// An uplink (external traffic), not an interface towards containers.
    pub(crate) fn is_uplink(&self) -> bool {
        self.programs.iter().any(|p| p == UPLINK_PROGRAMS[0].name)
    }
}

/// Every interface with pinned TC programs, checked against the kernel.
pub(crate) fn tc_links(pin_dir: &Path) -> Vec<TcLink> {
    let into_peer = link_bits::Listed::open(pin_dir);
    tc_attachments(pin_dir)
        .into_iter()
        .map(|(ifname, programs)| {
            let state = link_state(pin_dir, &ifname, &programs);
            let into_peer = state == LinkState::Attached
                && netlink::ifindex(&ifname).is_ok_and(|index| into_peer.contains(index));
            TcLink {
                ifname,
                programs,
                state,
                into_peer,
            }
        })
        .collect()
}

/// The state of one interface's attachments (see the module doc).
pub(crate) fn link_state(pin_dir: &Path, ifname: &str, programs: &[String]) -> LinkState {
    let Ok(current) = netlink::ifindex(ifname) else {
        return LinkState::Gone;
    };
    let dir = instance::tc_dir(pin_dir, ifname);
    if programs
        .iter()
        .all(|program| pinned_ifindex(&dir.join(program)) == Some(current))
    {
        LinkState::Attached
    } else {
        LinkState::Severed
    }
}

/// The interface an attachment is on (0: a severed TCX link); None when the
/// pin cannot be read.
fn pinned_ifindex(pin: &Path) -> Option<u32> {
    if tc_attach::is_netlink(pin) {
        return tc_attach::netlink_ifindex(pin).ok();
    }
    tcx_link_ifindex(pin).ok().flatten()
}

/// What following the interfaces changed.
#[derive(Debug, Default)]
pub(crate) struct LinkFixes {
    /// Interfaces recreated under the same name, attached again.
    pub(crate) reattached: Vec<String>,
    /// Uplinks that are gone (kept, attached again when they come back).
    pub(crate) gone_uplinks: Vec<String>,
    /// Interfaces towards containers that are gone: their pins removed.
    pub(crate) forgotten: Vec<String>,
    /// Interfaces that could not be attached again, and why.
    pub(crate) failed: Vec<(String, String)>,
}

impl LinkFixes {
    /// Lines for the user, about what changed or failed.
    pub(crate) fn notes(&self) -> Vec<String> {
        let mut notes: Vec<String> = self
            .reattached
            .iter()
            .map(|ifname| format!("{ifname} was recreated: its programs are attached again"))
            .collect();
        notes.extend(self.failed.iter().map(|(ifname, why)| {
            format!("{ifname} was recreated, but attaching to it again failed: {why}")
        }));
        notes
    }
}

/// Attaches the programs again wherever their interface was recreated
/// (loading the object only then), forgets the reply program's pins on
/// interfaces that are gone. The caller holds the state lock.
pub(crate) fn follow_links(pin_dir: &Path, _lock: &StateLock) -> Result<LinkFixes> {
    let mut ebpf = None;
    repair_links(pin_dir, &mut ebpf)
}

/// `follow_links` with an object that may be loaded already (`up`).
pub(crate) fn repair_links(pin_dir: &Path, ebpf: &mut Option<Ebpf>) -> Result<LinkFixes> {
    let mut fixes = LinkFixes::default();
    for link in tc_links(pin_dir) {
        let dir = instance::tc_dir(pin_dir, &link.ifname);
        match link.state {
            LinkState::Attached => {}
            LinkState::Gone if link.is_uplink() => fixes.gone_uplinks.push(link.ifname),
            LinkState::Gone => {
                unpin_links_in(&dir)?;
                fixes.forgotten.push(link.ifname);
            }
            LinkState::Severed => {
                if link.is_uplink()
                    && let Err(error) = check_uplink(&link.ifname)
                {
                    fixes.failed.push((link.ifname, format!("{error:#}")));
                    continue;
                }
                let programs: Vec<ProgramDef> = portfwd_common::programs()
                    .filter(|p| link.programs.iter().any(|name| name == p.name))
                    .copied()
                    .collect();
                // The old pins hold nothing the kernel still runs.
                unpin_links_in(&dir)?;
                let ebpf = match ebpf {
                    Some(ebpf) => ebpf,
                    None => ebpf.insert(object::load(pin_dir, object::Sizes::default())?),
                };
                match attach_tc(ebpf, pin_dir, &link.ifname, &programs) {
                    Ok(_) => fixes.reattached.push(link.ifname),
                    Err(error) => fixes.failed.push((link.ifname, format!("{error:#}"))),
                }
            }
        }
    }
    Ok(fixes)
}

/// Resolves each container address to the interface towards it (attaching
/// the reply program there), once per address; 0 where that fails.
pub(crate) fn backend_paths<'a>(
    pin_dir: &'a Path,
    lock: &'a StateLock,
) -> impl FnMut(IpAddr) -> u32 + 'a {
    let mut known = HashMap::new();
    let mut default_routes = None;
    move |ip| {
        *known.entry(ip).or_insert_with(|| {
            prepare_backend_path_with(pin_dir, ip, lock, &mut default_routes).unwrap_or(0)
        })
    }
}

/// Points every mapping at the interface its container is routed through
/// now (a restarted container has a new one), attaching the reply program
/// there; the mappings that moved.
pub(crate) fn follow_backends(
    pin_dir: &Path,
    lock: &StateLock,
    maps: &mut PinnedMaps,
) -> Result<Vec<Mapping>> {
    let mut ifindex_of = backend_paths(pin_dir, lock);
    let mut moved = Vec::new();
    for mapping in maps.mappings()? {
        let ifindex = ifindex_of(mapping.container.ip());
        if ifindex != mapping.ifindex {
            maps.set_ifindex(&mapping, ifindex)?;
            moved.push(mapping);
        }
    }
    Ok(moved)
}

/// What `follow_host` changed.
#[derive(Debug, Default)]
pub(crate) struct HostFixes {
    pub(crate) links: LinkFixes,
    /// Mappings whose container is reached through another interface now.
    pub(crate) moved: Vec<Mapping>,
    /// Tracked flows taken off interfaces that no longer exist.
    pub(crate) flows: usize,
}

/// How much `follow_host` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Follow {
    /// Every mapping's route, also when no interface went away (a route
    /// changed): `up`, and the port holder on rtnetlink events.
    Everything,
    /// The mappings' routes only when an attachment was severed or gone:
    /// what every change does first, at the cost of a few syscalls per
    /// attached interface when nothing changed.
    WhatDied,
}

/// Brings the attachments, the mappings' interfaces and the tracked flows
/// in line with the host's interfaces (see the module doc). The caller
/// holds the state lock.
pub(crate) fn follow_host(
    pin_dir: &Path,
    lock: &StateLock,
    maps: &mut PinnedMaps,
    scope: Follow,
) -> Result<HostFixes> {
    let links = follow_links(pin_dir, lock)?;
    // An interface towards containers that went away left its attachment
    // severed or gone: that is the sign, found without reading every
    // mapping.
    let something_died = !links.reattached.is_empty() || !links.forgotten.is_empty();
    let moved = if scope == Follow::Everything || something_died {
        follow_backends(pin_dir, lock, maps)?
    } else {
        Vec::new()
    };
    // Flows can only point at a dead interface when one went away.
    let changed = something_died || !moved.is_empty();
    let flows = if changed { follow_flows(pin_dir)? } else { 0 };
    // A queueing discipline added to an interface changes nothing above:
    // the holder follows everything on its events.
    if scope == Follow::Everything || changed {
        // Best effort: an interface left unlisted is redirected to through
        // the neighbour subsystem, and the next follow tries again.
        link_bits::sync(pin_dir).ok();
    }
    Ok(HostFixes {
        links,
        moved,
        flows,
    })
}

/// Tracked flows redirect to the interface they started on, which a
/// recreated interface no longer is: the packets would go to a dead index
/// (and vanish). Forward entries follow their mapping's interface (which
/// they were created with); replies redirected to an interface that is gone
/// are handed to the routing stack (ifindex 0). The entries are rewritten
/// whole while the programs may touch them: a lost timestamp refresh at
/// worst, on flows that were broken anyway.
fn follow_flows(pin_dir: &Path) -> Result<usize> {
    let maps = PinnedMaps::open_unlocked(pin_dir)?;
    let mut alive: HashMap<u32, bool> = HashMap::new();
    let mut mapped: HashMap<ServiceKey, Option<u32>> = HashMap::new();
    let mut is_alive = |ifindex: u32| {
        *alive
            .entry(ifindex)
            .or_insert_with(|| netlink::ifname(ifindex).is_ok())
    };
    let mut redirected = 0;
    for mut conntrack in conntrack::open_tables(pin_dir)? {
        let stale: Vec<(CtKey, CtValue, u32)> = conntrack
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, value)| {
                let wanted = if value.flags & CT_FLAG_REPLY != 0 {
                    if value.ifindex == 0 || is_alive(value.ifindex) {
                        return None;
                    }
                    0
                } else {
                    // A mapping removed meanwhile ends the flow at its next
                    // packet.
                    (*mapped
                        .entry(value.service)
                        .or_insert_with(|| maps.service_ifindex(&value.service)))?
                };
                (wanted != value.ifindex).then_some((key, value, wanted))
            })
            .collect();
        for (key, mut value, ifindex) in stale {
            value.ifindex = ifindex;
            // BPF_EXIST: a flow that ended meanwhile stays ended.
            const EXIST: u64 = 2;
            if conntrack.insert(key, value, EXIST).is_ok() {
                redirected += 1;
            }
        }
    }
    Ok(redirected)
}
