//! Cases for a container's packets to a host address: a connection of
//! the host's own, passed at once, and a hairpin flow's, translated. While
//! the conntrack holds no masqueraded flow (the sweep's mark in
//! `pf_masq_flows`), both TCP and UDP pass without the conntrack lookup;
//! a hairpin flow started after the mark makes them go through it again.
//! A hit there asks the host's sockets: a host connection over a closed
//! hairpin flow's ends is the host's. A hairpin flow's ports, reused while
//! it closes, start a new flow.

use std::net::SocketAddr;

use portfwd_common::{CONNTRACK, CT_FLAG_MASQ, CT_FLAG_REPLY, Stat};

use super::tc_fixture::{
    BACKEND_IN, CTR_V4, HOST_V4, L4, NEXT, OTHER_CTR_V4, REDIRECT, TO_STACK, Tc, at,
    connection_in_own_namespace, conntrack_flags, flags_in, frame, mapping,
};
use crate::model::Protocol;

/// A host connection's packet, which no flow holds: only the mark passes
/// it before the conntrack lookup, as a host connection's.
fn host_connection_packet() -> Vec<u8> {
    frame(at(OTHER_CTR_V4, 80), at(HOST_V4, 45000), L4::Ack)
}

#[test]
fn host_connections_skip_the_conntrack_only_while_no_masqueraded_flow_exists() {
    let published = mapping(Protocol::Tcp, at(HOST_V4, 8080), at(OTHER_CTR_V4, 80));
    let Some(mut tc) = Tc::load_with(
        "host_connections_skip_the_conntrack_only_while_no_masqueraded_flow_exists",
        &[published],
    ) else {
        return;
    };
    tc.record_host_address(HOST_V4.into());
    let passed = |tc: &Tc| tc.stat(Stat::PassHostConnection);

    // A new map says nothing: the packet goes on to the conntrack, which
    // has no flow of it, and passes uncounted.
    let (verdict, _) = tc.run(BACKEND_IN, &host_connection_packet());
    assert_eq!((verdict, passed(&tc)), (NEXT, 0), "before any sweep");

    // The sweep found no masqueraded flow: passed at once.
    tc.mark_no_masq_flow();
    let (verdict, _) = tc.run(BACKEND_IN, &host_connection_packet());
    assert_eq!(
        (verdict, passed(&tc)),
        (NEXT, 1),
        "after a sweep found none"
    );

    // A hairpin flow: a container dials the published address. Its reply
    // (the other container's SYN-ACK to the host address it was
    // masqueraded to) has the shape of a host connection's packet, and the
    // mark no longer holds: translated back to the dialing container.
    let client = at(CTR_V4, 40000);
    let (verdict, to_container) = tc.run(BACKEND_IN, &frame(client, at(HOST_V4, 8080), L4::Syn));
    assert_eq!(verdict, TO_STACK, "the hairpin SYN, translated");
    assert_eq!(
        to_container,
        frame(at(HOST_V4, 40000), at(OTHER_CTR_V4, 80), L4::Syn),
        "masqueraded to the host address, keeping its port"
    );
    let reply = frame(at(OTHER_CTR_V4, 80), at(HOST_V4, 40000), L4::Ack);
    let (verdict, to_client) = tc.run(BACKEND_IN, &reply);
    assert_eq!(
        (verdict, to_client),
        (REDIRECT, frame(at(HOST_V4, 8080), client, L4::Ack)),
        "the hairpin reply, translated back"
    );
    assert_eq!(tc.masq_flows_started(), 1, "the hairpin flow is counted");
    let (verdict, _) = tc.run(BACKEND_IN, &host_connection_packet());
    assert_eq!(
        (verdict, passed(&tc)),
        (NEXT, 1),
        "a host connection's packet goes through the conntrack again"
    );

    // The next sweep that finds none (the hairpin flow gone) marks again.
    tc.mark_no_masq_flow();
    tc.run(BACKEND_IN, &host_connection_packet());
    assert_eq!(passed(&tc), 2, "after the next sweep found none");
}

/// A container's datagrams to a host address on a port that no mapping
/// publishes (the answers to a host process's datagrams through the socket
/// path, or the container's queries to a host service) leave before the
/// conntrack lookup while it holds no masqueraded flow; a hairpin UDP
/// flow's replies have the same shape, and go through the conntrack again
/// once one started.
#[test]
fn host_datagrams_skip_the_conntrack_only_while_no_masqueraded_flow_exists() {
    let published = at(HOST_V4, 5353);
    let service = at(OTHER_CTR_V4, 53);
    let Some(mut tc) = Tc::load_with(
        "host_datagrams_skip_the_conntrack_only_while_no_masqueraded_flow_exists",
        &[mapping(Protocol::Udp, published, service)],
    ) else {
        return;
    };
    tc.record_host_address(HOST_V4.into());
    let passed = |tc: &Tc| tc.stat(Stat::PassHostConnection);
    let answer = frame(service, at(HOST_V4, 45000), L4::Udp);

    let (verdict, _) = tc.run(BACKEND_IN, &answer);
    assert_eq!((verdict, passed(&tc)), (NEXT, 0), "before any sweep");
    tc.mark_no_masq_flow();
    let (verdict, _) = tc.run(BACKEND_IN, &answer);
    assert_eq!(
        (verdict, passed(&tc)),
        (NEXT, 1),
        "after a sweep found none"
    );
    let (verdict, _) = tc.run(BACKEND_IN, &frame(at(CTR_V4, 40000), published, L4::Udp));
    assert_eq!(
        (verdict, passed(&tc)),
        (TO_STACK, 1),
        "a datagram to the published port opens a hairpin flow"
    );
    let reply = frame(service, at(HOST_V4, 40000), L4::Udp);
    assert_eq!(
        tc.run(BACKEND_IN, &reply),
        (REDIRECT, frame(published, at(CTR_V4, 40000), L4::Udp)),
        "the hairpin flow's reply, translated back"
    );
    let (verdict, _) = tc.run(BACKEND_IN, &answer);
    assert_eq!(
        (verdict, passed(&tc)),
        (NEXT, 1),
        "a host exchange's datagram goes through the conntrack again"
    );
}

/// A container dials the published address again from the port of its
/// hairpin flow, which a RST closed, after the mapping moved (here to the
/// dialing container itself): the SYN finds the closing flow's forward
/// entry, but a masqueraded flow is not taken over in place (that is for an
/// external client's flow, `conntrack::reopen`), so the old flow's two
/// entries go (`conntrack::forget`) and the new flow's two come. Left
/// behind, the old reply entry would translate the old container's late
/// packets into the new connection.
#[test]
fn a_hairpin_syn_on_a_closing_flows_ports_forgets_the_old_flow() {
    let published = at(HOST_V4, 8080);
    let (client, masqueraded) = (at(CTR_V4, 40001), at(HOST_V4, 40001));
    let (old, new) = (at(OTHER_CTR_V4, 80), at(CTR_V4, 80));
    let Some(mut tc) = Tc::load_with(
        "a_hairpin_syn_on_a_closing_flows_ports_forgets_the_old_flow",
        &[mapping(Protocol::Tcp, published, old)],
    ) else {
        return;
    };
    let syn = frame(client, published, L4::Syn);
    assert_eq!(
        tc.run(BACKEND_IN, &syn),
        (TO_STACK, frame(masqueraded, old, L4::Syn)),
        "the hairpin SYN"
    );
    assert_eq!(
        tc.run(BACKEND_IN, &frame(client, published, L4::Rst)),
        (TO_STACK, frame(masqueraded, old, L4::Rst)),
        "the dialing container's RST"
    );
    assert_eq!(conntrack_flags(&tc).len(), 2, "the closing hairpin flow");

    tc.publish(&[mapping(Protocol::Tcp, published, new)]);
    tc.move_services_generation(1);
    let flows = tc.stat(Stat::FlowNew);
    assert_eq!(
        tc.run(BACKEND_IN, &syn),
        (TO_STACK, frame(masqueraded, new, L4::Syn)),
        "the SYN on the closing flow's ports"
    );
    assert_eq!(tc.stat(Stat::FlowNew), flows + 1, "a new flow");
    assert_eq!(
        conntrack_flags(&tc),
        [CT_FLAG_MASQ, CT_FLAG_MASQ | CT_FLAG_REPLY],
        "the new flow's two entries, opening, and nothing of the old flow"
    );
    let late = frame(old, masqueraded, L4::Ack);
    assert_eq!(
        tc.run(BACKEND_IN, &late),
        (NEXT, late.clone()),
        "the old container's late packet, not translated"
    );
    assert_eq!(
        tc.run(BACKEND_IN, &frame(new, masqueraded, L4::Ack)),
        (REDIRECT, frame(published, client, L4::Ack)),
        "the new flow's reply, translated back"
    );
}

/// A host connection that took the ends of a hairpin flow whose container
/// end is gone (a reset closed it), before the flow's entries went: the
/// container's packets of the host's connection are the host socket's, not
/// the flow's. The conntrack's hit on the flow's entry asks the host's
/// sockets (here in a network namespace of the test's own, where the
/// connection is real); without the host's connection, the same packet is
/// the closing flow's, translated to its client. A flow closed before its
/// handshake completed (its entries in the opening table) and one closed
/// once established (in the main table).
#[test]
fn a_host_connection_over_a_closed_hairpin_flows_ends_is_the_hosts() {
    let published = at(HOST_V4, 8080);
    let server = at(OTHER_CTR_V4, 80);
    let Some(mut tc) = Tc::load_with(
        "a_host_connection_over_a_closed_hairpin_flows_ends_is_the_hosts",
        &[mapping(Protocol::Tcp, published, server)],
    ) else {
        return;
    };
    tc.record_host_address(HOST_V4.into());
    for (port, established) in [(40003, false), (40004, true)] {
        let (client, masqueraded) = (at(CTR_V4, port), at(HOST_V4, port));
        let case = if established {
            "established"
        } else {
            "opening"
        };
        let entries_before = conntrack_flags(&tc).len();
        assert_eq!(
            tc.run(BACKEND_IN, &frame(client, published, L4::Syn)),
            (TO_STACK, frame(masqueraded, server, L4::Syn)),
            "{case}: the hairpin SYN, masqueraded to the host address, keeping its port"
        );
        let from_server = frame(server, masqueraded, L4::Ack);
        if established {
            assert_eq!(
                tc.run(BACKEND_IN, &from_server).0,
                REDIRECT,
                "{case}: the server's answer"
            );
            tc.run(BACKEND_IN, &frame(client, published, L4::Ack));
            assert_eq!(
                flags_in(&tc, CONNTRACK.name).len(),
                2,
                "{case}: the flow, in the main table"
            );
        }
        assert_eq!(
            tc.run(BACKEND_IN, &frame(client, published, L4::Rst)).0,
            TO_STACK,
            "{case}: the dialing container's RST"
        );
        assert_eq!(
            conntrack_flags(&tc).len(),
            entries_before + 2,
            "{case}: the closing hairpin flow's entries are still there"
        );
        assert_eq!(
            tc.run(BACKEND_IN, &from_server),
            (REDIRECT, frame(published, client, L4::Ack)),
            "{case}: without a host connection of those ends, the flow's"
        );

        let (SocketAddr::V4(host), SocketAddr::V4(container)) = (masqueraded, server) else {
            unreachable!("IPv4 ends");
        };
        let _connection = connection_in_own_namespace(host, container);
        let passed = tc.stat(Stat::PassHostConnection);
        assert_eq!(
            tc.run(BACKEND_IN, &from_server),
            (NEXT, from_server.clone()),
            "{case}: the host connection's packet, passed untouched"
        );
        assert_eq!(
            tc.stat(Stat::PassHostConnection),
            passed + 1,
            "{case}: counted as the host's"
        );
    }
}
