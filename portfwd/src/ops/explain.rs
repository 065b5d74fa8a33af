//! `portfwd explain`: what happens to a connection to one host address and
//! port, gathered from the pinned maps and attachments (without the state
//! lock: it changes nothing and never waits for a running command).
//!
//! The decision mirrors the programs': an exact mapping of the address
//! first, else the wildcard of its family, which serves the host's own
//! addresses (the local addresses map) and, on the socket path, loopback.
//! Loopback addresses are never reachable from outside (the TC programs drop
//! them).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::Result;
use portfwd_common::{BACKEND_PROGRAMS, MappingCounters, SOCK_PROGRAMS};
use serde::Serialize;

use crate::{
    datapath::{self, Flow, PinnedMaps},
    error::Error,
    holder, host, instance,
    model::{Allowlist, Mapping, Protocol, Refuse},
};

/// What `explain` is asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Question {
    pub(crate) protocol: Protocol,
    pub(crate) addr: SocketAddr,
    /// The client's address, if given.
    pub(crate) from: Option<IpAddr>,
}

impl Question {
    /// `HOST:PORT[/PROTO]`, e.g. `127.0.0.1:8080`, `[::1]:53/udp`.
    pub(crate) fn parse(target: &str, from: Option<&str>) -> Result<Self> {
        let (addr, protocol) = match target.rsplit_once('/') {
            Some((addr, proto)) => (addr, proto.parse::<Protocol>()?),
            None => (target, Protocol::Tcp),
        };
        let addr: SocketAddr = addr.parse().map_err(|_| {
            Error::usage(format!(
                "{target:?} is not HOST:PORT[/PROTO] (e.g. 127.0.0.1:8080, [::1]:53/udp)"
            ))
        })?;
        let from = from
            .map(|ip| {
                ip.parse::<IpAddr>()
                    .map_err(|_| Error::usage(format!("--from {ip:?} is not an IP address")))
            })
            .transpose()?;
        Ok(Question {
            protocol,
            addr: SocketAddr::new(addr.ip().to_canonical(), addr.port()),
            from: from.map(|ip| ip.to_canonical()),
        })
    }
}

/// How the matching mapping was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MatchKind {
    /// Published on exactly this address.
    Exact,
    /// Published on `0.0.0.0`/`::`, which serves this (local) address.
    Wildcard,
}

/// The answer.
#[derive(Debug, Serialize)]
pub(crate) struct Explanation {
    pub(crate) question: Question,
    pub(crate) up: bool,
    /// The address is one of the host's (or loopback).
    pub(crate) local_address: bool,
    pub(crate) loopback: bool,
    pub(crate) matched: Option<Matched>,
    /// Host processes are translated (socket programs attached).
    pub(crate) host_path: bool,
    /// Interfaces where external clients are translated.
    pub(crate) uplinks: Vec<String>,
    /// The process that holds the host port, if any.
    pub(crate) port_held_by: Option<String>,
    pub(crate) port_holder_running: bool,
    /// Served for the asked client (or for some client, without `--from`).
    pub(crate) served: bool,
    /// Why not, or what to know: one line each.
    pub(crate) reasons: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Matched {
    pub(crate) how: MatchKind,
    pub(crate) name: String,
    pub(crate) host: SocketAddr,
    pub(crate) container: SocketAddr,
    /// The interface towards the container, if known.
    pub(crate) container_interface: Option<String>,
    /// The reply program is attached there.
    pub(crate) container_interface_attached: bool,
    /// Packets are redirected through it straight into the container's
    /// namespace (`pf_peer_link_bits`), not through the neighbour subsystem.
    pub(crate) container_interface_into_peer: bool,
    pub(crate) counters: Counters,
    /// Its live flows on the TC path.
    pub(crate) flows: Vec<Flow>,
    /// Its source allowlist; None: everyone may connect.
    pub(crate) allow: Option<Allowlist>,
    /// An IPv4 container on an IPv6 host address (NAT46 on the TC path).
    pub(crate) nat46: bool,
    /// For NAT46, the host's IPv4 address the container sees external IPv6
    /// clients come from (None: unknown, they are not translated).
    pub(crate) nat46_source: Option<Ipv4Addr>,
    /// What a client outside the list gets (with `allow`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) refuse: Option<Refuse>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Counters {
    pub(crate) packets_in: u64,
    pub(crate) bytes_in: u64,
    pub(crate) packets_out: u64,
    pub(crate) bytes_out: u64,
    pub(crate) flows: u64,
}

impl From<MappingCounters> for Counters {
    fn from(c: MappingCounters) -> Self {
        Counters {
            packets_in: c.packets_in,
            bytes_in: c.bytes_in,
            packets_out: c.packets_out,
            bytes_out: c.bytes_out,
            flows: c.connections,
        }
    }
}

pub(crate) fn explain(pin_dir: &Path, question: Question) -> Result<Explanation> {
    let ip = question.addr.ip();
    let loopback = ip.is_loopback();
    let on_host = host::local_addresses()?.contains(&ip);
    let local_address = loopback || on_host;
    let mut explanation = Explanation {
        question,
        up: false,
        local_address,
        loopback,
        matched: None,
        host_path: false,
        uplinks: Vec::new(),
        port_held_by: host::port_owner(question.protocol, question.addr.port()),
        port_holder_running: holder::is_running(pin_dir),
        served: false,
        reasons: Vec::new(),
    };
    let Ok(maps) = PinnedMaps::open_unlocked(pin_dir) else {
        explanation.reasons.push(format!(
            "portfwd is not up (nothing pinned under {}): run `portfwd up`",
            pin_dir.display()
        ));
        return Ok(explanation);
    };
    explanation.up = true;
    if ip.is_unspecified() {
        explanation.reasons.push(format!(
            "{ip} is no address a client dials: ask about loopback or one of the host's addresses"
        ));
        return Ok(explanation);
    }
    // The programs serve wildcard mappings on the addresses of their map
    // (with their bits), which the port holder keeps current: that map
    // decides, not the interfaces' addresses right now.
    let known = maps.is_recorded_host_address(ip)?;
    explanation.local_address = loopback || known;
    if on_host != known && !loopback {
        explanation.reasons.push(if on_host {
            format!(
                "{ip} is an address of this host that portfwd has not recorded yet: the port holder records address changes (is it running?)"
            )
        } else {
            format!("{ip} is no longer an address of this host, but portfwd still serves it (the port holder has not caught up)")
        });
    }
    let local_address = explanation.local_address;
    let links = instance::links_dir(pin_dir);
    explanation.host_path = SOCK_PROGRAMS.iter().all(|p| links.join(p.name).exists());
    // Only attachments the kernel still runs (an interface deleted, or
    // recreated under the same name, lost its programs).
    let attached: Vec<datapath::TcLink> = datapath::tc_links(pin_dir)
        .into_iter()
        .filter(|link| link.state == datapath::LinkState::Attached)
        .collect();
    explanation.uplinks = attached
        .iter()
        .filter(|link| link.is_uplink())
        .map(|link| link.ifname.clone())
        .collect();
    let mappings = maps.mappings()?;
    let found = find(&mappings, &question, local_address);
    match found {
        Some((how, mapping)) => {
            explanation.matched = Some(matched(pin_dir, &maps, &attached, how, mapping));
        }
        None => explanation.reasons = nearest_reasons(&mappings, &question, local_address),
    }
    judge(&mut explanation);
    Ok(explanation)
}

/// What explain shows of the mapping that matched: its container's
/// interface (and whether the reply program runs there), counters, flows.
fn matched(
    pin_dir: &Path,
    maps: &PinnedMaps,
    attached: &[datapath::TcLink],
    how: MatchKind,
    mapping: &Mapping,
) -> Matched {
    let container_interface = (mapping.ifindex != 0)
        .then(|| host::netlink::ifname(mapping.ifindex).ok())
        .flatten();
    let link = container_interface.as_ref().and_then(|name| {
        attached.iter().find(|link| {
            &link.ifname == name && link.programs.iter().any(|p| p == BACKEND_PROGRAMS[0].name)
        })
    });
    let container_interface_attached = link.is_some();
    let container_interface_into_peer = link.is_some_and(|link| link.into_peer);
    Matched {
        how,
        name: mapping.name.clone(),
        host: mapping.host,
        container: mapping.container,
        container_interface,
        container_interface_attached,
        container_interface_into_peer,
        counters: maps.counters(mapping).into(),
        flows: datapath::flows(pin_dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|flow| flow.service == mapping.key())
            .collect(),
        allow: mapping.allow.clone(),
        refuse: mapping.allow.as_ref().map(|a| a.refuse),
        nat46: mapping.host.is_ipv6() && mapping.container.is_ipv4(),
        nat46_source: maps.nat46_source(mapping),
    }
}

/// The mapping the programs would pick: the exact entry, else the wildcard
/// of the family when the address is the host's.
fn find<'a>(
    mappings: &'a [Mapping],
    question: &Question,
    local_address: bool,
) -> Option<(MatchKind, &'a Mapping)> {
    let same_port =
        |m: &&Mapping| m.protocol == question.protocol && m.host.port() == question.addr.port();
    let exact = mappings
        .iter()
        .filter(same_port)
        .find(|m| m.host.ip() == question.addr.ip());
    if let Some(m) = exact {
        return Some((MatchKind::Exact, m));
    }
    if !local_address {
        return None;
    }
    mappings
        .iter()
        .filter(same_port)
        .find(|m| m.is_wildcard() && m.host.is_ipv4() == question.addr.is_ipv4())
        .map(|m| (MatchKind::Wildcard, m))
}

/// When nothing matches: the nearest mappings, and why they do not serve.
fn nearest_reasons(mappings: &[Mapping], question: &Question, local_address: bool) -> Vec<String> {
    let port = question.addr.port();
    let mut reasons = vec![format!(
        "no mapping serves {}/{}",
        question.addr, question.protocol
    )];
    if !local_address {
        reasons.push(format!(
            "{} is not an address of this host: wildcard mappings serve only the host's own addresses",
            question.addr.ip()
        ));
    }
    for m in mappings.iter().filter(|m| m.host.port() == port) {
        let why = if m.protocol != question.protocol {
            format!("it is {}, not {}", m.protocol, question.protocol)
        } else if m.host.is_ipv4() != question.addr.is_ipv4() {
            "it is for the other address family".to_owned()
        } else {
            format!("it is published on {} only", m.host.ip())
        };
        reasons.push(format!(
            "nearest: {} {}/{} -> {}: {why}",
            m.name, m.host, m.protocol, m.container
        ));
    }
    reasons
}

/// Whether the asked client (any client, without `--from`) is served, and
/// what stands in the way.
fn judge(e: &mut Explanation) {
    if e.matched.is_none() {
        return;
    }
    let host_client = match e.question.from {
        Some(from) => from.is_loopback() || is_host_address(from),
        None => true,
    };
    let external_client = e.question.from.is_none() || !host_client;
    let mut served = false;
    if host_client {
        if e.host_path {
            served = true;
        } else {
            e.reasons
                .push("host processes are not translated: the socket programs are not attached (run `portfwd up`)".into());
        }
    }
    if external_client {
        if e.loopback {
            e.reasons.push(format!(
                "{} is a loopback address: never reachable from outside this host",
                e.question.addr.ip()
            ));
        } else if e.uplinks.is_empty() {
            e.reasons
                .push("external clients are not translated: no uplink has portfwd's programs (`portfwd attach IF`)".into());
        } else if let Some(m) = e.matched.as_ref().filter(|m| m.nat46) {
            match m.nat46_source {
                Some(source) => {
                    served = true;
                    e.reasons.push(format!(
                        "external IPv6 clients reach the IPv4 container translated (NAT46): it sees them come from {source}"
                    ));
                }
                None => e.reasons.push(
                    "external IPv6 clients are not translated to the IPv4 container: the host has no IPv4 address towards it (`portfwd map` again looks it up)".into(),
                ),
            }
        } else {
            served = true;
        }
    }
    if let Some(allow) = e.matched.as_ref().and_then(|m| m.allow.as_ref()) {
        match e.question.from {
            // A host process is judged by `host`, a client outside by its
            // address (a container's hairpin flow too).
            Some(from) if !allow.allows((!host_client).then_some(from)) => {
                served = false;
                let answer = match (host_client, allow.refuse) {
                    (true, _) => "connect() fails with EPERM",
                    (false, Refuse::Reject) => {
                        "answered as a closed port: TCP reset, ICMP port unreachable"
                    }
                    (false, Refuse::Drop) => "dropped without an answer",
                };
                e.reasons.push(format!(
                    "{from} is not in the mapping's source allowlist ({allow}): refused, {answer}"
                ));
            }
            Some(_) => {}
            None => e
                .reasons
                .push(format!("only the allowlist's clients may connect: {allow}")),
        }
    }
    if let Some(m) = &e.matched
        && m.container_interface.is_some()
        && !m.container_interface_attached
    {
        e.reasons.push(
            "the container's interface lacks the reply program: external replies may not be translated (`portfwd map` again attaches it)".into(),
        );
    }
    e.served = served;
}

fn is_host_address(ip: IpAddr) -> bool {
    host::local_addresses().is_ok_and(|addresses| addresses.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(host: &str, protocol: Protocol) -> Mapping {
        Mapping {
            name: "web".into(),
            protocol,
            host: host.parse().unwrap(),
            container: "10.88.0.5:80".parse().unwrap(),
            ifindex: 0,
            hold: true,
            allow: None,
        }
    }

    fn ask(target: &str) -> Question {
        Question::parse(target, None).unwrap()
    }

    #[test]
    fn questions_parse_with_a_default_protocol_and_reject_nonsense() {
        let q = ask("[::1]:53/udp");
        assert_eq!(q.protocol, Protocol::Udp);
        assert_eq!(q.addr, "[::1]:53".parse().unwrap());
        assert_eq!(ask("127.0.0.1:80").protocol, Protocol::Tcp);
        // An IPv4-mapped address is asked as the IPv4 one.
        assert_eq!(
            ask("[::ffff:10.0.0.1]:80").addr,
            "10.0.0.1:80".parse().unwrap()
        );
        for bad in ["80", "host:80", "127.0.0.1:80/sctp", "1.2.3.4:99999"] {
            assert!(Question::parse(bad, None).is_err(), "{bad}");
        }
        assert!(Question::parse("127.0.0.1:80", Some("nope")).is_err());
    }

    #[test]
    fn exact_mappings_win_and_wildcards_serve_local_addresses_only() {
        let wildcard = mapping("0.0.0.0:8080", Protocol::Tcp);
        let exact = mapping("10.0.0.1:8080", Protocol::Tcp);
        let all = [wildcard.clone(), exact.clone()];
        let (how, m) = find(&all, &ask("10.0.0.1:8080"), true).unwrap();
        assert_eq!((how, m), (MatchKind::Exact, &exact));
        let (how, m) = find(&all, &ask("127.0.0.1:8080"), true).unwrap();
        assert_eq!((how, m), (MatchKind::Wildcard, &wildcard));
        assert!(find(&all, &ask("192.0.2.1:8080"), false).is_none());
        assert!(find(&all, &ask("127.0.0.1:8080/udp"), true).is_none());
        assert!(
            find(&all, &ask("[::1]:8080"), true).is_none(),
            "the v4 wildcard"
        );
    }

    /// An explanation of a served wildcard mapping with `allow`, asked
    /// for a client at `from`.
    fn judged(allow: &[&str], from: &str) -> Explanation {
        let question = Question::parse("10.0.0.1:8080", Some(from)).unwrap();
        let mut e = Explanation {
            question,
            up: true,
            local_address: true,
            loopback: false,
            matched: Some(Matched {
                how: MatchKind::Wildcard,
                name: "web".into(),
                host: "0.0.0.0:8080".parse().unwrap(),
                container: "10.88.0.5:80".parse().unwrap(),
                container_interface: None,
                container_interface_attached: false,
                container_interface_into_peer: false,
                counters: Counters::default(),
                flows: Vec::new(),
                allow: Some(Allowlist::parse(allow).unwrap()),
                nat46: false,
                nat46_source: None,
                refuse: Some(Refuse::Reject),
            }),
            host_path: true,
            uplinks: vec!["eth0".into()],
            port_held_by: None,
            port_holder_running: true,
            served: false,
            reasons: Vec::new(),
        };
        judge(&mut e);
        e
    }

    #[test]
    fn the_allowlist_gives_the_verdict_for_a_client() {
        assert!(judged(&["192.0.2.0/24"], "192.0.2.9").served);
        let refused = judged(&["192.0.2.0/24"], "198.51.100.1");
        assert!(!refused.served);
        assert!(
            refused.reasons.iter().any(|r| r
                .contains("198.51.100.1 is not in the mapping's source allowlist (192.0.2.0/24)")),
            "{:?}",
            refused.reasons
        );
        // A host process (loopback) needs `host`.
        assert!(!judged(&["192.0.2.0/24"], "127.0.0.1").served);
        assert!(judged(&["192.0.2.0/24", "host"], "127.0.0.1").served);
    }

    #[test]
    fn near_misses_say_why() {
        let all = [
            mapping("0.0.0.0:8080", Protocol::Udp),
            mapping("10.0.0.1:9090", Protocol::Tcp),
        ];
        let reasons = nearest_reasons(&all, &ask("127.0.0.1:8080"), true);
        assert!(
            reasons.iter().any(|r| r.contains("it is udp, not tcp")),
            "{reasons:?}"
        );
        let reasons = nearest_reasons(&all, &ask("10.0.0.2:9090"), false);
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("not an address of this host"))
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("published on 10.0.0.1 only"))
        );
    }
}
