//! What each TC program costs per packet, through `BPF_PROG_TEST_RUN` with
//! the kernel's `repeat` (the kernel times the runs itself: no syscall, no
//! scheduler in the figure). `cargo xtask bench --prog` runs it; it is a
//! measurement, not a test (ignored by default, asserts no speed).
//!
//! A test run repeats the program on one skb, so a rewrite made by one run
//! is what the next run sees. The tracked cases therefore use two mappings
//! that point at each other (A:8080 -> B:80 and B:80 -> A:8080) with one
//! flow through each: a packet of one flow comes out as a packet of the
//! other, and every run is a real translation of a tracked flow. A new
//! flow cannot repeat on one skb (its first run tracks it): that case is
//! one test run per new flow, each with a fresh client port, and the
//! per-run overhead of that method is shown beside it.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Command,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use portfwd_common::{
    CONNTRACK, CONNTRACK_OPENING, COUNTERS, CtKey, CtValue, MappingCounters, PEER_LINKS,
    ServiceKey, Stat, TRACE_ON, TRANSLATED_MARK, TraceConfig,
};

use portfwd_testkit::netns;

use super::link_bits::set_listed;
use super::object::OBJECT;
use super::tc_fixture::{
    BACKEND_IN, CLIENT_V4, CTR_V4, HOST_V4, L4, OTHER_CTR_V4, SKB_CTX_LEN, TCP_ACK, TCP_FIN,
    TCP_SYN, UPLINK_IN, UPLINK_OUT, as_fragment, at, connection_in_own_namespace, frame,
    ingress_ctx, insert_services, mark_no_masq_flow, record_host_address, segment, skb_ctx,
    stat_if_counted, stat_of,
};
use crate::model::{Mapping, Protocol};

/// Each repeated case runs `PASSES` times `REPEAT` runs; the figure is the
/// fastest pass (other work on the machine only ever adds time). New flows:
/// the median of single runs.
const REPEAT: u32 = 1_000_000;
const PASSES: usize = 3;
const SINGLE_RUNS: u32 = 100_000;
/// New flows while tracing: each writes a 104-byte event (with its header)
/// into the 256 KiB ring buffer, which nobody reads here.
const TRACED_RUNS: u32 = 2_000;

/// The redirect target of the mappings: any existing interface will do, a
/// test run does not redirect (it returns the verdict).
const LOOPBACK_IFINDEX: u32 = 1;

/// The container of the peer case: behind `PEER_VETH`, published at its
/// own address and port (a translation that leaves the packet as it was,
/// so that it repeats on one skb).
const PEER_CTR_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 4);
/// A veth of the measurement's namespace, listed in `pf_peer_link_bits`.
const PEER_VETH: &str = "pfcost0";

/// The peer case's container, published at its own address and port.
fn peer_container() -> SocketAddr {
    at(PEER_CTR_V4, 80)
}

/// The wildcard case's mapping: published on every address of the host
/// (0.0.0.0:8081) to B:80; and the address its SYNs dial (A:8081).
fn wildcard_mapping() -> (SocketAddr, SocketAddr, SocketAddr) {
    let (_, b, _) = cycle();
    (at(Ipv4Addr::UNSPECIFIED, 8081), b, at(HOST_V4, 8081))
}

/// The wildcard case's clients, `new_client(WILDCARD_CLIENTS..)`: apart
/// from the other new flows' (the same container port: their reply keys
/// would clash).
const WILDCARD_CLIENTS: u32 = 4 * SINGLE_RUNS;

/// A (host) A:8080 -> B:80 and B:80 -> A:8080, TCP, with counters; the
/// wildcard case's mapping; and the peer case's, to `PEER_VETH`.
fn publish_cycle(ebpf: &mut Ebpf, peer_ifindex: u32) {
    let a = at(HOST_V4, 8080);
    let b = at(CTR_V4, 80);
    let peer = peer_container();
    let (wildcard, wildcard_container, _) = wildcard_mapping();
    let mappings: Vec<Mapping> = [
        (a, b, LOOPBACK_IFINDEX),
        (b, a, LOOPBACK_IFINDEX),
        (wildcard, wildcard_container, LOOPBACK_IFINDEX),
        (peer, peer, peer_ifindex),
    ]
    .into_iter()
    .map(|(host, container, ifindex)| Mapping {
        name: "cost".into(),
        protocol: Protocol::Tcp,
        host,
        container,
        ifindex,
        hold: true,
        allow: None,
    })
    .collect();
    insert_services(ebpf, &mappings);
    if let Some(map) = ebpf.map_mut(PEER_LINKS.name) {
        let mut peer_links: Array<&mut MapData, u32> = Array::try_from(map).unwrap();
        set_listed(&mut peer_links, peer_ifindex, true).unwrap();
    } else if let Some(map) = ebpf.map_mut("pf_peer_links") {
        // An object of a build before the bitmap (`--against`): its hash.
        let mut peer_links: HashMap<&mut MapData, u32, u8> = HashMap::try_from(map).unwrap();
        peer_links.insert(peer_ifindex, 1, 0).unwrap();
    }
    let mut counters: PerCpuHashMap<&mut MapData, ServiceKey, MappingCounters> =
        PerCpuHashMap::try_from(ebpf.map_mut(COUNTERS.name).unwrap()).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    for mapping in &mappings {
        let zero = PerCpuValues::try_from(vec![MappingCounters::default(); cpus]).unwrap();
        counters.insert(mapping.key(), zero, 0).unwrap();
    }
}

fn run(ebpf: &Ebpf, program: &str, input: &[u8], repeat: u32) -> (u32, u64) {
    run_with(ebpf, program, input, repeat, Skb::Default)
}

/// The skb of a test run, as far as the cases differ.
#[derive(Clone, Copy)]
enum Skb {
    /// The kernel's defaults: no mark, received by no interface.
    Default,
    /// With this mark (of the first run: a program may change it).
    Marked(u32),
    /// Received by this interface (`ingress_ifindex`).
    ReceivedBy(u32),
}

impl Skb {
    fn ctx(self) -> Option<[u8; SKB_CTX_LEN]> {
        match self {
            Skb::Default => None,
            Skb::Marked(mark) => Some(skb_ctx(mark)),
            Skb::ReceivedBy(ifindex) => Some(ingress_ctx(ifindex)),
        }
    }
}

/// `repeat` runs of `program` on `input` in `skb`: the verdict and ns per
/// run.
fn run_with(ebpf: &Ebpf, program: &str, input: &[u8], repeat: u32, skb: Skb) -> (u32, u64) {
    let program: &SchedClassifier = ebpf.program(program).unwrap().try_into().unwrap();
    let mut out = vec![0u8; input.len() + 64];
    let ctx = skb.ctx();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: ctx.as_ref().map(|ctx| &ctx[..]),
            repeat,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("{program:?}: {e}"));
    (result.return_value, result.duration.as_nanos() as u64)
}

/// The verdict of a row that sums others.
const NO_VERDICT: u32 = 0xffff_fffe;

fn verdict(code: u32) -> &'static str {
    if code == NO_VERDICT {
        return "–";
    }
    match code as i32 {
        -1 => "next",
        0 => "stack",
        2 => "drop",
        7 => "redirect",
        _ => "other",
    }
}

/// One measured case: program, packet, ns per run, verdict.
struct Row {
    program: &'static str,
    case: &'static str,
    ns: u64,
    verdict: u32,
}

/// Host address and port, container address and port of the connection a
/// host process made to a container, which the measurement makes first
/// (`connection_in_own_namespace`).
const HOST_CONNECTION: (SocketAddrV4, SocketAddrV4) = (
    SocketAddrV4::new(HOST_V4, 45001),
    SocketAddrV4::new(OTHER_CTR_V4, 80),
);

/// The peer case's veth, in this thread's namespace
/// (`connection_in_own_namespace` made it): a route and a neighbour entry for its container, and
/// forwarding, without which `bpf_fib_lookup` does not answer (the frame
/// would not be addressed).
fn peer_link() {
    let peer = PEER_CTR_V4.to_string();
    for args in [
        vec![
            "link", "add", PEER_VETH, "type", "veth", "peer", "name", "pfcost1",
        ],
        vec!["link", "set", PEER_VETH, "up"],
        vec!["link", "set", "pfcost1", "up"],
        vec!["route", "add", &peer, "dev", PEER_VETH],
        vec![
            "neigh",
            "add",
            &peer,
            "lladdr",
            "02:00:00:00:00:0c",
            "dev",
            PEER_VETH,
        ],
    ] {
        netns::ip(&args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    }
    let status = Command::new("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .expect("running sysctl");
    assert!(status.success(), "sysctl net.ipv4.ip_forward=1");
}

/// How many instructions the verifier walked to load each TC program (the
/// kernel's `verified_insns`, 5.16 on; None before): what a load costs, and
/// how close a program is to the verifier's limit of a million.
type Verified = [(&'static str, Option<u32>); 3];

/// Every case, on a fresh load of `ebpf` (an object's programs and maps):
/// this build's (`this_build`), or another's (`--against`).
fn measure(mut ebpf: Ebpf, this_build: bool) -> (Vec<Row>, Verified) {
    let peer_ifindex = nix::net::if_::if_nametoindex(PEER_VETH).expect("the peer case's veth");
    publish_cycle(&mut ebpf, peer_ifindex);
    record_host_address(&mut ebpf, HOST_V4.into());
    let mut verified: Verified = [(UPLINK_IN, None), (UPLINK_OUT, None), (BACKEND_IN, None)];
    for (name, instructions) in &mut verified {
        let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
        *instructions = program
            .info()
            .ok()
            .and_then(|info| info.verified_instruction_count());
    }
    open_cycle_flows(&ebpf);
    let mut rows = measure_repeated(&ebpf);
    rows.extend(measure_without_masq_flows(&mut ebpf, this_build));
    rows.extend(measure_single_runs(&ebpf));
    rows.push(measure_traced(&mut ebpf));
    forget_flows(&mut ebpf);
    rows.extend(measure_connection(&ebpf, this_build));
    rows.push(measure_wildcard_syn(&ebpf));
    (rows, verified)
}

/// Empties the conntrack tables (each that the object has), so that the
/// connection rows meet what a host serving short connections has: the
/// entries of its flows under way (each flow ends at its last ACK), not the
/// hundreds of thousands of flows the single-run rows opened and never
/// answered, which the holder's sweep would remove after their timeout.
/// (Those fill this build's opening table, a quarter of the main one, where
/// a new flow's insertions then evict: the single-run SYN rows are a SYN
/// flood's cost.)
fn forget_flows(ebpf: &mut Ebpf) {
    for name in [CONNTRACK.name, CONNTRACK_OPENING.name] {
        let Some(map) = ebpf.map_mut(name) else {
            continue;
        };
        let mut map: HashMap<&mut MapData, CtKey, CtValue> = HashMap::try_from(map).unwrap();
        let keys: Vec<CtKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            map.remove(&key).ok();
        }
    }
}

/// The host connection's cases once the sweep has found no masqueraded
/// flow in the table (`pf_masq_flows`): no conntrack lookup for either.
/// The cycle's flows are not masqueraded. This
/// build must pass every run of both; an older one (`--against`) is
/// measured as it is (without the map, or the UDP shortcut, through the
/// lookups).
fn measure_without_masq_flows(ebpf: &mut Ebpf, this_build: bool) -> Vec<Row> {
    let marked = mark_no_masq_flow(ebpf);
    assert!(marked || !this_build, "this build has pf_masq_flows");
    let cases = [
        (
            "container TCP of a host connection, no masqueraded flow (no lookup)",
            frame(HOST_CONNECTION.1.into(), HOST_CONNECTION.0.into(), L4::Ack),
        ),
        (
            "container UDP to the host, no masqueraded flow (no conntrack lookup)",
            frame(at(OTHER_CTR_V4, 5000), at(HOST_V4, 53), L4::Udp),
        ),
    ];
    let mut rows = Vec::new();
    for (case, input) in cases {
        let passed_before = stat_if_counted(ebpf, Stat::PassHostConnection);
        let passes = (0..PASSES).map(|_| run(ebpf, BACKEND_IN, &input, REPEAT));
        let (verdict, ns) = passes.min_by_key(|&(_, ns)| ns).unwrap();
        let passed_after = stat_if_counted(ebpf, Stat::PassHostConnection);
        if let (true, Some(before), Some(after)) = (this_build, passed_before, passed_after) {
            let runs = PASSES as u64 * u64::from(REPEAT);
            assert_eq!(after - before, runs, "{case}: every run passed first");
        }
        rows.push(Row {
            program: BACKEND_IN,
            case,
            ns,
            verdict,
        });
    }
    rows
}

/// The cycle's host side (A), container side (B), and the client of its
/// two flows.
fn cycle() -> (SocketAddr, SocketAddr, SocketAddr) {
    (at(HOST_V4, 8080), at(CTR_V4, 80), at(CLIENT_V4, 40001))
}

/// The datagram of the fragment case: one through each of the cycle's
/// flows, so that a later fragment translated through one comes out as a
/// later fragment of the other's.
const CYCLE_DATAGRAM: u16 = 0x5151;

/// A fragment of the cycle's datagram from its client to `to` (see
/// `as_fragment`).
fn cycle_fragment(to: SocketAddr, offset: u16) -> Vec<u8> {
    let (_, _, client) = cycle();
    as_fragment(frame(client, to, L4::Ack), CYCLE_DATAGRAM, offset, true)
}

/// The two flows of the cycle and the peer case's, opened and answered
/// (established); then the first fragment of the cycle's datagram through
/// each of the cycle's flows.
fn open_cycle_flows(ebpf: &Ebpf) {
    let (a, b, client) = cycle();
    let peer = peer_container();
    for (published, container) in [(a, b), (b, a), (peer, peer)] {
        let (code, _) = run(ebpf, UPLINK_IN, &frame(client, published, L4::Syn), 1);
        assert_eq!(verdict(code), "redirect", "opening a flow to {published}");
        let (code, _) = run(ebpf, BACKEND_IN, &frame(container, client, L4::Ack), 1);
        assert_eq!(verdict(code), "redirect", "answering from {container}");
    }
    for published in [a, b] {
        let (code, _) = run(ebpf, UPLINK_IN, &cycle_fragment(published, 0), 1);
        assert_eq!(verdict(code), "redirect", "a first fragment to {published}");
    }
}

/// A frame to another MAC (PACKET_OTHERHOST): the program's first check
/// sends it on; the cost of running a program at all.
fn frame_for_another_host() -> Vec<u8> {
    let (a, _, client) = cycle();
    let mut other_host = frame(client, a, L4::Ack);
    other_host[..6].copy_from_slice(&[2, 0, 0, 0, 0, 8]);
    other_host
}

/// The cases that repeat on one skb: the fastest of `PASSES` passes.
fn measure_repeated(ebpf: &Ebpf) -> Vec<Row> {
    let (a, b, client) = cycle();
    let to_peer_before = stat_if_counted(ebpf, Stat::RedirectedToPeer);
    let cases = [
        (
            UPLINK_IN,
            "baseline: frame for another host",
            frame_for_another_host(),
        ),
        (
            UPLINK_IN,
            "established: data of a tracked flow",
            frame(client, a, L4::Ack),
        ),
        (
            UPLINK_IN,
            "established, into a container's veth (frame addressed)",
            frame(client, peer_container(), L4::Ack),
        ),
        (
            UPLINK_IN,
            "later fragment of a translated datagram",
            cycle_fragment(a, 1),
        ),
        (
            BACKEND_IN,
            "reply of a tracked flow",
            frame(b, client, L4::Ack),
        ),
        (
            UPLINK_OUT,
            "reply of a tracked flow (routed)",
            frame(b, client, L4::Ack),
        ),
        (
            BACKEND_IN,
            "untracked: container TCP to the host",
            frame(at(OTHER_CTR_V4, 80), at(HOST_V4, 45000), L4::Ack),
        ),
        (
            BACKEND_IN,
            "container TCP of a host connection (socket path)",
            frame(HOST_CONNECTION.1.into(), HOST_CONNECTION.0.into(), L4::Ack),
        ),
        (
            BACKEND_IN,
            "untracked: container UDP to the host",
            frame(at(OTHER_CTR_V4, 5000), at(HOST_V4, 53), L4::Udp),
        ),
        (
            UPLINK_IN,
            "unrelated: host's own TCP, inbound",
            frame(at(CLIENT_V4, 443), at(HOST_V4, 50000), L4::Ack),
        ),
        (
            UPLINK_OUT,
            "unrelated: host's own TCP, outbound",
            frame(at(HOST_V4, 50000), at(CLIENT_V4, 443), L4::Ack),
        ),
        (
            UPLINK_OUT,
            "unrelated: host's own UDP, outbound",
            frame(at(HOST_V4, 50000), at(CLIENT_V4, 53), L4::Udp),
        ),
    ];
    let rows = cases
        .into_iter()
        .map(|(program, case, input)| {
            let passes = (0..PASSES).map(|_| run(ebpf, program, &input, REPEAT));
            let (verdict, ns) = passes.min_by_key(|&(_, ns)| ns).unwrap();
            Row {
                program,
                case,
                ns,
                verdict,
            }
        })
        .collect();
    // Every run of the peer case went into the peer, its frame
    // addressed (the cycle's flows go to the loopback device, unlisted).
    let runs = PASSES as u64 * u64::from(REPEAT);
    if let (Some(before), Some(after)) = (
        to_peer_before,
        stat_if_counted(ebpf, Stat::RedirectedToPeer),
    ) {
        assert_eq!(
            after - before,
            runs,
            "the peer case's packets went into the peer"
        );
    }
    rows
}

/// The median of `runs` single runs of `program` on `input(0..runs)`,
/// in `skb`: (ns, verdict).
fn median_single_run(
    ebpf: &Ebpf,
    program: &str,
    skb: Skb,
    runs: std::ops::Range<u32>,
    input: impl Fn(u32) -> Vec<u8>,
) -> (u64, u32) {
    let mut times: Vec<(u64, u32)> = runs
        .map(|i| {
            let (verdict, ns) = run_with(ebpf, program, &input(i), 1, skb);
            (ns, verdict)
        })
        .collect();
    median(&mut times)
}

/// The median of single runs' (ns, verdict).
fn median(times: &mut [(u64, u32)]) -> (u64, u32) {
    times.sort_unstable();
    times[times.len() / 2]
}

/// A new client for each `i`: distinct addresses and ports.
fn new_client(i: u32) -> SocketAddr {
    let host = 10 + (i / 50_000) as u8;
    at(Ipv4Addr::new(10, 9, 7, host), 10_000 + (i % 50_000) as u16)
}

/// The cases that cannot repeat on one skb: the median of single runs.
fn measure_single_runs(ebpf: &Ebpf) -> Vec<Row> {
    let (a, _, _) = cycle();
    let flows_before = stat_of(ebpf, Stat::FlowNew);
    let mut rows = Vec::new();
    let mut single =
        |program: &'static str, case: &'static str, skb: Skb, input: &dyn Fn(u32) -> Vec<u8>| {
            let (ns, verdict) = median_single_run(ebpf, program, skb, 0..SINGLE_RUNS, input);
            rows.push(Row {
                program,
                case,
                ns,
                verdict,
            });
        };
    // New flows: one single run each, from distinct client ports.
    single(
        UPLINK_IN,
        "SYN of a new flow (single runs)",
        Skb::Default,
        &|i| frame(new_client(i), a, L4::Syn),
    );
    let new_flows = stat_of(ebpf, Stat::FlowNew) - flows_before;
    assert_eq!(new_flows, u64::from(SINGLE_RUNS), "every SYN opened a flow");
    // The same clients again, each after its flow was reset (untimed): a
    // SYN reopening a closing flow, as a client that dials again and again
    // soon reuses its ports.
    for i in 0..SINGLE_RUNS {
        run(ebpf, UPLINK_IN, &frame(new_client(i), a, L4::Rst), 1);
    }
    let flows_before = stat_of(ebpf, Stat::FlowNew);
    single(
        UPLINK_IN,
        "SYN reopening a closing flow (single runs)",
        Skb::Default,
        &|i| frame(new_client(i), a, L4::Syn),
    );
    let reopened = stat_of(ebpf, Stat::FlowNew) - flows_before;
    assert_eq!(
        reopened,
        u64::from(SINGLE_RUNS),
        "every SYN reopened its flow"
    );
    // A reply that backend_in translated and redirected reaches the
    // uplink's egress marked (its first run clears the mark: single runs).
    // Another client port than the cycle's: here A:8080 is also a container
    // address, whose replies the cycle's second flow translates.
    single(
        UPLINK_OUT,
        "reply translated at ingress (marked; single runs)",
        Skb::Marked(TRANSLATED_MARK),
        &|_| frame(a, at(CLIENT_V4, 40002), L4::Ack),
    );
    let other_host = frame_for_another_host();
    single(
        UPLINK_IN,
        "baseline, single runs (overhead of that method)",
        Skb::Default,
        &|_| other_host.clone(),
    );
    rows
}

/// The clients of `measure_connection`, `new_client(CONNECTION_CLIENTS..)`.
const CONNECTION_CLIENTS: u32 = 6 * SINGLE_RUNS;
/// Connections of `measure_connection`: each packet is a single run.
const CONNECTIONS: u32 = 20_000;

/// The packets of one short connection through the cycle's first mapping
/// (A:8080 -> B:80), as a client that sends one request and a server that
/// answers and closes (HTTP/1.0, the bench's new connections) exchange
/// them: (program, case, from the client, flags, sequence number,
/// acknowledgment, payload length).
const CONNECTION: [(&str, &str, bool, u8, u32, u32, u32); 7] = {
    const ISN: u32 = 1_000;
    const SERVER_ISN: u32 = 500_000;
    const REQUEST: u32 = 40;
    const RESPONSE: u32 = 200;
    const AFTER_REQUEST: u32 = ISN + 1 + REQUEST;
    const AFTER_RESPONSE: u32 = SERVER_ISN + 1 + RESPONSE;
    [
        (
            UPLINK_IN,
            "connection: client's SYN (single runs)",
            true,
            TCP_SYN,
            ISN,
            0,
            0,
        ),
        (
            BACKEND_IN,
            "connection: container's SYN-ACK",
            false,
            TCP_SYN | TCP_ACK,
            SERVER_ISN,
            ISN + 1,
            0,
        ),
        (
            UPLINK_IN,
            "connection: client's ACK (establishes)",
            true,
            TCP_ACK,
            ISN + 1,
            SERVER_ISN + 1,
            0,
        ),
        (
            UPLINK_IN,
            "connection: client's request",
            true,
            TCP_ACK,
            ISN + 1,
            SERVER_ISN + 1,
            REQUEST,
        ),
        (
            BACKEND_IN,
            "connection: container's response and FIN",
            false,
            TCP_FIN | TCP_ACK,
            SERVER_ISN + 1,
            AFTER_REQUEST,
            RESPONSE,
        ),
        (
            UPLINK_IN,
            "connection: client's FIN",
            true,
            TCP_FIN | TCP_ACK,
            AFTER_REQUEST,
            AFTER_RESPONSE + 1,
            0,
        ),
        (
            BACKEND_IN,
            "connection: container's last ACK (ends the flow)",
            false,
            TCP_ACK,
            AFTER_RESPONSE + 1,
            AFTER_REQUEST + 1,
            0,
        ),
    ]
};

/// A whole short connection, packet by packet (`CONNECTION`): the median
/// of single runs for each packet, and their sum, the BPF time of one
/// connection on the TC path (what the bench's new-connection rate pays).
/// Each connection must end at its last ACK (this build).
fn measure_connection(ebpf: &Ebpf, this_build: bool) -> Vec<Row> {
    let (published, container, _) = cycle();
    let ended_before = stat_if_counted(ebpf, Stat::FlowEnded);
    let mut times = vec![Vec::with_capacity(CONNECTIONS as usize); CONNECTION.len()];
    let payload = [b'x'; 200];
    for i in CONNECTION_CLIENTS..CONNECTION_CLIENTS + CONNECTIONS {
        let client = new_client(i);
        for (step, &(program, _, from_client, flags, seq, ack, len)) in
            CONNECTION.iter().enumerate()
        {
            let ends = if from_client {
                (client, published)
            } else {
                (container, client)
            };
            let input = segment(ends, flags, (seq, ack), &payload[..len as usize]);
            let (verdict, ns) = run(ebpf, program, &input, 1);
            times[step].push((ns, verdict));
        }
    }
    if let (true, Some(before), Some(after)) = (
        this_build,
        ended_before,
        stat_if_counted(ebpf, Stat::FlowEnded),
    ) {
        assert_eq!(
            after - before,
            u64::from(CONNECTIONS),
            "every connection ended at its last ACK"
        );
    }
    let mut rows: Vec<Row> = CONNECTION
        .iter()
        .zip(&mut times)
        .map(|(&(program, case, ..), times)| {
            let (ns, verdict) = median(times);
            Row {
                program,
                case,
                ns,
                verdict,
            }
        })
        .collect();
    let total = rows.iter().map(|row| row.ns).sum();
    rows.push(Row {
        program: "all",
        case: "connection: its 7 packets (sum of the medians)",
        ns: total,
        verdict: NO_VERDICT,
    });
    rows
}

/// The same new flows with `portfwd trace` running: what a trace adds
/// to the rare events it reports (a tracked flow's packets never look
/// at it). Few enough runs that the ring buffer holds every event.
fn measure_traced(ebpf: &mut Ebpf) -> Row {
    const TRACED: &str = "SYN of a new flow, `portfwd trace` running (single runs)";
    let Some(switch) = ebpf.map_mut(TRACE_ON.name) else {
        // A build from before tracing (`--against` an older object).
        return Row {
            program: UPLINK_IN,
            case: TRACED,
            ns: 0,
            verdict: u32::MAX,
        };
    };
    let mut switch: Array<&mut MapData, TraceConfig> = Array::try_from(switch).unwrap();
    let on = TraceConfig {
        enabled: 1,
        ..TraceConfig::default()
    };
    switch.set(0, on, 0).unwrap();
    let (a, _, _) = cycle();
    let runs = SINGLE_RUNS..SINGLE_RUNS + TRACED_RUNS;
    let (ns, verdict) = median_single_run(ebpf, UPLINK_IN, Skb::Default, runs, |i| {
        frame(new_client(i), a, L4::Syn)
    });
    assert_eq!(
        stat_of(ebpf, Stat::TraceLost),
        0,
        "the ring buffer held every event"
    );
    Row {
        program: UPLINK_IN,
        case: TRACED,
        ns,
        verdict,
    }
}

/// A new flow to a wildcard mapping (`-p 8081:80`, every address of the
/// host: what `docker run -p` and the bench publish): the programs check
/// that the destination is the host's own. Received by the loopback
/// device, which holds the host's address here. Last: its flows fill the
/// table further, which would move the figures measured after it.
fn measure_wildcard_syn(ebpf: &Ebpf) -> Row {
    const CASE: &str = "SYN of a new flow to a wildcard mapping (single runs)";
    let flows_before = stat_of(ebpf, Stat::FlowNew);
    let (_, _, dialed) = wildcard_mapping();
    let runs = WILDCARD_CLIENTS..WILDCARD_CLIENTS + SINGLE_RUNS;
    let skb = Skb::ReceivedBy(LOOPBACK_IFINDEX);
    let (ns, verdict) = median_single_run(ebpf, UPLINK_IN, skb, runs, |i| {
        frame(new_client(i), dialed, L4::Syn)
    });
    let new_flows = stat_of(ebpf, Stat::FlowNew) - flows_before;
    assert_eq!(
        new_flows,
        u64::from(SINGLE_RUNS),
        "every SYN to the wildcard mapping opened a flow"
    );
    Row {
        program: UPLINK_IN,
        case: CASE,
        ns,
        verdict,
    }
}

/// Prints the cost of each TC program per packet kind, for this build's
/// object and, with `PORTFWD_PROG_AGAINST` (the path of another build's
/// object), for that one beside it: measured in turns, twice each, and the
/// fastest kept, so that both see the same machine.
#[test]
#[ignore = "a measurement: `cargo xtask bench --prog` runs it"]
fn tc_program_cost() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED tc_program_cost: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let (host, container) = HOST_CONNECTION;
    let _connection = connection_in_own_namespace(host, container);
    peer_link();
    let against = std::env::var_os("PORTFWD_PROG_AGAINST").map(std::path::PathBuf::from);
    let load_this = || EbpfLoader::new().load(OBJECT).expect("loading the object");
    let Some(against) = against else {
        let (rows, verified) = measure(load_this(), true);
        print_rows(&rows, None);
        print_verified(&verified, None);
        return;
    };
    let load_other = || {
        EbpfLoader::new()
            .load_file(&against)
            .unwrap_or_else(|e| panic!("loading {}: {e}", against.display()))
    };
    let fastest = |a: Vec<Row>, (b, _): (Vec<Row>, Verified)| -> Vec<Row> {
        a.into_iter()
            .zip(b)
            .map(|(a, b)| if b.ns < a.ns { b } else { a })
            .collect()
    };
    let (other, other_verified) = measure(load_other(), false);
    let (this, this_verified) = measure(load_this(), true);
    let other = fastest(other, measure(load_other(), false));
    let this = fastest(this, measure(load_this(), true));
    println!("against: {}", against.display());
    print_rows(&this, Some(&other));
    print_verified(&this_verified, Some(&other_verified));
}

fn print_verified(verified: &Verified, against: Option<&Verified>) {
    let count = |n: Option<u32>| n.map_or("-".to_owned(), |n| n.to_string());
    println!("\nInstructions the verifier walked to load each program (of at most 1,000,000):\n");
    match against {
        Some(_) => {
            println!("| program | against | this build |");
            println!("| --- | ---: | ---: |");
        }
        None => {
            println!("| program | this build |");
            println!("| --- | ---: |");
        }
    }
    for (i, (program, instructions)) in verified.iter().enumerate() {
        let other = against.map_or(String::new(), |other| format!("{} | ", count(other[i].1)));
        println!("| {program} | {other}{} |", count(*instructions));
    }
}

fn print_rows(rows: &[Row], against: Option<&[Row]>) {
    match against {
        Some(_) => {
            println!("| program | packet | against (ns) | this build (ns) | verdict |");
            println!("| --- | --- | ---: | ---: | --- |");
        }
        None => {
            println!("| program | packet | ns per run | verdict |");
            println!("| --- | --- | ---: | --- |");
        }
    }
    for (i, row) in rows.iter().enumerate() {
        let other = against.map_or(String::new(), |rows| format!("{} | ", rows[i].ns));
        println!(
            "| {} | {} | {other}{} | {} |",
            row.program,
            row.case,
            row.ns,
            verdict(row.verdict)
        );
    }
    println!(
        "\nRepeated cases: the fastest of {PASSES} passes of {REPEAT} runs (the kernel's \
         `repeat`, timed by the kernel). Single runs: the median of {SINGLE_RUNS}."
    );
}
