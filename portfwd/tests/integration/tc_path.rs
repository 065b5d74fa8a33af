//! The TC path end to end: an external client namespace reaches a container
//! namespace through the host's published port. Needs root (`cargo xtask
//! test`). Each test creates and removes its `support::Topology`.

use std::{
    hash::Hasher,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::Arc,
    time::Duration,
};

use crate::support::*;

const MB20: usize = 20 * 1024 * 1024;

impl Topology {
    /// Turns TX checksum offload on or off on every interface of the path.
    fn set_tx_offload(&self, on: bool) {
        let state = if on { "on" } else { "off" };
        for ns in [&self.ctr, &self.client] {
            sh("ethtool", &["-K", &ns.host_if, "tx", state]);
            sh(
                "ip",
                &[
                    "netns", "exec", &ns.netns, "ethtool", "-K", &ns.ctr_if, "tx", state,
                ],
            );
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
        .collect()
}

fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

/// Reads everything, answers `<hash> <length> <client address>`.
fn sink(mut stream: TcpStream, peer: SocketAddr) {
    let mut received = Vec::new();
    if stream.read_to_end(&mut received).is_ok() {
        let _ = writeln!(
            stream,
            "{} {} {}",
            hash(&received),
            received.len(),
            peer.ip().to_canonical()
        );
    }
}

/// Sends 20 MB, then closes.
fn source(mut stream: TcpStream, _peer: SocketAddr) {
    let _ = stream.write_all(&pattern(MB20));
}

/// Echoes lines until EOF.
fn echo(stream: TcpStream, _peer: SocketAddr) {
    let mut writer = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if writeln!(writer, "{line}").is_err() {
            break;
        }
    }
}

fn upload(addr: SocketAddr, data: &[u8]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(data)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.trim_end().to_owned())
}

#[test]
fn tcp_streams_of_20mb_arrive_intact_with_offload_on_and_off() {
    let Some(_serial) = root_test("tcp_streams_of_20mb") else {
        return;
    };
    let topo = Topology::new(21);
    let ctr_ns = Some(topo.ctr.netns_path());
    let _sink = Server::start_with(ctr_ns.clone(), "[::]:5001".parse().unwrap(), Arc::new(sink));
    let _source = Server::start_with(
        ctr_ns.clone(),
        "[::]:5002".parse().unwrap(),
        Arc::new(source),
    );
    let _pf = topo.up();
    portfwd_ok(&[
        "map",
        "--name",
        "v4",
        &topo.ctr.v4().to_string(),
        "62100:5001",
        "62101:5002",
    ]);
    portfwd_ok(&[
        "map",
        "--name",
        "v6",
        &topo.ctr.v6().to_string(),
        "62102:5001",
        "62103:5002",
    ]);

    let data = Arc::new(pattern(MB20));
    let expected = format!("{} {}", hash(&data), data.len());
    for offload in [true, false] {
        topo.set_tx_offload(offload);
        for v6 in [false, true] {
            let (up_port, down_port) = if v6 { (62102, 62103) } else { (62100, 62101) };
            let host = topo.uplink(v6);
            let client_ip = if v6 {
                topo.client.v6()
            } else {
                topo.client.v4()
            };
            let sent = data.clone();
            let (answer, downloaded) = topo.client.inside(move || {
                let answer = upload(SocketAddr::new(host, up_port), &sent);
                let downloaded = download(SocketAddr::new(host, down_port));
                (answer, downloaded)
            });
            let what = format!("offload {offload}, IPv6 {v6}");
            // The container sees the client's own address.
            assert_eq!(
                answer.unwrap(),
                format!("{expected} {client_ip}"),
                "upload, {what}"
            );
            let downloaded = downloaded.unwrap_or_else(|e| panic!("download, {what}: {e}"));
            assert_eq!(downloaded.len(), MB20, "download, {what}");
            assert_eq!(hash(&downloaded), hash(&data), "download, {what}");
        }
    }
    // Host processes reach the same published port through the socket path.
    let answer = upload("127.0.0.1:62100".parse().unwrap(), b"from the host").unwrap();
    assert!(
        answer.ends_with(&topo.ctr.host_v4().to_string()),
        "{answer}"
    );
}

#[test]
fn udp_request_response_with_forwarding_on_and_off() {
    let Some(_serial) = root_test("udp_request_response") else {
        return;
    };
    let topo = Topology::new(22);
    let _echo = topo.ctr.serve_udp("[::]:5003", "echo");
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62110:5003/udp"]);
    portfwd_ok(&["map", &topo.ctr.v6().to_string(), "[::]:62111:5003/udp"]);

    for forwarding in ["0", "1"] {
        for ns in [&topo.ctr, &topo.client] {
            set_if_sysctl(None, "ipv4", &ns.host_if, "forwarding", forwarding);
        }
        for v6 in [false, true] {
            let published = SocketAddr::new(topo.uplink(v6), if v6 { 62111 } else { 62110 });
            let answer = topo.client.inside(move || -> std::io::Result<String> {
                let socket = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
                socket.set_read_timeout(Some(TIMEOUT))?;
                // Connected: only datagrams from the published address arrive,
                // so the reply's source must have been translated back.
                socket.connect(published)?;
                socket.send(b"ping")?;
                let mut buf = [0u8; 256];
                let n = socket.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            });
            let client_ip = if v6 {
                topo.client.v6()
            } else {
                topo.client.v4()
            };
            assert_eq!(
                answer.unwrap_or_else(|e| panic!("forwarding {forwarding}, IPv6 {v6}: {e}")),
                format!("echo ping {client_ip}")
            );
        }
    }
}

#[test]
fn traffic_routed_through_the_host_is_not_rewritten() {
    let Some(_serial) = root_test("traffic_routed_through") else {
        return;
    };
    let topo = Topology::new(23);
    let other = Container::with_prefix(23, "oth", 253);
    let _container = topo.ctr.serve("[::]:80", "container");
    let _elsewhere = other.serve("[::]:62120", "other host");
    // The host routes between the client and the other host (IPv4 forwarding
    // on these two interfaces only).
    for ifname in [&topo.client.host_if, &other.host_if] {
        set_if_sysctl(None, "ipv4", ifname, "forwarding", "1");
    }
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62120:80"]);

    let host = SocketAddr::new(topo.uplink(false), 62120);
    let elsewhere = SocketAddr::new(other.v4(), 62120);
    let (to_host, to_elsewhere) = topo
        .client
        .inside(move || (fetch(host).map(|a| a.0), fetch(elsewhere).map(|a| a.0)));
    assert!(to_host.unwrap().starts_with("container"));
    assert_eq!(
        to_elsewhere.unwrap(),
        format!("other host {}", topo.client.v4())
    );
}

fn counters_of(name: &str) -> serde_json::Value {
    let rows = listed();
    rows.into_iter()
        .find(|r| r["name"] == name && r["host_ip"] == "0.0.0.0")
        .unwrap()
}

#[test]
fn counters_count_and_unmap_and_detach_stop_flows() {
    let Some(_serial) = root_test("counters_unmap_detach") else {
        return;
    };
    let topo = Topology::new(24);
    let _echo = topo.ctr.serve_with("[::]:5004", Arc::new(echo));
    let _pf = topo.up();
    let ctr_ip = topo.ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "cnt", &ctr_ip, "62130:5004"]);
    let published = SocketAddr::new(topo.uplink(false), 62130);

    // An open connection: one message echoed, then (after unmap) no more.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let client = topo.client.netns_path();
    let conversation = std::thread::spawn(move || {
        netns::enter(&client).unwrap();
        let stream = TcpStream::connect_timeout(&published, TIMEOUT).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        writer.write_all(b"hello portfwd\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        done_tx.send(line.clone()).unwrap();
        rx.recv().unwrap(); // the mapping is removed now
        let _ = writer.write_all(b"again\n");
        let mut after = String::new();
        let outcome = reader.read_line(&mut after);
        done_tx.send(format!("{outcome:?} {after}")).unwrap();
    });
    assert_eq!(done_rx.recv_timeout(TIMEOUT).unwrap(), "hello portfwd\n");

    let row = counters_of("cnt");
    assert_eq!(row["connections"], 1, "{row}");
    assert!(row["packets_in"].as_u64().unwrap() >= 3, "{row}");
    assert!(row["bytes_in"].as_u64().unwrap() >= 14, "{row}");
    assert!(row["packets_out"].as_u64().unwrap() >= 2, "{row}");
    assert!(row["bytes_out"].as_u64().unwrap() >= 14, "{row}");

    portfwd_ok(&["unmap", "--name", "cnt"]);
    tx.send(()).unwrap();
    let after = done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    conversation.join().unwrap();
    assert!(
        !after.contains("again"),
        "the open flow kept flowing after unmap: {after}"
    );
    let new_flow = topo.client.inside(move || fetch(published));
    assert!(new_flow.is_err(), "a new flow was forwarded after unmap");
    let stats = stats();
    assert!(stats["flows_stopped"] >= 1, "{stats:?}");

    // Detaching the uplink stops external forwarding; the socket path stays.
    portfwd_ok(&["map", "--name", "cnt", &ctr_ip, "62130:5004"]);
    assert!(topo.client.inside(move || external_echo(published)).is_ok());
    portfwd_ok(&["detach", &topo.client.host_if]);
    assert!(
        topo.client
            .inside(move || external_echo(published))
            .is_err()
    );
    assert!(external_echo("127.0.0.1:62130".parse().unwrap()).is_ok());
    portfwd_ok(&["attach", &topo.client.host_if]);
    assert!(topo.client.inside(move || external_echo(published)).is_ok());
}

fn external_echo(addr: SocketAddr) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(b"ping\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line == "ping\n" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("got {line:?}")))
    }
}

// --- large UDP datagrams: IP fragments (issue 17) ---

fn rose(before: &std::collections::BTreeMap<String, u64>, stat: &str) -> u64 {
    stats()[stat] - before.get(stat).copied().unwrap_or(0)
}

/// Sends datagrams of each size to `to` from inside `from` (or the host),
/// and checks each answer: the echo's view of the client, then the whole
/// datagram.
fn large_datagrams_echo(from: Option<&Container>, to: SocketAddr, client: Option<IpAddr>) {
    for size in [1_200, 4_000, 20_000, 60_000] {
        let exchange = move || udp_roundtrip(to, size);
        let (sent, answer) = match from {
            Some(ns) => ns.inside(exchange),
            None => exchange(),
        }
        .unwrap_or_else(|e| panic!("{size} bytes to {to}: {e}"));
        let split = answer
            .iter()
            .position(|&b| b == b' ')
            .unwrap_or_else(|| panic!("{size} bytes to {to}: answer without a client address"));
        let seen = String::from_utf8_lossy(&answer[..split]).into_owned();
        if let Some(client) = client {
            assert_eq!(
                seen,
                client.to_string(),
                "{size} bytes to {to}: the client seen"
            );
        }
        assert_eq!(
            answer.len() - split - 1,
            sent.len(),
            "{size} bytes to {to}: length"
        );
        assert!(
            answer[split + 1..] == sent[..],
            "{size} bytes to {to}: content"
        );
    }
}

#[test]
fn large_udp_datagrams_cross_the_external_path_both_ways() {
    let Some(_serial) = root_test("large_udp_datagrams") else {
        return;
    };
    let topo = Topology::new(25);
    let _echo = serve_udp_whole(Some(topo.ctr.netns_path()), "[::]:5005".parse().unwrap());
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62140:5005/udp"]);
    portfwd_ok(&["map", &topo.ctr.v6().to_string(), "[::]:62141:5005/udp"]);
    let before = stats();
    for v6 in [false, true] {
        let published = SocketAddr::new(topo.uplink(v6), if v6 { 62141 } else { 62140 });
        let client = if v6 {
            topo.client.v6()
        } else {
            topo.client.v4()
        };
        large_datagrams_echo(Some(&topo.client), published, Some(client));
    }
    // 60 000 bytes are 41 fragments on a 1500-byte link: most of them later
    // fragments, translated both ways.
    assert!(rose(&before, "fragments_translated_in") >= 2 * 40);
    assert!(rose(&before, "fragments_translated_out") >= 2 * 40);
    // Every datagram came whole: each was forgotten at its last fragment.
    assert_eq!(fragment_entries(), 0, "datagrams still remembered");
}

/// How many datagrams the TC path's fragments map remembers.
fn fragment_entries() -> usize {
    use portfwd_common::{FRAGMENTS, FragmentKey, FragmentValue};
    pinned_lru_hash::<FragmentKey, FragmentValue>(&FRAGMENTS)
        .keys()
        .count()
}

#[test]
fn large_udp_datagrams_through_hairpin_and_the_socket_path() {
    let Some(_serial) = root_test("large_udp_hairpin_socket") else {
        return;
    };
    let topo = Topology::new(26);
    let _echo = serve_udp_whole(Some(topo.ctr.netns_path()), "[::]:5006".parse().unwrap());
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62150:5006/udp"]);
    portfwd_ok(&["map", &topo.ctr.v6().to_string(), "[::]:62151:5006/udp"]);
    // Hairpin: the container dials the host's address on its own link; it
    // sees that address as the client (masqueraded).
    for v6 in [false, true] {
        let (gateway, port) = if v6 {
            (topo.ctr.host_v6(), 62151)
        } else {
            (topo.ctr.host_v4(), 62150)
        };
        large_datagrams_echo(
            Some(&topo.ctr),
            SocketAddr::new(gateway, port),
            Some(gateway),
        );
    }
    // The socket path rewrites before the kernel fragments: a host process.
    large_datagrams_echo(None, "127.0.0.1:62150".parse().unwrap(), None);
    large_datagrams_echo(None, "[::1]:62151".parse().unwrap(), None);
}

#[test]
fn fragments_of_unrelated_datagrams_are_left_alone() {
    let Some(_serial) = root_test("unrelated_fragments") else {
        return;
    };
    let topo = Topology::new(27);
    let other = Container::with_prefix(27, "oth", 253);
    let _echo = serve_udp_whole(Some(topo.ctr.netns_path()), "[::]:5007".parse().unwrap());
    // Another machine's service on the very port published here, and a host
    // service on a port that is not published.
    let _elsewhere = serve_udp_whole(Some(other.netns_path()), "0.0.0.0:62160".parse().unwrap());
    let _host = serve_udp_whole(None, SocketAddr::new(topo.uplink(false), 62161));
    for ifname in [&topo.client.host_if, &other.host_if] {
        set_if_sysctl(None, "ipv4", ifname, "forwarding", "1");
    }
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62160:5007/udp"]);
    let before = stats();
    let client = topo.client.v4();
    // Routed through the host: the other machine answers, seeing the client.
    large_datagrams_echo(
        Some(&topo.client),
        SocketAddr::new(other.v4(), 62160),
        Some(client),
    );
    // To a host socket: delivered whole by the host's own reassembly.
    large_datagrams_echo(
        Some(&topo.client),
        SocketAddr::new(topo.uplink(false), 62161),
        Some(client),
    );
    assert_eq!(rose(&before, "fragments_translated_in"), 0);
    assert_eq!(rose(&before, "fragments_translated_out"), 0);
    assert!(rose(&before, "passed_fragment") >= 40);
}

/// IPv6 routed through the host with forwarding enabled per interface only
/// (`force_forwarding`, kernel ≥ 6.17; the global switch stays off): the FIB
/// helper says "forwarding disabled" before it looks at the route, which must
/// not be taken for "local" (issue 12, defect 2). With forwarding off, the
/// kernel drops the packets: portfwd must not answer them from the container.
#[test]
fn ipv6_routed_through_the_host_is_not_rewritten() {
    let Some(_serial) = root_test("ipv6_routed_through") else {
        return;
    };
    let force = |ifname: &str| format!("/proc/sys/net/ipv6/conf/{ifname}/force_forwarding");
    let topo = Topology::new(28);
    if !std::path::Path::new(&force(&topo.client.host_if)).exists() {
        eprintln!(
            "SKIPPED ipv6_routed_through_the_host_is_not_rewritten: no force_forwarding (kernel < 6.17)"
        );
        return;
    }
    let other = Container::with_prefix(28, "oth", 253);
    let _container = topo.ctr.serve("[::]:80", "container");
    let _container_udp = topo.ctr.serve_udp("[::]:5008", "container");
    let _elsewhere = other.serve("[::]:62170", "other host");
    let _elsewhere_udp = other.serve_udp("[::]:62171", "other host");
    let _pf = topo.up();
    let ctr6 = topo.ctr.v6().to_string();
    portfwd_ok(&["map", &ctr6, "[::]:62170:80", "[::]:62171:5008/udp"]);
    let client = topo.client.v6();
    let tcp = SocketAddr::new(other.v6(), 62170);
    let udp = SocketAddr::new(other.v6(), 62171);
    let ask = move || {
        let tcp_answer = fetch(tcp).map(|a| a.0);
        let udp_answer = udp_ask(udp, None, b"ping");
        (tcp_answer, udp_answer)
    };

    // Forwarding off on every interface: nothing answers.
    let (tcp_answer, udp_answer) = topo.client.inside(ask);
    assert!(tcp_answer.is_err(), "forwarding off, TCP: {tcp_answer:?}");
    assert!(udp_answer.is_err(), "forwarding off, UDP: {udp_answer:?}");

    // force_forwarding on the two interfaces: the other host answers.
    for ifname in [&topo.client.host_if, &other.host_if] {
        std::fs::write(force(ifname), "1").unwrap();
    }
    let (tcp_answer, udp_answer) = topo.client.inside(ask);
    assert_eq!(tcp_answer.unwrap(), format!("other host {client}"));
    assert_eq!(udp_answer.unwrap(), format!("other host ping {client}"));
    // The published port on the host's own address still works.
    let host = SocketAddr::new(topo.uplink(true), 62170);
    let (greeting, _) = topo.client.inside(move || fetch(host)).unwrap();
    assert_eq!(greeting, format!("container {client}"));
}

/// A client that sends its request and shuts down its sending side, then
/// waits for a response that takes longer than the closing timeout: the
/// flow lives until *both* sides have closed (issue 11, case 1). Before, it
/// ended 10 s after the client's FIN and the download stalled.
#[test]
fn a_half_closed_flow_lives_until_both_sides_close() {
    let Some(_serial) = root_test("half_close") else {
        return;
    };
    const RESPONSE: usize = 400 * 1024;
    let topo = Topology::new(29);
    // Reads the request to its end (the client's FIN), thinks for 12 s,
    // then answers with RESPONSE bytes and closes.
    let _slow = topo.ctr.serve_with(
        "[::]:5009",
        Arc::new(|mut stream: TcpStream, _peer| {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let mut request = Vec::new();
            if stream.read_to_end(&mut request).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(12));
            let _ = stream.write_all(&vec![b'x'; RESPONSE]);
        }),
    );
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62180:5009"]);
    portfwd_ok(&["map", &topo.ctr.v6().to_string(), "[::]:62181:5009"]);
    let downloads: Vec<_> = [false, true]
        .into_iter()
        .map(|v6| {
            let published = SocketAddr::new(topo.uplink(v6), if v6 { 62181 } else { 62180 });
            let client = topo.client.netns_path();
            std::thread::spawn(move || -> std::io::Result<usize> {
                netns::enter(&client).unwrap();
                let mut stream = TcpStream::connect_timeout(&published, TIMEOUT)?;
                stream.set_read_timeout(Some(Duration::from_secs(20)))?;
                stream.write_all(b"GET /slow\n")?;
                stream.shutdown(Shutdown::Write)?;
                let mut response = Vec::new();
                stream.read_to_end(&mut response)?;
                Ok(response.len())
            })
        })
        .collect();
    for (download, family) in downloads.into_iter().zip(["IPv4", "IPv6"]) {
        let got = download.join().unwrap();
        assert_eq!(
            got.ok(),
            Some(RESPONSE),
            "{family}: the response after a half-close"
        );
    }
}

/// A TCP socket bound to `local` with SO_REUSEADDR (as clients behind a
/// CGNAT, or a reused source port, look to the host), connected to `to`.
fn connect_from(local: SocketAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt::ReuseAddr,
    };
    let family = if local.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, ReuseAddr, &true)?;
    // Linux bounds a blocking connect by the send timeout: a SYN that meets
    // a clash fails in seconds instead of retrying for two minutes.
    setsockopt(
        &fd,
        nix::sys::socket::sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(3, 0),
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(local),
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(to),
    )?;
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(stream)
}

/// Two published ports to the same container port, dialed from one client
/// address and source port: both flows would have the same reply key
/// (container -> client). The second gets another source port towards the
/// container, as netfilter's NAT does, and neither is misdelivered
/// (issue 11, case 2). Before, the second flow's reply entry replaced the
/// first's: the container's answers on flow A went to flow B's socket.
#[test]
fn flows_whose_replies_would_clash_get_distinct_ports() {
    let Some(_serial) = root_test("reply_clash") else {
        return;
    };
    let topo = Topology::new(30);
    let _echo = topo.ctr.serve_with("[::]:5010", Arc::new(echo));
    let _pf = topo.up();
    portfwd_ok(&[
        "map",
        "--name",
        "clash-a",
        &topo.ctr.v4().to_string(),
        "62190:5010",
    ]);
    portfwd_ok(&[
        "map",
        "--name",
        "clash-b",
        &topo.ctr.v4().to_string(),
        "62191:5010",
    ]);
    let host = topo.uplink(false);
    let local = SocketAddr::new(topo.client.v4(), 62199);
    let result = topo
        .client
        .inside(move || -> std::io::Result<(String, String)> {
            let mut a = connect_from(local, SocketAddr::new(host, 62190))?;
            let mut b = connect_from(local, SocketAddr::new(host, 62191))?;
            let line = |stream: &mut TcpStream, text: &str| -> std::io::Result<String> {
                writeln!(stream, "{text}")?;
                let mut answer = String::new();
                BufReader::new(stream.try_clone()?).read_line(&mut answer)?;
                Ok(answer.trim_end().to_owned())
            };
            // Flow A after B exists, then B.
            let from_a = line(&mut a, "via A")?;
            let from_b = line(&mut b, "via B")?;
            Ok((from_a, from_b))
        });
    let (from_a, from_b) = result.expect("both flows answer");
    assert_eq!(from_a, "via A");
    assert_eq!(from_b, "via B");
}

/// Removes the reply-direction entries of the TC path's conntrack, both
/// tables (what an LRU eviction or a lone expiry does to one half of a
/// flow); returns how many.
fn forget_reply_entries() -> usize {
    use portfwd_common::{CONNTRACK, CONNTRACK_OPENING, CT_FLAG_REPLY, CtKey, CtValue};
    let mut removed = 0;
    for table in [CONNTRACK, CONNTRACK_OPENING] {
        let mut map = pinned_lru_hash::<CtKey, CtValue>(&table);
        let replies: Vec<CtKey> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.flags & CT_FLAG_REPLY != 0)
            .map(|(k, _)| k)
            .collect();
        for key in &replies {
            map.remove(key).unwrap();
        }
        removed += replies.len();
    }
    removed
}

/// A flow that lost one of its two entries (evicted, or expired alone as a
/// one-way UDP flow does) is noticed and started again by its next packet:
/// its replies are translated again instead of leaking untranslated
/// (issue 11, case 6).
#[test]
fn a_flow_that_lost_its_reply_entry_is_started_again() {
    let Some(_serial) = root_test("orphaned_flow") else {
        return;
    };
    let topo = Topology::new(31);
    let _echo = topo.ctr.serve_udp("[::]:5011", "echo");
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62200:5011/udp"]);
    let published = SocketAddr::new(topo.uplink(false), 62200);
    let client = topo.client.netns_path();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (answers_tx, answers_rx) = std::sync::mpsc::channel();
    // One connected socket (one flow) for the whole test.
    let conversation = std::thread::spawn(move || {
        netns::enter(&client).unwrap();
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.connect(published).unwrap();
        let mut buf = [0u8; 256];
        let mut ask = |text: &[u8]| {
            socket.send(text).unwrap();
            socket
                .recv(&mut buf)
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        answers_tx.send(ask(b"before")).unwrap();
        // Wait until the reply entry is gone, then past the refresh interval.
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(1_200));
        answers_tx.send(ask(b"after")).unwrap();
    });
    let before = answers_rx.recv().unwrap();
    assert!(
        before
            .as_deref()
            .is_ok_and(|a| a.starts_with("echo before")),
        "{before:?}"
    );
    assert!(forget_reply_entries() >= 1);
    tx.send(()).unwrap();
    let after = answers_rx.recv().unwrap();
    conversation.join().unwrap();
    assert!(
        after.as_deref().is_ok_and(|a| a.starts_with("echo after")),
        "{after:?}"
    );
}

/// Masquerades the container's IPv4 traffic out of `uplink` with an
/// nftables table of the test's own, removed when dropped.
struct Masquerade;

const MASQUERADE_TABLE: &str = "portfwd_test_masq";

impl Masquerade {
    fn new(source: IpAddr, uplink: &str) -> Self {
        let _ = run("nft", &["delete", "table", "ip", MASQUERADE_TABLE]);
        let source = source.to_string();
        sh("nft", &["add", "table", "ip", MASQUERADE_TABLE]);
        sh(
            "nft",
            &[
                "add",
                "chain",
                "ip",
                MASQUERADE_TABLE,
                "post",
                "{ type nat hook postrouting priority 100 ; }",
            ],
        );
        sh(
            "nft",
            &[
                "add",
                "rule",
                "ip",
                MASQUERADE_TABLE,
                "post",
                "ip",
                "saddr",
                &source,
                "oifname",
                uplink,
                "masquerade",
            ],
        );
        Masquerade
    }
}

impl Drop for Masquerade {
    fn drop(&mut self) {
        let _ = run("nft", &["delete", "table", "ip", MASQUERADE_TABLE]);
    }
}

/// Issue 11, case 3: a container that the host's own NAT masquerades sends
/// UDP from a port that is also published (a wildcard UDP mapping, as the
/// kernel's automatic ports may be). The answer, to the host's address and
/// that port, is the reply of the masqueraded flow, not a new flow to the
/// published container.
#[test]
fn replies_to_a_masqueraded_container_are_not_taken_for_new_flows() {
    let Some(_serial) = root_test("masqueraded_replies") else {
        return;
    };
    let topo = Topology::new(62);
    let _remote = topo.client.serve_udp("0.0.0.0:5300", "remote");
    let _published = topo.ctr.serve_udp("0.0.0.0:5003", "published");
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62140:5003/udp"]);
    for ns in [&topo.ctr, &topo.client] {
        set_if_sysctl(None, "ipv4", &ns.host_if, "forwarding", "1");
    }
    let _nat = Masquerade::new(topo.ctr.v4(), &topo.client.host_if);
    let remote = SocketAddr::new(topo.client.v4(), 5300);
    let masqueraded_as = topo.uplink(false);
    // Twice: the first datagram opens the host's NAT flow, the second
    // follows it.
    for attempt in 0..2 {
        let answer = topo
            .ctr
            .inside(move || udp_ask(remote, Some("0.0.0.0:62140".parse().unwrap()), b"ping"));
        assert_eq!(
            answer.unwrap_or_else(|e| panic!("datagram {attempt}: no answer: {e}")),
            format!("remote ping {masqueraded_as}"),
            "datagram {attempt}"
        );
    }
}

/// Writes a line on `stream` and reads the echo's answer.
fn echo_line(stream: &mut TcpStream, text: &str) -> std::io::Result<String> {
    writeln!(stream, "{text}")?;
    let mut answer = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut answer)?;
    Ok(answer.trim_end().to_owned())
}

/// Issue 11, case 5: a hairpin flow is masqueraded to the host address the
/// container dialed, with a source port of portfwd's choosing (first the
/// container's own). A host socket may already use that address and port
/// towards the same container port: here a host connection (and a UDP
/// socket) from the gateway address and port X to the container, and then
/// the container dials the published port from its own port X. The hairpin
/// flow must get another port; before, it took X, the container saw a SYN
/// on the host's live connection, and the host's packets from the container
/// were delivered to the hairpin client.
#[test]
fn hairpin_ports_avoid_the_host_sockets_on_the_gateway_address() {
    let Some(_serial) = root_test("hairpin_host_sockets") else {
        return;
    };
    let topo = Topology::new(87);
    let _echo = topo.ctr.serve_with("[::]:5087", Arc::new(echo));
    let _udp_echo = topo.ctr.serve_udp("0.0.0.0:5087", "echo");
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62870:5087"]);
    portfwd_ok(&["map", &topo.ctr.v6().to_string(), "[::]:62871:5087"]);
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62872:5087/udp"]);
    for (v6, published) in [(false, 62870), (true, 62871)] {
        let (gateway, container) = if v6 {
            (topo.ctr.host_v6(), topo.ctr.v6())
        } else {
            (topo.ctr.host_v4(), topo.ctr.v4())
        };
        // The host's own connection: gateway:X -> container:5087, X of the
        // kernel's choosing (a fixed X would meet the TIME_WAIT socket a
        // previous run left on the host).
        let mut host = TcpStream::connect_timeout(&SocketAddr::new(container, 5087), TIMEOUT)
            .unwrap_or_else(|e| panic!("v6 {v6}: the host's connection: {e}"));
        host.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let local = host.local_addr().unwrap();
        assert_eq!(
            local.ip(),
            gateway,
            "the host dials from its gateway address"
        );
        let port = local.port();
        assert_eq!(echo_line(&mut host, "host before").unwrap(), "host before");
        // The container dials the published port from the same port.
        let hairpin = topo.ctr.inside(move || {
            let mut stream = connect_from(
                SocketAddr::new(container, port),
                SocketAddr::new(gateway, published),
            )?;
            let answer = echo_line(&mut stream, "hairpin")?;
            Ok::<_, std::io::Error>((stream, answer))
        });
        let after = echo_line(&mut host, "host after");
        let (mut hairpin, answer) =
            hairpin.unwrap_or_else(|e| panic!("v6 {v6}: the hairpin connection: {e}"));
        assert_eq!(answer, "hairpin", "v6 {v6}: the hairpin connection");
        assert_eq!(
            after.unwrap_or_else(|e| panic!("v6 {v6}: the host's connection after: {e}")),
            "host after",
            "v6 {v6}: the host's connection after"
        );
        assert_eq!(
            echo_line(&mut hairpin, "hairpin again").unwrap(),
            "hairpin again",
            "v6 {v6}"
        );
    }
    // UDP: a host socket gateway:X -> container:5087, then a hairpin flow
    // from the container's port X.
    let (gateway, container) = (topo.ctr.host_v4(), topo.ctr.v4());
    let host = UdpSocket::bind(SocketAddr::new(gateway, 0)).unwrap();
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    host.connect(SocketAddr::new(container, 5087)).unwrap();
    let port = host.local_addr().unwrap().port();
    let mut buf = [0u8; 512];
    let mut ask = |text: &str| {
        host.send(text.as_bytes())?;
        let n = host.recv(&mut buf)?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    assert_eq!(ask("host").unwrap(), format!("echo host {gateway}"));
    let hairpin = topo.ctr.inside(move || {
        udp_ask(
            SocketAddr::new(gateway, 62872),
            Some(SocketAddr::new(container, port)),
            b"hairpin",
        )
    });
    assert_eq!(
        hairpin.expect("the hairpin datagram's answer"),
        format!("echo hairpin {gateway}")
    );
    assert_eq!(
        ask("host again").expect("the host socket's answer after the hairpin flow"),
        format!("echo host again {gateway}")
    );
}

/// The holder's sweep tells the TC programs when the conntrack holds no
/// masqueraded flow; then a container's packets of a host connection pass
/// without the conntrack lookup. A hairpin flow opened after that must
/// still be translated both ways (it is counted, and the mark no longer
/// holds), and the host's connection beside it keeps working (its packets
/// go through the conntrack again, which holds no flow of theirs).
#[test]
fn a_hairpin_flow_after_the_sweep_found_none_is_translated() {
    let Some(_serial) = root_test("masq_flows_mark") else {
        return;
    };
    let topo = Topology::new(88);
    let _echo = topo.ctr.serve_with("[::]:5088", Arc::new(echo));
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62880:5088"]);
    wait_for_the_sweeps_mark();
    let (gateway, container) = (topo.ctr.host_v4(), topo.ctr.v4());
    let mut host = TcpStream::connect_timeout(&SocketAddr::new(container, 5088), TIMEOUT)
        .expect("the host's connection");
    host.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(echo_line(&mut host, "host").unwrap(), "host");
    let mut hairpin = topo
        .ctr
        .inside(move || {
            let mut stream = TcpStream::connect_timeout(&SocketAddr::new(gateway, 62880), TIMEOUT)?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            let answer = echo_line(&mut stream, "hairpin")?;
            Ok::<_, std::io::Error>((stream, answer))
        })
        .map(|(stream, answer)| {
            assert_eq!(answer, "hairpin");
            stream
        })
        .expect("the hairpin connection");
    let (started, none_after) = masq_flows();
    assert_eq!(started, 1, "the hairpin flow is counted");
    assert!(
        !portfwd_common::holds_no_masq_flow(started, none_after),
        "the mark no longer holds"
    );
    assert_eq!(echo_line(&mut hairpin, "again").unwrap(), "again");
    assert_eq!(echo_line(&mut host, "host again").unwrap(), "host again");
}

/// What a host service on a port, before it was published, left of its
/// connection with the container: the host's socket of those ends.
#[derive(Clone, Copy)]
enum Leftover {
    /// The service closed first.
    TimeWait,
    /// The container closed, the service never did; the container's end is
    /// gone (its FIN_WAIT2 timed out).
    CloseWait,
}

/// The container dials a host service at `gateway:620<index>0` from
/// `container:410<index>0`, the host's socket of that connection is left in
/// `leftover`, the port is published to the container's echo server (`map`
/// binds over such leftovers), and the container dials it again from the
/// same port: a hairpin flow with the leftover's ends. The flow's answer.
fn hairpin_flow_over_a_host_leftover(index: u8, leftover: Leftover) -> std::io::Result<String> {
    let topo = Topology::new(index);
    let server_port = 5000 + u16::from(index);
    let _echo = topo
        .ctr
        .serve_with(&format!("0.0.0.0:{server_port}"), Arc::new(echo));
    let _pf = topo.up();
    let (gateway, container) = (topo.ctr.host_v4(), topo.ctr.v4());
    let published = SocketAddr::new(gateway, 62000 + 10 * u16::from(index));
    let source = SocketAddr::new(container, 41000 + 10 * u16::from(index));
    if let Leftover::CloseWait = leftover {
        // The container's end goes a second after its FIN.
        topo.ctr
            .inside(|| std::fs::write("/proc/sys/net/ipv4/tcp_fin_timeout", "1"))
            .unwrap();
    }
    let service = TcpListener::bind(published).unwrap();
    let dialer = topo.ctr.inside(move || {
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut stream = connect_from(source, published)?;
            if let Leftover::TimeWait = leftover {
                // Until the host's FIN: then this side closes second.
                stream.read_to_end(&mut Vec::new())?;
            }
            Ok(())
        })
    });
    let (served, _) = service.accept().unwrap();
    // Closed at once for TIME_WAIT; for CLOSE_WAIT, kept open until the
    // hairpin flow has answered.
    let _kept = match leftover {
        Leftover::TimeWait => {
            drop(served);
            None
        }
        Leftover::CloseWait => Some(served),
    };
    dialer
        .join()
        .unwrap()
        .expect("the connection to the host's service");
    drop(service);
    if let Leftover::CloseWait = leftover {
        std::thread::sleep(Duration::from_secs(3));
    }
    portfwd_ok(&[
        "map",
        &container.to_string(),
        &format!("{}:{server_port}", published.port()),
    ]);
    // The same ends again, now a hairpin flow to the published port.
    topo.ctr.inside(move || {
        let mut stream = connect_from(source, published)?;
        echo_line(&mut stream, "hairpin")
    })
}

/// A hairpin flow whose ends are those of a host socket in TIME_WAIT: a
/// host service on the port, before it was published, served the same
/// container port, and closed first. The container's packets of the new
/// flow must be translated, not passed to the TIME_WAIT socket as the
/// host's own (which answers them, and the flow never reaches the
/// container's server).
#[test]
fn a_hairpin_flow_is_not_taken_for_a_host_socket_in_time_wait() {
    let Some(_serial) = root_test("hairpin_time_wait") else {
        return;
    };
    assert_eq!(
        hairpin_flow_over_a_host_leftover(88, Leftover::TimeWait)
            .expect("the hairpin flow over the host's TIME_WAIT socket"),
        "hairpin"
    );
}

/// The host's end of a connection that the container ended (CLOSE_WAIT:
/// the host's service never closed it) shares its ends with a hairpin flow
/// that the container opens later to the port, published since, from the
/// same source port. The flow's packets are the flow's: the host socket,
/// which holds a published port, must not take them as its own.
#[test]
fn a_hairpin_flow_is_not_taken_for_a_host_socket_in_close_wait() {
    let Some(_serial) = root_test("hairpin_close_wait") else {
        return;
    };
    assert_eq!(
        hairpin_flow_over_a_host_leftover(98, Leftover::CloseWait)
            .expect("the hairpin flow over the host's CLOSE_WAIT socket"),
        "hairpin"
    );
}

/// A host connection whose ends clash with a live hairpin flow's towards
/// the container (the host dials the container's port from the address
/// and port the flow is masqueraded to). The container answers the host's
/// SYN with an ACK of the flow it holds; that ACK must not reach the host's
/// opening socket as its own, which would answer with a reset that ends
/// the hairpin flow in the container.
#[test]
fn a_host_connection_clashing_with_a_hairpin_flow_does_not_reset_it() {
    let Some(_serial) = root_test("host_connection_clash") else {
        return;
    };
    let topo = Topology::new(89);
    let _echo = topo.ctr.serve_with("0.0.0.0:5089", Arc::new(echo));
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62890:5089"]);
    let (gateway, container) = (topo.ctr.host_v4(), topo.ctr.v4());
    let source = SocketAddr::new(container, 41890);
    let mut hairpin = topo
        .ctr
        .inside(move || connect_from(source, SocketAddr::new(gateway, 62890)))
        .expect("the hairpin connection");
    assert_eq!(echo_line(&mut hairpin, "before").unwrap(), "before");
    // The flow reaches the container from gateway:41890 (its own port kept).
    let clash = connect_from(
        SocketAddr::new(gateway, 41890),
        SocketAddr::new(container, 5089),
    );
    assert!(clash.is_err(), "the container holds those ends already");
    assert_eq!(
        echo_line(&mut hairpin, "after")
            .expect("the hairpin flow after the host's clashing connect"),
        "after"
    );
}

/// A packet redirected straight into a container's namespace is addressed
/// as the veth would have carried it: to the container's link-layer
/// address, which the kernel's neighbour entry holds. A container that
/// makes its interface a bridge port (a VM's bridge inside a pod does) gets
/// frames its bridge delivers to it, not frames for another host's address
/// that it floods.
#[test]
fn a_container_that_bridges_its_interface_still_gets_its_frames() {
    let Some(_serial) = root_test("bridged_container_interface") else {
        return;
    };
    let topo = Topology::new(196);
    topo.ctr.forward_on_host_link();
    let _web = topo.ctr.serve("[::]:5196", "web");
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62861:5196"]);
    let published = SocketAddr::new(topo.uplink(false), 62861);
    let served = || {
        topo.client
            .inside(move || fetch(published))
            .is_ok_and(|(answer, _)| answer.starts_with("web "))
    };
    let before = redirected_to_peer();
    assert!(served(), "the container is not served");
    assert!(
        redirected_to_peer() > before,
        "packets did not go into the peer"
    );

    // Inside the container (nothing the host hears of): its address moves
    // to a bridge whose port the veth's peer becomes.
    let (ns, ctr_if) = (topo.ctr.netns.as_str(), topo.ctr.ctr_if.as_str());
    let address = format!("{}/24", topo.ctr.v4());
    let gateway = topo.ctr.host_v4().to_string();
    for args in [
        vec!["link", "add", "pfbr0", "type", "bridge"],
        vec!["addr", "flush", "dev", ctr_if],
        vec!["link", "set", ctr_if, "master", "pfbr0"],
        vec!["addr", "add", &address, "dev", "pfbr0"],
        vec!["link", "set", "pfbr0", "up"],
        vec!["route", "add", "default", "via", &gateway],
    ] {
        sh("ip", &[&["-n", ns][..], &args].concat());
    }
    let before = redirected_to_peer();
    assert!(
        wait_until(Duration::from_secs(10), served),
        "the bridged container is not served"
    );
    // Every packet of the fetch went into the peer: the veth is still
    // listed (its peer may be a bridge port), the frames addressed to the
    // bridge's address, which the host's neighbour entry holds.
    assert!(
        redirected_to_peer() >= before + 3,
        "packets to the bridged container did not go into the peer"
    );
    assert_eq!(
        listing()["links"][&topo.ctr.host_if]["into_peer"].as_bool(),
        Some(true),
        "list: a veth whose peer is a bridge port"
    );
}

/// Two host addresses on the client's uplink, each routed to a client off
/// the link by its own gateway (a rule on the source), and the client
/// behind both: the second gateway is a macvlan of the client's namespace,
/// with a MAC of its own, so that the frames show which one the host chose.
///
/// ```text
/// host pfte98h: 10.252.98.1 (main: client via .2), 10.252.98.3 (from .3: client via .4)
/// client ns: pfte98c 10.252.98.2, macvlan pftg98m 10.252.98.4, lo 10.248.98.9
/// ```
struct SourceRouted {
    uplink: String,
}

impl SourceRouted {
    const CLIENT: &str = "10.248.98.9";
    const CLIENT_NET: &str = "10.248.98.0/24";
    const SECOND_ADDRESS: &str = "10.252.98.3";
    const SECOND_GATEWAY: &str = "10.252.98.4";
    const GATEWAY_IF: &str = "pftg98m";
    const TABLE: &str = "24898";

    fn new(topo: &Topology) -> Self {
        let (ns, uplink, client_if) = (
            topo.client.netns.as_str(),
            topo.client.host_if.as_str(),
            topo.client.ctr_if.as_str(),
        );
        let routed = SourceRouted {
            uplink: uplink.to_owned(),
        };
        let client = format!("{}/32", Self::CLIENT);
        let second_gateway = format!("{}/24", Self::SECOND_GATEWAY);
        for args in [
            vec![
                "link",
                "add",
                "link",
                client_if,
                "name",
                Self::GATEWAY_IF,
                "type",
                "macvlan",
                "mode",
                "bridge",
            ],
            vec!["addr", "add", &second_gateway, "dev", Self::GATEWAY_IF],
            vec!["link", "set", Self::GATEWAY_IF, "up"],
            vec!["addr", "add", &client, "dev", "lo"],
            vec!["link", "set", "lo", "up"],
        ] {
            netns::ip_in(ns, &args).unwrap();
        }
        // Replies to the client come in by either gateway.
        for scope in ["all", "default", client_if, Self::GATEWAY_IF] {
            let key = format!("net.ipv4.conf.{scope}.rp_filter");
            netns::sysctl(ns, &key, "0").unwrap();
        }
        // Left by a run that was killed: gone first.
        Self::remove_host_routing();
        // Traffic to the test prefix never leaves through a real route.
        sh(
            "ip",
            &[
                "route",
                "add",
                "unreachable",
                Self::CLIENT_NET,
                "metric",
                "4000",
            ],
        );
        let second_address = format!("{}/24", Self::SECOND_ADDRESS);
        let first_gateway = topo.client.v4().to_string();
        // The gateways' MACs, fixed: the client's veth would also answer
        // ARP for the macvlan's address.
        let mac = |ifname: &str| {
            let link: serde_json::Value =
                serde_json::from_str(&topo.client.ip(&["-j", "link", "show", "dev", ifname]))
                    .unwrap();
            link[0]["address"].as_str().unwrap().to_owned()
        };
        let (first_mac, second_mac) = (mac(client_if), mac(Self::GATEWAY_IF));
        for args in [
            vec!["addr", "add", &second_address, "dev", uplink],
            vec![
                "neigh",
                "replace",
                &first_gateway,
                "lladdr",
                &first_mac,
                "dev",
                uplink,
                "nud",
                "permanent",
            ],
            vec![
                "neigh",
                "replace",
                Self::SECOND_GATEWAY,
                "lladdr",
                &second_mac,
                "dev",
                uplink,
                "nud",
                "permanent",
            ],
            vec![
                "route",
                "add",
                Self::CLIENT,
                "via",
                &first_gateway,
                "dev",
                uplink,
            ],
            vec![
                "route",
                "add",
                Self::CLIENT,
                "via",
                Self::SECOND_GATEWAY,
                "dev",
                uplink,
                "table",
                Self::TABLE,
            ],
            vec![
                "rule",
                "add",
                "from",
                Self::SECOND_ADDRESS,
                "lookup",
                Self::TABLE,
                "pref",
                Self::TABLE,
            ],
        ] {
            sh("ip", &args);
        }
        routed
    }

    /// The host's rule, table and unreachable route: the routes and
    /// neighbours on the uplink go with it, these do not.
    fn remove_host_routing() {
        let _ = run(
            "ip",
            &[
                "rule",
                "del",
                "from",
                Self::SECOND_ADDRESS,
                "lookup",
                Self::TABLE,
            ],
        );
        let _ = run("ip", &["route", "flush", "table", Self::TABLE]);
        let _ = run(
            "ip",
            &[
                "route",
                "del",
                "unreachable",
                Self::CLIENT_NET,
                "metric",
                "4000",
            ],
        );
    }

    /// Bytes received so far by `ifname` in the client's namespace.
    fn received(topo: &Topology, ifname: &str) -> u64 {
        let link: serde_json::Value =
            serde_json::from_str(&topo.client.ip(&["-s", "-j", "link", "show", "dev", ifname]))
                .unwrap();
        link[0]["stats64"]["rx"]["bytes"].as_u64().unwrap()
    }
}

impl Drop for SourceRouted {
    fn drop(&mut self) {
        let _ = run("ip", &["route", "del", Self::CLIENT, "dev", &self.uplink]);
        Self::remove_host_routing();
    }
}

/// Sends 2 MB, then closes.
fn two_megabytes(mut stream: TcpStream, _peer: SocketAddr) {
    let _ = stream.write_all(&pattern(2 << 20));
}

/// Replies to a client go by the gateway that the host's routing gives
/// their source, the published address the client dialed: with a rule on
/// the source, two addresses on one uplink reach the same client through
/// two gateways. The programs keep the FIB's answer for a second (per CPU,
/// `pf_next_hops`); keyed on the destination alone, the replies from the
/// second address took the first one's gateway for that second (review of
/// session 21). Everything runs on one CPU, whose cache the first download
/// fills.
#[test]
fn replies_from_each_host_address_take_its_own_gateway() {
    let Some(_serial) = root_test("source_routed_replies") else {
        return;
    };
    let topo = Topology::new(98);
    let routed = SourceRouted::new(&topo);
    // The FIB helper answers only for an interface that forwards.
    topo.client.forward_on_host_link();
    topo.ctr.forward_on_host_link();
    let _pinned = PinnedToThisCpu::new();
    let _server = topo.ctr.serve_with("[::]:5198", Arc::new(two_megabytes));
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62872:5198"]);
    let client: IpAddr = SourceRouted::CLIENT.parse().unwrap();
    let download_from = |host: IpAddr| {
        let published = SocketAddr::new(host, 62872);
        topo.client.inside(move || -> std::io::Result<usize> {
            let mut stream = connect_from(SocketAddr::new(client, 0), published)?;
            let mut data = Vec::new();
            stream.read_to_end(&mut data)?;
            Ok(data.len())
        })
    };
    // The macvlan's frames come in through the veth it sits on, which
    // counts them too: the second gateway's own count tells the two apart.
    let second_gateway = |topo: &Topology| SourceRouted::received(topo, SourceRouted::GATEWAY_IF);
    let size = 2u64 << 20;
    for (host, by_second) in [
        (topo.uplink(false), false),
        (SourceRouted::SECOND_ADDRESS.parse().unwrap(), true),
    ] {
        let before = second_gateway(&topo);
        let downloaded = download_from(host).unwrap_or_else(|e| panic!("from {host}: {e}"));
        assert_eq!(downloaded as u64, size, "the whole download from {host}");
        let received = second_gateway(&topo) - before;
        if by_second {
            assert!(
                received >= size,
                "replies from {host} brought the second gateway {received} bytes: \
                 they took the first address's gateway"
            );
        } else {
            assert!(
                received < size / 10,
                "replies from {host} brought the second gateway {received} bytes: \
                 they took the second address's gateway"
            );
        }
    }
    drop(routed);
}
