//! Mappings as users see them, their encoding as map entries, and the
//! planning of a `portfwd map` command: which host ports it takes and
//! whether it conflicts with what is already published.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use anyhow::{Result, bail};
use portfwd_common::{Addr, NAME_LEN, ServiceKey, ServiceValue};

use super::{Allowlist, PortRange, Protocol, Refuse};
use crate::error::Error;

/// One published (host address, port, protocol) and its container endpoint.
/// An unspecified host address (`0.0.0.0`, `::`) is the wildcard: every
/// local address of that family.
///
/// Two mappings are equal when they publish the same thing: everything but
/// `ifindex` counts (it is found anew whenever a mapping is installed, and
/// the state file does not keep it). The state file's form is in `files`.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub name: String,
    pub protocol: Protocol,
    pub host: SocketAddr,
    pub container: SocketAddr,
    /// The host interface the kernel routes to the container through, which
    /// the TC path redirects to (0: unknown, the stack routes).
    pub ifindex: u32,
    /// Whether portfwd's holder binds the host port (see `holder`); off
    /// when the runtime holds it.
    pub hold: bool,
    /// The source allowlist (`--allow`); None: everyone may connect.
    pub allow: Option<Allowlist>,
}

impl Mapping {
    /// What equality and order go by: every field but `ifindex`, in the
    /// order the state file's snapshot is sorted by.
    #[allow(clippy::type_complexity)]
    fn identity(
        &self,
    ) -> (
        &str,
        Protocol,
        SocketAddr,
        SocketAddr,
        bool,
        &Option<Allowlist>,
    ) {
        (
            &self.name,
            self.protocol,
            self.host,
            self.container,
            self.hold,
            &self.allow,
        )
    }

    /// What identifies a mapping among those published: its protocol and
    /// host address (the services map's key; two never share one).
    pub(crate) fn host_key(&self) -> (Protocol, SocketAddr) {
        (self.protocol, self.host)
    }
}

impl PartialEq for Mapping {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for Mapping {}

impl PartialOrd for Mapping {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Mapping {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.identity().cmp(&other.identity())
    }
}

impl std::hash::Hash for Mapping {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity().hash(state);
    }
}

/// The services map's key of a mapping of `protocol` on `host`.
pub(crate) fn service_key(protocol: Protocol, host: SocketAddr) -> ServiceKey {
    let (family, addr) = Addr::from_ip(host.ip());
    ServiceKey::new(family, addr, host.port().to_be(), protocol.number())
}

impl Mapping {
    pub fn key(&self) -> ServiceKey {
        service_key(self.protocol, self.host)
    }

    pub fn value(&self) -> ServiceValue {
        let (family, addr) = Addr::from_ip(self.container.ip());
        let mut value = ServiceValue::new(
            family,
            addr,
            self.container.port().to_be(),
            self.name.as_bytes(),
        );
        value.ifindex = self.ifindex;
        if !self.hold {
            value.flags |= portfwd_common::SERVICE_FLAG_NO_HOLD;
        }
        if let Some(allow) = &self.allow {
            value.flags |= portfwd_common::SERVICE_FLAG_HAS_ALLOWLIST;
            if allow.host {
                value.flags |= portfwd_common::SERVICE_FLAG_HOST_ALLOWED;
            }
            if allow.refuse == Refuse::Drop {
                value.flags |= portfwd_common::SERVICE_FLAG_REFUSE_SILENTLY;
            }
        }
        value
    }

    /// Decodes a map entry; None for an entry this build does not understand.
    /// An allowlist comes back without its networks (they are in another
    /// map: see `datapath`).
    pub fn from_entry(key: &ServiceKey, value: &ServiceValue) -> Option<Self> {
        let protocol = Protocol::from_number(key.proto)?;
        let host = SocketAddr::new(key.addr.to_ip(key.family)?, u16::from_be(key.port));
        let container = SocketAddr::new(value.addr.to_ip(value.family)?, u16::from_be(value.port));
        let name = String::from_utf8_lossy(value.name_bytes()).into_owned();
        Some(Mapping {
            name,
            protocol,
            host,
            container,
            ifindex: value.ifindex,
            hold: value.flags & portfwd_common::SERVICE_FLAG_NO_HOLD == 0,
            allow: (value.flags & portfwd_common::SERVICE_FLAG_HAS_ALLOWLIST != 0).then(|| {
                Allowlist {
                    host: value.flags & portfwd_common::SERVICE_FLAG_HOST_ALLOWED != 0,
                    networks: Vec::new(),
                    refuse: if value.flags & portfwd_common::SERVICE_FLAG_REFUSE_SILENTLY != 0 {
                        Refuse::Drop
                    } else {
                        Refuse::Reject
                    },
                }
            }),
        })
    }

    pub fn is_wildcard(&self) -> bool {
        self.host.ip().is_unspecified()
    }

    /// Two mappings cannot serve the same connection: same protocol, port and
    /// family, and the same address or a wildcard on either side (as in
    /// docker, `0.0.0.0:80` and `127.0.0.1:80` conflict).
    pub fn conflicts_with(&self, other: &Mapping) -> bool {
        self.protocol == other.protocol
            && self.host.port() == other.host.port()
            && self.host.is_ipv4() == other.host.is_ipv4()
            && (self.host.ip() == other.host.ip() || self.is_wildcard() || other.is_wildcard())
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{} -> {}",
            self.name, self.host, self.protocol, self.container
        )
    }
}

/// Checks a mapping name: it is stored in a fixed-size field of the map.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > NAME_LEN {
        bail!(Error::usage(format!(
            "invalid name {name:?}: it must be 1 to {NAME_LEN} bytes long"
        )));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        bail!(Error::usage(format!(
            "invalid name {name:?}: no spaces or control characters"
        )));
    }
    // The rootless service removes such mappings when their namespace
    // ends: one of root's must never look like them.
    if super::rootless::is_rootless_name(name) {
        bail!(Error::usage(format!(
            "invalid name {name:?}: names u<UID>.NAME are the rootless service's (portfwd map --netns)"
        )));
    }
    Ok(())
}

/// Checks the container address given to `portfwd map`.
pub(crate) fn check_container_ip(ip: IpAddr) -> Result<()> {
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        bail!(Error::usage(format!(
            "invalid container address {ip}: it must be a unicast address"
        )));
    }
    Ok(())
}

/// The host ports a `portfwd unmap` argument names: `[HOSTIP:]PORT[-END][/PROTO]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmapSelector {
    pub host_ip: Option<IpAddr>,
    pub ports: PortRange,
    pub protocol: Protocol,
}

impl UnmapSelector {
    pub fn matches(&self, m: &Mapping) -> bool {
        m.protocol == self.protocol
            && self.ports.contains(m.host.port())
            && self.host_ip.is_none_or(|ip| ip == m.host.ip())
    }
}

impl fmt::Display for UnmapSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(ip) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(f, "{}/{}", self.ports, self.protocol)
    }
}

impl std::str::FromStr for UnmapSelector {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::usage(format!("invalid host port {text:?}: {why}"));
        let (rest, protocol) = match text.rsplit_once('/') {
            Some((rest, proto)) => (rest, proto.parse().map_err(|e| bad(&format!("{e}")))?),
            None => (text, Protocol::Tcp),
        };
        let (host_ip, ports) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (ip, ports) = bracketed
                .split_once("]:")
                .ok_or_else(|| bad("expected [IPv6]:PORT"))?;
            let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad("bad IPv6 address"))?;
            (Some(IpAddr::V6(ip)), ports)
        } else if let Some((ip, ports)) = rest.rsplit_once(':') {
            let ip: Ipv4Addr = ip
                .parse()
                .map_err(|_| bad("bad IPv4 address (IPv6 goes in brackets)"))?;
            (Some(IpAddr::V4(ip)), ports)
        } else {
            (None, rest)
        };
        let ports = ports.parse().map_err(|e| bad(&format!("{e}")))?;
        Ok(UnmapSelector {
            host_ip,
            ports,
            protocol,
        })
    }
}

#[cfg(test)]
impl Mapping {
    /// The tests' mapping: `web`, TCP `0.0.0.0:port` to `10.0.0.2:80`.
    pub(crate) fn sample(port: u16) -> Mapping {
        Mapping {
            name: "web".into(),
            protocol: Protocol::Tcp,
            host: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
            container: "10.0.0.2:80".parse().unwrap(),
            ifindex: 0,
            hold: true,
            allow: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::model::{AUTO_PORTS, PublishSpec, plan};

    fn spec(text: &str) -> PublishSpec {
        text.parse().unwrap()
    }

    fn hosts(mappings: &[Mapping]) -> Vec<String> {
        mappings
            .iter()
            .map(|m| format!("{}/{}", m.host, m.protocol))
            .collect()
    }

    const CTR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7));

    #[test]
    fn key_and_value_round_trip() {
        for (host, container) in [
            ("0.0.0.0:8080", "10.0.0.2:80"),
            ("127.0.0.1:65535", "10.0.0.2:1"),
            ("[::]:443", "10.0.0.2:8443"),
            ("[::1]:53", "[fd00::2]:5353"),
        ] {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let m = Mapping {
                    name: "web".into(),
                    protocol,
                    host: host.parse().unwrap(),
                    container: container.parse().unwrap(),
                    ifindex: 7,
                    hold: protocol == Protocol::Tcp,
                    allow: None,
                };
                let back = Mapping::from_entry(&m.key(), &m.value()).unwrap();
                assert_eq!((&back, back.ifindex), (&m, m.ifindex));
            }
        }
    }

    #[test]
    fn key_bytes_are_network_order() {
        let m = Mapping {
            name: "x".into(),
            protocol: Protocol::Udp,
            host: "10.1.2.3:8080".parse().unwrap(),
            container: "10.0.0.2:80".parse().unwrap(),
            ifindex: 0,
            hold: true,
            allow: None,
        };
        let key = m.key();
        let bytes: &[u8] = bytemuck::bytes_of(&key);
        assert_eq!(&bytes[..4], &[10, 1, 2, 3]);
        assert_eq!(&bytes[16..20], &[0x1f, 0x90, 17, portfwd_common::FAMILY_V4]);
    }

    #[test]
    fn omitted_host_ip_publishes_both_families_on_one_port() {
        let planned = plan("web", CTR, &[spec("8080:80")], &[], |_, _| false).unwrap();
        assert_eq!(hosts(&planned), ["0.0.0.0:8080/tcp", "[::]:8080/tcp"]);
        let v6 = IpAddr::V6("fd00::2".parse().unwrap());
        let planned = plan("web", v6, &[spec("8080:80")], &[], |_, _| false).unwrap();
        assert_eq!(hosts(&planned), ["[::]:8080/tcp"]);
    }

    #[test]
    fn ranges_map_one_to_one() {
        let planned = plan(
            "r",
            CTR,
            &[spec("127.0.0.1:8000-8002:80-82/udp")],
            &[],
            |_, _| false,
        )
        .unwrap();
        let pairs: Vec<(u16, u16)> = planned
            .iter()
            .map(|m| (m.host.port(), m.container.port()))
            .collect();
        assert_eq!(pairs, [(8000, 80), (8001, 81), (8002, 82)]);
    }

    #[test]
    fn automatic_ports_skip_used_and_published_ports() {
        let existing = plan("old", CTR, &[spec("49153:80")], &[], |_, _| false).unwrap();
        let in_use = |_: Protocol, port: u16| port == 49154;
        let planned = plan("new", CTR, &[spec("80"), spec("81")], &existing, in_use).unwrap();
        assert_eq!(
            hosts(&planned),
            [
                "0.0.0.0:49155/tcp",
                "[::]:49155/tcp",
                "0.0.0.0:49156/tcp",
                "[::]:49156/tcp"
            ]
        );
    }

    /// Counts the questions `plan` asks about host sockets.
    fn counting(
        busy: impl Fn(u16) -> bool,
    ) -> (Cell<usize>, impl Fn(&Cell<usize>, Protocol, u16) -> bool) {
        (
            Cell::new(0),
            move |asked: &Cell<usize>, _: Protocol, port: u16| {
                asked.set(asked.get() + 1);
                busy(port)
            },
        )
    }

    #[test]
    fn more_automatic_ports_than_the_range_holds_fail_before_any_search() {
        let (asked, in_use) = counting(|_| false);
        let in_use = |p, port| in_use(&asked, p, port);
        // 49153-61000 is 11,848 container ports; the automatic range has 11,847.
        let err = plan("x", CTR, &[spec("49153-61000")], &[], in_use).unwrap_err();
        let msg = err.to_string();
        assert!(
            err.downcast_ref::<Error>().is_some(),
            "a usage error: {msg}"
        );
        assert!(msg.contains("11848") && msg.contains("11847"), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
        // A pool asked for more ports (over several specs) than it has.
        let err = plan(
            "x",
            CTR,
            &[
                spec("3000-3001:80"),
                spec("3000-3001:81"),
                spec("3000-3001:82"),
            ],
            &[],
            in_use,
        )
        .unwrap_err();
        assert!(err.to_string().contains("3000-3001"), "{err}");
        assert_eq!(asked.get(), 0, "no port was worth looking at");
    }

    #[test]
    fn a_full_range_fails_after_one_pass_over_it() {
        let existing = plan("old", CTR, &[spec("3000-3009:80-89")], &[], |_, _| false).unwrap();
        let (asked, in_use) = counting(|_| false);
        let in_use = |p, port| in_use(&asked, p, port);
        let err = plan("new", CTR, &[spec("3000-3009:80")], &existing, in_use).unwrap_err();
        assert!(
            err.to_string().contains("no free host port in 3000-3009"),
            "{err}"
        );
        // Every automatic port published already (both families).
        let full = plan(
            "old",
            CTR,
            &[spec("49153-60999:49153-60999")],
            &[],
            |_, _| false,
        )
        .unwrap();
        assert_eq!(full.len(), 2 * AUTO_PORTS.len() as usize);
        let err = plan("new", CTR, &[spec("80"), spec("81")], &full, in_use).unwrap_err();
        assert!(err.to_string().contains("no free host port"), "{err}");
        assert_eq!(asked.get(), 0, "published ports need no socket check");
    }

    #[test]
    fn automatic_ports_are_searched_in_one_pass_not_once_per_port() {
        // Every third port is held by a host socket.
        let (asked, in_use) = counting(|port| port % 3 == 0);
        let in_use = |p, port| in_use(&asked, p, port);
        let wanted = 300;
        let planned = plan("many", CTR, &[spec("1-300/udp")], &[], in_use).unwrap();
        assert_eq!(planned.len(), 2 * wanted);
        let ports: std::collections::BTreeSet<u16> =
            planned.iter().map(|m| m.host.port()).collect();
        assert_eq!(ports.len(), wanted, "one host port per container port");
        assert!(ports.iter().all(|p| p % 3 != 0 && AUTO_PORTS.contains(*p)));
        // Each candidate is looked at once: about 1.5 per port taken, where
        // a search from the start for every port asks ~port^2/2 times.
        assert!(
            asked.get() <= wanted * 3 / 2 + 2,
            "asked {} times",
            asked.get()
        );
    }

    #[test]
    fn ten_thousand_automatic_ports_are_planned() {
        let existing = plan("old", CTR, &[spec("49153-49200:80-127")], &[], |_, _| false).unwrap();
        let planned = plan("many", CTR, &[spec("1-10000")], &existing, |_, _| false).unwrap();
        let ports: std::collections::BTreeSet<u16> =
            planned.iter().map(|m| m.host.port()).collect();
        assert_eq!(ports.len(), 10_000);
        assert_eq!(ports.first(), Some(&49201));
    }

    #[test]
    fn pool_takes_first_free_port() {
        let existing = plan("old", CTR, &[spec("127.0.0.1:3000:80")], &[], |_, _| false).unwrap();
        let planned = plan("new", CTR, &[spec("3000-3010:80")], &existing, |_, _| false).unwrap();
        assert_eq!(hosts(&planned), ["0.0.0.0:3001/tcp", "[::]:3001/tcp"]);
        let err = plan("new", CTR, &[spec("3000-3000:80")], &existing, |_, _| false);
        assert!(err.is_err());
    }

    #[test]
    fn wildcard_and_specific_address_conflict_like_docker() {
        let existing = plan("old", CTR, &[spec("8080:80")], &[], |_, _| false).unwrap();
        let err = plan(
            "new",
            CTR,
            &[spec("127.0.0.1:8080:80")],
            &existing,
            |_, _| false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("already published by \"old\""),
            "{err}"
        );
        // Another protocol or port does not conflict.
        assert!(
            plan(
                "new",
                CTR,
                &[spec("127.0.0.1:8080:80/udp")],
                &existing,
                |_, _| false
            )
            .is_ok()
        );
        assert!(
            plan(
                "new",
                CTR,
                &[spec("127.0.0.1:8081:80")],
                &existing,
                |_, _| false
            )
            .is_ok()
        );
        // Two specific addresses of one family do not conflict.
        let specific = plan("a", CTR, &[spec("127.0.0.1:9000:80")], &[], |_, _| false).unwrap();
        assert!(
            plan("b", CTR, &[spec("127.0.0.2:9000:80")], &specific, |_, _| {
                false
            })
            .is_ok()
        );
    }

    #[test]
    fn conflicts_inside_one_command_are_caught() {
        let err = plan(
            "x",
            CTR,
            &[spec("8080:80"), spec("8080:81")],
            &[],
            |_, _| false,
        );
        assert!(err.is_err());
    }

    #[test]
    fn ipv4_host_cannot_forward_to_ipv6_container() {
        let v6 = IpAddr::V6("fd00::2".parse().unwrap());
        let err = plan("x", v6, &[spec("127.0.0.1:8080:80")], &[], |_, _| false).unwrap_err();
        assert!(err.downcast_ref::<Error>().is_some());
    }

    #[test]
    fn unmap_selectors() {
        let s: UnmapSelector = "8080".parse().unwrap();
        assert_eq!(
            (s.host_ip, s.ports.start, s.ports.end, s.protocol),
            (None, 8080, 8080, Protocol::Tcp)
        );
        let s: UnmapSelector = "127.0.0.1:8000-8010/udp".parse().unwrap();
        assert_eq!(s.to_string(), "127.0.0.1:8000-8010/udp");
        let s: UnmapSelector = "[::1]:53/udp".parse().unwrap();
        assert_eq!(s.to_string(), "[::1]:53/udp");
        for bad in [
            "", "0", "70000", "x:80", "::1:80", "[::1]80", "80/sctp", "90-80", "80/",
        ] {
            assert!(bad.parse::<UnmapSelector>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("web-1").is_ok());
        assert!(check_name(&"a".repeat(64)).is_ok());
        assert!(check_name(&"a".repeat(65)).is_err());
        assert!(check_name("").is_err());
        assert!(check_name("two words").is_err());
        assert!(check_name("u1000.web").is_err());
        assert!(check_name("u.web").is_ok() && check_name("user.web").is_ok());
        assert!(check_container_ip("0.0.0.0".parse().unwrap()).is_err());
        assert!(check_container_ip("ff02::1".parse().unwrap()).is_err());
    }
}
