//! What a flow believes of a TCP segment depends on its sequence numbers
//! (issue 11, case 1): a reset closes the flow only when it comes from
//! where its sender's side of the flow is, and the client's ACK
//! establishes the flow only when it acknowledges the container's answer.
//! A source that cannot see the flow (it forged the client's address, or
//! guessed the client's port) does not know those numbers. Before, any
//! reset closed the flow (gone 10 s later, however live), and any ACK after
//! the answer established it (for the established timeout).

use std::net::SocketAddr;

use portfwd_common::{
    CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_FIN, CT_FLAG_REPLY, CT_MORE_RESET,
    CT_TCP_CLOSING_NS, FAMILY_V4, Stat,
};

use super::tc_fixture::{
    BACKEND_IN, CLIENT_V4, CTR_V4, DROP, HOST_V4, OTHER_CTR_V4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    TO_STACK, Tc, UPLINK_IN, at, change_entries, conntrack_flags, mapping, of_every_entry,
    remove_entries, segment,
};
use crate::model::{Mapping, Protocol};

const CLIENT_ISN: u32 = 7_000;
const CONTAINER_ISN: u32 = 90_000;
/// A request of 3 bytes after the handshake.
const REQUEST: &[u8] = b"GET";

fn dialed() -> SocketAddr {
    at(HOST_V4, 8080)
}

fn container() -> SocketAddr {
    at(CTR_V4, 80)
}

fn load(test: &str) -> Option<Tc> {
    Tc::load_with(test, &[mapping(Protocol::Tcp, dialed(), container())])
}

/// The client's SYN and the container's answer: the flow of `client`,
/// answered, not yet established.
fn answered(tc: &Tc, client: SocketAddr) {
    client_syn(tc, client);
    tc.run(
        BACKEND_IN,
        &segment(
            (container(), client),
            TCP_SYN | TCP_ACK,
            (CONTAINER_ISN, CLIENT_ISN + 1),
            &[],
        ),
    );
}

/// The client's SYN.
fn client_syn(tc: &Tc, client: SocketAddr) {
    client_syn_at(tc, client, CLIENT_ISN);
}

/// The client's SYN, at the sequence number `isn`.
fn client_syn_at(tc: &Tc, client: SocketAddr, isn: u32) {
    tc.run(
        UPLINK_IN,
        &segment((client, dialed()), TCP_SYN, (isn, 0), &[]),
    );
}

/// A client's ACK of `ack` (with its request), and whether the flow is
/// established after it, both entries (else neither).
fn acked_establishes(tc: &Tc, client: SocketAddr, ack: u32) -> bool {
    tc.run(
        UPLINK_IN,
        &segment((client, dialed()), TCP_ACK, (CLIENT_ISN + 1, ack), REQUEST),
    );
    established(tc)
}

/// Whether the flow is established, both entries (else neither).
fn established(tc: &Tc) -> bool {
    let flags = conntrack_flags(tc);
    let established = flags
        .iter()
        .filter(|f| *f & CT_FLAG_ESTABLISHED != 0)
        .count();
    assert!(established == 0 || established == 2, "{flags:?}");
    established == 2
}

/// How the one flow's two entries end: (closing, marked by a reset), each.
fn ends(tc: &Tc) -> Vec<(bool, bool)> {
    let ends = of_every_entry(tc, |value| {
        (
            value.flags & CT_FLAG_CLOSING != 0,
            value.more_flags & CT_MORE_RESET != 0,
        )
    });
    assert_eq!(ends.len(), 2, "{:?}", conntrack_flags(tc));
    ends
}

/// Whether both entries of the one flow are closing.
fn closing(tc: &Tc) -> bool {
    ends(tc) == [(true, false); 2]
}

/// Whether both entries of the one flow are marked by a reset (they end
/// after the closing time unless a packet of the flow follows:
/// `a_reset_the_other_side_answers_leaves_the_flow_open`).
fn reset_marked(tc: &Tc) -> bool {
    ends(tc) == [(false, true); 2]
}

/// Whether neither entry of the one flow is closing or marked by a reset.
fn open(tc: &Tc) -> bool {
    ends(tc) == [(false, false); 2]
}

/// A reset of the client's, with the sequence number `seq`: the verdict
/// and the frame out.
fn client_reset(tc: &Tc, client: SocketAddr, seq: u32) -> (u32, Vec<u8>) {
    tc.run(
        UPLINK_IN,
        &segment((client, dialed()), TCP_RST, (seq, 0), &[]),
    )
}

#[test]
fn a_reset_closes_a_flow_only_from_where_its_side_is() {
    const TEST: &str = "a_reset_closes_a_flow_only_from_where_its_side_is";
    let Some(tc) = load(TEST) else {
        return;
    };
    let client = at(CLIENT_V4, 40060);
    answered(&tc, client);
    assert!(acked_establishes(&tc, client, CONTAINER_ISN + 1));
    // The sides' marks: after their SYNs (the client's 3-byte request
    // moves nothing).
    let mark = CLIENT_ISN + 1;
    let container_mark = CONTAINER_ISN + 1;
    let passed = tc.stat(Stat::CloseOutOfWindow);
    // Forged resets: just past the band around the client's mark, just
    // before it, far from it; from the container's side, far from it.
    let ahead = mark + 32_768;
    assert_eq!(
        client_reset(&tc, client, ahead),
        (
            TO_STACK,
            segment((client, container()), TCP_RST, (ahead, 0), &[])
        ),
        "passed on to the container, translated"
    );
    client_reset(&tc, client, mark.wrapping_sub(65_536));
    client_reset(&tc, client, mark + 1_000_000);
    tc.run(
        BACKEND_IN,
        &segment(
            (container(), client),
            TCP_RST,
            (container_mark + 100_000, 0),
            &[],
        ),
    );
    // A forged segment far ahead does not move the client's mark, so that
    // a reset at its end does not fit either.
    let far = mark + 1_000_000;
    tc.run(
        UPLINK_IN,
        &segment((client, dialed()), TCP_ACK, (far, container_mark), b"x"),
    );
    client_reset(&tc, client, far + 1);
    // A forged FIN closes nothing either, so that a forged SYN after it is
    // not a client reusing its port (which would start the flow over at a
    // sequence number of the forger's choosing, where its reset fits).
    tc.run(
        UPLINK_IN,
        &segment(
            (client, dialed()),
            TCP_FIN | TCP_ACK,
            (far, container_mark),
            &[],
        ),
    );
    tc.run(
        UPLINK_IN,
        &segment((client, dialed()), TCP_SYN, (5_000_000, 0), &[]),
    );
    client_reset(&tc, client, 5_000_001);
    assert!(open(&tc), "forged: {:?}", ends(&tc));
    assert_eq!(tc.stat(Stat::CloseOutOfWindow), passed + 7);

    // The client's resets at the band's edges, and at its mark (a stack
    // answering a segment whose ACK lagged sends that ACK): each closes a
    // flow.
    for seq in [mark.wrapping_sub(65_535), mark + 32_767, mark] {
        let Some(tc) = load(TEST) else {
            return;
        };
        answered(&tc, client);
        assert!(acked_establishes(&tc, client, CONTAINER_ISN + 1));
        client_reset(&tc, client, seq);
        assert!(reset_marked(&tc), "a reset at {seq}: {:?}", ends(&tc));
        assert_eq!(tc.stat(Stat::CloseOutOfWindow), 0);
    }

    // An entry of an earlier build knows no sequence number: its resets
    // are believed, as they were.
    let Some(mut tc) = load(TEST) else {
        return;
    };
    answered(&tc, client);
    assert!(acked_establishes(&tc, client, CONTAINER_ISN + 1));
    change_entries(&mut tc, |value| value.closing_or_progress = 0);
    client_reset(&tc, client, ahead);
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
}

#[test]
fn a_blind_ack_after_the_answer_establishes_nothing() {
    const TEST: &str = "a_blind_ack_after_the_answer_establishes_nothing";
    let Some(tc) = load(TEST) else {
        return;
    };
    // A SYN from a forged source that the container answers: the forger
    // does not see the answer, and guesses its sequence number.
    let forged = at(CLIENT_V4, 40061);
    answered(&tc, forged);
    for guess in [
        CONTAINER_ISN + 1 + 100_000,
        CONTAINER_ISN.wrapping_sub(70_000),
    ] {
        assert!(
            !acked_establishes(&tc, forged, guess),
            "ACK of {guess}: {:?}",
            conntrack_flags(&tc)
        );
    }
    // The client that saw it acknowledges it.
    assert!(acked_establishes(&tc, forged, CONTAINER_ISN + 1));

    // An answer recorded by an earlier build (no sequence number known):
    // any ACK after it establishes the flow, as before.
    let Some(mut tc) = load(TEST) else {
        return;
    };
    answered(&tc, forged);
    change_entries(&mut tc, |value| {
        if value.flags & CT_FLAG_REPLY != 0 {
            value.closing_or_progress = 0;
        }
    });
    assert!(acked_establishes(&tc, forged, CONTAINER_ISN + 1 + 100_000));
}

/// The client's data after its request, in chunks of this size.
const CHUNK: [u8; 1400] = [b'x'; 1400];

/// Where the client's chunk `i` starts.
fn chunk_start(i: u32) -> u32 {
    CLIENT_ISN + 1 + REQUEST.len() as u32 + i * CHUNK.len() as u32
}

/// The client's chunk `i`, acknowledging the container's SYN.
fn client_chunk(tc: &Tc, client: SocketAddr, i: u32) {
    tc.run(
        UPLINK_IN,
        &segment(
            (client, dialed()),
            TCP_ACK,
            (chunk_start(i), CONTAINER_ISN + 1),
            &CHUNK,
        ),
    );
}

/// A side's mark follows it through a long flow (it moves every 32 KiB,
/// not at every segment): after 70,000 bytes, the client's reset at its
/// end still closes the flow.
#[test]
fn a_sides_mark_follows_it_through_a_long_flow() {
    let Some(tc) = load("a_sides_mark_follows_it_through_a_long_flow") else {
        return;
    };
    let client = at(CLIENT_V4, 40062);
    answered(&tc, client);
    assert!(acked_establishes(&tc, client, CONTAINER_ISN + 1));
    (0..50).for_each(|i| client_chunk(&tc, client, i));
    let end = chunk_start(50);
    client_reset(&tc, client, end);
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
}

/// A burst of the client's segments lost before they reach the host: the
/// segments after the hole start too far past the client's mark to move
/// it, and when more than half a window of them came through before the
/// retransmissions, the mark that those leave is too far behind the
/// client's new data to follow it. Before, the mark stayed there for good:
/// the client's resets were passed on and the flow left to its idle
/// timeout. The container's acknowledgment of the client's
/// end brings it back (checked once a second per entry: the test ages the
/// entries by two seconds), and a reset then closes the flow. An ACK in
/// the container's name whose sequence number is not where the container
/// is (a neighbour forging it) moves nothing.
#[test]
fn a_sides_mark_left_behind_by_a_lost_burst_comes_back() {
    let Some(mut tc) = load("a_sides_mark_left_behind_by_a_lost_burst_comes_back") else {
        return;
    };
    let client = at(CLIENT_V4, 40068);
    answered(&tc, client);
    assert!(acked_establishes(&tc, client, CONTAINER_ISN + 1));
    // 30 segments reach the host, 60 (84,000 bytes) are lost, 30 more
    // reach it, the lost ones come again, then new data.
    (0..30)
        .chain(90..120)
        .chain(30..90)
        .chain(120..125)
        .for_each(|i| client_chunk(&tc, client, i));
    let end = chunk_start(125);
    client_reset(&tc, client, end);
    assert!(open(&tc), "the mark is left behind");
    let container_ack = |tc: &mut Tc, seq: u32| {
        change_entries(tc, |entry| entry.last_seen_ns -= 2_000_000_000);
        tc.run(
            BACKEND_IN,
            &segment((container(), client), TCP_ACK, (seq, end), &[]),
        );
    };
    container_ack(&mut tc, CONTAINER_ISN + 1 + 1_000_000);
    client_reset(&tc, client, end);
    assert!(open(&tc), "moved by a forged ACK");
    container_ack(&mut tc, CONTAINER_ISN + 1);
    client_reset(&tc, client, end);
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
}

/// A client reusing its port while the container still holds the earlier
/// connection in TIME_WAIT: the container answers its SYN with that
/// connection's ACK first, the client resets it and sends its SYN again,
/// and the container's SYN-ACK then starts a new sequence. The SYN-ACK
/// sets the container's mark, so that the client's ACK of it establishes
/// the flow; before, the earlier connection's ACK had set it for good and
/// the flow never became established (it ended after 60 s idle).
#[test]
fn a_containers_syn_ack_sets_its_mark_before_the_flow_is_established() {
    let Some(tc) = load("a_containers_syn_ack_sets_its_mark_before_the_flow_is_established") else {
        return;
    };
    let client = at(CLIENT_V4, 40063);
    reuse_against_time_wait(&tc, client, BACKEND_IN);
    assert!(
        acked_establishes(&tc, client, CONTAINER_ISN + 1),
        "{:?}",
        conntrack_flags(&tc)
    );
}

/// A client reusing its port while the container still holds the earlier
/// connection in TIME_WAIT, the container's packets through `program`:
/// the client's SYN, the earlier connection's ACK (from far elsewhere in
/// the sequence), the client's reset, its SYN again and the container's
/// SYN-ACK.
fn reuse_against_time_wait(tc: &Tc, client: SocketAddr, program: &str) {
    client_syn(tc, client);
    tc.run(
        program,
        &segment(
            (container(), client),
            TCP_ACK,
            (CONTAINER_ISN + 3_000_000, 4_000_000),
            &[],
        ),
    );
    tc.run(
        UPLINK_IN,
        &segment((client, dialed()), TCP_RST, (4_000_000, 0), &[]),
    );
    client_syn(tc, client);
    tc.run(program, &container_syn_ack(client, CONTAINER_ISN));
}

/// A SYN-ACK of the container's that comes in on an uplink is forged (the
/// container answers from its own side): it does not set the container's
/// mark, so that an ACK of it establishes nothing.
#[test]
fn a_syn_ack_from_outside_sets_no_mark() {
    let Some(tc) = load("a_syn_ack_from_outside_sets_no_mark") else {
        return;
    };
    let forged = at(CLIENT_V4, 40064);
    answered(&tc, forged);
    let elsewhere = CONTAINER_ISN + 3_000_000;
    tc.run(
        UPLINK_IN,
        &segment(
            (container(), forged),
            TCP_SYN | TCP_ACK,
            (elsewhere, CLIENT_ISN + 1),
            &[],
        ),
    );
    assert!(
        !acked_establishes(&tc, forged, elsewhere + 1),
        "{:?}",
        conntrack_flags(&tc)
    );
    assert!(acked_establishes(&tc, forged, CONTAINER_ISN + 1));
}

/// The interface through which `behind_link`'s mapping reaches its
/// container: not the one a test run's packets come in on (the loopback
/// device, 1), nor any of the test's namespace.
const CONTAINER_LINK: u32 = 1_000_000;
/// The loopback device: the interface a test run's packets come in on.
const TEST_RUN_LINK: u32 = 1;

/// `load` with the mapping's container reached through interface `link`.
fn behind_link(test: &str, link: u32) -> Option<Tc> {
    let mapping = Mapping {
        ifindex: link,
        ..mapping(Protocol::Tcp, dialed(), container())
    };
    Tc::load_with(test, &[mapping])
}

/// The container's SYN-ACK to `client`, with the sequence number `isn`.
fn container_syn_ack(client: SocketAddr, isn: u32) -> Vec<u8> {
    segment(
        (container(), client),
        TCP_SYN | TCP_ACK,
        (isn, CLIENT_ISN + 1),
        &[],
    )
}

/// A packet in the container's name that comes in on an uplink, when the
/// mapping reaches its container through another interface, is forged: it
/// is dropped and counted, and sets nothing. Before, a container that did
/// not answer (stopped, or its listen queue full under a SYN flood) let a
/// forger's SYN, a SYN-ACK in the container's name from the client's link
/// and an ACK of it establish the flow: long-lived entries for three packets.
#[test]
fn a_containers_answer_from_an_uplink_is_forged() {
    const TEST: &str = "a_containers_answer_from_an_uplink_is_forged";
    let Some(tc) = behind_link(TEST, CONTAINER_LINK) else {
        return;
    };
    let forged = at(CLIENT_V4, 40066);
    client_syn(&tc, forged);
    let answer = container_syn_ack(forged, CONTAINER_ISN);
    let before = tc.stat(Stat::DroppedContainerSource);
    assert_eq!(tc.run(UPLINK_IN, &answer), (DROP, answer.clone()));
    assert_eq!(tc.stat(Stat::DroppedContainerSource), before + 1);
    assert!(
        !acked_establishes(&tc, forged, CONTAINER_ISN + 1),
        "{:?}",
        conntrack_flags(&tc)
    );
    // The container's own answer, from its link.
    let isn = CONTAINER_ISN + 5_000_000;
    tc.run(BACKEND_IN, &container_syn_ack(forged, isn));
    assert!(acked_establishes(&tc, forged, isn + 1));
}

/// A container reached through an uplink (the route to it goes there)
/// answers through that uplink: its packets are translated there, and are
/// its own as on any container link: its SYN-ACK sets its mark afresh
/// before the flow is established (the TIME_WAIT case of
/// `a_containers_syn_ack_sets_its_mark_before_the_flow_is_established`).
/// Before, any SYN-ACK that came in on an uplink was taken for forged, and
/// that flow never became established.
#[test]
fn a_container_behind_an_uplink_answers_through_it() {
    const TEST: &str = "a_container_behind_an_uplink_answers_through_it";
    let Some(tc) = behind_link(TEST, TEST_RUN_LINK) else {
        return;
    };
    let client = at(CLIENT_V4, 40068);
    client_syn(&tc, client);
    let (_, out) = tc.run(UPLINK_IN, &container_syn_ack(client, CONTAINER_ISN));
    assert_eq!(
        out,
        segment(
            (dialed(), client),
            TCP_SYN | TCP_ACK,
            (CONTAINER_ISN, CLIENT_ISN + 1),
            &[]
        )
    );
    assert!(acked_establishes(&tc, client, CONTAINER_ISN + 1));

    // A client reusing its port against the container's TIME_WAIT socket,
    // all through the uplink.
    let Some(tc) = behind_link(TEST, TEST_RUN_LINK) else {
        return;
    };
    let client = at(CLIENT_V4, 40069);
    reuse_against_time_wait(&tc, client, UPLINK_IN);
    assert!(
        acked_establishes(&tc, client, CONTAINER_ISN + 1),
        "{:?}",
        conntrack_flags(&tc)
    );
}

/// A forged packet in the container's name from an uplink is dropped before
/// it does anything to the flow: before, the check that looks for an entry's
/// lost twin (once a second of the entry's quiet) ran first, and refreshed
/// the client's entry's idle timer: a forger on the client's link kept an
/// abandoned flow's entry alive with a packet a second.
#[test]
fn a_forged_answer_from_an_uplink_refreshes_nothing() {
    const TEST: &str = "a_forged_answer_from_an_uplink_refreshes_nothing";
    let Some(mut tc) = behind_link(TEST, CONTAINER_LINK) else {
        return;
    };
    let client = at(CLIENT_V4, 40070);
    answered(&tc, client);
    assert!(acked_establishes(&tc, client, CONTAINER_ISN + 1));
    // Both entries quiet for 2 s: the next packet of either asks for its twin.
    change_entries(&mut tc, |value| {
        value.last_seen_ns = value.last_seen_ns.saturating_sub(2_000_000_000);
    });
    let quiet = of_every_entry(&tc, |value| value.last_seen_ns);
    let forged = segment(
        (container(), client),
        TCP_ACK,
        (CONTAINER_ISN + 1, CLIENT_AFTER),
        &[],
    );
    assert_eq!(tc.run(UPLINK_IN, &forged), (DROP, forged.clone()));
    assert_eq!(
        of_every_entry(&tc, |value| value.last_seen_ns),
        quiet,
        "an entry's idle timer moved"
    );
}

/// The container's response to `REQUEST`, 3 bytes.
const RESPONSE: &[u8] = b"OK!";

/// Where each side is after `exchanged`: the client's and the container's
/// next sequence numbers.
const CLIENT_AFTER: u32 = CLIENT_ISN + 1 + REQUEST.len() as u32;
const CONTAINER_AFTER: u32 = CONTAINER_ISN + 1 + RESPONSE.len() as u32;

/// A flow of `client`, established, its request sent and answered.
fn exchanged(tc: &Tc, client: SocketAddr) {
    answered(tc, client);
    assert!(acked_establishes(tc, client, CONTAINER_ISN + 1));
    tc.run(
        BACKEND_IN,
        &segment(
            (container(), client),
            TCP_ACK,
            (CONTAINER_ISN + 1, CLIENT_AFTER),
            RESPONSE,
        ),
    );
}

/// One segment of the flow, without data: from the client or from the
/// container, its flags, sequence and acknowledgment numbers; the
/// translated segment out (and the verdict, for the client's).
fn flow_step(tc: &Tc, client: SocketAddr, from_client: bool, flags: u8, seq_ack: (u32, u32)) {
    let (program, ends, out_ends) = if from_client {
        (UPLINK_IN, (client, dialed()), (client, container()))
    } else {
        (BACKEND_IN, (container(), client), (dialed(), client))
    };
    let (verdict, out) = tc.run(program, &segment(ends, flags, seq_ack, &[]));
    assert_eq!(out, segment(out_ends, flags, seq_ack, &[]), "translated");
    if from_client {
        assert_eq!(verdict, TO_STACK);
    }
}

/// A flow whose sides both closed cleanly is forgotten at its last packet,
/// the ACK of the second FIN (itself translated), when the first FIN was
/// acknowledged too: each FIN's end is its side's mark, and each ACK must
/// acknowledge it exactly. Both orders of closing. Before, both entries
/// stayed for the 10 s closing time and until the holder's sweep took them
/// (3–20 s later): above about 13,000 new connections per second the table
/// filled with ended flows, and the LRU evicted live idle flows to make
/// room. Flows that close otherwise keep their closing time: FINs that
/// cross (neither acknowledges the other's), and a last ACK that does not
/// acknowledge the FIN exactly.
#[test]
fn a_flow_that_closes_cleanly_is_forgotten_at_its_last_ack() {
    const TEST: &str = "a_flow_that_closes_cleanly_is_forgotten_at_its_last_ack";
    let Some(tc) = load(TEST) else {
        return;
    };
    let (c, s) = (CLIENT_AFTER, CONTAINER_AFTER);
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;

    // The client closes first; the container acknowledges its FIN with its
    // own.
    let client = at(CLIENT_V4, 40070);
    exchanged(&tc, client);
    flow_step(&tc, client, true, FIN_ACK, (c, s));
    flow_step(&tc, client, false, FIN_ACK, (s, c + 1));
    assert_eq!(conntrack_flags(&tc).len(), 2, "before the last ACK");
    flow_step(&tc, client, true, TCP_ACK, (c + 1, s + 1));
    assert_eq!(conntrack_flags(&tc), Vec::<u8>::new(), "client first");

    // The container closes first; the client acknowledges its FIN, then
    // sends its own.
    let client = at(CLIENT_V4, 40071);
    exchanged(&tc, client);
    flow_step(&tc, client, false, FIN_ACK, (s, c));
    flow_step(&tc, client, true, TCP_ACK, (c, s + 1));
    flow_step(&tc, client, true, FIN_ACK, (c, s + 1));
    assert_eq!(conntrack_flags(&tc).len(), 2, "before the last ACK");
    flow_step(&tc, client, false, TCP_ACK, (s + 1, c + 1));
    assert_eq!(conntrack_flags(&tc), Vec::<u8>::new(), "container first");

    // FINs that cross: each side's ACK of the other's comes after both.
    let client = at(CLIENT_V4, 40072);
    exchanged(&tc, client);
    flow_step(&tc, client, true, FIN_ACK, (c, s));
    flow_step(&tc, client, false, FIN_ACK, (s, c));
    flow_step(&tc, client, true, TCP_ACK, (c + 1, s + 1));
    flow_step(&tc, client, false, TCP_ACK, (s + 1, c + 1));
    assert!(closing(&tc), "crossed: {:?}", conntrack_flags(&tc));

    // A last ACK that acknowledges something else than the FIN.
    let Some(tc) = load(TEST) else {
        return;
    };
    let client = at(CLIENT_V4, 40073);
    exchanged(&tc, client);
    flow_step(&tc, client, true, FIN_ACK, (c, s));
    flow_step(&tc, client, false, FIN_ACK, (s, c + 1));
    flow_step(&tc, client, true, TCP_ACK, (c + 1, s + 1 + 1_000));
    assert!(closing(&tc), "not exact: {:?}", conntrack_flags(&tc));
}

/// Ages both entries of the flow by `ns`: their last packet, and once the
/// flow closes, its closing time.
fn age(tc: &mut Tc, ns: u64) {
    change_entries(tc, |value| {
        value.last_seen_ns -= ns;
        if value.flags & CT_FLAG_CLOSING != 0 {
            value.closing_or_progress -= ns;
        }
    });
}

/// Longer than the closing time (`CT_TCP_CLOSING_NS`, 10 s).
const PAST_CLOSING_NS: u64 = CT_TCP_CLOSING_NS + 1_000_000_000;

/// Whether the client's next segment after `exchanged` (one byte at `seq`)
/// is translated to the container, as a packet of a live flow.
fn client_data_translated(tc: &Tc, client: SocketAddr, seq: u32) -> bool {
    let seq_ack = (seq, CONTAINER_AFTER);
    let (_, out) = tc.run(
        UPLINK_IN,
        &segment((client, dialed()), TCP_ACK, seq_ack, b"x"),
    );
    out == segment((client, container()), TCP_ACK, seq_ack, b"x")
}

/// A reset from where its sender's side is, but not at its end, may be
/// forged (a blind forger's lucky guess, one in about 44,000 tries): the
/// receiving stack then keeps its connection and answers with a challenge
/// ACK (RFC 5961), and the flow must go on. Netfilter keeps such a flow
/// established for the same reason. Before, any reset near its side
/// closed the flow, which ended 10 s later while both sockets lived on.
/// In the client's name (the container answers) and in the container's
/// (the client answers).
#[test]
fn a_reset_the_other_side_answers_leaves_the_flow_open() {
    const TEST: &str = "a_reset_the_other_side_answers_leaves_the_flow_open";
    let Some(mut tc) = load(TEST) else {
        return;
    };
    let client = at(CLIENT_V4, 40074);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER + 1_000);
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
    let challenge_ack = (CONTAINER_AFTER, CLIENT_AFTER);
    flow_step(&tc, client, false, TCP_ACK, challenge_ack);
    assert!(open(&tc), "{:?}", ends(&tc));
    age(&mut tc, PAST_CLOSING_NS);
    assert!(
        client_data_translated(&tc, client, CLIENT_AFTER),
        "in the client's name: {:?}",
        conntrack_flags(&tc)
    );

    let Some(mut tc) = load(TEST) else {
        return;
    };
    let client = at(CLIENT_V4, 40075);
    exchanged(&tc, client);
    flow_step(&tc, client, false, TCP_RST, (CONTAINER_AFTER + 1_000, 0));
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
    let challenge_ack = (CLIENT_AFTER, CONTAINER_AFTER);
    flow_step(&tc, client, true, TCP_ACK, challenge_ack);
    assert!(open(&tc), "{:?}", ends(&tc));
    age(&mut tc, PAST_CLOSING_NS);
    assert!(
        client_data_translated(&tc, client, CLIENT_AFTER),
        "in the container's name: {:?}",
        conntrack_flags(&tc)
    );
}

/// A genuine reset: the receiving socket is gone, and what the other side
/// still had under way (the container's data sent before the reset
/// arrived) is answered with another reset. The flow ends after the
/// closing time.
#[test]
fn a_reset_nothing_answers_ends_the_flow_after_the_closing_time() {
    let Some(mut tc) = load("a_reset_nothing_answers_ends_the_flow_after_the_closing_time") else {
        return;
    };
    let client = at(CLIENT_V4, 40076);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER);
    tc.run(
        BACKEND_IN,
        &segment(
            (container(), client),
            TCP_ACK,
            (CONTAINER_AFTER, CLIENT_AFTER),
            b"late",
        ),
    );
    client_reset(&tc, client, CLIENT_AFTER);
    age(&mut tc, PAST_CLOSING_NS);
    let untracked = tc.stat(Stat::UntrackedMidflow);
    assert!(
        !client_data_translated(&tc, client, CLIENT_AFTER),
        "{:?}",
        conntrack_flags(&tc)
    );
    assert_eq!(tc.stat(Stat::UntrackedMidflow), untracked + 1);
}

/// A client that resets its connection and dials again from the same port
/// (as a load generator closing with `SO_LINGER` 0 does): its SYN meets a
/// flow marked by the reset, which it passes on to the container and
/// changes nothing of (a SYN on a live flow may be forged, see
/// `a_forged_syn_and_reset_after_a_lucky_reset_do_not_end_the_flow`). The
/// container, whose connection the reset ended, answers with a SYN-ACK:
/// that starts the flow again, at the new connection's numbers, and the
/// client's ACK establishes it. The new connection's own reset fits.
#[test]
fn a_syn_after_a_reset_opens_a_new_flow() {
    let Some(tc) = load("a_syn_after_a_reset_opens_a_new_flow") else {
        return;
    };
    let client = at(CLIENT_V4, 40077);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER);
    let (client_isn, container_isn) = (CLIENT_ISN + 5_000_000, CONTAINER_ISN + 7_000_000);
    client_syn_at(&tc, client, client_isn);
    assert!(
        reset_marked(&tc),
        "the SYN changes nothing: {:?}",
        ends(&tc)
    );
    flow_step(
        &tc,
        client,
        false,
        TCP_SYN | TCP_ACK,
        (container_isn, client_isn + 1),
    );
    assert!(
        open(&tc) && !established(&tc),
        "started again: {:?}",
        conntrack_flags(&tc)
    );
    tc.run(
        UPLINK_IN,
        &segment(
            (client, dialed()),
            TCP_ACK,
            (client_isn + 1, container_isn + 1),
            REQUEST,
        ),
    );
    assert!(established(&tc), "{:?}", conntrack_flags(&tc));
    client_reset(&tc, client, client_isn + 1 + REQUEST.len() as u32);
    assert!(
        reset_marked(&tc),
        "the new connection's reset: {:?}",
        ends(&tc)
    );
}

/// Only a packet from where its side is takes a reset back: one sent
/// blind in the client's name (a sequence number elsewhere), after the
/// client's genuine reset, leaves the flow to end after the closing time,
/// as netfilter keeps only packets within the window. Before, any packet
/// took it back, and the flow lived on for the idle timeout.
#[test]
fn a_packet_from_elsewhere_does_not_take_a_reset_back() {
    let Some(mut tc) = load("a_packet_from_elsewhere_does_not_take_a_reset_back") else {
        return;
    };
    let client = at(CLIENT_V4, 40078);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER);
    let elsewhere = CLIENT_AFTER + 1_000_000;
    assert!(client_data_translated(&tc, client, elsewhere), "passed on");
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
    age(&mut tc, PAST_CLOSING_NS);
    assert!(!client_data_translated(&tc, client, CLIENT_AFTER));
}

/// A reset whose flow lost the write that established its reply entry
/// (another CPU's update, `conntrack::check_twin` makes it good within a
/// second) is judged as the flow's: it marks the flow, as on any
/// established flow, instead of closing it.
#[test]
fn a_reset_is_judged_by_the_flow_not_by_one_entry() {
    let Some(mut tc) = load("a_reset_is_judged_by_the_flow_not_by_one_entry") else {
        return;
    };
    let client = at(CLIENT_V4, 40079);
    exchanged(&tc, client);
    change_entries(&mut tc, |value| {
        if value.flags & CT_FLAG_REPLY != 0 {
            value.flags &= !CT_FLAG_ESTABLISHED;
        }
    });
    flow_step(&tc, client, false, TCP_RST, (CONTAINER_AFTER + 1_000, 0));
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
}

/// A reset's mark left on one entry after the flow took the reset back (a
/// write lost to another CPU's) is cleared by the other entry's next check
/// of its twin (once a second), so that the flow does not end at its first
/// 10 s of silence.
#[test]
fn a_reset_mark_left_on_one_entry_is_cleared() {
    let Some(mut tc) = load("a_reset_mark_left_on_one_entry_is_cleared") else {
        return;
    };
    let client = at(CLIENT_V4, 40080);
    exchanged(&tc, client);
    change_entries(&mut tc, |value| {
        if value.flags & CT_FLAG_REPLY == 0 {
            value.more_flags |= CT_MORE_RESET;
        }
        value.last_seen_ns -= 2_000_000_000;
    });
    flow_step(&tc, client, false, TCP_ACK, (CONTAINER_AFTER, CLIENT_AFTER));
    assert!(open(&tc), "{:?}", ends(&tc));
    age(&mut tc, PAST_CLOSING_NS);
    assert!(client_data_translated(&tc, client, CLIENT_AFTER));
}

/// A client that resets its connection and dials again from the same port
/// after its mapping moved to another container: the SYN forgets the old
/// flow, both entries, and opens one to the new container at once
/// (`tc::translate::reopens`; `reopen` cannot take the old entries over:
/// their keys name the old container). The flow is not closing, but its
/// mapping moved: any packet of it would stop it.
#[test]
fn a_syn_after_a_reset_goes_where_the_mapping_now_points() {
    let Some(mut tc) = load("a_syn_after_a_reset_goes_where_the_mapping_now_points") else {
        return;
    };
    let client = at(CLIENT_V4, 40081);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER);
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
    let moved = at(OTHER_CTR_V4, 80);
    tc.publish(&[mapping(Protocol::Tcp, dialed(), moved)]);
    tc.move_services_generation(1);
    let isn = CLIENT_ISN + 5_000_000;
    assert_eq!(
        tc.run(
            UPLINK_IN,
            &segment((client, dialed()), TCP_SYN, (isn, 0), &[])
        ),
        (TO_STACK, segment((client, moved), TCP_SYN, (isn, 0), &[])),
        "the SYN opens a flow to the new container"
    );
    assert!(
        open(&tc),
        "the new flow's two entries only: {:?}",
        ends(&tc)
    );
    assert!(
        of_every_entry(&tc, |value| value.nat_addr.to_ip(FAMILY_V4)).contains(&Some(moved.ip())),
        "the forward entry translates to the new container"
    );
}

/// A SYN forged right after a lucky reset (both in the client's name), at
/// a sequence number of the forger's choosing: the flow is not closing, so
/// the SYN passes on and changes nothing. The container, whose connection
/// lives, answers with an ACK, which takes the reset back; the flow goes
/// on, and the forger's next reset, at its own number, does not fit, while
/// the client's does. (Before, the SYN reopened the flow at the forger's
/// number, and a reset there right behind it closed the flow:
/// `a_forged_syn_and_reset_after_a_lucky_reset_do_not_end_the_flow`.)
#[test]
fn a_forged_syn_after_a_reset_does_not_choose_the_clients_mark() {
    let Some(tc) = load("a_forged_syn_after_a_reset_does_not_choose_the_clients_mark") else {
        return;
    };
    let client = at(CLIENT_V4, 40082);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER + 1_000);
    let forged_isn = CLIENT_ISN + 5_000_000;
    client_syn_at(&tc, client, forged_isn);
    flow_step(&tc, client, false, TCP_ACK, (CONTAINER_AFTER, CLIENT_AFTER));
    flow_step(&tc, client, true, TCP_ACK, (CLIENT_AFTER, CONTAINER_AFTER));
    assert!(
        established(&tc),
        "established again: {:?}",
        conntrack_flags(&tc)
    );
    client_reset(&tc, client, forged_isn + 1);
    assert!(open(&tc), "the forger's reset: {:?}", ends(&tc));
    client_reset(&tc, client, CLIENT_AFTER);
    assert!(reset_marked(&tc), "the client's reset: {:?}", ends(&tc));
}

/// A client that resets its connection and dials again from the same port
/// at once: its SYN passes on the flow marked by the reset, and a segment
/// the container had sent before the reset reached it comes after, from
/// where the container is, and takes the mark back. The container's SYN-ACK
/// then starts the flow again at the new connection's numbers: its client's
/// ACK establishes it, and its reset fits.
#[test]
fn a_syn_ack_after_a_late_answer_sets_the_clients_mark() {
    let Some(tc) = load("a_syn_ack_after_a_late_answer_sets_the_clients_mark") else {
        return;
    };
    let client = at(CLIENT_V4, 40083);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER);
    let (client_isn, container_isn) = (CLIENT_ISN + 5_000_000, CONTAINER_ISN + 7_000_000);
    client_syn_at(&tc, client, client_isn);
    tc.run(
        BACKEND_IN,
        &segment(
            (container(), client),
            TCP_ACK,
            (CONTAINER_AFTER, CLIENT_AFTER),
            b"late",
        ),
    );
    flow_step(
        &tc,
        client,
        false,
        TCP_SYN | TCP_ACK,
        (container_isn, client_isn + 1),
    );
    flow_step(
        &tc,
        client,
        true,
        TCP_ACK,
        (client_isn + 1, container_isn + 1),
    );
    assert!(established(&tc), "{:?}", conntrack_flags(&tc));
    client_reset(&tc, client, client_isn + 1);
    assert!(reset_marked(&tc), "the client's reset: {:?}", ends(&tc));
}

/// A reset on a flow that lost its other entry (evicted) closes it: no
/// packet of the other side could take the reset back, nor be translated.
/// And a reset on a half-closed flow (the client's FIN acknowledged, the
/// container still sending) marks it as on any established flow.
#[test]
fn a_reset_without_the_other_entry_closes_and_after_a_fin_marks() {
    const TEST: &str = "a_reset_without_the_other_entry_closes_and_after_a_fin_marks";
    let Some(mut tc) = load(TEST) else {
        return;
    };
    let client = at(CLIENT_V4, 40084);
    exchanged(&tc, client);
    remove_entries(&mut tc, |_, value| value.flags & CT_FLAG_REPLY != 0);
    client_reset(&tc, client, CLIENT_AFTER);
    assert_eq!(
        of_every_entry(&tc, |value| (
            value.flags & CT_FLAG_CLOSING != 0,
            value.more_flags & CT_MORE_RESET != 0
        )),
        [(true, false)],
        "the forward entry alone"
    );

    let Some(tc) = load(TEST) else {
        return;
    };
    exchanged(&tc, client);
    flow_step(
        &tc,
        client,
        true,
        TCP_FIN | TCP_ACK,
        (CLIENT_AFTER, CONTAINER_AFTER),
    );
    flow_step(
        &tc,
        client,
        false,
        TCP_ACK,
        (CONTAINER_AFTER, CLIENT_AFTER + 1),
    );
    flow_step(&tc, client, false, TCP_RST, (CONTAINER_AFTER, 0));
    assert!(reset_marked(&tc), "half-closed: {:?}", ends(&tc));
}

/// A SYN forged in the client's name on a half-closed flow (the client sent
/// its FIN and waits for a slow answer), followed at once by a reset at the
/// SYN's number: a client whose connection lives sends no SYN, and
/// netfilter ignores a SYN on such a flow. The SYN passes on to the
/// container (which answers it with a challenge ACK) and changes nothing:
/// the forger's reset does not fit, and the flow keeps its FIN. Before,
/// the SYN started the flow over at the forger's number, and the reset,
/// both sent blind, closed it: 10 s later the flow was gone.
#[test]
fn a_forged_syn_and_reset_on_a_half_closed_flow_change_nothing() {
    let Some(mut tc) = load("a_forged_syn_and_reset_on_a_half_closed_flow_change_nothing") else {
        return;
    };
    let client = at(CLIENT_V4, 40085);
    exchanged(&tc, client);
    flow_step(
        &tc,
        client,
        true,
        TCP_FIN | TCP_ACK,
        (CLIENT_AFTER, CONTAINER_AFTER),
    );
    flow_step(
        &tc,
        client,
        false,
        TCP_ACK,
        (CONTAINER_AFTER, CLIENT_AFTER + 1),
    );
    let forged_isn = CLIENT_ISN + 5_000_000;
    client_syn_at(&tc, client, forged_isn);
    client_reset(&tc, client, forged_isn + 1);
    assert!(open(&tc), "{:?}", ends(&tc));
    assert!(
        of_every_entry(&tc, |value| value.flags & (CT_FLAG_REPLY | CT_FLAG_FIN))
            .contains(&CT_FLAG_FIN),
        "the client's FIN is kept: {:?}",
        conntrack_flags(&tc)
    );
    age(&mut tc, PAST_CLOSING_NS);
    // The container's slow answer still goes out translated.
    flow_step(
        &tc,
        client,
        false,
        TCP_ACK,
        (CONTAINER_AFTER, CLIENT_AFTER + 1),
    );
}

/// A forger's lucky reset (one in about 44,000 blind tries) marks the flow;
/// a SYN and a reset at its number sent right behind it, before the
/// container's challenge ACK takes the mark back, must not end the flow
/// either. The SYN changes nothing (as on any flow that is not closing),
/// the second reset does not fit, and the challenge ACK takes the mark
/// back. Before, the SYN started the flow over at the forger's number and
/// its reset closed it.
#[test]
fn a_forged_syn_and_reset_after_a_lucky_reset_do_not_end_the_flow() {
    let Some(mut tc) = load("a_forged_syn_and_reset_after_a_lucky_reset_do_not_end_the_flow")
    else {
        return;
    };
    let client = at(CLIENT_V4, 40086);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER + 1_000);
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
    let forged_isn = CLIENT_ISN + 5_000_000;
    client_syn_at(&tc, client, forged_isn);
    client_reset(&tc, client, forged_isn + 1);
    // The container's challenge ACK.
    flow_step(&tc, client, false, TCP_ACK, (CONTAINER_AFTER, CLIENT_AFTER));
    assert!(open(&tc), "{:?}", ends(&tc));
    assert!(established(&tc), "{:?}", conntrack_flags(&tc));
    age(&mut tc, PAST_CLOSING_NS);
    assert!(client_data_translated(&tc, client, CLIENT_AFTER));
}

/// After a genuine reset, packets sent blind from elsewhere (a sequence
/// number far from the client's) neither take the reset back nor keep the
/// flow's entries alive: as netfilter refreshes no timeout on a packet
/// outside the window, the flow ends the closing time after its last
/// packet from where a side is. Before, each blind packet refreshed the
/// entries, and one every 9 s kept the dead flow for good.
#[test]
fn packets_from_elsewhere_do_not_keep_a_reset_flow_alive() {
    let Some(mut tc) = load("packets_from_elsewhere_do_not_keep_a_reset_flow_alive") else {
        return;
    };
    let client = at(CLIENT_V4, 40087);
    exchanged(&tc, client);
    client_reset(&tc, client, CLIENT_AFTER);
    let elsewhere = CLIENT_AFTER + 1_000_000;
    age(&mut tc, 6_000_000_000);
    assert!(client_data_translated(&tc, client, elsewhere), "passed on");
    assert!(reset_marked(&tc), "{:?}", ends(&tc));
    age(&mut tc, 6_000_000_000);
    assert!(
        !client_data_translated(&tc, client, CLIENT_AFTER),
        "ended 12 s after the reset: {:?}",
        conntrack_flags(&tc)
    );
}

/// A SYN-ACK in the container's name on an established flow, forged (by a
/// neighbour on the container's link, which cannot know the client's
/// numbers), or a retransmission of the flow's own: it acknowledges no SYN
/// of the client's that passed on the flow, and changes nothing. Before,
/// any SYN-ACK started the flow again, where a forged reset at the
/// SYN-ACK's number then closed it. The client's SYN that passes is
/// remembered, and the SYN-ACK that acknowledges it starts the flow again
/// (`a_syn_after_a_reset_opens_a_new_flow`).
#[test]
fn a_syn_ack_that_acknowledges_no_passed_syn_changes_nothing() {
    let Some(tc) = load("a_syn_ack_that_acknowledges_no_passed_syn_changes_nothing") else {
        return;
    };
    let client = at(CLIENT_V4, 40088);
    exchanged(&tc, client);
    let restarted = tc.stat(Stat::FlowRestarted);
    let forged_isn = CONTAINER_ISN + 9_000_000;
    flow_step(
        &tc,
        client,
        false,
        TCP_SYN | TCP_ACK,
        (forged_isn, CLIENT_AFTER + 5_000),
    );
    flow_step(
        &tc,
        client,
        false,
        TCP_SYN | TCP_ACK,
        (CONTAINER_ISN, CLIENT_ISN + 1),
    );
    assert_eq!(tc.stat(Stat::FlowRestarted), restarted);
    assert!(established(&tc) && open(&tc), "{:?}", conntrack_flags(&tc));
    flow_step(&tc, client, false, TCP_RST, (forged_isn + 1, 0));
    assert!(open(&tc), "the forger's reset: {:?}", ends(&tc));
    // A client's SYN passes; a SYN-ACK of anything else still changes
    // nothing.
    client_syn_at(&tc, client, CLIENT_ISN + 5_000_000);
    flow_step(
        &tc,
        client,
        false,
        TCP_SYN | TCP_ACK,
        (forged_isn, CLIENT_ISN + 5_000_002),
    );
    assert_eq!(tc.stat(Stat::FlowRestarted), restarted);
    assert!(established(&tc), "{:?}", conntrack_flags(&tc));
}
