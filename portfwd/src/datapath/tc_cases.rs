//! Table-driven cases for the TC programs through `BPF_PROG_TEST_RUN`
//! (aya's `TestRun`): an input frame, the verdict, the frame that comes out,
//! and the stat it counts. The object is loaded with maps of its own (no
//! pins, nothing attached), so the cases need root but touch no interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use etherparse::{IpFragOffset, Ipv4Header, PacketBuilder};
use portfwd_common::{
    ALLOW, AllowKey, BACKEND_PROGRAMS, SERVICES, SERVICES_GEN, STATS, ServiceKey, ServiceValue,
    Stat, TRANSLATED_MARK, UPLINK_PROGRAMS,
};

use super::object::OBJECT;
use crate::model::{Allowlist, Mapping, Protocol, Refuse};

/// TC verdicts as the test run returns them.
const NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC (-1)
const TO_STACK: u32 = 0; // TC_ACT_OK
const DROP: u32 = 2; // TC_ACT_SHOT

pub(super) const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 1);
pub(super) const CTR_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 2);
pub(super) const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 8, 7);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 1);
const CTR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 8, 0, 0, 0, 0, 7);
/// Clients outside the allowlist of the mappings on 8090 and 5454, which
/// hold `CLIENT_V4`'s /24 and `CLIENT_V6`'s /48.
const OUTSIDER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 7, 7);
const OUTSIDER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 7, 0, 0, 0, 0, 7);

/// Frames to the loopback device's MAC (all zero) are PACKET_HOST in a
/// test run, as frames to the uplink's MAC are on the wire.
const HOST_MAC: [u8; 6] = [0; 6];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

#[derive(Clone, Copy)]
pub(super) enum L4 {
    Syn,
    Ack,
    Udp,
}

/// An Ethernet frame from `src` to `dst`.
pub(super) fn frame(src: SocketAddr, dst: SocketAddr, l4: L4) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family per frame"),
    };
    let payload = b"portfwd";
    let mut out = Vec::new();
    match l4 {
        L4::Syn => ip
            .tcp(src.port(), dst.port(), 1000, 64240)
            .syn()
            .write(&mut out, payload),
        L4::Ack => ip
            .tcp(src.port(), dst.port(), 1000, 64240)
            .ack(1)
            .write(&mut out, payload),
        L4::Udp => ip.udp(src.port(), dst.port()).write(&mut out, payload),
    }
    .expect("building a frame");
    out
}

/// The frame as a later fragment (offset 8 bytes): it carries no ports.
/// (A first fragment does, and is translated.)
fn later_fragment(mut frame: Vec<u8>) -> Vec<u8> {
    let (mut header, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    header.fragment_offset = IpFragOffset::try_new(1).unwrap();
    header.header_checksum = header.calc_header_checksum();
    let bytes = header.to_bytes();
    frame[14..14 + bytes.len()].copy_from_slice(&bytes);
    frame
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    /// None: the frame comes out as it went in.
    output: Option<Vec<u8>>,
    counts: Stat,
}

pub(super) fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn cases() -> Vec<Case> {
    let syn = frame(v4(CLIENT_V4, 40001), v4(HOST_V4, 8080), L4::Syn);
    let syn_out = frame(v4(CLIENT_V4, 40001), v4(CTR_V4, 80), L4::Syn);
    let udp = frame(v4(CLIENT_V4, 40002), v4(HOST_V4, 5353), L4::Udp);
    let udp_out = frame(v4(CLIENT_V4, 40002), v4(CTR_V4, 53), L4::Udp);
    let syn6 = frame(v6(CLIENT_V6, 40003), v6(HOST_V6, 8080), L4::Syn);
    let syn6_out = frame(v6(CLIENT_V6, 40003), v6(CTR_V6, 80), L4::Syn);
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let case = |name, input, verdict, output, counts| Case {
        name,
        input,
        verdict,
        output,
        counts,
    };
    vec![
        case(
            "a SYN to a published port",
            syn.clone(),
            TO_STACK,
            Some(syn_out),
            Stat::ToStack,
        ),
        case(
            "UDP to a published port",
            udp,
            TO_STACK,
            Some(udp_out),
            Stat::ToStack,
        ),
        case(
            "an IPv6 SYN to a published port",
            syn6,
            TO_STACK,
            Some(syn6_out),
            Stat::ToStack,
        ),
        case(
            "a SYN to a port nobody published",
            frame(v4(CLIENT_V4, 40004), v4(HOST_V4, 8081), L4::Syn),
            NEXT,
            None,
            Stat::FlowNew,
        ),
        case(
            "a mid-flow ACK that conntrack does not know",
            frame(v4(CLIENT_V4, 40005), v4(HOST_V4, 8080), L4::Ack),
            NEXT,
            None,
            Stat::UntrackedMidflow,
        ),
        case(
            "a later fragment",
            later_fragment(frame(v4(CLIENT_V4, 40006), v4(HOST_V4, 8080), L4::Syn)),
            NEXT,
            None,
            Stat::PassFragment,
        ),
        case("not IP", arp, NEXT, None, Stat::PassNotIp),
        case(
            "a SYN from a client the allowlist holds",
            frame(v4(CLIENT_V4, 40011), v4(HOST_V4, 8090), L4::Syn),
            TO_STACK,
            Some(frame(v4(CLIENT_V4, 40011), v4(CTR_V4, 80), L4::Syn)),
            Stat::ToStack,
        ),
        case(
            "a SYN from a client outside the allowlist",
            frame(v4(OUTSIDER_V4, 40012), v4(HOST_V4, 8090), L4::Syn),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "UDP from a client outside the allowlist",
            frame(v4(OUTSIDER_V4, 40013), v4(HOST_V4, 5454), L4::Udp),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "an IPv6 SYN from a client the allowlist holds",
            frame(v6(CLIENT_V6, 40014), v6(HOST_V6, 8090), L4::Syn),
            TO_STACK,
            Some(frame(v6(CLIENT_V6, 40014), v6(CTR_V6, 80), L4::Syn)),
            Stat::ToStack,
        ),
        case(
            "an IPv6 SYN from a client outside the allowlist",
            frame(v6(OUTSIDER_V6, 40015), v6(HOST_V6, 8090), L4::Syn),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "a forged SYN to a loopback address",
            frame(v4(CLIENT_V4, 40007), v4(Ipv4Addr::LOCALHOST, 8080), L4::Syn),
            DROP,
            None,
            Stat::DroppedLoopback,
        ),
        case(
            "a forged IPv6 SYN from ::1",
            frame(v6(Ipv6Addr::LOCALHOST, 40008), v6(HOST_V6, 8080), L4::Syn),
            DROP,
            None,
            Stat::DroppedLoopback,
        ),
        case(
            "a truncated TCP header",
            syn[..14 + 20 + 8].to_vec(),
            NEXT,
            None,
            Stat::PassTruncated,
        ),
    ]
}

/// The published mappings: TCP 8080 -> 80 on both families, UDP 5353 ->
/// 53; with an allowlist, TCP 8090 -> 80 on both families and UDP 5454 ->
/// 53; interface 0, so rewritten packets go to the stack. The allowlists
/// refuse silently (`--refuse drop`); the answers of the default are
/// `tc_cases_reply`'s.
fn publish(ebpf: &mut Ebpf) {
    let allow = Allowlist {
        refuse: Refuse::Drop,
        ..Allowlist::parse(&["10.9.8.0/24", "fd00:9:8::/48"]).unwrap()
    };
    let mut mappings = Vec::new();
    for (protocol, host, container, allow) in [
        (Protocol::Tcp, v4(HOST_V4, 8080), v4(CTR_V4, 80), None),
        (Protocol::Udp, v4(HOST_V4, 5353), v4(CTR_V4, 53), None),
        (Protocol::Tcp, v6(HOST_V6, 8080), v6(CTR_V6, 80), None),
        (
            Protocol::Tcp,
            v4(HOST_V4, 8090),
            v4(CTR_V4, 80),
            Some(&allow),
        ),
        (
            Protocol::Udp,
            v4(HOST_V4, 5454),
            v4(CTR_V4, 53),
            Some(&allow),
        ),
        (
            Protocol::Tcp,
            v6(HOST_V6, 8090),
            v6(CTR_V6, 80),
            Some(&allow),
        ),
    ] {
        mappings.push(Mapping {
            name: "case".into(),
            protocol,
            host,
            container,
            ifindex: 0,
            hold: true,
            allow: allow.map(|a| a.for_family(host.is_ipv4())),
        });
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

pub(super) fn stat(ebpf: &Ebpf, stat: Stat) -> u64 {
    let map = ebpf.map(STATS.name).expect("the stats map");
    let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).unwrap();
    stats.get(&stat.index(), 0).unwrap().iter().sum()
}

#[test]
fn uplink_ingress_cases() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED uplink_ingress_cases: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    publish(&mut ebpf);
    let name = UPLINK_PROGRAMS[0].name;
    let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    program.load().unwrap();
    let mut failures = Vec::new();
    for case in cases() {
        let before = stat(&ebpf, case.counts);
        let program: &SchedClassifier = ebpf.program(name).unwrap().try_into().unwrap();
        let mut out = vec![0u8; case.input.len() + 64];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&case.input),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        out.truncate(result.data_size_out as usize);
        let expected = case.output.as_ref().unwrap_or(&case.input);
        if result.return_value != case.verdict {
            failures.push(format!(
                "{}: verdict {:#x}, expected {:#x}",
                case.name, result.return_value, case.verdict
            ));
        }
        if &out != expected {
            failures.push(format!(
                "{}: frame\n  {out:02x?}\nexpected\n  {expected:02x?}",
                case.name
            ));
        }
        if case.verdict == NEXT && case.counts == Stat::FlowNew {
            // Passing an unpublished port counts nothing.
            if stat(&ebpf, case.counts) != before {
                failures.push(format!("{}: counted {:?}", case.name, case.counts));
            }
        } else if stat(&ebpf, case.counts) != before + 1 {
            failures.push(format!("{}: did not count {:?}", case.name, case.counts));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `struct __sk_buff` as a test run's context: 192 bytes, the mark at 8.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFF: usize = 8;

/// A test run's skb context with the mark `mark` (all else zero: the
/// kernel's defaults).
pub(super) fn skb_ctx(mark: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
    ctx
}

/// One run of `program` on `input` with the skb mark `mark`: the verdict,
/// the frame out and the mark out.
fn run_marked(ebpf: &Ebpf, program: &str, input: &[u8], mark: u32) -> (u32, Vec<u8>, u32) {
    let program: &SchedClassifier = ebpf.program(program).unwrap().try_into().unwrap();
    let ctx_in = skb_ctx(mark);
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let mut out = vec![0u8; input.len() + 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("{program:?}: {e}"));
    out.truncate(result.data_size_out as usize);
    let mark = u32::from_ne_bytes(ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4].try_into().unwrap());
    (result.return_value, out, mark)
}

/// A reply that `backend_in` translated and redirected to the uplink is
/// marked, and the uplink's egress program lets a marked packet go at once
/// (clearing the mark) instead of translating it again; unmarked, the same
/// frame is a routed reply and is translated. A packet that already had a
/// mark keeps it.
#[test]
fn translated_replies_skip_uplink_egress() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED translated_replies_skip_uplink_egress: BPF_PROG_TEST_RUN needs root");
        return;
    }
    const REDIRECT: u32 = 7; // TC_ACT_REDIRECT
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    let mapping = Mapping {
        name: "mark".into(),
        protocol: Protocol::Tcp,
        host: v4(HOST_V4, 8080),
        container: v4(CTR_V4, 80),
        // Any existing interface: a test run returns the verdict, it does
        // not redirect.
        ifindex: 1,
        hold: true,
        allow: None,
    };
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    services.insert(mapping.key(), mapping.value(), 0).unwrap();
    let (uplink_in, uplink_out) = (UPLINK_PROGRAMS[0].name, UPLINK_PROGRAMS[1].name);
    let backend_in = BACKEND_PROGRAMS[0].name;
    for name in [uplink_in, uplink_out, backend_in] {
        let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
    }
    let client = v4(CLIENT_V4, 40001);
    let syn = frame(client, mapping.host, L4::Syn);
    let (verdict, _, _) = run_marked(&ebpf, uplink_in, &syn, 0);
    assert_eq!(verdict, REDIRECT, "the SYN");

    let reply = frame(mapping.container, client, L4::Ack);
    let translated = frame(mapping.host, client, L4::Ack);
    let (verdict, out, mark) = run_marked(&ebpf, backend_in, &reply, 0);
    assert_eq!((verdict, &out), (REDIRECT, &translated), "the reply");
    assert_eq!(mark, TRANSLATED_MARK, "the redirected reply's mark");
    let (_, _, mark) = run_marked(&ebpf, backend_in, &reply, 0x4000);
    assert_eq!(mark, 0x4000, "a reply that had a mark keeps it");

    let (verdict, out, mark) = run_marked(&ebpf, uplink_out, &reply, TRANSLATED_MARK);
    assert_eq!(
        (verdict, &out, mark),
        (NEXT, &reply, 0),
        "a marked packet at egress"
    );
    let (verdict, out, _) = run_marked(&ebpf, uplink_out, &reply, 0);
    assert_eq!((verdict, &out), (TO_STACK, &translated), "a routed reply");
}

/// Offsets in `struct __sk_buff` of the GSO fields a test run accepts.
const SKB_GSO_SEGS_OFF: usize = 164;
const SKB_GSO_SIZE_OFF: usize = 176;

/// The frame as BIG TCP's GRO leaves a packet over 64 KiB: the IP length
/// field 0 (IPv4 `tot_len`, with the header checksum made right again; IPv6
/// `payload_len`), the length being the skb's.
fn big_tcp(mut frame: Vec<u8>) -> Vec<u8> {
    if frame[14] >> 4 == 4 {
        let (mut header, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
        let bytes = header.to_bytes();
        let mut raw = bytes.to_vec();
        raw[2..4].copy_from_slice(&[0, 0]);
        raw[10..12].copy_from_slice(&[0, 0]);
        // The one's complement sum of the header with tot_len 0.
        let mut sum: u32 = raw
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        header.header_checksum = !(sum as u16);
        raw[10..12].copy_from_slice(&header.header_checksum.to_be_bytes());
        frame[14..14 + raw.len()].copy_from_slice(&raw);
    } else {
        frame[14 + 4..14 + 6].copy_from_slice(&[0, 0]);
    }
    frame
}

/// A packet of a tracked flow that BIG TCP's GRO aggregated (IP length 0,
/// a GSO skb) is translated like any other, on IPv4 and IPv6; with IP
/// length 0 and no GSO it is malformed, and passed as truncated.
#[test]
fn big_tcp_packets_of_tracked_flows_are_translated() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED big_tcp_packets_of_tracked_flows_are_translated: needs root");
        return;
    }
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    publish(&mut ebpf);
    let name = UPLINK_PROGRAMS[0].name;
    let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    program.load().unwrap();
    let mut gso = [0u8; SKB_CTX_LEN];
    gso[SKB_GSO_SEGS_OFF..SKB_GSO_SEGS_OFF + 4].copy_from_slice(&45u32.to_ne_bytes());
    gso[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&1448u32.to_ne_bytes());
    let run = |input: &[u8], ctx: &[u8]| {
        let program: &SchedClassifier = ebpf.program(name).unwrap().try_into().unwrap();
        let mut out = vec![0u8; input.len() + 64];
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(ctx),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .unwrap();
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    };
    let mut failures = Vec::new();
    for (client, published, container) in [
        (v4(CLIENT_V4, 40021), v4(HOST_V4, 8080), v4(CTR_V4, 80)),
        (v6(CLIENT_V6, 40022), v6(HOST_V6, 8080), v6(CTR_V6, 80)),
    ] {
        let (verdict, _) = run(&frame(client, published, L4::Syn), &skb_ctx(0));
        assert_eq!(verdict, TO_STACK, "the SYN to {published}");
        let data = big_tcp(frame(client, published, L4::Ack));
        let expected = big_tcp(frame(client, container, L4::Ack));
        let (verdict, out) = run(&data, &gso);
        if (verdict, &out) != (TO_STACK, &expected) {
            failures.push(format!(
                "{published}: verdict {verdict:#x}, frame\n  {out:02x?}\nexpected\n  {expected:02x?}"
            ));
        }
        let before = stat(&ebpf, Stat::PassTruncated);
        let (verdict, out) = run(&data, &skb_ctx(0));
        if (verdict, &out) != (NEXT, &data) || stat(&ebpf, Stat::PassTruncated) != before + 1 {
            failures.push(format!(
                "{published}: IP length 0 without GSO was not passed"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A tracked flow does not look its mapping up on every packet: only when
/// the services generation moved, which userspace does right after it
/// removes mappings. Then a flow whose mapping is gone or points elsewhere
/// stops (passed untouched, counted); before, it goes on.
#[test]
fn a_flow_rechecks_its_mapping_when_the_services_generation_moves() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED a_flow_rechecks_its_mapping...: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
    publish(&mut ebpf);
    let name = UPLINK_PROGRAMS[0].name;
    let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    program.load().unwrap();
    let client = v4(CLIENT_V4, 40031);
    let published = v4(HOST_V4, 8080);
    let data = frame(client, published, L4::Ack);
    let translated = frame(client, v4(CTR_V4, 80), L4::Ack);
    let run = |ebpf: &Ebpf, input: &[u8]| {
        let program: &SchedClassifier = ebpf.program(name).unwrap().try_into().unwrap();
        let mut out = vec![0u8; input.len() + 64];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap();
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    };
    assert_eq!(run(&ebpf, &frame(client, published, L4::Syn)).0, TO_STACK);
    assert_eq!(run(&ebpf, &data), (TO_STACK, translated.clone()));

    // The mapping now points at another container, the generation unchanged.
    let moved = Mapping {
        name: "case".into(),
        protocol: Protocol::Tcp,
        host: published,
        container: v4(Ipv4Addr::new(10, 9, 9, 3), 80),
        ifindex: 0,
        hold: true,
        allow: None,
    };
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    services.insert(moved.key(), moved.value(), 0).unwrap();
    assert_eq!(
        run(&ebpf, &data),
        (TO_STACK, translated),
        "the flow goes on while the generation is the same"
    );

    let map = ebpf.map_mut(SERVICES_GEN.name).expect("the generation map");
    let mut generation: Array<&mut MapData, u64> = Array::try_from(map).unwrap();
    generation.set(0, 1, 0).unwrap();
    let stopped = stat(&ebpf, Stat::FlowStopped);
    assert_eq!(
        run(&ebpf, &data),
        (NEXT, data.clone()),
        "the generation moved: the flow's mapping changed, it stops"
    );
    assert_eq!(stat(&ebpf, Stat::FlowStopped), stopped + 1);
}

/// A TCP frame from `src` to `dst` with the ACK flag and FIN or RST.
fn closing_frame(src: SocketAddr, dst: SocketAddr, rst: bool) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        unreachable!("IPv4 only")
    };
    let tcp = PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC)
        .ipv4(s.octets(), d.octets(), 64)
        .tcp(src.port(), dst.port(), 1000, 64240);
    let tcp = if rst { tcp.rst() } else { tcp.fin() };
    let mut out = Vec::new();
    tcp.ack(1).write(&mut out, &[]).expect("building a frame");
    out
}

/// A SYN that reopens a closing flow (the client reusing its port) starts
/// a new flow and forgets the old one whole: its reply entry too, whose key
/// differs when the new flow goes elsewhere (here the mapping moved to
/// another container). Left behind, that entry translated the old
/// container's late packets into the new connection, and stopping it (its
/// mapping changed) removed the new flow's forward entry. Flows closed by
/// FINs both ways and by a RST; a flow closed by a RST is still translated
/// during the closing time (before, the entry that saw the RST kept no
/// closing time and expired at once).
#[test]
fn a_syn_that_reopens_a_closing_flow_forgets_its_old_reply_entry() {
    use portfwd_common::{CONNTRACK, CtKey, CtValue};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED a_syn_that_reopens_a_closing_flow...: BPF_PROG_TEST_RUN needs root");
        return;
    }
    for (rst, client_port) in [(false, 40041), (true, 40042)] {
        let how = if rst {
            "closed by a RST"
        } else {
            "closed by FINs"
        };
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
        publish(&mut ebpf);
        let (uplink_in, backend_in) = (UPLINK_PROGRAMS[0].name, BACKEND_PROGRAMS[0].name);
        for name in [uplink_in, backend_in] {
            let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            program.load().unwrap();
        }
        let client = v4(CLIENT_V4, client_port);
        let published = v4(HOST_V4, 8080);
        let (old, new) = (v4(CTR_V4, 80), v4(Ipv4Addr::new(10, 9, 9, 3), 80));
        let entries = |ebpf: &Ebpf| {
            let map = ebpf.map(CONNTRACK.name).expect("the conntrack map");
            let map: HashMap<&MapData, CtKey, CtValue> = HashMap::try_from(map).unwrap();
            map.keys().filter_map(Result::ok).count()
        };
        let syn = frame(client, published, L4::Syn);
        assert_eq!(
            run_marked(&ebpf, uplink_in, &syn, 0).1,
            frame(client, old, L4::Syn),
            "{how}"
        );
        let close = closing_frame(client, published, rst);
        assert_eq!(
            run_marked(&ebpf, uplink_in, &close, 0).1,
            closing_frame(client, old, rst),
            "{how}"
        );
        if !rst {
            let reply = closing_frame(old, client, false);
            assert_eq!(
                run_marked(&ebpf, backend_in, &reply, 0).1,
                closing_frame(published, client, false),
                "{how}: the container's FIN"
            );
        }
        let data = frame(client, published, L4::Ack);
        assert_eq!(
            run_marked(&ebpf, uplink_in, &data, 0),
            (TO_STACK, frame(client, old, L4::Ack), 0),
            "{how}: a late packet of the closing flow"
        );
        assert_eq!(entries(&ebpf), 2, "{how}");

        // The mapping moves to another container; the client dials again
        // from the same port.
        let moved = Mapping {
            name: "case".into(),
            protocol: Protocol::Tcp,
            host: published,
            container: new,
            ifindex: 0,
            hold: true,
            allow: None,
        };
        let map = ebpf.map_mut(SERVICES.name).expect("the services map");
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(map).unwrap();
        services.insert(moved.key(), moved.value(), 0).unwrap();
        let map = ebpf.map_mut(SERVICES_GEN.name).expect("the generation map");
        let mut generation: Array<&mut MapData, u64> = Array::try_from(map).unwrap();
        generation.set(0, 1, 0).unwrap();
        assert_eq!(
            run_marked(&ebpf, uplink_in, &syn, 0).1,
            frame(client, new, L4::Syn),
            "{how}: the SYN reopens the flow to the new container"
        );
        assert_eq!(
            entries(&ebpf),
            2,
            "{how}: the new flow's two entries, and nothing of the old flow"
        );

        // A late packet of the old container's connection: not translated,
        // and the new flow goes on.
        let late = frame(old, client, L4::Ack);
        let (verdict, out, _) = run_marked(&ebpf, backend_in, &late, 0);
        assert_eq!(
            (verdict, out),
            (NEXT, late),
            "{how}: the old container's late packet"
        );
        assert_eq!(
            run_marked(&ebpf, uplink_in, &data, 0),
            (TO_STACK, frame(client, new, L4::Ack), 0),
            "{how}: the new flow's data"
        );
    }
}
