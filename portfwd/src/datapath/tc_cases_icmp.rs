//! `BPF_PROG_TEST_RUN` cases for ICMP errors about translated flows (`icmp`
//! in the eBPF crate): an error arriving on an uplink about a reply the
//! host sent goes to the container in its view; an error the container
//! sends about a client's packet goes to the client in the host's view.
//! The expected frames are built by `etherparse` (every checksum its own),
//! except the quoted TCP/UDP checksum, which the translation leaves as it
//! was (nobody checks it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use portfwd_common::{Stat, TRANSLATED_MARK};

use super::tc_fixture::{
    BACKEND_IN, CLIENT_V4, CLIENT_V6, CTR_V4, CTR_V6, DROP, Failures, HOST_MAC, HOST_V4, HOST_V6,
    L4, NEXT, OTHER_CTR_V4, REDIRECT, TO_STACK, Tc, UPLINK_IN, UPLINK_OUT, at, frame, icmp,
    mapping,
};
use crate::model::{Mapping, Protocol};

const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 5, 1);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 5, 0, 0, 0, 0, 1);
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 5];

/// An ICMP error frame from `from` to `to` (from a router's MAC to the
/// host's): IPv4 `kind`/`code` with `rest` (bytes 5-8), or the IPv6 one,
/// quoting `quoted`.
fn error(from: IpAddr, to: IpAddr, kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    icmp((ROUTER_MAC, HOST_MAC), from, to, (kind, code, rest), quoted)
}

/// The IP packet of `tc_cases::frame(src, dst, l4)` as an error quotes it,
/// with the TCP/UDP checksum of `checksum_of`'s (the translation leaves
/// the quoted one as it was).
fn quoted(src: SocketAddr, dst: SocketAddr, l4: L4, checksum_of: Option<&[u8]>) -> Vec<u8> {
    let mut packet = frame(src, dst, l4)[14..].to_vec();
    if let Some(original) = checksum_of {
        let l4_off = if src.is_ipv4() { 20 } else { 40 };
        let csum_off = l4_off + if matches!(l4, L4::Udp) { 6 } else { 16 };
        packet[csum_off..csum_off + 2].copy_from_slice(&original[csum_off..csum_off + 2]);
    }
    packet
}

/// `packet` (IPv6) as a fragment of its datagram: a Fragment header after
/// the fixed header, of offset `offset` (in 8-byte units) with more to
/// come.
fn as_ipv6_fragment(packet: &[u8], offset: u16) -> Vec<u8> {
    const FRAGMENT: u8 = 44;
    let (fixed, rest) = packet.split_at(40);
    let mut fixed = fixed.to_vec();
    let payload_len = u16::from_be_bytes([fixed[4], fixed[5]]) + 8;
    fixed[4..6].copy_from_slice(&payload_len.to_be_bytes());
    let next = std::mem::replace(&mut fixed[6], FRAGMENT);
    let offset_and_more = (offset << 3) | 1;
    let [high, low] = offset_and_more.to_be_bytes();
    let header = [next, 0, high, low, 0, 0, 0x12, 0x34];
    [&fixed[..], &header, rest].concat()
}

/// TCP 8080 -> 80 on both families, UDP 5353 -> 53 on IPv4; interface 0.
fn mappings() -> [Mapping; 3] {
    [
        mapping(Protocol::Tcp, at(HOST_V4, 8080), at(CTR_V4, 80)),
        mapping(Protocol::Udp, at(HOST_V4, 5353), at(CTR_V4, 53)),
        mapping(Protocol::Tcp, at(HOST_V6, 8080), at(CTR_V6, 80)),
    ]
}

/// One flow of each of `mappings()`: TCP from the client on both families,
/// UDP on IPv4, as (IPv4 TCP, IPv6 TCP, IPv4 UDP) triples.
struct Flows {
    client: (SocketAddr, SocketAddr, SocketAddr),
    published: (SocketAddr, SocketAddr, SocketAddr),
    container: (SocketAddr, SocketAddr, SocketAddr),
}

impl Flows {
    /// Opens the flows from client ports `port`, `port + 1` and `port + 2`
    /// (mappings of interface 0: their first packets go to the stack).
    fn open(tc: &Tc, port: u16) -> Self {
        Self::open_with(tc, port, TO_STACK)
    }

    /// `open`, each first packet's verdict `verdict`.
    fn open_with(tc: &Tc, port: u16, verdict: u32) -> Self {
        let flows = Self {
            client: (
                at(CLIENT_V4, port),
                at(CLIENT_V6, port + 1),
                at(CLIENT_V4, port + 2),
            ),
            published: (at(HOST_V4, 8080), at(HOST_V6, 8080), at(HOST_V4, 5353)),
            container: (at(CTR_V4, 80), at(CTR_V6, 80), at(CTR_V4, 53)),
        };
        for (client, published, l4) in [
            (flows.client.0, flows.published.0, L4::Syn),
            (flows.client.1, flows.published.1, L4::Syn),
            (flows.client.2, flows.published.2, L4::Udp),
        ] {
            let (got, _) = tc.run(UPLINK_IN, &frame(client, published, l4));
            assert_eq!(got, verdict, "the flow from {client}");
        }
        flows
    }
}

#[test]
fn icmp_errors_of_translated_flows_are_translated_both_ways() {
    let Some(mut tc) = Tc::load("icmp_errors_of_translated_flows_are_translated_both_ways") else {
        return;
    };
    tc.publish(&mappings());
    let mut failures = Failures::default();
    let mut check = |name: &str, program: &str, input: Vec<u8>, verdict: u32, expected: Vec<u8>| {
        let before = tc.stat(Stat::IcmpErrorTranslated);
        let (got, out, mark) = tc.run_marked(program, &input, 0);
        failures.check(name, (got, out), verdict, &expected);
        let translated = verdict != NEXT;
        if tc.stat(Stat::IcmpErrorTranslated) != before + u64::from(translated) {
            failures.note(format!("{name}: icmp_errors_translated not counted right"));
        }
        if verdict == REDIRECT && mark != TRANSLATED_MARK {
            failures.note(format!("{name}: redirected to the client without the mark"));
        }
    };

    let Flows {
        client: (client4, client6, udp_client),
        published: (published4, published6, published_udp),
        container: (ctr4, ctr6, ctr_udp),
    } = Flows::open(&tc, 40201);

    // A router on the client's way cannot forward the host's reply
    // (fragmentation needed, next-hop MTU 1280): to the container, about
    // its own packet.
    let reply = quoted(published4, client4, L4::Ack, None);
    check(
        "fragmentation needed about a reply",
        UPLINK_IN,
        error(ROUTER_V4.into(), HOST_V4.into(), 3, 4, [0, 0, 5, 0], &reply),
        TO_STACK,
        error(
            ROUTER_V4.into(),
            CTR_V4.into(),
            3,
            4,
            [0, 0, 5, 0],
            &quoted(ctr4, client4, L4::Ack, Some(&reply)),
        ),
    );
    let reply6 = quoted(published6, client6, L4::Ack, None);
    let mtu = 1280u32.to_be_bytes();
    check(
        "packet too big about an IPv6 reply",
        UPLINK_IN,
        error(ROUTER_V6.into(), HOST_V6.into(), 2, 0, mtu, &reply6),
        TO_STACK,
        error(
            ROUTER_V6.into(),
            CTR_V6.into(),
            2,
            0,
            mtu,
            &quoted(ctr6, client6, L4::Ack, Some(&reply6)),
        ),
    );
    // The reply's first fragment (a sender fragments large UDP replies):
    // translated, its Fragment header kept. A later fragment quotes no
    // ports: not ours.
    let first_fragment = as_ipv6_fragment(&reply6, 0);
    check(
        "packet too big about an IPv6 reply's first fragment",
        UPLINK_IN,
        error(ROUTER_V6.into(), HOST_V6.into(), 2, 0, mtu, &first_fragment),
        TO_STACK,
        error(
            ROUTER_V6.into(),
            CTR_V6.into(),
            2,
            0,
            mtu,
            &as_ipv6_fragment(&quoted(ctr6, client6, L4::Ack, Some(&reply6)), 0),
        ),
    );
    let later_fragment = error(
        ROUTER_V6.into(),
        HOST_V6.into(),
        2,
        0,
        mtu,
        &as_ipv6_fragment(&reply6, 185),
    );
    check(
        "packet too big about an IPv6 reply's later fragment",
        UPLINK_IN,
        later_fragment.clone(),
        NEXT,
        later_fragment,
    );
    check(
        "time exceeded about an IPv6 reply",
        UPLINK_IN,
        error(ROUTER_V6.into(), HOST_V6.into(), 3, 0, [0; 4], &reply6),
        TO_STACK,
        error(
            ROUTER_V6.into(),
            CTR_V6.into(),
            3,
            0,
            [0; 4],
            &quoted(ctr6, client6, L4::Ack, Some(&reply6)),
        ),
    );

    // The container has nothing on the port any more (port unreachable):
    // to the client, from the published address. Redirected back where the
    // flow came from, marked.
    let request = quoted(udp_client, ctr_udp, L4::Udp, None);
    check(
        "port unreachable from the container",
        BACKEND_IN,
        error(CTR_V4.into(), CLIENT_V4.into(), 3, 3, [0; 4], &request),
        REDIRECT,
        error(
            HOST_V4.into(),
            CLIENT_V4.into(),
            3,
            3,
            [0; 4],
            &quoted(udp_client, published_udp, L4::Udp, Some(&request)),
        ),
    );

    // About a flow nobody translated: not ours.
    let unknown = error(
        ROUTER_V4.into(),
        HOST_V4.into(),
        3,
        4,
        [0, 0, 5, 0],
        &quoted(published4, at(CLIENT_V4, 40299), L4::Ack, None),
    );
    check(
        "an error about an unknown flow",
        UPLINK_IN,
        unknown.clone(),
        NEXT,
        unknown,
    );
    failures.assert_none();
}

/// ICMP errors the host's own stack sends about a client's translated
/// packet (the container's address unreachable, a TTL run out in the
/// forwarding path) leave through the uplink quoting `client ->
/// container:p`; the client's kernel would match them to no socket. At
/// the uplink's egress they are translated to quote `client ->
/// published:P` and go on (from the host's own address: it sent them).
#[test]
fn errors_the_host_sends_about_translated_packets_are_translated_at_uplink_egress() {
    let test = "errors_the_host_sends_about_translated_packets_are_translated_at_uplink_egress";
    let Some(tc) = Tc::load_with(test, &mappings()) else {
        return;
    };
    let Flows {
        client: (client4, client6, udp_client),
        published: (published4, published6, published_udp),
        container: (ctr4, ctr6, ctr_udp),
    } = Flows::open(&tc, 40211);
    let mut failures = Failures::default();
    // (name, the error as the host sends it, as the client must get it)
    let cases = [
        (
            "host unreachable about a UDP datagram",
            (3, 1, udp_client, ctr_udp, published_udp, L4::Udp),
        ),
        (
            "time exceeded about a TCP segment",
            (11, 0, client4, ctr4, published4, L4::Ack),
        ),
        (
            "IPv6 address unreachable about a TCP segment",
            (1, 3, client6, ctr6, published6, L4::Ack),
        ),
    ];
    for (name, (kind, code, client, ctr, published, l4)) in cases {
        let host: IpAddr = if client.is_ipv4() {
            HOST_V4.into()
        } else {
            HOST_V6.into()
        };
        let sent = quoted(client, ctr, l4, None);
        let input = error(host, client.ip(), kind, code, [0; 4], &sent);
        let expected = error(
            host,
            client.ip(),
            kind,
            code,
            [0; 4],
            &quoted(client, published, l4, Some(&sent)),
        );
        let before = tc.stat(Stat::IcmpErrorTranslated);
        failures.check(name, tc.run(UPLINK_OUT, &input), NEXT, &expected);
        if tc.stat(Stat::IcmpErrorTranslated) != before + 1 {
            failures.note(format!("{name}: icmp_errors_translated not counted"));
        }
    }
    // About a packet of no flow (the host's own): untouched.
    let own = error(
        HOST_V4.into(),
        CLIENT_V4.into(),
        3,
        1,
        [0; 4],
        &quoted(at(CLIENT_V4, 40299), ctr4, L4::Ack, None),
    );
    failures.check(
        "an error about no flow",
        tc.run(UPLINK_OUT, &own),
        NEXT,
        &own,
    );
    failures.assert_none();
}

/// The interface through which `forged_errors_are_not_translated`'s
/// mappings reach their container: not the one a test run's packets come
/// in on (the loopback device, 1).
const CONTAINER_LINK: u32 = 1_000_000;
/// The interface a test run's packets come in on.
const LOOPBACK: u32 = 1;

/// An error in the container's name (about a client's packet) that comes in
/// on an uplink or on another container's link, when the mapping reaches
/// its container through another interface, is forged, as the flow's own
/// packets from an uplink are: dropped and counted as
/// `dropped_container_source`. And an error that does not go to the sender
/// of the packet it quotes is no error about that packet: passed
/// untouched. Before, all three were translated and sent on from the
/// published address: a forger anywhere on an uplink made the host send
/// ICMP errors in its own name to whatever destination it wrote (a port
/// unreachable ends a client's connected UDP socket), and a co-tenant sent
/// them to another container's clients.
#[test]
fn forged_errors_are_not_translated() {
    let test = "forged_errors_are_not_translated";
    let behind_link = mappings().map(|mapping| Mapping {
        ifindex: CONTAINER_LINK,
        ..mapping
    });
    let Some(mut tc) = Tc::load_with(test, &behind_link) else {
        return;
    };
    let Flows {
        client: (_, _, udp_client),
        container: (_, _, ctr_udp),
        ..
    } = Flows::open_with(&tc, 40221, REDIRECT);
    let request = quoted(udp_client, ctr_udp, L4::Udp, None);
    let mut failures = Failures::default();
    let cases = [
        (
            "port unreachable in the container's name from an uplink",
            UPLINK_IN,
            error(CTR_V4.into(), CLIENT_V4.into(), 3, 3, [0; 4], &request),
            DROP,
            Some(Stat::DroppedContainerSource),
        ),
        (
            "port unreachable in the container's name from another container's link",
            BACKEND_IN,
            error(CTR_V4.into(), CLIENT_V4.into(), 3, 3, [0; 4], &request),
            DROP,
            Some(Stat::DroppedContainerSource),
        ),
        (
            "port unreachable to another address than the client's",
            BACKEND_IN,
            error(CTR_V4.into(), ROUTER_V4.into(), 3, 3, [0; 4], &request),
            NEXT,
            None,
        ),
    ];
    for (name, program, input, verdict, stat) in cases {
        let translated = tc.stat(Stat::IcmpErrorTranslated);
        let counted = stat.map(|stat| tc.stat(stat));
        failures.check(name, tc.run(program, &input), verdict, &input);
        if tc.stat(Stat::IcmpErrorTranslated) != translated {
            failures.note(format!("{name}: translated"));
        }
        if let Some(stat) = stat
            && Some(tc.stat(stat)) != counted.map(|n| n + 1)
        {
            failures.note(format!("{name}: {stat:?} not counted"));
        }
    }
    // The container's own error, from its link (the mappings now reach it
    // through the interface a test run's packets come in on): translated.
    tc.publish(&mappings().map(|mapping| Mapping {
        ifindex: LOOPBACK,
        ..mapping
    }));
    let (verdict, _) = tc.run(
        BACKEND_IN,
        &error(CTR_V4.into(), CLIENT_V4.into(), 3, 3, [0; 4], &request),
    );
    if verdict != REDIRECT {
        failures.note(format!("the container's own error: verdict {verdict}"));
    }
    failures.assert_none();
}

/// A hairpin flow's client is a container, and the container it dialed
/// knows it only by the host address it was masqueraded to: an error the
/// client sends about the host's reply reaches the dialed container from
/// that address too. Before, it came from the client's own address, which
/// the masquerade hides everywhere else.
#[test]
fn a_hairpin_clients_error_comes_from_its_masquerade_address() {
    let published = mapping(Protocol::Tcp, at(HOST_V4, 8080), at(OTHER_CTR_V4, 80));
    let test = "a_hairpin_clients_error_comes_from_its_masquerade_address";
    let Some(tc) = Tc::load_with(test, &[published]) else {
        return;
    };
    let client = at(CTR_V4, 40231);
    let (verdict, _) = tc.run(BACKEND_IN, &frame(client, at(HOST_V4, 8080), L4::Syn));
    assert_eq!(verdict, TO_STACK, "the hairpin SYN");
    // The client's port, free from the host's address, is kept.
    let masqueraded = at(HOST_V4, 40231);
    let reply = quoted(at(HOST_V4, 8080), client, L4::Ack, None);
    let input = error(CTR_V4.into(), HOST_V4.into(), 3, 3, [0; 4], &reply);
    let expected = error(
        HOST_V4.into(),
        OTHER_CTR_V4.into(),
        3,
        3,
        [0; 4],
        &quoted(at(OTHER_CTR_V4, 80), masqueraded, L4::Ack, Some(&reply)),
    );
    let mut failures = Failures::default();
    failures.check(
        "the client's port unreachable about the reply",
        tc.run(BACKEND_IN, &input),
        TO_STACK,
        &expected,
    );
    failures.assert_none();
}

/// A flow whose mapping moved to another container (or was removed) stops
/// at its next packet; its ICMP errors are dropped, in either direction,
/// and counted as `flows_stopped` (as its replies are): translated, one
/// would go to an address that may be another container's by now; passed,
/// one would carry the container's address out. Before, they were
/// translated, for as long as the flow's entries lived (two minutes for
/// UDP).
#[test]
fn errors_of_a_flow_whose_mapping_moved_are_not_translated() {
    let test = "errors_of_a_flow_whose_mapping_moved_are_not_translated";
    let Some(mut tc) = Tc::load_with(test, &mappings()) else {
        return;
    };
    let Flows {
        client: (_, _, udp_client),
        published: (_, _, published_udp),
        container: (_, _, ctr_udp),
    } = Flows::open(&tc, 40241);
    tc.publish(&[mapping(Protocol::Udp, published_udp, at(OTHER_CTR_V4, 53))]);
    tc.move_services_generation(1);
    let request = quoted(udp_client, ctr_udp, L4::Udp, None);
    let reply = quoted(published_udp, udp_client, L4::Udp, None);
    let cases = [
        (
            "the old container's port unreachable",
            BACKEND_IN,
            error(CTR_V4.into(), CLIENT_V4.into(), 3, 3, [0; 4], &request),
        ),
        (
            "fragmentation needed about a reply",
            UPLINK_IN,
            error(ROUTER_V4.into(), HOST_V4.into(), 3, 4, [0, 0, 5, 0], &reply),
        ),
    ];
    let mut failures = Failures::default();
    for (name, program, input) in cases {
        let translated = tc.stat(Stat::IcmpErrorTranslated);
        let stopped = tc.stat(Stat::FlowStopped);
        failures.check(name, tc.run(program, &input), DROP, &input);
        if tc.stat(Stat::IcmpErrorTranslated) != translated {
            failures.note(format!("{name}: translated"));
        }
        if tc.stat(Stat::FlowStopped) != stopped + 1 {
            failures.note(format!("{name}: flows_stopped not counted"));
        }
    }
    failures.assert_none();
}
