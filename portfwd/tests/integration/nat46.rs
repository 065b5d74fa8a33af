//! NAT46 on the TC path: an external IPv6 client reaches an IPv4-only
//! container published on `[::]` (what dockerd asks for with `-p 8080:80`),
//! TCP and UDP. The container sees the host's IPv4 address on its link as
//! the source (as with docker-proxy). Needs root (`cargo xtask test`).
//!
//! ```text
//! client ns (fd00:252:85::2 only) --veth-- host uplink pfte85h (TC programs)
//! host pftc85h (10.251.85.1) --veth-- container ns (10.251.85.2, servers on 0.0.0.0)
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::Arc,
};

use crate::support::*;

#[test]
fn ipv6_clients_reach_an_ipv4_container_through_the_ipv6_wildcard() {
    let Some(_serial) = root_test("nat46") else {
        return;
    };
    let ctr = Container::new(85);
    let client = Container::with_prefix(85, "ext", 252);
    // IPv4 only in the container's servers, IPv6 only on the client.
    let _web = ctr.serve("0.0.0.0:5085", "ctr85");
    let _echo = ctr.serve_udp("0.0.0.0:5086", "ctr85");
    // Large segments: the container's TCP sends GSO packets, whose type
    // the switch of families changes too.
    let _bulk = ctr.serve_with(
        "0.0.0.0:5087",
        Arc::new(|mut stream: TcpStream, _| {
            let _ = stream.write_all(&bulk());
        }),
    );
    client.ip(&["-4", "addr", "flush", "dev", &client.ctr_if]);
    let _pf = Portfwd::up(&["--iface", &client.host_if]);
    let ctr_ip = ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "web46", &ctr_ip, "[::]:62850:5085"]);
    portfwd_ok(&["map", "--name", "dns46", &ctr_ip, "[::]:62851:5086/udp"]);
    portfwd_ok(&["map", "--name", "bulk46", &ctr_ip, "[::]:62852:5087"]);
    let (uplink6, client6) = (client.host_v6(), client.v6());
    let gateway = ctr.host_v4();

    let web = SocketAddr::new(uplink6, 62850);
    let dns = SocketAddr::new(uplink6, 62851);
    let bulk_at = SocketAddr::new(uplink6, 62852);
    let from = SocketAddr::new(client6, 41850);
    let ask = move || udp_from(dns, from, b"ping");
    // With checksum offload (partial checksums, the NIC's to finish) and
    // without (complete checksums, which the translation must keep right).
    for offload in ["on", "off"] {
        set_tx_offload(&[&ctr, &client], offload);
        // TCP: the container answers with the address it sees.
        let (answer, _) = client
            .inside(move || fetch(web))
            .unwrap_or_else(|e| panic!("TCP to {web}, offload {offload}: {e}"));
        assert_eq!(answer, format!("ctr85 {gateway}"));
        // UDP, over a connected socket: the reply's source must be
        // translated back to the published IPv6 address, or it would not
        // arrive.
        let answer = client
            .inside(ask)
            .unwrap_or_else(|e| panic!("UDP to {dns}, offload {offload}: {e}"));
        assert_eq!(answer, format!("ctr85 ping {gateway}"));
        let received = client
            .inside(move || download(bulk_at))
            .unwrap_or_else(|e| panic!("download from {bulk_at}, offload {offload}: {e}"));
        assert!(
            received == bulk(),
            "download, offload {offload}: {} bytes",
            received.len()
        );
    }

    let flow = conntrack_flows(&[]);
    let udp = flow
        .iter()
        .find(|f| f["protocol"] == "udp")
        .unwrap_or_else(|| panic!("no UDP flow in {flow:#?}"));
    assert_eq!(udp["mapping"], "dns46");
    assert_eq!(udp["client"], format!("[{client6}]:41850"));
    assert_eq!(udp["published"], format!("[{uplink6}]:62851"));
    assert_eq!(udp["container"], format!("{ctr_ip}:5086"));
    let sees = udp["container_sees"].as_str().unwrap();
    assert!(sees.starts_with(&format!("{gateway}:")), "{udp:#?}");
    let text = portfwd_ok(&["conntrack", "list"]);
    assert!(text.contains(&format!("[{client6}]:41850")), "{text}");

    // explain says what the container sees.
    let out = portfwd_ok(&["explain", &format!("[{uplink6}]:62850")]);
    assert!(out.contains(&gateway.to_string()), "{out}");

    // A TCP connection the client keeps open (the server closed its
    // side); `unmap` ends it and the UDP flow at their next packet.
    let stream = client.inside(move || TcpStream::connect_timeout(&web, TIMEOUT));
    let stream = stream.unwrap_or_else(|e| panic!("TCP to {web}: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), format!("ctr85 {gateway}"));
    let open = format!("[{client6}]:{}", stream.local_addr().unwrap().port());
    let listed = |client: &str| conntrack_flows(&[]).iter().any(|f| f["client"] == client);
    assert!(listed(&open), "{:#?}", conntrack_flows(&[]));
    portfwd_ok(&["unmap", "--name", "dns46"]);
    portfwd_ok(&["unmap", "--name", "web46"]);
    portfwd_ok(&["unmap", "--name", "bulk46"]);
    let again = client.inside(ask);
    assert!(again.is_err(), "UDP after unmap: {again:?}");
    let _ = (&stream).write_all(b"bye\n");
    let udp_client = format!("[{client6}]:41850");
    assert!(
        wait_until(TIMEOUT, || !listed(&open) && !listed(&udp_client)),
        "flows after unmap: {:#?}",
        conntrack_flows(&[])
    );
    let stats = stats();
    assert_eq!(stats["dropped_nat46_untranslatable"], 0, "{stats:?}");
}

/// 4 MB of a pattern.
fn bulk() -> Vec<u8> {
    (0..4 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Turns TX checksum offload on or off on both veth pairs.
fn set_tx_offload(links: &[&Container], state: &str) {
    for link in links {
        sh("ethtool", &["-K", &link.host_if, "tx", state]);
        let (ns, ctr_if) = (link.netns.as_str(), link.ctr_if.as_str());
        sh(
            "ip",
            &["netns", "exec", ns, "ethtool", "-K", ctr_if, "tx", state],
        );
    }
}

/// One datagram from `from` to `to` over a connected socket; the answer.
fn udp_from(to: SocketAddr, from: SocketAddr, payload: &[u8]) -> std::io::Result<String> {
    let socket = UdpSocket::bind(from)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(to)?;
    socket.send(payload)?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
