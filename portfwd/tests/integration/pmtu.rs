//! Path MTU discovery through a published port (issue 11, case 8): a
//! client behind a router whose link towards it has a smaller MTU than the
//! container's downloads a large response. The router answers the
//! container's full-size segments with "fragmentation needed" / "packet
//! too big" addressed to the host (they quote the host's translated
//! reply); translated back to the container, they make it send smaller
//! segments. Untranslated, the host ignores them and the download stalls.
//! Needs root (`cargo xtask test`). Topology:
//!
//! ```text
//! container ns (10.251.79.2) --veth-- host pftc79h (10.251.79.1)
//! host uplink pftr79h (10.253.79.1, TC programs) --veth-- router ns (10.253.79.2)
//! router pftf79r (10.250.79.1, MTU 1280) --veth-- client ns pftf79c (10.250.79.2, MTU 1500)
//! ```

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use crate::support::*;

/// The download: large enough for full-size segments, small enough to be
/// quick once they fit.
const RESPONSE: usize = 512 * 1024;
const PORT: u16 = 62790;

/// The client's namespace behind the router, and the host routes to it.
struct FarClient {
    netns: String,
}

impl FarClient {
    const NS: &str = "pft-far79";
    const ROUTER_IF: &str = "pftf79r";
    const CLIENT_IF: &str = "pftf79c";
    const NET4: &str = "10.250.79.0/24";
    const NET6: &str = "fd00:250:79::/64";

    fn new(router: &Container) -> Self {
        netns::add(Self::NS).unwrap();
        let far = FarClient {
            netns: Self::NS.to_owned(),
        };
        let (rns, cns) = (router.netns.as_str(), Self::NS);
        netns::veth(Self::ROUTER_IF, Some(rns), Self::CLIENT_IF, cns).unwrap();
        let (r, c) = (Self::ROUTER_IF, Self::CLIENT_IF);
        for (ns, args) in [
            (rns, vec!["addr", "add", "10.250.79.1/24", "dev", r]),
            (
                rns,
                vec!["addr", "add", "fd00:250:79::1/64", "dev", r, "nodad"],
            ),
            // The small link: only the router's end, so that the client
            // still offers a 1460-byte MSS and the router must refuse.
            (rns, vec!["link", "set", r, "mtu", "1280", "up"]),
            (cns, vec!["addr", "add", "10.250.79.2/24", "dev", c]),
            (
                cns,
                vec!["addr", "add", "fd00:250:79::2/64", "dev", c, "nodad"],
            ),
            (cns, vec!["link", "set", c, "up"]),
            (cns, vec!["route", "add", "default", "via", "10.250.79.1"]),
            (
                cns,
                vec!["-6", "route", "add", "default", "via", "fd00:250:79::1"],
            ),
        ] {
            netns::ip_in(ns, &args).unwrap();
        }
        netns::sysctl(rns, "net.ipv4.ip_forward", "1").unwrap();
        netns::sysctl(rns, "net.ipv6.conf.all.forwarding", "1").unwrap();
        // Traffic to the test prefixes never leaves through a real route:
        // unreachable unless the router's routes are there.
        for net in [Self::NET4, Self::NET6] {
            sh(
                "ip",
                &["route", "add", "unreachable", net, "metric", "4000"],
            );
        }
        let (gw4, gw6) = (router.v4().to_string(), router.v6().to_string());
        sh("ip", &["route", "add", Self::NET4, "via", &gw4]);
        sh("ip", &["-6", "route", "add", Self::NET6, "via", &gw6]);
        far
    }

    fn v4() -> IpAddr {
        "10.250.79.2".parse().unwrap()
    }

    fn v6() -> IpAddr {
        "fd00:250:79::2".parse().unwrap()
    }

    fn netns_path(&self) -> std::path::PathBuf {
        netns::path(&self.netns)
    }
}

impl Drop for FarClient {
    fn drop(&mut self) {
        for net in [Self::NET4, Self::NET6] {
            let _ = run("ip", &["route", "del", net]);
            let _ = run(
                "ip",
                &["route", "del", "unreachable", net, "metric", "4000"],
            );
        }
        netns::delete(&self.netns);
    }
}

/// Downloads the response from `addr` inside the client's namespace: the
/// bytes received, or the error that stopped it (a read times out when
/// nothing comes for 5 s: the stall).
fn download(far: &FarClient, addr: SocketAddr) -> Result<usize, String> {
    netns::inside(&far.netns_path(), move || {
        let mut stream =
            TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(b"go\n").map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Ok(received),
                Ok(n) => received += n,
                Err(e) => return Err(format!("after {received} bytes: {e}")),
            }
        }
    })
}

#[test]
fn a_client_behind_a_smaller_mtu_gets_large_responses_v4_and_v6() {
    let Some(_serial) = root_test("pmtu") else {
        return;
    };
    let ctr = Container::new(79);
    let router = Container::with_prefix(79, "rtr", 253);
    let far = FarClient::new(&router);
    let _server = Server::start_with(
        Some(ctr.netns_path()),
        SocketAddr::new("::".parse().unwrap(), 80),
        Arc::new(|mut stream, _| {
            let mut request = [0u8; 3];
            if stream.read_exact(&mut request).is_ok() {
                stream.write_all(&vec![b'x'; RESPONSE]).ok();
            }
        }),
    );
    let _pf = Portfwd::up(&["--iface", &router.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), &format!("{PORT}:80")]);
    portfwd_ok(&[
        "map",
        &ctr.v6().to_string(),
        &format!("[::]:{}:80", PORT + 1),
    ]);
    let before = stats().get("icmp_errors_translated").copied().unwrap_or(0);
    for (host, client, port) in [
        (router.host_v4(), FarClient::v4(), PORT),
        (router.host_v6(), FarClient::v6(), PORT + 1),
    ] {
        let got = download(&far, SocketAddr::new(host, port));
        assert_eq!(got, Ok(RESPONSE), "{client} -> {host}:{port}");
    }
    // At least one "too big" per family reached its container.
    let translated = stats().get("icmp_errors_translated").copied().unwrap_or(0);
    assert!(translated >= before + 2, "{:?}", stats());
}

/// A large IPv6 UDP answer, which the container fragments (IPv6 routers
/// never do), to a client behind a smaller MTU: the router answers the
/// first fragment with "packet too big", quoting it with its Fragment
/// header; translated back to the container, it makes the container
/// fragment to the router's MTU, and the client's next try gets the
/// answer. Before, an error quoting a Fragment header was not translated:
/// the container kept sending fragments the router could not forward.
#[test]
fn a_client_behind_a_smaller_mtu_gets_large_fragmented_ipv6_udp_answers() {
    let Some(_serial) = root_test("pmtu") else {
        return;
    };
    const ANSWER: usize = 3000;
    let ctr = Container::new(79);
    let router = Container::with_prefix(79, "rtr", 253);
    let far = FarClient::new(&router);
    let _server = NoDfServer::start_on(&ctr, "[::]:5379".parse().unwrap(), ANSWER);
    let _pf = Portfwd::up(&["--iface", &router.host_if]);
    let published = format!("[::]:{}:5379/udp", PORT + 2);
    portfwd_ok(&["map", &ctr.v6().to_string(), &published]);
    let before = stats().get("icmp_errors_translated").copied().unwrap_or(0);
    let to = SocketAddr::new(router.host_v6(), PORT + 2);
    let answer = netns::inside(&far.netns_path(), move || {
        let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        socket.connect(to).unwrap();
        ask_connected(&socket, b"q", 5)
    })
    .map(|answer| answer.len());
    assert_eq!(answer, Ok(ANSWER), "{} -> {to}", FarClient::v6());
    let translated = stats().get("icmp_errors_translated").copied().unwrap_or(0);
    assert!(translated > before, "{:?}", stats());
}

/// The MTU of the small links in the tests below (IPv6's minimum).
const SMALL_MTU: &str = "1280";
/// Larger than `SMALL_MTU`, smaller than Ethernet's 1500.
const BIG_DATAGRAM: usize = 1400;

/// Sets the MTU of both ends of `node`'s link to the host.
fn set_link_mtu(node: &Container, mtu: &str) {
    sh("ip", &["link", "set", &node.host_if, "mtu", mtu]);
    node.ip(&["link", "set", &node.ctr_if, "mtu", mtu]);
}

/// A UDP socket bound to `bind`, with `IP_MTU_DISCOVER`/`IPV6_MTU_DISCOVER`
/// set to `pmtudisc` (`IP_PMTUDISC_DONT`: never DF; `IP_PMTUDISC_DO`:
/// always DF, never fragmented by the sender).
fn udp_socket(bind: SocketAddr, pmtudisc: i32) -> std::net::UdpSocket {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(bind).unwrap();
    let (level, name) = if bind.is_ipv6() {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
    };
    // SAFETY: a valid socket and an int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&pmtudisc as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
    socket
}

/// A UDP server inside `node` on 0.0.0.0:`port` that never sets DF: a
/// datagram larger than 200 bytes is answered with `got <length>`, a
/// smaller one with `BIG_DATAGRAM` bytes. Stops when dropped.
struct NoDfServer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NoDfServer {
    fn start(node: &Container, port: u16) -> Self {
        Self::start_on(node, SocketAddr::from(([0, 0, 0, 0], port)), BIG_DATAGRAM)
    }

    /// The server on `bind`, answering a small datagram with `big` bytes
    /// (over IPv6, which has no DF, the socket's sends are fragmented to
    /// the path MTU it knows).
    fn start_on(node: &Container, bind: SocketAddr, big: usize) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (path, flag) = (node.netns_path(), stop.clone());
        let thread = std::thread::spawn(move || {
            netns::enter(&path).unwrap();
            let socket = udp_socket(bind, libc::IP_PMTUDISC_DONT);
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = vec![0u8; 65_536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let answer = if n > 200 {
                        format!("got {n}").into_bytes()
                    } else {
                        vec![b'r'; big]
                    };
                    socket.send_to(&answer, peer).ok();
                }
            }
        });
        ready.recv_timeout(TIMEOUT).expect("the server is ready");
        NoDfServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NoDfServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

/// From inside `node`, `size` bytes to `to` without DF on a connected
/// socket (three tries, a second each): the answer, or the last error.
fn ask_without_df(node: &Container, to: SocketAddr, size: usize) -> Result<Vec<u8>, String> {
    node.inside(move || {
        let socket = udp_socket(SocketAddr::from(([0, 0, 0, 0], 0)), libc::IP_PMTUDISC_DONT);
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        socket.connect(to).unwrap();
        ask_connected(&socket, &vec![b'q'; size], 3)
    })
}

/// Sends `request` on a connected UDP socket, at most `tries` times, until
/// an answer comes within the socket's read timeout: the answer, or the
/// last error.
fn ask_connected(
    socket: &std::net::UdpSocket,
    request: &[u8],
    tries: usize,
) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; 65_536];
    let mut last = String::new();
    for _ in 0..tries {
        socket.send(request).map_err(|e| e.to_string())?;
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(buf[..n].to_vec()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// From inside `node`: `BIG_DATAGRAM` bytes without DF and with a TTL of 1
/// to `to`, on a connected socket that reports ICMP errors
/// (`IP_RECVERR`); the error its next receive reports (None: nothing came
/// in two seconds, or an answer).
fn ttl_expired_error(node: &Container, to: SocketAddr) -> Option<i32> {
    node.inside(move || {
        use std::os::fd::AsRawFd;
        let socket = udp_socket(SocketAddr::from(([0, 0, 0, 0], 0)), libc::IP_PMTUDISC_DONT);
        let one: i32 = 1;
        // SAFETY: a valid socket and an int option of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                (&one as *const i32).cast(),
                size_of::<i32>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
        socket.set_ttl(1).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.connect(to).unwrap();
        socket.send(&vec![b'q'; BIG_DATAGRAM]).unwrap();
        let mut buf = vec![0u8; 65_536];
        socket
            .recv(&mut buf)
            .err()
            .and_then(|e| e.raw_os_error())
            .filter(|&errno| errno != libc::EAGAIN)
    })
}

/// IPv4 datagrams without DF that are larger than the link they are
/// redirected to (issue 11, case 8): a router fragments them, and so must
/// the host; redirected as they were, the link dropped them. Towards the
/// container (its link 1280, the uplink 1500), then towards the client (the
/// uplink 1280, the container's link 1500). The host forwards only on the
/// two interfaces of the test (its global setting is left alone). On the
/// way, the "time exceeded" the host sends about a translated datagram
/// (TTL 1) reaches the client in its view.
#[test]
fn datagrams_without_df_larger_than_the_next_link_are_fragmented_both_ways() {
    let Some(_serial) = root_test("pmtu") else {
        return;
    };
    const PORT: u16 = 62961;
    let topo = Topology::new(96);
    let (ctr, client) = (&topo.ctr, &topo.client);
    for node in [ctr, client] {
        set_if_sysctl(None, "ipv4", &node.host_if, "forwarding", "1");
    }
    let _server = NoDfServer::start(ctr, 5396);
    let _pf = topo.up();
    portfwd_ok(&["map", &ctr.v4().to_string(), &format!("{PORT}:5396/udp")]);
    let published = SocketAddr::new(topo.uplink(false), PORT);
    let before = stats().get("too_big_to_stack").copied().unwrap_or(0);

    set_link_mtu(ctr, SMALL_MTU);
    // A small datagram opens the flow (and gets a big answer, which fits).
    let opened = ask_without_df(client, published, 100).map(|answer| answer.len());
    assert_eq!(opened, Ok(BIG_DATAGRAM), "the flow's first datagram");
    let answer = ask_without_df(client, published, BIG_DATAGRAM)
        .map(|answer| String::from_utf8_lossy(&answer).into_owned());
    assert_eq!(
        answer,
        Ok(format!("got {BIG_DATAGRAM}")),
        "towards the container"
    );

    // With a TTL of 1, the host's forwarding path sends "time exceeded"
    // about the translated datagram (client -> container); translated at
    // the uplink's egress, it reaches the client's socket.
    let expired = ttl_expired_error(client, published);
    assert_eq!(
        expired,
        Some(libc::EHOSTUNREACH),
        "time exceeded from the host"
    );

    set_link_mtu(ctr, "1500");
    set_link_mtu(client, SMALL_MTU);
    let answer = ask_without_df(client, published, 100).map(|answer| answer.len());
    assert_eq!(answer, Ok(BIG_DATAGRAM), "towards the client");
    let after = stats().get("too_big_to_stack").copied().unwrap_or(0);
    assert!(after >= before + 2, "{:?}", stats());
}

/// From inside `node`: on a connected socket that always sets DF
/// (`IP_PMTUDISC_DO`), a small datagram to `to` (answered) when `tracked`,
/// then one of `BIG_DATAGRAM` bytes. The error the socket then reports (the kernel sets
/// it on the socket when an ICMP "fragmentation needed"/"packet too big"
/// quoting its datagram arrives) and the path MTU it learned (`IP_MTU`).
fn too_big_error(node: &Container, to: SocketAddr, tracked: bool) -> (Option<i32>, i32) {
    node.inside(move || {
        use std::os::fd::AsRawFd;
        let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let pmtudisc = if to.is_ipv6() {
            libc::IPV6_PMTUDISC_DO
        } else {
            libc::IP_PMTUDISC_DO
        };
        let socket = udp_socket(any.parse().unwrap(), pmtudisc);
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.connect(to).unwrap();
        let mut buf = vec![0u8; 65_536];
        if tracked {
            socket.send(b"small").unwrap();
            socket.recv(&mut buf).expect("the small datagram's answer");
        }
        socket
            .send(&vec![b'q'; BIG_DATAGRAM])
            .expect("sent (no path MTU known yet)");
        let error = socket.recv(&mut buf).err().and_then(|e| e.raw_os_error());
        let (level, name) = if to.is_ipv6() {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU)
        } else {
            (libc::IPPROTO_IP, libc::IP_MTU)
        };
        let mut mtu: i32 = 0;
        let mut len = size_of::<i32>() as libc::socklen_t;
        // SAFETY: a valid socket and an int option of the size given.
        unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&mut mtu as *mut i32).cast(),
                &mut len,
            )
        };
        (error, mtu)
    })
}

/// The too-big answer end to end (issue 11, case 8): the container's link
/// has an MTU of 1280 on both ends; a client's datagram of 1400 bytes with
/// DF, of a tracked flow, gets "fragmentation needed" / "packet too big"
/// from the published address, quoting it as sent, so the client's
/// connected socket reports EMSGSIZE and knows the path MTU (1280). The
/// kernel accepts it only if the quote matches its socket: untranslated,
/// or unanswered, the socket would just time out. Then the same as a
/// flow's first datagram, which is checked before the flow exists.
#[test]
fn a_client_sending_too_big_with_df_learns_the_containers_mtu() {
    let Some(_serial) = root_test("pmtu") else {
        return;
    };
    const PORT: u16 = 62962;
    let topo = Topology::new(97);
    let (ctr, client) = (&topo.ctr, &topo.client);
    let _udp = serve_udp(Some(ctr.netns_path()), "[::]:5397".parse().unwrap(), "pmtu");
    let _pf = topo.up();
    portfwd_ok(&["map", &ctr.v4().to_string(), &format!("{PORT}:5397/udp")]);
    portfwd_ok(&[
        "map",
        &ctr.v6().to_string(),
        &format!("[::]:{}:5397/udp", PORT + 1),
    ]);
    set_link_mtu(ctr, SMALL_MTU);
    for tracked in [true, false] {
        // What the client learned from the previous round is forgotten.
        client.ip(&["route", "flush", "cache"]);
        client.ip(&["-6", "route", "flush", "cache"]);
        for v6 in [false, true] {
            let published = SocketAddr::new(topo.uplink(v6), PORT + u16::from(v6));
            let (error, mtu) = too_big_error(client, published, tracked);
            assert_eq!(
                (error, mtu),
                (Some(libc::EMSGSIZE), 1280),
                "{published} (a tracked flow: {tracked}): the error and the path MTU \
                 the socket learned"
            );
        }
    }
}
