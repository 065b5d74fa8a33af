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

mod abi;
mod types;
#[cfg(feature = "user")]
mod user;

pub use abi::*;
pub use types::*;

/// Address family tags used in keys and values (not the kernel's AF_* values,
/// so that a zeroed struct never looks like a valid address).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Longest mapping name, in bytes; shorter names are NUL-padded.
/// 64 fits a CNI container id (64 hex digits).
pub const NAME_LEN: usize = 64;

// Connection tracking timeouts, in nanoseconds of the monotonic clock
// (`bpf_ktime_get_coarse_ns`).

/// An established TCP flow ends after this long idle: 5 days, as
/// netfilter's established timeout, far beyond the 2 h after which Linux
/// sends its first keepalive probe.
pub const CT_TCP_IDLE_NS: u64 = 5 * 24 * 60 * 60 * 1_000_000_000;
/// Once both sides sent a FIN (or after a RST before the flow was
/// established), a TCP flow lingers this long for the last ACKs. A flow
/// marked by a RST once established (`CT_MORE_RESET`) ends after this
/// long idle.
pub const CT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
/// A TCP flow that never saw a reply (a SYN flood, a dead container) ends
/// after this long idle, not after `CT_TCP_IDLE_NS`.
pub const CT_TCP_SYN_NS: u64 = 60 * 1_000_000_000;
pub const CT_UDP_IDLE_NS: u64 = 120 * 1_000_000_000;
/// How long the later fragments of a datagram are followed after its first
/// one: a datagram crosses a LAN in microseconds, and the kernel gives up
/// reassembling after 30 s.
pub const FRAGMENT_TIMEOUT_NS: u64 = 2 * 1_000_000_000;

/// The skb mark a TC ingress program gives a packet it translated and
/// redirected (when the packet had no mark): the uplink's egress program
/// then lets it go at once, clearing the mark, instead of looking it up
/// again. One exact value, not a bit, so that other marks (policy routing,
/// Kubernetes' and Calico's bits) are neither read as ours nor changed.
pub const TRANSLATED_MARK: u32 = 0x7066_7464; // "pftd"

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

    /// Linux sends its first keepalive probe 7,200 s after the connection
    /// last received anything (`tcp_keepalive_time`'s default), a timer
    /// that fires late and an entry refreshed once a second at most: an
    /// idle timeout of 2 h always ended such a flow just before its probe,
    /// which then met no flow (the host's reset, or a container's probe
    /// leaving untranslated). Netfilter keeps an established flow 5 days.
    #[test]
    fn an_established_flow_outlives_the_first_keepalive_probe() {
        let established = CtValue {
            flags: CT_FLAG_ESTABLISHED,
            last_seen_ns: 1_000_000_000,
            ..CtValue::default()
        };
        let probe = 1_000_000_000 + (7_200 + 15 * 60) * 1_000_000_000;
        assert!(!established.expired(IPPROTO_TCP, probe));
        assert!(established.expired(IPPROTO_TCP, 1_000_000_000 + CT_TCP_IDLE_NS + 1));
        // Not a flow that never got established, nor a UDP one.
        let opening = CtValue {
            flags: 0,
            ..established
        };
        assert!(opening.expired(IPPROTO_TCP, probe));
        assert!(established.expired(IPPROTO_UDP, probe));
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
        assert_eq!(size_of::<AllowKey>(), 36);
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(size_of::<TraceConfig>(), 8);
        assert_eq!(size_of::<TraceEvent>(), 96);
        assert_eq!(size_of::<DialedSlot>(), 40);
        assert_eq!(size_of::<SockDialed>(), 40 * SOCK_DIALED_SLOTS + 8);
        assert_eq!(size_of::<SockConnected>(), 48);
        assert!(SOCK_CONNECTED_SLOTS.is_power_of_two());
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
