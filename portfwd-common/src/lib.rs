//! The kernel/user ABI of portfwd: the keys, values and names of the BPF maps
//! that the eBPF programs read and the CLI writes.
//!
//! Byte order: every address and port in these structs is stored in network
//! byte order, exactly as the kernel hands them to the programs (socket
//! context fields and packet headers), so the hot path never swaps bytes.
//! Userspace converts with the helpers behind the `user` feature.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields, so that its
//! bytes (the map key) are fully defined: a hash map compares keys bytewise.
#![no_std]

/// Address family tags used in keys and values (not the kernel's AF_* values,
/// so that a zeroed struct never looks like a valid address).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Longest mapping name, in bytes; shorter names are NUL-padded.
/// 64 fits a CNI container id (64 hex digits).
pub const NAME_LEN: usize = 64;

/// Names of the maps, as the eBPF object declares them and as they are
/// pinned under the bpffs directory. The kernel truncates object names to 15
/// bytes, so they are kept short enough to be recognisable in `bpftool`.
pub const SERVICES_MAP: &str = "pf_services";
pub const LOCAL_ADDRS_MAP: &str = "pf_local_addrs";
pub const CONFIG_MAP: &str = "pf_config";
pub const SOCK_REVNAT_MAP: &str = "pf_sock_revnat";
pub const CONNTRACK_MAP: &str = "pf_conntrack";
pub const COUNTERS_MAP: &str = "pf_counters";
pub const STATS_MAP: &str = "pf_stats";
pub const FRAGMENTS_MAP: &str = "pf_fragments";

/// Every map portfwd pins; `down` removes exactly these.
pub const ALL_MAPS: [&str; 8] = [
    SERVICES_MAP,
    LOCAL_ADDRS_MAP,
    CONFIG_MAP,
    SOCK_REVNAT_MAP,
    CONNTRACK_MAP,
    COUNTERS_MAP,
    STATS_MAP,
    FRAGMENTS_MAP,
];

/// Default capacities.
pub const SERVICES_MAX: u32 = 65_536;
pub const LOCAL_ADDRS_MAX: u32 = 1_024;
pub const SOCK_REVNAT_MAX: u32 = 262_144;
/// Two entries per tracked flow (one per direction).
pub const CONNTRACK_MAX: u32 = 2 * 262_144;

/// Connection tracking timeouts, in nanoseconds of `bpf_ktime_get_ns`.
pub const CT_TCP_IDLE_NS: u64 = 2 * 60 * 60 * 1_000_000_000;
/// Once both sides sent a FIN (or after a RST), a TCP flow lingers this
/// long for the last ACKs.
pub const CT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
/// A TCP flow that never saw a reply (a SYN flood, a dead container) ends
/// after this long idle, not after `CT_TCP_IDLE_NS`.
pub const CT_TCP_SYN_NS: u64 = 60 * 1_000_000_000;
pub const CT_UDP_IDLE_NS: u64 = 120 * 1_000_000_000;
/// Datagrams whose first fragment was translated, at once (an LRU: the
/// oldest are forgotten first), and how long their later fragments are
/// followed after the first one: a datagram crosses a LAN in microseconds,
/// and the kernel gives up reassembling after 30 s.
pub const FRAGMENTS_MAX: u32 = 8_192;
pub const FRAGMENT_TIMEOUT_NS: u64 = 2 * 1_000_000_000;

/// Indices of the per-CPU stats array: packets the TC programs saw but did
/// not translate (passed untouched), and what they did.
pub const STAT_PASS_NOT_IP: u32 = 0;
pub const STAT_PASS_FRAGMENT: u32 = 1;
pub const STAT_PASS_IPV6_EXTENSION: u32 = 2;
pub const STAT_PASS_NOT_TCP_UDP: u32 = 3;
pub const STAT_PASS_TRUNCATED: u32 = 4;
pub const STAT_FLOW_NEW: u32 = 5;
pub const STAT_FLOW_STOPPED: u32 = 6;
pub const STAT_REDIRECTED: u32 = 7;
pub const STAT_TO_STACK: u32 = 8;
pub const STAT_REWRITE_FAILED: u32 = 9;
/// Packets of a TCP flow to a published port that conntrack does not know:
/// its entries were evicted (the map was full: least recently used first)
/// or expired. The host answers them with a reset.
pub const STAT_UNTRACKED_MIDFLOW: u32 = 10;
/// Packets from outside the host (an uplink, a container's interface) whose
/// destination or source is a loopback address: never translated, dropped.
/// The kernel would drop them as martians; translated, they would reach a
/// port published on 127.0.0.1 or [::1] from the network.
pub const STAT_DROPPED_LOOPBACK: u32 = 11;
/// Later fragments (not the first) of datagrams whose first fragment was
/// translated, translated the same way: towards the container, and back.
pub const STAT_FRAGMENT_IN: u32 = 12;
pub const STAT_FRAGMENT_OUT: u32 = 13;
/// Later fragments from containers that match no translated first fragment
/// (`STAT_PASS_FRAGMENT` counts those from uplinks): passed to the stack.
pub const STAT_PASS_FRAGMENT_FROM_CONTAINERS: u32 = 14;
/// New flows on an uplink whose source is one of the host's own addresses:
/// forged (the kernel drops them as martians), and their reply entry could
/// capture the host's own connection from that address and port. Dropped.
pub const STAT_DROPPED_LOCAL_SOURCE: u32 = 15;
pub const STATS_LEN: u32 = 16;
/// Names of the stats, by index, as `portfwd list` shows them.
pub const STAT_NAMES: [&str; STATS_LEN as usize] = [
    "passed_not_ip",
    "passed_fragment",
    "passed_ipv6_extension",
    "passed_not_tcp_udp",
    "passed_truncated",
    "flows_new",
    "flows_stopped",
    "redirected",
    "to_stack",
    "rewrite_failed",
    "untracked_midflow",
    "dropped_loopback",
    "fragments_translated_in",
    "fragments_translated_out",
    "passed_fragment_from_containers",
    "dropped_local_source",
];

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
/// Both sides sent a FIN, or a RST was seen: the flow ends after
/// `CT_TCP_CLOSING_NS`. Set on both entries of the flow.
pub const CT_FLAG_CLOSING: u8 = 2;
/// A hairpin flow (a container dialing a published address through the
/// host): the other end is rewritten too, see `CtValue::masq_addr`.
pub const CT_FLAG_MASQ: u8 = 4;
/// This entry's direction sent a FIN (its side is closed; the other side
/// may go on sending: a half-close).
pub const CT_FLAG_FIN: u8 = 8;
/// The container answered: the flow is established (until then a TCP flow
/// ends after `CT_TCP_SYN_NS` idle). Set on both entries.
pub const CT_FLAG_ESTABLISHED: u8 = 16;

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
    pub _pad: u8,
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
    pub _pad2: u16,
    /// `bpf_ktime_get_ns` of the last packet, and of the first FIN/RST.
    pub last_seen_ns: u64,
    pub closing_since_ns: u64,
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

/// Key of the socket reverse-NAT map: which socket, and the backend as the
/// socket sees it after translation (for IPv6 sockets a v4 backend appears
/// as `::ffff:a.b.c.d`, family V6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: u32,
}

/// The address the application dialed, restored by getpeername.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatValue {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY (all impls below): #[repr(C)], made only of integers and arrays
    // of integers, with every padding byte spelled out as a field.
    macro_rules! plain_old_data {
        ($($t:ty),*) => {$(
            unsafe impl aya::Pod for $t {}
            unsafe impl bytemuck::Zeroable for $t {}
            unsafe impl bytemuck::Pod for $t {}
        )*};
    }
    plain_old_data!(
        Addr,
        ServiceKey,
        ServiceValue,
        LocalAddrKey,
        Config,
        SockRevNatKey,
        SockRevNatValue,
        FragmentKey,
        FragmentValue,
        CtKey,
        CtValue,
        MappingCounters
    );

    impl From<core::net::Ipv4Addr> for Addr {
        fn from(ip: core::net::Ipv4Addr) -> Self {
            Addr::v4(u32::from_ne_bytes(ip.octets()))
        }
    }

    impl From<core::net::Ipv6Addr> for Addr {
        fn from(ip: core::net::Ipv6Addr) -> Self {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Addr::v6([word(0), word(4), word(8), word(12)])
        }
    }

    impl Addr {
        /// The family tag and address of a std address.
        pub fn from_ip(ip: core::net::IpAddr) -> (u8, Addr) {
            match ip {
                core::net::IpAddr::V4(v4) => (FAMILY_V4, v4.into()),
                core::net::IpAddr::V6(v6) => (FAMILY_V6, v6.into()),
            }
        }

        /// The std address, given the family tag; None for an unknown tag.
        pub fn to_ip(&self, family: u8) -> Option<core::net::IpAddr> {
            let b = |w: u32| w.to_ne_bytes();
            match family {
                FAMILY_V4 => Some(core::net::Ipv4Addr::from(b(self.words[0])).into()),
                FAMILY_V6 => {
                    let mut o = [0u8; 16];
                    for (i, w) in self.words.iter().enumerate() {
                        o[i * 4..i * 4 + 4].copy_from_slice(&b(*w));
                    }
                    Some(core::net::Ipv6Addr::from(o).into())
                }
                _ => None,
            }
        }
    }

    impl ServiceValue {
        pub fn new(family: u8, addr: Addr, port_be: u16, name: &[u8]) -> Self {
            let mut padded = [0u8; NAME_LEN];
            let len = name.len().min(NAME_LEN);
            padded[..len].copy_from_slice(&name[..len]);
            ServiceValue {
                addr,
                port: port_be,
                family,
                flags: 0,
                ifindex: 0,
                name: padded,
            }
        }

        /// The name without its NUL padding.
        pub fn name_bytes(&self) -> &[u8] {
            let end = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
            &self.name[..end]
        }
    }
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[cfg(feature = "user")]
    #[test]
    fn loopback_addresses_are_recognised_in_both_families() {
        let loopback = |text: &str| {
            let (family, addr) = Addr::from_ip(text.parse().unwrap());
            addr.is_loopback(family)
        };
        for text in [
            "127.0.0.1",
            "127.0.0.2",
            "127.255.255.254",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:127.9.8.7",
        ] {
            assert!(loopback(text), "{text} is loopback");
        }
        for text in [
            "126.255.255.255",
            "128.0.0.1",
            "10.0.0.1",
            "0.0.0.0",
            "::",
            "::2",
            "::ffff:10.0.0.1",
            "::ffff:128.0.0.1",
            "::127.0.0.1",
            "fe80::1",
            "100::1",
            "1::1",
        ] {
            assert!(!loopback(text), "{text} is not loopback");
        }
    }

    // The eBPF side and userspace must agree on these sizes; a change here
    // is an ABI change (pinned maps of the old layout cannot be reused).
    #[test]
    fn abi_sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 24 + NAME_LEN);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 80);
        assert_eq!(size_of::<MappingCounters>(), 40);
        assert_eq!(size_of::<LocalAddrKey>(), 20);
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(size_of::<SockRevNatKey>(), 32);
        assert_eq!(size_of::<SockRevNatValue>(), 20);
        assert_eq!(size_of::<FragmentKey>(), 40);
        assert_eq!(size_of::<FragmentValue>(), 72);
    }

    #[test]
    fn wildcard_keeps_port_protocol_and_family() {
        let key = ServiceKey::new(FAMILY_V6, Addr::v6([1, 2, 3, 4]), 0x901f, IPPROTO_UDP);
        let wild = key.wildcard();
        assert!(wild.addr.is_unspecified());
        assert_eq!(
            (wild.port, wild.proto, wild.family),
            (0x901f, IPPROTO_UDP, FAMILY_V6)
        );
    }

    #[cfg(feature = "user")]
    #[test]
    fn addresses_round_trip_in_network_order() {
        extern crate std;
        use core::net::IpAddr;
        for text in [
            "10.1.2.3",
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "fd00::2",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let (family, addr) = Addr::from_ip(ip);
            assert_eq!(addr.to_ip(family), Some(ip), "{text}");
        }
        // Network byte order: the first octet is the lowest-addressed byte.
        let (_, addr) = Addr::from_ip("10.1.2.3".parse().unwrap());
        assert_eq!(addr.words[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(Addr::UNSPECIFIED.to_ip(99), None);
    }

    #[cfg(feature = "user")]
    #[test]
    fn service_value_name_is_padded_and_truncated() {
        let v = ServiceValue::new(FAMILY_V4, Addr::v4(1), 80u16.to_be(), b"web");
        assert_eq!(v.name_bytes(), b"web");
        let long = [b'a'; 80];
        let v = ServiceValue::new(FAMILY_V4, Addr::v4(1), 80u16.to_be(), &long);
        assert_eq!(v.name_bytes().len(), NAME_LEN);
    }
}
