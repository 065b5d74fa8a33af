//! Rootless publishing: a real unprivileged user (created by the test and
//! always removed) makes a user+network namespace with `unshare -Urn`, and
//! publishes a port of it through `portfwd serve`'s API with `portfwd map
//! --netns PID`. Needs root (`cargo xtask test`). Topology:
//!
//! ```text
//! client ns pft-rlx151 (10.252.151.2) --veth-- host uplink pftr151h (10.252.151.1)
//! host pfrN (pool .0) --veth-- the user's namespace (pool .1, servers)   [made by portfwd]
//! ```

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::support::*;

const DIR: &str = "/tmp/portfwd-test-rootless";
/// The ports the policy allows; the tests use the first few.
const POLICY_PORTS: &str = "65300-65399";
const PORT: u16 = 65310;
/// The tests' own pool (the default's first /24 is left to real use).
const POOL_V4: &str = "198.19.250.0/24";
const POOL_V6: &str = "fd70:6f72:7466:7764::fa00/120";

fn policy_path() -> PathBuf {
    Path::new(DIR).join("rootless.toml")
}

fn write_policy(users: &[&str]) {
    let users: Vec<String> = users.iter().map(|u| format!("{u:?}")).collect();
    std::fs::create_dir_all(DIR).unwrap();
    std::fs::write(
        policy_path(),
        format!(
            "users = [{}]\nports = {POLICY_PORTS:?}\nmax_mappings = 8\npool_v4 = {POOL_V4:?}\npool_v6 = {POOL_V6:?}\n",
            users.join(", ")
        ),
    )
    .unwrap();
}

/// An unreachable route for the tests' pool, so that nothing of it ever
/// leaves the machine; removed when dropped.
struct PoolRoutes;

impl PoolRoutes {
    fn add() -> Self {
        for (family, prefix) in [("-4", POOL_V4), ("-6", POOL_V6)] {
            let _ = run("ip", &[family, "route", "del", "unreachable", prefix]);
            sh(
                "ip",
                &[
                    family,
                    "route",
                    "add",
                    "unreachable",
                    prefix,
                    "metric",
                    "4242",
                ],
            );
        }
        PoolRoutes
    }
}

impl Drop for PoolRoutes {
    fn drop(&mut self) {
        for (family, prefix) in [("-4", POOL_V4), ("-6", POOL_V6)] {
            let _ = run("ip", &[family, "route", "del", "unreachable", prefix]);
            // The rules of a way in that a killed service left (the
            // service removes them when it sees the way in go); the tests
            // use the first few.
            for n in 0..4 {
                let ifname = format!("pfr{n}");
                let _ = run("ip", &[family, "rule", "del", "iif", &ifname, "prohibit"]);
            }
        }
    }
}

/// A system user made for the test; deleted when dropped.
struct TestUser {
    name: String,
    uid: u32,
}

impl TestUser {
    fn create(name: &str) -> Self {
        // A user left by a killed run.
        let _ = run("userdel", &[name]);
        sh(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
        );
        let uid = sh("id", &["-u", name]).trim().parse().unwrap();
        TestUser {
            name: name.into(),
            uid,
        }
    }

    /// `portfwd --bpffs DIR ARGS...` run as this user.
    fn portfwd(&self, args: &[&str]) -> Output {
        let dir = pin_dir();
        let mut all = vec![
            "-u",
            self.name.as_str(),
            "--",
            PORTFWD,
            "--bpffs",
            dir.as_str(),
        ];
        all.extend_from_slice(args);
        run("runuser", &all)
    }

    fn portfwd_ok(&self, args: &[&str]) -> String {
        let out = self.portfwd(args);
        assert!(
            out.status.success(),
            "{} portfwd {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A refusal: exit status 1 (or 2 with `usage`), one line naming
    /// `why`.
    fn refused(&self, args: &[&str], why: &str) -> String {
        let out = self.portfwd(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} was not refused");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        stderr
    }

    /// A user+network namespace of this user's, held by a process.
    fn namespace(&self) -> UserNamespace {
        let mut child = Command::new("runuser")
            .args(["-u", &self.name, "--", "unshare", "-Urn", "sh", "-c"])
            .arg("echo $$; exec sleep 600")
            .stdout(Stdio::piped())
            // runuser reports its child's SIGKILL.
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = line.trim().parse().unwrap();
        UserNamespace { child, pid }
    }
}

/// Subordinate ids for the RootlessKit user (`userdel` removes them), far
/// from the ranges `useradd` hands out.
const SUBIDS: &str = "1300000-1365535";

impl TestUser {
    /// A user with subordinate uids and gids, as RootlessKit needs.
    fn create_with_subids(name: &str) -> Self {
        let user = TestUser::create(name);
        sh(
            "usermod",
            &["--add-subuids", SUBIDS, "--add-subgids", SUBIDS, name],
        );
        user
    }

    /// RootlessKit, as this user, with a slirp4netns child namespace (as
    /// containerd-rootless runs it), running `sleep`.
    fn rootlesskit(&self) -> RootlessKit {
        let state = Path::new(DIR).join("rootlesskit");
        std::fs::create_dir_all(DIR).unwrap();
        let _ = std::fs::remove_dir_all(&state);
        // The user's own, as $XDG_RUNTIME_DIR/containerd-rootless is.
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(self.uid), None).unwrap();
        let child = Command::new("runuser")
            .args(["-u", &self.name, "--", "rootlesskit"])
            .args(["--net=slirp4netns", "--disable-host-loopback"])
            .arg("--state-dir")
            .arg(&state)
            .args(["sh", "-c", "echo $$; exec sleep 600"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(Path::new(DIR).join("rootlesskit.log")).unwrap())
            .spawn()
            .expect("starting rootlesskit");
        let mut child = child;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // Never 0: kill(0) would signal the test's own process group.
        let Some(command_pid) = line.trim().parse().ok().filter(|pid| *pid > 0) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(Path::new(DIR).join("rootlesskit.log"));
            panic!(
                "rootlesskit did not start its command: {line:?}; its log: {} \
                 (slirp4netns needs /dev/net/tun mode 0666: `cargo xtask setup`)",
                log.unwrap_or_default().trim()
            );
        };
        RootlessKit {
            child,
            command_pid,
            state,
        }
    }
}

/// RootlessKit's parent process, and the command in its child namespace.
struct RootlessKit {
    child: Child,
    command_pid: u32,
    state: PathBuf,
}

impl RootlessKit {
    /// What containerd-rootless users name: the pid in RootlessKit's
    /// `child_pid` file (the process in the child namespace).
    fn child_pid(&self) -> String {
        let file = self.state.join("child_pid");
        let mut pid = String::new();
        wait_until(Duration::from_secs(10), || {
            pid = std::fs::read_to_string(&file).unwrap_or_default();
            !pid.trim().is_empty()
        });
        pid.trim().to_owned()
    }

    fn netns(&self) -> PathBuf {
        format!("/proc/{}/ns/net", self.command_pid).into()
    }

    /// Ends the command: RootlessKit, its child namespace and slirp4netns go.
    fn end(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.command_pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let exited = wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for RootlessKit {
    fn drop(&mut self) {
        self.end();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = run("userdel", &[&self.name]);
    }
}

/// The process holding a user's namespace (`sleep`, after `sh` exec'd it).
struct UserNamespace {
    child: Child,
    pid: u32,
}

impl UserNamespace {
    fn path(&self) -> PathBuf {
        format!("/proc/{}/ns/net", self.pid).into()
    }

    /// Ends the namespace's only process: the namespace goes with it.
    fn end(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for UserNamespace {
    fn drop(&mut self) {
        self.end();
    }
}

/// Runs `f` on a thread inside the user's namespace.
fn ns_inside<T: Send + 'static>(ns: &UserNamespace, f: impl FnOnce() -> T + Send + 'static) -> T {
    netns::inside(&ns.path(), f)
}

/// `portfwd serve` with the API and the tests' policy; its log (stderr) in
/// a file. Stopped when dropped.
struct Service {
    child: Child,
    log: PathBuf,
    /// False once killed (and reaped): its pid may be another's.
    running: bool,
}

impl Service {
    fn start() -> Self {
        std::fs::create_dir_all(DIR).unwrap();
        let log = Path::new(DIR).join("serve.log");
        let child = Command::new(PORTFWD)
            .args(["--bpffs", &pin_dir(), "serve", "--metrics", "none"])
            .arg("--rootless-policy")
            .arg(policy_path())
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting portfwd serve");
        let service = Service {
            child,
            log,
            running: true,
        };
        assert!(
            wait_until(Duration::from_secs(10), || {
                UnixStream::connect(api_socket()).is_ok()
            }),
            "portfwd serve never listened on {}",
            api_socket().display()
        );
        service
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it (SIGKILL): it cleans nothing up.
    fn kill(&mut self) {
        if self.running {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.running = false;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn api_socket() -> PathBuf {
    let tag: String = pin_dir()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("/run/portfwd-api/api{tag}.sock").into()
}

/// Every mapping's name, as root sees them.
fn names() -> Vec<String> {
    listed()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

fn addr(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The host end of the way into the namespace of `name`'s mappings.
fn way_in_of(name: &str) -> String {
    let m = listed()
        .into_iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no mapping {name}"));
    let container = m["container_ip"].as_str().unwrap();
    let route = sh("ip", &["-o", "route", "get", container]);
    let dev = route.split_whitespace().skip_while(|w| *w != "dev").nth(1);
    dev.unwrap().to_owned()
}

#[test]
fn a_user_publishes_a_port_of_their_own_namespace() {
    let Some(_serial) = root_test("a_user_publishes_a_port_of_their_own_namespace") else {
        return;
    };
    let _routes = PoolRoutes::add();
    let client = Container::with_prefix(151, "rlx", 252);
    let _portfwd = Portfwd::up(&["--iface", &client.host_if]);
    let user = TestUser::create("pftrl1");
    write_policy(&[&user.name]);
    let service = Service::start();
    let mut ns = user.namespace();
    let server = Server::start(Some(ns.path()), "[::]:80".parse().unwrap(), "rootless");
    let udp = serve_udp(
        Some(ns.path()),
        "0.0.0.0:53".parse().unwrap(),
        "rootless-udp",
    );

    let pid = ns.pid.to_string();
    let tcp = format!("{PORT}:80");
    let udp_spec = format!("{PORT}:53/udp");
    let out = user.portfwd_ok(&["map", "--netns", &pid, "--name", "web", &tcp, &udp_spec]);
    let name = format!("u{}.web", user.uid);
    assert!(out.contains(&format!("published {name}")), "{out}");
    assert!(names().contains(&name), "{:?}", names());

    // The host's processes, over the socket path, on every address.
    for to in [
        addr([127, 0, 0, 1], PORT),
        addr(std::net::Ipv6Addr::LOCALHOST, PORT),
        addr(client.host_v4(), PORT),
    ] {
        let (answer, _) = fetch(to).unwrap_or_else(|e| panic!("{to}: {e}"));
        assert!(answer.starts_with("rootless "), "{to}: {answer}");
        let answer = udp_ask(to, None, b"ping").unwrap_or_else(|e| panic!("udp {to}: {e}"));
        assert!(answer.starts_with("rootless-udp ping"), "{to}: {answer}");
    }
    // An external client, over the TC path: the server sees its address.
    let uplink = addr(client.host_v4(), PORT);
    let (answer, _) = client.inside(move || fetch(uplink)).unwrap();
    assert_eq!(answer, format!("rootless {}", client.v4()));
    let answer = client
        .inside(move || udp_ask(uplink, None, b"ext"))
        .unwrap();
    assert_eq!(answer, format!("rootless-udp ext {}", client.v4()));

    // The way in forwards nothing: a datagram from the namespace to the
    // client network (routed through the way in, the host forwarding)
    // does not arrive.
    let way_in = way_in_of(&name);
    // From the namespace's own address: its source rule sends it to the
    // host through the way in.
    let ns_addr: std::net::IpAddr = listed()
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["container_ip"].as_str()?.parse().ok())
        .unwrap();
    // Forwarding on for the way in alone (the host's setting stays).
    set_if_sysctl(None, "ipv4", &way_in, "forwarding", "1");
    let sink = client.inside(|| std::net::UdpSocket::bind("0.0.0.0:65399").unwrap());
    sink.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let to = addr(client.v4(), 65399);
    ns_inside(&ns, move || {
        let socket = std::net::UdpSocket::bind(addr(ns_addr, 0)).unwrap();
        socket.send_to(b"spoof", to).unwrap();
    });
    let forwarded = sink.recv(&mut [0u8; 16]).is_ok();
    assert!(!forwarded, "the host forwarded a datagram from the way in");

    // The user lists their own mapping; root lists it by its owner's name.
    let listing = user.portfwd_ok(&["list"]);
    assert!(listing.contains(&name), "{listing}");
    let json = user.portfwd_ok(&["list", "--json"]);
    let json: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("list --json: {e}: {json}"));
    let mappings = json["mappings"].as_array().unwrap();
    assert!(
        mappings.iter().all(|m| m["name"] == name.as_str()),
        "{json}"
    );
    assert!(
        mappings
            .iter()
            .any(|m| m["host_port"] == PORT && m["protocol"] == "udp")
    );

    // The namespace ends: its way in and its mappings go.
    let way_in = way_in_of(&name);
    assert!(way_in.starts_with("pfr"), "{way_in}");
    drop(server);
    drop(udp);
    ns.end();
    assert!(
        wait_until(Duration::from_secs(5), || !names().contains(&name)),
        "the mappings of an ended namespace stay: {:?}\n{}",
        names(),
        service.log()
    );
    assert!(!run("ip", &["link", "show", &way_in]).status.success());
    assert!(!user.portfwd_ok(&["list"]).contains(&name));
    // The service says so once the removal has returned, which may be just
    // after the mappings are seen gone.
    assert!(
        wait_until(Duration::from_secs(2), || service
            .log()
            .contains("its namespace is gone")),
        "{}",
        service.log()
    );
}

#[test]
fn refusals_change_nothing() {
    let Some(_serial) = root_test("refusals_change_nothing") else {
        return;
    };
    let _routes = PoolRoutes::add();
    let client = Container::with_prefix(152, "rlx", 252);
    let _portfwd = Portfwd::up(&["--iface", &client.host_if]);
    let alice = TestUser::create("pftrl2");
    let bob = TestUser::create("pftrl3");
    let carol = TestUser::create("pftrl4");
    write_policy(&[&alice.name, &bob.name]);
    let service = Service::start();
    let alice_ns = alice.namespace();
    let bob_ns = bob.namespace();
    let (alice_pid, bob_pid) = (alice_ns.pid.to_string(), bob_ns.pid.to_string());
    let taken = format!("{PORT}:80");
    alice.portfwd_ok(&["map", "--netns", &alice_pid, &taken]);
    let before = names();
    let refusals_before = service.log().matches("refused").count();

    let other = format!("{}:80", PORT + 1);
    // A port outside the policy.
    bob.refused(
        &["map", "--netns", &bob_pid, "8080:80"],
        "outside the ports",
    );
    // A port another user holds.
    bob.refused(&["map", "--netns", &bob_pid, &taken], "already published");
    // Another user's namespace, and the host's.
    bob.refused(&["map", "--netns", &alice_pid, &other], "is not yours");
    let host_pid = std::process::id().to_string();
    bob.refused(&["map", "--netns", &host_pid, &other], "is not yours");
    bob.refused(
        &["map", "--netns", "/proc/self/ns/net", &other],
        "is not yours",
    );
    // A path that is not a namespace.
    bob.refused(
        &["map", "--netns", "/etc/passwd", &other],
        "not a namespace",
    );
    // A user the policy does not list.
    let carol_ns = carol.namespace();
    carol.refused(
        &["map", "--netns", &carol_ns.pid.to_string(), &other],
        "may not publish",
    );
    // Bob cannot remove Alice's mapping, nor see it.
    bob.refused(&["unmap", &PORT.to_string()], "nothing of yours");
    assert!(!bob.portfwd_ok(&["list"]).contains('u'));
    // Without --netns, a user is told how.
    bob.refused(&["map", "10.0.0.1", &other], "--netns");
    // Root's own names may not look like a user's: the sweep removes those.
    let reserved = portfwd(&["map", "--name", "u1234.web", "198.19.250.77", &other]);
    assert_eq!(reserved.status.code(), Some(2), "{reserved:?}");
    let why = String::from_utf8_lossy(&reserved.stderr);
    assert!(
        why.contains("rootless") && why.lines().count() == 1,
        "{why}"
    );
    assert_eq!(names(), before);
    let refusals = service.log().matches("refused").count();
    assert!(refusals >= refusals_before + 7, "{}", service.log());

    // No policy file: nobody but root publishes.
    std::fs::remove_file(policy_path()).unwrap();
    bob.refused(&["map", "--netns", &bob_pid, &other], "not enabled");
    assert_eq!(names(), before);

    // Malformed requests: one line each, and the service goes on.
    let mut stream = UnixStream::connect(api_socket()).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut replies = BufReader::new(stream.try_clone().unwrap());
    for bad in [
        "not json",
        "{\"op\":\"map\"}",
        "{\"op\":\"list\",\"uid\":0}",
        "{\"op\":\"map\",\"netns\":\"1\",\"publish\":[\"x\"]}",
        "{\"op\":\"unmap\",\"name\":\"../x\"}",
        // The user's strings are logged: control characters in them must
        // not forge a line of the service's (see below).
        "{\"op\":\"map\",\"netns\":\"1\",\"publish\":[\"65399:80\\nportfwd serve: api: uid 4242: forged\\r\"]}",
        "{\"op\":\"unmap\",\"selectors\":[\"65399\\u001b[2K\\nportfwd serve: api: uid 4242: forged\"]}",
    ] {
        writeln!(stream, "{bad}").unwrap();
        let mut reply = String::new();
        replies.read_line(&mut reply).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["ok"], false, "{bad}: {reply}");
        assert!(!reply["error"].as_str().unwrap().contains('\n'));
    }
    let log = service.log();
    assert!(
        !log.lines()
            .any(|line| line.starts_with("portfwd serve: api: uid 4242")),
        "a user forged a line of the log:\n{log}"
    );
    assert!(
        !log.chars().any(|c| c != '\n' && c.is_control()),
        "a user's control characters reached the log: {log:?}"
    );
    // An over-long line: refused, and the connection ends.
    stream.write_all(&vec![b'x'; 20_000]).unwrap();
    let mut reply = String::new();
    replies.read_line(&mut reply).unwrap();
    assert!(reply.contains("longer than"), "{reply}");
    // Closed with the rest unread: the end, or a reset.
    let mut rest = [0u8; 16];
    assert!(!matches!(replies.read(&mut rest), Ok(n) if n > 0));
    assert_eq!(names(), before);

    // A flood of idle connections (a slow client holds no lock): the
    // flooder is turned away past its share, and another user is served.
    let flood: Vec<UnixStream> = (0..16)
        .map(|_| {
            let mut s = UnixStream::connect(api_socket()).unwrap();
            // A connection turned away may be closed already (EPIPE); its
            // reply is still there to read.
            let _ = s.write_all(b"{\"op\":");
            s
        })
        .collect();
    let mut turned_away = 0;
    for s in &flood {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut reply = String::new();
        if BufReader::new(s).read_line(&mut reply).is_ok() && reply.contains("too many") {
            turned_away += 1;
        }
    }
    assert!(turned_away >= 8, "{turned_away} of 16 turned away");
    let listing = alice.portfwd_ok(&["list"]);
    assert!(listing.contains(&format!("u{}.", alice.uid)), "{listing}");
    drop(flood);

    // Alice removes her own mapping.
    write_policy(&[&alice.name, &bob.name]);
    alice.portfwd_ok(&["unmap", &PORT.to_string()]);
    assert!(
        !names()
            .iter()
            .any(|n| n.starts_with(&format!("u{}.", alice.uid)))
    );
}

#[test]
fn a_user_publishes_a_port_of_rootlesskits_child_namespace() {
    let Some(_serial) = root_test("a_user_publishes_a_port_of_rootlesskits_child_namespace") else {
        return;
    };
    let _routes = PoolRoutes::add();
    let client = Container::with_prefix(153, "rlx", 252);
    let _portfwd = Portfwd::up(&["--iface", &client.host_if]);
    let user = TestUser::create_with_subids("pftrl5");
    write_policy(&[&user.name]);
    let service = Service::start();
    let mut kit = user.rootlesskit();
    let server = Server::start(Some(kit.netns()), "0.0.0.0:80".parse().unwrap(), "kit");

    // As the README says for containerd-rootless: the pid in child_pid.
    let child_pid = kit.child_pid();
    let port = PORT + 2;
    let spec = format!("{port}:80");
    let out = user.portfwd_ok(&["map", "--netns", &child_pid, "--name", "kit", &spec]);
    let name = format!("u{}.kit", user.uid);
    assert!(out.contains(&format!("published {name}")), "{out}");

    for to in [addr([127, 0, 0, 1], port), addr(client.host_v4(), port)] {
        let (answer, _) = fetch(to).unwrap_or_else(|e| panic!("{to}: {e}"));
        assert!(answer.starts_with("kit "), "{to}: {answer}");
    }
    let uplink = addr(client.host_v4(), port);
    let (answer, _) = client.inside(move || fetch(uplink)).unwrap();
    assert_eq!(answer, format!("kit {}", client.v4()));
    // slirp4netns's default route stays the namespace's own.
    let routes = netns::inside(&kit.netns(), || sh("ip", &["route", "show", "default"]));
    assert!(routes.contains("dev tap0"), "{routes}");

    drop(server);
    kit.end();
    assert!(
        wait_until(Duration::from_secs(5), || !names().contains(&name)),
        "the mappings of RootlessKit's ended namespace stay: {:?}\n{}",
        names(),
        service.log()
    );
}

#[test]
fn a_restarted_service_reuses_the_way_in_and_removes_its_rules() {
    let Some(_serial) = root_test("a_restarted_service_reuses_the_way_in_and_removes_its_rules")
    else {
        return;
    };
    let _routes = PoolRoutes::add();
    let client = Container::with_prefix(154, "rlx", 252);
    let _portfwd = Portfwd::up(&["--iface", &client.host_if]);
    let user = TestUser::create("pftrl6");
    write_policy(&[&user.name]);
    let service = Service::start();
    let mut ns = user.namespace();
    let pid = ns.pid.to_string();
    let first = format!("{}:80", PORT + 3);
    user.portfwd_ok(&["map", "--netns", &pid, "--name", "one", &first]);
    let way_in = way_in_of(&format!("u{}.one", user.uid));

    // A restarted service finds the way into the namespace again.
    drop(service);
    let service = Service::start();
    let second = format!("{}:81", PORT + 4);
    user.portfwd_ok(&["map", "--netns", &pid, "--name", "two", &second]);
    assert_eq!(way_in_of(&format!("u{}.two", user.uid)), way_in);
    let inside = ns_inside(&ns, || sh("ip", &["-o", "link", "show"]));
    assert_eq!(inside.matches(": portfwd").count(), 1, "{inside}");

    // The namespace ends: the way in's rules on the host go with it.
    ns.end();
    let owner = format!("u{}.", user.uid);
    assert!(
        wait_until(Duration::from_secs(5), || !names()
            .iter()
            .any(|n| n.starts_with(&owner))),
        "{}",
        service.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || !host_has_rules_of(&way_in)),
        "the host keeps the rules of {way_in}: {}",
        sh("ip", &["rule", "show"])
    );
}

/// Whether the host has a rule for the way in `ifname` (its `iif IFNAME
/// prohibit`, either family).
fn host_has_rules_of(ifname: &str) -> bool {
    let rule = format!("iif {ifname} ");
    ["-4", "-6"]
        .iter()
        .any(|family| sh("ip", &[family, "rule", "show"]).contains(&rule))
}

#[test]
fn a_service_started_after_a_namespace_went_removes_what_it_left() {
    let Some(_serial) = root_test("a_service_started_after_a_namespace_went_removes_what_it_left")
    else {
        return;
    };
    let _routes = PoolRoutes::add();
    let client = Container::with_prefix(157, "rlx", 252);
    let _portfwd = Portfwd::up(&["--iface", &client.host_if]);
    let user = TestUser::create("pftrl9");
    write_policy(&[&user.name]);
    let mut service = Service::start();
    let mut ns = user.namespace();
    let pid = ns.pid.to_string();
    let spec = format!("{}:80", PORT + 8);
    user.portfwd_ok(&["map", "--netns", &pid, "--name", "gone", &spec]);
    let name = format!("u{}.gone", user.uid);
    let way_in = way_in_of(&name);
    assert!(host_has_rules_of(&way_in));

    // The service is killed, and the namespace ends while none runs: its
    // veth goes with it (the kernel removes it, a moment later).
    service.kill();
    ns.end();
    assert!(
        wait_until(Duration::from_secs(10), || !run(
            "ip",
            &["link", "show", &way_in]
        )
        .status
        .success()),
        "{way_in} outlived its namespace"
    );
    assert!(names().contains(&name), "{:?}", names());

    // The next service removes what the way in left: its mappings and the
    // host's rules for it.
    let service = Service::start();
    assert!(
        wait_until(Duration::from_secs(5), || !names().contains(&name)
            && !host_has_rules_of(&way_in)),
        "left behind: {:?}\n{}\n{}",
        names(),
        sh("ip", &["rule", "show"]),
        service.log()
    );
    assert!(!user.portfwd_ok(&["list"]).contains(&name));
    // The service says so once the removal has returned, which may be just
    // after the mappings are seen gone.
    assert!(
        wait_until(Duration::from_secs(2), || service
            .log()
            .contains("its namespace is gone")),
        "{}",
        service.log()
    );
}

#[test]
fn a_user_publishes_on_ipv6_and_with_an_allowlist() {
    let Some(_serial) = root_test("a_user_publishes_on_ipv6_and_with_an_allowlist") else {
        return;
    };
    let _routes = PoolRoutes::add();
    let client = Container::with_prefix(155, "rlx", 252);
    let _portfwd = Portfwd::up(&["--iface", &client.host_if]);
    let user = TestUser::create("pftrl7");
    write_policy(&[&user.name]);
    let _service = Service::start();
    let ns = user.namespace();
    let _server = Server::start(Some(ns.path()), "[::]:80".parse().unwrap(), "rootless6");
    let pid = ns.pid.to_string();

    // An explicit IPv6 host address: to the namespace's IPv6 address,
    // over the TC path for an external client, which keeps its address.
    let port = PORT + 5;
    let spec = format!("[{}]:{port}:80", client.host_v6());
    let out = user.portfwd_ok(&["map", "--netns", &pid, "--name", "v6", &spec]);
    assert!(out.contains("-> [fd70:"), "{out}");
    let to = addr(client.host_v6(), port);
    let (answer, _) = fetch(to).unwrap_or_else(|e| panic!("{to}: {e}"));
    assert!(answer.starts_with("rootless6 "), "{answer}");
    let (answer, _) = client.inside(move || fetch(to)).unwrap();
    assert_eq!(answer, format!("rootless6 {}", client.v6()));

    // --allow and --refuse apply to a user's mapping as to root's.
    let port = PORT + 6;
    let spec = format!("{port}:80");
    user.portfwd_ok(&[
        "map", "--netns", &pid, "--name", "local", "--allow", "host", "--refuse", "reject", &spec,
    ]);
    let (answer, _) = fetch(addr([127, 0, 0, 1], port)).unwrap();
    assert!(answer.starts_with("rootless6 "), "{answer}");
    let uplink = addr(client.host_v4(), port);
    let outside = client.inside(move || fetch(uplink));
    assert!(outside.is_err(), "a client outside --allow got {outside:?}");
    let local = listed()
        .into_iter()
        .find(|m| m["name"] == format!("u{}.local", user.uid))
        .unwrap();
    assert_eq!(local["allow"], serde_json::json!(["host"]), "{local}");
    assert_eq!(local["refuse"], "reject", "{local}");
}

/// A container behind the user's namespace, as rootless nerdctl's are:
/// its own namespace `pft-rlq156` (10.249.156.2) on a veth whose other end
/// (10.249.156.1) is in the user's namespace, which forwards, and a DNAT
/// rule there from `HOP_PORT` to the container's port 80 (what CNI
/// `portmap` adds in RootlessKit's child namespace). Removed when dropped.
struct ContainerBehind;

const HOP_PORT: u16 = 18080;
const BEHIND_NS: &str = "pft-rlq156";
const BEHIND_NET: &str = "10.249.156.0/24";

impl ContainerBehind {
    fn create(ns: &UserNamespace) -> Self {
        let _ = run("ip", &["route", "del", "unreachable", BEHIND_NET]);
        sh(
            "ip",
            &["route", "add", "unreachable", BEHIND_NET, "metric", "4242"],
        );
        netns::add(BEHIND_NS).unwrap();
        let pid = ns.pid.to_string();
        sh(
            "ip",
            &[
                "link", "add", "pftq156u", "netns", &pid, "type", "veth", "peer", "name",
                "pftq156c", "netns", BEHIND_NS,
            ],
        );
        ns_inside(ns, || {
            sh("ip", &["addr", "add", "10.249.156.1/24", "dev", "pftq156u"]);
            sh("ip", &["link", "set", "pftq156u", "up"]);
            sh("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            let to = format!("--dport={HOP_PORT}");
            sh(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-p",
                    "tcp",
                    &to,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    "10.249.156.2:80",
                ],
            );
        });
        netns::ip_in(
            BEHIND_NS,
            &["addr", "add", "10.249.156.2/24", "dev", "pftq156c"],
        )
        .unwrap();
        netns::ip_in(BEHIND_NS, &["link", "set", "pftq156c", "up"]).unwrap();
        netns::ip_in(
            BEHIND_NS,
            &["route", "add", "default", "via", "10.249.156.1"],
        )
        .unwrap();
        ContainerBehind
    }
}

impl Drop for ContainerBehind {
    fn drop(&mut self) {
        netns::delete(BEHIND_NS);
        let _ = run("ip", &["route", "del", "unreachable", BEHIND_NET]);
    }
}

#[test]
fn a_port_that_the_namespace_forwards_further_in() {
    let Some(_serial) = root_test("a_port_that_the_namespace_forwards_further_in") else {
        return;
    };
    let _routes = PoolRoutes::add();
    let client = Container::with_prefix(156, "rlx", 252);
    let _portfwd = Portfwd::up(&["--iface", &client.host_if]);
    let user = TestUser::create("pftrl8");
    write_policy(&[&user.name]);
    let _service = Service::start();
    let ns = user.namespace();
    let _behind = ContainerBehind::create(&ns);
    let _server = Server::start(
        Some(netns::path(BEHIND_NS)),
        "0.0.0.0:80".parse().unwrap(),
        "behind",
    );
    let port = PORT + 7;
    let spec = format!("{port}:{HOP_PORT}");
    user.portfwd_ok(&["map", "--netns", &ns.pid.to_string(), &spec]);

    let (answer, _) = fetch(addr([127, 0, 0, 1], port)).unwrap();
    assert!(answer.starts_with("behind "), "{answer}");
    // The container's replies are routed in the user's namespace before
    // the DNAT is undone: they must still go back through the way in.
    let uplink = addr(client.host_v4(), port);
    let answer = client.inside(move || fetch(uplink));
    assert!(
        matches!(&answer, Ok((a, _)) if *a == format!("behind {}", client.v4())),
        "{answer:?}"
    );
}

/// Rootless podman (Debian 12's podman 4.3.1) as a test user with
/// subordinate ids, with its own HOME, XDG_RUNTIME_DIR and containers.conf
/// (runc, cgroupfs, file events: see runtimes.md), and a busybox root
/// filesystem (no registry) whose httpd answers `podman <client address>`
/// from a CGI. The container, podman's pause process (it holds the user
/// namespace) and the directory go when dropped.
struct RootlessPodman {
    user: String,
    dir: PathBuf,
}

const PODMAN_CONTAINER: &str = "pftrl-web";

impl RootlessPodman {
    fn setup(user: &TestUser) -> Self {
        let dir = Path::new(DIR).join("podman");
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "run"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        busybox_rootfs(
            &dir.join("rootfs"),
            &["sh", "httpd", "echo"],
            Some("podman"),
        );
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             [network]\ndefault_rootless_network_cmd = \"slirp4netns\"\n",
        )
        .unwrap();
        // The user's own, as their home and runtime directory are; podman
        // creates /etc in the root filesystem (the user is root in it).
        sh("chown", &["-R", &user.name, dir.to_str().unwrap()]);
        sh("chmod", &["0700", dir.join("run").to_str().unwrap()]);
        RootlessPodman {
            user: user.name.clone(),
            dir,
        }
    }

    /// `podman ARGS` as the user, bounded in time.
    fn podman(&self, args: &[&str]) -> Output {
        let env = |name: &str, sub: &str| format!("{name}={}", self.dir.join(sub).display());
        let mut all = vec![
            "-u".to_owned(),
            self.user.clone(),
            "--".into(),
            "env".into(),
            env("HOME", "home"),
            env("XDG_RUNTIME_DIR", "run"),
            env("CONTAINERS_CONF", "containers.conf"),
            "timeout".into(),
            "120".into(),
            "podman".into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        run("runuser", &all)
    }

    /// Starts the web container on slirp4netns (no `-p`); its pid, or
    /// why podman could not run it.
    fn run_web(&self) -> Result<String, String> {
        let rootfs = self.dir.join("rootfs");
        let out = self.podman(&[
            "run",
            "-d",
            "--name",
            PODMAN_CONTAINER,
            "--network",
            "slirp4netns",
            "--stop-signal",
            "KILL",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        let out = self.podman(&["inspect", "-f", "{{.State.Pid}}", PODMAN_CONTAINER]);
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match pid.parse::<u32>() {
            Ok(n) if n > 0 => Ok(pid),
            _ => Err(format!("podman inspect gave no pid: {pid:?}")),
        }
    }

    fn remove_web(&self) {
        let out = self.podman(&["rm", "-f", "--time", "0", PODMAN_CONTAINER]);
        assert!(
            out.status.success(),
            "podman rm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for RootlessPodman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-f", "--time", "0", PODMAN_CONTAINER]);
        // podman's pause process holds the user's user namespace; never
        // pid 0 (kill(0) would signal the test's own process group).
        let pause = self.dir.join("run/libpod/tmp/pause.pid");
        let pid = std::fs::read_to_string(pause).unwrap_or_default();
        if let Some(pid) = pid.trim().parse::<i32>().ok().filter(|pid| *pid > 0) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        // userdel refuses a user who still runs something.
        wait_until(Duration::from_secs(10), || {
            !run("pgrep", &["-u", &self.user]).status.success()
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_user_publishes_a_port_of_a_rootless_podman_container() {
    let Some(_serial) = root_test("a_user_publishes_a_port_of_a_rootless_podman_container") else {
        return;
    };
    assert!(
        run(
            "sh",
            &[
                "-c",
                "command -v podman && command -v runc && command -v slirp4netns"
            ]
        )
        .status
        .success(),
        "podman, runc or slirp4netns is missing: `cargo xtask setup` installs them"
    );
    let _routes = PoolRoutes::add();
    let client = Container::with_prefix(158, "rlx", 252);
    let _portfwd = Portfwd::up(&["--iface", &client.host_if]);
    let user = TestUser::create_with_subids("pftrl10");
    write_policy(&[&user.name]);
    let service = Service::start();
    let podman = RootlessPodman::setup(&user);
    let pid = match podman.run_web() {
        Ok(pid) => pid,
        Err(why) => {
            eprintln!(
                "\n\n*** SKIPPED a_user_publishes_a_port_of_a_rootless_podman_container: \
                 rootless podman cannot run a container on this machine: {why} ***\n"
            );
            return;
        }
    };

    // As the README says: the container's pid.
    let port = PORT + 9;
    let spec = format!("{port}:80");
    let out = user.portfwd_ok(&["map", "--netns", &pid, "--name", "pod", &spec]);
    let name = format!("u{}.pod", user.uid);
    assert!(out.contains(&format!("published {name}")), "{out}");

    // httpd starts after `podman run` returns: the first answer may take
    // a moment (bounded).
    let local = addr([127, 0, 0, 1], port);
    let mut answer = Err(String::new());
    wait_until(Duration::from_secs(10), || {
        answer = cgi_ip(local);
        answer.is_ok()
    });
    let answer = answer.unwrap_or_else(|e| panic!("{local}: {e}"));
    assert!(answer.starts_with("podman "), "{answer}");
    for to in [
        addr(std::net::Ipv6Addr::LOCALHOST, port),
        addr(client.host_v4(), port),
    ] {
        let answer = cgi_ip(to).unwrap_or_else(|e| panic!("{to}: {e}"));
        assert!(answer.starts_with("podman "), "{to}: {answer}");
    }
    // An external client: the container sees its own address.
    let uplink = addr(client.host_v4(), port);
    let answer = client.inside(move || cgi_ip(uplink)).unwrap();
    assert_eq!(answer, format!("podman {}", client.v4()));

    // `podman rm -f` ends the namespace: the mapping goes.
    podman.remove_web();
    assert!(
        wait_until(Duration::from_secs(5), || !names().contains(&name)),
        "the mapping of a removed podman container stays: {:?}\n{}",
        names(),
        service.log()
    );
}
