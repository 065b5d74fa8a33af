//! `portfwd conntrack list|flush` over real flows of the TC path. Needs
//! root (`cargo xtask test`).

use std::net::SocketAddr;

use serde_json::Value;

use crate::support::*;

#[test]
fn conntrack_lists_flows_and_flushes_one_mappings_flows() {
    let Some(_serial) = root_test("conntrack") else {
        return;
    };
    let ctr = Container::new(73);
    let client = Container::with_prefix(73, "ext", 252);
    let _echo = ctr.serve_udp("0.0.0.0:5301", "ctr73");
    let _pf = Portfwd::up(&["--iface", &client.host_if]);
    let ctr_ip = ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "a", &ctr_ip, "62730:5301/udp"]);
    portfwd_ok(&["map", "--name", "b", &ctr_ip, "62731:5301/udp"]);
    let uplink = client.host_v4();
    let client_ip = client.v4();
    let ask = move |port: u16, from_port: u16| {
        let to = SocketAddr::new(uplink, port);
        let from = SocketAddr::new(client_ip, from_port);
        client
            .inside(move || udp_ask(to, Some(from), b"hi"))
            .unwrap_or_else(|e| panic!("{to} from {from}: {e}"))
    };
    assert!(ask(62730, 41000).starts_with("ctr73"));
    assert!(ask(62731, 41001).starts_with("ctr73"));

    let all = conntrack_flows(&[]);
    assert_eq!(all.len(), 2, "{all:#?}");
    let a = all.iter().find(|f| f["mapping"] == "a").expect("a's flow");
    assert_eq!(a["protocol"], "udp");
    assert_eq!(a["client"], format!("{client_ip}:41000"));
    assert_eq!(a["published"], format!("{uplink}:62730"));
    assert_eq!(a["container"], format!("{ctr_ip}:5301"));
    assert_eq!(a["container_sees"], a["client"], "the client's own address");
    assert_eq!(a["state"], "udp");
    assert_eq!(conntrack_flows(&["--port", "62731"]).len(), 1);
    let text = portfwd_ok(&["conntrack", "list"]);
    assert!(text.contains(&format!("{client_ip}:41000")), "{text}");

    // explain shows the mapping's flows too.
    let out = portfwd_ok(&["explain", "--json", &format!("{uplink}:62730/udp")]);
    let explained: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(explained["matched"]["flows"].as_array().unwrap().len(), 1);

    let out = portfwd_ok(&["conntrack", "flush", "--name", "a"]);
    assert_eq!(out.trim(), "ended 1 flow");
    let left = conntrack_flows(&[]);
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["mapping"], "b");
    // a's client starts a new flow with its next datagram.
    let before = stats()["flows_new"];
    assert!(ask(62730, 41000).starts_with("ctr73"));
    assert_eq!(stats()["flows_new"], before + 1);

    let out = portfwd_ok(&["conntrack", "flush"]);
    assert_eq!(out.trim(), "ended 2 flows");
    assert!(conntrack_flows(&[]).is_empty());
    // Bad input is a usage error.
    let out = portfwd(&["conntrack", "flush", "--port", "1", "--name", "a"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A TCP flow that conntrack forgot (flushed here; evicted from a full
/// table, or timed out, alike) is reset by the host at its next packet, as
/// a closed port answers: the client's read fails at once with
/// ECONNRESET. Before, the held port's listener dropped every segment (its
/// socket filter took SYNs and all), so the client's packets vanished and
/// its connection hung until TCP gave up, minutes later.
#[test]
fn a_forgotten_tcp_flow_is_reset_by_the_host() {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    let Some(_serial) = root_test("forgotten_tcp_flow") else {
        return;
    };
    let topo = Topology::new(68);
    let _server = topo.ctr.serve_with(
        "[::]:5302",
        std::sync::Arc::new(|mut stream: TcpStream, _| {
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = stream.read(&mut buf) {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }),
    );
    let _pf = topo.up();
    portfwd_ok(&[
        "map",
        "--name",
        "echo",
        &topo.ctr.v4().to_string(),
        "62732:5302",
    ]);
    let published = SocketAddr::new(topo.uplink(false), 62732);
    let mut stream = topo
        .client
        .inside(move || TcpStream::connect_timeout(&published, TIMEOUT))
        .expect("connecting to the published port");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut echo = [0u8; 5];
    stream.write_all(b"hello").unwrap();
    stream.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello");

    assert_eq!(
        portfwd_ok(&["conntrack", "flush", "--port", "62732"]).trim(),
        "ended 1 flow"
    );
    let untracked = stats()["untracked_midflow"];
    stream.write_all(b"again").unwrap();
    let got = stream.read(&mut echo);
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the client's read after its flow was forgotten: {got:?}"
    );
    assert!(stats()["untracked_midflow"] > untracked);
}
