//! What the socket path remembers lives and dies with the socket: a live
//! socket's dialed address survives any churn of short-lived ones (issue
//! 19, defect 1); and a UDP socket connected through a mapping ends with
//! the mapping (issue 12, defect 4). Needs root (`cargo xtask test`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crate::support::*;

/// The capacity `up --max-flows` gives the connection-tracking maps: small,
/// so that a socket-path memory sized by it (as the reverse-NAT LRU map
/// was: one entry per translated socket) is overrun in well under a second.
const SMALL_MAP: u32 = 256;
/// Short-lived sockets of the churn, of each kind (TCP and UDP): 16 times
/// the small map, bounded in time too (a slow guest kernel under TCG).
const CHURN: usize = 16 * SMALL_MAP as usize;
const CHURN_LIMIT: Duration = Duration::from_secs(60);

/// A server in `ctr` on `addr` that keeps each connection open until the
/// client closes it (at most 20 s: the server's read timeout).
fn serve_and_hold(ctr: &Container, addr: &str) -> Server {
    Server::start_with(
        Some(ctr.netns_path()),
        addr.parse().unwrap(),
        Arc::new(|mut stream, _| {
            let mut byte = [0u8; 1];
            let _ = stream.read(&mut byte);
        }),
    )
}

#[test]
fn live_sockets_keep_their_dialed_address_through_a_churn_of_short_ones() {
    let Some(_serial) = root_test("live_sockets_through_churn") else {
        return;
    };
    let ctr = Container::new(81);
    let _held = serve_and_hold(&ctr, "[::]:80");
    let _echo = ctr.serve_udp("[::]:5003", "echo");
    let max_flows = SMALL_MAP.to_string();
    let _pf = Portfwd::up(&["--iface", &ctr.host_if, "--max-flows", &max_flows]);
    // 62083 leads to a container port nobody listens on: each connect is
    // translated, then refused at once by the container.
    portfwd_ok(&[
        "map",
        &ctr.v4().to_string(),
        "62081:80",
        "62082:5003/udp",
        "62083:81",
    ]);

    // Long-lived: two TCP connections and an unconnected UDP client whose
    // reply waits in its queue while the churn runs.
    let dialed: [SocketAddr; 2] = [
        "127.0.0.1:62081".parse().unwrap(),
        SocketAddr::new(ctr.host_v4(), 62081),
    ];
    let long_lived: Vec<TcpStream> = dialed
        .iter()
        .map(|to| TcpStream::connect_timeout(to, TIMEOUT).unwrap())
        .collect();
    for (stream, to) in long_lived.iter().zip(&dialed) {
        assert_eq!(stream.peer_addr().unwrap(), *to, "before the churn");
    }
    let udp_to: SocketAddr = "127.0.0.1:62082".parse().unwrap();
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    udp.send_to(b"before", udp_to).unwrap();
    let mut buf = [0u8; 512];
    // The answer is queued once a peek returns (a peek leaves it queued).
    udp.peek_from(&mut buf).expect("the echo's answer");

    // The churn: short TCP connections and short connected UDP sockets,
    // every one translated by the socket programs.
    let refused: SocketAddr = "127.0.0.1:62083".parse().unwrap();
    let start = Instant::now();
    let mut churned = 0;
    while churned < CHURN && start.elapsed() < CHURN_LIMIT {
        let attempt = TcpStream::connect_timeout(&refused, TIMEOUT);
        assert!(attempt.is_err(), "nothing listens behind 62083");
        let short = UdpSocket::bind("0.0.0.0:0").unwrap();
        short.connect(udp_to).unwrap();
        assert_eq!(short.peer_addr().unwrap(), udp_to, "a short UDP socket");
        churned += 1;
    }
    assert!(
        churned >= 4 * SMALL_MAP as usize,
        "only {churned} short sockets in {CHURN_LIMIT:?}"
    );
    eprintln!(
        "churn: {churned} TCP connects and {churned} UDP connects in {:?}",
        start.elapsed()
    );

    for (stream, to) in long_lived.iter().zip(&dialed) {
        assert_eq!(
            stream.peer_addr().unwrap(),
            *to,
            "getpeername after {churned} short sockets"
        );
    }
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"echo before"));
    assert_eq!(from, udp_to, "the queued reply's source after the churn");
    // And the long-lived sockets still work.
    udp.send_to(b"after", udp_to).unwrap();
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"echo after"));
    assert_eq!(from, udp_to);
    drop(long_lived);
    thread::sleep(Duration::from_millis(10));
}

/// Issue 12, defect 4: a host UDP socket connected through a mapping ends
/// when the mapping goes or is published to another container, so that the
/// client sees an error and connects again, through what is published now.
#[test]
fn unmap_and_republish_end_host_udp_sockets_connected_through_the_mapping() {
    let Some(_serial) = root_test("sockets_end_with_their_mapping") else {
        return;
    };
    let a = Container::new(82);
    let b = Container::new(83);
    let _a_echo = a.serve_udp("[::]:5003", "A");
    let _a_held = serve_and_hold(&a, "[::]:80");
    let _b_echo = b.serve_udp("[::]:5003", "B");
    let _pf = Portfwd::up(&["--iface", &a.host_if]);
    portfwd_ok(&["map", &a.v4().to_string(), "62084:5003/udp", "62085:80"]);

    let ask = |socket: &UdpSocket, payload: &str| -> std::io::Result<String> {
        socket.send(payload.as_bytes())?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let published: SocketAddr = "127.0.0.1:62084".parse().unwrap();
    let connected = |to: SocketAddr| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        socket.connect(to).unwrap();
        socket
    };
    let through_mapping = connected(published);
    assert!(ask(&through_mapping, "one").unwrap().starts_with("A one"));
    // Control: a socket connected straight to the container is not ours.
    let direct = connected(SocketAddr::new(a.v4(), 5003));
    assert!(ask(&direct, "direct").unwrap().starts_with("A direct"));
    let mut tcp = TcpStream::connect_timeout(&"127.0.0.1:62085".parse().unwrap(), TIMEOUT).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();

    // Re-publish the UDP port to B.
    portfwd_ok(&["unmap", "62084/udp"]);
    portfwd_ok(&["map", &b.v4().to_string(), "62084:5003/udp"]);
    match ask(&through_mapping, "two") {
        Err(_) => {}
        Ok(answer) => assert!(
            !answer.starts_with("A "),
            "the old socket still reaches the old container: {answer}"
        ),
    }
    // The ended socket reports ECONNABORTED (pending until read, here by
    // SO_ERROR) and is disconnected; the client connects again.
    let _ = through_mapping.take_error();
    through_mapping.connect(published).unwrap();
    let answer = ask(&through_mapping, "three").unwrap();
    assert!(
        answer.starts_with("B three"),
        "after connecting again: {answer}"
    );
    assert!(ask(&direct, "still").unwrap().starts_with("A still"));

    // TCP connections through a removed mapping are kept (they drain, as
    // with kube-proxy and Cilium): the held one still reaches A, whose
    // server answers a byte by closing.
    portfwd_ok(&["unmap", "62085"]);
    tcp.write_all(b"x")
        .expect("the kept connection takes a write");
    let mut byte = [0u8; 1];
    let read = tcp.read(&mut byte);
    assert!(
        matches!(read, Ok(0)),
        "the old container closes the kept connection: {read:?}"
    );
}

/// A connected socket's translation lives in the `pf_sock_conn` slot its
/// cookie selects (one array write per connect), and the slot is free again
/// when the socket closes (`pf_sock_release`): otherwise closed sockets
/// would keep the slots, and every later connect would fall back to the
/// socket storage, three times slower.
#[test]
fn a_closed_socket_frees_its_slot() {
    let Some(_serial) = root_test("socket_slots") else {
        return;
    };
    let ctr = Container::new(84);
    let _held = serve_and_hold(&ctr, "[::]:80");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62091:80"]);
    let dialed: SocketAddr = "127.0.0.1:62091".parse().unwrap();
    let streams: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect_timeout(&dialed, Duration::from_secs(5)).unwrap())
        .collect();
    for stream in &streams {
        assert_eq!(stream.peer_addr().unwrap(), dialed);
    }
    assert_eq!(slots_held(), streams.len());
    drop(streams);
    assert!(
        wait_until(Duration::from_secs(5), || slots_held() == 0),
        "{} slots still held by closed sockets",
        slots_held()
    );
}

/// The `pf_sock_conn` slots that a socket holds.
fn slots_held() -> usize {
    let pin = std::path::Path::new(&pin_dir()).join(portfwd_common::SOCK_CONNECTED.name);
    let map = aya::maps::MapData::from_pin(pin).unwrap();
    let slots: aya::maps::Array<_, portfwd_common::SockConnected> =
        aya::maps::Array::try_from(aya::maps::Map::Array(map)).unwrap();
    slots
        .iter()
        .filter_map(Result::ok)
        .filter(|slot| slot.owner != 0)
        .count()
}

/// getpeername looks for a socket's record only when its peer's port has a
/// bit in `pf_backend_ports`. The bits are kept while the instance lives:
/// a TCP connection outlives its mapping's `unmap` (it still reaches the
/// container), and must still report the address it dialed, also after
/// `up` runs again (which sets the bits from the services map).
#[test]
fn a_socket_outliving_its_mapping_still_reports_what_it_dialed() {
    let Some(_serial) = root_test("outliving_socket") else {
        return;
    };
    let ctr = Container::new(86);
    let _held = serve_and_hold(&ctr, "[::]:80");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62093:80"]);
    let dialed: SocketAddr = "127.0.0.1:62093".parse().unwrap();
    let stream = TcpStream::connect_timeout(&dialed, Duration::from_secs(5)).unwrap();
    assert_eq!(stream.peer_addr().unwrap(), dialed, "while mapped");
    portfwd_ok(&["unmap", "62093"]);
    assert_eq!(stream.peer_addr().unwrap(), dialed, "after unmap");
    portfwd_ok(&["up", "--iface", &ctr.host_if]);
    assert_eq!(stream.peer_addr().unwrap(), dialed, "after up again");
}
