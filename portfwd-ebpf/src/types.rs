//! Types private to the eBPF programs (the shared ones are in
//! `portfwd-common`), kept apart so that `maps` and the modules that use
//! the maps import them without importing each other.

use aya_ebpf::{
    bindings::{bpf_redir_neigh, bpf_sock_tuple},
    maps::lpm_trie::Key as LpmKey,
};
use portfwd_common::{Addr, AllowKey, CtKey, CtValue, FragmentKey, FragmentValue};

use crate::packet::Packet;

/// Room for the largest answer `reply` builds (an ICMPv6 error: 14 + 1280
/// bytes), and for the largest lengths the verifier can be shown (see
/// `reply::bounded_len`) at their offsets: up to 2048 bytes from offset 62.
pub(crate) const FRAME_ROOM: usize = 2176;

/// Per-CPU memory of one TC program run (the `pf_scratch` map): the parsed
/// packet and its flow key, and a conntrack entry under construction.
///
/// The verifier limits the stack of a whole BPF-to-BPF call chain to 512
/// bytes; kept in the main frame, the packet and its key made the chain
/// `tc program -> start_flow -> rewrite` too deep (and how deep depends on
/// the LLVM that links the object). Kernel 6.1's verifier, which counts
/// each frame rounded up to 32 bytes, rejected it at 544. Here they cost no
/// stack at all: the chain needs 416 bytes there.
///
/// `nat` comes first, at offset 0 (hence `repr(C)`), so that
/// `tc::flow::start_flow` reaches it with no offset from its lookup's
/// result. LLVM may compute a field's address before the null check,
/// which kernel 6.1's verifier refuses ("pointer arithmetic on
/// map_value_or_null"): it did so for the NAT46 source, which that
/// function now reads through the same, checked, pointer.
#[repr(C)]
pub(crate) struct Scratch {
    /// Where a new flow goes (`tc::flow::start_flow`).
    pub nat: Nat,
    pub pkt: Packet,
    pub flow_key: CtKey,
    pub key: CtKey,
    pub value: CtValue,
    pub frag_key: FragmentKey,
    pub frag_value: FragmentValue,
    /// A source allowlist lookup (`tc::flow::refused`).
    pub allow_key: LpmKey<AllowKey>,
    /// The host's IPv4 source of a new NAT46 flow (`nat46::start`).
    pub nat46_source: Addr,
    /// A host socket lookup (`tc::host_socket`).
    pub sock_tuple: bpf_sock_tuple,
}

/// Per-CPU memory for one answer (the `pf_reply` map), and the CPU's ICMP
/// rate limit, which outlives the program run.
pub(crate) struct ReplyScratch {
    pub frame: [u8; FRAME_ROOM],
    /// The TCP/ICMPv6 checksum's pseudo-header.
    pub pseudo: [u8; 40],
    pub credit_ns: u64,
    pub last_ns: u64,
}

/// One slot of a CPU's next-hop cache (the `pf_next_hops` map, see
/// `verdict::next_hop`): where a packet from `src` to `dst` leaving by
/// `ifindex` goes next, as the FIB said at `learned_ns`.
pub(crate) struct NextHop {
    pub learned_ns: u64,
    /// The packet's addresses, as `bpf_fib_lookup` takes them (an IPv4
    /// address in the first word, the others zero).
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub ifindex: u32,
    /// The destination's: `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// 1 when the FIB gave the fields below, 0 when it gave nothing (the
    /// kernel then routes the packet itself).
    pub answered: u8,
    /// The frame's first 12 bytes: the next hop's link-layer address, then
    /// the interface's own.
    pub macs: [u8; 12],
    /// The next hop's address, as `bpf_redirect_neigh` takes it.
    pub gateway: bpf_redir_neigh,
}

/// Where a new flow goes: the container, and for a hairpin flow the
/// source it is masqueraded to.
pub(crate) struct Nat {
    pub backend: Addr,
    /// The container's family: not the client's for a NAT46 flow.
    pub backend_family: u8,
    pub backend_port: u16,
    pub backend_ifindex: u32,
    /// The interface the flow came in on (its replies go back there).
    pub client_ifindex: u32,
    /// Hairpin: the (host address, port) the client is rewritten to.
    pub masq: Option<(Addr, u16)>,
    /// The services generation read before the mapping was looked up.
    pub generation: u16,
}
