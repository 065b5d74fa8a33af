//! The keys and values of the maps, `#[repr(C)]` with every padding byte
//! spelled out (see the crate doc).

use crate::{
    CT_TCP_CLOSING_NS, CT_TCP_IDLE_NS, CT_TCP_SYN_NS, CT_UDP_IDLE_NS, FAMILY_V4, IPPROTO_TCP,
    NAME_LEN,
};

/// An IPv4 or IPv6 address: IPv4 lives in `words[0]`, the other words zero.
/// All zero with a family is that family's wildcard ("any local address").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr {
    pub words: [u32; 4],
}

impl Addr {
    pub const UNSPECIFIED: Addr = Addr { words: [0; 4] };

    pub const fn v4(be: u32) -> Self {
        Addr {
            words: [be, 0, 0, 0],
        }
    }

    pub const fn v6(words: [u32; 4]) -> Self {
        Addr { words }
    }

    pub const fn is_unspecified(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == 0 && self.words[3] == 0
    }

    /// A loopback address of `family`: 127.0.0.0/8, or for IPv6 `::1` and
    /// the IPv4-mapped `::ffff:127.0.0.0/104`. The words hold the address's
    /// bytes in network order, so this looks at bytes, not at numbers.
    pub const fn is_loopback(&self, family: u8) -> bool {
        let first = self.words[0].to_ne_bytes();
        if family == FAMILY_V4 {
            return first[0] == 127;
        }
        if self.words[0] != 0 || self.words[1] != 0 {
            return false;
        }
        let third = self.words[2].to_ne_bytes();
        let last = self.words[3].to_ne_bytes();
        match third {
            [0, 0, 0, 0] => last[0] == 0 && last[1] == 0 && last[2] == 0 && last[3] == 1,
            [0, 0, 0xff, 0xff] => last[0] == 127,
            _ => false,
        }
    }
}

/// Key of the services map: a published host address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

impl ServiceKey {
    pub const fn new(family: u8, addr: Addr, port: u16, proto: u8) -> Self {
        ServiceKey {
            addr,
            port,
            proto,
            family,
        }
    }

    /// The wildcard entry that serves every local address of this family.
    pub const fn wildcard(&self) -> Self {
        ServiceKey::new(self.family, Addr::UNSPECIFIED, self.port, self.proto)
    }
}

/// Value of the services map: the container endpoint and the mapping's name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    /// `SERVICE_FLAG_*`.
    pub flags: u8,
    /// The host interface the kernel routes to the container through (0:
    /// unknown): the TC path redirects straight to it.
    pub ifindex: u32,
    pub name: [u8; NAME_LEN],
}

/// Key of the connection tracking map: a flow as the packet carries it, in
/// either direction (client -> published address, or container -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// This entry is for the reply direction (container -> client).
pub const CT_FLAG_REPLY: u8 = 1;
/// Both sides sent a FIN, or a RST was seen before the flow was established
/// (or with its other entry gone; after, see `CT_MORE_RESET`): the flow ends
/// after `CT_TCP_CLOSING_NS`. Set on both entries of the flow.
pub const CT_FLAG_CLOSING: u8 = 2;
/// A hairpin flow (a container dialing a published address through the
/// host): the other end is rewritten too, see `CtValue::masq_addr`.
pub const CT_FLAG_MASQ: u8 = 4;
/// This entry's direction sent a FIN (its side is closed; the other side
/// may go on sending: a half-close).
pub const CT_FLAG_FIN: u8 = 8;
/// The flow completed its handshake: the client's first packet after the
/// container's answer (`CT_FLAG_ANSWERED`) sets it on both entries. Until
/// then each entry ends after `CT_TCP_SYN_NS` idle, so that a SYN flood
/// from spoofed sources, which the container answers and nobody confirms,
/// leaves no entries for the established timeout (`CT_TCP_IDLE_NS`).
pub const CT_FLAG_ESTABLISHED: u8 = 16;
/// Not a translated flow: the replies of UDP datagrams that the host itself
/// sent from a published port (a container masqueraded by the host's NAT,
/// which kept its port). The key is the reply's; its packets belong to the
/// host (its NAT), and are passed untouched, never taken for a new flow to
/// the mapping. Only the flags and `last_seen_ns` mean anything.
pub const CT_FLAG_HOST: u8 = 32;
/// NAT46: an IPv6 client of an IPv4 container (a mapping on an IPv6 host
/// address to an IPv4 container). Always with `CT_FLAG_MASQ`: the container
/// sees the host's IPv4 address towards it (`pf_nat46_src`). The two entries
/// are of different families: the forward one is keyed by the IPv6 packet
/// and holds IPv4 addresses (container, masquerade source); the reply one is
/// keyed by the IPv4 packet and holds IPv6 addresses (published address,
/// client).
pub const CT_FLAG_NAT46: u8 = 64;
/// A reply entry whose container answered (its SYN-ACK, or any later
/// packet): the client's next packet establishes the flow. A client's ACK
/// before any answer (sent blind, by a spoofed source) establishes
/// nothing. (Entries of builds before this flag have `CT_FLAG_ESTABLISHED`
/// on an answered reply entry, which counts as answered.) UDP: both
/// entries of a flow the container answered while it was in the opening
/// table; the client's next datagram moves it to the main one.
pub const CT_FLAG_ANSWERED: u8 = 128;

/// In `CtValue::more_flags`: this entry's side sent its FIN, and the other
/// side acknowledged exactly that FIN (the entry's mark is the FIN's end,
/// see `CtValue::tcp_next`). When the other side's FIN is acknowledged
/// too, the flow ended cleanly, and both entries are removed at that last
/// ACK instead of waiting out the closing time.
pub const CT_MORE_FIN_ACKED: u8 = 1;
/// In `CtValue::more_flags`, on both entries of an established flow: a RST
/// from where its sender's side is was seen (`last_seen_ns` says when).
/// The flow ends after `CT_TCP_CLOSING_NS` idle, unless a packet other
/// than a RST, from where its own side is, comes first: then the reset was
/// not the end (a forged one inside the receiver's window, which the
/// receiving stack answers with a challenge ACK, RFC 5961; or the flow
/// simply goes on), and the flag is cleared. The stack that sent a genuine
/// reset answers whatever still reaches it with another. A SYN of the
/// client changes nothing of such a flow (see `CT_MORE_SYN_PASSED`).
pub const CT_MORE_RESET: u8 = 2;
/// On the forward entry of a flow past its handshake, not masqueraded: a
/// client's SYN passed on it, changing nothing (it may be forged), and its
/// end is kept in the entry's `masq_addr`, which such an entry does not use
/// (`CtValue::passed_syn_end`). The container's SYN-ACK that acknowledges
/// exactly that end says that its old connection with these ends is gone
/// and it accepted the new one: the flow starts again there, as netfilter
/// takes up a connection whose SYN it ignored at the SYN-ACK that
/// acknowledges it.
pub const CT_MORE_SYN_PASSED: u8 = 4;

/// Value of the connection tracking map: how to rewrite the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// Forward: the new destination (container). Reply: the new source
    /// (the published address the client dialed).
    pub nat_addr: Addr,
    /// Network byte order.
    pub nat_port: u16,
    pub flags: u8,
    /// `CT_MORE_*`: flags beyond the eight of `flags`. The builds before
    /// them wrote 0 here and never read it.
    pub more_flags: u8,
    /// Where to redirect the rewritten packet (0: let the stack route it).
    pub ifindex: u32,
    /// The mapping the flow belongs to: it must still exist, with the same
    /// container, for the flow to go on.
    pub service: ServiceKey,
    /// With `CT_FLAG_MASQ`: forward, the new source (the host address the
    /// client dialed, with a port chosen so flows stay distinct); reply, the
    /// new destination (the client). The container then replies to the
    /// host, even when the client shares its link or is itself.
    pub masq_addr: Addr,
    /// Network byte order.
    pub masq_port: u16,
    /// The services generation (`pf_services_gen`, truncated) at which the
    /// flow's mapping was last seen unchanged: while it is current, the
    /// mapping is not looked up again.
    pub generation: u16,
    /// `bpf_ktime_get_coarse_ns` of the last packet (refreshed at most once
    /// a second).
    pub last_seen_ns: u64,
    /// Once the flow is closing (`CT_FLAG_CLOSING`): since when
    /// (`closing_since_ns`). Before, for TCP: where this entry's side of
    /// the flow is (`tcp_next`), against which the programs check a
    /// reset and the client's establishing ACK. One word for both, because
    /// an entry needs its progress only until it closes, and the builds
    /// before read this word only from a closing entry (and wrote 0
    /// otherwise, which reads as no progress known): the entry keeps their
    /// layout, and flows go on across an upgrade.
    pub closing_or_progress: u64,
}

impl CtValue {
    /// Whether this entry, of a flow of IP protocol `proto`, has ended at
    /// `now` (`CLOCK_MONOTONIC` ns). The programs decide so at each lookup
    /// and leave dead entries in the map; the port holder's sweep and
    /// `conntrack list` ask the same question of what they read.
    #[inline(always)]
    pub fn expired(&self, proto: u8, now: u64) -> bool {
        let idle = now.saturating_sub(self.last_seen_ns);
        if proto != IPPROTO_TCP {
            return idle > CT_UDP_IDLE_NS;
        }
        if self.flags & CT_FLAG_CLOSING != 0 {
            return now.saturating_sub(self.closing_since_ns()) > CT_TCP_CLOSING_NS;
        }
        if self.more_flags & CT_MORE_RESET != 0 {
            return idle > CT_TCP_CLOSING_NS;
        }
        if self.flags & CT_FLAG_ESTABLISHED == 0 {
            return idle > CT_TCP_SYN_NS;
        }
        idle > CT_TCP_IDLE_NS
    }

    /// When the flow started closing; meaningful with `CT_FLAG_CLOSING`.
    /// A mark (below 2^32) there instead was written by a packet that
    /// another CPU handled as the flow closed; no clock reading is that
    /// low after the first 4.3 s of uptime. The last packet's time then
    /// stands in, so that the flow keeps its closing time.
    pub const fn closing_since_ns(&self) -> u64 {
        if self.closing_or_progress >> 32 == 0 {
            self.last_seen_ns
        } else {
            self.closing_or_progress
        }
    }

    /// TCP, until the flow is closing: where this entry's side is, its
    /// mark: the sequence number after everything it had sent (its SYN,
    /// data and FIN) when the mark last moved, which the programs do every
    /// 32 KiB or so; so the side's true end is at most that far past it.
    /// 0: not known yet.
    pub const fn tcp_next(&self) -> u32 {
        self.closing_or_progress as u32
    }

    pub const fn set_tcp_next(&mut self, next: u32) {
        self.closing_or_progress = next as u64;
    }

    /// With `CT_MORE_SYN_PASSED`: the end of the client's SYN that passed.
    pub const fn passed_syn_end(&self) -> u32 {
        self.masq_addr.words[0]
    }

    pub const fn set_passed_syn_end(&mut self, end: u32) {
        self.masq_addr.words[0] = end;
    }

    /// Starts the entry's TCP state again at `now`: `flags`, no further
    /// marks (`more_flags`), its side's mark `mark` (0: not known yet).
    /// A reopened flow's entries and a flow restarted at the container's
    /// SYN-ACK begin so.
    #[inline(always)]
    pub const fn start_again(&mut self, flags: u8, mark: u32, now_ns: u64) {
        self.flags = flags;
        self.more_flags = 0;
        self.last_seen_ns = now_ns;
        self.set_tcp_next(mark);
    }

    pub const fn set_closing_since(&mut self, now_ns: u64) {
        self.closing_or_progress = now_ns;
    }
}

/// Key of the fragments map: one IP datagram as its fragments carry it
/// before translation (addresses, protocol, IP identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub saddr: Addr,
    pub daddr: Addr,
    /// The IPv4 identification (16 bits) or the IPv6 Fragment header's (32).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// Value of the fragments map: the addresses the first fragment was given;
/// later fragments get the same (ports and the L4 checksum live in the
/// first fragment only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentValue {
    pub saddr: Addr,
    pub daddr: Addr,
    /// The flow's mapping, for its counters.
    pub service: ServiceKey,
    /// Where to redirect (0: let the stack route it).
    pub ifindex: u32,
    /// `FRAGMENT_FLAG_*`.
    pub flags: u32,
    /// The interface the first fragment came in on (or left by, at egress):
    /// later fragments must come the same way, so that a forged or stray
    /// fragment with the same addresses and identification elsewhere is not
    /// taken along.
    pub ingress_ifindex: u32,
    /// `bpf_ktime_get_ns` of the first fragment.
    pub first_seen_ns: u64,
}

/// The datagram is a reply (container -> client).
pub const FRAGMENT_FLAG_REPLY: u32 = 1;
/// Two live datagrams with this key were translated differently (their
/// first fragments went to different places): their later fragments cannot
/// tell which is whose, and are passed untranslated.
pub const FRAGMENT_FLAG_CLASH: u32 = 2;

/// Per-mapping traffic counters (summed over CPUs by userspace). "in" is
/// client -> container, "out" container -> client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingCounters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub connections: u64,
}

/// The port holder does not hold this mapping's host port: the runtime
/// holds it (podman's conmon binds its containers' ports itself).
pub const SERVICE_FLAG_NO_HOLD: u8 = 1;
/// The mapping has a source allowlist (`pf_allow`): a new flow from a client
/// the list does not hold is refused. Without it no lookup is made.
pub const SERVICE_FLAG_HAS_ALLOWLIST: u8 = 2;
/// The allowlist names `host`: the host's own processes (the socket path)
/// may connect. Meaningful only with `SERVICE_FLAG_HAS_ALLOWLIST`.
pub const SERVICE_FLAG_HOST_ALLOWED: u8 = 4;
/// A client the allowlist refuses gets no answer (`--refuse drop`). Without
/// it, it gets what a closed port gives: a TCP reset, an ICMP port
/// unreachable. Meaningful only with `SERVICE_FLAG_HAS_ALLOWLIST`.
pub const SERVICE_FLAG_REFUSE_SILENTLY: u8 = 8;

/// The data of a `pf_allow` key (after the LPM trie's prefix length): a
/// mapping's service key, then a client network. The prefix length of an
/// entry is `ALLOW_SERVICE_BITS` plus the network's prefix, so that a lookup
/// with a client address matches only that mapping's networks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowKey {
    pub service: ServiceKey,
    /// Network byte order, as in `Addr`.
    pub client: Addr,
}

/// Bits of `AllowKey` before the client address: the whole service key.
pub const ALLOW_SERVICE_BITS: u32 = 8 * core::mem::size_of::<ServiceKey>() as u32;

/// Key of the local addresses map (the host's own addresses, which wildcard
/// mappings serve). The value is unused (one byte).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalAddrKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}

impl LocalAddrKey {
    pub const fn new(family: u8, addr: Addr) -> Self {
        LocalAddrKey {
            addr,
            family,
            _pad: [0; 3],
        }
    }
}

/// The single entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Network namespace cookie of the host namespace (where `up` ran). Only
    /// sockets in it are translated; zero means nothing is translated.
    pub host_netns_cookie: u64,
}

/// How many translated destinations one socket remembers. A connected
/// socket (TCP, connected UDP) needs one; an unconnected UDP socket that
/// sends to more published addresses than this at once sees the replies of
/// the oldest come from the container's address. A power of two.
pub const SOCK_DIALED_SLOTS: usize = 4;

/// One translation a socket went through: the backend as the socket sees it
/// after translation (for IPv6 sockets a v4 backend appears as
/// `::ffff:a.b.c.d`, family V6) and the address the application dialed,
/// restored by getpeername and recvmsg.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DialedSlot {
    pub backend: Addr,
    pub dialed: Addr,
    /// Network byte order.
    pub backend_port: u16,
    /// Network byte order.
    pub dialed_port: u16,
    /// `FAMILY_V4`/`FAMILY_V6` of both addresses; 0: an empty slot.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The slots of `SOCK_CONNECTED`: a power of two (a socket's slot is its
/// cookie's low bits).
pub const SOCK_CONNECTED_SLOTS: u32 = 65_536;

/// What a socket connected through a mapping remembers, in the slot of
/// `SOCK_CONNECTED` its cookie selects (see `portfwd-ebpf/src/sock.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConnected {
    /// The cookie of the socket that holds the slot; 0: free. Changed only
    /// by atomic additions (see `sock::claim_slot`), so that of two sockets
    /// claiming one slot at once at most one wins.
    pub owner: u64,
    pub slot: DialedSlot,
}

impl SockConnected {
    /// The slot of the socket with `cookie`.
    pub const fn index_of(cookie: u64) -> u32 {
        cookie as u32 & (SOCK_CONNECTED_SLOTS - 1)
    }
}

/// What a translated socket remembers, in the socket's own storage
/// (`BPF_MAP_TYPE_SK_STORAGE`): it lives exactly as long as the socket, so
/// no number of short-lived sockets can push out a live one's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockDialed {
    pub slots: [DialedSlot; SOCK_DIALED_SLOTS],
    /// The slot an unconnected send to a new destination takes next.
    pub next: u32,
    pub _pad: u32,
}

/// The single entry of the trace switch map: the programs write trace
/// events only while `enabled` is 1, and only those the filters pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    pub enabled: u32,
    /// Only packets from or to this port (0: any). Network byte order.
    pub port: u16,
    /// Only this protocol (0: any).
    pub proto: u8,
    /// Only drops and packets passed untranslated (no new flows).
    pub drops_only: u8,
}

/// A new flow was translated: `saddr:sport -> daddr:dport` became
/// `-> nat_addr:nat_port` (and, for a hairpin flow, the source
/// `masq_addr:masq_port`).
pub const TRACE_FLOW_NEW: u8 = 1;
/// A packet counted under `stat` (a drop, a packet passed untranslated, a
/// flow stopped because its mapping went away).
pub const TRACE_STAT: u8 = 2;

/// A host process's socket was pointed at the container: the destination it
/// dialed (`daddr:dport`) became `nat_addr:nat_port` (the source is not
/// known yet at connect).
pub const TRACE_SOCKET: u8 = 3;

/// Where an event happened: a TC program that does not know which of the
/// interfaces below it serves...
pub const TRACE_PATH_TC: u8 = 0;
/// ...a TC program on an uplink's ingress...
pub const TRACE_PATH_UPLINK: u8 = 1;
/// ...on a container-side interface (a hairpin flow when it translates)...
pub const TRACE_PATH_CONTAINERS: u8 = 2;
/// ...on an uplink's egress; the socket programs at connect()...
pub const TRACE_PATH_EGRESS: u8 = 3;
pub const TRACE_PATH_CONNECT: u8 = 4;
/// ...and at an unconnected UDP send.
pub const TRACE_PATH_SENDMSG: u8 = 5;

/// One event of `portfwd trace`, written into the `pf_trace` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns`.
    pub time_ns: u64,
    pub saddr: Addr,
    pub daddr: Addr,
    pub nat_addr: Addr,
    pub masq_addr: Addr,
    /// Network byte order, as are the other ports.
    pub sport: u16,
    pub dport: u16,
    pub nat_port: u16,
    pub masq_port: u16,
    /// `TRACE_FLOW_NEW`, `TRACE_STAT` or `TRACE_SOCKET`.
    pub kind: u8,
    pub family: u8,
    pub proto: u8,
    /// `TRACE_PATH_*`.
    pub path: u8,
    /// With `TRACE_STAT`: the `Stat` index. With `TRACE_FLOW_NEW`: the
    /// forward entry's `CT_FLAG_*` (with `CT_FLAG_NAT46`, `nat_addr` and
    /// `masq_addr` are IPv4 in an IPv6 event).
    pub stat: u32,
    /// The interface the packet came in on (or left by).
    pub ifindex: u32,
    /// `TRACE_SOCKET`: the process (thread group id) whose socket it is.
    pub pid: u32,
}
