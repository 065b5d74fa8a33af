//! Facts about the host that the loader and the commands need: privileges
//! (read with `caps`),
//! the cgroup v2 and bpf filesystems, the host network namespace, the host's
//! own addresses and which ports host sockets already hold.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use crate::model::Protocol;

pub(crate) mod netlink;
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

/// Whether a host socket holds `port` on any address (probed by binding the
/// wildcard of each family, as docker does when it picks a port).
pub(crate) fn port_in_use(protocol: Protocol, port: u16) -> bool {
    let addrs = [
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
    ];
    addrs.iter().any(|addr| match protocol {
        // std sets SO_REUSEADDR, so TIME_WAIT leftovers do not count.
        Protocol::Tcp => TcpListener::bind(addr).is_err(),
        Protocol::Udp => UdpSocket::bind(addr).is_err(),
    })
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
