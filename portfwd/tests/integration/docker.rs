//! portfwd as dockerd's userland proxy, with a real dockerd (Debian's
//! docker.io, installed by `cargo xtask setup`): a private daemon with its
//! own data root, exec root, socket, bridge and cgroup parent, whose
//! `userland-proxy-path` is a `docker-proxy` symlink to the built portfwd.
//! The machine's own Docker, if any, is untouched.
//!
//! Run both with `"iptables": false` (portfwd does everything) and `true`
//! (Docker's DNAT rules exist too; portfwd translates before netfilter).

use std::{
    fs,
    io::Read,
    net::{SocketAddr, UdpSocket},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::support::*;
use serde_json::Value;

const DIR: &str = "/tmp/portfwd-test-docker";
const BRIDGE: &str = "pfdbr0";
const BRIDGE_NET: &str = "10.253.0";
const CGROUP_PARENT: &str = "portfwd-test-docker";
const IMAGE: &str = "portfwd-test/web";

/// The client behind the uplink: namespace pft-qdocker1, host side pftq1h
/// (10.252.1.1), client 10.252.1.2.
fn client() -> Container {
    Container::with_prefix(1, "qdocker", 252)
}

fn docker_bin() -> &'static str {
    // Debian's client (20.10) when present; any docker CLI speaks to it.
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

fn docker(args: &[&str]) -> std::process::Output {
    let host = format!("unix://{DIR}/docker.sock");
    let mut all = vec!["-H", host.as_str()];
    all.extend_from_slice(args);
    run(docker_bin(), &all)
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// curl, optionally from a namespace; the body or the error.
fn curl(netns: Option<&str>, url: &str) -> Result<String, String> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["ip", "netns", "exec", ns]);
    }
    args.extend(["curl", "-sS", "-m", "5", "-g", url]);
    let out = run(args[0], &args[1..]);
    if out.status.success() {
        // busybox httpd listens on [::]: IPv4 clients show as [::ffff:a.b.c.d].
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(body.replace("[::ffff:", "").replace(']', ""))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn url(host: &str, port: u16) -> String {
    format!("http://{host}:{port}/cgi-bin/ip")
}

/// The host state dockerd changes that the test must put back: sysctls,
/// the FORWARD policy, the iptables chains of `"iptables": true`, the
/// cgroups of its containers.
struct HostState {
    sysctls: Vec<(PathBuf, String)>,
    forward_policy: String,
}

impl HostState {
    fn save() -> Self {
        let sysctls = [
            "/proc/sys/net/ipv4/ip_forward",
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "/proc/sys/net/bridge/bridge-nf-call-iptables",
            "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
        ]
        .iter()
        .filter_map(|p| Some((PathBuf::from(p), fs::read_to_string(p).ok()?)))
        .collect();
        let forward = sh("iptables", &["-S", "FORWARD"]);
        let forward_policy = forward
            .lines()
            .find_map(|l| l.strip_prefix("-P FORWARD "))
            .unwrap_or("ACCEPT")
            .trim()
            .to_owned();
        HostState {
            sysctls,
            forward_policy,
        }
    }
}

impl Drop for HostState {
    fn drop(&mut self) {
        remove_docker_chains();
        let _ = run("iptables", &["-P", "FORWARD", &self.forward_policy]);
        for (path, value) in &self.sysctls {
            let _ = fs::write(path, value);
        }
    }
}

/// Deletes the rules that jump to Docker's chains or name our bridge, then
/// the chains (what `"iptables": true` leaves behind after dockerd stops).
fn remove_docker_chains() {
    for table in ["filter", "nat"] {
        let rules = sh("iptables", &["-t", table, "-S"]);
        for rule in rules.lines() {
            let Some(spec) = rule.strip_prefix("-A ") else {
                continue;
            };
            let chain = spec.split_whitespace().next().unwrap_or("");
            if !chain.starts_with("DOCKER") && (spec.contains("DOCKER") || spec.contains(BRIDGE)) {
                let mut args = vec!["-t", table, "-D"];
                args.extend(spec.split_whitespace());
                let _ = run("iptables", &args);
            }
        }
        for rule in rules.lines() {
            if let Some(chain) = rule.strip_prefix("-N ")
                && chain.starts_with("DOCKER")
            {
                let _ = run("iptables", &["-t", table, "-F", chain]);
            }
        }
        for rule in rules.lines() {
            if let Some(chain) = rule.strip_prefix("-N ")
                && chain.starts_with("DOCKER")
            {
                let _ = run("iptables", &["-t", table, "-X", chain]);
            }
        }
    }
}

/// A private dockerd; stopped, and its bridge and directories removed,
/// when dropped.
struct Dockerd {
    child: Option<Child>,
}

impl Dockerd {
    /// Starts dockerd with `"iptables": iptables`, portfwd's pin directory
    /// and the client's uplink in its environment; None (with the reason)
    /// when it does not come up.
    fn start(iptables: bool, uplink: &str) -> Result<Self, String> {
        cleanup_leftovers();
        let dir = Path::new(DIR);
        fs::create_dir_all(dir.join("bin")).unwrap();
        symlink(PORTFWD, dir.join("bin/docker-proxy")).unwrap();
        let _ = run("ip", &["link", "del", BRIDGE]);
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"]);
        sh(
            "ip",
            &["addr", "add", &format!("{BRIDGE_NET}.1/24"), "dev", BRIDGE],
        );
        sh("ip", &["link", "set", BRIDGE, "up"]);
        let config = serde_json::json!({
            "data-root": format!("{DIR}/data"),
            "exec-root": format!("{DIR}/exec"),
            "pidfile": format!("{DIR}/docker.pid"),
            "hosts": [format!("unix://{DIR}/docker.sock")],
            "bridge": BRIDGE,
            "iptables": iptables,
            "userland-proxy": true,
            "userland-proxy-path": format!("{DIR}/bin/docker-proxy"),
            "live-restore": false,
            "storage-driver": "vfs",
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "cgroup-parent": CGROUP_PARENT,
        });
        fs::write(dir.join("daemon.json"), config.to_string()).unwrap();
        let log = fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .args(["--config-file", &format!("{DIR}/daemon.json")])
            .env("PORTFWD_BPFFS", pin_dir())
            .env("PORTFWD_UPLINKS", uplink)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start dockerd: {e} (install docker.io)"))?;
        let mut daemon = Dockerd { child: Some(child) };
        let up = wait_until(Duration::from_secs(30), || {
            docker(&["info", "--format", "{{.ID}}"]).status.success() || daemon.exited().is_some()
        });
        if !up || daemon.exited().is_some() {
            return Err(format!("dockerd did not come up: {}", daemon.log_tail()));
        }
        Ok(daemon)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(Path::new(DIR).join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Stops dockerd as a service manager would (SIGTERM, bounded wait).
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let stopped = wait_until(Duration::from_secs(30), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !stopped {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
        cleanup_leftovers();
    }
}

/// Removes what an interrupted run may leave: container processes (in
/// our cgroup parent), the bridge, the directories (unmounting what dockerd
/// left mounted there), the cgroups.
fn cleanup_leftovers() {
    let cgroups: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|controller| controller.path().join(CGROUP_PARENT))
        .filter(|path| path.is_dir())
        .collect();
    let children = |cgroup: &PathBuf| -> Vec<PathBuf> {
        fs::read_dir(cgroup)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    };
    for cgroup in &cgroups {
        for child in children(cgroup) {
            let procs = fs::read_to_string(child.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                let _ = run("kill", &["-9", pid]);
            }
        }
    }
    let _ = run("ip", &["link", "del", BRIDGE]);
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(DIR))
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in ours {
        let _ = run("umount", &["-l", mount]);
    }
    let _ = fs::remove_dir_all(DIR);
    for cgroup in &cgroups {
        // Emptied by the kills above within moments.
        wait_until(Duration::from_secs(2), || {
            children(cgroup)
                .iter()
                .all(|child| fs::remove_dir(child).is_ok())
        });
        let _ = fs::remove_dir(cgroup);
    }
}

/// The image: busybox, its httpd on ports 80-82 with a CGI that answers
/// `web <client address>`, built with `docker import` (no registry).
fn import_image() {
    let rootfs = Path::new(DIR).join("rootfs");
    busybox_rootfs(
        &rootfs,
        &["sh", "httpd", "sleep", "wget", "echo"],
        Some("web"),
    );
    let tarball = Path::new(DIR).join("rootfs.tar");
    sh(
        "tar",
        &[
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            tarball.to_str().unwrap(),
            ".",
        ],
    );
    docker_ok(&["import", tarball.to_str().unwrap(), IMAGE]);
}

/// `docker run -d` of the web image; the container's address.
fn run_web(name: &str, publish: &[&str]) -> String {
    let mut args = vec!["run", "-d", "--name", name, "--stop-signal", "KILL"];
    for p in publish {
        args.extend(["-p", p]);
    }
    args.extend([
        IMAGE,
        "/bin/sh",
        "-c",
        "for p in 80 81 82; do httpd -p $p -h /www; done; exec sleep 3600",
    ]);
    docker_ok(&args);
    docker_ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name])
}

/// The network namespace of a container (to run a UDP server in it).
fn sandbox(name: &str) -> PathBuf {
    PathBuf::from(docker_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.SandboxKey}}",
        name,
    ]))
}

/// `GET /cgi-bin/ip` from inside the network namespace `netns`; the body.
fn http_get_from(netns: PathBuf, addr: SocketAddr) -> Result<String, String> {
    std::thread::spawn(move || {
        netns::enter(&netns).unwrap();
        cgi_ip(addr)
    })
    .join()
    .unwrap()
}

/// The mappings named after the container address `ip`.
fn mappings_of(ip: &str) -> Vec<Value> {
    let prefix = format!("docker:{ip}:");
    listed()
        .into_iter()
        .filter(|m| m["name"].as_str().unwrap_or("").starts_with(&prefix))
        .collect()
}

fn has_mapping(rows: &[Value], host_ip: &str, host_port: u16, protocol: &str) -> bool {
    rows.iter().any(|m| {
        m["host_ip"] == host_ip && m["host_port"] == host_port && m["protocol"] == protocol
    })
}

/// The pid of the process `ss` shows holding `addr` (e.g. 0.0.0.0:18091).
fn holder_pid(tcp: bool, addr: &str) -> Option<i32> {
    let out = sh("ss", &[if tcp { "-lntpH" } else { "-lnupH" }]);
    let line = out
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some(addr) && l.contains("\"docker-proxy\""))?;
    let pid = line.split("pid=").nth(1)?.split(',').next()?;
    pid.parse().ok()
}

fn publishes_through_portfwd(iptables: bool) {
    let mode = if iptables {
        "\"iptables\": true"
    } else {
        "\"iptables\": false"
    };
    if Command::new("dockerd").arg("--version").output().is_err() {
        panic!("dockerd is missing: install docker.io (`cargo xtask setup` does)");
    }
    let client = client();
    // The first proxy brings portfwd up (on the client's uplink only).
    let _ = portfwd(&["down"]);
    let _down = Portfwd;
    let _host = HostState::save();
    let mut daemon = match Dockerd::start(iptables, &client.host_if) {
        Ok(daemon) => daemon,
        Err(why) => {
            eprintln!("\n\n*** SKIPPED docker ({mode}): {why} ***\n");
            return;
        }
    };
    import_image();
    let web = run_web(
        "pfd-web",
        &[
            "18080:80",
            "127.0.0.1:18081:80",
            "18082:80/udp",
            "18090-18092:80-82",
        ],
    );
    let other = run_web("pfd-other", &["18083:80"]);
    assert!(web.starts_with(BRIDGE_NET), "{web}");

    // What dockerd asked for: one mapping per port and host family, named
    // after the container endpoint, held by a docker-proxy process.
    let rows = mappings_of(&web);
    for port in [18080, 18090, 18091, 18092] {
        assert!(
            has_mapping(&rows, "0.0.0.0", port, "tcp"),
            "{port}: {rows:?}"
        );
        assert!(has_mapping(&rows, "::", port, "tcp"), "{port}: {rows:?}");
    }
    assert!(has_mapping(&rows, "127.0.0.1", 18081, "tcp"), "{rows:?}");
    assert!(has_mapping(&rows, "0.0.0.0", 18082, "udp"), "{rows:?}");
    assert_eq!(rows.len(), 11, "{rows:?}");
    for addr in [
        "0.0.0.0:18080",
        "[::]:18080",
        "127.0.0.1:18081",
        "0.0.0.0:18090",
    ] {
        assert!(holder_pid(true, addr).is_some(), "ss -lntp: {addr}");
    }
    assert!(holder_pid(false, "0.0.0.0:18082").is_some(), "ss -lnup");

    // From the host: loopback, IPv6 loopback, a host address; the range.
    let host_addr = client.host_v4().to_string();
    for (host, port) in [
        ("127.0.0.1", 18080),
        ("[::1]", 18080),
        (host_addr.as_str(), 18080),
        ("127.0.0.1", 18081),
        ("127.0.0.1", 18090),
        ("127.0.0.1", 18091),
        ("127.0.0.1", 18092),
    ] {
        let answer = curl(None, &url(host, port));
        assert!(
            answer.as_ref().is_ok_and(|a| a.starts_with("web ")),
            "{mode}: {host}:{port}: {answer:?}"
        );
    }
    // 18081 is published on 127.0.0.1 only.
    assert!(curl(None, &url(&host_addr, 18081)).is_err());
    // An external client: the container sees the client's own address
    // (portfwd's TC programs run before Docker's netfilter rules).
    assert_eq!(
        curl(Some(&client.netns), &url(&host_addr, 18080)).as_deref(),
        Ok(format!("web {}", client.v4()).as_str()),
        "{mode}: from the client namespace"
    );
    // An external IPv6 client through the host's IPv6 address (dockerd's
    // `[::]` proxy for the IPv4-only container): translated to IPv4
    // (NAT46); the container sees the host's address on its bridge, as
    // with docker-proxy.
    let host_v6 = format!("[{}]", client.host_v6());
    assert_eq!(
        curl(Some(&client.netns), &url(&host_v6, 18080)).as_deref(),
        Ok(format!("web {BRIDGE_NET}.1").as_str()),
        "{mode}: an IPv6 client from the client namespace"
    );
    // Hairpin: another container through the host address (masqueraded
    // to that address). busybox's static wget crashes in the container, so
    // the client is a thread in the container's network namespace.
    let dialed = SocketAddr::new(client.host_v4(), 18080);
    assert_eq!(
        http_get_from(sandbox("pfd-other"), dialed).as_deref(),
        Ok(format!("web {host_addr}").as_str()),
        "{mode}: hairpin"
    );

    if iptables {
        // Docker's DNAT rules for the published ports exist, and no packet
        // went through them: portfwd translated every flow first.
        let rules = sh("iptables", &["-t", "nat", "-S", "DOCKER"]);
        assert!(rules.contains("--dport 18080 -j DNAT"), "{rules}");
        let counted = sh("iptables", &["-t", "nat", "-L", "DOCKER", "-n", "-v", "-x"]);
        let dnat_packets: u64 = counted
            .lines()
            .filter(|l| l.contains("DNAT"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(dnat_packets, 0, "{counted}");
    }

    // UDP: a datagram server inside the container's namespace.
    {
        let _udp = serve_udp(
            Some(sandbox("pfd-web")),
            "0.0.0.0:80".parse().unwrap(),
            "udp",
        );
        // Unbound address: a socket bound to 127.0.0.1 cannot send to the
        // container address the datagram is translated to.
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        socket.send_to(b"ping", "127.0.0.1:18082").unwrap();
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("UDP answer through 18082");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("udp ping "));
    }

    // kill -9 of one proxy: the next portfwd command removes its mapping,
    // and only its.
    let victim = holder_pid(true, "0.0.0.0:18091").expect("the proxy of 0.0.0.0:18091");
    sh("kill", &["-9", &victim.to_string()]);
    let gone = wait_until(Duration::from_secs(5), || {
        !has_mapping(&mappings_of(&web), "0.0.0.0", 18091, "tcp")
    });
    let rows = mappings_of(&web);
    assert!(gone, "the killed proxy's mapping stayed: {rows:?}");
    assert_eq!(rows.len(), 10, "{rows:?}");
    assert!(has_mapping(&rows, "::", 18091, "tcp"), "{rows:?}");

    // docker rm -f: exactly that container's mappings go.
    docker_ok(&["rm", "-f", "pfd-web"]);
    assert_eq!(mappings_of(&web), Vec::<Value>::new());
    assert!(curl(None, &url("127.0.0.1", 18080)).is_err());
    assert_eq!(mappings_of(&other).len(), 2);
    assert!(curl(None, &url("127.0.0.1", 18083)).is_ok_and(|a| a.starts_with("web ")));

    // docker stop: the same for a stopped container.
    docker_ok(&["stop", "pfd-other"]);
    assert_eq!(mappings_of(&other), Vec::<Value>::new());

    // dockerd stops (live-restore off): its containers stop, their
    // proxies remove their mappings.
    let last = run_web("pfd-last", &["18084:80"]);
    assert_eq!(mappings_of(&last).len(), 2);
    daemon.stop();
    let rows = listed();
    assert!(
        rows.iter()
            .all(|m| !m["name"].as_str().unwrap_or("").starts_with("docker:")),
        "mappings left after dockerd stopped: {rows:?}"
    );
}

#[test]
fn dockerd_without_iptables_publishes_through_portfwd() {
    let Some(_serial) = root_test("docker (iptables false)") else {
        return;
    };
    publishes_through_portfwd(false);
}

#[test]
fn dockerd_with_iptables_publishes_through_portfwd() {
    let Some(_serial) = root_test("docker (iptables true)") else {
        return;
    };
    publishes_through_portfwd(true);
}

// --- the proxy interface itself, without dockerd ------------------------

const PROXY_DIR: &str = "/tmp/portfwd-test-docker-proxy";

/// Starts `docker-proxy` (a symlink to portfwd) as dockerd does: fd 3 the
/// write end of a pipe, fd 4 the host socket when given. Returns the child
/// and what it reported on fd 3 (it closes the pipe after reporting).
fn start_proxy(args: &[&str], listen: Option<&std::net::TcpListener>) -> (Child, String) {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    // Close-on-exec: the child gets only its fd 3 copy, so the pipe ends
    // when the proxy closes it.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let write_fd = write_end.as_raw_fd();
    let listen_fd = listen.map(|l| l.as_raw_fd());
    let mut command = Command::new(Path::new(PROXY_DIR).join("docker-proxy"));
    command
        .args(args)
        .env("PORTFWD_BPFFS", pin_dir())
        .stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Out of the way first: the sources may be 3 or 4 themselves.
            let status = libc::fcntl(write_fd, libc::F_DUPFD_CLOEXEC, 10);
            let listen = listen_fd.map(|fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10));
            if status < 0 || libc::dup2(status, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = listen
                && (fd < 0 || libc::dup2(fd, 4) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    drop(write_end);
    let mut report = String::new();
    let mut pipe = fs::File::from(read_end);
    // Bounded as dockerd bounds it (16 s): the proxy reports, closes fd 3.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = pipe.read_to_string(&mut report);
        let _ = sender.send(report);
    });
    let report = receiver
        .recv_timeout(Duration::from_secs(16))
        .expect("the proxy neither reported on fd 3 and closed it, nor exited");
    (child, report)
}

fn stop_proxy(mut child: Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().ok().flatten().is_some()
    });
    assert!(exited, "the proxy did not stop on {signal}");
    assert!(child.wait().unwrap().success());
}

#[test]
fn proxy_speaks_dockers_interface() {
    let Some(_serial) = root_test("docker-proxy interface") else {
        return;
    };
    let client = client();
    let ctr = Container::with_prefix(2, "qdocker", 252);
    let _web = ctr.serve("[::]:80", "ctr");
    let _pf = Portfwd::up(&["--iface", &client.host_if]);
    let _ = fs::remove_dir_all(PROXY_DIR);
    fs::create_dir_all(PROXY_DIR).unwrap();
    let _proxy_dir = RemoveOnDrop(PROXY_DIR);
    symlink(PORTFWD, Path::new(PROXY_DIR).join("docker-proxy")).unwrap();
    let ctr_ip = ctr.v4().to_string();
    let name = format!("docker:{ctr_ip}:80");
    let ours = || -> Vec<Value> {
        listed()
            .into_iter()
            .filter(|m| m["name"] == name.as_str())
            .collect()
    };

    // Docker >= 28: dockerd binds the socket and passes it as fd 4; flags
    // a newer dockerd may add are ignored.
    let listener = std::net::TcpListener::bind("0.0.0.0:18095").unwrap();
    let (proxy, report) = start_proxy(
        &[
            "-proto",
            "tcp",
            "-host-ip",
            "0.0.0.0",
            "-host-port",
            "18095",
            "-container-ip",
            &ctr_ip,
            "-container-port",
            "80",
            "-use-listen-fd",
            "-bridge-name",
            "docker0",
        ],
        Some(&listener),
    );
    drop(listener);
    assert_eq!(report, "0\n");
    assert!(has_mapping(&ours(), "0.0.0.0", 18095, "tcp"));
    assert!(holder_pid(true, "0.0.0.0:18095").is_some(), "ss -lntp");
    let (answer, _) = fetch("127.0.0.1:18095".parse().unwrap()).unwrap();
    assert!(answer.starts_with("ctr "), "{answer}");
    stop_proxy(proxy, nix::sys::signal::Signal::SIGINT);
    assert!(ours().is_empty(), "SIGINT left {:?}", ours());
    assert!(std::net::TcpListener::bind("0.0.0.0:18095").is_ok());

    // Docker <= 27: the proxy binds; SIGTERM (the parent-death signal)
    // stops it too.
    let args = [
        "-proto",
        "udp",
        "-host-ip",
        "::",
        "-host-port",
        "18096",
        "-container-ip",
        &ctr_ip,
        "-container-port",
        "80",
    ];
    let (proxy, report) = start_proxy(&args, None);
    assert_eq!(report, "0\n");
    assert!(has_mapping(&ours(), "::", 18096, "udp"));
    // The port is held: a second proxy for it fails, on fd 3, with nothing
    // published.
    let (mut second, report) = start_proxy(&args, None);
    assert!(
        report.starts_with("1\nfailed to listen on [::]:18096/udp"),
        "{report:?}"
    );
    assert!(!second.wait().unwrap().success());
    assert_eq!(ours().len(), 1);
    stop_proxy(proxy, nix::sys::signal::Signal::SIGTERM);
    assert!(ours().is_empty(), "SIGTERM left {:?}", ours());

    // A proxy killed with SIGKILL: `up` removes its mapping (and says so).
    let (mut killed, report) = start_proxy(&args, None);
    assert_eq!(report, "0\n");
    killed.kill().unwrap();
    killed.wait().unwrap();
    let said = portfwd_ok(&["up", "--iface", &client.host_if]);
    assert!(
        said.contains(&format!("removed (its owner process is gone) {name}")),
        "{said}"
    );
    assert!(ours().is_empty(), "up left {:?}", ours());

    // SCTP is refused clearly.
    let mut sctp = args;
    sctp[1] = "sctp";
    let (mut child, report) = start_proxy(&sctp, None);
    assert!(
        report.starts_with("1\nportfwd does not forward SCTP"),
        "{report:?}"
    );
    assert!(!child.wait().unwrap().success());
    assert!(ours().is_empty());
}

/// Removes a directory when dropped (also when the test fails).
struct RemoveOnDrop(&'static str);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.0);
    }
}
