//! What the TC packet cases (`tc_cases*`) share: the object loaded with
//! maps of its own and its TC programs loaded (no pins, nothing attached:
//! the cases need root but touch no interface), mappings published into
//! its maps, a `BPF_PROG_TEST_RUN` of one frame, the stats it counted, and
//! the frames in and out, built by `etherparse` (which computes every
//! checksum itself).
//!
//! A case file loads a [`Tc`], publishes its mappings, and checks runs into
//! [`Failures`], which reports them all at once.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use etherparse::{IpFragOffset, IpHeaders, Ipv4Header, PacketBuilder, PacketBuilderStep};
use nix::{
    sched::{CloneFlags, unshare},
    sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket},
};
use portfwd_common::{
    ALLOW, Addr, AllowKey, BACKEND_PORTS, BACKEND_PROGRAMS, CONNTRACK, CONNTRACK_OPENING, CtKey,
    CtValue, FAMILY_V4, FAMILY_V6, LOCAL_ADDR_BITS, LOCAL_ADDRS, LocalAddrKey, MASQ_FLOWS,
    MASQ_FLOWS_NONE_AFTER, MASQ_FLOWS_STARTED, MapDef, NAT46_SRC, PUBLISHED_PORTS, SERVICES,
    SERVICES_GEN, STATS, ServiceKey, ServiceValue, Stat, UPLINK_PROGRAMS, local_addr_bit, port_bit,
};

use portfwd_testkit::netns;

use super::{link_bits::set_listed, maps::set_bits, object::OBJECT};
use crate::model::{Mapping, Protocol};

/// TC verdicts as the test run returns them.
pub(super) const NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC (-1)
pub(super) const TO_STACK: u32 = 0; // TC_ACT_OK
pub(super) const DROP: u32 = 2; // TC_ACT_SHOT
pub(super) const REDIRECT: u32 = 7; // TC_ACT_REDIRECT

pub(super) const UPLINK_IN: &str = UPLINK_PROGRAMS[0].name;
pub(super) const UPLINK_OUT: &str = UPLINK_PROGRAMS[1].name;
pub(super) const BACKEND_IN: &str = BACKEND_PROGRAMS[0].name;

pub(super) const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 1);
pub(super) const CTR_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 2);
/// Another container (a mapping moved there).
pub(super) const OTHER_CTR_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 3);
pub(super) const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 8, 7);
pub(super) const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 1);
pub(super) const CTR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 9, 0, 0, 0, 0, 2);
pub(super) const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 8, 0, 0, 0, 0, 7);

/// Frames to the loopback device's MAC (all zero) are PACKET_HOST in a
/// test run, as frames to the uplink's MAC are on the wire.
pub(super) const HOST_MAC: [u8; 6] = [0; 6];
pub(super) const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
/// `frame`'s TCP sequence number and payload.
pub(super) const SEQ: u32 = 1000;
const PAYLOAD: &[u8] = b"portfwd";

pub(super) fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A mapping of the cases: to interface 0 (rewritten packets go to the
/// stack), held, open to everyone.
pub(super) fn mapping(protocol: Protocol, host: SocketAddr, container: SocketAddr) -> Mapping {
    Mapping {
        name: "case".into(),
        protocol,
        host,
        container,
        ifindex: 0,
        hold: true,
        allow: None,
    }
}

#[derive(Clone, Copy)]
pub(super) enum L4 {
    Syn,
    Ack,
    /// The client gives up: RST (with ACK), no payload.
    Rst,
    Udp,
}

/// An Ethernet frame from `src_mac` to `dst_mac`, up to the IP header of
/// `src` to `dst` (one family).
pub(super) fn ip_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    src: IpAddr,
    dst: IpAddr,
) -> PacketBuilderStep<IpHeaders> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family per frame"),
    }
}

/// An Ethernet frame from the client's MAC to the host's, `src` to `dst`,
/// with a 7-byte payload.
pub(super) fn frame(src: SocketAddr, dst: SocketAddr, l4: L4) -> Vec<u8> {
    let ends = (src, dst);
    match l4 {
        L4::Syn => segment(ends, TCP_SYN, (SEQ, 0), PAYLOAD),
        L4::Ack => segment(ends, TCP_ACK, (SEQ, 1), PAYLOAD),
        L4::Rst => segment(ends, TCP_RST | TCP_ACK, (SEQ, 1), &[]),
        L4::Udp => {
            let mut out = Vec::new();
            ip_frame((CLIENT_MAC, HOST_MAC), src.ip(), dst.ip())
                .udp(src.port(), dst.port())
                .write(&mut out, PAYLOAD)
                .expect("building a frame");
            out
        }
    }
}

/// TCP flags of `segment`.
pub(super) const TCP_FIN: u8 = 0x01;
pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_RST: u8 = 0x04;
pub(super) const TCP_ACK: u8 = 0x10;

/// A TCP segment from the client's MAC to the host's, `src` to `dst`, with
/// the flags `flags` (`TCP_*`), the sequence number `seq`, the
/// acknowledgment `ack` (with `TCP_ACK`) and `payload`.
pub(super) fn segment(
    (src, dst): (SocketAddr, SocketAddr),
    flags: u8,
    (seq, ack): (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = ip_frame((CLIENT_MAC, HOST_MAC), src.ip(), dst.ip()).tcp(
        src.port(),
        dst.port(),
        seq,
        64240,
    );
    if flags & TCP_SYN != 0 {
        tcp = tcp.syn();
    }
    if flags & TCP_FIN != 0 {
        tcp = tcp.fin();
    }
    if flags & TCP_RST != 0 {
        tcp = tcp.rst();
    }
    if flags & TCP_ACK != 0 {
        tcp = tcp.ack(ack);
    }
    let mut out = Vec::new();
    tcp.write(&mut out, payload).expect("building a frame");
    out
}

/// An ICMP frame (`macs`: source and destination) from `from` to `to`:
/// type, code and `rest` (bytes 5-8) of ICMP or ICMPv6 after the family,
/// quoting `quoted`.
pub(super) fn icmp(
    macs: ([u8; 6], [u8; 6]),
    from: IpAddr,
    to: IpAddr,
    (kind, code, rest): (u8, u8, [u8; 4]),
    quoted: &[u8],
) -> Vec<u8> {
    let ip = ip_frame(macs, from, to);
    let mut out = Vec::new();
    match from {
        IpAddr::V4(_) => ip.icmpv4_raw(kind, code, rest).write(&mut out, quoted),
        IpAddr::V6(_) => ip.icmpv6_raw(kind, code, rest).write(&mut out, quoted),
    }
    .expect("building a frame");
    out
}

/// Changes the IPv4 header of `frame` and makes its checksum right again.
pub(super) fn edit_ipv4_header(frame: &mut [u8], edit: impl FnOnce(&mut Ipv4Header)) {
    let (mut header, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    edit(&mut header);
    header.header_checksum = header.calc_header_checksum();
    let bytes = header.to_bytes();
    frame[14..14 + bytes.len()].copy_from_slice(&bytes);
}

/// `frame` (IPv4) as a fragment of the datagram `id`: at `offset` (8-byte
/// units), `more` to come. A fragment after the first carries the first's
/// bytes here: the programs read no ports in it.
pub(super) fn as_fragment(mut frame: Vec<u8>, id: u16, offset: u16, more: bool) -> Vec<u8> {
    edit_ipv4_header(&mut frame, |header| {
        header.identification = id;
        header.more_fragments = more;
        header.fragment_offset = IpFragOffset::try_new(offset).unwrap();
    });
    frame
}

/// `struct __sk_buff` as a test run's context: 192 bytes, the mark at 8,
/// the interface the skb came in on at 36 (`skb_iif`), the interface at 40.
pub(super) const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFF: usize = 8;
const SKB_INGRESS_IFINDEX_OFF: usize = 36;
const SKB_IFINDEX_OFF: usize = 40;
/// Offsets in `struct __sk_buff` of the GSO fields a test run accepts.
const SKB_GSO_SEGS_OFF: usize = 164;
const SKB_GSO_SIZE_OFF: usize = 176;

/// A test run's skb context with the mark `mark` (all else zero: the
/// kernel's defaults).
pub(super) fn skb_ctx(mark: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
    ctx
}

/// A test run's skb context of an skb that came in on interface `ifindex`
/// (0: none, the loopback device).
pub(super) fn ifindex_ctx(ifindex: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// A test run's skb context of an skb received by interface `ifindex`
/// (`ingress_ifindex`, which the FIB lookups of the programs pass).
pub(super) fn ingress_ctx(ifindex: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX_OFF..SKB_INGRESS_IFINDEX_OFF + 4]
        .copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// A test run's skb context of a GSO skb: `segs` segments of `size` bytes.
pub(super) fn gso_ctx(segs: u32, size: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_GSO_SEGS_OFF..SKB_GSO_SEGS_OFF + 4].copy_from_slice(&segs.to_ne_bytes());
    ctx[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&size.to_ne_bytes());
    ctx
}

/// Whether this process may run the programs (root); if not, says that
/// `test` is skipped.
pub(super) fn can_run(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("SKIPPED {test}: BPF_PROG_TEST_RUN needs root");
    }
    root
}

/// The object, loaded with maps of its own, and its TC programs.
pub(super) struct Tc {
    ebpf: Ebpf,
}

impl Tc {
    /// Loads the object and its TC programs; None (the test skips, saying
    /// so) when not root: `BPF_PROG_TEST_RUN` needs it.
    pub(super) fn load(test: &str) -> Option<Self> {
        can_run(test).then(Self::load_as_root)
    }

    /// Loads the object and its TC programs, and publishes `mappings`; None
    /// when not root, as `load`.
    pub(super) fn load_with(test: &str, mappings: &[Mapping]) -> Option<Self> {
        let mut tc = Self::load(test)?;
        tc.publish(mappings);
        Some(tc)
    }

    /// Loads the object and its TC programs.
    pub(super) fn load_as_root() -> Self {
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
        for name in [UPLINK_IN, UPLINK_OUT, BACKEND_IN] {
            let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            program
                .load()
                .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        }
        Self { ebpf }
    }

    pub(super) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(super) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Lists interface `ifindex` in the bitmap `bitmap` (`PEER_LINKS`,
    /// `CONTAINER_LINKS`), or takes it off, as `datapath::link_bits` does.
    pub(super) fn list_link(&mut self, bitmap: &MapDef, ifindex: u32, listed: bool) {
        let map = self.ebpf.map_mut(bitmap.name).expect("the bitmap of links");
        let mut links: Array<&mut MapData, u32> = Array::try_from(map).unwrap();
        set_listed(&mut links, ifindex, listed).unwrap();
    }

    /// Adds (or replaces) `mappings` in the services map, and their
    /// allowlists in the allowlist map.
    pub(super) fn publish(&mut self, mappings: &[Mapping]) {
        let map = self.ebpf.map_mut(ALLOW.name).expect("the allowlist map");
        let mut lists: LpmTrie<&mut MapData, AllowKey, u8> = LpmTrie::try_from(map).unwrap();
        for mapping in mappings {
            for (prefix_len, key) in mapping.allow.iter().flat_map(|a| a.keys(&mapping.key())) {
                lists.insert(&LpmKey::new(prefix_len, key), 1, 0).unwrap();
            }
        }
        insert_services(&mut self.ebpf, mappings);
    }

    /// The host's IPv4 `source` for the NAT46 flows of `mapping`.
    pub(super) fn set_nat46_source(&mut self, mapping: &Mapping, source: Ipv4Addr) {
        let map = self
            .ebpf
            .map_mut(NAT46_SRC.name)
            .expect("the NAT46 sources map");
        let mut sources: HashMap<&mut MapData, ServiceKey, Addr> = HashMap::try_from(map).unwrap();
        sources
            .insert(mapping.key(), Addr::from(source), 0)
            .unwrap();
    }

    /// Moves the services generation, as userspace does right after it
    /// removes or changes mappings.
    pub(super) fn move_services_generation(&mut self, generation: u64) {
        let map = self
            .ebpf
            .map_mut(SERVICES_GEN.name)
            .expect("the generation map");
        let mut slot: Array<&mut MapData, u64> = Array::try_from(map).unwrap();
        slot.set(0, generation, 0).unwrap();
    }

    /// `ip` is one of the host's addresses, as the port holder records it.
    pub(super) fn record_host_address(&mut self, ip: IpAddr) {
        record_host_address(&mut self.ebpf, ip);
    }

    /// The masqueraded flows the programs counted as started.
    pub(super) fn masq_flows_started(&self) -> u64 {
        let map = self
            .ebpf
            .map(MASQ_FLOWS.name)
            .expect("the masqueraded flows map");
        let slots: Array<&MapData, u64> = Array::try_from(map).unwrap();
        slots.get(&MASQ_FLOWS_STARTED, 0).unwrap()
    }

    /// What the holder's sweep writes after a pass that found no
    /// masqueraded flow.
    pub(super) fn mark_no_masq_flow(&mut self) {
        assert!(
            mark_no_masq_flow(&mut self.ebpf),
            "the masqueraded flows map"
        );
    }

    /// What the programs counted of `stat`, over every CPU.
    pub(super) fn stat(&self, stat: Stat) -> u64 {
        stat_of(&self.ebpf, stat)
    }

    /// One run of `program` on `input` (no skb context): the verdict and the
    /// frame out.
    pub(super) fn run(&self, program: &str, input: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.test_run(program, input, None);
        (verdict, out)
    }

    /// One run of `program` on `input` with the skb mark `mark`: the
    /// verdict, the frame out and the mark out.
    pub(super) fn run_marked(&self, program: &str, input: &[u8], mark: u32) -> (u32, Vec<u8>, u32) {
        self.run_with(program, input, &skb_ctx(mark))
    }

    /// One run of `program` on `input` with the skb context `ctx`: the
    /// verdict, the frame out and the mark out.
    pub(super) fn run_with(
        &self,
        program: &str,
        input: &[u8],
        ctx: &[u8; SKB_CTX_LEN],
    ) -> (u32, Vec<u8>, u32) {
        let (verdict, out, ctx_out) = self.test_run(program, input, Some(ctx));
        let mark = u32::from_ne_bytes(ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4].try_into().unwrap());
        (verdict, out, mark)
    }

    fn test_run(
        &self,
        name: &str,
        input: &[u8],
        ctx_in: Option<&[u8; SKB_CTX_LEN]>,
    ) -> (u32, Vec<u8>, [u8; SKB_CTX_LEN]) {
        let program: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        // Room for an answer larger than the packet (an ICMP error quoting it).
        let mut out = vec![0u8; input.len() + 2048];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: ctx_in.map(|ctx| &ctx[..]),
                ctx_out: ctx_in.is_some().then_some(&mut ctx_out[..]),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out, ctx_out)
    }

    /// Runs each case through `program` and checks its verdict, its frame
    /// out and the stat it counts.
    pub(super) fn check_cases(&self, program: &str, cases: Vec<Case>, failures: &mut Failures) {
        for case in cases {
            let before = self.stat(case.counts);
            let got = self.run(program, &case.input);
            let expected = case.output.as_ref().unwrap_or(&case.input);
            failures.check(case.name, got, case.verdict, expected);
            if self.stat(case.counts) != before + case.counted {
                failures.note(format!(
                    "{}: counted {:?} {} times, expected {}",
                    case.name,
                    case.counts,
                    self.stat(case.counts) - before,
                    case.counted
                ));
            }
        }
    }
}

/// A table's test: each case through `program`, with `mappings` published.
pub(super) fn check_table(test: &str, mappings: &[Mapping], program: &str, cases: Vec<Case>) {
    let Some(tc) = Tc::load_with(test, mappings) else {
        return;
    };
    let mut failures = Failures::default();
    tc.check_cases(program, cases, &mut failures);
    failures.assert_none();
}

/// `ip` is one of the host's addresses in `ebpf`'s maps, as the port
/// holder records it; nothing for an object without the map (`bench
/// --prog --against` an older build).
pub(super) fn record_host_address(ebpf: &mut Ebpf, ip: IpAddr) {
    let Some(map) = ebpf.map_mut(LOCAL_ADDRS.name) else {
        return;
    };
    let mut local: HashMap<&mut MapData, LocalAddrKey, u8> = HashMap::try_from(map).unwrap();
    let (family, addr) = match ip {
        IpAddr::V4(ip) => (FAMILY_V4, Addr::from(ip)),
        IpAddr::V6(ip) => (FAMILY_V6, Addr::from(ip)),
    };
    local.insert(LocalAddrKey::new(family, addr), 1, 0).unwrap();
    // Its bit, which this build's programs read first.
    if let Some(map) = ebpf.map_mut(LOCAL_ADDR_BITS.name) {
        let mut bitmap: Array<&mut MapData, u32> = Array::try_from(map).unwrap();
        let bit = BTreeMap::from([local_addr_bit(family, &addr)]);
        set_bits(&mut bitmap, bit).unwrap();
    }
}

/// Adds (or replaces) `mappings` in `ebpf`'s services map, each host
/// port's bit in the published-ports bitmap and each container port's in
/// the backend-ports bitmap first, as userspace does (`Maps`); no bitmap in
/// an object without the map (`bench --prog --against` an older build).
pub(super) fn insert_services(ebpf: &mut Ebpf, mappings: &[Mapping]) {
    for (bitmap, port_of) in [
        (
            PUBLISHED_PORTS.name,
            (|m: &Mapping| m.host.port()) as fn(&Mapping) -> u16,
        ),
        (BACKEND_PORTS.name, |m: &Mapping| m.container.port()),
    ] {
        let Some(map) = ebpf.map_mut(bitmap) else {
            continue;
        };
        let mut bitmap: Array<&mut MapData, u32> = Array::try_from(map).unwrap();
        let mut bits = BTreeMap::new();
        for mapping in mappings {
            let (word, bit) = port_bit(mapping.key().proto, port_of(mapping));
            *bits.entry(word).or_default() |= bit;
        }
        set_bits(&mut bitmap, bits).unwrap();
    }
    let map = ebpf.map_mut(SERVICES.name).expect("the services map");
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map).unwrap();
    for mapping in mappings {
        services.insert(mapping.key(), mapping.value(), 0).unwrap();
    }
}

/// What the holder's sweep writes into `ebpf`'s `pf_masq_flows` after a
/// pass that found no masqueraded flow: the count as read, plus one. False
/// for an object without the map (an older build).
pub(super) fn mark_no_masq_flow(ebpf: &mut Ebpf) -> bool {
    let Some(map) = ebpf.map_mut(MASQ_FLOWS.name) else {
        return false;
    };
    let mut words: Array<&mut MapData, u64> = Array::try_from(map).unwrap();
    let started = words.get(&MASQ_FLOWS_STARTED, 0).unwrap();
    words
        .set(MASQ_FLOWS_NONE_AFTER, started.wrapping_add(1), 0)
        .unwrap();
    true
}

/// What the programs of `ebpf` counted of `stat`, over every CPU.
pub(super) fn stat_of(ebpf: &Ebpf, stat: Stat) -> u64 {
    stat_if_counted(ebpf, stat).expect("the stats map holds the stat")
}

/// `stat_of`, or None for an object from before `stat` existed (`bench
/// --prog --against` an older build).
pub(super) fn stat_if_counted(ebpf: &Ebpf, stat: Stat) -> Option<u64> {
    let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(ebpf.map(STATS.name)?).ok()?;
    let per_cpu = stats.get(&stat.index(), 0).ok()?;
    Some(per_cpu.iter().sum())
}

/// One row of a case table: a frame in, the verdict, the frame out, and
/// the stat it counts.
pub(super) struct Case {
    pub(super) name: &'static str,
    pub(super) input: Vec<u8>,
    pub(super) verdict: u32,
    /// None: the frame comes out as it went in.
    pub(super) output: Option<Vec<u8>>,
    pub(super) counts: Stat,
    /// How many the run adds to `counts` (1 but for what counts nothing).
    pub(super) counted: u64,
}

impl Case {
    pub(super) fn new(
        name: &'static str,
        input: Vec<u8>,
        verdict: u32,
        output: Option<Vec<u8>>,
        counts: Stat,
    ) -> Self {
        Self {
            name,
            input,
            verdict,
            output,
            counts,
            counted: 1,
        }
    }
}

/// The checks of a test that failed, reported together at its end.
#[derive(Default)]
pub(super) struct Failures(Vec<String>);

impl Failures {
    /// Notes a run whose verdict or frame is not the expected one.
    pub(super) fn check(&mut self, what: &str, got: (u32, Vec<u8>), verdict: u32, frame: &[u8]) {
        if got.0 != verdict || got.1 != frame {
            self.note(format!(
                "{what}: verdict {:#x} (expected {verdict:#x}), frame\n  {:02x?}\nexpected\n  {frame:02x?}",
                got.0, got.1
            ));
        }
    }

    pub(super) fn note(&mut self, failure: String) {
        self.0.push(failure);
    }

    /// Fails the test with every failure noted, if any.
    pub(super) fn assert_none(self) {
        assert!(self.0.is_empty(), "{}", self.0.join("\n"));
    }
}

/// The conntrack tables: established flows (and UDP), and TCP flows
/// before their handshake completes.
const TABLES: [&str; 2] = [CONNTRACK.name, CONNTRACK_OPENING.name];

/// The conntrack table `name` of `tc`, to change by hand.
fn conntrack_of<'a>(tc: &'a mut Tc, name: &str) -> HashMap<&'a mut MapData, CtKey, CtValue> {
    let map = tc.ebpf_mut().map_mut(name).expect("the conntrack map");
    HashMap::try_from(map).unwrap()
}

/// Removes the conntrack entries (of either table) that `which` picks, as
/// evictions may.
pub(super) fn remove_entries(tc: &mut Tc, which: impl Fn(&CtKey, &CtValue) -> bool) {
    for name in TABLES {
        let mut map = conntrack_of(tc, name);
        let picked: Vec<_> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, value)| which(key, value))
            .map(|(key, _)| key)
            .collect();
        for key in picked {
            map.remove(&key).unwrap();
        }
    }
}

/// Rewrites every conntrack entry with `change`, as a lost update or
/// another CPU's write may leave it.
pub(super) fn change_entries(tc: &mut Tc, change: impl Fn(&mut CtValue)) {
    for name in TABLES {
        let mut map = conntrack_of(tc, name);
        let entries: Vec<_> = map.iter().filter_map(Result::ok).collect();
        for (key, mut value) in entries {
            change(&mut value);
            map.insert(key, value, 0).unwrap();
        }
    }
}

/// The flags of every entry of the conntrack table `name`, sorted.
pub(super) fn flags_in(tc: &Tc, name: &str) -> Vec<u8> {
    let map = tc.ebpf().map(name).expect("the conntrack map");
    let map: HashMap<&MapData, CtKey, CtValue> = HashMap::try_from(map).unwrap();
    let mut flags: Vec<u8> = map
        .iter()
        .filter_map(Result::ok)
        .map(|(_, value)| value.flags)
        .collect();
    flags.sort_unstable();
    flags
}

/// A field of every conntrack entry (of either table), sorted.
pub(super) fn of_every_entry<T: Ord>(tc: &Tc, field: impl Fn(&CtValue) -> T) -> Vec<T> {
    let mut values = Vec::new();
    for name in TABLES {
        let map = tc.ebpf().map(name).expect("the conntrack map");
        let map: HashMap<&MapData, CtKey, CtValue> = HashMap::try_from(map).unwrap();
        values.extend(
            map.iter()
                .filter_map(Result::ok)
                .map(|(_, value)| field(&value)),
        );
    }
    values.sort_unstable();
    values
}

/// The flags of every conntrack entry, sorted.
pub(super) fn conntrack_flags(tc: &Tc) -> Vec<u8> {
    of_every_entry(tc, |value| value.flags)
}

/// A TCP connection from `host` to `container`, made in a network namespace
/// of this thread's own where both addresses are local: a test run looks
/// sockets up in the namespace of the thread that runs it (the host's
/// sockets for `pf_tc_backend_in`). The thread stays there, and the
/// sockets live as long as the returned value: the listener, the host's
/// end and the container's.
pub(super) fn connection_in_own_namespace(
    host: SocketAddrV4,
    container: SocketAddrV4,
) -> (TcpListener, TcpStream, TcpStream) {
    unshare(CloneFlags::CLONE_NEWNET).expect("a network namespace of the test's own");
    let (host_ip, container_ip) = (
        format!("{}/32", host.ip()),
        format!("{}/32", container.ip()),
    );
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", &host_ip, "dev", "lo"],
        vec!["addr", "add", &container_ip, "dev", "lo"],
    ] {
        netns::ip(&args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    }
    let listener = TcpListener::bind(container).unwrap();
    // std's connect cannot choose its source: the frames name the host's.
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::from(host)).unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(container)).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    (listener, TcpStream::from(fd), accepted)
}
