//! Table-driven cases for the answers the TC programs send (`reply` in the
//! eBPF crate), through `BPF_PROG_TEST_RUN`: a client outside a mapping's
//! allowlist gets what a closed port gives, built in place of its packet and
//! redirected back out of the interface it came in on; with `--refuse drop`
//! it gets nothing. The expected frames are built by `etherparse`, which
//! computes every checksum itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::IpDscp;
use portfwd_common::Stat;

use super::tc_fixture::{
    CLIENT_MAC, CTR_V4, CTR_V6, Case, DROP, Failures, HOST_MAC, HOST_V4, HOST_V6, L4, REDIRECT,
    SEQ, TO_STACK, Tc, UPLINK_IN, at, check_table, edit_ipv4_header, frame, icmp, ip_frame,
    mapping,
};
use crate::model::{Allowlist, Mapping, Protocol, Refuse};

/// Inside the allowlists (10.9.8.0/24, fd00:9:8::/48)...
const INSIDER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 8, 9);
/// ...and outside.
const OUTSIDER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 6, 6);
const OUTSIDER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 6, 0, 0, 0, 0, 6);
/// `tc_cases::frame`'s TCP payload length.
const PAYLOAD_LEN: u32 = 7;

/// Mapped ports: with an allowlist that refuses with an answer (the
/// default), and one that refuses silently (`--refuse drop`).
const TCP_REJECT: u16 = 8090;
const UDP_REJECT: u16 = 5454;
const TCP_DROP: u16 = 8091;
const UDP_DROP: u16 = 5455;

fn published() -> Vec<Mapping> {
    let list = Allowlist::parse(&["10.9.8.0/24", "fd00:9:8::/48"]).unwrap();
    let mut mappings = Vec::new();
    for (host_ip, ctr_ip) in [
        (IpAddr::from(HOST_V4), IpAddr::from(CTR_V4)),
        (HOST_V6.into(), CTR_V6.into()),
    ] {
        for (protocol, port, refuse) in [
            (Protocol::Tcp, TCP_REJECT, Refuse::Reject),
            (Protocol::Udp, UDP_REJECT, Refuse::Reject),
            (Protocol::Tcp, TCP_DROP, Refuse::Drop),
            (Protocol::Udp, UDP_DROP, Refuse::Drop),
        ] {
            mappings.push(Mapping {
                allow: Some(Allowlist {
                    refuse,
                    ..list.for_family(host_ip.is_ipv4())
                }),
                ..mapping(protocol, at(host_ip, port), at(ctr_ip, 80))
            });
        }
    }
    mappings
}

/// The reset a closed port sends for `tc_cases::frame`'s SYN from `client`
/// to `published`: RST|ACK, seq 0, ack = its seq + 1 + its payload.
fn reset(published: SocketAddr, client: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    ip_frame((HOST_MAC, CLIENT_MAC), published.ip(), client.ip())
        .tcp(published.port(), client.port(), 0, 0)
        .rst()
        .ack(SEQ + 1 + PAYLOAD_LEN)
        .write(&mut out, &[])
        .unwrap();
    out
}

/// The ICMP port unreachable a closed UDP port sends for `datagram` (from
/// its IP header on), holding `quoted` bytes of it. IPv4: TOS 0xc0, no DF,
/// as the kernel's ICMP errors.
fn unreachable(published: IpAddr, client: IpAddr, datagram: &[u8], quoted: usize) -> Vec<u8> {
    let kind = match published {
        IpAddr::V4(_) => (3, 3, [0; 4]),
        IpAddr::V6(_) => (1, 4, [0; 4]),
    };
    answer(published, client, kind, &datagram[..quoted])
}

/// An ICMP error the host sends: IPv4 with TOS 0xc0 and no DF, as the
/// kernel's ICMP errors.
fn answer(published: IpAddr, client: IpAddr, kind: (u8, u8, [u8; 4]), quoted: &[u8]) -> Vec<u8> {
    let mut out = icmp((HOST_MAC, CLIENT_MAC), published, client, kind, quoted);
    if published.is_ipv4() {
        edit_ipv4_header(&mut out, |header| {
            header.dscp = IpDscp::try_new(0xc0 >> 2).unwrap();
            header.dont_fragment = false;
        });
    }
    out
}

/// A UDP frame with `payload` bytes.
fn udp(src: SocketAddr, dst: SocketAddr, payload: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut out = Vec::new();
    ip_frame((CLIENT_MAC, HOST_MAC), src.ip(), dst.ip())
        .udp(src.port(), dst.port())
        .write(&mut out, &body)
        .unwrap();
    out
}

fn cases() -> Vec<Case> {
    let out4 = at(OUTSIDER_V4, 40101);
    let out6 = at(OUTSIDER_V6, 40102);
    let (tcp4, udp4) = (at(HOST_V4, TCP_REJECT), at(HOST_V4, UDP_REJECT));
    let (tcp6, udp6) = (at(HOST_V6, TCP_REJECT), at(HOST_V6, UDP_REJECT));
    let small4 = udp(out4, udp4, 7);
    let small6 = udp(out6, udp6, 7);
    // Quoted up to 576 bytes of answer (v4) and 1280 (v6).
    let big4 = udp(out4, udp4, 1400);
    let big6 = udp(out6, udp6, 1400);
    let mut rst = frame(out4, tcp4, L4::Syn);
    // A reset is never answered (a reset with a SYN is nonsense, but it is
    // what reaches the allowlist: only SYNs and UDP do).
    rst[14 + 20 + 13] |= 0x04;
    let case = Case::new;
    vec![
        case(
            "a SYN from outside the list: a reset",
            frame(out4, tcp4, L4::Syn),
            REDIRECT,
            Some(reset(tcp4, out4)),
            Stat::RefusedAnswered,
        ),
        case(
            "an IPv6 SYN from outside the list: a reset",
            frame(out6, tcp6, L4::Syn),
            REDIRECT,
            Some(reset(tcp6, out6)),
            Stat::RefusedAnswered,
        ),
        case(
            "UDP from outside the list: port unreachable, the whole datagram quoted",
            small4.clone(),
            REDIRECT,
            Some(unreachable(
                HOST_V4.into(),
                OUTSIDER_V4.into(),
                &small4[14..],
                small4.len() - 14,
            )),
            Stat::RefusedAnswered,
        ),
        case(
            "IPv6 UDP from outside the list: port unreachable",
            small6.clone(),
            REDIRECT,
            Some(unreachable(
                HOST_V6.into(),
                OUTSIDER_V6.into(),
                &small6[14..],
                small6.len() - 14,
            )),
            Stat::RefusedAnswered,
        ),
        case(
            "a large datagram: 548 bytes quoted (576 in all)",
            big4.clone(),
            REDIRECT,
            Some(unreachable(
                HOST_V4.into(),
                OUTSIDER_V4.into(),
                &big4[14..],
                576 - 28,
            )),
            Stat::RefusedAnswered,
        ),
        case(
            "a large IPv6 datagram: 1232 bytes quoted (1280 in all)",
            big6.clone(),
            REDIRECT,
            Some(unreachable(
                HOST_V6.into(),
                OUTSIDER_V6.into(),
                &big6[14..],
                1280 - 48,
            )),
            Stat::RefusedAnswered,
        ),
        case(
            "a reset from outside the list: dropped, never answered",
            rst,
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "a SYN from outside a silent list: dropped",
            frame(out4, at(HOST_V4, TCP_DROP), L4::Syn),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "UDP from outside a silent list: dropped",
            udp(out6, at(HOST_V6, UDP_DROP), 7),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "a SYN from a class E address outside the list: dropped, never answered",
            frame(at(Ipv4Addr::new(240, 0, 0, 1), 40104), tcp4, L4::Syn),
            DROP,
            None,
            Stat::RefusedNotAllowed,
        ),
        case(
            "a SYN from inside the list: translated",
            frame(at(INSIDER_V4, 40103), tcp4, L4::Syn),
            TO_STACK,
            Some(frame(at(INSIDER_V4, 40103), at(CTR_V4, 80), L4::Syn)),
            Stat::ToStack,
        ),
    ]
}

#[test]
fn refused_clients_get_what_a_closed_port_gives() {
    check_table(
        "refused_clients_get_what_a_closed_port_gives",
        &published(),
        UPLINK_IN,
        cases(),
    );
}

/// ICMP answers are rate-limited per CPU (a burst of 50, then 1000 a
/// second): a quick run of many refused datagrams gets some of them
/// dropped and counted. Not a timing bound: 1,000 runs would have to take
/// over 0.95 s for none to be limited.
#[test]
fn icmp_answers_are_rate_limited() {
    let Some(tc) = Tc::load_with("icmp_answers_are_rate_limited", &published()) else {
        return;
    };
    let datagram = udp(at(OUTSIDER_V4, 40104), at(HOST_V4, UDP_REJECT), 7);
    let (answered, limited) = (
        tc.stat(Stat::RefusedAnswered),
        tc.stat(Stat::AnswersRateLimited),
    );
    let mut verdicts = [0usize; 2];
    for _ in 0..1000 {
        match tc.run(UPLINK_IN, &datagram).0 {
            REDIRECT => verdicts[0] += 1,
            DROP => verdicts[1] += 1,
            other => panic!("verdict {other:#x}"),
        }
    }
    assert!(verdicts[0] >= 50, "the burst is answered: {verdicts:?}");
    assert!(verdicts[1] > 0, "some are limited: {verdicts:?}");
    assert_eq!(
        (
            tc.stat(Stat::RefusedAnswered) - answered,
            tc.stat(Stat::AnswersRateLimited) - limited
        ),
        (verdicts[0] as u64, verdicts[1] as u64)
    );
}

/// A veth pair of the test's own with a small MTU (the container's link),
/// removed when dropped.
struct SmallLink {
    ifindex: u32,
}

impl SmallLink {
    const NAME: &str = "pftmtu0";
    const PEER: &str = "pftmtu1";

    fn new(mtu: u32) -> Self {
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        // A leftover of an interrupted run, if any.
        std::process::Command::new("ip")
            .args(["link", "del", Self::NAME])
            .stderr(std::process::Stdio::null())
            .status()
            .ok();
        let mtu = mtu.to_string();
        ip(&[
            "link",
            "add",
            Self::NAME,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            Self::PEER,
            "mtu",
            &mtu,
        ]);
        let ifindex = nix::net::if_::if_nametoindex(Self::NAME).unwrap();
        SmallLink { ifindex }
    }
}

impl Drop for SmallLink {
    fn drop(&mut self) {
        std::process::Command::new("ip")
            .args(["link", "del", Self::NAME])
            .status()
            .ok();
    }
}

/// A packet of a tracked flow larger than the MTU of the container's link
/// (1280) gets the answer a router gives, quoting it as the client sent
/// it: "fragmentation needed" with the MTU (IPv4 with DF), "packet too big"
/// (IPv6). (IPv4 without DF: `tc_cases_oversize`.)
#[test]
fn packets_too_big_for_the_containers_link_get_a_routers_answer() {
    let test = "packets_too_big_for_the_containers_link_get_a_routers_answer";
    let Some(mut tc) = Tc::load(test) else {
        return;
    };
    let link = SmallLink::new(1280);
    let on_link = |host, container| Mapping {
        ifindex: link.ifindex,
        ..mapping(Protocol::Tcp, host, container)
    };
    tc.publish(&[
        on_link(at(HOST_V4, 8070), at(CTR_V4, 80)),
        on_link(at(HOST_V6, 8070), at(CTR_V6, 80)),
        Mapping {
            ifindex: link.ifindex,
            ..mapping(Protocol::Udp, at(HOST_V4, 5470), at(CTR_V4, 53))
        },
    ]);
    let mut failures = Failures::default();
    for (client, published, quoted) in [
        (at(OUTSIDER_V4, 40111), at(HOST_V4, 8070), 576 - 28),
        (at(OUTSIDER_V6, 40112), at(HOST_V6, 8070), 1280 - 48),
    ] {
        assert_eq!(
            tc.run(UPLINK_IN, &frame(client, published, L4::Syn)).0,
            REDIRECT,
            "the SYN from {client}"
        );
        let input = big_segment(client, published);
        let before = tc.stat(Stat::TooBigAnswered);
        let expected = too_big(published.ip(), client.ip(), &input[14..quoted + 14], 1280);
        failures.check(
            &client.to_string(),
            tc.run(UPLINK_IN, &input),
            REDIRECT,
            &expected,
        );
        if tc.stat(Stat::TooBigAnswered) != before + 1 {
            failures.note(format!("{client}: too_big_answered not counted"));
        }
    }
    // A first datagram too big, from a source no answer may go to (a
    // multicast group): dropped unanswered, as the martian it is.
    let from_group = udp(
        at(Ipv4Addr::new(224, 0, 0, 5), 40113),
        at(HOST_V4, 5470),
        1400,
    );
    let before = tc.stat(Stat::DroppedMartianSource);
    failures.check(
        "a first datagram too big from a multicast source",
        tc.run(UPLINK_IN, &from_group),
        DROP,
        &from_group,
    );
    if tc.stat(Stat::DroppedMartianSource) != before + 1 {
        failures.note("the multicast source's datagram not counted as martian".into());
    }
    failures.assert_none();
}

/// A TCP segment of 1400 bytes of data from `src` to `dst` (IPv4 with DF).
fn big_segment(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    ip_frame((CLIENT_MAC, HOST_MAC), src.ip(), dst.ip())
        .tcp(src.port(), dst.port(), 2000, 64240)
        .ack(1)
        .write(&mut out, &[7u8; 1400])
        .unwrap();
    out
}

/// The router's answer to a packet too big for an MTU of `mtu`, quoting
/// `quoted`.
fn too_big(published: IpAddr, client: IpAddr, quoted: &[u8], mtu: u16) -> Vec<u8> {
    let kind = match published {
        IpAddr::V4(_) => {
            let mtu = mtu.to_be_bytes();
            (3, 4, [0, 0, mtu[0], mtu[1]])
        }
        IpAddr::V6(_) => (2, 0, u32::from(mtu).to_be_bytes()),
    };
    answer(published, client, kind, quoted)
}
