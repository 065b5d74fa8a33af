//! Table-driven cases for the TC programs through `BPF_PROG_TEST_RUN`
//! (aya's `TestRun`): an input frame, the verdict, the frame that comes out,
//! and the stat it counts. The object is loaded with maps of its own (no
//! pins, nothing attached), so the cases need root but touch no interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::maps::{HashMap, MapData};
use etherparse::Ipv4Header;
use portfwd_common::{
    CONNTRACK, CONNTRACK_OPENING, CONTAINER_LINKS, CT_FLAG_ANSWERED, CT_FLAG_CLOSING,
    CT_FLAG_ESTABLISHED, CT_FLAG_FIN, CT_FLAG_REPLY, CT_MORE_RESET, FRAGMENTS, FragmentKey,
    FragmentValue, PEER_LINKS, Stat, TRANSLATED_MARK,
};

use super::tc_fixture::{
    BACKEND_IN, CLIENT_V4, CLIENT_V6, CTR_V4, CTR_V6, Case, DROP, Failures, HOST_V4, HOST_V6, L4,
    NEXT, OTHER_CTR_V4, REDIRECT, SEQ, SKB_CTX_LEN, TCP_ACK, TCP_FIN, TCP_RST, TO_STACK, Tc,
    UPLINK_IN, UPLINK_OUT, as_fragment, at, can_run, change_entries, check_table, conntrack_flags,
    edit_ipv4_header, flags_in, frame, gso_ctx, ingress_ctx, mapping, of_every_entry,
    remove_entries, segment, skb_ctx,
};
use crate::model::{Allowlist, Mapping, Protocol, Refuse};

/// Clients outside the allowlist of the mappings on 8090 and 5454, which
/// hold `CLIENT_V4`'s /24 and `CLIENT_V6`'s /48.
const OUTSIDER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 7, 7);
const OUTSIDER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 7, 0, 0, 0, 0, 7);

fn cases() -> Vec<Case> {
    let syn = frame(at(CLIENT_V4, 40001), at(HOST_V4, 8080), L4::Syn);
    let syn_out = frame(at(CLIENT_V4, 40001), at(CTR_V4, 80), L4::Syn);
    let udp = frame(at(CLIENT_V4, 40002), at(HOST_V4, 5353), L4::Udp);
    let udp_out = frame(at(CLIENT_V4, 40002), at(CTR_V4, 53), L4::Udp);
    let syn6 = frame(at(CLIENT_V6, 40003), at(HOST_V6, 8080), L4::Syn);
    let syn6_out = frame(at(CLIENT_V6, 40003), at(CTR_V6, 80), L4::Syn);
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let case = Case::new;
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
        // Passing an unpublished port counts nothing.
        Case {
            counted: 0,
            ..case(
                "a SYN to a port nobody published",
                frame(at(CLIENT_V4, 40004), at(HOST_V4, 8081), L4::Syn),
                NEXT,
                None,
                Stat::FlowNew,
            )
        },
        case(
            "a mid-flow ACK that conntrack does not know",
            frame(at(CLIENT_V4, 40005), at(HOST_V4, 8080), L4::Ack),
            NEXT,
            None,
            Stat::UntrackedMidflow,
        ),
        case(
            "a later fragment",
            // Offset 8 bytes: it carries no ports (a first fragment does,
            // and is translated).
            as_fragment(
                frame(at(CLIENT_V4, 40006), at(HOST_V4, 8080), L4::Syn),
                0,
                1,
                false,
            ),
            NEXT,
            None,
            Stat::PassFragment,
        ),
        case("not IP", arp, NEXT, None, Stat::PassNotIp),
        case(
            "a SYN from a client the allowlist holds",
            frame(at(CLIENT_V4, 40011), at(HOST_V4, 8090), L4::Syn),
            TO_STACK,
            Some(frame(at(CLIENT_V4, 40011), at(CTR_V4, 80), L4::Syn)),
            Stat::ToStack,
        ),
        case(
            "a SYN from a client outside the allowlist",
            frame(at(OUTSIDER_V4, 40012), at(HOST_V4, 8090), L4::Syn),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "UDP from a client outside the allowlist",
            frame(at(OUTSIDER_V4, 40013), at(HOST_V4, 5454), L4::Udp),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "an IPv6 SYN from a client the allowlist holds",
            frame(at(CLIENT_V6, 40014), at(HOST_V6, 8090), L4::Syn),
            TO_STACK,
            Some(frame(at(CLIENT_V6, 40014), at(CTR_V6, 80), L4::Syn)),
            Stat::ToStack,
        ),
        case(
            "an IPv6 SYN from a client outside the allowlist",
            frame(at(OUTSIDER_V6, 40015), at(HOST_V6, 8090), L4::Syn),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "a forged SYN to a loopback address",
            frame(at(CLIENT_V4, 40007), at(Ipv4Addr::LOCALHOST, 8080), L4::Syn),
            DROP,
            None,
            Stat::DroppedLoopback,
        ),
        case(
            "a forged IPv6 SYN from ::1",
            frame(at(Ipv6Addr::LOCALHOST, 40008), at(HOST_V6, 8080), L4::Syn),
            DROP,
            None,
            Stat::DroppedLoopback,
        ),
        case(
            "a SYN from the unspecified address 0.0.0.0",
            frame(at(Ipv4Addr::UNSPECIFIED, 40016), at(HOST_V4, 8080), L4::Syn),
            DROP,
            None,
            Stat::DroppedMartianSource,
        ),
        case(
            "UDP from a multicast address",
            frame(
                at(Ipv4Addr::new(224, 0, 0, 5), 40017),
                at(HOST_V4, 5353),
                L4::Udp,
            ),
            DROP,
            None,
            Stat::DroppedMartianSource,
        ),
        case(
            "UDP from the broadcast address",
            frame(at(Ipv4Addr::BROADCAST, 40018), at(HOST_V4, 5353), L4::Udp),
            DROP,
            None,
            Stat::DroppedMartianSource,
        ),
        case(
            "an IPv6 SYN from a multicast address (ff02::1)",
            frame(
                at(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 40019),
                at(HOST_V6, 8080),
                L4::Syn,
            ),
            DROP,
            None,
            Stat::DroppedMartianSource,
        ),
        case(
            "an IPv6 SYN from the unspecified address ::",
            frame(at(Ipv6Addr::UNSPECIFIED, 40020), at(HOST_V6, 8080), L4::Syn),
            DROP,
            None,
            Stat::DroppedMartianSource,
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
fn published() -> Vec<Mapping> {
    let allow = Allowlist {
        refuse: Refuse::Drop,
        ..Allowlist::parse(&["10.9.8.0/24", "fd00:9:8::/48"]).unwrap()
    };
    let mut mappings = vec![
        mapping(Protocol::Tcp, at(HOST_V4, 8080), at(CTR_V4, 80)),
        mapping(Protocol::Udp, at(HOST_V4, 5353), at(CTR_V4, 53)),
        mapping(Protocol::Tcp, at(HOST_V6, 8080), at(CTR_V6, 80)),
    ];
    for (protocol, host, container) in [
        (Protocol::Tcp, at(HOST_V4, 8090), at(CTR_V4, 80)),
        (Protocol::Udp, at(HOST_V4, 5454), at(CTR_V4, 53)),
        (Protocol::Tcp, at(HOST_V6, 8090), at(CTR_V6, 80)),
    ] {
        mappings.push(Mapping {
            allow: Some(allow.for_family(host.is_ipv4())),
            ..mapping(protocol, host, container)
        });
    }
    mappings
}

#[test]
fn uplink_ingress_cases() {
    check_table("uplink_ingress_cases", &published(), UPLINK_IN, cases());
}

/// A reply that `backend_in` translated and redirected to the uplink is
/// marked, and the uplink's egress program lets a marked packet go at once
/// (clearing the mark) instead of translating it again; unmarked, the same
/// frame is a routed reply and is translated. A packet that already had a
/// mark keeps it.
#[test]
fn translated_replies_skip_uplink_egress() {
    let Some(mut tc) = Tc::load("translated_replies_skip_uplink_egress") else {
        return;
    };
    let mapping = Mapping {
        // Any existing interface: a test run returns the verdict, it does
        // not redirect.
        ifindex: 1,
        ..mapping(Protocol::Tcp, at(HOST_V4, 8080), at(CTR_V4, 80))
    };
    tc.publish(std::slice::from_ref(&mapping));
    let client = at(CLIENT_V4, 40001);
    let syn = frame(client, mapping.host, L4::Syn);
    let (verdict, _, _) = tc.run_marked(UPLINK_IN, &syn, 0);
    assert_eq!(verdict, REDIRECT, "the SYN");

    let reply = frame(mapping.container, client, L4::Ack);
    let translated = frame(mapping.host, client, L4::Ack);
    let (verdict, out, mark) = tc.run_marked(BACKEND_IN, &reply, 0);
    assert_eq!((verdict, &out), (REDIRECT, &translated), "the reply");
    assert_eq!(mark, TRANSLATED_MARK, "the redirected reply's mark");
    let (_, _, mark) = tc.run_marked(BACKEND_IN, &reply, 0x4000);
    assert_eq!(mark, 0x4000, "a reply that had a mark keeps it");

    let (verdict, out, mark) = tc.run_marked(UPLINK_OUT, &reply, TRANSLATED_MARK);
    assert_eq!(
        (verdict, &out, mark),
        (NEXT, &reply, 0),
        "a marked packet at egress"
    );
    let (verdict, out, _) = tc.run_marked(UPLINK_OUT, &reply, 0);
    assert_eq!((verdict, &out), (TO_STACK, &translated), "a routed reply");
}

/// `frame` (IPv4) with four bytes of IPv4 options (three NOPs and the end
/// of the list) after its header: the transport header moves 4 bytes on.
fn with_ipv4_options(frame: &[u8]) -> Vec<u8> {
    let (mut header, rest) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    header.options = [1, 1, 1, 0][..].try_into().unwrap();
    header.total_len += 4;
    header.header_checksum = header.calc_header_checksum();
    [&frame[..14], &header.to_bytes()[..], rest].concat()
}

/// Both ports of a flow are rewritten whether or not the IPv4 header has
/// options: without them in place, at the transport header's usual offset;
/// with them through the store helper (`store_port` in the eBPF crate).
/// TCP and UDP, each direction, each way, frame in and frame out.
#[test]
fn ports_are_rewritten_after_ipv4_headers_with_and_without_options() {
    let Some(mut tc) = Tc::load("ports_are_rewritten_after_ipv4_headers_with_and_without_options")
    else {
        return;
    };
    let tcp = mapping(Protocol::Tcp, at(HOST_V4, 8080), at(CTR_V4, 80));
    let udp = mapping(Protocol::Udp, at(HOST_V4, 5353), at(CTR_V4, 53));
    tc.publish(&[tcp.clone(), udp.clone()]);
    let mut failures = Failures::default();
    let flows = [
        (&tcp, L4::Syn, L4::Ack, false, 40101),
        (&tcp, L4::Syn, L4::Ack, true, 40102),
        (&udp, L4::Udp, L4::Udp, false, 40103),
        (&udp, L4::Udp, L4::Udp, true, 40104),
    ];
    for (mapping, opening, answer, options, port) in flows {
        let client = at(CLIENT_V4, port);
        let framed = |frame: Vec<u8>| {
            if options {
                with_ipv4_options(&frame)
            } else {
                frame
            }
        };
        // The mappings have no interface: the first packet goes to the
        // stack. The answer goes back to the interface it came in on.
        let steps = [
            (
                UPLINK_IN,
                frame(client, mapping.host, opening),
                TO_STACK,
                frame(client, mapping.container, opening),
            ),
            (
                BACKEND_IN,
                frame(mapping.container, client, answer),
                REDIRECT,
                frame(mapping.host, client, answer),
            ),
        ];
        for (program, input, expected, output) in steps {
            let (verdict, out, _) = tc.run_marked(program, &framed(input), 0);
            failures.check(
                &format!("{program}, {:?}, options {options}", mapping.protocol),
                (verdict, out),
                expected,
                &framed(output),
            );
        }
    }
    failures.assert_none();
}

/// Namespaces of the tests of redirects into a peer, removed when dropped:
/// the test runs in the first (`host`), whose veth leads into the second.
/// Named after the test, so that tests run at once do not share them.
struct PeerCaseNamespaces {
    host: String,
    container: String,
}

impl PeerCaseNamespaces {
    const VETH: &'static str = "pfcase0";
    const VETH_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
    /// The neighbour entry of `CTR_V4` (none for `OTHER_CTR_V4`).
    const CTR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];

    fn new(tag: &str) -> Self {
        use portfwd_testkit::netns;
        let (host, container) = (format!("pf-case-{tag}-h"), format!("pf-case-{tag}-c"));
        let mac = Self::mac_text;
        netns::add(&host).unwrap();
        netns::add(&container).unwrap();
        // Removed when dropped, however the rest goes.
        let namespaces = PeerCaseNamespaces { host, container };
        let (host, container) = (namespaces.host.as_str(), namespaces.container.as_str());
        netns::veth(Self::VETH, Some(host), "eth0", container).unwrap();
        let (veth, veth_mac, ctr_mac) = (Self::VETH, mac(Self::VETH_MAC), mac(Self::CTR_MAC));
        let (ctr, other) = (CTR_V4.to_string(), OTHER_CTR_V4.to_string());
        for args in [
            vec!["link", "set", veth, "address", &veth_mac, "up"],
            vec!["route", "add", &ctr, "dev", veth],
            vec!["route", "add", &other, "dev", veth],
            vec!["neigh", "add", &ctr, "lladdr", &ctr_mac, "dev", veth],
        ] {
            netns::ip_in(host, &args).unwrap();
        }
        // `bpf_fib_lookup` answers only for an interface that forwards.
        netns::sysctl(host, "net.ipv4.ip_forward", "1").unwrap();
        namespaces
    }

    /// `mac` as `ip` spells it.
    fn mac_text(mac: [u8; 6]) -> String {
        mac.map(|b| format!("{b:02x}")).join(":")
    }

    /// `frame` addressed as the veth would carry it to the neighbour whose
    /// link-layer address is `ctr_mac`.
    fn addressed(mut frame: Vec<u8>, ctr_mac: [u8; 6]) -> Vec<u8> {
        frame[..6].copy_from_slice(&ctr_mac);
        frame[6..12].copy_from_slice(&Self::VETH_MAC);
        frame
    }
}

impl Drop for PeerCaseNamespaces {
    fn drop(&mut self) {
        portfwd_testkit::netns::delete(&self.host);
        portfwd_testkit::netns::delete(&self.container);
    }
}

/// A packet redirected to an interface that `pf_peer_link_bits` lists (a veth
/// into a container's namespace) goes into its peer: addressed as the veth
/// would carry it (to the neighbour the kernel knows for its destination,
/// from the veth's own address) and without the host's mark. With no
/// neighbour known, or to an unlisted interface, it goes through the
/// neighbour subsystem untouched. A test run returns the verdict and does
/// not redirect: the stats tell the two ways apart.
#[test]
fn packets_to_a_listed_veth_go_into_its_peer() {
    if !can_run("packets_to_a_listed_veth_go_into_its_peer") {
        return;
    }
    type Ns = PeerCaseNamespaces;
    let namespaces = Ns::new("peer");
    let path = portfwd_testkit::netns::path(&namespaces.host);
    portfwd_testkit::netns::inside(&path, || {
        let ifindex = nix::net::if_::if_nametoindex(Ns::VETH).unwrap();
        let mut tc = Tc::load_as_root();
        let known = Mapping {
            ifindex,
            ..mapping(Protocol::Tcp, at(HOST_V4, 8080), at(CTR_V4, 80))
        };
        let unknown = Mapping {
            ifindex,
            ..mapping(Protocol::Tcp, at(HOST_V4, 8081), at(OTHER_CTR_V4, 80))
        };
        tc.publish(&[known.clone(), unknown.clone()]);
        let list = |tc: &mut Tc, listed: bool| tc.list_link(&PEER_LINKS, ifindex, listed);
        list(&mut tc, true);
        let client = at(CLIENT_V4, 40001);
        let counted = |tc: &Tc| (tc.stat(Stat::RedirectedToPeer), tc.stat(Stat::Redirected));
        let readdressed = |frame: Vec<u8>| Ns::addressed(frame, Ns::CTR_MAC);

        let syn = frame(client, known.host, L4::Syn);
        let got = tc.run_marked(UPLINK_IN, &syn, 0x4000);
        let into_peer = readdressed(frame(client, known.container, L4::Syn));
        assert_eq!(got, (REDIRECT, into_peer, 0), "a SYN, marked 0x4000");
        assert_eq!(counted(&tc), (1, 1), "the SYN went into the peer");
        let ack = frame(client, known.host, L4::Ack);
        let into_peer = readdressed(frame(client, known.container, L4::Ack));
        let got = tc.run_marked(UPLINK_IN, &ack, 0);
        assert_eq!(got, (REDIRECT, into_peer, 0), "a packet of the flow");
        assert_eq!(counted(&tc), (2, 2), "it went into the peer");

        // No neighbour known for the destination: the neighbour subsystem
        // resolves it.
        let syn = frame(client, unknown.host, L4::Syn);
        let through_neighbours = frame(client, unknown.container, L4::Syn);
        let got = tc.run_marked(UPLINK_IN, &syn, 0x4000);
        assert_eq!(got, (REDIRECT, through_neighbours, 0x4000), "no neighbour");
        assert_eq!(
            counted(&tc),
            (2, 3),
            "without a neighbour, not into the peer"
        );

        // Unlisted (a shaper was added to it): the neighbour subsystem.
        list(&mut tc, false);
        let through_neighbours = frame(client, known.container, L4::Ack);
        let got = tc.run_marked(UPLINK_IN, &ack, 0x4000);
        assert_eq!(got, (REDIRECT, through_neighbours, 0x4000), "unlisted");
        assert_eq!(counted(&tc), (2, 4), "unlisted, not into the peer");
    });
}

/// The link-layer addresses of a frame into a peer come from the FIB, and
/// each CPU keeps them for a second (`pf_next_hops`): a neighbour entry
/// changed meanwhile (a container's interface given another address, which
/// keeps its index) reaches the frames after that second, not at once. A
/// neighbour not known yet is asked for again at the next packet. The test
/// runs on one CPU, whose cache it sees.
#[test]
fn a_changed_neighbour_reaches_frames_into_a_peer_within_a_second() {
    if !can_run("a_changed_neighbour_reaches_frames_into_a_peer_within_a_second") {
        return;
    }
    type Ns = PeerCaseNamespaces;
    const NEW_CTR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0c];
    let namespaces = Ns::new("nexthop");
    let path = portfwd_testkit::netns::path(&namespaces.host);
    let host = namespaces.host.clone();
    portfwd_testkit::netns::inside(&path, move || {
        let _pinned = PinnedToOneCpu::new();
        let ifindex = nix::net::if_::if_nametoindex(Ns::VETH).unwrap();
        let mut tc = Tc::load_as_root();
        let known = Mapping {
            ifindex,
            ..mapping(Protocol::Tcp, at(HOST_V4, 8080), at(CTR_V4, 80))
        };
        tc.publish(std::slice::from_ref(&known));
        tc.list_link(&PEER_LINKS, ifindex, true);
        let client = at(CLIENT_V4, 40001);
        let addressed =
            |l4: L4, ctr_mac| Ns::addressed(frame(client, known.container, l4), ctr_mac);
        let syn = frame(client, known.host, L4::Syn);
        let got = tc.run_marked(UPLINK_IN, &syn, 0);
        assert_eq!(
            got,
            (REDIRECT, addressed(L4::Syn, Ns::CTR_MAC), 0),
            "the SYN"
        );

        let new_mac = Ns::mac_text(NEW_CTR_MAC);
        let ctr = CTR_V4.to_string();
        let replace = [
            "neigh",
            "replace",
            &ctr,
            "lladdr",
            &new_mac,
            "dev",
            Ns::VETH,
        ];
        portfwd_testkit::netns::ip_in(&host, &replace).unwrap();
        let ack = frame(client, known.host, L4::Ack);
        let got = tc.run_marked(UPLINK_IN, &ack, 0);
        let cached = (REDIRECT, addressed(L4::Ack, Ns::CTR_MAC), 0);
        assert_eq!(got, cached, "at once: the address the FIB gave for the SYN");
        assert_eq!(tc.stat(Stat::RedirectedToPeer), 2, "both into the peer");

        std::thread::sleep(std::time::Duration::from_millis(1100));
        let got = tc.run_marked(UPLINK_IN, &ack, 0);
        let fresh = (REDIRECT, addressed(L4::Ack, NEW_CTR_MAC), 0);
        assert_eq!(got, fresh, "after a second: the new neighbour entry's");

        // A neighbour the kernel does not know yet is not remembered as
        // unknown: once it is known, the next packet goes into the peer.
        let other = Mapping {
            ifindex,
            ..mapping(Protocol::Tcp, at(HOST_V4, 8081), at(OTHER_CTR_V4, 80))
        };
        tc.publish(std::slice::from_ref(&other));
        let syn = frame(client, other.host, L4::Syn);
        let untouched = frame(client, other.container, L4::Syn);
        let got = tc.run_marked(UPLINK_IN, &syn, 0);
        assert_eq!(got, (REDIRECT, untouched, 0), "no neighbour yet");
        let (other_ctr, mac) = (OTHER_CTR_V4.to_string(), new_mac.clone());
        let learned = ["neigh", "add", &other_ctr, "lladdr", &mac, "dev", Ns::VETH];
        portfwd_testkit::netns::ip_in(&host, &learned).unwrap();
        let ack = frame(client, other.host, L4::Ack);
        let into_peer = Ns::addressed(frame(client, other.container, L4::Ack), NEW_CTR_MAC);
        let got = tc.run_marked(UPLINK_IN, &ack, 0);
        assert_eq!(got, (REDIRECT, into_peer, 0), "the neighbour known since");
    });
}

/// A new flow whose source the host routes through another interface than
/// the one it came in on is dropped (`tc::service::forged_source`): from a
/// container link, any such source (a co-tenant in another client's name);
/// from an uplink, a source routed to a container (through an interface
/// that `pf_container_link_bits` lists). The namespace's FIB: the
/// containers through the veth, the client through the loopback device,
/// which stands for an uplink here; routing rules take no part.
#[test]
fn new_flows_from_sources_routed_elsewhere_are_dropped() {
    if !can_run("new_flows_from_sources_routed_elsewhere_are_dropped") {
        return;
    }
    type Ns = PeerCaseNamespaces;
    let namespaces = Ns::new("rpf");
    let client = CLIENT_V4.to_string();
    for args in [
        vec!["route", "add", &client, "dev", "lo"],
        // A rule that sends everything elsewhere: the check asks the
        // interface's own table.
        vec!["rule", "add", "pref", "100", "iif", Ns::VETH, "prohibit"],
    ] {
        portfwd_testkit::netns::ip_in(&namespaces.host, &args).unwrap();
    }
    let path = portfwd_testkit::netns::path(&namespaces.host);
    portfwd_testkit::netns::inside(&path, || {
        let veth = nix::net::if_::if_nametoindex(Ns::VETH).unwrap();
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let mut tc = Tc::load_as_root();
        let published = Mapping {
            ifindex: veth,
            ..mapping(Protocol::Tcp, at(HOST_V4, 8080), at(OTHER_CTR_V4, 80))
        };
        tc.publish(std::slice::from_ref(&published));
        let list = |tc: &mut Tc, listed: bool| tc.list_link(&CONTAINER_LINKS, veth, listed);
        list(&mut tc, true);
        let counted = |tc: &Tc| {
            (
                tc.stat(Stat::DroppedSpoofedSource),
                tc.stat(Stat::DroppedContainerSource),
            )
        };
        let run = |tc: &Tc, program, src, ingress| {
            let syn = frame(src, published.host, L4::Syn);
            tc.run_with(program, &syn, &ingress_ctx(ingress)).0
        };

        // From the container link: the container's own address, and the
        // client's, which the host routes elsewhere.
        let verdict = run(&tc, BACKEND_IN, at(CTR_V4, 40000), veth);
        assert_ne!(verdict, DROP, "a container's own address");
        assert_eq!(counted(&tc), (0, 0), "a container's own address");
        let verdict = run(&tc, BACKEND_IN, at(CLIENT_V4, 40001), veth);
        assert_eq!(verdict, DROP, "a container in the client's name");
        assert_eq!(counted(&tc), (1, 0), "a container in the client's name");

        // From the uplink: the client, and a container's address.
        let verdict = run(&tc, UPLINK_IN, at(CLIENT_V4, 40002), lo);
        assert_eq!(verdict, REDIRECT, "the client, from the uplink");
        assert_eq!(counted(&tc), (1, 0), "the client, from the uplink");
        let verdict = run(&tc, UPLINK_IN, at(CTR_V4, 40003), lo);
        assert_eq!(verdict, DROP, "a container's address, from the uplink");
        assert_eq!(
            counted(&tc),
            (1, 1),
            "a container's address, from the uplink"
        );
        // Routed through an interface that is not towards containers (here
        // the same veth, unlisted): another uplink, which passes.
        list(&mut tc, false);
        let verdict = run(&tc, UPLINK_IN, at(CTR_V4, 40004), lo);
        assert_eq!(verdict, REDIRECT, "routed through another uplink");
        assert_eq!(counted(&tc), (1, 1), "routed through another uplink");
    });
}

/// Keeps the calling thread on one CPU (the first it may run on) until
/// dropped, then on the CPUs it had: per-CPU state stays in view.
struct PinnedToOneCpu(nix::sched::CpuSet);

impl PinnedToOneCpu {
    fn new() -> Self {
        use nix::{sched, unistd::Pid};
        let before = sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
        let cpu = (0..sched::CpuSet::count())
            .find(|&cpu| before.is_set(cpu).unwrap_or(false))
            .expect("a thread runs on some CPU");
        let mut one = sched::CpuSet::new();
        one.set(cpu).unwrap();
        sched::sched_setaffinity(Pid::from_raw(0), &one).unwrap();
        PinnedToOneCpu(before)
    }
}

impl Drop for PinnedToOneCpu {
    fn drop(&mut self) {
        // Failing, the thread stays on one CPU: the test is over anyway.
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0).ok();
    }
}

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
    let Some(tc) = Tc::load_with(
        "big_tcp_packets_of_tracked_flows_are_translated",
        &published(),
    ) else {
        return;
    };
    let gso = gso_ctx(45, 1448);
    let run = |input: &[u8], ctx: &[u8; SKB_CTX_LEN]| {
        let (verdict, out, _) = tc.run_with(UPLINK_IN, input, ctx);
        (verdict, out)
    };
    let mut failures = Failures::default();
    for (client, published, container) in [
        (at(CLIENT_V4, 40021), at(HOST_V4, 8080), at(CTR_V4, 80)),
        (at(CLIENT_V6, 40022), at(HOST_V6, 8080), at(CTR_V6, 80)),
    ] {
        let (verdict, _) = run(&frame(client, published, L4::Syn), &skb_ctx(0));
        assert_eq!(verdict, TO_STACK, "the SYN to {published}");
        let data = big_tcp(frame(client, published, L4::Ack));
        let expected = big_tcp(frame(client, container, L4::Ack));
        failures.check(
            &published.to_string(),
            run(&data, &gso),
            TO_STACK,
            &expected,
        );
        let before = tc.stat(Stat::PassTruncated);
        let (verdict, out) = run(&data, &skb_ctx(0));
        if (verdict, &out) != (NEXT, &data) || tc.stat(Stat::PassTruncated) != before + 1 {
            failures.note(format!(
                "{published}: IP length 0 without GSO was not passed"
            ));
        }
    }
    failures.assert_none();
}

/// A fragment of the datagram `id` from `CLIENT_V4:40030` to `to` (see
/// `as_fragment`).
fn fragment_of(id: u16, to: SocketAddr, offset: u16, more: bool) -> Vec<u8> {
    as_fragment(frame(at(CLIENT_V4, 40030), to, L4::Udp), id, offset, more)
}

/// How many datagrams the fragments map remembers.
fn remembered_datagrams(tc: &Tc) -> usize {
    let map = tc.ebpf().map(FRAGMENTS.name).expect("the fragments map");
    let map: HashMap<&MapData, FragmentKey, FragmentValue> = HashMap::try_from(map).unwrap();
    map.keys().count()
}

/// The later fragments of a datagram follow its first until its last (the
/// one without "more fragments"), which forgets the datagram: the map keeps
/// nothing of a datagram that came whole, and a fragment of it that comes
/// after the last (reordered on the way) is passed untouched, as one that
/// comes before the first.
#[test]
fn a_datagram_is_forgotten_at_its_last_fragment() {
    let Some(tc) = Tc::load_with("a_datagram_is_forgotten_at_its_last_fragment", &published())
    else {
        return;
    };
    let published = at(HOST_V4, 5353);
    // A later fragment comes out with the container's address, its bytes
    // (no ports) as they were.
    let translated = |mut frame: Vec<u8>| {
        edit_ipv4_header(&mut frame, |header| header.destination = CTR_V4.octets());
        frame
    };
    let mut failures = Failures::default();
    let first = fragment_of(0x5151, published, 0, true);
    failures.check(
        "the first fragment",
        tc.run(UPLINK_IN, &first),
        TO_STACK,
        &fragment_of(0x5151, at(CTR_V4, 53), 0, true),
    );
    let middle = fragment_of(0x5151, published, 1, true);
    let last = fragment_of(0x5151, published, 2, false);
    for (what, fragment, remembered) in [
        ("a middle fragment", &middle, 1),
        ("the last fragment", &last, 0),
    ] {
        failures.check(
            what,
            tc.run(UPLINK_IN, fragment),
            TO_STACK,
            &translated(fragment.clone()),
        );
        let datagrams = remembered_datagrams(&tc);
        if datagrams != remembered {
            failures.note(format!(
                "after {what}: {datagrams} datagrams remembered, not {remembered}"
            ));
        }
    }
    let before = tc.stat(Stat::PassFragment);
    failures.check(
        "a middle fragment after the last",
        tc.run(UPLINK_IN, &middle),
        NEXT,
        &middle,
    );
    if tc.stat(Stat::PassFragment) != before + 1 {
        failures.note("the fragment after the last was not counted as passed".into());
    }
    failures.assert_none();
}

/// Two datagrams whose fragments look alike (one client address, one host
/// address, one IP identification: two clients behind one CGNAT address, or
/// a forger) but whose first fragments go to different containers: their
/// later fragments cannot tell which is whose, and go to neither (passed,
/// as the host's reassembly would lose both). Before, the second first
/// fragment took the entry over and the first datagram's later fragments
/// were delivered into the second's container.
#[test]
fn fragments_of_two_datagrams_that_look_alike_go_to_neither() {
    let other = at(HOST_V4, 5355);
    let mappings = [
        mapping(Protocol::Udp, at(HOST_V4, 5353), at(CTR_V4, 53)),
        mapping(Protocol::Udp, other, at(OTHER_CTR_V4, 53)),
    ];
    let test = "fragments_of_two_datagrams_that_look_alike_go_to_neither";
    let Some(tc) = Tc::load_with(test, &mappings) else {
        return;
    };
    let mut failures = Failures::default();
    let first = fragment_of(0x5252, at(HOST_V4, 5353), 0, true);
    let (verdict, _) = tc.run(UPLINK_IN, &first);
    assert_eq!(verdict, TO_STACK, "the first datagram's first fragment");
    let alike = as_fragment(frame(at(CLIENT_V4, 40031), other, L4::Udp), 0x5252, 0, true);
    let (verdict, _) = tc.run(UPLINK_IN, &alike);
    assert_eq!(verdict, TO_STACK, "the second datagram's first fragment");
    let later = fragment_of(0x5252, at(HOST_V4, 5353), 1, true);
    failures.check(
        "a later fragment of either",
        tc.run(UPLINK_IN, &later),
        NEXT,
        &later,
    );
    // Either first fragment again (a duplicate on the way, or a forger's):
    // the later fragments still go to neither.
    for (again, what) in [(&first, "the first"), (&alike, "the second")] {
        let (verdict, _) = tc.run(UPLINK_IN, again);
        assert_eq!(verdict, TO_STACK, "{what} datagram's first fragment again");
        failures.check(
            &format!("a later fragment after {what} first fragment again"),
            tc.run(UPLINK_IN, &later),
            NEXT,
            &later,
        );
    }
    failures.assert_none();
}

/// A tracked flow does not look its mapping up on every packet: only when
/// the services generation moved, which userspace does right after it
/// removes mappings. Then a flow whose mapping is gone or points elsewhere
/// stops (passed untouched, counted); before, it goes on.
#[test]
fn a_flow_rechecks_its_mapping_when_the_services_generation_moves() {
    let Some(mut tc) = Tc::load_with(
        "a_flow_rechecks_its_mapping_when_the_services_generation_moves",
        &published(),
    ) else {
        return;
    };
    let client = at(CLIENT_V4, 40031);
    let published = at(HOST_V4, 8080);
    let data = frame(client, published, L4::Ack);
    let translated = frame(client, at(CTR_V4, 80), L4::Ack);
    assert_eq!(
        tc.run(UPLINK_IN, &frame(client, published, L4::Syn)).0,
        TO_STACK
    );
    assert_eq!(tc.run(UPLINK_IN, &data), (TO_STACK, translated.clone()));

    // The mapping now points at another container, the generation unchanged.
    tc.publish(&[mapping(Protocol::Tcp, published, at(OTHER_CTR_V4, 80))]);
    assert_eq!(
        tc.run(UPLINK_IN, &data),
        (TO_STACK, translated),
        "the flow goes on while the generation is the same"
    );

    tc.move_services_generation(1);
    let stopped = tc.stat(Stat::FlowStopped);
    assert_eq!(
        tc.run(UPLINK_IN, &data),
        (NEXT, data.clone()),
        "the generation moved: the flow's mapping changed, it stops"
    );
    assert_eq!(tc.stat(Stat::FlowStopped), stopped + 1);
}

/// A TCP frame from `src` to `dst` with the ACK flag and FIN or RST.
fn closing_frame(src: SocketAddr, dst: SocketAddr, rst: bool) -> Vec<u8> {
    assert!(matches!(src.ip(), IpAddr::V4(_)), "IPv4 only");
    let close = if rst { TCP_RST } else { TCP_FIN };
    segment((src, dst), close | TCP_ACK, (SEQ, 1), &[])
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
    if !can_run("a_syn_that_reopens_a_closing_flow_forgets_its_old_reply_entry") {
        return;
    }
    for_each_way_of_closing([40041, 40042], |mut tc, how, rst, client| {
        let published = at(HOST_V4, 8080);
        let (old, new) = (at(CTR_V4, 80), at(OTHER_CTR_V4, 80));
        let data = frame(client, published, L4::Ack);
        close_a_flow(&tc, how, (client, published, old), rst);
        assert_eq!(
            tc.run_marked(UPLINK_IN, &data, 0),
            (TO_STACK, frame(client, old, L4::Ack), 0),
            "{how}: a late packet of the closing flow"
        );
        assert_eq!(conntrack_flags(&tc).len(), 2, "{how}");

        // The mapping moves to another container; the client dials again
        // from the same port.
        tc.publish(&[mapping(Protocol::Tcp, published, new)]);
        tc.move_services_generation(1);
        let syn = frame(client, published, L4::Syn);
        assert_eq!(
            tc.run_marked(UPLINK_IN, &syn, 0).1,
            frame(client, new, L4::Syn),
            "{how}: the SYN reopens the flow to the new container"
        );
        assert_eq!(
            conntrack_flags(&tc).len(),
            2,
            "{how}: the new flow's two entries, and nothing of the old flow"
        );

        // A late packet of the old container's connection: not translated,
        // and the new flow goes on.
        let late = frame(old, client, L4::Ack);
        let (verdict, out, _) = tc.run_marked(BACKEND_IN, &late, 0);
        assert_eq!(
            (verdict, out),
            (NEXT, late),
            "{how}: the old container's late packet"
        );
        assert_eq!(
            tc.run_marked(UPLINK_IN, &data, 0),
            (TO_STACK, frame(client, new, L4::Ack), 0),
            "{how}: the new flow's data"
        );
    });
}

/// Each entry of a TCP flow is closed by its own side's packets; only a
/// RST, or a packet of a side that closed already, looks at the other
/// entry. The container's answer marks the reply entry answered, and the
/// client's ACK of it establishes both entries (session 16 had each side
/// establish its own entry, the answer the reply entry; before, the answer
/// set both, through a lookup of the forward entry). Both sides' FINs close
/// the flow at the next packet of the side that closed first, its ACK of
/// the other's FIN (before, the second FIN closed it, and each FIN looked
/// the other entry up). Both orders of closing, and data after a
/// half-close.
#[test]
fn each_entry_of_a_tcp_flow_follows_its_own_side() {
    if !can_run("each_entry_of_a_tcp_flow_follows_its_own_side") {
        return;
    }
    const R: u8 = CT_FLAG_REPLY;
    const E: u8 = CT_FLAG_ESTABLISHED;
    const F: u8 = CT_FLAG_FIN;
    const C: u8 = CT_FLAG_CLOSING;
    const A: u8 = CT_FLAG_ANSWERED;
    let (dialed, container) = (at(HOST_V4, 8080), at(CTR_V4, 80));
    for (client_closes_first, port) in [(true, 40048), (false, 40049)] {
        let mut tc = Tc::load_as_root();
        tc.publish(&published());
        let client = at(CLIENT_V4, port);
        let to_container = |l4| (frame(client, dialed, l4), frame(client, container, l4));
        let to_client = |l4| (frame(container, client, l4), frame(dialed, client, l4));
        let client_fin = (
            closing_frame(client, dialed, false),
            closing_frame(client, container, false),
        );
        let container_fin = (
            closing_frame(container, client, false),
            closing_frame(dialed, client, false),
        );
        check_step(&tc, UPLINK_IN, to_container(L4::Syn), [0, R], "the SYN");
        check_step(
            &tc,
            BACKEND_IN,
            to_client(L4::Ack),
            [0, R | A],
            "the answer",
        );
        check_step(
            &tc,
            UPLINK_IN,
            to_container(L4::Ack),
            [E, R | A | E],
            "the client's ACK",
        );
        let closed = [E | F | C, R | A | E | F | C];
        if client_closes_first {
            check_step(
                &tc,
                UPLINK_IN,
                client_fin,
                [E | F, R | A | E],
                "the client's FIN",
            );
            check_step(
                &tc,
                BACKEND_IN,
                to_client(L4::Ack),
                [E | F, R | A | E],
                "data after it",
            );
            let fin = [E | F, R | A | E | F];
            check_step(&tc, BACKEND_IN, container_fin, fin, "the container's FIN");
            check_step(
                &tc,
                UPLINK_IN,
                to_container(L4::Ack),
                closed,
                "the client's ACK",
            );
        } else {
            check_step(
                &tc,
                BACKEND_IN,
                container_fin,
                [E, R | A | E | F],
                "the container's FIN",
            );
            check_step(
                &tc,
                UPLINK_IN,
                to_container(L4::Ack),
                [E, R | A | E | F],
                "its ACK",
            );
            check_step(
                &tc,
                UPLINK_IN,
                client_fin,
                [E | F, R | A | E | F],
                "the client's FIN",
            );
            check_step(
                &tc,
                BACKEND_IN,
                to_client(L4::Ack),
                closed,
                "the container's ACK",
            );
        }
    }
}

/// A SYN flood from spoofed sources cannot fill the table with long-lived
/// entries (issue 11, case 1): a flow is established only when its client
/// answers the container's answer. A SYN that only the container answers
/// (the SYN-ACK goes to a spoofed address, which never replies) leaves
/// both entries on the SYN timeout; so does a client's ACK that no answer
/// came before (sent blind). Before, the container's answer established
/// the reply entry (the established timeout), and a blind ACK the forward
/// entry.
#[test]
fn a_flow_is_established_only_by_its_clients_answer_to_the_containers() {
    let Some(tc) = Tc::load_with(
        "a_flow_is_established_only_by_its_clients_answer_to_the_containers",
        &published(),
    ) else {
        return;
    };
    let (dialed, container) = (at(HOST_V4, 8080), at(CTR_V4, 80));
    let established = |tc: &Tc| {
        conntrack_flags(tc)
            .iter()
            .filter(|flags| *flags & CT_FLAG_ESTABLISHED != 0)
            .count()
    };
    // Answered, never confirmed.
    let spoofed = at(CLIENT_V4, 40050);
    tc.run_marked(UPLINK_IN, &frame(spoofed, dialed, L4::Syn), 0);
    let answer = frame(container, spoofed, L4::Ack);
    assert_eq!(
        tc.run_marked(BACKEND_IN, &answer, 0).1,
        frame(dialed, spoofed, L4::Ack),
        "the container's answer is translated"
    );
    assert_eq!(
        established(&tc),
        0,
        "answered only: {:?}",
        conntrack_flags(&tc)
    );
    // A blind ACK: no answer came before it (another flow beside the first).
    let blind = at(CLIENT_V4, 40051);
    tc.run_marked(UPLINK_IN, &frame(blind, dialed, L4::Syn), 0);
    tc.run_marked(UPLINK_IN, &frame(blind, dialed, L4::Ack), 0);
    assert_eq!(
        established(&tc),
        0,
        "a blind ACK: {:?}",
        conntrack_flags(&tc)
    );
    // Answered, then confirmed: both entries established.
    tc.run_marked(BACKEND_IN, &frame(container, blind, L4::Ack), 0);
    tc.run_marked(UPLINK_IN, &frame(blind, dialed, L4::Ack), 0);
    assert_eq!(established(&tc), 2, "confirmed: {:?}", conntrack_flags(&tc));
}

/// A TCP flow waits for its handshake in the opening table, both entries,
/// and moves to the main one at the client's ACK that establishes it,
/// which is translated as before; its later packets are translated from
/// there. So a SYN flood, whose flows never establish, churns the opening
/// table alone (end to end:
/// `hostile::a_syn_flood_evicts_no_established_flow`).
#[test]
fn a_tcp_flow_moves_to_the_main_table_when_established() {
    let Some(tc) = Tc::load_with(
        "a_tcp_flow_moves_to_the_main_table_when_established",
        &published(),
    ) else {
        return;
    };
    let (dialed, container, client) = (at(HOST_V4, 8080), at(CTR_V4, 80), at(CLIENT_V4, 40054));
    tc.run_marked(UPLINK_IN, &frame(client, dialed, L4::Syn), 0);
    assert_eq!(tables(&tc), (0, 2), "after the SYN");
    assert_eq!(
        tc.run_marked(BACKEND_IN, &frame(container, client, L4::Ack), 0)
            .1,
        frame(dialed, client, L4::Ack),
        "the container's answer is translated"
    );
    assert_eq!(tables(&tc), (0, 2), "answered");
    assert_eq!(
        tc.run_marked(UPLINK_IN, &frame(client, dialed, L4::Ack), 0)
            .1,
        frame(client, container, L4::Ack),
        "the establishing ACK is translated"
    );
    assert_eq!(tables(&tc), (2, 0), "established");
    assert!(
        flags_in(&tc, CONNTRACK.name)
            .iter()
            .all(|flags| flags & CT_FLAG_ESTABLISHED != 0),
        "{:?}",
        flags_in(&tc, CONNTRACK.name)
    );
    assert_eq!(
        tc.run_marked(BACKEND_IN, &frame(container, client, L4::Ack), 0)
            .1,
        frame(dialed, client, L4::Ack),
        "a later answer is translated from the main table"
    );
    assert_eq!(
        tc.run_marked(UPLINK_IN, &frame(client, dialed, L4::Ack), 0)
            .1,
        frame(client, container, L4::Ack),
        "a later packet of the client's too"
    );
}

/// A UDP flow starts in the opening table too, and moves to the main one
/// at the client's first datagram after the container answered: the
/// client received the answer, as a spoofed source does not. Before, UDP
/// flows started in the main table, where a flood of datagrams from
/// spoofed sources evicted the idle ones (end to end:
/// `hostile::a_udp_flood_evicts_no_answered_flow`).
#[test]
fn a_udp_flow_moves_to_the_main_table_when_the_client_goes_on_after_an_answer() {
    let Some(tc) = Tc::load_with(
        "a_udp_flow_moves_to_the_main_table_when_the_client_goes_on_after_an_answer",
        &published(),
    ) else {
        return;
    };
    let (dialed, container, client) = (at(HOST_V4, 5353), at(CTR_V4, 53), at(CLIENT_V4, 40055));
    let (request, answer) = (
        frame(client, dialed, L4::Udp),
        frame(container, client, L4::Udp),
    );
    let (translated_request, translated_answer) = (
        frame(client, container, L4::Udp),
        frame(dialed, client, L4::Udp),
    );
    assert_eq!(tc.run_marked(UPLINK_IN, &request, 0).1, translated_request);
    assert_eq!(tables(&tc), (0, 2), "a new flow");
    assert_eq!(
        tc.run_marked(UPLINK_IN, &request, 0).1,
        translated_request,
        "a second datagram before any answer"
    );
    assert_eq!(tables(&tc), (0, 2), "not answered");
    assert_eq!(
        tc.run_marked(BACKEND_IN, &answer, 0).1,
        translated_answer,
        "the container's answer"
    );
    assert_eq!(tables(&tc), (0, 2), "answered");
    assert_eq!(
        tc.run_marked(UPLINK_IN, &request, 0).1,
        translated_request,
        "the client's datagram after the answer"
    );
    assert_eq!(tables(&tc), (2, 0), "moved");
    assert_eq!(
        tc.run_marked(BACKEND_IN, &answer, 0).1,
        translated_answer,
        "a later answer, from the main table"
    );
}

/// Opens a flow from `client` through the first TCP mapping and
/// establishes it (SYN, the container's answer, the client's ACK), which
/// moves it to the main table; the tables' entry counts after, (main,
/// opening).
fn establish_flow(tc: &Tc, client: SocketAddr) -> (usize, usize) {
    let (dialed, container) = (at(HOST_V4, 8080), at(CTR_V4, 80));
    tc.run_marked(UPLINK_IN, &frame(client, dialed, L4::Syn), 0);
    tc.run_marked(BACKEND_IN, &frame(container, client, L4::Ack), 0);
    assert_eq!(
        tc.run_marked(UPLINK_IN, &frame(client, dialed, L4::Ack), 0)
            .1,
        frame(client, container, L4::Ack),
        "the establishing ACK is translated"
    );
    tables(tc)
}

/// How many entries the main table holds, and the opening table.
fn tables(tc: &Tc) -> (usize, usize) {
    (
        flags_in(tc, CONNTRACK.name).len(),
        flags_in(tc, CONNTRACK_OPENING.name).len(),
    )
}

/// A client that reuses its port after its flow ended, before the sweep
/// removed the ended flow's entries from the main table: the new flow
/// starts in the opening table under the same keys, and its SYN sent again
/// asks for its twin. Before, the main table's ended reply entry, which
/// pairs with it, was taken for the twin and came back to life in the new
/// reply entry's place: the container's answer went to it, the new flow
/// was never established, and it ran on the ended flow's entries and
/// marks.
#[test]
fn a_port_reused_before_the_sweep_opens_a_flow_of_its_own() {
    let Some(mut tc) = Tc::load_with(
        "a_port_reused_before_the_sweep_opens_a_flow_of_its_own",
        &published(),
    ) else {
        return;
    };
    let client = at(CLIENT_V4, 40056);
    assert_eq!(establish_flow(&tc, client), (2, 0), "the first flow");
    // Ended: marked by a reset 20 s ago (it ends after 10 s), not swept.
    change_entries(&mut tc, |value| {
        value.more_flags |= CT_MORE_RESET;
        value.last_seen_ns -= 20_000_000_000;
    });
    // The new flow's SYN, twice (the second asks for its twin).
    tc.run_marked(UPLINK_IN, &frame(client, at(HOST_V4, 8080), L4::Syn), 0);
    assert_eq!(establish_flow(&tc, client), (2, 0), "the new flow");
    assert!(
        flags_in(&tc, CONNTRACK.name)
            .iter()
            .all(|flags| flags & CT_FLAG_ESTABLISHED != 0),
        "{:?}",
        flags_in(&tc, CONNTRACK.name)
    );
    assert_eq!(
        of_every_entry(&tc, |value| value.more_flags & CT_MORE_RESET),
        [0, 0],
        "the ended flow's reset mark is gone with it"
    );
}

/// A flow whose forward entry was evicted alone, and whose client then
/// opens a new flow from the same port: the new flow starts in the opening
/// table, and the main table's reply entry of the old one, which pairs with
/// it, goes (in one table, the new flow's insertion replaced it). Before, it
/// stayed, and the container's answers went to it, asked first: the new
/// flow was never established, and ended at the SYN timeout.
#[test]
fn a_reply_entry_left_alone_gives_way_to_the_new_flow() {
    let Some(mut tc) = Tc::load_with(
        "a_reply_entry_left_alone_gives_way_to_the_new_flow",
        &published(),
    ) else {
        return;
    };
    let client = at(CLIENT_V4, 40057);
    assert_eq!(establish_flow(&tc, client), (2, 0), "the first flow");
    remove_entries(&mut tc, |_, value| value.flags & CT_FLAG_REPLY == 0);
    assert_eq!(establish_flow(&tc, client), (2, 0), "the new flow");
    assert!(
        flags_in(&tc, CONNTRACK.name)
            .iter()
            .all(|flags| flags & CT_FLAG_ESTABLISHED != 0),
        "{:?}",
        flags_in(&tc, CONNTRACK.name)
    );
}

/// The reply entry's establishment is another CPU's write (`establish`),
/// which the container's own update of the entry, userspace rewriting it or
/// a program of the build before (during an upgrade) can lose: then the
/// flow's next packet after a second of quiet makes it good. Before, the
/// reply entry stayed on the SYN timeout, and the sweep removed it from
/// under an idle flow.
#[test]
fn a_lost_establishment_of_the_reply_entry_is_made_good() {
    let Some(mut tc) = Tc::load_with(
        "a_lost_establishment_of_the_reply_entry_is_made_good",
        &published(),
    ) else {
        return;
    };
    let (dialed, container, client) = (at(HOST_V4, 8080), at(CTR_V4, 80), at(CLIENT_V4, 40052));
    tc.run_marked(UPLINK_IN, &frame(client, dialed, L4::Syn), 0);
    tc.run_marked(BACKEND_IN, &frame(container, client, L4::Ack), 0);
    tc.run_marked(UPLINK_IN, &frame(client, dialed, L4::Ack), 0);
    let (answered, established) = (
        CT_FLAG_REPLY | CT_FLAG_ANSWERED,
        CT_FLAG_REPLY | CT_FLAG_ANSWERED | CT_FLAG_ESTABLISHED,
    );
    assert_eq!(conntrack_flags(&tc), [CT_FLAG_ESTABLISHED, established]);
    // The reply entry's establishment lost; both entries quiet for 2 s.
    change_entries(&mut tc, |value| {
        if value.flags & CT_FLAG_REPLY != 0 {
            value.flags &= !CT_FLAG_ESTABLISHED;
        }
        value.last_seen_ns = value.last_seen_ns.saturating_sub(2_000_000_000);
    });
    assert_eq!(conntrack_flags(&tc), [CT_FLAG_ESTABLISHED, answered]);
    tc.run_marked(UPLINK_IN, &frame(client, dialed, L4::Ack), 0);
    assert_eq!(
        conntrack_flags(&tc),
        [CT_FLAG_ESTABLISHED, established],
        "made good by the client's packet"
    );
}

/// Runs a frame through `program` and checks the frame that comes out (the
/// pair: in, out), then the flags of the flow's two entries (in any order).
fn check_step(
    tc: &Tc,
    program: &str,
    (input, output): (Vec<u8>, Vec<u8>),
    flags: [u8; 2],
    what: &str,
) {
    assert_eq!(tc.run_marked(program, &input, 0).1, output, "{what}");
    let mut want = flags.to_vec();
    want.sort_unstable();
    assert_eq!(conntrack_flags(tc), want, "{what}: the entries' flags");
}

/// Runs `check` for each way a flow closes (FINs both ways, then a RST),
/// each on a fresh instance with `published()` and from its own client
/// port: `check(tc, how, rst, client)`.
fn for_each_way_of_closing(ports: [u16; 2], check: impl Fn(Tc, &str, bool, SocketAddr)) {
    for (rst, port) in [(false, ports[0]), (true, ports[1])] {
        let how = if rst {
            "closed by a RST"
        } else {
            "closed by FINs"
        };
        let mut tc = Tc::load_as_root();
        tc.publish(&published());
        check(tc, how, rst, at(CLIENT_V4, port));
    }
}

/// A SYN that reopens a closing flow to the same container (the client
/// reusing its port, the mapping unchanged) takes the old flow's two
/// entries over: nothing of the old flow's closing state is left (before
/// the entries were rewritten in place, they were removed and inserted
/// again), and the new flow is established again, each entry by its side.
#[test]
fn a_syn_that_reopens_a_closing_flow_to_the_same_container_starts_afresh() {
    if !can_run("a_syn_that_reopens_a_closing_flow_to_the_same_container_starts_afresh") {
        return;
    }
    for_each_way_of_closing([40043, 40044], |tc, how, rst, client| {
        let published = at(HOST_V4, 8080);
        let container = at(CTR_V4, 80);
        close_a_flow(&tc, how, (client, published, container), rst);
        assert!(
            conntrack_flags(&tc)
                .iter()
                .all(|f| f & CT_FLAG_CLOSING != 0),
            "{how}: closing: {:?}",
            conntrack_flags(&tc)
        );

        let (to_container, to_client) = (
            |l4| (frame(client, published, l4), frame(client, container, l4)),
            |l4| (frame(container, client, l4), frame(published, client, l4)),
        );
        let answered_reply = CT_FLAG_REPLY | CT_FLAG_ANSWERED;
        let (opening, answered, established) = (
            [0, CT_FLAG_REPLY],
            [0, answered_reply],
            [CT_FLAG_ESTABLISHED, answered_reply | CT_FLAG_ESTABLISHED],
        );
        let what = format!("{how}: the SYN reopens the flow, its entries opening");
        check_step(&tc, UPLINK_IN, to_container(L4::Syn), opening, &what);
        let what = format!("{how}: the container's answer marks the reply entry");
        check_step(&tc, BACKEND_IN, to_client(L4::Ack), answered, &what);
        let what = format!("{how}: the client's ACK establishes both entries");
        check_step(&tc, UPLINK_IN, to_container(L4::Ack), established, &what);
        let data = frame(client, published, L4::Ack);
        // The client's FIN closes its side only: the old flow's FIN, which
        // would have closed the flow with this one, is gone. (The client's
        // packet after its FIN is the one that asks the other entry.)
        let fin = closing_frame(client, published, false);
        assert_eq!(
            tc.run_marked(UPLINK_IN, &fin, 0).1,
            closing_frame(client, container, false),
            "{how}: the client's FIN"
        );
        tc.run_marked(UPLINK_IN, &data, 0);
        assert!(
            conntrack_flags(&tc)
                .iter()
                .all(|f| f & CT_FLAG_CLOSING == 0),
            "{how}: half-closed, not closing: {:?}",
            conntrack_flags(&tc)
        );
    });

    // The closing flow lost its reply entry (evicted): the SYN still opens
    // a whole new flow.
    let mut tc = Tc::load_as_root();
    tc.publish(&published());
    let (client, published, container) = (at(CLIENT_V4, 40045), at(HOST_V4, 8080), at(CTR_V4, 80));
    close_a_flow(&tc, "evicted", (client, published, container), false);
    remove_reply_entries(&mut tc);
    assert_eq!(conntrack_flags(&tc).len(), 1);
    assert_eq!(
        tc.run_marked(UPLINK_IN, &frame(client, published, L4::Syn), 0)
            .1,
        frame(client, container, L4::Syn),
        "the SYN reopens the flow whose reply entry is gone"
    );
    assert_eq!(conntrack_flags(&tc), [0, CT_FLAG_REPLY]);
}

/// A SYN that reopens a closing flow whose reply entry was evicted, and
/// whose reply key another flow took meanwhile (the same client port,
/// through another published port to the same container port): that
/// flow's entry stays, and the new flow gets another port towards the
/// container. Before, forgetting the closing flow removed whatever entry
/// had its reply key, and the other flow's replies left untranslated.
#[test]
fn reopening_a_flow_leaves_another_flows_entry_under_its_old_reply_key() {
    if !can_run("reopening_a_flow_leaves_another_flows_entry_under_its_old_reply_key") {
        return;
    }
    let (mut tc, [first, second], container) = two_ports_to_one_container();
    let client = at(CLIENT_V4, 40046);
    close_a_flow(&tc, "reset", (client, first, container), true);
    remove_reply_entries(&mut tc);
    // The same client port through the other published port: its reply
    // key, the first flow's, is free.
    assert_eq!(
        tc.run_marked(UPLINK_IN, &frame(client, second, L4::Syn), 0)
            .1,
        frame(client, container, L4::Syn)
    );

    // The client dials the first port again from the same port.
    let (_, out, _) = tc.run_marked(UPLINK_IN, &frame(client, first, L4::Syn), 0);
    assert_ne!(
        tcp_source_port(&out),
        client.port(),
        "the reopened flow moves to another port towards the container"
    );

    // The other flow's replies are still translated.
    assert_eq!(
        tc.run_marked(BACKEND_IN, &frame(container, client, L4::Ack), 0)
            .1,
        frame(second, client, L4::Ack),
        "the other flow's reply"
    );
}

/// A flow whose reply entry was evicted, and whose reply key another flow
/// took (as above): its RST closes its own entry, not that flow's. Before,
/// the entry under the key was taken for its own, and the other flow ended
/// with it.
#[test]
fn a_flow_that_lost_its_reply_entry_leaves_the_flow_under_that_key_open() {
    if !can_run("a_flow_that_lost_its_reply_entry_leaves_the_flow_under_that_key_open") {
        return;
    }
    let (mut tc, [first, second], container) = two_ports_to_one_container();
    let client = at(CLIENT_V4, 40047);
    tc.run_marked(UPLINK_IN, &frame(client, first, L4::Syn), 0);
    remove_reply_entries(&mut tc);
    assert_eq!(
        tc.run_marked(UPLINK_IN, &frame(client, second, L4::Syn), 0)
            .1,
        frame(client, container, L4::Syn),
        "the second flow, under the first one's reply key"
    );
    assert_eq!(conntrack_flags(&tc), [0, 0, CT_FLAG_REPLY]);

    tc.run_marked(UPLINK_IN, &closing_frame(client, first, true), 0);
    assert_eq!(
        conntrack_flags(&tc),
        [0, CT_FLAG_REPLY, CT_FLAG_CLOSING],
        "the first flow closes alone"
    );
    assert_eq!(
        tc.run_marked(BACKEND_IN, &frame(container, client, L4::Ack), 0)
            .1,
        frame(second, client, L4::Ack),
        "the second flow's reply"
    );
}

/// An instance publishing two host ports (8080 and 8081) to one container
/// port.
fn two_ports_to_one_container() -> (Tc, [SocketAddr; 2], SocketAddr) {
    let mut tc = Tc::load_as_root();
    let ports = [at(HOST_V4, 8080), at(HOST_V4, 8081)];
    let container = at(CTR_V4, 80);
    tc.publish(&ports.map(|port| mapping(Protocol::Tcp, port, container)));
    (tc, ports, container)
}

/// Removes every reply entry from conntrack, as evictions may.
fn remove_reply_entries(tc: &mut Tc) {
    remove_entries(tc, |_, value| value.flags & CT_FLAG_REPLY != 0);
}

/// The source port of a TCP frame.
fn tcp_source_port(frame: &[u8]) -> u16 {
    let headers = etherparse::PacketHeaders::from_ethernet_slice(frame).unwrap();
    let Some(etherparse::TransportHeader::Tcp(tcp)) = headers.transport else {
        panic!("not TCP: {frame:?}");
    };
    tcp.source_port
}

/// A flow that got another port towards the container (a clash) and lost
/// its forward entry, while a new flow from the client's own port took
/// the plain reply key: the first flow's reply entry is not paired with
/// the new flow's forward entry, so a RST from the container on the first
/// flow leaves the new one open. Before, a masqueraded reply entry took
/// any unmasqueraded forward entry under its client's key for its own.
#[test]
fn a_reply_entry_is_not_paired_with_another_flows_forward_entry() {
    if !can_run("a_reply_entry_is_not_paired_with_another_flows_forward_entry") {
        return;
    }
    let (mut tc, [first, second], container) = two_ports_to_one_container();
    let client = at(CLIENT_V4, 40048);
    // Flow X holds the reply key of the client's own port; flow A, from
    // the same port through the other published port, gets another.
    tc.run_marked(UPLINK_IN, &frame(client, first, L4::Syn), 0);
    let (_, out, _) = tc.run_marked(UPLINK_IN, &frame(client, second, L4::Syn), 0);
    let moved = at(CLIENT_V4, tcp_source_port(&out));
    assert_ne!(moved, client, "flow A clashed with X");
    // X is gone, and so is A's forward entry (evicted alone).
    remove_entries(&mut tc, |key, value| {
        value.flags & CT_FLAG_REPLY == 0 || key.dport == client.port().to_be()
    });
    assert_eq!(conntrack_flags(&tc).len(), 1, "A's reply entry is left");
    // Flow B: the client's port through the second port again; its reply
    // key (the client's own port) is free.
    assert_eq!(
        tc.run_marked(UPLINK_IN, &frame(client, second, L4::Syn), 0)
            .1,
        frame(client, container, L4::Syn)
    );

    // The container resets A.
    tc.run_marked(BACKEND_IN, &closing_frame(container, moved, true), 0);
    let flags = conntrack_flags(&tc);
    assert_eq!(
        flags.iter().filter(|f| *f & CT_FLAG_CLOSING != 0).count(),
        1,
        "only A's reply entry closes: {flags:?}"
    );
}

/// Opens a flow from `client` to `published` (translated to `container`)
/// and closes it: by the client's RST, or by FINs both ways and the
/// client's ACK of the container's.
fn close_a_flow(
    tc: &Tc,
    how: &str,
    (client, published, container): (SocketAddr, SocketAddr, SocketAddr),
    rst: bool,
) {
    let syn = frame(client, published, L4::Syn);
    assert_eq!(
        tc.run_marked(UPLINK_IN, &syn, 0).1,
        frame(client, container, L4::Syn),
        "{how}"
    );
    let close = closing_frame(client, published, rst);
    assert_eq!(
        tc.run_marked(UPLINK_IN, &close, 0).1,
        closing_frame(client, container, rst),
        "{how}"
    );
    if !rst {
        let reply = closing_frame(container, client, false);
        assert_eq!(
            tc.run_marked(BACKEND_IN, &reply, 0).1,
            closing_frame(published, client, false),
            "{how}: the container's FIN"
        );
        let last_ack = frame(client, published, L4::Ack);
        assert_eq!(
            tc.run_marked(UPLINK_IN, &last_ack, 0).1,
            frame(client, container, L4::Ack),
            "{how}: the client's ACK of the container's FIN"
        );
    }
}
