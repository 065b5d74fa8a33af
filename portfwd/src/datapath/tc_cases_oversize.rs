//! IPv4 packets without DF of a tracked flow that are larger than the MTU
//! of the interface they are redirected to (issue 11, case 8). A router
//! fragments them; `bpf_redirect_neigh` skips the forwarding path that
//! would, and the link drops them. So they go to the host's stack instead:
//! towards the container translated (the forwarding path fragments them on
//! the way to it), towards the client untranslated (the forwarding path
//! fragments them, and the uplink's egress program translates the
//! fragments as it does every routed reply). Through `BPF_PROG_TEST_RUN`,
//! with a veth pair of the test's own (MTU 1280) as the container's link
//! and the client's interface.

use std::net::{IpAddr, SocketAddr};

use portfwd_common::Stat;

use super::tc_fixture::{
    BACKEND_IN, CLIENT_MAC, CLIENT_V4, CTR_V4, DROP, Failures, HOST_MAC, HOST_V4, NEXT, REDIRECT,
    TO_STACK, Tc, UPLINK_IN, as_fragment, edit_ipv4_header, ifindex_ctx, ip_frame, mapping,
};
use crate::model::{Mapping, Protocol};

const PUBLISHED: SocketAddr = SocketAddr::new(IpAddr::V4(HOST_V4), 5470);
const CONTAINER: SocketAddr = SocketAddr::new(IpAddr::V4(CTR_V4), 53);
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(CLIENT_V4), 40210);
/// The container's MAC; frames from it go to the loopback device's all-zero
/// MAC (PACKET_HOST in a test run without an interface).
const CONTAINER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];

/// A veth pair of the test's own, `name` and `peer`, with an MTU of 1280:
/// the container's link and the client's interface at once. Removed when
/// dropped. (Each test has its own: tests run in parallel.)
struct SmallLink {
    name: &'static str,
    ifindex: u32,
    mac: [u8; 6],
}

impl SmallLink {
    /// Its MAC is set, not left random: udev may replace a random one
    /// after the link is made (`MACAddressPolicy=persistent`), and frames
    /// to the old one would not be the host's (PACKET_OTHERHOST).
    fn new(name: &'static str, peer: &'static str, mac: [u8; 6]) -> Self {
        portfwd_testkit::netns::ip(&["link", "del", name]).ok();
        let text: Vec<String> = mac.iter().map(|byte| format!("{byte:02x}")).collect();
        portfwd_testkit::netns::ip(&[
            "link",
            "add",
            name,
            "address",
            &text.join(":"),
            "mtu",
            "1280",
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "mtu",
            "1280",
        ])
        .unwrap();
        let ifindex = nix::net::if_::if_nametoindex(name).unwrap();
        SmallLink { name, ifindex, mac }
    }
}

impl Drop for SmallLink {
    fn drop(&mut self) {
        portfwd_testkit::netns::ip(&["link", "del", self.name]).ok();
    }
}

/// A UDP datagram of `payload` bytes; IPv4 with DF only if `dont_fragment`.
fn udp(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddr,
    dst: SocketAddr,
    payload: usize,
    dont_fragment: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    ip_frame(macs, src.ip(), dst.ip())
        .udp(src.port(), dst.port())
        .write(&mut out, &vec![7u8; payload])
        .unwrap();
    edit_ipv4_header(&mut out, |header| header.dont_fragment = dont_fragment);
    out
}

/// One run of `program` on `input`, the skb on interface `ifindex` (0: none,
/// the loopback device): the verdict and the frame out.
fn run(tc: &Tc, program: &str, input: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let (verdict, out, _) = tc.run_with(program, input, &ifindex_ctx(ifindex));
    (verdict, out)
}

/// The test's mapping: UDP, to the container behind `link`.
fn on_link(link: &SmallLink) -> Mapping {
    Mapping {
        ifindex: link.ifindex,
        ..mapping(Protocol::Udp, PUBLISHED, CONTAINER)
    }
}

#[test]
fn oversize_ipv4_without_df_goes_to_the_stack_which_fragments_it() {
    let test = "oversize_ipv4_without_df_goes_to_the_stack_which_fragments_it";
    let Some(mut tc) = Tc::load(test) else {
        return;
    };
    let link = SmallLink::new("pftfrg0", "pftfrg1", [2, 0, 0x5e, 0, 0, 1]);
    tc.publish(&[on_link(&link)]);
    // The client is on the small link too: its frames come in on it, so the
    // flow's replies go back to it.
    let from_client = (CLIENT_MAC, link.mac);
    let from_container = (CONTAINER_MAC, HOST_MAC);
    let mut failures = Failures::default();

    let small = udp(from_client, CLIENT, PUBLISHED, 100, false);
    let (verdict, _) = run(&tc, UPLINK_IN, &small, link.ifindex);
    assert_eq!(verdict, REDIRECT, "the first datagram opens the flow");
    let before = tc.stat(Stat::TooBigToStack);

    // Towards the container: translated, then to the stack.
    let big = udp(from_client, CLIENT, PUBLISHED, 1400, false);
    let translated = udp(from_client, CLIENT, CONTAINER, 1400, false);
    let got = run(&tc, UPLINK_IN, &big, link.ifindex);
    failures.check("to the container", got, TO_STACK, &translated);
    // Towards the client: untouched, to the stack (the uplink's egress
    // program translates what the forwarding path makes of it).
    let reply = udp(from_container, CONTAINER, CLIENT, 1400, false);
    let got = run(&tc, BACKEND_IN, &reply, 0);
    failures.check("to the client", got, NEXT, &reply);
    if tc.stat(Stat::TooBigToStack) != before + 2 {
        failures.note("too_big_to_stack not counted twice".into());
    }
    // Packets that fit are redirected as ever, both ways.
    let fits = udp(from_client, CLIENT, PUBLISHED, 1200, false);
    if run(&tc, UPLINK_IN, &fits, link.ifindex).0 != REDIRECT {
        failures.note("a datagram that fits, to the container: not redirected".into());
    }
    let fits = udp(from_container, CONTAINER, CLIENT, 1200, false);
    if run(&tc, BACKEND_IN, &fits, 0).0 != REDIRECT {
        failures.note("a datagram that fits, to the client: not redirected".into());
    }
    failures.assert_none();
}

/// The first datagram of a flow is checked too: with DF, answered with
/// "fragmentation needed" (MTU 1280) to the client, before any flow
/// exists; without DF, translated and handed to the stack.
#[test]
fn first_datagrams_too_big_are_checked_too() {
    let test = "first_datagrams_too_big_are_checked_too";
    let Some(mut tc) = Tc::load(test) else {
        return;
    };
    let link = SmallLink::new("pftfrg2", "pftfrg3", [2, 0, 0x5e, 0, 0, 2]);
    tc.publish(&[on_link(&link)]);
    let from_client = (CLIENT_MAC, link.mac);
    let mut failures = Failures::default();

    let big = udp(from_client, CLIENT, PUBLISHED, 1400, true);
    let (verdict, out) = run(&tc, UPLINK_IN, &big, link.ifindex);
    // IPv4 ICMP type 3 code 4 with the MTU, to the client.
    let answered = out.len() > 42
        && out[23] == 1
        && out[30..34] == CLIENT_V4.octets()
        && (out[34], out[35]) == (3, 4)
        && out[40..42] == 1280u16.to_be_bytes();
    if verdict != REDIRECT || !answered {
        failures.note(format!(
            "with DF: verdict {verdict:#x}, frame {:02x?}",
            &out[..out.len().min(48)]
        ));
    }
    let other = SocketAddr::new(CLIENT.ip(), CLIENT.port() + 1);
    let big = udp(from_client, other, PUBLISHED, 1400, false);
    let translated = udp(from_client, other, CONTAINER, 1400, false);
    let got = run(&tc, UPLINK_IN, &big, link.ifindex);
    failures.check("without DF", got, TO_STACK, &translated);
    failures.assert_none();
}

/// A datagram in the container's name that comes in on the client's link,
/// larger than that link and without DF, is forged like any other from
/// there (the container's link is another): dropped and counted. Before,
/// the size check ran first and handed it to the stack, which routed it
/// back out of the client's link, where the egress program translated it
/// without asking where it came from.
#[test]
fn a_forged_oversize_answer_from_the_clients_link_is_dropped() {
    let test = "a_forged_oversize_answer_from_the_clients_link_is_dropped";
    let Some(mut tc) = Tc::load(test) else {
        return;
    };
    let containers = SmallLink::new("pftfrg4", "pftfrg5", [2, 0, 0x5e, 0, 0, 3]);
    let clients = SmallLink::new("pftfrg6", "pftfrg7", [2, 0, 0x5e, 0, 0, 4]);
    tc.publish(&[on_link(&containers)]);
    let from_client = (CLIENT_MAC, clients.mac);
    let small = udp(from_client, CLIENT, PUBLISHED, 100, false);
    let (verdict, _) = run(&tc, UPLINK_IN, &small, clients.ifindex);
    assert_eq!(verdict, REDIRECT, "the first datagram opens the flow");

    let before = tc.stat(Stat::DroppedContainerSource);
    let forged = udp(from_client, CONTAINER, CLIENT, 1400, false);
    let (verdict, out) = run(&tc, UPLINK_IN, &forged, clients.ifindex);
    assert_eq!(verdict, DROP, "verdict {verdict:#x}");
    assert!(out == forged, "the frame was changed");
    assert_eq!(tc.stat(Stat::DroppedContainerSource), before + 1);
}

/// A new flow's first fragment (IPv4 without DF) too big for the
/// container's link goes to the stack, translated, to be fragmented there;
/// so do its datagram's later fragments. Before, the first fragment
/// remembered the container's link for them, and they were redirected into
/// it as they were, where the link drops what it cannot carry: the
/// datagram was lost, while a flow's later datagrams (whose first fragment
/// finds the flow) went through.
#[test]
fn a_first_fragment_sent_to_the_stack_takes_its_datagram_with_it() {
    let test = "a_first_fragment_sent_to_the_stack_takes_its_datagram_with_it";
    let Some(mut tc) = Tc::load(test) else {
        return;
    };
    let link = SmallLink::new("pftfrg8", "pftfrg9", [2, 0, 0x5e, 0, 0, 5]);
    tc.publish(&[on_link(&link)]);
    let from_client = (CLIENT_MAC, link.mac);
    const ID: u16 = 0x4242;
    // A datagram of 2,800 bytes in two fragments of 1,400 (offset 1408 /
    // 8); a later fragment carries the first's bytes here (the programs read
    // nothing past its IP header).
    let fragment = |dst: SocketAddr, offset: u16, more: bool| {
        as_fragment(udp(from_client, CLIENT, dst, 1400, false), ID, offset, more)
    };
    let mut failures = Failures::default();
    let got = run(&tc, UPLINK_IN, &fragment(PUBLISHED, 0, true), link.ifindex);
    failures.check(
        "the first fragment",
        got,
        TO_STACK,
        &fragment(CONTAINER, 0, true),
    );
    let mut later = fragment(PUBLISHED, 176, false);
    let (verdict, out) = run(&tc, UPLINK_IN, &later, link.ifindex);
    edit_ipv4_header(&mut later, |header| header.destination = CTR_V4.octets());
    failures.check("the later fragment", (verdict, out), TO_STACK, &later);
    failures.assert_none();
}
