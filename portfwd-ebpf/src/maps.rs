//! The maps shared with userspace, declared from `portfwd-common`'s ABI
//! table (names, capacities, flags); userspace pins each under the bpffs
//! directory.
//!
//! Each map carries the two attributes aya's `#[map(name = ...)]` expands
//! to, because that macro takes only a string literal and the name comes
//! from `portfwd_common::map_name!`.

use aya_ebpf::{
    btf_maps::SkStorage,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use portfwd_common::{
    self as abi, Addr, AllowKey, Config, CtKey, CtValue, FragmentKey, FragmentValue, LocalAddrKey,
    MappingCounters, ServiceKey, ServiceValue, SockConnected, SockDialed, TraceConfig, link_bit,
    local_addr_bit, map_name, port_bit,
};

use crate::types::{NextHop, ReplyScratch, Scratch};

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(services))]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(abi::SERVICES.max_entries, abi::SERVICES.flags);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(local_addrs))]
pub(crate) static LOCAL_ADDRS: HashMap<LocalAddrKey, u8> =
    HashMap::with_max_entries(abi::LOCAL_ADDRS.max_entries, abi::LOCAL_ADDRS.flags);

/// A bit per hash of each of the host's addresses: clear, the address is
/// not one (see `abi::LOCAL_ADDR_BITS`).
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(local_addr_bits))]
pub(crate) static LOCAL_ADDR_BITS: Array<u32> =
    Array::with_max_entries(abi::LOCAL_ADDR_BITS.max_entries, abi::LOCAL_ADDR_BITS.flags);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(config))]
pub(crate) static CONFIG: Array<Config> =
    Array::with_max_entries(abi::CONFIG.max_entries, abi::CONFIG.flags);

/// A BTF map (section `.maps`, what `#[btf_map]` expands to): the kernel
/// creates socket storage only with BTF for its key and value, which
/// bpf-linker (`--btf`) emits from the type's debug info. Its type, key,
/// size and flags are fixed by `SkStorage` and match `abi::SOCK_DIALED`.
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = map_name!(sock_dialed))]
pub(crate) static SOCK_DIALED: SkStorage<SockDialed> = SkStorage::new();

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(sock_connected))]
pub(crate) static SOCK_CONNECTED: Array<SockConnected> =
    Array::with_max_entries(abi::SOCK_CONNECTED.max_entries, abi::SOCK_CONNECTED.flags);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(published_ports))]
pub(crate) static PUBLISHED_PORTS: Array<u32> =
    Array::with_max_entries(abi::PUBLISHED_PORTS.max_entries, abi::PUBLISHED_PORTS.flags);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(backend_ports))]
pub(crate) static BACKEND_PORTS: Array<u32> =
    Array::with_max_entries(abi::BACKEND_PORTS.max_entries, abi::BACKEND_PORTS.flags);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(conntrack))]
pub(crate) static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(abi::CONNTRACK.max_entries, abi::CONNTRACK.flags);

/// TCP flows until their handshake completes (see `conntrack::promote`).
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(conntrack_opening))]
pub(crate) static CONNTRACK_OPENING: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(
    abi::CONNTRACK_OPENING.max_entries,
    abi::CONNTRACK_OPENING.flags,
);

/// Datagrams whose first fragment was translated: how to translate the
/// later ones (see `fragments`).
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(fragments))]
pub(crate) static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::with_max_entries(abi::FRAGMENTS.max_entries, abi::FRAGMENTS.flags);

/// Incremented by userspace after it removes or changes mappings.
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(services_gen))]
pub(crate) static SERVICES_GEN: Array<u64> =
    Array::with_max_entries(abi::SERVICES_GEN.max_entries, abi::SERVICES_GEN.flags);

/// Whether the conntrack may hold a masqueraded flow (see
/// `portfwd_common::MASQ_FLOWS`).
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(masq_flows))]
pub(crate) static MASQ_FLOWS: Array<u64> =
    Array::with_max_entries(abi::MASQ_FLOWS.max_entries, abi::MASQ_FLOWS.flags);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(counters))]
pub(crate) static COUNTERS: PerCpuHashMap<ServiceKey, MappingCounters> =
    PerCpuHashMap::with_max_entries(abi::COUNTERS.max_entries, abi::COUNTERS.flags);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(stats))]
pub(crate) static STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(abi::STATS.max_entries, abi::STATS.flags);

/// `portfwd trace`'s events (see `trace`).
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(trace))]
pub(crate) static TRACE: RingBuf =
    RingBuf::with_byte_size(abi::TRACE.max_entries, abi::TRACE.flags);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(trace_on))]
pub(crate) static TRACE_ON: Array<TraceConfig> =
    Array::with_max_entries(abi::TRACE_ON.max_entries, abi::TRACE_ON.flags);

/// Per-CPU scratch memory for building conntrack entries: a BPF stack is
/// limited to 512 bytes, and an entry with its key takes a quarter of it.
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(scratch))]
pub(crate) static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// NAT46: the host's IPv4 source per mapping of an IPv4 container on an
/// IPv6 host address (see `nat46`).
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(nat46_src))]
pub(crate) static NAT46_SRC: HashMap<ServiceKey, Addr> =
    HashMap::with_max_entries(abi::NAT46_SRC.max_entries, abi::NAT46_SRC.flags);

/// Source allowlists (see `tc::flow::refused`). aya-ebpf adds `BPF_F_NO_PREALLOC`
/// to an LPM trie's flags itself.
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(allow))]
pub(crate) static ALLOW: LpmTrie<AllowKey, u8> =
    LpmTrie::with_max_entries(abi::ALLOW.max_entries, 0);

/// The interfaces a packet is redirected through into the container's
/// namespace, a bit each (see `verdict::deliver`, `lists_link`).
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(peer_links))]
pub(crate) static PEER_LINKS: Array<u32> =
    Array::with_max_entries(abi::PEER_LINKS.max_entries, abi::PEER_LINKS.flags);

/// Every interface towards containers, a bit each (see
/// `tc::service::forged_source`, `lists_link`).
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(container_links))]
pub(crate) static CONTAINER_LINKS: Array<u32> =
    Array::with_max_entries(abi::CONTAINER_LINKS.max_entries, abi::CONTAINER_LINKS.flags);

/// Per-CPU memory for the answers the TC programs send (see `reply`), and
/// each CPU's rate limit of them.
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(reply))]
pub(crate) static REPLY: PerCpuArray<ReplyScratch> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's cache of the FIB's answers for the packets the TC programs
/// redirect: next hop and frame addresses (see `verdict::next_hop`);
/// direct-mapped, a slot per hash of the interface and the packet's
/// addresses.
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(next_hops))]
pub(crate) static NEXT_HOPS: PerCpuArray<NextHop> =
    PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);

/// Slots of `NEXT_HOPS`, a power of two: more than the containers one CPU
/// sends to at once on most hosts; a collision costs a FIB lookup.
pub(crate) const NEXT_HOP_SLOTS: u32 = 64;

/// Whether the port bitmap `bitmap` (see `port_bit`) has no bit for the
/// protocol's port (host byte order): one array read, which the verifier
/// inlines. A missing word (cannot happen: the index is in range) counts
/// as a bit, so that the caller looks further.
// Inlined: the map is then a constant at each lookup, which the verifier
// needs to inline the array read.
#[inline(always)]
pub(crate) fn lacks_port(bitmap: &Array<u32>, proto: u8, port: u16) -> bool {
    let (word, bit) = port_bit(proto, port);
    bitmap.get(word).is_some_and(|bits| bits & bit == 0)
}

/// One of the host's addresses (`LOCAL_ADDRS`, kept current by the port
/// holder; `up` and every `map` refresh it), for the TC programs and the
/// socket programs alike. Most addresses asked about are not (a reply's
/// client, a container's peer elsewhere, a remote address dialed): their
/// clear bit in `LOCAL_ADDR_BITS` answers first, in one array read that
/// the verifier inlines (see `lacks_port`), without the hash lookup. A
/// missing word (cannot happen: the index is in range) counts as a bit.
// Not inlined: the key stays out of `start_flow`'s frame; and inlined, the
// bit's check took `pf_tc_backend_in`'s own frame to 40 bytes, which must
// stay within 32 (see `tc::flow::start_flow`).
#[inline(never)]
pub(crate) fn is_host_address(family: u8, addr: &Addr) -> bool {
    let (word, bit) = local_addr_bit(family, addr);
    if LOCAL_ADDR_BITS
        .get(word)
        .is_some_and(|bits| bits & bit == 0)
    {
        return false;
    }
    // SAFETY: the value is not read, only its presence.
    unsafe { LOCAL_ADDRS.get(&LocalAddrKey::new(family, *addr)) }.is_some()
}

/// Whether a bitmap of interfaces (`PEER_LINKS`, `CONTAINER_LINKS`) lists
/// `ifindex`: one array read, inlined by the verifier (see `lacks_port`).
/// An index beyond the bitmap is not listed.
// Inlined: the map is then a constant at each lookup (see `lacks_port`).
#[inline(always)]
pub(crate) fn lists_link(bitmap: &Array<u32>, ifindex: u32) -> bool {
    let (word, bit) = link_bit(ifindex);
    bitmap.get(word).is_some_and(|bits| bits & bit != 0)
}
