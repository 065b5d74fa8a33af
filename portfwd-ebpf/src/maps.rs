//! The maps shared with userspace. Names and layouts come from
//! `portfwd-common`; userspace pins each under the bpffs directory.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use portfwd_common::{
    CONNTRACK_MAX, Config, CtKey, CtValue, FRAGMENTS_MAX, FragmentKey, FragmentValue,
    LOCAL_ADDRS_MAX, LocalAddrKey, MappingCounters, SERVICES_MAX, SOCK_REVNAT_MAX, STATS_LEN,
    ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue,
};

/// Entries are allocated on insert (no preallocation) so that a lookup never
/// sees an element that a concurrent delete recycled for another key.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Published (host address, port, protocol) -> container endpoint.
#[map(name = "pf_services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(SERVICES_MAX, BPF_F_NO_PREALLOC);

/// The host's own addresses: wildcard mappings serve these (and loopback).
#[map(name = "pf_local_addrs")]
pub static LOCAL_ADDRS: HashMap<LocalAddrKey, u8> = HashMap::with_max_entries(LOCAL_ADDRS_MAX, 0);

#[map(name = "pf_config")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// (socket, backend) -> the address the application dialed.
#[map(name = "pf_sock_revnat")]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(SOCK_REVNAT_MAX, 0);

/// Tracked flows of the TC path, both directions (see `conntrack`).
#[map(name = "pf_conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(CONNTRACK_MAX, 0);

/// Datagrams whose first fragment was translated: how to translate the
/// later ones (see `fragments`).
#[map(name = "pf_fragments")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::with_max_entries(FRAGMENTS_MAX, 0);

/// Traffic of each mapping; userspace creates the entry with the mapping.
#[map(name = "pf_counters")]
pub static COUNTERS: PerCpuHashMap<ServiceKey, MappingCounters> =
    PerCpuHashMap::with_max_entries(SERVICES_MAX, 0);

/// What the TC programs did and passed, indexed by `portfwd_common::STAT_*`.
#[map(name = "pf_stats")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Per-CPU scratch memory for building conntrack entries: a BPF stack is
/// limited to 512 bytes, and an entry with its key takes a quarter of it.
#[map(name = "pf_scratch")]
pub static SCRATCH: PerCpuArray<crate::conntrack::Scratch> = PerCpuArray::with_max_entries(1, 0);
