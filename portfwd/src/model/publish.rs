//! Port publications in the docker/nerdctl `-p` grammar:
//! `[[HOSTIP:]HOSTPORTS:]CONTAINERPORTS[/PROTO]`.
//!
//! Parsing is stricter than docker's where docker would guess (an empty host
//! port in `:80`, an unbracketed IPv6 address, surrounding whitespace): what
//! gets forwarded should be exactly what the user meant, or nothing.

use std::{fmt, net::IpAddr, str::FromStr};

use super::protocol::{AUTO_PORTS, PortRange, Protocol};
use crate::error::Error;

/// What the host side of a publication asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPorts {
    /// No host port given: pick free ports automatically (from [`AUTO_PORTS`]).
    Auto,
    /// Host range with the same length as the container range: mapped one to one.
    Each(PortRange),
    /// Host range longer than one port with a single container port: a pool,
    /// the first free port of it is used (docker semantics for `3000-3010:80`).
    Pool(PortRange),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishSpec {
    /// None = every host address, IPv4 and IPv6 (docker semantics of an empty
    /// host IP). `0.0.0.0` and `::` are kept as given (Some) — the caller
    /// decides what an explicit unspecified address means.
    pub host_ip: Option<IpAddr>,
    pub host_ports: HostPorts,
    pub container_ports: PortRange,
    pub protocol: Protocol,
}

impl PublishSpec {
    /// One item per container port, paired with the host ports it may be
    /// bound to: the whole of [`AUTO_PORTS`] for `Auto`, the pool for `Pool`,
    /// and exactly one port for `Each`. Choosing free ports (and not giving
    /// the same automatic port to two container ports) is up to the caller.
    pub fn expand(&self) -> impl Iterator<Item = (PortRange, u16)> + use<> {
        let (host, container) = (self.host_ports, self.container_ports);
        container.iter().map(move |p| {
            let candidates = match host {
                HostPorts::Auto => AUTO_PORTS,
                HostPorts::Each(h) => PortRange::single(h.start + (p - container.start)),
                HostPorts::Pool(h) => h,
            };
            (candidates, p)
        })
    }
}

impl FromStr for PublishSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        parse_publish(s).map_err(|message| Error::Publish {
            input: s.to_owned(),
            message,
        })
    }
}

fn parse_publish(s: &str) -> Result<PublishSpec, String> {
    if s.is_empty() {
        return Err("publish spec is empty".into());
    }
    // Usually a quoting mistake in a shell or config file; trimming would
    // hide it.
    if s.contains(char::is_whitespace) {
        return Err("whitespace is not allowed".into());
    }

    let (body, protocol) = match s.split_once('/') {
        None => (s, Protocol::Tcp),
        Some((body, proto)) => {
            if let Some(i) = proto.find('/') {
                let junk = &proto[i..];
                return Err(format!("unexpected {junk:?} after the protocol"));
            }
            (body, proto.parse().map_err(|e: Error| e.to_string())?)
        }
    };

    let (addr, host, container) = split_body(body)?;
    let host_ip = addr.map(parse_host_ip).transpose()?;
    let container_ports: PortRange = container
        .parse()
        .map_err(|e: Error| format!("container {e}"))?;

    let host_ports = match host {
        None => HostPorts::Auto,
        // `IP::PORT` is the only way to ask for an automatic port on one
        // address; a bare `:PORT` is rejected by the range parser below.
        Some("") if host_ip.is_some() => HostPorts::Auto,
        Some(h) => {
            let h: PortRange = h.parse().map_err(|e: Error| format!("host {e}"))?;
            pair_ranges(h, container_ports)?
        }
    };

    Ok(PublishSpec {
        host_ip,
        host_ports,
        container_ports,
        protocol,
    })
}

/// Splits the part before `/PROTO` into (host address, host ports, container
/// ports), all still text. The host address keeps its brackets.
fn split_body(body: &str) -> Result<(Option<&str>, Option<&str>, &str), String> {
    if body.starts_with('[') {
        // Brackets are what make an IPv6 address separable from the ports,
        // so split at `]` rather than counting colons.
        let Some(close) = body.find(']') else {
            // Best guess at the address: everything before the last two fields.
            let addr = body.rsplitn(3, ':').nth(2).unwrap_or(body);
            return Err(format!("host address {addr:?} has no closing \"]\""));
        };
        let (addr, rest) = body.split_at(close + 1);
        return match rest.strip_prefix(':').and_then(|r| r.split_once(':')) {
            Some((host, container)) => Ok((Some(addr), Some(host), container)),
            None => Err(format!(
                "expected HOSTPORTS:CONTAINERPORTS after host address {addr:?}, found {rest:?}"
            )),
        };
    }
    // The last two fields are ports; whatever precedes them is the address, so
    // an unbracketed IPv6 address comes out whole and can be named in the error.
    let mut fields = body.rsplitn(3, ':');
    let container = fields.next().unwrap_or(body);
    let host = fields.next();
    let addr = fields.next();
    Ok((addr, host, container))
}

fn parse_host_ip(addr: &str) -> Result<IpAddr, String> {
    let not_ip = || format!("host address must be an IP address, not {addr:?}");
    if let Some(inner) = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        // Docker also accepts a bracketed IPv4 address, so we do too.
        return inner.parse().map_err(|_| not_ip());
    }
    if addr.contains(['[', ']']) {
        return Err(format!("host address {addr:?} has mismatched brackets"));
    }
    if addr.is_empty() {
        return Err("host address is empty".into());
    }
    match addr.parse() {
        Ok(IpAddr::V6(_)) => Err(format!(
            "IPv6 host address {addr:?} must be in brackets, as in \"[{addr}]\""
        )),
        Ok(ip) => Ok(ip),
        Err(_) => Err(not_ip()),
    }
}

/// Decides how a host range relates to the container range.
fn pair_ranges(host: PortRange, container: PortRange) -> Result<HostPorts, String> {
    if host.len() == container.len() {
        Ok(HostPorts::Each(host))
    } else if container.is_single() {
        Ok(HostPorts::Pool(host))
    } else if host.is_single() {
        Err(format!(
            "host port {host} is a single port but container range {container} has {} ports",
            container.len()
        ))
    } else {
        Err(format!(
            "host range {host} has {} ports but container range {container} has {}",
            host.len(),
            container.len()
        ))
    }
}

impl fmt::Display for PublishSpec {
    /// Canonical form: the protocol is always written, IPv6 is bracketed, and
    /// an address with an automatic port keeps its empty port field (`IP::80`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            None => {}
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
        }
        match self.host_ports {
            HostPorts::Auto if self.host_ip.is_some() => f.write_str(":")?,
            HostPorts::Auto => {}
            HostPorts::Each(h) | HostPorts::Pool(h) => write!(f, "{h}:")?,
        }
        write!(f, "{}/{}", self.container_ports, self.protocol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    fn spec(
        ip: Option<&str>,
        host_ports: HostPorts,
        container: PortRange,
        protocol: Protocol,
    ) -> PublishSpec {
        PublishSpec {
            host_ip: ip.map(|ip| ip.parse().unwrap()),
            host_ports,
            container_ports: container,
            protocol,
        }
    }

    /// Every valid form of the grammar and what it must parse to.
    fn valid_cases() -> Vec<(&'static str, PublishSpec)> {
        use HostPorts::*;
        use Protocol::*;
        vec![
            ("80", spec(None, Auto, range(80, 80), Tcp)),
            ("80-90", spec(None, Auto, range(80, 90), Tcp)),
            (
                "8080:80",
                spec(None, Each(range(8080, 8080)), range(80, 80), Tcp),
            ),
            (
                "3000:80",
                spec(None, Each(range(3000, 3000)), range(80, 80), Tcp),
            ),
            (
                "127.0.0.1:8080:80",
                spec(
                    Some("127.0.0.1"),
                    Each(range(8080, 8080)),
                    range(80, 80),
                    Tcp,
                ),
            ),
            (
                "[::1]:8080:80",
                spec(Some("::1"), Each(range(8080, 8080)), range(80, 80), Tcp),
            ),
            (
                "[::]:8080:80",
                spec(Some("::"), Each(range(8080, 8080)), range(80, 80), Tcp),
            ),
            (
                "0.0.0.0:8080:80",
                spec(Some("0.0.0.0"), Each(range(8080, 8080)), range(80, 80), Tcp),
            ),
            (
                "127.0.0.1::80",
                spec(Some("127.0.0.1"), Auto, range(80, 80), Tcp),
            ),
            ("[::1]::80", spec(Some("::1"), Auto, range(80, 80), Tcp)),
            (
                "[::1]::80-81/udp",
                spec(Some("::1"), Auto, range(80, 81), Udp),
            ),
            (
                "8000-8010:80-90",
                spec(None, Each(range(8000, 8010)), range(80, 90), Tcp),
            ),
            (
                "1.2.3.4:8000-8001:80-81",
                spec(Some("1.2.3.4"), Each(range(8000, 8001)), range(80, 81), Tcp),
            ),
            (
                "3000-3010:80",
                spec(None, Pool(range(3000, 3010)), range(80, 80), Tcp),
            ),
            (
                "[::1]:3000-3010:80/udp",
                spec(Some("::1"), Pool(range(3000, 3010)), range(80, 80), Udp),
            ),
            ("80/tcp", spec(None, Auto, range(80, 80), Tcp)),
            ("80/udp", spec(None, Auto, range(80, 80), Udp)),
            (
                "8080:80/UDP",
                spec(None, Each(range(8080, 8080)), range(80, 80), Udp),
            ),
            ("80/Tcp", spec(None, Auto, range(80, 80), Tcp)),
            (
                "65535:1",
                spec(None, Each(range(65535, 65535)), range(1, 1), Tcp),
            ),
            ("1-65535", spec(None, Auto, range(1, 65535), Tcp)),
            ("080", spec(None, Auto, range(80, 80), Tcp)),
            (
                "[fe80::1]:53:53/udp",
                spec(Some("fe80::1"), Each(range(53, 53)), range(53, 53), Udp),
            ),
            (
                "[::ffff:1.2.3.4]:80:80",
                spec(
                    Some("::ffff:1.2.3.4"),
                    Each(range(80, 80)),
                    range(80, 80),
                    Tcp,
                ),
            ),
            // Docker accepts a bracketed IPv4 address; it is still IPv4.
            (
                "[127.0.0.1]:80:80",
                spec(Some("127.0.0.1"), Each(range(80, 80)), range(80, 80), Tcp),
            ),
        ]
    }

    #[test]
    fn parses_every_valid_form() {
        for (input, want) in valid_cases() {
            let got: PublishSpec = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn display_round_trips() {
        for (input, want) in valid_cases() {
            let shown = want.to_string();
            let back: PublishSpec = shown
                .parse()
                .unwrap_or_else(|e| panic!("{input} -> {shown}: {e}"));
            assert_eq!(back, want, "{input} -> {shown}");
            // Canonical means displaying again changes nothing.
            assert_eq!(back.to_string(), shown, "{input}");
        }
    }

    #[test]
    fn display_is_canonical() {
        let cases = [
            ("80", "80/tcp"),
            ("80-90/udp", "80-90/udp"),
            ("8080:80", "8080:80/tcp"),
            ("[::1]:8080:80/udp", "[::1]:8080:80/udp"),
            ("127.0.0.1::80", "127.0.0.1::80/tcp"),
            ("[::1]::80", "[::1]::80/tcp"),
            ("[127.0.0.1]:80:80", "127.0.0.1:80:80/tcp"),
            ("[0:0::1]:80:80", "[::1]:80:80/tcp"),
            ("3000-3010:80", "3000-3010:80/tcp"),
            ("080/TCP", "80/tcp"),
        ];
        for (input, want) in cases {
            let spec: PublishSpec = input.parse().unwrap();
            assert_eq!(spec.to_string(), want, "{input}");
        }
    }

    /// Parses `input`, expecting an error, and checks the shape every error
    /// message must have.
    fn error(input: &str) -> String {
        let err = input.parse::<PublishSpec>().expect_err(input);
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("invalid publish {input:?}: ")),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "not one line: {msg}");
        msg
    }

    #[test]
    fn rejects_malformed_input_naming_the_bad_part() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["empty"]),
            ("0", &["port 0 ", "out of range"]),
            ("65536", &["65536", "out of range"]),
            ("99999999999999999999", &["99999999999999999999"]),
            ("8080:65536", &["container port 65536"]),
            ("65536:80", &["host port 65536"]),
            ("0:80", &["host port 0 "]),
            ("http", &["\"http\"", "not a number"]),
            ("80-", &["\"80-\""]),
            ("-80", &["\"-80\""]),
            ("1-2-3", &["\"1-2-3\""]),
            ("+80", &["\"+80\""]),
            ("90-80", &["90-80", "reversed"]),
            ("8080:90-80", &["container port range 90-80"]),
            (":80", &["host port is empty"]),
            ("8080:", &["container port is empty"]),
            ("1.2.3.4:", &["container port is empty"]),
            ("/tcp", &["container port is empty"]),
            (":8080:80", &["host address is empty"]),
            ("::80", &["host address is empty"]),
            ("1.2.3.4::", &["container port is empty"]),
            ("::1:8080:80", &["\"::1\"", "brackets", "[::1]"]),
            ("fe80::1:8080:80", &["\"fe80::1\"", "brackets"]),
            ("1:2:3:4", &["\"1:2\"", "must be an IP address"]),
            ("[::1:8080:80", &["\"[::1\"", "no closing"]),
            ("[::1", &["\"[::1\"", "no closing"]),
            ("::1]:8080:80", &["\"::1]\"", "mismatched brackets"]),
            ("1.2.3.4]:80:80", &["\"1.2.3.4]\"", "mismatched brackets"]),
            ("[::1]8080:80", &["\"[::1]\"", "\"8080:80\""]),
            ("[::1]:80", &["\"[::1]\"", "HOSTPORTS:CONTAINERPORTS"]),
            (
                "[localhost]:80:80",
                &["\"[localhost]\"", "must be an IP address"],
            ),
            (
                "localhost:8080:80",
                &["\"localhost\"", "host address must be an IP address"],
            ),
            (
                "300.1.1.1:80:80",
                &["\"300.1.1.1\"", "must be an IP address"],
            ),
            ("[::1]:x:80", &["host port \"x\""]),
            ("80/sctp", &["sctp is not supported"]),
            ("80/SCTP", &["sctp is not supported"]),
            ("80/foo", &["unknown protocol \"foo\""]),
            ("80/", &["protocol is empty"]),
            ("80/tcp/x", &["\"/x\"", "after the protocol"]),
            ("80 ", &["whitespace"]),
            (" 80", &["whitespace"]),
            ("8080: 80", &["whitespace"]),
            ("80\n", &["whitespace"]),
            (
                "3000-3001:80-82",
                &[
                    "host range 3000-3001 has 2 ports",
                    "container range 80-82 has 3",
                ],
            ),
            (
                "8080:80-90",
                &["host port 8080", "container range 80-90 has 11 ports"],
            ),
            ("8080:80:90:100", &["\"8080:80\"", "must be an IP address"]),
        ];
        for &(input, wanted) in cases {
            let msg = error(input);
            for part in wanted {
                assert!(msg.contains(part), "{input:?}: {msg:?} lacks {part:?}");
            }
        }
    }

    #[test]
    fn error_message_matches_the_documented_example() {
        assert_eq!(
            error("3000-3001:80-82"),
            "invalid publish \"3000-3001:80-82\": host range 3000-3001 has 2 ports but container range 80-82 has 3"
        );
        assert_eq!(
            error("80 \n"),
            "invalid publish \"80 \\n\": whitespace is not allowed"
        );
    }

    #[test]
    fn expand_pairs_each_container_port_with_its_host_candidates() {
        let expand = |s: &str| {
            s.parse::<PublishSpec>()
                .unwrap()
                .expand()
                .collect::<Vec<_>>()
        };
        assert_eq!(expand("80-81"), [(AUTO_PORTS, 80), (AUTO_PORTS, 81)]);
        assert_eq!(
            expand("8000-8002:80-82"),
            [
                (range(8000, 8000), 80),
                (range(8001, 8001), 81),
                (range(8002, 8002), 82)
            ]
        );
        assert_eq!(expand("3000-3010:80"), [(range(3000, 3010), 80)]);
        assert_eq!(expand("127.0.0.1:8080:80"), [(range(8080, 8080), 80)]);
    }

    #[test]
    fn port_range_parses() {
        assert_eq!("80".parse(), Ok(range(80, 80)));
        assert_eq!("8000-8010".parse(), Ok(range(8000, 8010)));
        assert_eq!("1-65535".parse(), Ok(range(1, 65535)));
        assert_eq!("7-7".parse(), Ok(range(7, 7)));
        for bad in [
            "", "0", "65536", "90-80", "a", "1-", "-1", "1-65536", "0-10", "1--2", " 80", "+80",
            "8 0",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?}");
        }
        assert_eq!(
            "0".parse::<PortRange>().unwrap_err().to_string(),
            "port 0 is out of range 1-65535"
        );
        assert_eq!(
            "90-80".parse::<PortRange>().unwrap_err().to_string(),
            "port range 90-80 is reversed"
        );
        assert_eq!(
            "x".parse::<PortRange>().unwrap_err().to_string(),
            "port \"x\" is not a number or a range"
        );
    }

    #[test]
    fn port_range_len_iter_contains() {
        let r = range(8000, 8010);
        assert_eq!(r.len(), 11);
        assert!(!r.is_single() && !r.is_empty());
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            (8000..=8010).collect::<Vec<_>>()
        );
        assert!(r.contains(8000) && r.contains(8010));
        assert!(!r.contains(7999) && !r.contains(8011));

        let one = PortRange::single(80);
        assert_eq!(one, range(80, 80));
        assert_eq!((one.len(), one.is_single()), (1, true));
        assert_eq!(one.iter().collect::<Vec<_>>(), [80]);

        // The full range does not fit a u16 count, and must not overflow.
        assert_eq!(range(1, 65535).len(), 65535);
        assert_eq!(range(65535, 65535).iter().count(), 1);
        assert_eq!(AUTO_PORTS.len(), 11847);
        assert_eq!(range(9, 8).len(), 0);
        assert!(range(9, 8).is_empty());
    }

    #[test]
    fn port_range_display() {
        assert_eq!(range(80, 80).to_string(), "80");
        assert_eq!(range(8000, 8010).to_string(), "8000-8010");
    }

    #[test]
    #[should_panic(expected = "port 0")]
    fn single_rejects_port_zero() {
        PortRange::single(0);
    }

    #[test]
    fn protocol_names_and_numbers() {
        for p in [Protocol::Tcp, Protocol::Udp] {
            assert_eq!(p.to_string(), p.as_str());
            assert_eq!(p.as_str().parse(), Ok(p));
            assert_eq!(Protocol::from_number(p.number()), Some(p));
        }
        assert_eq!((Protocol::Tcp.number(), Protocol::Udp.number()), (6, 17));
        assert_eq!(Protocol::from_number(0), None);
        assert_eq!(Protocol::from_number(132), None); // sctp
        assert_eq!("UDP".parse(), Ok(Protocol::Udp));
        assert_eq!("tCp".parse(), Ok(Protocol::Tcp));
    }

    #[test]
    fn protocol_errors() {
        let err = |s: &str| s.parse::<Protocol>().unwrap_err().to_string();
        assert!(err("sctp").contains("sctp is not supported"));
        assert!(err("Sctp").contains("sctp is not supported"));
        assert!(err("icmp").contains("unknown protocol \"icmp\""));
        assert!(err("").contains("empty"));
    }
}
