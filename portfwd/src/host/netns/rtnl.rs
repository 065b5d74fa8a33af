//! Requests to rtnetlink in one namespace: links, addresses, routes and
//! rules, each acknowledged by the kernel.

use super::*;
use crate::host::netlink::route_socket;

/// A netlink route socket in one namespace.
pub(super) struct Rtnl {
    socket: Socket,
}

impl Rtnl {
    /// In the calling thread's namespace.
    pub(super) fn here() -> Result<Rtnl> {
        let socket = route_socket().context("opening a netlink socket")?;
        Ok(Rtnl { socket })
    }

    /// In `netns`: opened by a thread that entered it and then ends.
    pub(super) fn inside(netns: &Netns) -> Result<Rtnl> {
        let fd = netns.fd.try_clone()?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<Rtnl> {
                    setns(&fd, CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
                    Rtnl::here()
                })
                .join()
                .map_err(|_| anyhow!("the thread entering the namespace panicked"))?
        })
    }

    /// Sends one request and waits for its acknowledgement.
    pub(super) fn request(&self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = 1;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(message));
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut buf = vec![0; 64 * 1024];
        // Bounded: the kernel answers one request with one message.
        for _ in 0..16 {
            let len = self.socket.recv(&mut &mut buf[..], 0)?;
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match reply.payload {
                NetlinkPayload::Error(error) if error.code.is_some() => return Err(error.to_io()),
                NetlinkPayload::Error(_) => return Ok(()),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(_)) => {}
                _ => {}
            }
        }
        Err(io::Error::other("no acknowledgement from netlink"))
    }

    pub(super) fn create(&self, message: RouteNetlinkMessage) -> io::Result<()> {
        self.request(message, NLM_F_CREATE | NLM_F_EXCL)
    }

    pub(super) fn create_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut peer_message = LinkMessage::default();
        peer_message
            .attributes
            .push(LinkAttribute::IfName(peer.to_owned()));
        // The peer is born in the namespace: no moment in the host's, where
        // its name could clash.
        peer_message
            .attributes
            .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        message.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_message))),
        ]));
        self.create(RouteNetlinkMessage::NewLink(message))
    }

    pub(super) fn link_index(&self, name: &str) -> Result<u32> {
        Ok(self.get_link(name)?.header.index)
    }

    /// `ip link show NAME`.
    pub(super) fn get_link(&self, name: &str) -> Result<LinkMessage> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        match self.ask(RouteNetlinkMessage::GetLink(message)) {
            Ok(RouteNetlinkMessage::NewLink(link)) => Ok(link),
            Ok(_) => bail!("no interface {name}"),
            Err(e) => Err(e).with_context(|| format!("looking up {name}")),
        }
    }

    /// The id this namespace gives `netns` (what a link whose peer lives
    /// there reports as its IFLA_LINK_NETNSID); None when it has none.
    pub(super) fn nsid_of(&self, netns: &Netns) -> Result<Option<i32>> {
        let mut message = NsidMessage::default();
        let fd = u32::try_from(netns.fd.as_raw_fd())?;
        message.attributes.push(NsidAttribute::Fd(fd));
        let reply = self
            .ask(RouteNetlinkMessage::GetNsId(message))
            .context("asking for the namespace's id")?;
        let RouteNetlinkMessage::NewNsId(reply) = reply else {
            bail!("netlink answered a namespace id request with something else");
        };
        Ok(reply.attributes.iter().find_map(|a| match a {
            NsidAttribute::Id(id) if *id >= 0 => Some(*id),
            _ => None,
        }))
    }

    /// Sends one request that the kernel answers with one message.
    pub(super) fn ask(&self, message: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = 2;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut buf = vec![0; 64 * 1024];
        let len = self.socket.recv(&mut &mut buf[..], 0)?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        match reply.payload {
            NetlinkPayload::InnerMessage(message) => Ok(message),
            NetlinkPayload::Error(error) if error.code.is_some() => Err(error.to_io()),
            _ => Err(io::Error::other("no answer from netlink")),
        }
    }

    pub(super) fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = family(ip);
        message.header.prefix_len = prefix;
        message.header.index = index;
        message.attributes.push(AddressAttribute::Local(ip));
        message.attributes.push(AddressAttribute::Address(ip));
        // No duplicate address detection: the other end is ours, and the
        // address must serve at once.
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        self.create(RouteNetlinkMessage::NewAddress(message))
            .with_context(|| format!("adding {ip}/{prefix}"))
    }

    pub(super) fn set_up(&self, index: u32) -> Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(message), 0)
            .context("setting the link up")
    }

    /// `ip rule add iif IFNAME prohibit` (both families), after the local
    /// table's rule: what arrives through a way in reaches the host's own
    /// addresses (the replies of the socket path) but is never forwarded,
    /// so a user cannot send packets of any source address out through the
    /// host. (The TC path's replies are redirected before routing.) A rule
    /// that exists is kept: the rule of an earlier way in with this name
    /// (its namespace ended) applies to this one as it is.
    pub(super) fn block_forwarding_from(&self, ifname: &str) -> Result<()> {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let message = forwarding_block_rule(family, ifname);
            match self.create(RouteNetlinkMessage::NewRule(message)) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                other => other.with_context(|| {
                    format!("adding the rule that keeps {ifname} from forwarding")
                })?,
            }
        }
        Ok(())
    }

    /// `ip route add default via GATEWAY dev INDEX table WAY_IN_TABLE`.
    pub(super) fn add_default_route(&self, index: u32, gateway: IpAddr) -> Result<()> {
        let mut message = RouteMessage::default();
        message.header.address_family = family(gateway);
        message.header.table = RouteHeader::RT_TABLE_UNSPEC;
        message.header.protocol = RouteProtocol::Static;
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        message.attributes.push(RouteAttribute::Table(WAY_IN_TABLE));
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        message.attributes.push(RouteAttribute::Oif(index));
        self.create(RouteNetlinkMessage::NewRoute(message))
            .with_context(|| format!("adding the route via {gateway}"))
    }

    /// `ip rule add from SOURCE lookup WAY_IN_TABLE`.
    pub(super) fn add_source_rule(&self, source: IpAddr) -> Result<()> {
        let mut message = RuleMessage::default();
        message.header.family = family(source);
        message.header.src_len = if source.is_ipv4() { 32 } else { 128 };
        message.header.action = RuleAction::ToTable;
        message.attributes.push(RuleAttribute::Source(source));
        message.attributes.push(RuleAttribute::Table(WAY_IN_TABLE));
        message
            .attributes
            .push(RuleAttribute::Priority(WAY_IN_RULE_PRIORITY));
        self.create(RouteNetlinkMessage::NewRule(message))
            .with_context(|| format!("adding the rule from {source}"))
    }
}
