//! Test topology: network namespaces with veth pairs that the tests create
//! and always remove (Drop), servers running inside them, and the real
//! `portfwd` binary driven with its own pin directory.
//!
//! These tests need root (they load eBPF programs and create namespaces);
//! run them with `cargo xtask test`. Without root they print why and pass
//! trivially, so that `cargo test` stays usable for the unit tests.
#![allow(dead_code)]

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

pub const PORTFWD: &str = env!("CARGO_BIN_EXE_portfwd");
/// The tests' own pin directory, so that they never touch a real instance
/// (PORTFWD_TEST_BPFFS overrides it, for two test runs at once).
pub fn pin_dir() -> String {
    std::env::var("PORTFWD_TEST_BPFFS").unwrap_or_else(|_| "/sys/fs/bpf/portfwd-test".into())
}
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Tests share the cgroup root and the pin directory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Serializes the test and checks for root; None (with a message) to skip.
pub fn root_test(name: &str) -> Option<MutexGuard<'static, ()>> {
    if !is_root() {
        eprintln!("SKIPPED {name}: needs root (run `cargo xtask test` as root)");
        return None;
    }
    Some(
        SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    )
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Runs a command that must succeed.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `portfwd` binary with the tests' pin directory.
pub fn portfwd(args: &[&str]) -> Output {
    let dir = pin_dir();
    let mut all = vec!["--bpffs", dir.as_str()];
    all.extend_from_slice(args);
    run(PORTFWD, &all)
}

/// `portfwd` that must succeed; returns stdout.
pub fn portfwd_ok(args: &[&str]) -> String {
    let out = portfwd(args);
    assert!(
        out.status.success(),
        "portfwd {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// portfwd brought up for one test and always taken down. Tests always
/// name the uplinks (interfaces they created): the default would be the
/// machine's own default-route interfaces.
pub struct Portfwd;

impl Portfwd {
    pub fn up(extra: &[&str]) -> Self {
        assert!(
            extra.contains(&"--iface"),
            "tests must attach only to their own interfaces"
        );
        // A previous crashed run may have left state: start clean.
        let _ = portfwd(&["down"]);
        let mut args = vec!["up"];
        args.extend_from_slice(extra);
        portfwd_ok(&args);
        Portfwd
    }
}

impl Drop for Portfwd {
    fn drop(&mut self) {
        let _ = portfwd(&["down"]);
    }
}

/// A "container": a network namespace joined to the host by a veth pair.
/// Host side 10.251.N.1/24 and fd00:251:N::1/64, namespace side .2 / ::2.
pub struct Container {
    pub netns: String,
    pub host_if: String,
    pub index: u8,
    pub net: u8,
    pub ctr_if: String,
}

impl Container {
    pub fn new(index: u8) -> Self {
        Self::with_prefix(index, "ctr", 251)
    }

    /// A namespace named `pft-<kind><index>` on 10.<net>.<index>.0/24 and
    /// fd00:<net>:<index>::/64 (a container, an external client, a host
    /// elsewhere: only the role differs).
    pub fn with_prefix(index: u8, kind: &str, net: u8) -> Self {
        let netns = format!("pft-{kind}{index}");
        let tag = &kind[..1];
        let host_if = format!("pft{tag}{index}h");
        let ctr_if = format!("pft{tag}{index}c");
        // Leftovers of an interrupted run.
        let _ = run("ip", &["netns", "del", &netns]);
        let _ = run("ip", &["link", "del", &host_if]);
        let container = Container {
            netns: netns.clone(),
            host_if: host_if.clone(),
            index,
            net,
            ctr_if: ctr_if.clone(),
        };
        sh("ip", &["netns", "add", &netns]);
        sh(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ctr_if,
            ],
        );
        sh("ip", &["link", "set", &ctr_if, "netns", &netns]);
        let (h4, c4) = (
            format!("{}/24", container.host_v4()),
            format!("{}/24", container.v4()),
        );
        let (h6, c6) = (
            format!("{}/64", container.host_v6()),
            format!("{}/64", container.v6()),
        );
        sh("ip", &["addr", "add", &h4, "dev", &host_if]);
        sh("ip", &["addr", "add", &h6, "dev", &host_if, "nodad"]);
        sh("ip", &["link", "set", &host_if, "up"]);
        let ns = |args: &[&str]| {
            let mut all = vec!["-n", netns.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all);
        };
        ns(&["addr", "add", &c4, "dev", &ctr_if]);
        ns(&["addr", "add", &c6, "dev", &ctr_if, "nodad"]);
        ns(&["link", "set", &ctr_if, "up"]);
        ns(&["link", "set", "lo", "up"]);
        ns(&[
            "route",
            "add",
            "default",
            "via",
            &container.host_v4().to_string(),
        ]);
        ns(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &container.host_v6().to_string(),
        ]);
        container
    }

    pub fn v4(&self) -> IpAddr {
        format!("10.{}.{}.2", self.net, self.index).parse().unwrap()
    }
    pub fn host_v4(&self) -> IpAddr {
        format!("10.{}.{}.1", self.net, self.index).parse().unwrap()
    }
    pub fn v6(&self) -> IpAddr {
        format!("fd00:{}:{}::2", self.net, self.index)
            .parse()
            .unwrap()
    }
    pub fn host_v6(&self) -> IpAddr {
        format!("fd00:{}:{}::1", self.net, self.index)
            .parse()
            .unwrap()
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// Runs `f` on a thread inside the container's network namespace.
    pub fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.netns_path();
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }

    /// Starts a server inside the container on `addr` (e.g. [::]:80) that
    /// answers every connection with `<greeting> <client address>\n`.
    pub fn serve(&self, addr: &str, greeting: &str) -> Server {
        Server::start(Some(self.netns_path()), addr.parse().unwrap(), greeting)
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the pair.
        let _ = run("ip", &["netns", "del", &self.netns]);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

pub fn enter_netns(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

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
                let _ = writeln!(stream, "{greeting} {}", peer.ip().to_canonical());
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
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
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
                enter_netns(&path);
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
            let _ = thread.join();
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

/// Polls `condition` every 50 ms for at most `limit`.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP server on its own thread answering each datagram with
/// `<greeting> <payload> <client address>`; stops when dropped.
pub fn serve_udp(netns: Option<PathBuf>, addr: SocketAddr, greeting: &str) -> Server {
    let greeting = greeting.to_owned();
    Server::spawn(netns, move |stop, ready| {
        let socket =
            std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        ready();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let payload = String::from_utf8_lossy(&buf[..n]);
                let answer = format!("{greeting} {payload} {}", peer.ip().to_canonical());
                let _ = socket.send_to(answer.as_bytes(), peer);
            }
        }
    })
}

/// Sets a sysctl of one interface (never a global one).
pub fn set_if_sysctl(netns: Option<&str>, family: &str, ifname: &str, key: &str, value: &str) {
    let name = format!("net.{family}.conf.{ifname}.{key}={value}");
    match netns {
        Some(ns) => sh("ip", &["netns", "exec", ns, "sysctl", "-qw", &name]),
        None => sh("sysctl", &["-qw", &name]),
    };
}

/// The mapping rows of `portfwd list --json`.
pub fn listed() -> Vec<serde_json::Value> {
    let listing: serde_json::Value =
        serde_json::from_str(&portfwd_ok(&["list", "--json"])).unwrap();
    listing["mappings"].as_array().unwrap().clone()
}

/// A UDP echo of whole datagrams of any size: answers each one with
/// `<client address> ` followed by the datagram itself.
pub fn serve_udp_whole(netns: Option<PathBuf>, addr: SocketAddr) -> Server {
    Server::spawn(netns, move |stop, ready| {
        let socket =
            std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        ready();
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let mut answer = format!("{} ", peer.ip().to_canonical()).into_bytes();
                answer.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&answer, peer);
            }
        }
    })
}

/// A datagram of `size` bytes (a recognisable pattern) to `to`, over a
/// connected socket, and the whole answer (at most three tries: a lost
/// datagram is sent again).
pub fn udp_exchange(to: SocketAddr, size: usize) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let socket = std::net::UdpSocket::bind(any)?;
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
    Err(last_error.unwrap())
}
