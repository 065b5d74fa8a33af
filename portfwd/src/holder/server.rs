//! The holder process itself (`portfwd hold`): it binds what the services
//! map publishes, answers the CLI on its unix socket, and follows the
//! host's addresses.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, DirBuilder},
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::{
            fs::DirBuilderExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use nix::{
    poll::{PollFd, PollFlags, poll},
    sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen,
        setsockopt, socket, sockopt,
    },
};

use super::{
    REPLY_TIMEOUT,
    follow::{HostFollowing, drain, host_events},
};
use crate::{
    datapath::{self, PinnedMaps},
    instance,
    model::{Mapping, Protocol},
};

/// A held port: protocol and the address bound.
type Hold = (Protocol, SocketAddr);

/// The holder process (`portfwd hold`, started by `up`).
pub(crate) fn run(pin_dir: &Path) -> Result<()> {
    // Opened first, so that it takes a low descriptor number: freed when
    // the holder runs out of open files, it makes room to accept a client.
    let mut spare = fs::File::open("/dev/null").ok();
    let path = instance::holder_socket(pin_dir);
    let _only_holder = lock_instance(pin_dir, &path)?;
    if let Err(error) = raise_fd_limit() {
        eprintln!("portfwd hold: raising the open files limit: {error}");
    }
    // A socket file left by a holder that died; if it cannot go, the bind
    // below says why.
    fs::remove_file(&path).ok();
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    let events = host_events().context("subscribing to link, address and route changes")?;
    let mut held: BTreeMap<Hold, OwnedFd> = BTreeMap::new();
    let mut following = HostFollowing::new();
    super::sweep::start(pin_dir.to_path_buf());
    loop {
        following.catch_up(pin_dir);
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(events.as_fd(), PollFlags::POLLIN),
        ];
        poll(&mut fds, following.poll_timeout()).context("poll")?;
        let client_ready = fds[0].any().unwrap_or(false);
        if fds[1].any().unwrap_or(false) {
            following.host_changed(drain(&events));
        }
        if !client_ready {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) => {
                turn_away(&listener, &mut spare, &error);
                continue;
            }
        };
        match serve(pin_dir, stream, &mut held) {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) => eprintln!("portfwd hold: {error:#}"),
        }
        if !pin_dir.exists() {
            // `down` without a quit (an older CLI, or by hand): nothing to hold.
            break;
        }
    }
    drop(held);
    // Best effort: a stale socket file is removed by the next holder.
    fs::remove_file(&path).ok();
    Ok(())
}

/// One holder per instance, for its whole life: a second one (a CLI's and
/// `portfwd serve`'s starting at once) would unlink the first one's socket
/// and leave it holding ports that nobody can reach. The lock lasts as long
/// as the value returned.
fn lock_instance(pin_dir: &Path, socket: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(instance::run_dir())
        .with_context(|| format!("creating {}", instance::run_dir().display()))?;
    let lock_path = socket.with_extension("lock");
    let lock_file =
        fs::File::create(&lock_path).with_context(|| format!("opening {}", lock_path.display()))?;
    nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| anyhow!("a port holder already runs for {}", pin_dir.display()))
}

/// After a failed accept: the client stays pending and poll reports it again
/// at once, so the holder must not just try again. Out of open files, the
/// spare descriptor makes room to accept the client and tell it why (then it
/// is taken again); otherwise (or with no spare) the holder waits a moment.
fn turn_away(listener: &UnixListener, spare: &mut Option<fs::File>, error: &std::io::Error) {
    let out_of_files = matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    if out_of_files && spare.take().is_some() {
        if let Ok((mut stream, _)) = listener.accept() {
            writeln!(stream, "error the port holder has no open files left").ok();
        }
        *spare = fs::File::open("/dev/null").ok();
        eprintln!("portfwd hold: out of open files: a request was turned away");
        return;
    }
    eprintln!("portfwd hold: accepting a request: {error}");
    std::thread::sleep(ACCEPT_RETRY);
}

/// How long the holder waits before accepting again after a failure it
/// cannot make room for.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Lets the holder keep one socket per published address: the default
/// limit (often 1,024 or 20,000 open files) is below what tens of
/// thousands of mappings need. As root, up to the kernel's `fs.nr_open`.
fn raise_fd_limit() -> std::io::Result<()> {
    let most: libc::rlim_t = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let wanted = libc::rlimit {
            rlim_cur: most.max(limit.rlim_cur),
            rlim_max: most.max(limit.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            // Without CAP_SYS_RESOURCE: as far as the hard limit goes.
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Answers one request; false when asked to quit.
fn serve(pin_dir: &Path, stream: UnixStream, held: &mut BTreeMap<Hold, OwnedFd>) -> Result<bool> {
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    match line.trim_end() {
        "ping" => writeln!(writer, "pong")?,
        "build" => writeln!(writer, "build {}", super::build_id().unwrap_or_default())?,
        "quit" => {
            writeln!(writer, "bye")?;
            return Ok(false);
        }
        "sync" => {
            let busy = reconcile(pin_dir, held);
            reply(&mut writer, held, &busy)?;
        }
        update if update.starts_with("update") => {
            let busy = apply_update(update, held);
            reply(&mut writer, held, &busy)?;
        }
        other => writeln!(writer, "error unknown request {other:?}")?,
    }
    Ok(true)
}

fn reply(writer: &mut UnixStream, held: &BTreeMap<Hold, OwnedFd>, busy: &[String]) -> Result<()> {
    if busy.is_empty() {
        writeln!(writer, "ok {}", held.len())?;
    } else {
        writeln!(writer, "busy {}", busy.join(" "))?;
    }
    Ok(())
}

/// Applies `update +tcp/ADDR:PORT -udp/ADDR:PORT ...` (removals first,
/// as the CLI writes them); the ports another process holds (retried at
/// the next sync).
fn apply_update(line: &str, held: &mut BTreeMap<Hold, OwnedFd>) -> Vec<String> {
    let mut wanted = Vec::new();
    for token in line.split_whitespace().skip(1) {
        let (sign, rest) = token.split_at(1);
        let Some((protocol, addr)) = rest.split_once('/') else {
            continue;
        };
        let (Ok(protocol), Ok(addr)) = (protocol.parse::<Protocol>(), addr.parse::<SocketAddr>())
        else {
            continue;
        };
        if sign == "-" {
            held.remove(&(protocol, addr));
        } else if !held.contains_key(&(protocol, addr)) {
            wanted.push((protocol, addr));
        }
    }
    // One line may name a port twice; it is bound once.
    wanted.sort_unstable();
    wanted.dedup();
    hold_all(held, wanted)
}

/// Binds what the services map publishes and is not held, closes what is
/// held and no longer published. Returns the ports another process holds.
fn reconcile(pin_dir: &Path, held: &mut BTreeMap<Hold, OwnedFd>) -> Vec<String> {
    // Read without the state lock: the CLI holds it while it waits for us.
    let wanted: BTreeSet<Hold> = match PinnedMaps::open_unlocked(pin_dir).and_then(|m| m.mappings())
    {
        Ok(mappings) => mappings.iter().filter(|m| m.hold).map(hold_of).collect(),
        Err(error) => {
            eprintln!("portfwd hold: reading the mappings: {error:#}");
            return Vec::new();
        }
    };
    held.retain(|hold, _| wanted.contains(hold));
    let missing = wanted
        .into_iter()
        .filter(|hold| !held.contains_key(hold))
        .collect();
    hold_all(held, missing)
}

/// Binds each of `wanted` (none held yet) and keeps its socket; the ports
/// that could not be bound, as `ADDR/PROTOCOL`.
fn hold_all(held: &mut BTreeMap<Hold, OwnedFd>, wanted: Vec<Hold>) -> Vec<String> {
    let mut busy = Vec::new();
    for (hold, bound) in reserve_all(wanted, held.len()) {
        match bound {
            Ok(fd) => {
                held.insert(hold, fd);
            }
            Err(_) => busy.push(format!("{}/{}", hold.1, hold.0)),
        }
    }
    busy
}

fn hold_of(mapping: &Mapping) -> Hold {
    (mapping.protocol, mapping.host)
}

/// Open files kept free of held sockets: the holder must still accept
/// requests and open the maps when it holds all it can.
const SPARE_FILES: u64 = 64;

/// From this many ports on, a batch is bound on several threads.
const PARALLEL_FROM: usize = 512;

/// At most this many binding threads.
const MOST_THREADS: usize = 4;

/// Binds `wanted` with `held` sockets already open: each hold with its
/// socket, or why not. Beyond the open files the holder may have (less a
/// spare) a port fails with EMFILE rather than the holder running out of
/// files and no longer answering. A large batch is split over threads:
/// a port costs five syscalls (about 6 µs), most of the time a 10,000-port
/// `map` takes, and the kernel locks its bind and listen tables per hash
/// bucket, so the threads seldom wait for one another.
fn reserve_all(wanted: Vec<Hold>, held: usize) -> Vec<(Hold, nix::Result<OwnedFd>)> {
    let room = files_left(held);
    let reserve_one = |(index, hold): (usize, Hold)| {
        let bound = if index < room {
            reserve(hold.0, hold.1)
        } else {
            Err(nix::errno::Errno::EMFILE)
        };
        (hold, bound)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MOST_THREADS);
    if wanted.len() < PARALLEL_FROM || threads < 2 {
        return wanted.into_iter().enumerate().map(reserve_one).collect();
    }
    grow_descriptor_table(held + wanted.len().min(room));
    let numbered: Vec<(usize, Hold)> = wanted.into_iter().enumerate().collect();
    let chunk = numbered.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = numbered
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || part.iter().copied().map(reserve_one).collect::<Vec<_>>())
            })
            .collect();
        workers
            .into_iter()
            // A worker only makes syscalls; it cannot panic short of a bug.
            .flat_map(|worker| worker.join().expect("a binding thread panicked"))
            .collect()
    })
}

/// Makes the descriptor table hold `count` more than the standard three
/// while the holder has one thread: a process of several threads that
/// outgrows its table waits for an RCU grace period at every doubling
/// (milliseconds each), which the binding threads would otherwise do.
fn grow_descriptor_table(count: usize) {
    let Ok(null) = fs::File::open("/dev/null") else {
        return;
    };
    let highest = libc::c_int::try_from(count + 3).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own onto the
    // lowest free number from `highest`; the duplicate is closed at once.
    unsafe {
        let dup = libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest);
        if dup >= 0 {
            libc::close(dup);
        }
    }
}

/// How many more sockets the holder may open, keeping `SPARE_FILES` free.
fn files_left(held: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return usize::MAX;
    }
    let left = limit.rlim_cur.saturating_sub(held as u64 + SPARE_FILES);
    usize::try_from(left).unwrap_or(usize::MAX)
}

/// Binds `addr` the way a published port is held: a TCP listener that
/// drops every SYN (so it takes no connection) or a UDP socket that drops
/// everything
/// (`attach_hold_filter`). IPv6 wildcards are IPv6-only, so that the IPv4
/// and the IPv6 wildcard of one port are two separate holds.
pub(crate) fn reserve(protocol: Protocol, addr: SocketAddr) -> nix::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let kind = match protocol {
        Protocol::Tcp => SockType::Stream,
        Protocol::Udp => SockType::Datagram,
    };
    let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
    if protocol == Protocol::Tcp {
        // Lets the holder re-bind over TIME_WAIT leftovers; another
        // process still cannot bind while this socket listens. (Not on UDP,
        // where it would let others share the port.)
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    attach_hold_filter(&fd, protocol)?;
    match addr {
        SocketAddr::V4(v4) => bind(fd.as_raw_fd(), &SockaddrIn::from(v4))?,
        SocketAddr::V6(v6) => bind(fd.as_raw_fd(), &SockaddrIn6::from(v6))?,
    }
    if protocol == Protocol::Tcp {
        listen(&fd, Backlog::new(1).unwrap_or(Backlog::MAXCONN))?;
    }
    Ok(fd)
}

/// Attaches the filter of a held port. A UDP socket drops every datagram.
/// A TCP listener drops every SYN, so that no connection is ever made on
/// it, and takes the other segments, which a listener answers as a closed
/// port does (a reset for an ACK): a segment of a flow that the TC path
/// forgot (evicted from a full table, expired) gets the host's reset, and
/// its client fails at once instead of retrying into silence for minutes.
/// Each filter is one eBPF socket filter loaded once per process and shared
/// by every socket, where a classic filter is converted and JIT-compiled
/// again for each socket (most of the cost of holding 10,000 ports); the
/// classic filter if loading fails.
pub(crate) fn attach_hold_filter(fd: &OwnedFd, protocol: Protocol) -> nix::Result<()> {
    static DROP_ALL: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    static DROP_SYN: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    let shared = match protocol {
        Protocol::Udp => DROP_ALL.get_or_init(load_drop_all_program),
        Protocol::Tcp => DROP_SYN.get_or_init(load_drop_syn_program),
    };
    if let Some(program) = shared {
        let program_fd: libc::c_int = program.as_raw_fd();
        // SAFETY: the option value is one c_int, as SO_ATTACH_BPF takes.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_BPF,
                (&raw const program_fd).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    attach_classic_filter(fd, protocol)
}

/// Loads `r0 = 0; exit` as a BPF_PROG_TYPE_SOCKET_FILTER program.
fn load_drop_all_program() -> Option<OwnedFd> {
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    datapath::load_constant_program(BPF_PROG_TYPE_SOCKET_FILTER, 0, 0)
}

/// The TCP flags' offset in the TCP header, where a socket filter of a TCP
/// socket starts reading (the IP header is pulled by then).
const TCP_FLAGS_OFF: i32 = 13;
const TCP_SYN: i32 = 0x02;

/// Loads the TCP listener's filter: a SYN is dropped (0 bytes kept), any
/// other segment kept whole.
fn load_drop_syn_program() -> Option<OwnedFd> {
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    datapath::load_program(
        BPF_PROG_TYPE_SOCKET_FILTER,
        0,
        &[
            // r6 = r1 (the skb, where LD_ABS reads from)
            datapath::bpf_insn(0xbf, 0x16, 0, 0),
            // r0 = the TCP flags byte (LD_ABS, byte)
            datapath::bpf_insn(0x30, 0, 0, TCP_FLAGS_OFF),
            // r0 &= SYN; if r0 != 0 goto drop
            datapath::bpf_insn(0x57, 0, 0, TCP_SYN),
            datapath::bpf_insn(0x55, 0, 2, 0),
            // keep the whole segment: r0 = u32::MAX; exit
            datapath::bpf_insn(0xb7, 0, 0, -1),
            datapath::bpf_insn(0x95, 0, 0, 0),
            // drop: r0 = 0; exit
            datapath::bpf_insn(0xb7, 0, 0, 0),
            datapath::bpf_insn(0x95, 0, 0, 0),
        ],
    )
}

/// The classic BPF socket filter of `attach_hold_filter`: for UDP `ret #0`
/// (every datagram dropped), for TCP the SYN test.
fn attach_classic_filter(fd: &OwnedFd, protocol: Protocol) -> nix::Result<()> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let drop_all = op(libc::BPF_RET | libc::BPF_K, 0, 0, 0);
    let mut program = match protocol {
        Protocol::Udp => vec![drop_all],
        Protocol::Tcp => vec![
            op(
                libc::BPF_LD | libc::BPF_B | libc::BPF_ABS,
                0,
                0,
                TCP_FLAGS_OFF as u32,
            ),
            op(
                libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
                0,
                1,
                TCP_SYN as u32,
            ),
            drop_all,
            op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
        ],
    };
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: fprog points at a valid one-instruction program for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    nix::errno::Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_ports_refuse_other_binds_and_drop_traffic() {
        if nix::unistd::geteuid().is_root() {
            assert!(
                load_drop_all_program().is_some(),
                "the shared UDP filter loads"
            );
            assert!(
                load_drop_syn_program().is_some(),
                "the shared TCP filter loads"
            );
        }
        // Loopback, ephemeral ports from the kernel: nothing else on the host
        // is touched.
        let fd = reserve(Protocol::Udp, "127.0.0.1:0".parse().unwrap()).unwrap();
        let local: SocketAddr = nix::sys::socket::getsockname::<SockaddrIn>(fd.as_raw_fd())
            .map(|a| SocketAddr::from(std::net::SocketAddrV4::from(a)))
            .unwrap();
        assert!(
            std::net::UdpSocket::bind(local).is_err(),
            "a second bind must fail"
        );
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"x", local).unwrap();
        let mut buf = [0u8; 4];
        let n = nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        );
        assert!(n.is_err(), "the filter must drop every datagram");
    }

    /// A held TCP port takes no connection, and resets a segment of one it
    /// does not know: its listener's filter drops the SYN (a connect goes
    /// unanswered: not refused, not accepted) and lets an ACK through,
    /// which the listener answers with a reset. With the shared eBPF
    /// filter and with the classic one it falls back to.
    #[test]
    fn held_tcp_ports_take_no_connection_and_reset_strays() {
        for classic in [false, true] {
            if !classic && load_drop_syn_program().is_none() {
                continue; // not root: no eBPF socket filter
            }
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            if classic {
                attach_classic_filter(&fd, Protocol::Tcp).unwrap();
            } else {
                attach_hold_filter(&fd, Protocol::Tcp).unwrap();
            }
            let any = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0);
            bind(fd.as_raw_fd(), &SockaddrIn::from(any)).unwrap();
            listen(&fd, Backlog::new(1).unwrap()).unwrap();
            let local = nix::sys::socket::getsockname::<SockaddrIn>(fd.as_raw_fd())
                .map(std::net::SocketAddrV4::from)
                .unwrap();
            let connect = std::net::TcpStream::connect_timeout(
                &local.into(),
                std::time::Duration::from_millis(300),
            );
            assert!(
                matches!(&connect, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
                "classic {classic}: {connect:?}"
            );
            if nix::unistd::geteuid().is_root() {
                assert!(
                    stray_ack_is_reset(local.port()),
                    "classic {classic}: an ACK to the listener is reset"
                );
            }
        }
    }

    /// Sends a bare ACK from 127.0.0.1:40999 to 127.0.0.1:`port` through a
    /// raw socket, and whether a reset from `port` comes back within a
    /// second (the raw socket sees every TCP segment the host receives).
    fn stray_ack_is_reset(port: u16) -> bool {
        use etherparse::TcpHeader;
        const STRAY_PORT: u16 = 40999;
        let raw = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            nix::sys::socket::SockProtocol::Tcp,
        )
        .unwrap();
        let mut ack = TcpHeader::new(STRAY_PORT, port, 1_000, 64_000);
        ack.ack = true;
        ack.acknowledgment_number = 1_000;
        let loopback = std::net::Ipv4Addr::LOCALHOST.octets();
        ack.checksum = ack.calc_checksum_ipv4_raw(loopback, loopback, &[]).unwrap();
        let to = SockaddrIn::from(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::LOCALHOST,
            port,
        ));
        nix::sys::socket::sendto(
            raw.as_raw_fd(),
            &ack.to_bytes(),
            &to,
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut buf = [0u8; 128];
        while std::time::Instant::now() < deadline {
            let Ok(n) = nix::sys::socket::recv(
                raw.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) else {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            };
            // An IPv4 header (its length in the first byte), then TCP.
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let Ok((tcp, _)) = TcpHeader::from_slice(&buf[ihl..n]) else {
                continue;
            };
            if tcp.source_port == port && tcp.destination_port == STRAY_PORT && tcp.rst {
                return true;
            }
        }
        false
    }
}
