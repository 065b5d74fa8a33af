//! The one table of the kernel/user ABI: every map (name, kind, key and
//! value types, default capacity, whether it is pinned), every program
//! (name, hook) and every stat (index, name). The eBPF crate declares its
//! maps from it, the loader loads, pins, sizes and checks pinned maps from
//! it, `down` removes what it lists, `list` names the stats from it, and a
//! test in `portfwd` checks the compiled object against it.

use core::mem::size_of;

use crate::types::{
    Addr, AllowKey, Config, CtKey, CtValue, FragmentKey, FragmentValue, LocalAddrKey,
    MappingCounters, SOCK_CONNECTED_SLOTS, ServiceKey, ServiceValue, SockConnected, SockDialed,
    TraceConfig,
};

/// The name of a map, as the eBPF object declares it and as it is pinned
/// under the instance's bpffs directory. A macro, not a `const`, because
/// the eBPF crate needs the name as a literal in `export_name` (which is
/// what aya's `#[map(name = ...)]` expands to). The kernel truncates object
/// names to 15 bytes, so they are short enough to recognise in `bpftool`.
#[macro_export]
macro_rules! map_name {
    (services) => {
        "pf_services"
    };
    (local_addrs) => {
        "pf_local_addrs"
    };
    (config) => {
        "pf_config"
    };
    (sock_dialed) => {
        "pf_sock_dialed"
    };
    (sock_connected) => {
        "pf_sock_conn"
    };
    (conntrack) => {
        "pf_conntrack"
    };
    (conntrack_opening) => {
        "pf_ct_opening"
    };
    (counters) => {
        "pf_counters"
    };
    (stats) => {
        "pf_stats"
    };
    (fragments) => {
        "pf_fragments"
    };
    (services_gen) => {
        "pf_services_gen"
    };
    (published_ports) => {
        "pf_ports"
    };
    (backend_ports) => {
        "pf_backend_ports"
    };
    (scratch) => {
        "pf_scratch"
    };
    (trace) => {
        "pf_trace"
    };
    (trace_on) => {
        "pf_trace_on"
    };
    (allow) => {
        "pf_allow"
    };
    (nat46_src) => {
        "pf_nat46_src"
    };
    (reply) => {
        "pf_reply"
    };
    (peer_links) => {
        "pf_peer_link_bits"
    };
    (container_links) => {
        "pf_container_link_bits"
    };
    (masq_flows) => {
        "pf_masq_flows"
    };
    (local_addr_bits) => {
        "pf_local_addr_bits"
    };
    (next_hops) => {
        "pf_next_hops"
    };
}

/// The kernel map type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    PerCpuHash,
    RingBuf,
    /// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`): a value per
    /// socket, freed with the socket; key a socket fd, no capacity.
    SkStorage,
    /// Longest-prefix match (`BPF_MAP_TYPE_LPM_TRIE`): the key starts with
    /// its prefix length in bits (a `u32`).
    LpmTrie,
}

/// One map of the ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    /// Default capacity (`up --max-mappings/--max-flows` change some).
    pub max_entries: u32,
    /// `BPF_F_*` map flags.
    pub flags: u32,
}

/// Entries are allocated on insert (no preallocation) so that a lookup never
/// sees an element that a concurrent delete recycled for another key.
pub const BPF_F_NO_PREALLOC: u32 = 1;

const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

const fn map(
    name: &'static str,
    kind: MapKind,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> MapDef {
    MapDef {
        name,
        kind,
        key_size,
        value_size,
        max_entries,
        flags: 0,
    }
}

/// Published (host address, port, protocol) -> container endpoint.
pub const SERVICES: MapDef = MapDef {
    flags: BPF_F_NO_PREALLOC,
    ..map(
        map_name!(services),
        MapKind::Hash,
        size::<ServiceKey>(),
        size::<ServiceValue>(),
        65_536,
    )
};
/// The host's own addresses: wildcard mappings serve these (and loopback).
/// The value is unused (one byte).
pub const LOCAL_ADDRS: MapDef = map(
    map_name!(local_addrs),
    MapKind::Hash,
    size::<LocalAddrKey>(),
    1,
    1_024,
);
/// The single `Config` entry.
pub const CONFIG: MapDef = map(map_name!(config), MapKind::Array, 4, size::<Config>(), 1);
/// Per translated socket: the backends it talks to and the addresses the
/// application dialed. Declared as a BTF map (the kernel requires BTF for
/// socket storage); pinned, so that programs replaced by `up --reload` or
/// an upgrade keep serving sockets translated before.
pub const SOCK_DIALED: MapDef = MapDef {
    flags: BPF_F_NO_PREALLOC,
    ..map(
        map_name!(sock_dialed),
        MapKind::SkStorage,
        4,
        size::<SockDialed>(),
        0,
    )
};
/// Sockets connected through a mapping, one slot each, chosen by the
/// socket's cookie; a socket whose slot another holds falls back to
/// `SOCK_DIALED` (a slot costs the connect one array write, a socket
/// storage two kernel allocations). `pf_sock_release` frees a slot when its
/// socket closes. Pinned like `SOCK_DIALED`.
pub const SOCK_CONNECTED: MapDef = map(
    map_name!(sock_connected),
    MapKind::Array,
    4,
    size::<SockConnected>(),
    SOCK_CONNECTED_SLOTS,
);
/// Maps of earlier versions, no longer created: `down` removes their pins.
/// `pf_sock_revnat`: the reverse-NAT LRU map that `SOCK_DIALED` replaced;
/// `pf_peer_links`: the hash of interfaces that `PEER_LINKS`'s bitmap
/// replaced.
pub const OBSOLETE_MAPS: [&str; 2] = ["pf_sock_revnat", "pf_peer_links"];
/// Tracked flows of the TC path: two entries per flow (one per direction).
pub const CONNTRACK: MapDef = map(
    map_name!(conntrack),
    MapKind::LruHash,
    size::<CtKey>(),
    size::<CtValue>(),
    2 * 262_144,
);
/// Flows before their client shows it receives the container's packets
/// (TCP: the client's ACK of the container's answer completes the
/// handshake; UDP: the client's datagram after the container's answer),
/// two entries each, as in `CONNTRACK`, into which they then move. A flood
/// from spoofed sources churns this table alone: the established flows'
/// table evicts only for flows that passed that test, as netfilter's, when
/// full, drops only unassured entries. A quarter of
/// `CONNTRACK`'s flows, at least `OPENING_MIN_FLOWS` (`opening_flows`).
pub const CONNTRACK_OPENING: MapDef = map(
    map_name!(conntrack_opening),
    MapKind::LruHash,
    size::<CtKey>(),
    size::<CtValue>(),
    2 * opening_flows(262_144),
);
/// The fewest flows `CONNTRACK_OPENING` holds, whatever `--max-flows` says:
/// room for the handshakes of a burst of new connections.
pub const OPENING_MIN_FLOWS: u32 = 64;
/// How many flows `CONNTRACK_OPENING` holds for a main table of
/// `max_flows`.
pub const fn opening_flows(max_flows: u32) -> u32 {
    let quarter = max_flows / 4;
    if quarter < OPENING_MIN_FLOWS {
        OPENING_MIN_FLOWS
    } else {
        quarter
    }
}
/// Traffic of each mapping; userspace creates the entry with the mapping.
pub const COUNTERS: MapDef = map(
    map_name!(counters),
    MapKind::PerCpuHash,
    size::<ServiceKey>(),
    size::<MappingCounters>(),
    SERVICES.max_entries,
);
/// What the TC programs did and passed, indexed by `Stat`.
pub const STATS: MapDef = map(
    map_name!(stats),
    MapKind::PerCpuArray,
    4,
    8,
    Stat::ALL.len() as u32,
);
/// Datagrams whose first fragment was translated: how to translate the
/// later ones. An LRU: the oldest are forgotten first.
pub const FRAGMENTS: MapDef = map(
    map_name!(fragments),
    MapKind::LruHash,
    size::<FragmentKey>(),
    size::<FragmentValue>(),
    8_192,
);

/// Events for `portfwd trace`, written only while `pf_trace_on` says so. A
/// ring buffer's capacity is in bytes (a power of two, a multiple of the
/// page size): 256 KiB hold about 3,000 events.
pub const TRACE: MapDef = map(map_name!(trace), MapKind::RingBuf, 0, 0, 256 * 1024);
/// The single `TraceConfig` entry: whether (and what) to trace.
pub const TRACE_ON: MapDef = map(
    map_name!(trace_on),
    MapKind::Array,
    4,
    size::<TraceConfig>(),
    1,
);
/// Source allowlists: (prefix length, `AllowKey`) -> unused byte, one entry
/// per network of each mapping that has a list (`SERVICE_FLAG_HAS_ALLOWLIST`).
/// The kernel requires no preallocation for an LPM trie.
pub const ALLOW: MapDef = MapDef {
    flags: BPF_F_NO_PREALLOC,
    ..map(
        map_name!(allow),
        MapKind::LpmTrie,
        4 + size::<AllowKey>(),
        1,
        65_536,
    )
};
/// NAT46 (IPv6 clients of an IPv4 container): for each mapping on an IPv6
/// host address to an IPv4 container, the host's IPv4 address that the
/// container sees such clients come from (the source the host's routing
/// picks towards the container, as docker-proxy's connections have). An
/// `Addr` holding IPv4. Written with the mapping; a mapping without it is
/// not translated between families.
pub const NAT46_SRC: MapDef = MapDef {
    flags: BPF_F_NO_PREALLOC,
    ..map(
        map_name!(nat46_src),
        MapKind::Hash,
        size::<ServiceKey>(),
        size::<crate::types::Addr>(),
        SERVICES.max_entries,
    )
};
/// The services generation: one `u64` that userspace increments after it
/// removes (or changes) mappings, so that the TC programs look a tracked
/// flow's mapping up again only when the services changed, not per packet.
pub const SERVICES_GEN: MapDef = map(map_name!(services_gen), MapKind::Array, 4, 8, 1);
/// Which (protocol, port) pairs may be published: one bit each, so that the
/// socket programs leave a connect or a UDP send to any other port, and the
/// TC programs a packet of no flow (its mapping's lookup) or a container's
/// packet to the host (`MASQ_FLOWS`), after one array read instead of two
/// hash lookups. A port without its bit is taken for unpublished, so
/// userspace sets a port's bit before it adds the port's first mapping; it
/// clears stale bits at `up` only: a set bit for a port no longer published
/// costs the lookups, never a wrong answer. See `port_bit`.
pub const PUBLISHED_PORTS: MapDef = map(
    map_name!(published_ports),
    MapKind::Array,
    4,
    4,
    PORT_BITMAP_WORDS,
);
/// Which (protocol, port) pairs a mapping has sent host sockets to (the
/// container's port): getpeername and recvmsg of a socket whose peer port
/// has no bit leave after one array read, without the socket cookie, the
/// `SOCK_CONNECTED` slot and the storage lookup. Userspace sets a port's
/// bit before the mapping's entries exist and never clears it while the
/// instance lives: a socket translated through a mapping since removed
/// still reports the address it dialed. `up` adds the bits of the services
/// map (an upgrade from a build without this map: a socket translated
/// through a mapping removed before the upgrade then reports the
/// container's address). Layout as `PUBLISHED_PORTS`.
pub const BACKEND_PORTS: MapDef = map(
    map_name!(backend_ports),
    MapKind::Array,
    4,
    4,
    PORT_BITMAP_WORDS,
);

/// The interfaces towards containers that a packet can be redirected
/// through straight into the container's namespace (`bpf_redirect_peer`):
/// a veth whose peer lives in another namespace, with no queueing
/// discipline of its own (a shaper, such as the CNI `bandwidth` plugin's,
/// would be skipped). A bitmap of ifindexes (see `link_bit`): a packet's
/// test is one array read, which the verifier inlines, where a hash lookup
/// cost every redirected packet tens of nanoseconds. Userspace keeps it in
/// line with the host's interfaces (`datapath::peer_links`); an interface
/// it does not list, or whose index is beyond the bitmap
/// (`PEER_LINK_INDEXES`), is redirected through the neighbour subsystem
/// (`bpf_redirect_neigh`), as any other.
pub const PEER_LINKS: MapDef = map(
    map_name!(peer_links),
    MapKind::Array,
    4,
    4,
    PEER_LINK_INDEXES / 32,
);
/// Every interface towards containers: those with the reply program
/// attached that are not uplinks (a bridge, a veth, shaped or not). A new
/// flow on an uplink whose source the host routes through one of them is
/// forged (the container's own packets come in on its link). Same layout
/// as `PEER_LINKS`, kept by `datapath::link_bits` beside it; an interface
/// beyond the bitmap is not listed.
pub const CONTAINER_LINKS: MapDef = map(
    map_name!(container_links),
    MapKind::Array,
    4,
    4,
    PEER_LINK_INDEXES / 32,
);
/// Interface indexes that `PEER_LINKS` can list: 1 to 2^21 - 1 (a 256 KiB
/// array). A host allocates indexes upwards, two per container started
/// (the veth pair), so this covers about a million container starts
/// since boot; an interface beyond it takes the neighbour path.
pub const PEER_LINK_INDEXES: u32 = 1 << 21;

/// The word (index in a `PEER_LINKS`-like bitmap) and bit of `index`.
pub const fn link_bit(index: u32) -> (u32, u32) {
    (index >> 5, 1 << (index & 31))
}

/// Whether the conntrack may hold a masqueraded flow (`CT_FLAG_MASQ`:
/// hairpin, NAT46, an external client moved to another port). While it
/// holds none, a container's TCP or UDP packet to a host address and a
/// port no mapping publishes can belong to no tracked flow: the TC
/// programs pass it to the host without the conntrack lookup. Two `u64`s,
/// each written by one side only: `MASQ_FLOWS_STARTED`,
/// `MASQ_FLOWS_NONE_AFTER`.
pub const MASQ_FLOWS: MapDef = map(map_name!(masq_flows), MapKind::Array, 4, 8, 2);
/// `MASQ_FLOWS` index: masqueraded flows started; the programs add one
/// after they insert such a flow's entries.
pub const MASQ_FLOWS_STARTED: u32 = 0;
/// `MASQ_FLOWS` index: the count of flows started plus one, as the holder's
/// sweep read it before a pass that found no masqueraded entry (0, a new
/// map's: nothing found yet). See `holds_no_masq_flow`.
pub const MASQ_FLOWS_NONE_AFTER: u32 = 1;

/// Whether the conntrack holds no masqueraded flow, given `MASQ_FLOWS`:
/// none was found by a pass that began after `none_after - 1` had started,
/// and none started since.
pub const fn holds_no_masq_flow(started: u64, none_after: u64) -> bool {
    none_after == started.wrapping_add(1)
}

/// Words of a port bitmap: a bit per TCP port and one per UDP port.
pub const PORT_BITMAP_WORDS: u32 = 2 * 65_536 / 32;

/// The word (index in a port bitmap: `PUBLISHED_PORTS`, `BACKEND_PORTS`)
/// and bit of a protocol's port (host byte order); TCP and any other
/// protocol share the first half.
pub const fn port_bit(proto: u8, port: u16) -> (u32, u32) {
    let half = if proto == crate::IPPROTO_UDP { 2048 } else { 0 };
    (half + (port as u32 >> 5), 1 << (port & 31))
}

/// Maps private to the eBPF programs (neither pinned nor read by userspace),
/// whose types live in the eBPF crate: per-CPU scratch memory, the per-CPU
/// buffer and rate limit of the answers the programs send, and each CPU's
/// cache of the FIB's answers (next hops and frame addresses).
pub const PRIVATE_MAPS: [&str; 3] = [map_name!(scratch), map_name!(reply), map_name!(next_hops)];

/// A filter in front of `LOCAL_ADDRS`: a bitmap with a bit per hash of an
/// address (see `local_addr_bit`), set for each of the host's addresses. A
/// clear bit says that an address is not the host's after one array read,
/// which the verifier inlines, where the hash lookup took about 45 ns
/// (`cargo xtask bench --prog`) of every packet from a container: the
/// replies of tracked flows go to clients, not to the host. A set bit
/// sends the question on to `LOCAL_ADDRS` (another address may share it).
/// Userspace sets an address's bit before the address enters
/// `LOCAL_ADDRS`, and clears it after the address left, so that a clear
/// bit never hides an address the map holds (and a sync sets the bits that
/// an earlier build's holder, which knew none, left out).
pub const LOCAL_ADDR_BITS: MapDef = map(
    map_name!(local_addr_bits),
    MapKind::Array,
    4,
    4,
    LOCAL_ADDR_BITMAP_WORDS,
);

/// Words of `LOCAL_ADDR_BITS`: 65,536 bits (8 KiB), so that a host with a
/// few hundred addresses leaves most bits clear.
pub const LOCAL_ADDR_BITMAP_WORDS: u32 = 65_536 / 32;

/// The word (index in `LOCAL_ADDR_BITS`) and bit of an address of
/// `family`: its words folded into one, and the top 16 bits of that times
/// 2^32 / φ (Fibonacci hashing), in which every bit of the address counts.
pub const fn local_addr_bit(family: u8, addr: &Addr) -> (u32, u32) {
    let [a, b, c, d] = addr.words;
    let folded = a ^ b.rotate_left(8) ^ c.rotate_left(16) ^ d.rotate_left(24) ^ family as u32;
    let index = folded.wrapping_mul(0x9E37_79B9) >> 16;
    (index >> 5, 1 << (index & 31))
}

/// Every map of the object.
/// Every map userspace knows, all pinned under the instance's directory:
/// the state (`down` removes exactly these).
pub const MAPS: [MapDef; 21] = [
    SERVICES,
    LOCAL_ADDRS,
    CONFIG,
    SOCK_DIALED,
    SOCK_CONNECTED,
    CONNTRACK,
    CONNTRACK_OPENING,
    COUNTERS,
    STATS,
    FRAGMENTS,
    TRACE,
    TRACE_ON,
    SERVICES_GEN,
    PUBLISHED_PORTS,
    BACKEND_PORTS,
    ALLOW,
    NAT46_SRC,
    PEER_LINKS,
    MASQ_FLOWS,
    LOCAL_ADDR_BITS,
    CONTAINER_LINKS,
];

/// Where a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A cgroup `sock_addr` hook (`connect4`, `sendmsg6`, ...), on the
    /// cgroup v2 root.
    CgroupSockAddr(&'static str),
    /// A cgroup `sock` hook (`sock_release`), on the same cgroup.
    CgroupSock(&'static str),
    /// TC ingress of an interface.
    TcIngress,
    /// TC egress of an interface.
    TcEgress,
    /// A BPF iterator (`iter/udp`): loaded and run by a command when it
    /// needs it, never attached by `up`.
    Iter(&'static str),
}

/// The name of a program, as its symbol in the eBPF object (the name the
/// kernel, `bpftool` and `tc filter show` report). A macro for the reason
/// `map_name!` is one: the eBPF crate's entry points take it as a literal
/// in `export_name`, so the name is written here only.
#[macro_export]
macro_rules! program_name {
    (connect4) => {
        "pf_connect4"
    };
    (connect6) => {
        "pf_connect6"
    };
    (getpeername4) => {
        "pf_getpeername4"
    };
    (getpeername6) => {
        "pf_getpeername6"
    };
    (sendmsg4) => {
        "pf_sendmsg4"
    };
    (sendmsg6) => {
        "pf_sendmsg6"
    };
    (recvmsg4) => {
        "pf_recvmsg4"
    };
    (recvmsg6) => {
        "pf_recvmsg6"
    };
    (tc_uplink_in) => {
        "pf_tc_uplink_in"
    };
    (tc_uplink_out) => {
        "pf_tc_uplink_out"
    };
    (tc_backend_in) => {
        "pf_tc_backend_in"
    };
    (iter_udp) => {
        "pf_iter_udp"
    };
    (sock_release) => {
        "pf_sock_release"
    };
}

/// One program of the ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramDef {
    /// The program's name (`program_name!`).
    pub name: &'static str,
    pub hook: Hook,
}

const fn sock(name: &'static str, hook: &'static str) -> ProgramDef {
    ProgramDef {
        name,
        hook: Hook::CgroupSockAddr(hook),
    }
}

/// The socket programs, attached to the cgroup v2 root.
pub const SOCK_PROGRAMS: [ProgramDef; 9] = [
    sock(program_name!(connect4), "connect4"),
    sock(program_name!(connect6), "connect6"),
    sock(program_name!(getpeername4), "getpeername4"),
    sock(program_name!(getpeername6), "getpeername6"),
    sock(program_name!(sendmsg4), "sendmsg4"),
    sock(program_name!(sendmsg6), "sendmsg6"),
    sock(program_name!(recvmsg4), "recvmsg4"),
    sock(program_name!(recvmsg6), "recvmsg6"),
    ProgramDef {
        name: program_name!(sock_release),
        hook: Hook::CgroupSock("sock_release"),
    },
];

/// On uplinks: DNAT of new external flows, reverse NAT of routed replies.
pub const UPLINK_PROGRAMS: [ProgramDef; 2] = [
    ProgramDef {
        name: program_name!(tc_uplink_in),
        hook: Hook::TcIngress,
    },
    ProgramDef {
        name: program_name!(tc_uplink_out),
        hook: Hook::TcEgress,
    },
];

/// On the interface towards the containers: reverse NAT of their replies.
pub const BACKEND_PROGRAMS: [ProgramDef; 1] = [ProgramDef {
    name: program_name!(tc_backend_in),
    hook: Hook::TcIngress,
}];

/// Lists the translated UDP sockets (cookie and `SockDialed` storage of
/// each), for ending those connected through a removed mapping.
pub const SOCKET_ITERATOR: ProgramDef = ProgramDef {
    name: program_name!(iter_udp),
    hook: Hook::Iter("udp"),
};

/// Every program of the object.
pub fn programs() -> impl Iterator<Item = &'static ProgramDef> {
    SOCK_PROGRAMS
        .iter()
        .chain(&UPLINK_PROGRAMS)
        .chain(&BACKEND_PROGRAMS)
        .chain([&SOCKET_ITERATOR])
}

/// Defines `Stat` from one list: each variant, its index in the stats map
/// (its position) and the name `portfwd list` shows.
macro_rules! stats {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// What the TC programs counted: packets they saw but did not
        /// translate (passed untouched), and what they did. The index of
        /// each in the per-CPU stats map is its discriminant.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat {
            $($(#[$doc])* $variant,)*
        }

        impl Stat {
            /// Every stat, by index.
            pub const ALL: &'static [Stat] = &[$(Stat::$variant,)*];

            /// The name `portfwd list` shows.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Stat::$variant => $name,)*
                }
            }

            /// The key of this stat in the stats map.
            pub const fn index(self) -> u32 {
                self as u32
            }
        }
    };
}

stats! {
    PassNotIp = "passed_not_ip",
    PassFragment = "passed_fragment",
    PassIpv6Extension = "passed_ipv6_extension",
    PassNotTcpUdp = "passed_not_tcp_udp",
    PassTruncated = "passed_truncated",
    FlowNew = "flows_new",
    FlowStopped = "flows_stopped",
    Redirected = "redirected",
    ToStack = "to_stack",
    RewriteFailed = "rewrite_failed",
    /// Packets of a TCP flow to a published port that conntrack does not
    /// know: its entries were evicted (the map was full: least recently
    /// used first) or expired. The host answers them with a reset.
    UntrackedMidflow = "untracked_midflow",
    /// Packets from outside the host (an uplink, a container's interface)
    /// whose destination or source is a loopback address: never
    /// translated, dropped. The kernel would drop them as martians;
    /// translated, they would reach a port published on 127.0.0.1 or [::1]
    /// from the network.
    DroppedLoopback = "dropped_loopback",
    /// Later fragments (not the first) of datagrams whose first fragment
    /// was translated, translated the same way: towards the container...
    FragmentIn = "fragments_translated_in",
    /// ...and back.
    FragmentOut = "fragments_translated_out",
    /// Later fragments from containers that match no translated first
    /// fragment (`PassFragment` counts those from uplinks): passed to the
    /// stack.
    PassFragmentFromContainers = "passed_fragment_from_containers",
    /// New flows on an uplink whose source is one of the host's own
    /// addresses: forged (the kernel drops them as martians), and their
    /// reply entry could capture the host's own connection from that
    /// address and port. Dropped.
    DroppedLocalSource = "dropped_local_source",
    /// `portfwd trace` events the ring buffer had no room for (the reader
    /// was too slow): dropped, never waited for.
    TraceLost = "trace_events_lost",
    /// New flows from a client outside the mapping's source allowlist
    /// (external, or a container's hairpin flow), dropped without an
    /// answer: the mapping refuses silently (`--refuse drop`), or the answer
    /// could not be sent (a TCP reset is never answered).
    RefusedNotAllowed = "refused_not_allowed",
    /// Connects and unconnected UDP sends of host processes (the socket
    /// programs) to a mapping whose allowlist lacks `host`: failed with
    /// EPERM.
    RefusedHostProcess = "refused_host_not_allowed",
    /// Packets of NAT46 flows (an IPv6 client, an IPv4 container) that
    /// cannot be translated between families: IPv6 fragments and IPv4 ones
    /// (a fragment header would be needed), IPv4 options, a UDP datagram
    /// without a checksum, either way (mandatory in IPv6). Dropped.
    DroppedNat46 = "dropped_nat46_untranslatable",
    /// New IPv6 flows to a mapping of an IPv4 container for which portfwd
    /// knows no host IPv4 address towards the container (`pf_nat46_src`):
    /// passed untouched (the host's held port drops them).
    PassNat46NoSource = "passed_nat46_no_source",
    /// New flows from a client outside the mapping's source allowlist,
    /// answered as a closed port answers (`--refuse reject`, the default):
    /// a TCP reset, an ICMP port unreachable for UDP.
    RefusedAnswered = "refused_answered",
    /// ICMP answers over the rate limit (about 1000 a second per CPU, as
    /// the kernel's `icmp_msgs_per_sec`): not sent, the packet dropped.
    AnswersRateLimited = "answers_rate_limited",
    /// ICMP errors about a translated flow (unreachable, fragmentation
    /// needed / packet too big, time exceeded), translated like the flow
    /// and sent on to the container or the client.
    IcmpErrorTranslated = "icmp_errors_translated",
    /// Packets of tracked flows larger than the MTU of the interface they
    /// were to be redirected to (GSO packets: by their segments), answered
    /// as a router does: "fragmentation needed" (IPv4 with DF) or "packet
    /// too big" (IPv6) to their sender; dropped.
    TooBigAnswered = "too_big_answered",
    /// Packets of tracked flows, IPv4 without DF, larger than the MTU of
    /// the interface they were to be redirected to: handed to the host's
    /// forwarding path, which fragments them (a redirect cannot, and the
    /// link would drop them). Towards a container translated first; towards
    /// a client untranslated, the uplink's egress program translating the
    /// fragments. Needs forwarding on the interface they came in on.
    TooBigToStack = "too_big_to_stack",
    /// Of the packets counted as `redirected`, those redirected straight
    /// into a container's namespace (`PEER_LINKS`): the host-side veth's
    /// transmit and the second receive pass skipped.
    RedirectedToPeer = "redirected_to_peer",
    /// Packets from containers to a host address that belong to an
    /// exchange of the host's own (a host process that dialed a published
    /// port through the socket path, or the container a host service
    /// directly, TCP or UDP): passed to the stack without a conntrack
    /// lookup while the table holds no masqueraded flow, or, TCP, owned by
    /// a host socket over a masqueraded flow's entry. With a masqueraded
    /// flow in the table, one that matches no flow passes uncounted.
    PassHostConnection = "passed_host_connection",
    /// TCP resets and FINs of tracked flows whose sequence number is not
    /// near their sender's side of the flow (forged by a source that cannot
    /// see the flow, or a reset sent from far behind the data in flight):
    /// passed on to the endpoint, which judges them, and the flow not
    /// closed.
    CloseOutOfWindow = "closes_out_of_window",
    /// Packets of a tracked flow's container side (its reply direction:
    /// the container's address and port as their source) that came in on
    /// an uplink, while the flow's mapping reaches its container through
    /// another interface: forged, since the container's own come in on its
    /// link. Dropped, so that they set nothing of the flow (its answer, its
    /// mark) and reach no client from the published address. Also ICMP
    /// errors in the container's name that came in on another container's
    /// link, and new flows on an uplink from a source that the host routes
    /// through an interface towards containers (`CONTAINER_LINKS`).
    DroppedContainerSource = "dropped_container_source",
    /// TCP flows forgotten at their last packet: both sides sent their FIN
    /// and each acknowledged the other's, so both entries were removed with
    /// that ACK instead of waiting out the closing time.
    FlowEnded = "flows_ended",
    /// TCP flows started again by the container's SYN-ACK: a client reused
    /// its port after its connection ended (reset, or its socket gone), its
    /// SYN passed on the old flow, and the container's SYN-ACK acknowledged
    /// exactly that SYN. The flow keeps its translation and follows the
    /// new connection.
    FlowRestarted = "flows_restarted",
    /// New flows whose source no host sends from: multicast, broadcast,
    /// unspecified (0.0.0.0/8, ::). The kernel drops such packets as
    /// martians; translated, the container's answer would go back to that
    /// address (a NAT46 container sees the host's address, not the
    /// martian, and answers a multicast group through the host). Dropped.
    /// Also packets too big for the container's link from a source no
    /// answer may go to (those, and IPv4 class E): dropped unanswered.
    DroppedMartianSource = "dropped_martian_source",
    /// New flows from a container link whose source the host routes
    /// through another interface: not the container's address (a
    /// co-tenant sending in another client's name, to pass an allowlist or
    /// to have the container answer that client), as the kernel's strict
    /// reverse-path filter judges. Dropped.
    DroppedSpoofedSource = "dropped_spoofed_source",
}
