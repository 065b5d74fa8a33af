//! Routing facts from the kernel over rtnetlink (NETLINK_ROUTE),
//! synchronously: which interface a destination is routed through, which
//! interfaces carry default routes, and the routing rules. Messages are encoded and decoded
//! by `netlink-packet-route`; `netlink-sys` is the socket.
//!
//! Every loop is bounded (reads per request, dump retries) and every read
//! has a timeout, so a confused kernel (or a bug) yields an error, never a
//! hang.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::{CStr, CString},
    io,
    net::IpAddr,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
    rule::RuleMessage,
    tc::{TcHandle, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::{errno::Errno, sys::socket::sockopt, sys::time::TimeVal};

/// The kernel caps dump batches at 32 KiB; 64 KiB leaves headroom.
const RECV_BUF_LEN: usize = 64 * 1024;
/// Upper bound on reads per request. A full Internet table (~1M IPv4
/// routes) dumps in a few thousand 32 KiB batches.
const MAX_RECVS: usize = 1 << 16;
/// Guards against blocking forever if a reply never arrives.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump interrupted by concurrent route changes (NLM_F_DUMP_INTR) may be
/// inconsistent; it is retried a few times before giving up.
const MAX_DUMP_ATTEMPTS: usize = 3;

/// The interface index the kernel routes `dst` through (like `ip route get
/// DST`), in the calling thread's network namespace. None if there is no
/// route (ENETUNREACH or EHOSTUNREACH, a reply without RTA_OIF, or an IPv6
/// unreachable/prohibit/blackhole/throw route, which the kernel reports as
/// a route of that type via `lo`). A local address yields the loopback's
/// index.
pub(crate) fn route_oif(dst: IpAddr) -> Result<Option<u32>> {
    route_get(dst, |route| oifs(route).next())
}

/// The source address the kernel picks for a connection from the host to
/// `dst` (`ip route get DST`'s `src`): for a container, the host's address
/// on its link. None when there is no route or it names no source.
pub(crate) fn route_source(dst: IpAddr) -> Result<Option<IpAddr>> {
    route_get(dst, |route| {
        route
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                RouteAttribute::PrefSource(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                _ => None,
            })
    })
}

/// `ip route get DST`: what `pick` takes from the route the kernel would
/// use, None when there is no route that delivers (see `route_oif`).
fn route_get<T>(dst: IpAddr, pick: impl Fn(&RouteMessage) -> Option<T>) -> Result<Option<T>> {
    let mut request = RouteMessage::default();
    request.header.address_family = match dst {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    // Host prefix lengths: the kernel's strict request checking rejects
    // anything else.
    request.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
    request
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    let mut picked = None;
    let result = exchange(request, NLM_F_REQUEST, |route| {
        picked = pick(&route).filter(|_| delivers(&route));
        Flow::Done
    });
    match result {
        Ok(_) => Ok(picked),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("looking up the route to {dst}")),
    }
}

/// Names of the interfaces that carry a default route (IPv4 0.0.0.0/0 or
/// IPv6 ::/0) in the main table, sorted; multipath routes contribute every
/// nexthop's interface.
pub(crate) fn default_route_interfaces() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for index in default_route_ifindexes()? {
        match if_indextoname(index) {
            Ok(name) => names.push(utf8_name(index, name)?),
            // The interface vanished after the dump; its routes went with it.
            Err(Errno::ENXIO | Errno::ENODEV) => {}
            Err(e) => return Err(e).with_context(|| format!("naming interface index {index}")),
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The index of the interface called `name`.
pub(crate) fn ifindex(name: &str) -> Result<u32> {
    match nix::net::if_::if_nametoindex(name) {
        Ok(index) => Ok(index),
        Err(Errno::ENODEV) => Err(anyhow!("no interface named {name:?}")),
        Err(e) => Err(e).with_context(|| format!("looking up interface {name:?}")),
    }
}

/// The name of the interface with index `index`.
pub(crate) fn ifname(index: u32) -> Result<String> {
    match if_indextoname(index) {
        Ok(name) => utf8_name(index, name),
        Err(Errno::ENXIO | Errno::ENODEV) => Err(anyhow!("no interface with index {index}")),
        Err(e) => Err(e).with_context(|| format!("naming interface index {index}")),
    }
}

/// The link-layer type (`ARPHRD_*`) of `ifname`, asked of the calling
/// thread's network namespace (SIOCGIFHWADDR). Not from
/// /sys/class/net/IF/type: /sys shows the namespace it was mounted in, not
/// necessarily this process's (a process that entered a namespace with
/// setns, as the benchmark runs portfwd, sees the host's).
pub(crate) fn link_type(ifname: &str) -> Result<u16> {
    let name = CString::new(ifname).context("an interface name with a NUL byte")?;
    if name.as_bytes_with_nul().len() > libc::IFNAMSIZ {
        bail!("interface name {ifname:?} is too long");
    }
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("opening a socket")?;
    // SAFETY: all-zero bytes are a valid ifreq.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *to = *from as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes the hardware address
    // into `request`, which outlives the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCGIFHWADDR,
            &mut request,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("reading the link type of {ifname}"));
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware address member.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Not `nix::net::if_::if_indextoname`: nix 0.29 checks its result against
/// -1 instead of NULL, so an unknown index comes back as `Ok("")` rather
/// than ENXIO.
fn if_indextoname(index: u32) -> std::result::Result<CString, Errno> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` is IF_NAMESIZE bytes long, the size if_indextoname(3) writes at most.
    let ret = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if ret.is_null() {
        return Err(Errno::last());
    }
    let name = CStr::from_bytes_until_nul(&buf).map_err(|_| Errno::ENAMETOOLONG)?;
    Ok(name.to_owned())
}

fn utf8_name(index: u32, name: CString) -> Result<String> {
    name.into_string().map_err(|e| {
        anyhow!(
            "interface {index} has a non-UTF-8 name {:?}",
            e.into_cstring()
        )
    })
}

fn default_route_ifindexes() -> Result<BTreeSet<u32>> {
    // A dump of every family (AF_UNSPEC), filtered here.
    dump(
        RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        "routes",
        |message, found: &mut BTreeSet<u32>| {
            if let RouteNetlinkMessage::NewRoute(route) = message
                && is_main_default(&route)
            {
                found.extend(oifs(&route));
            }
        },
    )
}

/// The routing rules of every family (`ip rule show`, IPv4 and IPv6).
pub(crate) fn rules() -> Result<Vec<RuleMessage>> {
    // AF_UNSPEC: the kernel dumps the rules of every family.
    dump(
        RouteNetlinkMessage::GetRule(RuleMessage::default()),
        "the routing rules",
        |message, rules: &mut Vec<RuleMessage>| {
            if let RouteNetlinkMessage::NewRule(rule) = message {
                rules.push(rule);
            }
        },
    )
}

/// The host's veths, among those `wanted`, through which a packet can be
/// redirected straight into the other namespace (`bpf_redirect_peer`, see
/// `portfwd_common::PEER_LINKS`) and be received there as if the veth had
/// carried it. What such a redirect skips must not matter:
/// - the host side's queueing discipline: `noqueue` (a veth's default),
///   not a shaper such as the CNI `bandwidth` plugin's `tbf`;
/// - the host side's egress filters (a netlink clsact filter; TCX programs
///   are the caller's to check, see `datapath::link_bits`);
/// - the peer's XDP program (see `without_xdp_in`).
///
/// The frame itself is addressed as the veth would carry it (see
/// `verdict::redirect` in the eBPF crate).
pub(crate) fn links_into_peer(wanted: impl Fn(u32) -> bool) -> Result<BTreeSet<u32>> {
    let candidates = dump(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        "the interfaces",
        |message, found: &mut Vec<VethToElsewhere>| {
            if let RouteNetlinkMessage::NewLink(link) = message
                && let Some(veth) = VethToElsewhere::of(&link)
                && wanted(veth.index)
            {
                found.push(veth);
            }
        },
    )?;
    let mut without_xdp: BTreeMap<i32, BTreeSet<u32>> = BTreeMap::new();
    let mut found = BTreeSet::new();
    for veth in candidates {
        // A namespace that cannot be read (gone meanwhile) counts as XDP
        // everywhere.
        let peers = without_xdp
            .entry(veth.netnsid)
            .or_insert_with(|| without_xdp_in(veth.netnsid).unwrap_or_default());
        // Filters that cannot be listed may be there.
        if peers.contains(&veth.peer) && !has_egress_filters(veth.index).unwrap_or(true) {
            found.insert(veth.index);
        }
    }
    Ok(found)
}

/// A veth without a queueing discipline of its own whose peer lives in
/// another namespace (the kernel names that namespace, IFLA_LINK_NETNSID,
/// only then).
struct VethToElsewhere {
    index: u32,
    /// The peer's index in its namespace.
    peer: u32,
    /// The peer's namespace, as this namespace numbers it.
    netnsid: i32,
}

impl VethToElsewhere {
    fn of(link: &LinkMessage) -> Option<Self> {
        let (mut veth, mut unqueued, mut peer, mut netnsid) = (false, false, None, None);
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::LinkInfo(infos) => {
                    veth = infos
                        .iter()
                        .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth)));
                }
                LinkAttribute::Qdisc(kind) => unqueued = kind == "noqueue",
                LinkAttribute::Link(index) => peer = Some(*index),
                LinkAttribute::LinkNetNsId(id) => netnsid = Some(*id),
                _ => {}
            }
        }
        (veth && unqueued).then_some(VethToElsewhere {
            index: link.header.index,
            peer: peer?,
            netnsid: netnsid?,
        })
    }
}

/// The interfaces of the namespace `netnsid` (as this namespace numbers
/// it) without an XDP program: a veth runs its peer's in its transmit,
/// which a redirect into the peer skips.
fn without_xdp_in(netnsid: i32) -> Result<BTreeSet<u32>> {
    let mut request = LinkMessage::default();
    request.attributes.push(LinkAttribute::IfNetnsId(netnsid));
    let xdp_attached = |attribute: &LinkAttribute| match attribute {
        LinkAttribute::Xdp(xdp) => xdp
            .iter()
            .any(|x| matches!(x, LinkXdp::Attached(a) if *a != XdpAttached::None)),
        _ => false,
    };
    dump(
        RouteNetlinkMessage::GetLink(request),
        "the interfaces of a container's namespace",
        |message, found: &mut BTreeSet<u32>| {
            if let RouteNetlinkMessage::NewLink(link) = message
                && !link.attributes.iter().any(xdp_attached)
            {
                found.insert(link.header.index);
            }
        },
    )
}

/// Whether the interface has filters on its clsact egress hook (`tc
/// filter show dev IF egress`): none without a clsact qdisc.
fn has_egress_filters(index: u32) -> Result<bool> {
    let mut request = TcMessage::default();
    request.header.index = i32::try_from(index).context("an interface index over i32")?;
    request.header.parent = TcHandle {
        major: TcHandle::CLSACT.major,
        minor: TcHandle::MIN_EGRESS,
    };
    dump(
        RouteNetlinkMessage::GetTrafficFilter(request),
        "an interface's egress filters",
        |message, found: &mut bool| {
            *found |= matches!(message, RouteNetlinkMessage::NewTrafficFilter(_));
        },
    )
}

/// A dump of `request`'s kind, each message given to `collect`; retried
/// from scratch when concurrent changes interrupted it (NLM_F_DUMP_INTR:
/// it may be inconsistent).
fn dump<T: Default>(
    request: RouteNetlinkMessage,
    what: &str,
    mut collect: impl FnMut(RouteNetlinkMessage, &mut T),
) -> Result<T> {
    for _ in 0..MAX_DUMP_ATTEMPTS {
        let mut found = T::default();
        let interrupted =
            exchange_messages(request.clone(), NLM_F_REQUEST | NLM_F_DUMP, |message| {
                collect(message, &mut found);
                Flow::Continue
            })
            .with_context(|| format!("dumping {what}"))?;
        if !interrupted {
            return Ok(found);
        }
    }
    bail!(
        "the dump of {what} was interrupted by concurrent changes {MAX_DUMP_ATTEMPTS} times in a row"
    )
}

/// Whether traffic on this route goes anywhere.
fn delivers(route: &RouteMessage) -> bool {
    !matches!(
        route.header.kind,
        RouteType::Unreachable | RouteType::Prohibit | RouteType::BlackHole | RouteType::Throw
    )
}

/// A unicast default route of the main table.
fn is_main_default(route: &RouteMessage) -> bool {
    // RTA_TABLE when present: the header's table field is only 8 bits wide.
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    matches!(
        route.header.address_family,
        AddressFamily::Inet | AddressFamily::Inet6
    ) && route.header.destination_prefix_length == 0
        && table == u32::from(RouteHeader::RT_TABLE_MAIN)
        && route.header.kind == RouteType::Unicast
}

/// The route's output interfaces: RTA_OIF, then each multipath nexthop's.
fn oifs(route: &RouteMessage) -> impl Iterator<Item = u32> + '_ {
    route
        .attributes
        .iter()
        .flat_map(|attribute| match attribute {
            RouteAttribute::Oif(index) => vec![*index],
            RouteAttribute::MultiPath(hops) => hops.iter().map(|h| h.interface_index).collect(),
            _ => Vec::new(),
        })
        .filter(|&index| index != 0)
}

enum Flow {
    Continue,
    Done,
}

/// Sends one RTM_GETROUTE and hands each route of the reply to `on_route`
/// until it says Done or the reply ends. Kernel errors come back as
/// `io::Error`s with their errno. Returns whether the dump was interrupted
/// (NLM_F_DUMP_INTR).
fn exchange(
    request: RouteMessage,
    flags: u16,
    mut on_route: impl FnMut(RouteMessage) -> Flow,
) -> io::Result<bool> {
    exchange_messages(
        RouteNetlinkMessage::GetRoute(request),
        flags,
        |message| match message {
            RouteNetlinkMessage::NewRoute(route) => on_route(route),
            _ => Flow::Continue,
        },
    )
}

/// A netlink route socket of the calling thread's namespace, connected to
/// the kernel, whose reads give up after `RECV_TIMEOUT`.
pub(crate) fn route_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    nix::sys::socket::setsockopt(
        &socket,
        sockopt::ReceiveTimeout,
        &TimeVal::new(RECV_TIMEOUT.as_secs() as i64, 0),
    )?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// `exchange` for any request: each message of the reply goes to
/// `on_message`.
fn exchange_messages(
    request: RouteNetlinkMessage,
    flags: u16,
    mut on_message: impl FnMut(RouteNetlinkMessage) -> Flow,
) -> io::Result<bool> {
    // A fresh socket per request keeps replies to other requests out of the
    // way, and lands in the calling thread's netns.
    let socket = route_socket()?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut interrupted = false;
    let mut buf = vec![0; RECV_BUF_LEN];
    for _ in 0..MAX_RECVS {
        let len = socket.recv(&mut &mut buf[..], 0)?;
        let mut datagram = &buf[..len];
        while !datagram.is_empty() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(datagram)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = reply.header.length as usize;
            if length == 0 || length > datagram.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a netlink message with an impossible length",
                ));
            }
            datagram = &datagram[length.next_multiple_of(4).min(datagram.len())..];
            interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
            match reply.payload {
                NetlinkPayload::InnerMessage(message) => {
                    if let Flow::Done = on_message(message) {
                        return Ok(interrupted);
                    }
                }
                NetlinkPayload::Error(error) if error.code.is_some() => return Err(error.to_io()),
                // An ACK.
                NetlinkPayload::Error(_) => return Ok(interrupted),
                // A dump that failed midway reports its error here.
                NetlinkPayload::Done(done) if done.code < 0 => {
                    return Err(io::Error::from_raw_os_error(-done.code));
                }
                NetlinkPayload::Done(_) => return Ok(interrupted),
                NetlinkPayload::Overrun(_) => {
                    return Err(io::Error::other("netlink reported a data overrun"));
                }
                _ => {}
            }
        }
    }
    Err(io::Error::other(format!(
        "netlink reply did not end after {MAX_RECVS} reads"
    )))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_route::route::RouteNextHop;

    use super::*;

    fn route(kind: RouteType, prefix: u8, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.table = RouteHeader::RT_TABLE_MAIN;
        route.header.kind = kind;
        route.header.destination_prefix_length = prefix;
        route.attributes = attributes;
        route
    }

    #[test]
    fn default_routes_of_the_main_table_count() {
        let hop = |index| {
            let mut hop = RouteNextHop::default();
            hop.interface_index = index;
            hop
        };
        let multipath = route(
            RouteType::Unicast,
            0,
            vec![RouteAttribute::MultiPath(vec![hop(3), hop(0), hop(4)])],
        );
        assert!(is_main_default(&multipath));
        assert_eq!(oifs(&multipath).collect::<Vec<_>>(), [3, 4]);
        let other_table = route(
            RouteType::Unicast,
            0,
            vec![RouteAttribute::Table(100), RouteAttribute::Oif(2)],
        );
        assert!(!is_main_default(&other_table));
        assert!(!is_main_default(&route(RouteType::Unicast, 24, vec![])));
        assert!(!is_main_default(&route(RouteType::Unreachable, 0, vec![])));
        assert!(!delivers(&route(RouteType::BlackHole, 0, vec![])));
        assert!(delivers(&route(RouteType::Local, 32, vec![])));
    }

    #[test]
    fn loopback_is_routed_through_lo() {
        let lo = ifindex("lo").unwrap();
        assert_eq!(ifname(lo).unwrap(), "lo");
        assert_eq!(route_oif(Ipv4Addr::LOCALHOST.into()).unwrap(), Some(lo));
        assert_eq!(route_oif(Ipv6Addr::LOCALHOST.into()).unwrap(), Some(lo));
        assert!(ifindex("no-such-if0").is_err());
        assert!(ifname(u32::MAX).is_err());
    }

    #[test]
    fn loopback_is_not_ethernet() {
        assert_eq!(link_type("lo").unwrap(), libc::ARPHRD_LOOPBACK);
        assert!(link_type("no-such-if0").is_err());
    }

    #[test]
    fn the_route_dump_ends() {
        // Whatever the machine's routes, the dump completes and names
        // interfaces that exist.
        for name in default_route_interfaces().unwrap() {
            assert!(ifindex(&name).is_ok(), "{name}");
        }
    }
}
