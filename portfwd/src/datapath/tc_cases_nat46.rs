//! NAT46 through `BPF_PROG_TEST_RUN`: an IPv6 client of an IPv4 container.
//! The frames out are compared whole with frames built by `etherparse` in
//! the other family, so the IPv4 header checksum and the TCP/UDP checksums
//! (over the new pseudo-header) are checked too: a test run's skb has no
//! checksum offload, the helpers update the checksum fields themselves.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use portfwd_common::{
    Addr, BACKEND_PROGRAMS, NAT46_SRC, SERVICES, ServiceKey, ServiceValue, Stat, UPLINK_PROGRAMS,
};

use super::{
    object::OBJECT,
    tc_cases::{CTR_V4, HOST_V4, L4, frame, stat, v4},
};
use crate::model::{Mapping, Protocol};

const TO_STACK: u32 = 0; // TC_ACT_OK
const DROP: u32 = 2; // TC_ACT_SHOT
const REDIRECT: u32 = 7; // TC_ACT_REDIRECT
const NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC

const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 1);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 8, 0, 0, 0, 0, 7);
/// The host's IPv4 address towards the container: what it sees.
const SOURCE: Ipv4Addr = HOST_V4;

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// TCP `[HOST_V6]:8046` and UDP `[HOST_V6]:5346` to the IPv4 container,
/// with the host's IPv4 source; TCP `[HOST_V6]:8047` too, without one.
fn publish(ebpf: &mut Ebpf) {
    let mapping = |protocol, port, container_port| Mapping {
        name: "nat46".into(),
        protocol,
        host: v6(HOST_V6, port),
        container: v4(CTR_V4, container_port),
        ifindex: 0,
        hold: true,
        allow: None,
    };
    let translated = [
        mapping(Protocol::Tcp, 8046, 80),
        mapping(Protocol::Udp, 5346, 53),
    ];
    let unknown_source = mapping(Protocol::Tcp, 8047, 80);
    let map = ebpf.map_mut(NAT46_SRC.name).expect("the NAT46 sources map");
    let mut sources: HashMap<&mut MapData, ServiceKey, Addr> = HashMap::try_from(map).unwrap();
    for m in &translated {
        sources.insert(m.key(), Addr::from(SOURCE), 0).unwrap();
    }
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    for m in translated.iter().chain([&unknown_source]) {
        services.insert(m.key(), m.value(), 0).unwrap();
    }
}

fn run(ebpf: &Ebpf, program: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let program: &SchedClassifier = ebpf.program(program).unwrap().try_into().unwrap();
    let mut out = vec![0u8; input.len() + 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("{program:?}: {e}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
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
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED ipv6_clients_of_ipv4_containers...: BPF_PROG_TEST_RUN needs root");
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
    for (l4, reply_l4, published, container, client_port) in [
        (L4::Syn, L4::Ack, 8046, 80, 40041),
        (L4::Udp, L4::Udp, 5346, 53, 40042),
    ] {
        let client = v6(CLIENT_V6, client_port);
        let published = v6(HOST_V6, published);
        let container = v4(CTR_V4, container);
        // The client's port is free from the host's source: it is kept.
        let seen = v4(SOURCE, client_port);
        // The first packet: a new flow, out as IPv4 (to the stack: the
        // mapping's interface is unknown here).
        check(
            &mut failures,
            "the first packet, IPv6 -> IPv4",
            run(&ebpf, uplink_in, &frame(client, published, l4)),
            TO_STACK,
            &frame(seen, container, l4),
        );
        // The container's reply: IPv4 -> IPv6, back where the flow came in.
        check(
            &mut failures,
            "the reply, IPv4 -> IPv6",
            run(&ebpf, backend_in, &frame(container, seen, reply_l4)),
            REDIRECT,
            &frame(published, client, reply_l4),
        );
        // A later packet of the tracked flow.
        check(
            &mut failures,
            "a later packet, IPv6 -> IPv4",
            run(&ebpf, uplink_in, &frame(client, published, reply_l4)),
            TO_STACK,
            &frame(seen, container, reply_l4),
        );
    }

    // What is not translated.
    let dropped = stat(&ebpf, Stat::DroppedNat46);
    let fragment = first_fragment_v6(&frame(v6(CLIENT_V6, 40043), v6(HOST_V6, 8046), L4::Syn));
    check(
        &mut failures,
        "the first fragment of a new flow",
        run(&ebpf, uplink_in, &fragment),
        DROP,
        &fragment,
    );
    let mut no_checksum = frame(v4(CTR_V4, 53), v4(SOURCE, 40042), L4::Udp);
    let udp_check = 14 + 20 + 6;
    no_checksum[udp_check..udp_check + 2].copy_from_slice(&[0, 0]);
    check(
        &mut failures,
        "a UDP reply without a checksum",
        run(&ebpf, backend_in, &no_checksum),
        DROP,
        &no_checksum,
    );
    if stat(&ebpf, Stat::DroppedNat46) != dropped + 2 {
        failures.push("dropped_nat46_untranslatable not counted twice".into());
    }
    let passed = stat(&ebpf, Stat::PassNat46NoSource);
    let unknown = frame(v6(CLIENT_V6, 40044), v6(HOST_V6, 8047), L4::Syn);
    check(
        &mut failures,
        "a mapping without a host IPv4 source",
        run(&ebpf, uplink_in, &unknown),
        NEXT,
        &unknown,
    );
    if stat(&ebpf, Stat::PassNat46NoSource) != passed + 1 {
        failures.push("passed_nat46_no_source not counted".into());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Notes a run whose verdict or frame is not the expected one.
fn check(failures: &mut Vec<String>, what: &str, got: (u32, Vec<u8>), verdict: u32, frame: &[u8]) {
    if got != (verdict, frame.to_vec()) {
        failures.push(format!(
            "{what}: verdict {:#x}, frame\n  {:02x?}\nexpected {verdict:#x},\n  {frame:02x?}",
            got.0, got.1
        ));
    }
}
