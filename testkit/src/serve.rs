//! Small servers and clients, each on threads of its own, optionally
//! inside a network namespace: a TCP server answering each connection with
//! a greeting and the client's address, a UDP echo doing the same per
//! datagram, and the clients that read those answers.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use crate::netns;

/// How long clients wait for a connection or an answer.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// What a server does with one connection.
pub type Handler = Arc<dyn Fn(TcpStream, SocketAddr) + Send + Sync>;

/// A TCP server on its own thread; stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(netns: Option<PathBuf>, addr: SocketAddr, greeting: &str) -> Self {
        let greeting = greeting.to_owned();
        Self::start_with(
            netns,
            addr,
            Arc::new(move |mut stream, peer| {
                // IPv4 clients of a dual-stack socket appear as ::ffff:a.b.c.d.
                // A client that went away gets nothing; nothing to do.
                writeln!(stream, "{greeting} {}", peer.ip().to_canonical()).ok();
            }),
        )
    }

    /// A server that runs `handler` for each connection.
    pub fn start_with(netns: Option<PathBuf>, addr: SocketAddr, handler: Handler) -> Self {
        Self::spawn(netns, move |stop, ready| {
            let listener =
                TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
            listener.set_nonblocking(true).unwrap();
            ready();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        stream.set_nonblocking(false).ok();
                        stream.set_read_timeout(Some(Duration::from_secs(20))).ok();
                        // One thread per connection, so that a stalled one
                        // never blocks the next; each ends at EOF or timeout.
                        let handler = handler.clone();
                        thread::spawn(move || handler(stream, peer));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    }

    /// Runs `serve` on a thread of its own (inside `netns`), until the
    /// server is dropped: `serve` polls the stop flag, and calls `ready`
    /// once it is bound; `spawn` waits for that.
    fn spawn(
        netns: Option<PathBuf>,
        serve: impl FnOnce(&AtomicBool, &dyn Fn()) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            if let Some(path) = netns {
                netns::enter(&path).unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
            }
            serve(&stopping, &|| ready_tx.send(()).unwrap());
        });
        ready_rx
            .recv_timeout(TIMEOUT)
            .expect("server did not start");
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A handler that panicked already failed its test.
            thread.join().ok();
        }
    }
}

/// Connects to `addr` and returns the server's greeting line and the peer
/// address the socket reports (getpeername).
pub fn fetch(addr: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok((answer.trim_end().to_owned(), peer))
}

/// A UDP server on its own thread answering each datagram with
/// `<greeting> <payload> <client address>`; stops when dropped.
pub fn serve_udp(netns: Option<PathBuf>, addr: SocketAddr, greeting: &str) -> Server {
    let greeting = greeting.to_owned();
    serve_udp_answering(netns, addr, 2048, move |datagram, peer| {
        let payload = String::from_utf8_lossy(datagram);
        format!("{greeting} {payload} {peer}").into_bytes()
    })
}

/// A UDP server on its own thread that receives datagrams of up to
/// `max_len` bytes and sends back what `answer` makes of each (given the
/// client's address as `to_canonical` shows it); stops when dropped.
fn serve_udp_answering(
    netns: Option<PathBuf>,
    addr: SocketAddr,
    max_len: usize,
    answer: impl Fn(&[u8], IpAddr) -> Vec<u8> + Send + 'static,
) -> Server {
    Server::spawn(netns, move |stop, ready| {
        let socket = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        ready();
        let mut buf = vec![0u8; max_len];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                socket
                    .send_to(&answer(&buf[..n], peer.ip().to_canonical()), peer)
                    .ok();
            }
        }
    })
}

/// One datagram to `to` (from `from` if given) on a connected socket, or
/// with sendto when `connected` is false; the answer and who sent it.
pub fn udp_exchange(
    to: SocketAddr,
    from: Option<SocketAddr>,
    payload: &[u8],
    connected: bool,
) -> std::io::Result<(String, SocketAddr)> {
    let any: SocketAddr = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .unwrap();
    let socket = UdpSocket::bind(from.unwrap_or(any))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    if connected {
        socket.connect(to)?;
        socket.send(payload)?;
    } else {
        socket.send_to(payload, to)?;
    }
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// One datagram to `to`, from `from` if given; the echo's answer.
pub fn udp_ask(
    to: SocketAddr,
    from: Option<SocketAddr>,
    payload: &[u8],
) -> std::io::Result<String> {
    udp_exchange(to, from, payload, true).map(|(answer, _)| answer)
}

/// A UDP echo of whole datagrams of any size: answers each one with
/// `<client address> ` followed by the datagram itself.
pub fn serve_udp_whole(netns: Option<PathBuf>, addr: SocketAddr) -> Server {
    serve_udp_answering(netns, addr, 65_536, |datagram, peer| {
        let mut answer = format!("{peer} ").into_bytes();
        answer.extend_from_slice(datagram);
        answer
    })
}

/// A datagram of `size` bytes (a recognisable pattern) to `to`, over a
/// connected socket, and the whole answer (at most three tries: a lost
/// datagram is sent again). Returns what was sent and what came back.
pub fn udp_roundtrip(to: SocketAddr, size: usize) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.connect(to)?;
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; 65_536];
    let mut last_error = None;
    for _ in 0..3 {
        socket.send(&payload)?;
        match socket.recv(&mut buf) {
            Ok(n) => return Ok((payload, buf[..n].to_vec())),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.expect("three tries"))
}
