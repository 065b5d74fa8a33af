//! The port holder: a small background process, started by `portfwd up`
//! and stopped by `portfwd down`, that keeps every published host port
//! bound, as docker does:
//! - no other process can bind a published port (it would get EADDRINUSE,
//!   instead of silently losing its traffic to the container);
//! - published ports show in `ss -lntp` / `ss -lnup` as held by `portfwd`.
//!
//! The sockets never see traffic: TCP listeners and UDP sockets carry a
//! drop-all socket filter, and portfwd's programs translate connections to
//! published ports before any socket lookup.
//!
//! The holder owns no state: on every `sync` it reads the pinned services
//! map and binds what is missing, closes what is gone. A port that another
//! process already holds (podman's conmon holds its containers' ports) is
//! reported as busy and retried at the next sync. It also watches the
//! host's addresses (rtnetlink) and keeps the local addresses map current,
//! so wildcard mappings follow address changes.
//!
//! Protocol on its unix socket, one line each way: `sync` (hold exactly
//! what the map publishes) or `update +tcp/ADDR:PORT -udp/ADDR:PORT ...`
//! (a change's difference, so that a change costs what it changes, not what
//! is published) -> `ok HELD` or `busy ADDR:PORT/PROTO ...`; `ping` ->
//! `pong`; `quit` -> `bye`.

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
            process::CommandExt,
        },
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{
        AddressFamily, Backlog, NetlinkAddr, SockFlag, SockProtocol, SockType, SockaddrIn,
        SockaddrIn6, bind, listen, setsockopt, socket, sockopt,
    },
};

use crate::{
    host,
    mapping::Mapping,
    maps::{PinnedMaps, StateLock},
    publish::Protocol,
};

const RUN_DIR: &str = "/run/portfwd";
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the holder of the instance pinned at `pin_dir` listens.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    Path::new(RUN_DIR).join(format!("holder{}.sock", instance_tag(pin_dir)))
}

/// One holder per pin directory: `/sys/fs/bpf/portfwd` -> `_sys_fs_bpf_portfwd`.
pub fn instance_tag(pin_dir: &Path) -> String {
    pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Sends one request and returns the reply line.
fn request(pin_dir: &Path, line: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket_path(pin_dir))?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    writeln!(stream, "{line}")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply.trim_end().to_owned())
}

pub fn is_running(pin_dir: &Path) -> bool {
    request(pin_dir, "ping").is_ok_and(|reply| reply == "pong")
}

/// Starts the holder unless it runs; waits (bounded) until it answers.
pub fn ensure_running(pin_dir: &Path) -> Result<()> {
    if is_running(pin_dir) {
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding the portfwd binary")?;
    Command::new(exe)
        .arg("--bpffs")
        .arg(pin_dir)
        .arg("hold")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C aimed at the CLI does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the port holder")?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while Instant::now() < deadline {
        if is_running(pin_dir) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!(
        "the port holder did not start (see `portfwd --bpffs {} hold`)",
        pin_dir.display()
    )
}

/// Asks the holder to hold exactly the published ports; the ports it could
/// not bind (held by another process) are returned.
pub fn sync(pin_dir: &Path) -> Result<Vec<String>> {
    ensure_running(pin_dir)?;
    let reply = request(pin_dir, "sync").context("asking the port holder to sync")?;
    parse_reply(&reply)
}

/// Tells the holder what a change added and removed (a holder that was not
/// running starts with a full sync instead).
pub fn update(pin_dir: &Path, added: &[Mapping], removed: &[Mapping]) -> Result<Vec<String>> {
    if !is_running(pin_dir) {
        return sync(pin_dir);
    }
    let mut line = String::from("update");
    for (sign, mappings) in [('-', removed), ('+', added)] {
        for m in mappings.iter().filter(|m| m.hold) {
            line.push_str(&format!(" {sign}{}/{}", m.protocol, m.host));
        }
    }
    let reply = request(pin_dir, &line).context("asking the port holder to update")?;
    parse_reply(&reply)
}

fn parse_reply(reply: &str) -> Result<Vec<String>> {
    match reply.split_once(' ') {
        Some(("ok", _)) => Ok(Vec::new()),
        Some(("busy", ports)) => Ok(ports.split(' ').map(str::to_owned).collect()),
        _ => bail!("the port holder answered {reply:?}"),
    }
}

/// Stops the holder, releasing every port; waits (bounded) until it is gone.
pub fn stop(pin_dir: &Path) -> Result<()> {
    if request(pin_dir, "quit").is_err() {
        return Ok(());
    }
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while Instant::now() < deadline {
        if !is_running(pin_dir) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the port holder did not stop")
}

/// A held port: protocol and the address bound.
type Hold = (Protocol, SocketAddr);

/// The holder process (`portfwd hold`, started by `up`).
pub fn run(pin_dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(RUN_DIR)
        .with_context(|| format!("creating {RUN_DIR}"))?;
    let path = socket_path(pin_dir);
    if is_running(pin_dir) {
        bail!("a port holder already runs for {}", pin_dir.display());
    }
    let _ = fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    let addresses = address_events().context("subscribing to address changes")?;
    let mut held: BTreeMap<Hold, OwnedFd> = BTreeMap::new();
    let mut addresses_stale = true;
    loop {
        if addresses_stale {
            addresses_stale = !refresh_local_addresses(pin_dir);
        }
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(addresses.as_fd(), PollFlags::POLLIN),
        ];
        // Wake up every second to retry a deferred address refresh.
        poll(&mut fds, PollTimeout::from(1000u16)).context("poll")?;
        let client_ready = fds[0].any().unwrap_or(false);
        if fds[1].any().unwrap_or(false) {
            drain(&addresses);
            addresses_stale = true;
        }
        if !client_ready {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
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
    let _ = fs::remove_file(&path);
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

/// Applies `update +tcp/ADDR:PORT -udp/ADDR:PORT ...`; the ports another
/// process holds (retried at the next sync).
fn apply_update(line: &str, held: &mut BTreeMap<Hold, OwnedFd>) -> Vec<String> {
    let mut busy = Vec::new();
    for token in line.split_whitespace().skip(1) {
        let (sign, rest) = token.split_at(1);
        let Some((protocol, addr)) = rest.split_once('/') else {
            continue;
        };
        let (Ok(protocol), Ok(addr)) = (protocol.parse::<Protocol>(), addr.parse::<SocketAddr>())
        else {
            continue;
        };
        let hold = (protocol, addr);
        if sign == "-" {
            held.remove(&hold);
        } else if let std::collections::btree_map::Entry::Vacant(slot) = held.entry(hold) {
            match reserve(protocol, addr) {
                Ok(fd) => {
                    slot.insert(fd);
                }
                Err(_) => busy.push(format!("{addr}/{protocol}")),
            }
        }
    }
    busy
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
    let mut busy = Vec::new();
    for hold in wanted {
        if held.contains_key(&hold) {
            continue;
        }
        match reserve(hold.0, hold.1) {
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

/// Binds `addr` the way a published port is held: a TCP listener or a UDP
/// socket that drops everything. IPv6 wildcards are IPv6-only, so that the
/// IPv4 and the IPv6 wildcard of one port are two separate holds.
pub fn reserve(protocol: Protocol, addr: SocketAddr) -> nix::Result<OwnedFd> {
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
    attach_drop_all_filter(&fd)?;
    match addr {
        SocketAddr::V4(v4) => bind(fd.as_raw_fd(), &SockaddrIn::from(v4))?,
        SocketAddr::V6(v6) => bind(fd.as_raw_fd(), &SockaddrIn6::from(v6))?,
    }
    if protocol == Protocol::Tcp {
        listen(&fd, Backlog::new(1).unwrap_or(Backlog::MAXCONN))?;
    }
    Ok(fd)
}

/// A classic BPF socket filter of one instruction, `ret #0`: every packet
/// that reaches the socket is dropped.
pub fn attach_drop_all_filter(fd: &OwnedFd) -> nix::Result<()> {
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
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

/// An rtnetlink socket that becomes readable when an address is added or
/// removed anywhere on the host.
fn address_events() -> Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )?;
    let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    Ok(fd)
}

/// Reads and discards pending notifications (bounded): only "something
/// changed" matters, the addresses are then read afresh.
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8192];
    for _ in 0..64 {
        if nix::unistd::read(fd.as_raw_fd(), &mut buf).unwrap_or(0) == 0 {
            break;
        }
    }
}

/// Writes the host's current addresses to the local addresses map; false
/// when the state lock is busy (retried a second later, never waited for:
/// the CLI may hold it while it waits for this process).
fn refresh_local_addresses(pin_dir: &Path) -> bool {
    let Ok(Some(lock)) = StateLock::try_acquire(pin_dir) else {
        return false;
    };
    let result = PinnedMaps::open(pin_dir, &lock)
        .and_then(|mut maps| maps.sync_local_addrs(&host::local_addresses()?));
    if let Err(error) = result {
        eprintln!("portfwd hold: refreshing local addresses: {error:#}");
    }
    true
}

/// The bind address a test for "is this published address free?" uses.
pub fn probe(protocol: Protocol, addr: SocketAddr) -> Result<(), String> {
    reserve(protocol, addr).map(drop).map_err(|errno| {
        let owner = host::port_owner(protocol, addr.port())
            .map(|owner| format!(" by {owner}"))
            .unwrap_or_default();
        match errno {
            nix::errno::Errno::EADDRINUSE => format!("in use{owner}"),
            other => other.desc().to_owned(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_tags_are_file_names() {
        assert_eq!(
            instance_tag(Path::new("/sys/fs/bpf/portfwd")),
            "_sys_fs_bpf_portfwd"
        );
        assert_eq!(instance_tag(Path::new("/x/a b.c")), "_x_a_b_c");
    }

    #[test]
    fn held_ports_refuse_other_binds_and_drop_traffic() {
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
}
