//! Property tests of the pure parts: the `-p` grammar (round trips and
//! robustness), the map key/value encoding and `unmap` selectors. No root
//! needed; the case counts are kept modest so that the run stays fast.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use portfwd::model::{HostPorts, Mapping, PortRange, Protocol, PublishSpec, UnmapSelector};
use proptest::prelude::*;

const CASES: u32 = 256;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Regression files would land in the source tree; a failure prints
        // the minimal input, which is what goes into a unit test.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        Just(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        // IPv4-mapped and -compatible forms print with dots inside brackets.
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
    ]
}

fn host_ip() -> impl Strategy<Value = Option<IpAddr>> {
    prop_oneof![1 => Just(None), 3 => ip().prop_map(Some)]
}

/// A valid range of `len` ports (1..=65535 ports, start + len - 1 <= 65535).
fn range_of_len(len: u32) -> impl Strategy<Value = PortRange> {
    let last_start = 65_536 - len;
    (1..=last_start).prop_map(move |start| PortRange {
        start: start as u16,
        end: (start + len - 1) as u16,
    })
}

/// Mostly short ranges (as people write them), sometimes huge ones.
fn range_len() -> impl Strategy<Value = u32> {
    prop_oneof![4 => Just(1u32), 4 => 2u32..=16, 1 => 1u32..=65_535]
}

fn range() -> impl Strategy<Value = PortRange> {
    range_len().prop_flat_map(range_of_len)
}

fn host_and_container_ports() -> impl Strategy<Value = (HostPorts, PortRange)> {
    prop_oneof![
        range().prop_map(|c| (HostPorts::Auto, c)),
        // One to one: the host range has the container range's length.
        range_len()
            .prop_flat_map(|len| (range_of_len(len), range_of_len(len))
                .prop_map(|(h, c)| (HostPorts::Each(h), c))),
        // A pool: several host ports for one container port.
        (2u32..=65_535)
            .prop_flat_map(|len| (range_of_len(len), range_of_len(1))
                .prop_map(|(h, c)| (HostPorts::Pool(h), c))),
    ]
}

fn publish_spec() -> impl Strategy<Value = PublishSpec> {
    (host_ip(), host_and_container_ports(), protocol()).prop_map(
        |(host_ip, (host_ports, container_ports), protocol)| PublishSpec {
            host_ip,
            host_ports,
            container_ports,
            protocol,
        },
    )
}

/// Text made of the grammar's own characters, so that most inputs get deep
/// into the parser rather than failing on the first byte.
fn grammar_soup() -> impl Strategy<Value = String> {
    proptest::string::string_regex(r"[0-9:\-/\[\]\.a-fA-FtcpudsTCPUDS ]{0,40}").unwrap()
}

/// Mutations of valid specs: a character inserted, removed or replaced.
fn mutated_spec() -> impl Strategy<Value = String> {
    (
        publish_spec(),
        any::<prop::sample::Index>(),
        prop::char::any(),
        0..3u8,
    )
        .prop_map(|(spec, at, c, op)| {
            let mut chars: Vec<char> = spec.to_string().chars().collect();
            let i = at.index(chars.len() + 1);
            match op {
                0 => chars.insert(i, c),
                1 if i < chars.len() => {
                    chars.remove(i);
                }
                _ if i < chars.len() => chars[i] = c,
                _ => chars.push(c),
            }
            chars.into_iter().collect()
        })
}

fn any_input() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), grammar_soup(), mutated_spec()]
}

/// Checks what the parser makes of arbitrary text: no panic, a one-line
/// error, or a spec whose canonical form parses back to itself.
fn check_publish_input(s: &str) -> Result<(), TestCaseError> {
    match s.parse::<PublishSpec>() {
        Ok(spec) => {
            let canonical = spec.to_string();
            let reparsed = canonical.parse::<PublishSpec>();
            prop_assert_eq!(reparsed.as_ref(), Ok(&spec), "{:?} -> {:?}", s, canonical);
        }
        Err(e) => {
            let message = e.to_string();
            prop_assert!(!message.chars().any(char::is_control), "{:?}", message);
            prop_assert!(!message.is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn publish_specs_round_trip_through_their_text(spec in publish_spec()) {
        let text = spec.to_string();
        prop_assert_eq!(text.parse::<PublishSpec>(), Ok(spec.clone()), "{}", text);
        // The protocol is always written, so the canonical form is stable.
        prop_assert!(text.ends_with(spec.protocol.as_str()), "{}", text);
    }

    #[test]
    fn any_text_parses_or_fails_on_one_line(s in any_input()) {
        check_publish_input(&s)?;
    }

    #[test]
    fn protocol_case_and_default_do_not_change_the_spec(spec in publish_spec()) {
        let text = spec.to_string();
        let upper = text.to_uppercase();
        prop_assert_eq!(upper.parse::<PublishSpec>(), Ok(spec.clone()), "{}", upper);
        if spec.protocol == Protocol::Tcp {
            let bare = text.strip_suffix("/tcp").unwrap();
            prop_assert_eq!(bare.parse::<PublishSpec>(), Ok(spec.clone()), "{}", bare);
        }
    }

    #[test]
    fn expand_pairs_every_container_port_once(spec in publish_spec()) {
        // Only the cheap part: huge ranges are sampled, not walked.
        let items: Vec<_> = spec.expand().take(64).collect();
        let expected = spec.container_ports.len().min(64) as usize;
        prop_assert_eq!(items.len(), expected);
        for (i, (candidates, port)) in items.into_iter().enumerate() {
            prop_assert_eq!(u32::from(port), u32::from(spec.container_ports.start) + i as u32);
            prop_assert!(!candidates.is_empty());
            if let HostPorts::Each(h) = spec.host_ports {
                prop_assert!(candidates.is_single());
                prop_assert_eq!(u32::from(candidates.start), u32::from(h.start) + i as u32);
            }
        }
    }
}

fn mapping_name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[!-~]{1,64}").unwrap()
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn mapping() -> impl Strategy<Value = Mapping> {
    (
        mapping_name(),
        protocol(),
        socket_addr(),
        socket_addr(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(name, protocol, host, container, ifindex, hold)| Mapping {
            name,
            protocol,
            host,
            container,
            ifindex,
            hold,
            allow: None,
        })
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mappings_round_trip_through_map_entries(m in mapping()) {
        prop_assert_eq!(Mapping::from_entry(&m.key(), &m.value()), Some(m.clone()));
    }

    #[test]
    fn keys_hold_addresses_and_ports_in_network_order(m in mapping()) {
        let key = m.key();
        let bytes = bytemuck::bytes_of(&key);
        let addr = octets(m.host.ip());
        prop_assert!(bytes.starts_with(&addr), "{:?} {:?}", bytes, m.host);
        // The rest of the address words is zero for IPv4.
        prop_assert!(bytes[addr.len()..16].iter().all(|&b| b == 0));
        prop_assert_eq!(&bytes[16..18], &m.host.port().to_be_bytes()[..]);
        prop_assert_eq!(bytes[18], m.protocol.number());
        prop_assert_eq!(bytes[19], if m.host.is_ipv4() { 4 } else { 6 });

        let value = m.value();
        let bytes = bytemuck::bytes_of(&value);
        let addr = octets(m.container.ip());
        prop_assert!(bytes.starts_with(&addr));
        prop_assert_eq!(&bytes[16..18], &m.container.port().to_be_bytes()[..]);
        prop_assert_eq!(value.name_bytes(), m.name.as_bytes());
    }

    #[test]
    fn equal_mappings_have_equal_key_bytes(m in mapping(), other_name in mapping_name()) {
        // The key depends on the published side only: renaming or moving the
        // container keeps the key (a hash map compares keys bytewise).
        let renamed = Mapping {
            name: other_name,
            ifindex: m.ifindex.wrapping_add(1),
            hold: !m.hold,
            ..m.clone()
        };
        let (key, renamed_key) = (m.key(), renamed.key());
        prop_assert_eq!(bytemuck::bytes_of(&key), bytemuck::bytes_of(&renamed_key));
    }
}

fn unmap_selector() -> impl Strategy<Value = UnmapSelector> {
    (host_ip(), range(), protocol()).prop_map(|(host_ip, ports, protocol)| UnmapSelector {
        host_ip,
        ports,
        protocol,
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unmap_selectors_round_trip_through_their_text(sel in unmap_selector()) {
        let text = sel.to_string();
        prop_assert_eq!(text.parse::<UnmapSelector>(), Ok(sel.clone()), "{}", text);
    }

    #[test]
    fn unmap_selector_parser_never_panics(s in any_input()) {
        match s.parse::<UnmapSelector>() {
            Ok(sel) => {
                let text = sel.to_string();
                prop_assert_eq!(text.parse::<UnmapSelector>(), Ok(sel), "{:?}", s);
            }
            Err(e) => prop_assert!(!e.to_string().chars().any(char::is_control), "{:?}", e.to_string()),
        }
    }

    #[test]
    fn selectors_match_the_mappings_they_name(m in mapping()) {
        let sel = UnmapSelector {
            host_ip: Some(m.host.ip()),
            ports: PortRange { start: m.host.port(), end: m.host.port() },
            protocol: m.protocol,
        };
        prop_assert!(sel.matches(&m));
        let any_address = UnmapSelector { host_ip: None, ..sel.clone() };
        prop_assert!(any_address.matches(&m));
        let other_protocol = match m.protocol {
            Protocol::Tcp => Protocol::Udp,
            Protocol::Udp => Protocol::Tcp,
        };
        let other = UnmapSelector { protocol: other_protocol, ..sel };
        prop_assert!(!other.matches(&m));
    }
}

/// Inputs that once looked risky, kept as plain examples.
#[test]
fn tricky_inputs_do_not_panic() {
    for s in [
        "",
        ":",
        "::",
        ":::",
        "[",
        "]",
        "[]",
        "[]:1:1",
        "[::1]",
        "[::1]:",
        "[::1]::",
        "[::1]:1",
        "[[::1]]:1:1",
        "1-",
        "-1",
        "1--2",
        "65535-65535:1",
        "1-65535:1-65535/udp",
        "0:0",
        "99999999999999999999:1",
        "/",
        "1/",
        "1//tcp",
        "1/tcp/",
        "é:1",
        "[é]:1:1",
        "1.2.3.4:::1",
    ] {
        check_publish_input(s).unwrap();
        let _ = s.parse::<UnmapSelector>();
    }
}
