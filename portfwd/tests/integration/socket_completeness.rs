//! UDP on the socket path, dual-stack sockets, hairpin through the host and
//! port reservation. Needs root (`cargo xtask test`).

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
};

use crate::support::*;

#[test]
fn udp_replies_come_from_the_address_the_client_sent_to() {
    let Some(_serial) = root_test("udp_replies") else {
        return;
    };
    let ctr = Container::new(31);
    let _echo = ctr.serve_udp("[::]:5003", "echo");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62200:5003/udp"]);
    portfwd_ok(&["map", &ctr.v6().to_string(), "[::1]:62201:5003/udp"]);

    // IPv4 container: IPv4 sends of either kind; from IPv6 sockets, the
    // kernel can move a connected socket to IPv4, not a single datagram.
    let v4 = ctr.host_v4().to_string();
    for (to, connected) in [
        ("127.0.0.1:62200".parse().unwrap(), false),
        (SocketAddr::new(ctr.host_v4(), 62200), false),
        ("127.0.0.1:62200".parse().unwrap(), true),
        ("[::1]:62200".parse().unwrap(), true),
        (SocketAddr::new(ctr.host_v6(), 62200), true),
        // IPv6 container: IPv6 all the way.
        ("[::1]:62201".parse().unwrap(), false),
    ] {
        let via = format!("{to} (connected: {connected})");
        let (answer, from) =
            udp_exchange(to, None, b"ping", connected).unwrap_or_else(|e| panic!("{via}: {e}"));
        let client = if to.port() == 62201 {
            ctr.host_v6().to_string()
        } else {
            v4.clone()
        };
        assert_eq!(answer, format!("echo ping {client}"), "via {via}");
        assert_eq!(from, to, "the reply's source, via {via}");
    }
}

#[test]
fn a_dual_stack_socket_reaches_the_container_through_a_mapped_address() {
    let Some(_serial) = root_test("dual_stack") else {
        return;
    };
    let ctr = Container::new(32);
    let _server = ctr.serve("[::]:80", "ctr32");
    let _echo = ctr.serve_udp("[::]:5003", "echo");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62201:80", "62201:5003/udp"]);

    let mapped: SocketAddr = "[::ffff:127.0.0.1]:62201".parse().unwrap();
    let (answer, peer) = fetch(mapped).unwrap();
    assert_eq!(answer, format!("ctr32 {}", ctr.host_v4()));
    assert_eq!(peer, mapped);
    let (answer, from) = udp_exchange(mapped, None, b"mapped", false).unwrap();
    assert_eq!(answer, format!("echo mapped {}", ctr.host_v4()));
    assert_eq!(from, mapped);
}

#[test]
fn containers_reach_published_ports_through_the_host() {
    let Some(_serial) = root_test("hairpin") else {
        return;
    };
    let a = Container::new(33);
    let b = Container::new(34);
    // The uplink is elsewhere: A and B reach the host through their own veths.
    let uplink = Container::with_prefix(33, "ext", 252);
    let _a_public = a.serve("[::]:80", "A");
    let _a_own = a.serve("127.0.0.1:62211", "A's own loopback");
    let _b_public = b.serve("[::]:80", "B");
    let _pf = Portfwd::up(&["--iface", &uplink.host_if]);
    portfwd_ok(&[
        "map",
        "--name",
        "a",
        &a.v4().to_string(),
        "62210:80",
        "62211:80",
    ]);
    portfwd_ok(&["map", "--name", "b", &b.v4().to_string(), "62212:80"]);

    // From inside A, the host's addresses: its own gateway, and B's.
    let gateway = a.host_v4();
    let elsewhere = b.host_v4();
    let answers = a.inside(move || {
        let ask = |addr: SocketAddr| {
            fetch(addr)
                .map(|(answer, _)| answer)
                .unwrap_or_else(|e| format!("error {e}"))
        };
        [
            ask(SocketAddr::new(gateway, 62212)),
            ask(SocketAddr::new(elsewhere, 62212)),
            ask(SocketAddr::new(gateway, 62210)),
            ask("127.0.0.1:62211".parse().unwrap()),
        ]
    });
    // Hairpin flows are masqueraded to the host address A dialed.
    assert_eq!(
        answers[0],
        format!("B {gateway}"),
        "A -> host:62212 reaches B"
    );
    assert_eq!(
        answers[1],
        format!("B {elsewhere}"),
        "A -> other host address:62212 reaches B"
    );
    assert_eq!(
        answers[2],
        format!("A {gateway}"),
        "A -> host:62210 reaches A itself"
    );
    assert!(
        answers[3].starts_with("A's own loopback"),
        "A's 127.0.0.1 stays its own: {}",
        answers[3]
    );
}

fn ss(args: &str) -> String {
    sh("ss", &args.split(' ').collect::<Vec<_>>())
}

#[test]
fn published_ports_are_held_visible_and_released() {
    let Some(_serial) = root_test("port_reservation") else {
        return;
    };
    let ctr = Container::new(35);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&[
        "map",
        "--name",
        "held",
        &ctr.v4().to_string(),
        "62220:80",
        "62221:53/udp",
    ]);

    // Visible in ss, held by portfwd, for IPv4 and IPv6.
    let tcp = ss("-lntpH sport = :62220");
    assert_eq!(tcp.lines().count(), 2, "{tcp}");
    assert!(tcp.lines().all(|l| l.contains("portfwd")), "{tcp}");
    let udp = ss("-lnupH sport = :62221");
    assert_eq!(udp.lines().count(), 2, "{udp}");
    // Nobody else can bind them.
    let err = TcpListener::bind("0.0.0.0:62220").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let err = UdpSocket::bind("127.0.0.1:62221").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    // Connections still reach the container, not the held socket.
    let _server = ctr.serve("[::]:80", "ctr35");
    assert!(
        fetch("127.0.0.1:62220".parse().unwrap())
            .unwrap()
            .0
            .starts_with("ctr35")
    );

    // A port a host service listens on is refused, naming the service.
    let service = TcpListener::bind("127.0.0.1:62222").unwrap();
    let before = listed();
    let out = portfwd(&["map", &ctr.v4().to_string(), "62223:80", "62222:80"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("62222/tcp") && stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );
    assert_eq!(listed(), before, "a refused map changes nothing");
    // --force publishes it anyway (the service keeps its socket).
    portfwd_ok(&[
        "map",
        "--force",
        "--name",
        "forced",
        &ctr.v4().to_string(),
        "62222:80",
    ]);
    drop(service);

    // unmap releases the port; down releases everything.
    portfwd_ok(&["unmap", "--name", "held"]);
    assert!(TcpListener::bind("0.0.0.0:62220").is_ok());
    assert!(UdpSocket::bind("127.0.0.1:62221").is_ok());
    portfwd_ok(&["map", &ctr.v4().to_string(), "62224:80"]);
    assert!(TcpListener::bind("0.0.0.0:62224").is_err());
    portfwd_ok(&["down"]);
    assert!(TcpListener::bind("0.0.0.0:62224").is_ok());
    assert!(ss("-lntpH sport = :62224").is_empty());
}

#[test]
fn the_holder_follows_address_changes() {
    let Some(_serial) = root_test("address_changes") else {
        return;
    };
    let ctr = Container::new(36);
    let _server = ctr.serve("[::]:80", "ctr36");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62230:80"]);
    // An address added after `map`: the holder sees it and wildcard
    // mappings serve it, with no portfwd command run.
    sh(
        "ip",
        &["addr", "add", "10.251.36.77/32", "dev", &ctr.host_if],
    );
    let added: SocketAddr = "10.251.36.77:62230".parse().unwrap();
    // Short attempts: before the holder's refresh, the connection meets the
    // held (silent) socket and would wait out a long timeout.
    let served = wait_until(std::time::Duration::from_secs(5), || {
        TcpStream::connect_timeout(&added, std::time::Duration::from_millis(200)).is_ok()
    });
    assert!(served, "the new address was not served");
    assert!(fetch(added).unwrap().0.starts_with("ctr36"));
    sh(
        "ip",
        &["addr", "del", "10.251.36.77/32", "dev", &ctr.host_if],
    );
}

#[test]
fn a_stream_keeps_flowing_while_another_process_maps_and_unmaps() {
    let Some(_serial) = root_test("stream_alongside_updates") else {
        return;
    };
    let ctr = Container::new(37);
    let payload = vec![7u8; 4 << 20];
    let _source = ctr.serve_with(
        "[::]:5002",
        std::sync::Arc::new(move |mut s: TcpStream, _| {
            let _ = std::io::Write::write_all(&mut s, &payload);
        }),
    );
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62240:5002"]);
    let mut stream = TcpStream::connect("127.0.0.1:62240").unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let updater = std::thread::spawn(|| {
        for port in 62241..62246 {
            let p = port.to_string();
            let out = Command::new(PORTFWD)
                .args([
                    "--bpffs",
                    &pin_dir(),
                    "map",
                    "10.251.37.2",
                    &format!("{p}:80"),
                ])
                .output()
                .unwrap();
            assert!(out.status.success());
            let out = Command::new(PORTFWD)
                .args(["--bpffs", &pin_dir(), "unmap", &p])
                .output()
                .unwrap();
            assert!(out.status.success());
        }
    });
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    updater.join().unwrap();
    assert_eq!(received.len(), 4 << 20);
}

/// A change large enough that the holder binds its ports ahead of the map
/// writes, on several threads (from 512 ports), holds every free port and
/// names the one a host service listens on (with --force, published anyway).
#[test]
fn a_large_forced_range_holds_every_free_port_and_names_the_busy_one() {
    let Some(_serial) = root_test("large_forced_range") else {
        return;
    };
    let ctr = Container::new(38);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    let service = TcpListener::bind("127.0.0.1:61400").unwrap();
    let out = portfwd(&[
        "map",
        "--force",
        "--name",
        "wide",
        &ctr.v4().to_string(),
        "61100-61699:61100-61699",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let busy: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("held by another process"))
        .collect();
    assert_eq!(busy.len(), 1, "{stderr}");
    assert!(busy[0].contains("0.0.0.0:61400/tcp"), "{stderr}");
    // 600 ports on the IPv4 and the IPv6 wildcard, less the busy one.
    let held = ss("-lntpH sport >= :61100 and sport <= :61699");
    let by_portfwd = held.lines().filter(|l| l.contains("portfwd")).count();
    assert_eq!(by_portfwd, 2 * 600 - 1, "{held}");
    drop(service);
    portfwd_ok(&["unmap", "--name", "wide"]);
    assert!(ss("-lntpH sport >= :61100 and sport <= :61699").is_empty());
}
