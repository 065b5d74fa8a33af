//! Facts about the host that the loader and the commands need: privileges
//! (read with `caps`),
//! the cgroup v2 and bpf filesystems, the host network namespace, the host's
//! own addresses and which ports host sockets already hold.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use crate::model::Protocol;

pub(crate) mod netlink;
pub(crate) mod netns;
pub(crate) mod sock_diag;

/// Loading, attaching and pinning programs, mounting bpffs.
pub(crate) const LOAD: &[Capability] = &[
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
];
/// Changing mappings (which may attach a TC program towards a container).
pub(crate) const CHANGE: &[Capability] = &[Capability::CAP_BPF, Capability::CAP_NET_ADMIN];

/// Fails, naming every missing capability, unless the process has all of
/// `needed`.
pub(crate) fn require_capabilities(command: &str, needed: &[Capability]) -> Result<()> {
    let effective = caps::read(None, CapSet::Effective)
        .map_err(|error| anyhow!("reading this process's capabilities: {error}"))?;
    check_capabilities(command, needed, &effective)
}

/// CAP_SYS_ADMIN stands in for CAP_BPF, as the kernel allows.
fn check_capabilities(command: &str, needed: &[Capability], effective: &CapsHashSet) -> Result<()> {
    let has = |cap: &Capability| {
        effective.contains(cap)
            || (*cap == Capability::CAP_BPF && effective.contains(&Capability::CAP_SYS_ADMIN))
    };
    let missing: Vec<String> = needed
        .iter()
        .filter(|c| !has(c))
        .map(|c| c.to_string())
        .collect();
    if !missing.is_empty() {
        let all: Vec<String> = needed.iter().map(|c| c.to_string()).collect();
        bail!(
            "portfwd {command} needs {} (missing: {}): run it as root",
            all.join(", "),
            missing.join(", ")
        );
    }
    Ok(())
}

/// The cgroup v2 mount point, from /proc/self/mountinfo (it is not always
/// /sys/fs/cgroup: hybrid layouts mount it at /sys/fs/cgroup/unified).
pub(crate) fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount_in(&mountinfo)
        .context("no cgroup2 filesystem is mounted (see /proc/self/mountinfo); pass --cgroup PATH")
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    // Fields: id parent major:minor root mount-point options... - fstype source super-options
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(path: &str) -> String {
    path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub(crate) fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes sure the pin directory's parent is a bpf filesystem, mounting the
/// standard one at /sys/fs/bpf when nothing is mounted there yet.
pub(crate) fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting the bpf filesystem on /sys/fs/bpf")?;
        return Ok(());
    }
    bail!(
        "{} is not on a bpf filesystem (mount one with `mount -t bpf bpf {}`)",
        pin_dir.display(),
        parent.display()
    )
}

/// The cookie of this process's network namespace: the programs translate
/// only sockets of this namespace.
pub(crate) fn netns_cookie() -> Result<u64> {
    let socket =
        UdpSocket::bind("127.0.0.1:0").context("opening a socket to read the netns cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading SO_NETNS_COOKIE (needs Linux 5.14)");
    }
    Ok(cookie)
}

/// Every address configured on an interface of this network namespace.
pub(crate) fn local_addresses() -> Result<Vec<IpAddr>> {
    let mut addresses = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs().context("listing the host's addresses")? {
        let Some(address) = ifaddr.address else {
            continue;
        };
        if let Some(v4) = address.as_sockaddr_in() {
            addresses.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = address.as_sockaddr_in6() {
            addresses.push(IpAddr::V6(v6.ip()));
        }
    }
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// The ports host sockets hold (TCP listeners, bound UDP sockets), as one
/// command asks about them: a few addresses are probed with a bind each
/// (six system calls, whatever else is published); many, or every port of
/// a range, are looked up in one read of /proc/net/{tcp,tcp6,udp,udp6},
/// made on first use. A command that looks at thousands of ports reads
/// each table once; one that adds a port does not read the tens of
/// thousands of sockets the holder keeps.
#[derive(Debug, Default)]
pub(crate) struct BusyPorts {
    table: std::cell::OnceCell<HashMap<(Protocol, u16), Vec<IpAddr>>>,
}

/// Up to this many addresses, `holds_any` probes each with a bind.
const PROBE_AT_MOST: usize = 64;

impl BusyPorts {
    pub(crate) fn new() -> Self {
        BusyPorts::default()
    }

    fn table(&self) -> &HashMap<(Protocol, u16), Vec<IpAddr>> {
        // Unreadable tables (no /proc/net): nothing is known to be busy; the
        // holder then reports the ports it cannot bind.
        self.table.get_or_init(|| scan_tables().unwrap_or_default())
    }

    /// Whether a socket holds `port` on any address (automatic ports avoid
    /// those, as docker does).
    pub(crate) fn any(&self, protocol: Protocol, port: u16) -> bool {
        self.table().contains_key(&(protocol, port))
    }

    /// The first of `addrs` that a host socket holds.
    pub(crate) fn holds_any<'a>(
        &self,
        addrs: impl ExactSizeIterator<Item = (Protocol, &'a SocketAddr)>,
    ) -> Option<(Protocol, SocketAddr)> {
        let probe = addrs.len() <= PROBE_AT_MOST && self.table.get().is_none();
        addrs
            .map(|(protocol, &addr)| (protocol, addr))
            .find(|&(protocol, addr)| {
                if probe {
                    bind_refused(protocol, addr)
                } else {
                    table_holds(self.table(), protocol, addr)
                }
            })
    }
}

/// Whether binding `addr` fails because a socket holds it.
fn bind_refused(protocol: Protocol, addr: SocketAddr) -> bool {
    // std sets SO_REUSEADDR on TCP, so TIME_WAIT leftovers do not count.
    let bound = match protocol {
        Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
        Protocol::Udp => UdpSocket::bind(addr).map(drop),
    };
    bound.is_err_and(|error| error.raw_os_error() == Some(libc::EADDRINUSE))
}

fn scan_tables() -> Result<HashMap<(Protocol, u16), Vec<IpAddr>>> {
    let mut held: HashMap<(Protocol, u16), Vec<IpAddr>> = HashMap::new();
    // TCP listeners through sock_diag, asking for that one state: the kernel
    // then walks only its listening sockets, where /proc/net/tcp walks every
    // connection of the host too (most of the cost of a large `map`).
    let listeners = [libc::AF_INET, libc::AF_INET6]
        .into_iter()
        .map(|family| sock_diag::dump(family as u8, libc::IPPROTO_TCP as u8, 1 << TCP_LISTEN))
        .collect::<std::io::Result<Vec<_>>>();
    let tables: &[(&str, Protocol)] = match listeners {
        Ok(listeners) => {
            for socket in listeners.into_iter().flatten() {
                held.entry((Protocol::Tcp, socket.local_port))
                    .or_default()
                    .push(socket.local.to_canonical());
            }
            &[
                ("/proc/net/udp", Protocol::Udp),
                ("/proc/net/udp6", Protocol::Udp),
            ]
        }
        // No sock_diag for TCP (a kernel without inet_diag): the tables.
        Err(_) => &[
            ("/proc/net/tcp", Protocol::Tcp),
            ("/proc/net/tcp6", Protocol::Tcp),
            ("/proc/net/udp", Protocol::Udp),
            ("/proc/net/udp6", Protocol::Udp),
        ],
    };
    for &(table, protocol) in tables {
        let text = match fs::read_to_string(table) {
            Ok(text) => text,
            // No IPv6 on this host.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error).with_context(|| format!("reading {table}")),
        };
        add_table(&mut held, &text, protocol);
    }
    Ok(held)
}

fn add_table(held: &mut HashMap<(Protocol, u16), Vec<IpAddr>>, table: &str, protocol: Protocol) {
    for (ip, port) in bound_sockets(table, protocol) {
        held.entry((protocol, port)).or_default().push(ip);
    }
}

/// Whether a socket of `held` holds `addr` itself: the same address, or a
/// wildcard on either side (an IPv6 wildcard socket may be dual-stack, so
/// it holds IPv4 addresses too).
fn table_holds(
    held: &HashMap<(Protocol, u16), Vec<IpAddr>>,
    protocol: Protocol,
    addr: SocketAddr,
) -> bool {
    let wanted = addr.ip().to_canonical();
    held.get(&(protocol, addr.port()))
        .into_iter()
        .flatten()
        .any(|&held| {
            held == wanted
                || held == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                || (held.is_unspecified() && held.is_ipv4() == wanted.is_ipv4())
                || (wanted.is_unspecified() && held.is_ipv4() == wanted.is_ipv4())
        })
}

/// The local (address, port) of each socket in a /proc/net table that
/// holds its port: TCP listeners, and every UDP socket. IPv4-mapped IPv6
/// addresses come out as IPv4.
/// The TCP state LISTEN (include/net/tcp_states.h).
const TCP_LISTEN: u32 = 10;

fn bound_sockets(table: &str, protocol: Protocol) -> impl Iterator<Item = (IpAddr, u16)> + '_ {
    const TCP_LISTEN: &str = "0A";
    table.lines().skip(1).filter_map(move |line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        if protocol == Protocol::Tcp && state != TCP_LISTEN {
            return None;
        }
        let (addr, port) = local.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some((parse_proc_addr(addr)?.to_canonical(), port))
    })
}

/// An address as /proc/net prints it: the bytes of each 32-bit word, in
/// network order, printed as a host-order number.
fn parse_proc_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let text = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(text, 16).ok()?.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// The process holding `port` (a TCP listener, or a UDP socket), as
/// `name (pid N)`, found through /proc: the socket's inode in
/// /proc/net/{tcp,tcp6,udp,udp6}, then the process with that inode open.
pub(crate) fn port_owner(protocol: Protocol, port: u16) -> Option<String> {
    let tables: [&str; 2] = match protocol {
        Protocol::Tcp => ["/proc/net/tcp", "/proc/net/tcp6"],
        Protocol::Udp => ["/proc/net/udp", "/proc/net/udp6"],
    };
    let inodes: Vec<u64> = tables
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .flat_map(|text| socket_inodes(&text, protocol, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes
        .iter()
        .map(|inode| format!("socket:[{inode}]"))
        .collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let owns = fds.flatten().any(|fd| {
            fs::read_link(fd.path())
                .is_ok_and(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
        });
        if owns {
            let name = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some(format!("{} (pid {pid})", name.trim_end()));
        }
    }
    None
}

/// Inodes of the sockets bound to local `port` in a /proc/net table (for
/// TCP, listeners only).
fn socket_inodes(table: &str, protocol: Protocol, port: u16) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let state = *fields.get(3)?;
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            let listening = protocol == Protocol::Udp || state == TCP_LISTEN;
            (u16::from_str_radix(local_port, 16).ok()? == port && listening && inode != 0)
                .then_some(inode)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mountinfo = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
        let escaped = "32 31 0:27 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount_in(escaped), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn socket_tables_are_parsed() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0
";
        assert_eq!(socket_inodes(table, Protocol::Tcp, 8080), [4242]);
        assert_eq!(socket_inodes(table, Protocol::Udp, 8080), [4242, 4343]);
        assert!(socket_inodes(table, Protocol::Tcp, 8081).is_empty());
    }

    #[test]
    fn busy_ports_come_from_one_read_of_the_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0
";
        let tcp6 = "  sl  local_address rem_address   st
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A
   1: 0000000000000000FFFF00000200000A:1F92 00000000000000000000000000000000:0000 0A
";
        let mut held = HashMap::new();
        add_table(&mut held, tcp, Protocol::Tcp);
        add_table(&mut held, tcp6, Protocol::Tcp);
        let busy = BusyPorts::new();
        busy.table.set(held).unwrap();
        let at = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let holds = |addr: &str| {
            busy.holds_any([(Protocol::Tcp, &at(addr))].into_iter())
                .is_some()
        };
        // A listener on 127.0.0.1:8080; a connected socket holds nothing.
        assert!(busy.any(Protocol::Tcp, 8080) && !busy.any(Protocol::Udp, 8080));
        assert!(!busy.any(Protocol::Tcp, 50000));
        assert!(holds("127.0.0.1:8080"));
        assert!(holds("0.0.0.0:8080"));
        assert!(!holds("127.0.0.2:8080"));
        assert!(!holds("[::]:8080"));
        // [::]:8081 may be dual-stack: it holds every address.
        assert!(holds("10.0.0.1:8081"));
        assert!(holds("[::1]:8081"));
        // An IPv4-mapped listener is an IPv4 one.
        assert!(holds("10.0.0.2:8082"));
        assert!(!holds("10.0.0.3:8082"));
        // This process's own listener, from the real tables and by a probe.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let busy = BusyPorts::new();
        assert!(
            busy.holds_any([(Protocol::Tcp, &addr)].into_iter())
                .is_some()
        );
        assert!(busy.table.get().is_none(), "one address is probed");
        // Listeners of both families (through sock_diag), and not the
        // connections: a client's port is no listener's.
        let listener6 = TcpListener::bind("[::1]:0").unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let busy = BusyPorts::new();
        assert!(busy.any(Protocol::Tcp, addr.port()));
        assert!(busy.any(Protocol::Tcp, listener6.local_addr().unwrap().port()));
        assert!(!busy.any(Protocol::Tcp, client.local_addr().unwrap().port()));
        assert!(
            busy.holds_any([(Protocol::Tcp, &addr)].into_iter())
                .is_some()
        );
        drop((client, listener6));
        assert!(
            busy.holds_any([(Protocol::Tcp, &addr)].into_iter())
                .is_some()
        );
        drop(listener);
        assert!(
            BusyPorts::new()
                .holds_any([(Protocol::Tcp, &addr)].into_iter())
                .is_none()
        );
    }

    #[test]
    fn the_owner_of_a_listening_port_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let owner = port_owner(Protocol::Tcp, port).unwrap();
        assert!(
            owner.contains(&format!("(pid {})", std::process::id())),
            "{owner}"
        );
    }

    #[test]
    fn missing_capabilities_are_named() {
        let only_sys_admin = CapsHashSet::from([Capability::CAP_SYS_ADMIN]);
        let err = check_capabilities("map", CHANGE, &only_sys_admin)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing: CAP_NET_ADMIN"), "{err}");
        assert!(!err.contains("missing: CAP_BPF"), "{err}");
        assert!(check_capabilities("up", LOAD, &LOAD.iter().copied().collect()).is_ok());
    }

    #[test]
    fn loopback_is_a_local_address() {
        let addresses = local_addresses().unwrap();
        assert!(
            addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addresses:?}"
        );
    }
}
