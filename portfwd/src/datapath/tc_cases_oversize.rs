//! IPv4 packets without DF of a tracked flow that are larger than the MTU
//! of the interface they are redirected to (issue 11, case 8). A router
//! fragments them; `bpf_redirect_neigh` skips the forwarding path that
//! would, and the link drops them. So they go to the host's stack instead:
//! towards the container translated (the forwarding path fragments them on
//! the way to it), towards the client untranslated (the forwarding path
//! fragments them, and the uplink's egress program translates the
//! fragments as it does every routed reply). Through `BPF_PROG_TEST_RUN`,
//! with a veth pair of the test's own (MTU 1280) as the container's link
//! and the client's interface.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use etherparse::{Ipv4Header, PacketBuilder};
use portfwd_common::{BACKEND_PROGRAMS, SERVICES, ServiceKey, ServiceValue, Stat, UPLINK_PROGRAMS};

use super::{object::OBJECT, tc_cases::stat};
use crate::model::{Mapping, Protocol};

const REDIRECT: u32 = 7; // TC_ACT_REDIRECT
const TO_STACK: u32 = 0; // TC_ACT_OK
const NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC (-1)

const PUBLISHED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 1)), 5470);
const CONTAINER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 2)), 53);
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 5, 5)), 40210);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
/// The container's MAC; frames from it go to the loopback device's all-zero
/// MAC (PACKET_HOST in a test run without an interface).
const CONTAINER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
const LO_MAC: [u8; 6] = [0; 6];

/// A veth pair of the test's own, `name` and `peer`, with an MTU of 1280:
/// the container's link and the client's interface at once. Removed when
/// dropped. (Each test has its own: tests run in parallel.)
struct SmallLink {
    name: &'static str,
    ifindex: u32,
    mac: [u8; 6],
}

impl SmallLink {
    /// Its MAC is set, not left random: udev may replace a random one
    /// after the link is made (`MACAddressPolicy=persistent`), and frames
    /// to the old one would not be the host's (PACKET_OTHERHOST).
    fn new(name: &'static str, peer: &'static str, mac: [u8; 6]) -> Self {
        portfwd_testkit::netns::ip(&["link", "del", name]).ok();
        let text: Vec<String> = mac.iter().map(|byte| format!("{byte:02x}")).collect();
        portfwd_testkit::netns::ip(&[
            "link",
            "add",
            name,
            "address",
            &text.join(":"),
            "mtu",
            "1280",
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "mtu",
            "1280",
        ])
        .unwrap();
        let ifindex = nix::net::if_::if_nametoindex(name).unwrap();
        SmallLink { name, ifindex, mac }
    }
}

impl Drop for SmallLink {
    fn drop(&mut self) {
        portfwd_testkit::netns::ip(&["link", "del", self.name]).ok();
    }
}

/// A UDP datagram of `payload` bytes; IPv4 with DF only if `dont_fragment`.
fn udp(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddr,
    dst: SocketAddr,
    payload: usize,
    dont_fragment: bool,
) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        unreachable!("IPv4 only: IPv6 routers never fragment");
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(s.octets(), d.octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut out, &vec![7u8; payload])
        .unwrap();
    let (mut header, _) = Ipv4Header::from_slice(&out[14..]).unwrap();
    header.dont_fragment = dont_fragment;
    header.header_checksum = header.calc_header_checksum();
    out[14..34].copy_from_slice(&header.to_bytes());
    out
}

/// One run of `program` on `input`, the skb on interface `ifindex` (0: none,
/// the loopback device): the verdict and the frame out.
fn run(ebpf: &Ebpf, program: &str, input: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let program: &SchedClassifier = ebpf.program(program).unwrap().try_into().unwrap();
    // `struct __sk_buff` up to its `ifindex` (offset 40).
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; input.len() + 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("{program:?}: {e}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

#[test]
fn oversize_ipv4_without_df_goes_to_the_stack_which_fragments_it() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let link = SmallLink::new("pftfrg0", "pftfrg1", [2, 0, 0x5e, 0, 0, 1]);
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    let mapping = Mapping {
        name: "frag".into(),
        protocol: Protocol::Udp,
        host: PUBLISHED,
        container: CONTAINER,
        ifindex: link.ifindex,
        hold: true,
        allow: None,
    };
    services.insert(mapping.key(), mapping.value(), 0).unwrap();
    for def in [&UPLINK_PROGRAMS[0], &BACKEND_PROGRAMS[0]] {
        let program: &mut SchedClassifier = ebpf.program_mut(def.name).unwrap().try_into().unwrap();
        program.load().unwrap();
    }
    let (uplink_in, backend_in) = (UPLINK_PROGRAMS[0].name, BACKEND_PROGRAMS[0].name);
    // The client is on the small link too: its frames come in on it, so the
    // flow's replies go back to it.
    let from_client = (CLIENT_MAC, link.mac);
    let from_container = (CONTAINER_MAC, LO_MAC);
    let mut failures = Vec::new();

    let small = udp(from_client, CLIENT, PUBLISHED, 100, false);
    let (verdict, _) = run(&ebpf, uplink_in, &small, link.ifindex);
    assert_eq!(verdict, REDIRECT, "the first datagram opens the flow");
    let before = stat(&ebpf, Stat::TooBigToStack);

    // Towards the container: translated, then to the stack.
    let big = udp(from_client, CLIENT, PUBLISHED, 1400, false);
    let (verdict, out) = run(&ebpf, uplink_in, &big, link.ifindex);
    let translated = udp(from_client, CLIENT, CONTAINER, 1400, false);
    if (verdict, &out) != (TO_STACK, &translated) {
        failures.push(format!(
            "to the container: verdict {verdict:#x}, translated {}",
            out == translated
        ));
    }
    // Towards the client: untouched, to the stack (the uplink's egress
    // program translates what the forwarding path makes of it).
    let reply = udp(from_container, CONTAINER, CLIENT, 1400, false);
    let (verdict, out) = run(&ebpf, backend_in, &reply, 0);
    if (verdict, &out) != (NEXT, &reply) {
        failures.push(format!(
            "to the client: verdict {verdict:#x}, untouched {}",
            out == reply
        ));
    }
    if failures.is_empty() && stat(&ebpf, Stat::TooBigToStack) != before + 2 {
        failures.push("too_big_to_stack not counted twice".into());
    }
    // Packets that fit are redirected as ever, both ways.
    let fits = udp(from_client, CLIENT, PUBLISHED, 1200, false);
    if run(&ebpf, uplink_in, &fits, link.ifindex).0 != REDIRECT {
        failures.push("a datagram that fits, to the container: not redirected".into());
    }
    let fits = udp(from_container, CONTAINER, CLIENT, 1200, false);
    if run(&ebpf, backend_in, &fits, 0).0 != REDIRECT {
        failures.push("a datagram that fits, to the client: not redirected".into());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The first datagram of a flow is checked too: with DF, answered with
/// "fragmentation needed" (MTU 1280) to the client, before any flow
/// exists; without DF, translated and handed to the stack.
#[test]
fn first_datagrams_too_big_are_checked_too() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let link = SmallLink::new("pftfrg2", "pftfrg3", [2, 0, 0x5e, 0, 0, 2]);
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    let mapping = Mapping {
        name: "frag".into(),
        protocol: Protocol::Udp,
        host: PUBLISHED,
        container: CONTAINER,
        ifindex: link.ifindex,
        hold: true,
        allow: None,
    };
    services.insert(mapping.key(), mapping.value(), 0).unwrap();
    let program: &mut SchedClassifier = ebpf
        .program_mut(UPLINK_PROGRAMS[0].name)
        .unwrap()
        .try_into()
        .unwrap();
    program.load().unwrap();
    let uplink_in = UPLINK_PROGRAMS[0].name;
    let from_client = (CLIENT_MAC, link.mac);
    let mut failures = Vec::new();

    let big = udp(from_client, CLIENT, PUBLISHED, 1400, true);
    let (verdict, out) = run(&ebpf, uplink_in, &big, link.ifindex);
    // IPv4 ICMP type 3 code 4 with the MTU, to the client.
    let answered = out.len() > 42
        && out[23] == 1
        && out[30..34] == [10, 9, 5, 5]
        && (out[34], out[35]) == (3, 4)
        && out[40..42] == 1280u16.to_be_bytes();
    if verdict != REDIRECT || !answered {
        failures.push(format!(
            "with DF: verdict {verdict:#x}, frame {:02x?}",
            &out[..out.len().min(48)]
        ));
    }
    let other = SocketAddr::new(CLIENT.ip(), CLIENT.port() + 1);
    let big = udp(from_client, other, PUBLISHED, 1400, false);
    let (verdict, out) = run(&ebpf, uplink_in, &big, link.ifindex);
    let translated = udp(from_client, other, CONTAINER, 1400, false);
    if (verdict, &out) != (TO_STACK, &translated) {
        failures.push(format!(
            "without DF: verdict {verdict:#x}, translated {}",
            out == translated
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
