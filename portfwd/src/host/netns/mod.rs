//! Network namespaces of other users (rootless containers): opening one
//! safely, who owns it, and the way into it: a veth pair whose namespace
//! end has an address of portfwd's pool and a source-based route, so that
//! replies from that address go back through the veth while the
//! namespace's own default route (slirp4netns, pasta) stays as it is.
//!
//! The configuration is sent over rtnetlink (`netlink-packet-route`);
//! requests for the namespace go through a netlink socket opened inside it
//! (a socket stays in the namespace it was created in), by a short-lived
//! thread that entered it: the service's own threads never change
//! namespace.

use std::{
    ffi::CString,
    fs,
    io::{self, Write},
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    process::{Command, Stdio},
};

use anyhow::{Context, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, IpProtocol, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange},
};
use netlink_sys::Socket;
use nix::{
    fcntl::{OFlag, open},
    sched::{CloneFlags, setns},
    sys::stat::Mode,
};

use crate::model::rootless::{PAIR_PREFIX_V4, PAIR_PREFIX_V6, Slot};

mod rtnl;

use rtnl::Rtnl;

/// The routing table of the way in's source-based route, inside the
/// namespace ("pf" in ASCII): far from the tables people number by hand.
pub(crate) const WAY_IN_TABLE: u32 = 0x7066;
/// The priority of its rule: before the main table's (32766).
const WAY_IN_RULE_PRIORITY: u32 = 0x7066;
/// The priorities of the rules for the replies of a UDP port (see
/// `route_udp_replies`): the main table without its default routes first,
/// then the way in's table.
const UDP_MAIN_RULE_PRIORITY: u32 = 0x7064;
const UDP_WAY_IN_RULE_PRIORITY: u32 = 0x7065;
/// The mark (a connection's and then its reply packets') of what came in
/// through a way in, inside the namespace: one bit, far from the ones
/// Kubernetes (0x4000, 0x8000) and CNI's portmap (0x2000) use.
const WAY_IN_MARK: u32 = 0x0100_0000;
/// nftables, inside the namespace: connections that come in through a way
/// in are marked, and the replies the namespace forwards for them (from a
/// container further in, to which CNI's `portmap` DNATs, as rootless
/// nerdctl does in RootlessKit's child namespace) carry the mark, which a
/// rule routes back through the way in. Without it such a reply is routed
/// before the DNAT is undone: its source is the container's, the source
/// rule misses it, and it leaves by the namespace's default route. (The
/// namespace's own servers' replies leave from the way in's address: the
/// source rule takes them.) Replaced whole each time: idempotent.
const MARK_RULES: &str = "\
add table inet portfwd
delete table inet portfwd
table inet portfwd {
    chain ways_in {
        type filter hook prerouting priority mangle; policy accept;
        iifname \"portfwd*\" ct mark set ct mark or 0x01000000
        ct direction reply ct mark and 0x01000000 != 0 meta mark set meta mark or 0x01000000
    }
}
";
/// `statfs(2)`'s f_type of nsfs.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// A network namespace, opened by the service.
pub(crate) struct Netns {
    fd: OwnedFd,
    /// The nsfs inode: the same namespace for as long as it lives.
    pub(crate) id: (u64, u64),
}

impl Netns {
    /// Opens `target`, a pid (its `/proc/PID/ns/net`) or a path to a network
    /// namespace file (a bind mount of one, as RootlessKit's
    /// `--detach-netns` makes). The path is opened with O_PATH first and
    /// must be on nsfs: opening it cannot have the side effects opening
    /// a device or a FIFO would have for root.
    pub(crate) fn open(target: &str) -> Result<Netns> {
        let path = if !target.is_empty() && target.bytes().all(|b| b.is_ascii_digit()) {
            format!("/proc/{target}/ns/net")
        } else if target.starts_with('/') {
            target.to_owned()
        } else {
            bail!("--netns {target:?}: expected a pid or an absolute path");
        };
        let not_found = |e: nix::Error| anyhow!("--netns {target}: cannot open {path}: {e}");
        let handle = open(
            path.as_str(),
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(not_found)?;
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        let handle = unsafe { OwnedFd::from_raw_fd(handle) };
        let fs_type = nix::sys::statfs::fstatfs(&handle)
            .map_err(not_found)?
            .filesystem_type()
            .0;
        if fs_type as i64 != NSFS_MAGIC {
            bail!("--netns {target}: {path} is not a namespace");
        }
        let reopened = format!("/proc/self/fd/{}", handle.as_raw_fd());
        let fd = open(
            reopened.as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(not_found)?;
        // SAFETY: as above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: NS_GET_NSTYPE takes no argument and returns the type.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            bail!("--netns {target}: {path} is not a network namespace");
        }
        let meta = fs::metadata(&reopened).map_err(|e| anyhow!("--netns {target}: {e}"))?;
        Ok(Netns {
            fd,
            id: (meta.dev(), meta.ino()),
        })
    }

    /// The uid that owns the user namespace that owns this network
    /// namespace (0 for the host's), read from the opened namespace itself:
    /// what the caller named cannot change under this check.
    pub(crate) fn owner_uid(&self) -> Result<u32> {
        // SAFETY: NS_GET_USERNS takes no argument and returns a new fd.
        let userns = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::NS_GET_USERNS) };
        if userns < 0 {
            return Err(io::Error::last_os_error()).context("reading the namespace's owner");
        }
        // SAFETY: a new descriptor, ours alone.
        let userns = unsafe { OwnedFd::from_raw_fd(userns) };
        let mut uid: libc::uid_t = 0;
        // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer.
        let rc = unsafe { libc::ioctl(userns.as_raw_fd(), libc::NS_GET_OWNER_UID, &mut uid) };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("reading the namespace's owner uid");
        }
        Ok(uid)
    }

    /// Whether this is the service's own network namespace.
    pub(crate) fn is_own(&self) -> Result<bool> {
        let own = fs::metadata("/proc/thread-self/ns/net").context("reading this netns")?;
        Ok((own.dev(), own.ino()) == self.id)
    }
}

/// Whether an interface named `name` exists in the service's namespace.
pub(crate) fn link_exists(name: &str) -> bool {
    CString::new(name)
        .map(|c| nix::net::if_::if_nametoindex(c.as_c_str()).is_ok())
        .unwrap_or(false)
}

/// The host end (`pfr<N>`) of the way into `netns` that exists already,
/// made before this service started (it was restarted). Found by the
/// kernel's id for the namespace the end's peer lives in, so a link the
/// user named inside their namespace cannot point at another's way in.
pub(crate) fn existing_way_in(netns: &Netns) -> Result<Option<String>> {
    let host = Rtnl::here()?;
    let Some(nsid) = host.nsid_of(netns)? else {
        // No device of the host's has a peer in it.
        return Ok(None);
    };
    let names = nix::net::if_::if_nameindex().context("listing the interfaces")?;
    for name in names.iter().filter_map(|i| i.name().to_str().ok()) {
        if !Slot::is_host_ifname(name) {
            continue;
        }
        // One gone in between is not this namespace's.
        let Ok(link) = host.get_link(name) else {
            continue;
        };
        let peer_in_netns = link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::LinkNetNsId(id) if *id == nsid));
        if peer_in_netns {
            return Ok(Some(name.to_owned()));
        }
    }
    Ok(None)
}

/// Deletes the host's rules of a way in whose interface is gone (see
/// `Rtnl::block_forwarding_from`); missing ones are no error.
pub(crate) fn unblock_forwarding_from(ifname: &str) -> Result<()> {
    let host = Rtnl::here()?;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let message = forwarding_block_rule(family, ifname);
        match host.request(RouteNetlinkMessage::DelRule(message), 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            other => other.with_context(|| format!("deleting the rule of {ifname}"))?,
        }
    }
    Ok(())
}

/// The ways in (host ends, `pfr<N>`) the host has rules for (see
/// `Rtnl::block_forwarding_from`), whether or not the interface exists.
pub(crate) fn ways_in_with_rules() -> Result<Vec<String>> {
    let mut names: Vec<String> = crate::host::netlink::rules()?
        .into_iter()
        .filter(|rule| rule.header.action == RuleAction::Prohibit)
        .filter(|rule| {
            rule.attributes
                .contains(&RuleAttribute::Priority(WAY_IN_RULE_PRIORITY))
        })
        .filter_map(|rule| {
            rule.attributes.into_iter().find_map(|a| match a {
                RuleAttribute::Iifname(name) if Slot::is_host_ifname(&name) => Some(name),
                _ => None,
            })
        })
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// `iif IFNAME prohibit`, at the way in's priority.
fn forwarding_block_rule(family: AddressFamily, ifname: &str) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = family;
    message.header.action = RuleAction::Prohibit;
    message
        .attributes
        .push(RuleAttribute::Iifname(ifname.to_owned()));
    message
        .attributes
        .push(RuleAttribute::Priority(WAY_IN_RULE_PRIORITY));
    message
}

/// Makes the way into `netns` for `slot`: the veth pair (host end
/// `slot.host_ifname()`, namespace end `slot.ns_ifname()`), both ends'
/// addresses, and inside the namespace the rule and route that send
/// replies from the slot's addresses back through the veth. All or
/// nothing: on failure the pair is deleted (which undoes the rest).
pub(crate) fn create_way_in(netns: &Netns, slot: &Slot) -> Result<()> {
    let host = Rtnl::here()?;
    let host_if = slot.host_ifname();
    let ns_if = slot.ns_ifname();
    host.create_veth(&host_if, &ns_if, netns.fd.as_fd())
        .with_context(|| format!("creating the veth pair {host_if}/{ns_if}"))?;
    let result = (|| -> Result<()> {
        let host_index = crate::host::netlink::ifindex(&host_if)?;
        host.add_address(host_index, IpAddr::V4(slot.host_v4), PAIR_PREFIX_V4)?;
        host.add_address(host_index, IpAddr::V6(slot.host_v6), PAIR_PREFIX_V6)?;
        host.block_forwarding_from(&host_if)?;
        host.set_up(host_index)?;
        let inside = Rtnl::inside(netns)?;
        let ns_index = inside.link_index(&ns_if)?;
        inside.add_address(ns_index, IpAddr::V4(slot.ns_v4), PAIR_PREFIX_V4)?;
        inside.add_address(ns_index, IpAddr::V6(slot.ns_v6), PAIR_PREFIX_V6)?;
        inside.set_up(ns_index)?;
        inside.add_default_route(ns_index, IpAddr::V4(slot.host_v4))?;
        inside.add_default_route(ns_index, IpAddr::V6(slot.host_v6))?;
        inside.add_source_rule(IpAddr::V4(slot.ns_v4))?;
        inside.add_source_rule(IpAddr::V6(slot.ns_v6))?;
        Ok(())
    })();
    if let Err(error) = result {
        delete_link(&host_if).ok();
        return Err(error.context(format!("configuring the way in through {host_if}")));
    }
    Ok(())
}

/// Sends the replies of the UDP servers on `ports` in `netns` through the
/// way in. A TCP reply leaves from the address its connection came to (the
/// way in's, matched by the source rule), but a UDP server bound to the
/// wildcard replies from whatever address the route to the client picks:
/// the namespace's default route (slirp4netns, pasta), which would lose
/// it. So datagrams from these ports use the main table's specific routes
/// (the namespace's own networks keep working), and instead of its default
/// route, the way in's. Rules that exist already are kept.
pub(crate) fn route_udp_replies(netns: &Netns, ports: (u16, u16)) -> Result<()> {
    let inside = Rtnl::inside(netns)?;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for (priority, table, suppress_default) in [
            (
                UDP_MAIN_RULE_PRIORITY,
                u32::from(RouteHeader::RT_TABLE_MAIN),
                true,
            ),
            (UDP_WAY_IN_RULE_PRIORITY, WAY_IN_TABLE, false),
        ] {
            let mut message = RuleMessage::default();
            message.header.family = family;
            message.header.action = RuleAction::ToTable;
            message
                .attributes
                .push(RuleAttribute::IpProtocol(IpProtocol::Udp));
            message
                .attributes
                .push(RuleAttribute::SourcePortRange(RulePortRange {
                    start: ports.0,
                    end: ports.1,
                }));
            message.attributes.push(RuleAttribute::Table(table));
            message.attributes.push(RuleAttribute::Priority(priority));
            if suppress_default {
                message.attributes.push(RuleAttribute::SuppressPrefixLen(0));
            }
            match inside.create(RouteNetlinkMessage::NewRule(message)) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                other => other.with_context(|| {
                    format!("adding the rule for UDP port {}-{}", ports.0, ports.1)
                })?,
            }
        }
    }
    Ok(())
}

/// Routes the replies that `netns` forwards for connections that came in
/// through its way in back through it (see `MARK_RULES`): the nftables
/// rules and `ip rule add fwmark WAY_IN_MARK lookup WAY_IN_TABLE` (both
/// families). Rules that exist already are kept.
pub(crate) fn route_forwarded_replies(netns: &Netns) -> Result<()> {
    let inside = Rtnl::inside(netns)?;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut message = RuleMessage::default();
        message.header.family = family;
        message.header.action = RuleAction::ToTable;
        message.attributes.push(RuleAttribute::FwMark(WAY_IN_MARK));
        message.attributes.push(RuleAttribute::FwMask(WAY_IN_MARK));
        message.attributes.push(RuleAttribute::Table(WAY_IN_TABLE));
        message
            .attributes
            .push(RuleAttribute::Priority(WAY_IN_RULE_PRIORITY));
        match inside.create(RouteNetlinkMessage::NewRule(message)) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            other => other.context("adding the rule for the way in's mark")?,
        }
    }
    nft_inside(netns, MARK_RULES).context("marking the connections that come through the way in")
}

/// Runs `nft -f -` with `script` in `netns`: started by a thread that
/// entered it (a child starts in its parent thread's namespaces).
fn nft_inside(netns: &Netns, script: &str) -> Result<()> {
    let fd = netns.fd.try_clone()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<()> {
                setns(&fd, CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
                let mut child = Command::new("nft")
                    .args(["-f", "-"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("running nft")?;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(script.as_bytes())?;
                }
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    let why = String::from_utf8_lossy(&out.stderr);
                    bail!("nft: {}", why.lines().next().unwrap_or("failed"));
                }
                Ok(())
            })
            .join()
            .map_err(|_| anyhow!("the thread entering the namespace panicked"))?
    })
}

/// Deletes an interface of the service's namespace (a veth takes its peer
/// with it); a missing one is no error.
pub(crate) fn delete_link(name: &str) -> Result<()> {
    let Ok(index) = crate::host::netlink::ifindex(name) else {
        return Ok(());
    };
    let mut message = LinkMessage::default();
    message.header.index = index;
    match Rtnl::here()?.request(RouteNetlinkMessage::DelLink(message), 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        other => other.with_context(|| format!("deleting {name}")),
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}
