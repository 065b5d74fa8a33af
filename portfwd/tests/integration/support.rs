//! Test topology: network namespaces with veth pairs that the tests create
//! and always remove (Drop), servers running inside them, and the real
//! `portfwd` binary driven with its own pin directory.
//!
//! These tests need root (they load eBPF programs and create namespaces);
//! run them with `cargo xtask test`. Without root they print why and pass
//! trivially, so that `cargo test` stays usable for the unit tests.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use portfwd::model::{HostPorts, PublishSpec};
pub(crate) use portfwd_testkit::{
    netns,
    serve::{
        Handler, Server, TIMEOUT, fetch, serve_udp, serve_udp_whole, udp_ask, udp_exchange,
        udp_roundtrip,
    },
};

pub(crate) const PORTFWD: &str = env!("CARGO_BIN_EXE_portfwd");
/// The tests' own pin directory, so that they never touch a real instance
/// (PORTFWD_TEST_BPFFS overrides it, for two test runs at once).
pub(crate) fn pin_dir() -> String {
    std::env::var("PORTFWD_TEST_BPFFS").unwrap_or_else(|_| "/sys/fs/bpf/portfwd-test".into())
}

/// The running instance's pinned LRU hash `map` (the conntrack, the
/// fragments map), to read or change by hand.
pub(crate) fn pinned_lru_hash<K: aya::Pod, V: aya::Pod>(
    map: &portfwd_common::MapDef,
) -> aya::maps::HashMap<aya::maps::MapData, K, V> {
    let path = std::path::Path::new(&pin_dir()).join(map.name);
    let data = aya::maps::MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("the pinned {}: {e}", map.name));
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap()
}

/// Every entry of the running instance's conntrack, both tables
/// (established TCP and answered UDP flows in `pf_conntrack`, the others
/// in `pf_ct_opening`).
pub(crate) fn conntrack_entries() -> Vec<(portfwd_common::CtKey, portfwd_common::CtValue)> {
    use portfwd_common::{CONNTRACK, CONNTRACK_OPENING, CtKey, CtValue};
    [CONNTRACK, CONNTRACK_OPENING]
        .iter()
        .flat_map(|table| {
            pinned_lru_hash::<CtKey, CtValue>(table)
                .iter()
                .filter_map(Result::ok)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether the running instance's `pf_container_link_bits` lists the
/// interface of index `ifindex` (an interface towards containers).
pub(crate) fn container_link_listed(ifindex: u32) -> bool {
    use portfwd_common::{CONTAINER_LINKS, link_bit};
    let path = std::path::Path::new(&pin_dir()).join(CONTAINER_LINKS.name);
    let data = aya::maps::MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("the pinned {}: {e}", CONTAINER_LINKS.name));
    let bits: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    let (word, bit) = link_bit(ifindex);
    bits.get(&word, 0).is_ok_and(|bits| bits & bit != 0)
}

/// The index of the host's interface `ifname`.
pub(crate) fn ifindex_of(ifname: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
        .unwrap_or_else(|e| panic!("the index of {ifname}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// Tests share the cgroup root and the pin directory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Serializes the test and checks for root; None (with a message) to skip.
pub(crate) fn root_test(name: &str) -> Option<MutexGuard<'static, ()>> {
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

pub(crate) fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Runs a command that must succeed.
pub(crate) fn sh(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `portfwd` binary with the tests' pin directory.
pub(crate) fn portfwd(args: &[&str]) -> Output {
    let dir = pin_dir();
    let mut all = vec!["--bpffs", dir.as_str()];
    all.extend_from_slice(args);
    run(PORTFWD, &all)
}

/// `portfwd` that must succeed; returns stdout.
pub(crate) fn portfwd_ok(args: &[&str]) -> String {
    if args.first() == Some(&"map") {
        refuse_ephemeral_host_ports(args);
    }
    let out = portfwd(args);
    assert!(
        out.status.success(),
        "portfwd {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails a test whose `map` publishes a host port inside the kernel's
/// ephemeral range (`ip_local_port_range`): any client connection of the
/// machine, or a TIME_WAIT an earlier test left, may hold that port just
/// then, and `map` rightly refuses it (a CI run failed so, on 47870).
/// Automatic ports, which come from that range by design, are not checked.
fn refuse_ephemeral_host_ports(args: &[&str]) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".into());
    let mut bounds = range
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (Some(low), Some(high)) = (bounds.next(), bounds.next()) else {
        return;
    };
    for spec in args
        .iter()
        .filter_map(|arg| arg.parse::<PublishSpec>().ok())
    {
        let hosts = match spec.host_ports {
            HostPorts::Auto => continue,
            HostPorts::Each(hosts) | HostPorts::Pool(hosts) => hosts,
        };
        assert!(
            hosts.end < low || hosts.start > high,
            "map {args:?}: host ports {}-{} reach into the kernel's ephemeral range \
             {low}-{high}, where a client connection may hold them: publish ports outside it",
            hosts.start,
            hosts.end
        );
    }
}

/// portfwd brought up for one test and always taken down. Tests always
/// name the uplinks (interfaces they created): the default would be the
/// machine's own default-route interfaces.
pub(crate) struct Portfwd;

impl Portfwd {
    pub(crate) fn up(extra: &[&str]) -> Self {
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

/// The TC path's topology: an external client behind an uplink (where `up`
/// attaches the TC programs) and a container behind its own veth.
///
/// ```text
/// client ns (10.252.N.2) --veth-- host uplink pfteNh (10.252.N.1, TC programs)
/// host pftcNh (10.251.N.1) --veth-- container ns (10.251.N.2, servers)
/// ```
///
/// Modules add the methods only they use in their own `impl` blocks.
pub(crate) struct Topology {
    pub(crate) ctr: Container,
    pub(crate) client: Container,
}

impl Topology {
    pub(crate) fn new(index: u8) -> Self {
        Topology {
            ctr: Container::new(index),
            client: Container::with_prefix(index, "ext", 252),
        }
    }

    /// portfwd up with the client's uplink as its only uplink.
    pub(crate) fn up(&self) -> Portfwd {
        Portfwd::up(&["--iface", &self.client.host_if])
    }

    /// The host's address on the uplink, as the client dials it.
    pub(crate) fn uplink(&self, v6: bool) -> IpAddr {
        if v6 {
            self.client.host_v6()
        } else {
            self.client.host_v4()
        }
    }
}

/// A "container": a network namespace joined to the host by a veth pair.
/// Host side 10.251.N.1/24 and fd00:251:N::1/64, namespace side .2 / ::2.
pub(crate) struct Container {
    pub(crate) netns: String,
    pub(crate) host_if: String,
    pub(crate) index: u8,
    pub(crate) net: u8,
    pub(crate) ctr_if: String,
}

impl Container {
    pub(crate) fn new(index: u8) -> Self {
        Self::with_prefix(index, "ctr", 251)
    }

    /// A namespace named `pft-<kind><index>` on 10.<net>.<index>.0/24 and
    /// fd00:<net>:<index>::/64 (a container, an external client, a host
    /// elsewhere: only the role differs).
    pub(crate) fn with_prefix(index: u8, kind: &str, net: u8) -> Self {
        let tag = &kind[..1];
        let container = Container {
            netns: format!("pft-{kind}{index}"),
            host_if: format!("pft{tag}{index}h"),
            index,
            net,
            ctr_if: format!("pft{tag}{index}c"),
        };
        container
            .create()
            .unwrap_or_else(|e| panic!("creating {}: {e:#}", container.netns));
        container
    }

    fn create(&self) -> anyhow::Result<()> {
        netns::add(&self.netns)?;
        self.link()
    }

    /// IPv4 forwarding on this container's host-side veth, which
    /// redirects into the container's namespace need (see README); on
    /// that veth only, so it goes with it.
    pub(crate) fn forward_on_host_link(&self) {
        set_if_sysctl(None, "ipv4", &self.host_if, "forwarding", "1");
    }

    /// Deletes the veth pair and creates it again with the same names and
    /// addresses, as a restarted container (or a recreated uplink) gets:
    /// the namespace and what runs in it stay, the host side gets a new
    /// interface index.
    pub(crate) fn recreate_link(&self) {
        sh("ip", &["link", "del", &self.host_if]);
        self.link()
            .unwrap_or_else(|e| panic!("recreating {}: {e:#}", self.host_if));
    }

    /// The veth pair, its addresses and the namespace's default routes.
    fn link(&self) -> anyhow::Result<()> {
        let (ns, host_if, ctr_if) = (&self.netns, &self.host_if, &self.ctr_if);
        netns::veth(host_if, None, ctr_if, ns)?;
        let (h4, c4) = (
            format!("{}/24", self.host_v4()),
            format!("{}/24", self.v4()),
        );
        let (h6, c6) = (
            format!("{}/64", self.host_v6()),
            format!("{}/64", self.v6()),
        );
        netns::ip(&["addr", "add", &h4, "dev", host_if])?;
        netns::ip(&["addr", "add", &h6, "dev", host_if, "nodad"])?;
        netns::ip(&["link", "set", host_if, "up"])?;
        netns::ip_in(ns, &["addr", "add", &c4, "dev", ctr_if])?;
        netns::ip_in(ns, &["addr", "add", &c6, "dev", ctr_if, "nodad"])?;
        netns::ip_in(ns, &["link", "set", ctr_if, "up"])?;
        let (gw4, gw6) = (self.host_v4().to_string(), self.host_v6().to_string());
        netns::ip_in(ns, &["route", "add", "default", "via", &gw4])?;
        netns::ip_in(ns, &["-6", "route", "add", "default", "via", &gw6])?;
        Ok(())
    }

    pub(crate) fn v4(&self) -> IpAddr {
        format!("10.{}.{}.2", self.net, self.index).parse().unwrap()
    }
    pub(crate) fn host_v4(&self) -> IpAddr {
        format!("10.{}.{}.1", self.net, self.index).parse().unwrap()
    }
    pub(crate) fn v6(&self) -> IpAddr {
        format!("fd00:{}:{}::2", self.net, self.index)
            .parse()
            .unwrap()
    }
    pub(crate) fn host_v6(&self) -> IpAddr {
        format!("fd00:{}:{}::1", self.net, self.index)
            .parse()
            .unwrap()
    }

    pub(crate) fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }

    /// Runs `f` on a thread inside the container's network namespace.
    pub(crate) fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::inside(&self.netns_path(), f)
    }

    /// Starts a server inside the container on `addr` (e.g. [::]:80) that
    /// answers every connection with `<greeting> <client address>\n`.
    pub(crate) fn serve(&self, addr: &str, greeting: &str) -> Server {
        Server::start(Some(self.netns_path()), addr.parse().unwrap(), greeting)
    }

    /// Starts a server inside the container on `addr` that runs `handler`
    /// for each connection.
    pub(crate) fn serve_with(&self, addr: &str, handler: Handler) -> Server {
        Server::start_with(Some(self.netns_path()), addr.parse().unwrap(), handler)
    }

    /// Starts a UDP server inside the container on `addr` that answers
    /// every datagram with `<greeting> <payload> <client address>`.
    pub(crate) fn serve_udp(&self, addr: &str, greeting: &str) -> Server {
        serve_udp(Some(self.netns_path()), addr.parse().unwrap(), greeting)
    }

    pub(crate) fn ip(&self, args: &[&str]) -> String {
        netns::ip_in(&self.netns, args).unwrap_or_else(|e| panic!("{e:#}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the pair.
        netns::delete(&self.netns);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

/// Polls `condition` every 50 ms for at most `limit`.
pub(crate) fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
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

/// Sets a sysctl of one interface (never a global one).
pub(crate) fn set_if_sysctl(
    netns: Option<&str>,
    family: &str,
    ifname: &str,
    key: &str,
    value: &str,
) {
    let name = format!("net.{family}.conf.{ifname}.{key}={value}");
    match netns {
        Some(ns) => sh("ip", &["netns", "exec", ns, "sysctl", "-qw", &name]),
        None => sh("sysctl", &["-qw", &name]),
    };
}

/// `portfwd list --json`, parsed.
pub(crate) fn listing() -> serde_json::Value {
    serde_json::from_str(&portfwd_ok(&["list", "--json"])).unwrap()
}

/// The mapping rows of `portfwd list --json`.
pub(crate) fn listed() -> Vec<serde_json::Value> {
    listing()["mappings"].as_array().unwrap().clone()
}

/// Everything a TCP server at `addr` sends before it closes (20 s at most
/// between reads).
pub(crate) fn download(addr: std::net::SocketAddr) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut data = Vec::new();
    stream.read_to_end(&mut data)?;
    Ok(data)
}

/// The flows of `portfwd conntrack list --json` with `args` (a filter).
pub(crate) fn conntrack_flows(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["conntrack", "list", "--json"];
    all.extend_from_slice(args);
    let out = portfwd_ok(&all);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Packets the TC programs have sent straight into a container's
/// namespace (`redirected_to_peer`).
pub(crate) fn redirected_to_peer() -> u64 {
    stats()["redirected_to_peer"]
}

/// The two words of `pf_masq_flows`: masqueraded flows started, and the
/// count (plus one) after which the sweep found none.
pub(crate) fn masq_flows() -> (u64, u64) {
    use portfwd_common::{MASQ_FLOWS, MASQ_FLOWS_NONE_AFTER, MASQ_FLOWS_STARTED};
    let path = std::path::Path::new(&pin_dir()).join(MASQ_FLOWS.name);
    let data = aya::maps::MapData::from_pin(path).expect("the pinned pf_masq_flows");
    let words: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("an array of u64");
    let word = |index| words.get(&index, 0).unwrap();
    (word(MASQ_FLOWS_STARTED), word(MASQ_FLOWS_NONE_AFTER))
}

/// Waits for the holder's first sweep, which comes as it starts, to mark
/// the table as holding no masqueraded flow: until then, a container's
/// packets of a host connection go through the conntrack. The sweep runs
/// only on an idle CPU: 30 s at most, for the emulated guest of
/// `cargo xtask test --kernel`.
pub(crate) fn wait_for_the_sweeps_mark() {
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (started, none_after) = masq_flows();
            portfwd_common::holds_no_masq_flow(started, none_after)
        }),
        "the sweep marks the table as holding no masqueraded flow: {:?}",
        masq_flows()
    );
}

/// The TC programs' stats of `portfwd list --json`, by name.
pub(crate) fn stats() -> std::collections::BTreeMap<String, u64> {
    listing()["stats"]
        .as_object()
        .expect("stats in portfwd list --json")
        .iter()
        .map(|(name, n)| (name.clone(), n.as_u64().unwrap()))
        .collect()
}

/// The pid of the port holder of the tests' instance.
pub(crate) fn holder_pid() -> Option<u32> {
    let pin = pin_dir();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let holds = args.contains(&b"hold".as_slice()) && args.contains(&pin.as_bytes());
            holds.then_some(pid)
        })
}

/// A busybox root filesystem under `rootfs` (no image registry is
/// reachable): `bin/busybox` with `applets` linked to it and, with `cgi`,
/// `www/cgi-bin/ip`, a CGI for busybox httpd that answers `<cgi> <client
/// address>`.
pub(crate) fn busybox_rootfs(rootfs: &std::path::Path, applets: &[&str], cgi: Option<&str>) {
    use std::{fs, os::unix::fs::PermissionsExt};
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("busybox is missing: install busybox-static (`cargo xtask setup` does)");
    fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    for applet in applets {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let Some(word) = cgi else {
        return;
    };
    fs::create_dir_all(rootfs.join("www/cgi-bin")).unwrap();
    let script = rootfs.join("www/cgi-bin/ip");
    fs::write(
        &script,
        format!("#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"{word} $REMOTE_ADDR\"\n"),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
}

/// `GET /cgi-bin/ip` (the CGI of `busybox_rootfs`) at `to`: the body, the
/// client's address without the IPv4-mapped IPv6 dressing.
pub(crate) fn cgi_ip(to: std::net::SocketAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| format!("{to}: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /cgi-bin/ip HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let body = answer.lines().last().unwrap_or("").trim();
    Ok(body.replace("[::ffff:", "").replace(['[', ']'], ""))
}

/// Closes `stream` with a reset (SO_LINGER 0), not a FIN.
pub(crate) fn reset(stream: std::net::TcpStream) {
    nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .expect("SO_LINGER");
}

/// Keeps the calling thread, and the threads it starts, on the CPU it runs
/// on now; the thread's whole set again when dropped.
pub(crate) struct PinnedToThisCpu(nix::sched::CpuSet);

impl PinnedToThisCpu {
    pub(crate) fn new() -> Self {
        use nix::sched::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
        let this = nix::unistd::Pid::from_raw(0);
        let all = sched_getaffinity(this).expect("sched_getaffinity");
        let mut one = CpuSet::new();
        one.set(sched_getcpu().expect("sched_getcpu"))
            .expect("a CPU number the kernel gave");
        sched_setaffinity(this, &one).expect("sched_setaffinity");
        PinnedToThisCpu(all)
    }
}

impl Drop for PinnedToThisCpu {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}
