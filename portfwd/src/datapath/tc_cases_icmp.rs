//! `BPF_PROG_TEST_RUN` cases for ICMP errors about translated flows (`icmp`
//! in the eBPF crate): an error arriving on an uplink about a reply the
//! host sent goes to the container in its view; an error the container
//! sends about a client's packet goes to the client in the host's view.
//! The expected frames are built by `etherparse` (every checksum its own),
//! except the quoted TCP/UDP checksum, which the translation leaves as it
//! was (nobody checks it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use etherparse::PacketBuilder;
use portfwd_common::{
    BACKEND_PROGRAMS, SERVICES, ServiceKey, ServiceValue, Stat, TRANSLATED_MARK, UPLINK_PROGRAMS,
};

use super::{
    object::OBJECT,
    tc_cases::{L4, frame, skb_ctx, stat},
};
use crate::model::{Mapping, Protocol};

const NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC
const TO_STACK: u32 = 0; // TC_ACT_OK
const REDIRECT: u32 = 7; // TC_ACT_REDIRECT

const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 1);
const CTR_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 2);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 8, 7);
const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 5, 1);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 1);
const CTR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 8, 0, 0, 0, 0, 7);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 5, 0, 0, 0, 0, 1);
const HOST_MAC: [u8; 6] = [0; 6];
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 5];

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// TCP 8080 -> 80 on both families, UDP 5353 -> 53 on IPv4; interface 0.
fn publish(ebpf: &mut Ebpf) {
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    for (protocol, host, container) in [
        (Protocol::Tcp, at(HOST_V4, 8080), at(CTR_V4, 80)),
        (Protocol::Udp, at(HOST_V4, 5353), at(CTR_V4, 53)),
        (Protocol::Tcp, at(HOST_V6, 8080), at(CTR_V6, 80)),
    ] {
        let mapping = Mapping {
            name: "icmp".into(),
            protocol,
            host,
            container,
            ifindex: 0,
            hold: true,
            allow: None,
        };
        services.insert(mapping.key(), mapping.value(), 0).unwrap();
    }
}

/// An ICMP error frame from `from` to `to`: IPv4 `kind`/`code` with
/// `rest` (bytes 5-8), or the IPv6 one, quoting `quoted`.
fn error(from: IpAddr, to: IpAddr, kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(ROUTER_MAC, HOST_MAC);
    let mut out = Vec::new();
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder
            .ipv4(s.octets(), d.octets(), 64)
            .icmpv4_raw(kind, code, rest)
            .write(&mut out, quoted),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6_raw(kind, code, rest)
            .write(&mut out, quoted),
        _ => unreachable!(),
    }
    .unwrap();
    out
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

fn run(ebpf: &Ebpf, program: &str, input: &[u8]) -> (u32, Vec<u8>, u32) {
    let program: &SchedClassifier = ebpf.program(program).unwrap().try_into().unwrap();
    let ctx_in = skb_ctx(0);
    let mut ctx_out = [0u8; 192];
    let mut out = vec![0u8; input.len() + 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .unwrap();
    out.truncate(result.data_size_out as usize);
    let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap());
    (result.return_value, out, mark)
}

#[test]
fn icmp_errors_of_translated_flows_are_translated_both_ways() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED icmp_errors_...: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    publish(&mut ebpf);
    let (uplink_in, backend_in) = (UPLINK_PROGRAMS[0].name, BACKEND_PROGRAMS[0].name);
    for name in [uplink_in, backend_in] {
        let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
    }
    let mut failures = Vec::new();
    let mut check = |name: &str, program: &str, input: Vec<u8>, verdict: u32, expected: Vec<u8>| {
        let before = stat(&ebpf, Stat::IcmpErrorTranslated);
        let (got, out, mark) = run(&ebpf, program, &input);
        if (got, &out) != (verdict, &expected) {
            failures.push(format!(
                "{name}: verdict {got:#x} (expected {verdict:#x}), frame\n  {out:02x?}\nexpected\n  {expected:02x?}"
            ));
        }
        let translated = verdict != NEXT;
        if stat(&ebpf, Stat::IcmpErrorTranslated) != before + u64::from(translated) {
            failures.push(format!("{name}: icmp_errors_translated not counted right"));
        }
        if verdict == REDIRECT && mark != TRANSLATED_MARK {
            failures.push(format!("{name}: redirected to the client without the mark"));
        }
    };

    // The flows: TCP from the client on both families, UDP on IPv4.
    let (client4, client6, udp_client) = (
        at(CLIENT_V4, 40201),
        at(CLIENT_V6, 40202),
        at(CLIENT_V4, 40203),
    );
    let (published4, published6, published_udp) =
        (at(HOST_V4, 8080), at(HOST_V6, 8080), at(HOST_V4, 5353));
    let (ctr4, ctr6, ctr_udp) = (at(CTR_V4, 80), at(CTR_V6, 80), at(CTR_V4, 53));
    for (client, published, l4) in [
        (client4, published4, L4::Syn),
        (client6, published6, L4::Syn),
        (udp_client, published_udp, L4::Udp),
    ] {
        let (verdict, _, _) = run(&ebpf, uplink_in, &frame(client, published, l4));
        assert_eq!(verdict, TO_STACK, "the flow from {client}");
    }

    // A router on the client's way cannot forward the host's reply
    // (fragmentation needed, next-hop MTU 1280): to the container, about
    // its own packet.
    let reply = quoted(published4, client4, L4::Ack, None);
    check(
        "fragmentation needed about a reply",
        uplink_in,
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
        uplink_in,
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
    check(
        "time exceeded about an IPv6 reply",
        uplink_in,
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
        backend_in,
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
        uplink_in,
        unknown.clone(),
        NEXT,
        unknown,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// ICMP errors the host's own stack sends about a client's translated
/// packet (the container's address unreachable, a TTL run out in the
/// forwarding path) leave through the uplink quoting `client ->
/// container:p`; the client's kernel would match them to no socket. At
/// the uplink's egress they are translated to quote `client ->
/// published:P` and go on (from the host's own address: it sent them).
#[test]
fn errors_the_host_sends_about_translated_packets_are_translated_at_uplink_egress() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED errors_the_host_sends_...: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    publish(&mut ebpf);
    let (uplink_in, uplink_out) = (UPLINK_PROGRAMS[0].name, UPLINK_PROGRAMS[1].name);
    for name in [uplink_in, uplink_out] {
        let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
    }
    let (client4, client6, udp_client) = (
        at(CLIENT_V4, 40211),
        at(CLIENT_V6, 40212),
        at(CLIENT_V4, 40213),
    );
    let (published4, published6, published_udp) =
        (at(HOST_V4, 8080), at(HOST_V6, 8080), at(HOST_V4, 5353));
    let (ctr4, ctr6, ctr_udp) = (at(CTR_V4, 80), at(CTR_V6, 80), at(CTR_V4, 53));
    for (client, published, l4) in [
        (client4, published4, L4::Syn),
        (client6, published6, L4::Syn),
        (udp_client, published_udp, L4::Udp),
    ] {
        let (verdict, _, _) = run(&ebpf, uplink_in, &frame(client, published, l4));
        assert_eq!(verdict, TO_STACK, "the flow from {client}");
    }
    let mut failures = Vec::new();
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
        let before = stat(&ebpf, Stat::IcmpErrorTranslated);
        let (verdict, out, _) = run(&ebpf, uplink_out, &input);
        if (verdict, &out) != (NEXT, &expected) {
            failures.push(format!(
                "{name}: verdict {verdict:#x}, frame\n  {out:02x?}\nexpected\n  {expected:02x?}"
            ));
        }
        if stat(&ebpf, Stat::IcmpErrorTranslated) != before + 1 {
            failures.push(format!("{name}: icmp_errors_translated not counted"));
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
    let (verdict, out, _) = run(&ebpf, uplink_out, &own);
    if (verdict, &out) != (NEXT, &own) {
        failures.push(format!(
            "an error about no flow: verdict {verdict:#x}, changed"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
