//! Routing facts from the kernel over rtnetlink (NETLINK_ROUTE), synchronously.
//!
//! We need exactly one request (RTM_GETROUTE for a single destination) and one dump
//! (RTM_GETROUTE with NLM_F_DUMP), so the wire format is written by hand: a netlink header, an
//! `rtmsg` and a few TLV attributes. That keeps us off the netlink-packet-* crate family, whose
//! APIs churn between releases; nix wraps the socket calls, so the only `unsafe` is one libc call.
//!
//! Every parser here takes untrusted bytes and returns an error on anything short or malformed
//! instead of indexing past the end, and every loop is bounded by the input length or by an
//! explicit cap, so a confused kernel (or a bug) yields an error, never a panic or a hang.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use libc::{
    RT_TABLE_MAIN, RTA_DST, RTA_MULTIPATH, RTA_OIF, RTA_TABLE, RTM_GETROUTE, RTM_NEWROUTE,
    RTN_BLACKHOLE, RTN_PROHIBIT, RTN_THROW, RTN_UNICAST, RTN_UNREACHABLE,
};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
    setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

// libc spells the <linux/netlink.h> constants as c_int while the header fields are u16, so we
// narrow them once here rather than casting at every use.
const NLMSG_NOOP: u16 = libc::NLMSG_NOOP as u16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const NLMSG_OVERRUN: u16 = libc::NLMSG_OVERRUN as u16;
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
const NLM_F_DUMP_INTR: u16 = libc::NLM_F_DUMP_INTR as u16;
/// Strips NLA_F_NESTED / NLA_F_NET_BYTEORDER, which some attributes carry in their type field.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// sizeof(struct nlmsghdr)
const NLMSG_HDR_LEN: usize = 16;
/// sizeof(struct rtmsg); already a multiple of 4, so attributes start right after it.
const RTMSG_LEN: usize = 12;
/// sizeof(struct rtattr)
const RTA_HDR_LEN: usize = 4;
/// sizeof(struct rtnexthop)
const RTNH_LEN: usize = 8;

/// The kernel sizes dump batches from the reader's buffer but caps them at 32 KiB; 64 KiB leaves
/// headroom, and MSG_TRUNC still tells us if a datagram ever outgrows it.
const RECV_BUF_LEN: usize = 64 * 1024;
/// Upper bound on recv calls per request. A full Internet table (~1M IPv4 routes) dumps in a few
/// thousand 32 KiB batches, so this only trips if the kernel never ends the reply.
const MAX_RECVS: usize = 1 << 16;
/// Guards against blocking forever if a reply never arrives.
const RECV_TIMEOUT_SECS: i64 = 5;
/// A dump interrupted by concurrent route changes (NLM_F_DUMP_INTR) may be inconsistent; retry it
/// a few times before giving up.
const MAX_DUMP_ATTEMPTS: usize = 3;

/// The interface index the kernel routes `dst` through (like `ip route get DST`), using the
/// calling thread's network namespace and its routing rules. None if there is no route
/// (ENETUNREACH or EHOSTUNREACH, or a reply without RTA_OIF). A local address (RTN_LOCAL) yields
/// whatever RTA_OIF the kernel reports, i.e. the loopback's ifindex.
///
/// An IPv6 unreachable/prohibit/blackhole/throw route comes back as a route of that type via
/// `lo`, which delivers nothing, so it is None as well. IPv4 turns those route types into errors
/// instead: unreachable (EHOSTUNREACH) and throw (ENETUNREACH once no later rule matches) are
/// None, but blackhole (EINVAL) and prohibit (EACCES) surface as errors.
pub(crate) fn route_oif(dst: IpAddr) -> Result<Option<u32>> {
    let mut nl = Netlink::open()?;
    let seq = next_seq();
    let mut oif = None;
    let result = nl.request(&route_request(seq, Some(dst)), seq, |msg| {
        if msg.ty != RTM_NEWROUTE {
            return Ok(Flow::Continue);
        }
        let route = parse_route(msg.payload)?;
        oif = route.oif.filter(|_| route.delivers()).filter(|&i| i != 0);
        Ok(Flow::Done)
    });
    match result {
        Ok(_) => Ok(oif),
        Err(e)
            if matches!(
                e.downcast_ref(),
                Some(Errno::ENETUNREACH | Errno::EHOSTUNREACH)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.context(format!("looking up the route to {dst}"))),
    }
}

/// Names of the interfaces that carry a default route (IPv4 0.0.0.0/0 or IPv6 ::/0) in the main
/// table, deduplicated and sorted. Routes with multipath nexthops (RTA_MULTIPATH) contribute
/// every nexthop's interface.
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

/// Not `nix::net::if_::if_indextoname`: nix 0.29 checks its result against -1 instead of NULL,
/// so an unknown index comes back as `Ok("")` rather than ENXIO.
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
    let mut nl = Netlink::open()?;
    for _ in 0..MAX_DUMP_ATTEMPTS {
        let seq = next_seq();
        let mut found = BTreeSet::new();
        let interrupted = nl
            .request(&route_request(seq, None), seq, |msg| {
                if msg.ty == RTM_NEWROUTE {
                    let route = parse_route(msg.payload)?;
                    if route.is_main_default() {
                        found.extend(route.oifs());
                    }
                }
                Ok(Flow::Continue)
            })
            .context("dumping routes")?;
        if !interrupted {
            return Ok(found);
        }
    }
    bail!("route dump was interrupted by concurrent changes {MAX_DUMP_ATTEMPTS} times in a row")
}

/// Sequence numbers only have to be distinct per socket, but a process-wide counter makes stale
/// replies obvious if a socket is ever reused.
fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Transport

enum Flow {
    Continue,
    Done,
}

struct Netlink {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Netlink {
    fn open() -> Result<Self> {
        // A fresh socket per call keeps replies to other requests (and any leftovers from an
        // aborted exchange) out of our way, and lands in the calling thread's netns.
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .context("opening a NETLINK_ROUTE socket")?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::seconds(RECV_TIMEOUT_SECS),
        )
        .context("setting the netlink receive timeout")?;
        Ok(Self {
            fd,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Sends `request`, then hands each reply message carrying `seq` to `on_msg` until it says
    /// Done, the kernel sends NLMSG_DONE or an ACK, or an error arrives. Kernel errors come back
    /// as an [`Errno`] inside the anyhow error so callers can match on them. Returns whether any
    /// message was flagged NLM_F_DUMP_INTR.
    fn request(
        &mut self,
        request: &[u8],
        seq: u32,
        mut on_msg: impl FnMut(&NlMsg<'_>) -> Result<Flow>,
    ) -> Result<bool> {
        let sent = sendto(
            self.fd.as_raw_fd(),
            request,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .context("sending netlink request")?;
        if sent != request.len() {
            bail!("short netlink send: {sent} of {} bytes", request.len());
        }

        let mut interrupted = false;
        for _ in 0..MAX_RECVS {
            // On netlink sockets MSG_TRUNC makes recv return the datagram's full length, which
            // is how we notice a datagram that did not fit instead of parsing half of it.
            let len = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_TRUNC) {
                Ok(len) => len,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    bail!("no netlink reply within {RECV_TIMEOUT_SECS}s")
                }
                Err(e) => return Err(e).context("receiving netlink reply"),
            };
            let Some(datagram) = self.buf.get(..len) else {
                bail!(
                    "netlink reply of {len} bytes exceeds the {} byte buffer",
                    self.buf.len()
                );
            };
            for msg in parse_messages(datagram)? {
                // A reply to an earlier request on this socket (e.g. an interrupted dump being
                // retried) may still be queued; it is not ours.
                if msg.seq != seq {
                    continue;
                }
                interrupted |= msg.flags & NLM_F_DUMP_INTR != 0;
                match msg.ty {
                    NLMSG_NOOP => {}
                    NLMSG_ERROR => {
                        let code = ne_i32(msg.payload, 0)
                            .ok_or_else(|| anyhow!("truncated NLMSG_ERROR"))?;
                        if code == 0 {
                            return Ok(interrupted); // an ACK
                        }
                        return Err(Errno::from_raw(code.saturating_neg()).into());
                    }
                    NLMSG_DONE => {
                        // A dump that failed midway reports its error in the DONE payload.
                        match ne_i32(msg.payload, 0) {
                            Some(code) if code < 0 => {
                                return Err(Errno::from_raw(code.saturating_neg()).into());
                            }
                            _ => return Ok(interrupted),
                        }
                    }
                    NLMSG_OVERRUN => bail!("netlink reported a data overrun"),
                    _ => {
                        if let Flow::Done = on_msg(&msg)? {
                            return Ok(interrupted);
                        }
                    }
                }
            }
        }
        bail!("netlink reply did not end after {MAX_RECVS} reads")
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// RTM_GETROUTE: a lookup of `dst` (like `ip route get`), or with `None` a dump of all routes
/// of every family (AF_UNSPEC); the dump is filtered on our side.
fn route_request(seq: u32, dst: Option<IpAddr>) -> Vec<u8> {
    let (flags, family, addr) = match dst {
        Some(IpAddr::V4(a)) => (NLM_F_REQUEST, libc::AF_INET, a.octets().to_vec()),
        Some(IpAddr::V6(a)) => (NLM_F_REQUEST, libc::AF_INET6, a.octets().to_vec()),
        None => (NLM_F_REQUEST | NLM_F_DUMP, libc::AF_UNSPEC, Vec::new()),
    };
    // Host prefix lengths: the kernel's strict request checking rejects anything else.
    let dst_len = (addr.len() * 8) as u8;

    let mut msg = Vec::with_capacity(NLMSG_HDR_LEN + RTMSG_LEN + RTA_HDR_LEN + 16);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched below
    msg.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills in ours
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, then u32 flags.
    msg.extend_from_slice(&[family as u8, dst_len, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    if !addr.is_empty() {
        // 4 + 4 or 4 + 16 bytes: already aligned, so no padding is needed.
        msg.extend_from_slice(&((RTA_HDR_LEN + addr.len()) as u16).to_ne_bytes());
        msg.extend_from_slice(&RTA_DST.to_ne_bytes());
        msg.extend_from_slice(&addr);
    }
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// NLMSG_ALIGN / RTA_ALIGN / RTNH_ALIGN: all are 4-byte alignment.
const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn ne_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn ne_i32(buf: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// Drops the alignment padding after a record of `len` bytes; the final record of a buffer may
/// legitimately lack it.
fn skip_padding(rest: &[u8], len: usize) -> &[u8] {
    rest.get(align4(len) - len..).unwrap_or_default()
}

#[derive(Debug, PartialEq, Eq)]
struct NlMsg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits one datagram into its netlink messages.
fn parse_messages(mut buf: &[u8]) -> Result<Vec<NlMsg<'_>>> {
    let mut msgs = Vec::new();
    // Terminates: each iteration consumes at least NLMSG_HDR_LEN bytes or returns.
    while !buf.is_empty() {
        let (Some(len), Some(ty), Some(flags), Some(seq)) = (
            ne_u32(buf, 0),
            ne_u16(buf, 4),
            ne_u16(buf, 6),
            ne_u32(buf, 8),
        ) else {
            bail!("truncated netlink header ({} bytes left)", buf.len());
        };
        let len = len as usize;
        if len < NLMSG_HDR_LEN {
            bail!("netlink message length {len} is shorter than its header");
        }
        let Some((msg, rest)) = buf.split_at_checked(len) else {
            bail!(
                "netlink message length {len} exceeds the {} bytes left",
                buf.len()
            );
        };
        msgs.push(NlMsg {
            ty,
            flags,
            seq,
            payload: msg.get(NLMSG_HDR_LEN..).unwrap_or_default(),
        });
        buf = skip_padding(rest, len);
    }
    Ok(msgs)
}

/// Splits a run of rtattrs into (type, value) pairs.
fn parse_attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>> {
    let mut attrs = Vec::new();
    // Terminates: each iteration consumes at least RTA_HDR_LEN bytes or returns.
    while !buf.is_empty() {
        let (Some(len), Some(ty)) = (ne_u16(buf, 0), ne_u16(buf, 2)) else {
            bail!(
                "truncated route attribute header ({} bytes left)",
                buf.len()
            );
        };
        let len = usize::from(len);
        if len < RTA_HDR_LEN {
            bail!("route attribute {ty} has length {len}, shorter than its header");
        }
        let Some((attr, rest)) = buf.split_at_checked(len) else {
            bail!(
                "route attribute {ty} has length {len} but only {} bytes are left",
                buf.len()
            );
        };
        attrs.push((
            ty & NLA_TYPE_MASK,
            attr.get(RTA_HDR_LEN..).unwrap_or_default(),
        ));
        buf = skip_padding(rest, len);
    }
    Ok(attrs)
}

/// The output interfaces of an RTA_MULTIPATH value: a run of rtnexthop records, each followed
/// by its own attributes (gateway etc.), which we don't need.
fn parse_multipath(mut buf: &[u8]) -> Result<Vec<u32>> {
    let mut oifs = Vec::new();
    // Terminates: each iteration consumes at least RTNH_LEN bytes or returns.
    while !buf.is_empty() {
        let (Some(len), Some(oif)) = (ne_u16(buf, 0), ne_u32(buf, 4)) else {
            bail!("truncated multipath nexthop ({} bytes left)", buf.len());
        };
        let len = usize::from(len);
        if len < RTNH_LEN {
            bail!("multipath nexthop length {len} is shorter than its header");
        }
        let Some((_, rest)) = buf.split_at_checked(len) else {
            bail!(
                "multipath nexthop length {len} exceeds the {} bytes left",
                buf.len()
            );
        };
        oifs.push(oif);
        buf = skip_padding(rest, len);
    }
    Ok(oifs)
}

#[derive(Debug, PartialEq, Eq)]
struct Route {
    family: u8,
    dst_len: u8,
    /// RTA_TABLE when present, because rtm_table is only 8 bits wide.
    table: u32,
    /// rtm_type: RTN_UNICAST, RTN_LOCAL, ...
    kind: u8,
    oif: Option<u32>,
    nexthop_oifs: Vec<u32>,
}

impl Route {
    fn delivers(&self) -> bool {
        !matches!(
            self.kind,
            RTN_UNREACHABLE | RTN_PROHIBIT | RTN_BLACKHOLE | RTN_THROW
        )
    }

    fn is_main_default(&self) -> bool {
        matches!(i32::from(self.family), libc::AF_INET | libc::AF_INET6)
            && self.dst_len == 0
            && self.table == u32::from(RT_TABLE_MAIN)
            && self.kind == RTN_UNICAST
    }

    fn oifs(&self) -> impl Iterator<Item = u32> + '_ {
        self.oif
            .into_iter()
            .chain(self.nexthop_oifs.iter().copied())
            .filter(|&i| i != 0)
    }
}

/// Decodes the payload of an RTM_NEWROUTE message (rtmsg + attributes).
fn parse_route(payload: &[u8]) -> Result<Route> {
    let Some((hdr, attrs)) = payload.split_at_checked(RTMSG_LEN) else {
        bail!(
            "route message of {} bytes is shorter than rtmsg",
            payload.len()
        );
    };
    let &[
        family,
        dst_len,
        _src_len,
        _tos,
        table,
        _protocol,
        _scope,
        kind,
        ..,
    ] = hdr
    else {
        bail!("short rtmsg");
    };
    let mut route = Route {
        family,
        dst_len,
        table: u32::from(table),
        kind,
        oif: None,
        nexthop_oifs: Vec::new(),
    };
    for (ty, value) in parse_attrs(attrs)? {
        match ty {
            RTA_OIF => route.oif = Some(ne_u32(value, 0).context("short RTA_OIF")?),
            RTA_TABLE => route.table = ne_u32(value, 0).context("short RTA_TABLE")?,
            RTA_MULTIPATH => route.nexthop_oifs = parse_multipath(value)?,
            _ => {}
        }
    }
    Ok(route)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((RTA_HDR_LEN + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    fn nexthop(oif: u32, attrs: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&((RTNH_LEN + attrs.len()) as u16).to_ne_bytes());
        n.extend_from_slice(&[0, 0]); // flags, hops
        n.extend_from_slice(&oif.to_ne_bytes());
        n.extend_from_slice(attrs);
        n
    }

    fn rtmsg(family: u8, dst_len: u8, table: u8, kind: u8) -> Vec<u8> {
        let mut r = vec![family, dst_len, 0, 0, table, 3, 0, kind];
        r.extend_from_slice(&0u32.to_ne_bytes());
        r
    }

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR_LEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
        m
    }

    /// A realistic IPv4 multipath default route in table 1000 (so RTA_TABLE must win).
    fn sample_route() -> Vec<u8> {
        let gw = attr(5 /* RTA_GATEWAY */, &[192, 0, 2, 1]);
        let mut hops = nexthop(7, &gw);
        hops.extend(nexthop(9, &[]));
        let mut p = rtmsg(
            libc::AF_INET as u8,
            0,
            252, /* RT_TABLE_COMPAT */
            RTN_UNICAST,
        );
        p.extend(attr(RTA_TABLE, &1000u32.to_ne_bytes()));
        p.extend(attr(6 /* RTA_PRIORITY */, &100u32.to_ne_bytes()));
        p.extend(attr(RTA_MULTIPATH | 0x8000 /* NLA_F_NESTED */, &hops));
        p
    }

    #[test]
    fn attrs_parse_with_padding_and_flag_bits() {
        let mut buf = attr(RTA_OIF, &3u32.to_ne_bytes());
        buf.extend(attr(RTA_DST, &[10, 0, 0]));
        buf.extend(attr(RTA_MULTIPATH | 0x8000, &[]));
        assert_eq!(
            parse_attrs(&buf).unwrap(),
            vec![
                (RTA_OIF, &3u32.to_ne_bytes()[..]),
                (RTA_DST, &[10, 0, 0][..]),
                (RTA_MULTIPATH, &[][..]),
            ]
        );
        assert!(parse_attrs(&[]).unwrap().is_empty());
        // The last attribute may omit its padding.
        let unpadded = [7, 0, 1, 0, 10, 0, 0];
        assert_eq!(parse_attrs(&unpadded).unwrap(), vec![(1, &[10, 0, 0][..])]);
    }

    #[test]
    fn attrs_reject_malformed() {
        let msg = |buf: &[u8]| parse_attrs(buf).unwrap_err().to_string();
        assert!(msg(&[8, 0]).contains("truncated"));
        assert!(msg(&[2, 0, 1, 0]).contains("shorter than its header"));
        assert!(msg(&[12, 0, 1, 0, 0, 0, 0, 0]).contains("only 8 bytes are left"));
        // A good attribute followed by garbage still fails as a whole.
        let mut buf = attr(RTA_OIF, &1u32.to_ne_bytes());
        buf.extend_from_slice(&[0xff]);
        assert!(parse_attrs(&buf).is_err());
    }

    #[test]
    fn multipath_yields_every_nexthop() {
        let mut hops = nexthop(4, &attr(5, &[192, 0, 2, 1]));
        hops.extend(nexthop(0, &[]));
        hops.extend(nexthop(6, &[]));
        assert_eq!(parse_multipath(&hops).unwrap(), vec![4, 0, 6]);
        assert!(parse_multipath(&[8, 0, 0, 0]).is_err());
        assert!(parse_multipath(&nexthop(4, &[])[..7]).is_err());
        assert!(parse_multipath(&[4, 0, 0, 0, 1, 0, 0, 0]).is_err());
    }

    #[test]
    fn route_decodes_table_type_and_interfaces() {
        let route = parse_route(&sample_route()).unwrap();
        assert_eq!(
            route,
            Route {
                family: libc::AF_INET as u8,
                dst_len: 0,
                table: 1000,
                kind: RTN_UNICAST,
                oif: None,
                nexthop_oifs: vec![7, 9],
            }
        );
        assert!(!route.is_main_default(), "table 1000 is not main");
        assert_eq!(route.oifs().collect::<Vec<_>>(), vec![7, 9]);

        let mut main = rtmsg(libc::AF_INET6 as u8, 0, RT_TABLE_MAIN, RTN_UNICAST);
        main.extend(attr(RTA_OIF, &2u32.to_ne_bytes()));
        let route = parse_route(&main).unwrap();
        assert!(route.is_main_default());
        assert_eq!(route.oifs().collect::<Vec<_>>(), vec![2]);

        let unreachable = parse_route(&rtmsg(10, 128, 254, RTN_UNREACHABLE)).unwrap();
        assert!(!unreachable.delivers() && !unreachable.is_main_default());
        let ipmr = parse_route(&rtmsg(128 /* RTNL_FAMILY_IPMR */, 0, 254, 1)).unwrap();
        assert!(!ipmr.is_main_default());
    }

    #[test]
    fn route_rejects_short_values() {
        assert!(parse_route(&[2, 0, 0]).is_err());
        let mut p = rtmsg(2, 0, 254, 1);
        p.extend(attr(RTA_OIF, &[1, 0]));
        assert!(parse_route(&p).unwrap_err().to_string().contains("RTA_OIF"));
    }

    #[test]
    fn messages_split_and_validate() {
        let mut buf = nlmsg(RTM_NEWROUTE, 2, 7, &[1, 2, 3]);
        buf.extend(nlmsg(NLMSG_DONE, 2, 7, &0i32.to_ne_bytes()));
        let msgs = parse_messages(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            msgs[0],
            NlMsg {
                ty: RTM_NEWROUTE,
                flags: 2,
                seq: 7,
                payload: &[1, 2, 3]
            }
        );
        assert_eq!(msgs[1].ty, NLMSG_DONE);

        assert!(parse_messages(&buf[..10]).is_err());
        let mut short = nlmsg(NLMSG_NOOP, 0, 1, &[]);
        short[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse_messages(&short).is_err());
        let mut long = nlmsg(NLMSG_NOOP, 0, 1, &[]);
        long[..4].copy_from_slice(&17u32.to_ne_bytes());
        assert!(parse_messages(&long).is_err());
    }

    #[test]
    fn parsers_never_panic_on_truncated_or_noisy_input() {
        let good = nlmsg(RTM_NEWROUTE, 2, 1, &sample_route());
        for end in 0..=good.len() {
            if let Ok(msgs) = parse_messages(&good[..end]) {
                for m in msgs {
                    parse_route(m.payload).ok();
                }
            }
            parse_route(&good[NLMSG_HDR_LEN.min(end)..end]).ok();
        }
        // Deterministic pseudo-random corruption of single bytes.
        let mut state = 0x2545_f491_u32;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let mut buf = good.clone();
            let at = state as usize % buf.len();
            buf[at] = (state >> 24) as u8;
            if let Ok(msgs) = parse_messages(&buf) {
                for m in msgs {
                    parse_route(m.payload).ok();
                }
            }
        }
    }

    #[test]
    fn requests_encode_header_rtmsg_and_dst() {
        let v4 = route_request(9, Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))));
        assert_eq!(v4.len(), 16 + 12 + 8);
        let msgs = parse_messages(&v4).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            (msgs[0].ty, msgs[0].flags, msgs[0].seq),
            (RTM_GETROUTE, NLM_F_REQUEST, 9)
        );
        let p = msgs[0].payload;
        assert_eq!((p[0], p[1]), (libc::AF_INET as u8, 32));
        assert_eq!(
            parse_attrs(&p[RTMSG_LEN..]).unwrap(),
            vec![(RTA_DST, &[192, 0, 2, 7][..])]
        );

        let v6 = route_request(10, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(v6.len(), 16 + 12 + 20);
        assert_eq!((v6[16], v6[17]), (libc::AF_INET6 as u8, 128));

        let dump = route_request(11, None);
        let msgs = parse_messages(&dump).unwrap();
        assert_eq!(msgs[0].flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(msgs[0].payload, &[0u8; RTMSG_LEN][..]);
    }

    // --- Live tests: read-only queries against this machine's namespace. ---

    #[test]
    fn live_loopback_routes_to_lo() {
        let lo = ifindex("lo").unwrap();
        assert_eq!(route_oif("127.0.0.1".parse().unwrap()).unwrap(), Some(lo));
        assert_eq!(route_oif("::1".parse().unwrap()).unwrap(), Some(lo));
    }

    #[test]
    fn live_name_index_round_trip() {
        assert_eq!(ifname(ifindex("lo").unwrap()).unwrap(), "lo");
        let err = ifindex("no-such-if0").unwrap_err().to_string();
        assert_eq!(err, "no interface named \"no-such-if0\"");
        for index in [0, u32::MAX] {
            let err = ifname(index).unwrap_err().to_string();
            assert_eq!(err, format!("no interface with index {index}"));
        }
    }

    #[test]
    fn live_default_route_interfaces_is_ok() {
        let names = default_route_interfaces().unwrap();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(names, sorted);
    }

    /// Builds a throwaway topology in a private network namespace. Namespaces are per thread, and
    /// `ip` children inherit the spawning thread's, so nothing outside this thread is touched.
    /// Skips (passes) when namespaces or veth are unavailable.
    #[test]
    fn live_private_netns() {
        std::thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("skipping live_private_netns: unshare(CLONE_NEWNET): {e}");
                return;
            }
            let ip = |args: &str| {
                let out = std::process::Command::new("ip")
                    .args(args.split_whitespace())
                    .output();
                match out {
                    Ok(o) if o.status.success() => Ok(()),
                    Ok(o) => Err(format!(
                        "ip {args}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => Err(format!("ip {args}: {e}")),
                }
            };
            if let Err(e) = ip("link add pfnl0 type veth peer name pfnl1") {
                eprintln!("skipping live_private_netns: {e}");
                return;
            }
            let ip = |args: &str| ip(args).unwrap();
            ip("link set lo up");
            ip("link set pfnl0 up");
            ip("link set pfnl1 up");
            let (lo, p0, p1) = (
                ifindex("lo").unwrap(),
                ifindex("pfnl0").unwrap(),
                ifindex("pfnl1").unwrap(),
            );
            let get = |a: &str| route_oif(a.parse().unwrap()).unwrap();

            assert_eq!(default_route_interfaces().unwrap(), Vec::<String>::new());
            assert_eq!(get("198.51.100.7"), None);
            assert_eq!(get("2001:db8::7"), None);

            ip("addr add 10.77.0.1/24 dev pfnl0");
            ip("route add default dev pfnl0");
            ip("-6 route add default dev pfnl1");
            // Defaults outside the main table must be ignored, including ids above 255.
            ip("route add default dev lo table 100");
            ip("-6 route add default dev lo table 1000");
            assert_eq!(default_route_interfaces().unwrap(), ["pfnl0", "pfnl1"]);
            assert_eq!(get("10.77.0.9"), Some(p0));
            assert_eq!(get("198.51.100.7"), Some(p0));
            assert_eq!(get("2001:db8::7"), Some(p1));
            assert_eq!(get("10.77.0.1"), Some(lo));

            ip("route add unreachable 203.0.113.0/24");
            ip("-6 route add unreachable 2001:db8:1::/48");
            assert_eq!(get("203.0.113.1"), None);
            assert_eq!(get("2001:db8:1::1"), None);

            ip("-6 route del default dev pfnl1");
            ip("route replace default nexthop dev pfnl0 nexthop dev pfnl1");
            assert_eq!(default_route_interfaces().unwrap(), ["pfnl0", "pfnl1"]);
            ip("route del default");
            assert_eq!(default_route_interfaces().unwrap(), Vec::<String>::new());
            ip("-6 route add default nexthop via fe80::1 dev pfnl0 nexthop via fe80::2 dev pfnl1");
            assert_eq!(default_route_interfaces().unwrap(), ["pfnl0", "pfnl1"]);
        })
        .join()
        .expect("live_private_netns failed");
    }
}
