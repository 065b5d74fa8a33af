//! NAT46 through `BPF_PROG_TEST_RUN`: an IPv6 client of an IPv4 container.
//! The frames out are compared whole with frames built by `etherparse` in
//! the other family, so the IPv4 header checksum and the TCP/UDP checksums
//! (over the new pseudo-header) are checked too: a test run's skb has no
//! checksum offload, the helpers update the checksum fields themselves.

use std::net::Ipv4Addr;

use portfwd_common::Stat;

use super::tc_fixture::{
    BACKEND_IN, CLIENT_MAC, CLIENT_V6, CTR_V4, Case, DROP, Failures, HOST_MAC, HOST_V4, HOST_V6,
    L4, NEXT, REDIRECT, TO_STACK, Tc, UPLINK_IN, at, frame, icmp, mapping,
};
use crate::model::Protocol;

/// The host's IPv4 address towards the container: what it sees.
const SOURCE: Ipv4Addr = HOST_V4;

/// TCP `[HOST_V6]:8046` and UDP `[HOST_V6]:5346` to the IPv4 container,
/// with the host's IPv4 source; TCP `[HOST_V6]:8047` too, without one.
fn publish(tc: &mut Tc) {
    let translated = [
        mapping(Protocol::Tcp, at(HOST_V6, 8046), at(CTR_V4, 80)),
        mapping(Protocol::Udp, at(HOST_V6, 5346), at(CTR_V4, 53)),
    ];
    let unknown_source = mapping(Protocol::Tcp, at(HOST_V6, 8047), at(CTR_V4, 80));
    for m in &translated {
        tc.set_nat46_source(m, SOURCE);
    }
    tc.publish(&translated);
    tc.publish(&[unknown_source]);
}

/// The frame with an IPv6 Fragment header (a first fragment, more to come)
/// after its fixed header.
fn first_fragment_v6(frame: &[u8]) -> Vec<u8> {
    const TCP: u8 = 6;
    let (eth_ip, rest) = frame.split_at(14 + 40);
    let mut out = eth_ip.to_vec();
    let payload_len = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&payload_len.to_be_bytes());
    out[20] = 44;
    out.extend_from_slice(&[TCP, 0, 0, 1, 0, 0, 0x46, 0x46]);
    out.extend_from_slice(rest);
    out
}

#[test]
fn ipv6_clients_of_ipv4_containers_are_translated_between_families() {
    let Some(mut tc) = Tc::load("ipv6_clients_of_ipv4_containers_are_translated_between_families")
    else {
        return;
    };
    publish(&mut tc);
    let mut failures = Failures::default();
    for (l4, reply_l4, published, container, client_port) in [
        (L4::Syn, L4::Ack, 8046, 80, 40041),
        (L4::Udp, L4::Udp, 5346, 53, 40042),
    ] {
        let client = at(CLIENT_V6, client_port);
        let published = at(HOST_V6, published);
        let container = at(CTR_V4, container);
        // The client's port is free from the host's source: it is kept.
        let seen = at(SOURCE, client_port);
        // The first packet: a new flow, out as IPv4 (to the stack: the
        // mapping's interface is unknown here).
        failures.check(
            "the first packet, IPv6 -> IPv4",
            tc.run(UPLINK_IN, &frame(client, published, l4)),
            TO_STACK,
            &frame(seen, container, l4),
        );
        // The container's reply: IPv4 -> IPv6, back where the flow came in.
        failures.check(
            "the reply, IPv4 -> IPv6",
            tc.run(BACKEND_IN, &frame(container, seen, reply_l4)),
            REDIRECT,
            &frame(published, client, reply_l4),
        );
        // A later packet of the tracked flow.
        failures.check(
            "a later packet, IPv6 -> IPv4",
            tc.run(UPLINK_IN, &frame(client, published, reply_l4)),
            TO_STACK,
            &frame(seen, container, reply_l4),
        );
    }

    // What is not translated, and the stat each counts.
    let fragment = first_fragment_v6(&frame(at(CLIENT_V6, 40043), at(HOST_V6, 8046), L4::Syn));
    let unknown = frame(at(CLIENT_V6, 40044), at(HOST_V6, 8047), L4::Syn);
    // An ICMPv6 error about a reply the host sent (a router on the way to
    // the client quoting `[published] -> client`): not translated either.
    let unreachable_v6 = icmp(
        (CLIENT_MAC, HOST_MAC),
        CLIENT_V6.into(),
        HOST_V6.into(),
        (1, 4, [0; 4]),
        &frame(at(HOST_V6, 8046), at(CLIENT_V6, 40041), L4::Ack)[14..],
    );
    // IPv6 requires a UDP checksum (RFC 8200 8.1): one of 0 would become
    // IPv4's "no checksum", and the container would take the datagram
    // unchecked. The host's stack drops it.
    let mut no_checksum_v6 = frame(at(CLIENT_V6, 40045), at(HOST_V6, 5346), L4::Udp);
    let udp_check_v6 = 14 + 40 + 6;
    no_checksum_v6[udp_check_v6..udp_check_v6 + 2].copy_from_slice(&[0, 0]);
    let uplink_cases = vec![
        Case::new(
            "an IPv6 UDP datagram without a checksum",
            no_checksum_v6,
            DROP,
            None,
            Stat::DroppedNat46,
        ),
        Case::new(
            "an ICMPv6 error about a NAT46 flow's reply",
            unreachable_v6,
            NEXT,
            None,
            Stat::PassNotTcpUdp,
        ),
        Case::new(
            "the first fragment of a new flow",
            fragment,
            DROP,
            None,
            Stat::DroppedNat46,
        ),
        Case::new(
            "a mapping without a host IPv4 source",
            unknown,
            NEXT,
            None,
            Stat::PassNat46NoSource,
        ),
    ];
    tc.check_cases(UPLINK_IN, uplink_cases, &mut failures);
    let mut no_checksum = frame(at(CTR_V4, 53), at(SOURCE, 40042), L4::Udp);
    let udp_check = 14 + 20 + 6;
    no_checksum[udp_check..udp_check + 2].copy_from_slice(&[0, 0]);
    // An ICMP error the container sends about the client's (translated)
    // packet is not translated: it would have to change family too. It
    // leaves as it came, like any packet that is not TCP or UDP.
    let port_unreachable = icmp(
        (CLIENT_MAC, HOST_MAC),
        CTR_V4.into(),
        SOURCE.into(),
        (3, 3, [0; 4]),
        &frame(at(SOURCE, 40041), at(CTR_V4, 80), L4::Ack)[14..],
    );
    let backend_cases = vec![
        Case::new(
            "a UDP reply without a checksum",
            no_checksum,
            DROP,
            None,
            Stat::DroppedNat46,
        ),
        Case::new(
            "the container's ICMP error about a NAT46 flow",
            port_unreachable,
            NEXT,
            None,
            Stat::PassNotTcpUdp,
        ),
    ];
    tc.check_cases(BACKEND_IN, backend_cases, &mut failures);
    failures.assert_none();
}

/// Every NAT46 client of a mapping shares one IPv4 address towards the
/// container, so clients that happen to use the same source port need
/// ports of their own there: nine of them, and the ninth gets one too.
/// Before, a flow tried its client's port and seven more derived from that
/// port alone, the same seven for every client with that port: the ninth
/// was refused (`rewrite_failed`, the datagram passed to the host), and a
/// forger could take a port's eight candidates with eight spoofed
/// datagrams, keeping every client that used it out for two minutes.
#[test]
fn clients_sharing_a_source_port_each_get_a_port() {
    let Some(mut tc) = Tc::load("clients_sharing_a_source_port_each_get_a_port") else {
        return;
    };
    publish(&mut tc);
    let mut seen = std::collections::BTreeSet::new();
    for client in 0..9u16 {
        let address = std::net::Ipv6Addr::new(0xfd00, 9, 8, 0, 0, 0, 1, client);
        let input = frame(at(address, 40050), at(HOST_V6, 5346), L4::Udp);
        let (verdict, out) = tc.run(UPLINK_IN, &input);
        assert_eq!(
            verdict,
            TO_STACK,
            "client {address}: {:?}",
            tc.stat(Stat::RewriteFailed)
        );
        // IPv4 out: the source port the container sees.
        seen.insert(u16::from_be_bytes([out[34], out[35]]));
    }
    assert_eq!(seen.len(), 9, "nine ports: {seen:?}");
}
