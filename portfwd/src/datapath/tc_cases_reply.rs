//! Table-driven cases for the answers the TC programs send (`reply` in the
//! eBPF crate), through `BPF_PROG_TEST_RUN`: a client outside a mapping's
//! allowlist gets what a closed port gives, built in place of its packet and
//! redirected back out of the interface it came in on; with `--refuse drop`
//! it gets nothing. The expected frames are built by `etherparse`, which
//! computes every checksum itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, MapData,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use etherparse::{Ipv4Header, PacketBuilder};
use portfwd_common::{ALLOW, AllowKey, SERVICES, ServiceKey, ServiceValue, Stat, UPLINK_PROGRAMS};

use super::{
    object::OBJECT,
    tc_cases::{L4, frame, stat},
};
use crate::model::{Allowlist, Mapping, Protocol, Refuse};

const REDIRECT: u32 = 7; // TC_ACT_REDIRECT
const TO_STACK: u32 = 0; // TC_ACT_OK
const DROP: u32 = 2; // TC_ACT_SHOT

const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 1);
const CTR_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 2);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 1);
const CTR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 2);
/// Inside the allowlists (10.9.8.0/24, fd00:9:8::/48)...
const INSIDER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 8, 9);
/// ...and outside.
const OUTSIDER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 6, 6);
const OUTSIDER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 6, 0, 0, 0, 0, 6);
/// `tc_cases::frame`'s MACs: from the client, to the host (the loopback
/// device's all-zero MAC: PACKET_HOST in a test run).
const HOST_MAC: [u8; 6] = [0; 6];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
/// `tc_cases::frame`'s TCP sequence number and payload length.
const SYN_SEQ: u32 = 1000;
const PAYLOAD_LEN: u32 = 7;

/// Mapped ports: with an allowlist that refuses with an answer (the
/// default), and one that refuses silently (`--refuse drop`).
const TCP_REJECT: u16 = 8090;
const UDP_REJECT: u16 = 5454;
const TCP_DROP: u16 = 8091;
const UDP_DROP: u16 = 5455;

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn publish(ebpf: &mut Ebpf) {
    let list = Allowlist::parse(&["10.9.8.0/24", "fd00:9:8::/48"]).unwrap();
    let mut mappings = Vec::new();
    for (host_ip, ctr_ip) in [
        (IpAddr::from(HOST_V4), IpAddr::from(CTR_V4)),
        (HOST_V6.into(), CTR_V6.into()),
    ] {
        for (protocol, port, refuse) in [
            (Protocol::Tcp, TCP_REJECT, Refuse::Reject),
            (Protocol::Udp, UDP_REJECT, Refuse::Reject),
            (Protocol::Tcp, TCP_DROP, Refuse::Drop),
            (Protocol::Udp, UDP_DROP, Refuse::Drop),
        ] {
            mappings.push(Mapping {
                name: "reply".into(),
                protocol,
                host: at(host_ip, port),
                container: at(ctr_ip, 80),
                ifindex: 0,
                hold: true,
                allow: Some(Allowlist {
                    refuse,
                    ..list.for_family(host_ip.is_ipv4())
                }),
            });
        }
    }
    let map = ebpf.map_mut(ALLOW.name).expect("the allowlist map");
    let mut lists: LpmTrie<&mut MapData, AllowKey, u8> = LpmTrie::try_from(map).unwrap();
    for mapping in &mappings {
        for (prefix_len, key) in mapping.allow.iter().flat_map(|a| a.keys(&mapping.key())) {
            lists.insert(&LpmKey::new(prefix_len, key), 1, 0).unwrap();
        }
    }
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    for mapping in &mappings {
        services.insert(mapping.key(), mapping.value(), 0).unwrap();
    }
}

/// The reset a closed port sends for `tc_cases::frame`'s SYN from `client`
/// to `published`: RST|ACK, seq 0, ack = its seq + 1 + its payload.
fn reset(published: SocketAddr, client: SocketAddr) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(HOST_MAC, CLIENT_MAC);
    let ip = match (published.ip(), client.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let mut out = Vec::new();
    ip.tcp(published.port(), client.port(), 0, 0)
        .rst()
        .ack(SYN_SEQ + 1 + PAYLOAD_LEN)
        .write(&mut out, &[])
        .unwrap();
    out
}

/// The ICMP port unreachable a closed UDP port sends for `datagram` (from
/// its IP header on), holding `quoted` bytes of it. IPv4: TOS 0xc0, no DF,
/// as the kernel's ICMP errors.
fn unreachable(published: IpAddr, client: IpAddr, datagram: &[u8], quoted: usize) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(HOST_MAC, CLIENT_MAC);
    let mut out = Vec::new();
    match (published, client) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            builder
                .ipv4(s.octets(), d.octets(), 64)
                .icmpv4_raw(3, 3, [0; 4])
                .write(&mut out, &datagram[..quoted])
                .unwrap();
            let (mut header, _) = Ipv4Header::from_slice(&out[14..]).unwrap();
            header.dscp = etherparse::IpDscp::try_new(0xc0 >> 2).unwrap();
            header.dont_fragment = false;
            header.header_checksum = header.calc_header_checksum();
            out[14..34].copy_from_slice(&header.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => builder
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6_raw(1, 4, [0; 4])
            .write(&mut out, &datagram[..quoted])
            .unwrap(),
        _ => unreachable!(),
    }
    out
}

/// A UDP frame with `payload` bytes.
fn udp(src: SocketAddr, dst: SocketAddr, payload: usize) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut out = Vec::new();
    ip.udp(src.port(), dst.port())
        .write(&mut out, &body)
        .unwrap();
    out
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    /// None: the frame is left as it came.
    output: Option<Vec<u8>>,
    counts: Stat,
}

fn cases() -> Vec<Case> {
    let out4 = at(OUTSIDER_V4, 40101);
    let out6 = at(OUTSIDER_V6, 40102);
    let (tcp4, udp4) = (at(HOST_V4, TCP_REJECT), at(HOST_V4, UDP_REJECT));
    let (tcp6, udp6) = (at(HOST_V6, TCP_REJECT), at(HOST_V6, UDP_REJECT));
    let small4 = udp(out4, udp4, 7);
    let small6 = udp(out6, udp6, 7);
    // Quoted up to 576 bytes of answer (v4) and 1280 (v6).
    let big4 = udp(out4, udp4, 1400);
    let big6 = udp(out6, udp6, 1400);
    let mut rst = frame(out4, tcp4, L4::Syn);
    // A reset is never answered (a reset with a SYN is nonsense, but it is
    // what reaches the allowlist: only SYNs and UDP do).
    rst[14 + 20 + 13] |= 0x04;
    let case = |name, input, verdict, output, counts| Case {
        name,
        input,
        verdict,
        output,
        counts,
    };
    vec![
        case(
            "a SYN from outside the list: a reset",
            frame(out4, tcp4, L4::Syn),
            REDIRECT,
            Some(reset(tcp4, out4)),
            Stat::RefusedAnswered,
        ),
        case(
            "an IPv6 SYN from outside the list: a reset",
            frame(out6, tcp6, L4::Syn),
            REDIRECT,
            Some(reset(tcp6, out6)),
            Stat::RefusedAnswered,
        ),
        case(
            "UDP from outside the list: port unreachable, the whole datagram quoted",
            small4.clone(),
            REDIRECT,
            Some(unreachable(
                HOST_V4.into(),
                OUTSIDER_V4.into(),
                &small4[14..],
                small4.len() - 14,
            )),
            Stat::RefusedAnswered,
        ),
        case(
            "IPv6 UDP from outside the list: port unreachable",
            small6.clone(),
            REDIRECT,
            Some(unreachable(
                HOST_V6.into(),
                OUTSIDER_V6.into(),
                &small6[14..],
                small6.len() - 14,
            )),
            Stat::RefusedAnswered,
        ),
        case(
            "a large datagram: 548 bytes quoted (576 in all)",
            big4.clone(),
            REDIRECT,
            Some(unreachable(
                HOST_V4.into(),
                OUTSIDER_V4.into(),
                &big4[14..],
                576 - 28,
            )),
            Stat::RefusedAnswered,
        ),
        case(
            "a large IPv6 datagram: 1232 bytes quoted (1280 in all)",
            big6.clone(),
            REDIRECT,
            Some(unreachable(
                HOST_V6.into(),
                OUTSIDER_V6.into(),
                &big6[14..],
                1280 - 48,
            )),
            Stat::RefusedAnswered,
        ),
        case(
            "a reset from outside the list: dropped, never answered",
            rst,
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "a SYN from outside a silent list: dropped",
            frame(out4, at(HOST_V4, TCP_DROP), L4::Syn),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "UDP from outside a silent list: dropped",
            udp(out6, at(HOST_V6, UDP_DROP), 7),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "a SYN from inside the list: translated",
            frame(at(INSIDER_V4, 40103), tcp4, L4::Syn),
            TO_STACK,
            Some(frame(at(INSIDER_V4, 40103), at(CTR_V4, 80), L4::Syn)),
            Stat::ToStack,
        ),
    ]
}

fn loaded() -> Option<Ebpf> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: BPF_PROG_TEST_RUN needs root");
        return None;
    }
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    publish(&mut ebpf);
    let program: &mut SchedClassifier = ebpf
        .program_mut(UPLINK_PROGRAMS[0].name)
        .unwrap()
        .try_into()
        .unwrap();
    program.load().unwrap();
    Some(ebpf)
}

fn run(ebpf: &Ebpf, input: &[u8]) -> (u32, Vec<u8>) {
    let program: &SchedClassifier = ebpf
        .program(UPLINK_PROGRAMS[0].name)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; 2048];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap();
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

#[test]
fn refused_clients_get_what_a_closed_port_gives() {
    let Some(ebpf) = loaded() else {
        return;
    };
    let mut failures = Vec::new();
    for case in cases() {
        let before = stat(&ebpf, case.counts);
        let (verdict, out) = run(&ebpf, &case.input);
        let expected = case.output.as_ref().unwrap_or(&case.input);
        if verdict != case.verdict {
            failures.push(format!(
                "{}: verdict {verdict:#x}, expected {:#x}",
                case.name, case.verdict
            ));
        }
        // A dropped frame's bytes do not matter.
        if case.verdict != DROP && &out != expected {
            failures.push(format!(
                "{}: frame\n  {out:02x?}\nexpected\n  {expected:02x?}",
                case.name
            ));
        }
        if stat(&ebpf, case.counts) != before + 1 {
            failures.push(format!("{}: did not count {:?}", case.name, case.counts));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// ICMP answers are rate-limited per CPU (a burst of 50, then 1000 a
/// second): a quick run of many refused datagrams gets some of them
/// dropped and counted. Not a timing bound: 1,000 runs would have to take
/// over 0.95 s for none to be limited.
#[test]
fn icmp_answers_are_rate_limited() {
    let Some(ebpf) = loaded() else {
        return;
    };
    let datagram = udp(at(OUTSIDER_V4, 40104), at(HOST_V4, UDP_REJECT), 7);
    let (answered, limited) = (
        stat(&ebpf, Stat::RefusedAnswered),
        stat(&ebpf, Stat::AnswersRateLimited),
    );
    let mut verdicts = [0usize; 2];
    for _ in 0..1000 {
        match run(&ebpf, &datagram).0 {
            REDIRECT => verdicts[0] += 1,
            DROP => verdicts[1] += 1,
            other => panic!("verdict {other:#x}"),
        }
    }
    assert!(verdicts[0] >= 50, "the burst is answered: {verdicts:?}");
    assert!(verdicts[1] > 0, "some are limited: {verdicts:?}");
    assert_eq!(
        (
            stat(&ebpf, Stat::RefusedAnswered) - answered,
            stat(&ebpf, Stat::AnswersRateLimited) - limited
        ),
        (verdicts[0] as u64, verdicts[1] as u64)
    );
}

/// A veth pair of the test's own with a small MTU (the container's link),
/// removed when dropped.
struct SmallLink {
    ifindex: u32,
}

impl SmallLink {
    const NAME: &str = "pftmtu0";
    const PEER: &str = "pftmtu1";

    fn new(mtu: u32) -> Self {
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        // A leftover of an interrupted run, if any.
        std::process::Command::new("ip")
            .args(["link", "del", Self::NAME])
            .stderr(std::process::Stdio::null())
            .status()
            .ok();
        let mtu = mtu.to_string();
        ip(&[
            "link",
            "add",
            Self::NAME,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            Self::PEER,
            "mtu",
            &mtu,
        ]);
        let ifindex = nix::net::if_::if_nametoindex(Self::NAME).unwrap();
        SmallLink { ifindex }
    }
}

impl Drop for SmallLink {
    fn drop(&mut self) {
        std::process::Command::new("ip")
            .args(["link", "del", Self::NAME])
            .status()
            .ok();
    }
}

/// A packet of a tracked flow larger than the MTU of the container's link
/// (1280) gets the answer a router gives, quoting it as the client sent
/// it: "fragmentation needed" with the MTU (IPv4 with DF), "packet too big"
/// (IPv6). (IPv4 without DF: `tc_cases_oversize`.)
#[test]
fn packets_too_big_for_the_containers_link_get_a_routers_answer() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let link = SmallLink::new(1280);
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    for (host, container) in [
        (at(HOST_V4, 8070), at(CTR_V4, 80)),
        (at(HOST_V6, 8070), at(CTR_V6, 80)),
    ] {
        let mapping = Mapping {
            name: "mtu".into(),
            protocol: Protocol::Tcp,
            host,
            container,
            ifindex: link.ifindex,
            hold: true,
            allow: None,
        };
        services.insert(mapping.key(), mapping.value(), 0).unwrap();
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(UPLINK_PROGRAMS[0].name)
        .unwrap()
        .try_into()
        .unwrap();
    program.load().unwrap();
    let big = |src: SocketAddr, dst: SocketAddr| {
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC);
        let ip = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!(),
        };
        let mut out = Vec::new();
        ip.tcp(src.port(), dst.port(), 2000, 64240)
            .ack(1)
            .write(&mut out, &[7u8; 1400])
            .unwrap();
        out
    };
    let mut failures = Vec::new();
    for (client, published, quoted) in [
        (at(OUTSIDER_V4, 40111), at(HOST_V4, 8070), 576 - 28),
        (at(OUTSIDER_V6, 40112), at(HOST_V6, 8070), 1280 - 48),
    ] {
        assert_eq!(
            run(&ebpf, &frame(client, published, L4::Syn)).0,
            REDIRECT,
            "the SYN from {client}"
        );
        let input = big(client, published);
        let before = stat(&ebpf, Stat::TooBigAnswered);
        let (verdict, out) = run(&ebpf, &input);
        let expected = too_big(published.ip(), client.ip(), &input[14..], quoted, 1280);
        if (verdict, &out) != (REDIRECT, &expected) {
            failures.push(format!(
                "{client}: verdict {verdict:#x}, frame\n  {out:02x?}\nexpected\n  {expected:02x?}"
            ));
        }
        if stat(&ebpf, Stat::TooBigAnswered) != before + 1 {
            failures.push(format!("{client}: too_big_answered not counted"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The router's answer to a packet too big for an MTU of `mtu`.
fn too_big(published: IpAddr, client: IpAddr, datagram: &[u8], quoted: usize, mtu: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(HOST_MAC, CLIENT_MAC);
    let mut out = Vec::new();
    match (published, client) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mtu = mtu.to_be_bytes();
            builder
                .ipv4(s.octets(), d.octets(), 64)
                .icmpv4_raw(3, 4, [0, 0, mtu[0], mtu[1]])
                .write(&mut out, &datagram[..quoted])
                .unwrap();
            let (mut header, _) = Ipv4Header::from_slice(&out[14..]).unwrap();
            header.dscp = etherparse::IpDscp::try_new(0xc0 >> 2).unwrap();
            header.dont_fragment = false;
            header.header_checksum = header.calc_header_checksum();
            out[14..34].copy_from_slice(&header.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => builder
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6_raw(2, 0, u32::from(mtu).to_be_bytes())
            .write(&mut out, &datagram[..quoted])
            .unwrap(),
        _ => unreachable!(),
    }
    out
}
