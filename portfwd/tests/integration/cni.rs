//! The CNI plugin end to end, invoked as runtimes invoke it (CNI_*
//! environment variables, the network configuration on stdin), chained
//! after Debian's `bridge` and `host-local` plugins, and under podman's CNI
//! backend. Needs root (`cargo xtask test`); everything a test creates is
//! removed by Drop guards, also on failure.
//!
//! Names: namespaces `pft-cni*`, interfaces `pftn*`, bridges `pftnbrN`,
//! subnets in 10.254.0.0/16 and fd00:254::/32, host ports 62400-62499.

use std::{
    fs,
    io::Write,
    net::SocketAddr,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use crate::support::*;
use serde_json::{Value, json};

const CNI_PLUGINS: &str = "/usr/lib/cni";

/// What one plugin invocation returned.
#[derive(Debug)]
struct CniOut {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl CniOut {
    fn ok(&self) -> bool {
        self.status == Some(0)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts success and returns stdout.
    fn expect_ok(self, what: &str) -> String {
        assert!(self.ok(), "{what} failed: {self:?}");
        self.stdout
    }

    /// Asserts a CNI error result with `code`: non-zero exit, error JSON on
    /// stdout.
    fn expect_error(self, code: u64, what: &str) -> Value {
        assert!(
            !self.ok() && self.status.is_some(),
            "{what}: expected an error: {self:?}"
        );
        let error = self.json();
        assert_eq!(error["code"], code, "{what}: {self:?}");
        assert!(
            error["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {self:?}"
        );
        assert!(error["cniVersion"].is_string(), "{what}: {self:?}");
        error
    }
}

/// The CNI_* variables of one invocation; `None` leaves a variable unset.
struct Invocation<'a> {
    command: &'a str,
    container_id: Option<&'a str>,
    netns: Option<&'a str>,
    ifname: Option<&'a str>,
}

/// Runs a CNI plugin as a runtime does (bounded by `timeout`).
fn cni_exec(plugin: &str, inv: &Invocation, stdin: &[u8]) -> CniOut {
    let mut cmd = Command::new("timeout");
    cmd.args(["60", plugin])
        .env("CNI_COMMAND", inv.command)
        .env("CNI_PATH", CNI_PLUGINS)
        .env("CNI_ARGS", "IgnoreUnknown=1")
        .env_remove("CNI_CONTAINERID")
        .env_remove("CNI_NETNS")
        .env_remove("CNI_IFNAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (var, value) in [
        ("CNI_CONTAINERID", inv.container_id),
        ("CNI_NETNS", inv.netns),
        ("CNI_IFNAME", inv.ifname),
    ] {
        if let Some(value) = value {
            cmd.env(var, value);
        }
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("running {plugin}: {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    CniOut {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The portfwd plugin: the `portfwd` binary with CNI_COMMAND set.
fn portfwd_cni(
    command: &str,
    container_id: &str,
    netns: &str,
    ifname: &str,
    conf: &Value,
) -> CniOut {
    let inv = Invocation {
        command,
        container_id: Some(container_id),
        netns: Some(netns),
        ifname: Some(ifname),
    };
    cni_exec(PORTFWD, &inv, conf.to_string().as_bytes())
}

fn require_cni_plugins() {
    for plugin in ["bridge", "host-local"] {
        assert!(
            Path::new(CNI_PLUGINS).join(plugin).exists(),
            "{CNI_PLUGINS}/{plugin} is missing: install containernetworking-plugins \
             (`cargo xtask setup` does)"
        );
    }
}

/// The plugin's own configuration for the tests: their pin directory and
/// uplink, never the machine's default-route interfaces.
fn portfwd_conf(name: &str, uplink: &str, mappings: Value, prev: Option<&Value>) -> Value {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "portfwd",
        "capabilities": {"portMappings": true},
        "bpffs": pin_dir(),
        "uplinks": [uplink],
        "runtimeConfig": {"portMappings": mappings},
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    conf
}

fn names_listed() -> Vec<String> {
    listed()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A bare namespace for the CNI chain to configure, and what the chain
/// leaves on the host (its bridge, host-local's data directory).
struct ChainNs {
    netns: String,
    bridge: String,
    ipam_dir: PathBuf,
    _ip_forward: RestoreIpForward,
}

impl ChainNs {
    fn new(netns: &str, bridge: &str) -> Self {
        assert!(netns.starts_with("pft-cni") && bridge.starts_with("pftnbr"));
        let _ = run("ip", &["netns", "del", netns]);
        let _ = run("ip", &["link", "del", bridge]);
        let ipam_dir = PathBuf::from(format!("/tmp/pftn-ipam-{netns}"));
        let _ = fs::remove_dir_all(&ipam_dir);
        sh("ip", &["netns", "add", netns]);
        ChainNs {
            netns: netns.to_owned(),
            bridge: bridge.to_owned(),
            ipam_dir,
            _ip_forward: RestoreIpForward::save(),
        }
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// `bridge` + `host-local` on 10.254.<net>.0/24 (IPv4 only: an IPv6
    /// gateway would make the bridge plugin turn on IPv6 forwarding for the
    /// whole host).
    fn bridge_conf(&self, name: &str, net: u8) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": self.ipam_dir,
                "ranges": [[{"subnet": format!("10.254.{net}.0/24")}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        })
    }
}

impl Drop for ChainNs {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.netns]);
        let _ = run("ip", &["link", "del", &self.bridge]);
        let _ = fs::remove_dir_all(&self.ipam_dir);
    }
}

/// Restores net.ipv4.ip_forward, which `bridge` with `isGateway` turns on
/// for the whole host.
struct RestoreIpForward(String);

impl RestoreIpForward {
    fn save() -> Self {
        RestoreIpForward(fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap())
    }
}

impl Drop for RestoreIpForward {
    fn drop(&mut self) {
        let _ = fs::write("/proc/sys/net/ipv4/ip_forward", &self.0);
    }
}

/// Takes portfwd down when dropped (the plugin brings it up).
fn down_on_drop() -> Portfwd {
    let _ = portfwd(&["down"]);
    Portfwd
}

/// A 64-hex-digit container ID, as podman and containerd use.
fn container_id(seed: u32) -> String {
    format!("{seed:08x}{}", "5eed".repeat(14))
}

#[test]
fn chain_publishes_checks_and_deletes() {
    let Some(_serial) = root_test("cni chain") else {
        return;
    };
    require_cni_plugins();
    let client = Container::with_prefix(101, "ncni", 254);
    let chain = ChainNs::new("pft-cni1", "pftnbr1");
    let _down = down_on_drop();
    let id = container_id(1);
    let bridge_conf = chain.bridge_conf("pftn-chain", 1);
    let inv = |command| Invocation {
        command,
        container_id: Some(&id),
        netns: Some(&chain.netns),
        ifname: Some("eth0"),
    };
    let netns_path = chain.path();
    let bridge_inv = |command| Invocation {
        netns: Some(&netns_path),
        ..inv(command)
    };
    let bridge = format!("{CNI_PLUGINS}/bridge");

    // The chain, as libcni runs it: bridge (with host-local), then portfwd
    // with the previous result.
    let prev = cni_exec(
        &bridge,
        &bridge_inv("ADD"),
        bridge_conf.to_string().as_bytes(),
    );
    let prev: Value = serde_json::from_str(&prev.expect_ok("bridge ADD")).unwrap();
    let address = prev["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(address.starts_with("10.254.1."), "{prev}");
    let ctr_ip = address.split('/').next().unwrap().to_owned();

    let mappings = json!([
        {"hostPort": 62400, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 62401, "containerPort": 81, "protocol": "tcp", "hostIP": "127.0.0.1"},
    ]);
    let conf = portfwd_conf("pftn-chain", &client.host_if, mappings, Some(&prev));
    let out = portfwd_cni("ADD", &id, &netns_path, "eth0", &conf);
    let result: Value = serde_json::from_str(&out.expect_ok("portfwd ADD")).unwrap();
    assert_eq!(result, prev, "ADD must pass prevResult through unchanged");

    let ctr_ns = PathBuf::from(&netns_path);
    let _web = Server::start(Some(ctr_ns.clone()), "0.0.0.0:80".parse().unwrap(), "web");
    let _other = Server::start(Some(ctr_ns), "0.0.0.0:81".parse().unwrap(), "other");

    let name = names_listed()
        .into_iter()
        .find(|n| n.starts_with(&id[..40]))
        .expect("a mapping named after the container ID");
    assert!(name.ends_with("/eth0"), "{name}");
    let rows = listed();
    assert!(
        rows.iter()
            .filter(|m| m["name"] == name.as_str())
            .all(|m| m["container_ip"] == ctr_ip.as_str()),
        "{rows:?}"
    );

    // From the host: loopback (both families), the bridge's gateway address.
    for addr in [
        "127.0.0.1:62400".to_owned(),
        "[::1]:62400".to_owned(),
        "10.254.1.1:62400".to_owned(),
        format!("{}:62400", client.host_v4()),
    ] {
        let (answer, _) = fetch(addr.parse().unwrap()).unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert!(answer.starts_with("web "), "{addr}: {answer}");
    }
    let (answer, _) = fetch("127.0.0.1:62401".parse().unwrap()).unwrap();
    assert!(answer.starts_with("other "), "{answer}");
    // From another namespace, through the uplink: the client's own address.
    let uplink: SocketAddr = format!("{}:62400", client.host_v4()).parse().unwrap();
    let (answer, _) = client
        .inside(move || fetch(uplink))
        .expect("client through the uplink");
    assert_eq!(answer, format!("web {}", client.v4()));

    portfwd_cni("CHECK", &id, &netns_path, "eth0", &conf).expect_ok("CHECK");

    // DEL removes exactly this attachment's mappings.
    portfwd_cni("DEL", &id, &netns_path, "eth0", &conf).expect_ok("DEL");
    assert!(!names_listed().contains(&name), "{:?}", listed());
    let error = fetch("127.0.0.1:62400".parse().unwrap()).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    portfwd_cni("CHECK", &id, &netns_path, "eth0", &conf).expect_error(102, "CHECK after DEL");
    // A second DEL (CNI requires it to succeed), also without prevResult.
    portfwd_cni("DEL", &id, &netns_path, "eth0", &conf).expect_ok("second DEL");
    let mut bare = conf.clone();
    bare.as_object_mut().unwrap().remove("prevResult");
    portfwd_cni("DEL", &id, &netns_path, "eth0", &bare).expect_ok("DEL without prevResult");
    cni_exec(
        &bridge,
        &bridge_inv("DEL"),
        bridge_conf.to_string().as_bytes(),
    )
    .expect_ok("bridge DEL");

    // DEL succeeds when portfwd is not even up.
    portfwd_ok(&["down"]);
    portfwd_cni("DEL", &id, &netns_path, "eth0", &conf).expect_ok("DEL when down");
}

/// The plugin's `allow` option: the allowlist of every port of the network,
/// enforced on both paths, checked by CHECK, and an invalid entry an
/// INVALID_CONFIG error that publishes nothing.
#[test]
fn the_allow_option_limits_sources_and_check_compares_it() {
    let Some(_serial) = root_test("cni allow") else {
        return;
    };
    require_cni_plugins();
    let client = Container::with_prefix(102, "ncni", 254);
    let chain = ChainNs::new("pft-cni2", "pftnbr2");
    let _down = down_on_drop();
    let id = container_id(2);
    let bridge_conf = chain.bridge_conf("pftn-allow", 2);
    let netns_path = chain.path();
    let bridge_inv = Invocation {
        command: "ADD",
        container_id: Some(&id),
        netns: Some(&netns_path),
        ifname: Some("eth0"),
    };
    let bridge = format!("{CNI_PLUGINS}/bridge");
    let prev = cni_exec(&bridge, &bridge_inv, bridge_conf.to_string().as_bytes());
    let prev: Value = serde_json::from_str(&prev.expect_ok("bridge ADD")).unwrap();
    let _web = Server::start(
        Some(PathBuf::from(&netns_path)),
        "0.0.0.0:80".parse().unwrap(),
        "web",
    );
    let mappings = json!([{"hostPort": 62410, "containerPort": 80, "protocol": "tcp"}]);
    let plain = portfwd_conf("pftn-allow", &client.host_if, mappings, Some(&prev));

    // An entry that is no network: refused as the configuration's fault,
    // before anything is published (or portfwd brought up).
    let mut bad = plain.clone();
    bad["allow"] = json!(["10.0.0.1/33"]);
    let error = portfwd_cni("ADD", &id, &netns_path, "eth0", &bad).expect_error(7, "bad allow");
    assert!(error["msg"].as_str().unwrap().contains("allow"), "{error}");
    assert!(
        !portfwd(&["list"]).status.success(),
        "portfwd was brought up for an invalid configuration"
    );

    // This host and another network than the client's.
    let mut conf = plain.clone();
    conf["allow"] = json!(["host", "192.0.2.0/24"]);
    portfwd_cni("ADD", &id, &netns_path, "eth0", &conf).expect_ok("ADD with allow");
    let rows = listed();
    assert!(
        rows.iter().all(|m| m["allow"] == json!(["192.0.2.0/24", "host"])
            || m["allow"] == json!(["host"])),
        "each family keeps its own networks: {rows:?}"
    );
    let (answer, _) = fetch("127.0.0.1:62410".parse().unwrap()).expect("a host process");
    assert!(answer.starts_with("web "), "{answer}");
    let uplink: SocketAddr = format!("{}:62410", client.host_v4()).parse().unwrap();
    assert!(
        client.inside(move || fetch(uplink)).is_err(),
        "a client outside the list must not reach the container"
    );
    portfwd_cni("CHECK", &id, &netns_path, "eth0", &conf).expect_ok("CHECK with allow");
    // The same ports without the list: CHECK sees the difference.
    let error = portfwd_cni("CHECK", &id, &netns_path, "eth0", &plain)
        .expect_error(102, "CHECK against a configuration without allow");
    assert!(error["msg"].as_str().unwrap().contains("allows"), "{error}");

    // ADD again without the list: everyone.
    portfwd_cni("ADD", &id, &netns_path, "eth0", &plain).expect_ok("ADD without allow");
    let (answer, _) = client
        .inside(move || fetch(uplink))
        .expect("the client once the list is gone");
    assert_eq!(answer, format!("web {}", client.v4()));
    portfwd_cni("DEL", &id, &netns_path, "eth0", &plain).expect_ok("DEL");
    let bridge_del = Invocation {
        command: "DEL",
        ..bridge_inv
    };
    cni_exec(&bridge, &bridge_del, bridge_conf.to_string().as_bytes()).expect_ok("bridge DEL");
}

#[test]
fn bad_input_gives_cni_error_json() {
    let Some(_serial) = root_test("cni errors") else {
        return;
    };
    let _down = down_on_drop();
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/pft-cni-none"}],
        "ips": [{"address": "10.254.2.2/24", "interface": 0}],
    });
    let good = portfwd_conf(
        "pftn-errors",
        "pftn-none",
        json!([{"hostPort": 62410, "containerPort": 80}]),
        Some(&prev),
    );
    let id = container_id(2);
    let with = |command, container_id, ifname| Invocation {
        command,
        container_id,
        netns: Some("/run/netns/pft-cni-none"),
        ifname,
    };
    let cases: Vec<(u64, &str, Invocation, Vec<u8>)> = vec![
        (
            6,
            "bad JSON",
            with("ADD", Some(&id), Some("eth0")),
            b"{\"cniVersion\":".to_vec(),
        ),
        (
            6,
            "bad JSON on DEL",
            with("DEL", Some(&id), Some("eth0")),
            b"nope".to_vec(),
        ),
        (
            4,
            "no CNI_CONTAINERID",
            with("ADD", None, Some("eth0")),
            good.to_string().into_bytes(),
        ),
        (
            4,
            "no CNI_IFNAME",
            with("DEL", Some(&id), None),
            good.to_string().into_bytes(),
        ),
        (
            4,
            "bad CNI_CONTAINERID",
            with("ADD", Some("-bad id"), Some("eth0")),
            good.to_string().into_bytes(),
        ),
        (
            4,
            "unknown command",
            with("FROB", Some(&id), Some("eth0")),
            good.to_string().into_bytes(),
        ),
    ];
    for (code, what, inv, stdin) in cases {
        cni_exec(PORTFWD, &inv, &stdin).expect_error(code, what);
    }

    let variants: Vec<(u64, &str, Value)> = vec![
        (1, "unsupported version", {
            let mut c = good.clone();
            c["cniVersion"] = json!("2.0.0");
            c
        }),
        (7, "no cniVersion", {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove("cniVersion");
            c
        }),
        (7, "no prevResult", {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove("prevResult");
            c
        }),
        (7, "hostPort missing", {
            let mut c = good.clone();
            c["runtimeConfig"]["portMappings"] = json!([{"containerPort": 80}]);
            c
        }),
        (7, "hostPort out of range", {
            let mut c = good.clone();
            c["runtimeConfig"]["portMappings"] = json!([{"hostPort": 0, "containerPort": 80}]);
            c
        }),
        (7, "sctp", {
            let mut c = good.clone();
            c["runtimeConfig"]["portMappings"] =
                json!([{"hostPort": 62410, "containerPort": 80, "protocol": "sctp"}]);
            c
        }),
        (7, "bad hostIP", {
            let mut c = good.clone();
            c["runtimeConfig"]["portMappings"] =
                json!([{"hostPort": 62410, "containerPort": 80, "hostIP": "nowhere"}]);
            c
        }),
        (7, "no container address", {
            let mut c = good.clone();
            c["prevResult"]["ips"] = json!([]);
            c
        }),
    ];
    for (code, what, conf) in variants {
        portfwd_cni("ADD", &id, "/run/netns/pft-cni-none", "eth0", &conf).expect_error(code, what);
    }
    // Rejected before anything was loaded.
    assert!(!Path::new(&pin_dir()).exists(), "an error loaded portfwd");

    // VERSION.
    let out = cni_exec(
        PORTFWD,
        &with("VERSION", None, None),
        br#"{"cniVersion":"1.0.0"}"#,
    );
    let version = serde_json::from_str::<Value>(&out.expect_ok("VERSION")).unwrap();
    assert_eq!(version["cniVersion"], "1.0.0");
    for v in ["0.4.0", "1.0.0"] {
        assert!(
            version["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!(v))
        );
    }
}

#[test]
fn dual_stack_conflicts_and_0_4_0() {
    let Some(_serial) = root_test("cni dual stack") else {
        return;
    };
    let ctr = Container::with_prefix(3, "ncni", 254);
    let _down = down_on_drop();
    let ns_path = ctr.netns_path().display().to_string();
    let _web = ctr.serve("[::]:80", "dual");
    // prevResult as a 0.4.0 runtime passes it (with "version").
    let prev = json!({
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "pftn3h", "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": ns_path},
        ],
        "ips": [
            {"version": "4", "address": format!("{}/24", ctr.v4()), "interface": 1},
            {"version": "6", "address": format!("{}/64", ctr.v6()), "interface": 1},
        ],
        "dns": {},
    });
    let mut conf = portfwd_conf(
        "pftn-dual",
        &ctr.host_if,
        json!([
            {"hostPort": 62420, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 62420, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 62421, "containerPort": 80, "protocol": "tcp", "hostIP": "::1"},
        ]),
        Some(&prev),
    );
    conf["cniVersion"] = json!("0.4.0");
    conf["snat"] = json!(true);
    conf["conditionsV4"] = json!(["-s", "10.0.0.0/8"]);
    let id = "pftn-dual-1";
    let out = portfwd_cni("ADD", id, &ns_path, "eth0", &conf);
    assert!(
        out.stderr.contains("conditionsV4 is ignored"),
        "{}",
        out.stderr
    );
    let result: Value = serde_json::from_str(&out.expect_ok("ADD")).unwrap();
    assert_eq!(result, prev);

    let rows: Vec<Value> = listed()
        .into_iter()
        .filter(|m| m["name"] == "pftn-dual-1/eth0")
        .collect();
    let has = |host: &str, port: u16, container: String| {
        rows.iter().any(|m| {
            m["host_ip"] == host && m["host_port"] == port && m["container_ip"] == container
        })
    };
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(has("0.0.0.0", 62420, ctr.v4().to_string()), "{rows:?}");
    assert!(has("::", 62420, ctr.v6().to_string()), "{rows:?}");
    assert!(has("::1", 62421, ctr.v6().to_string()), "{rows:?}");
    let (answer, _) = fetch("127.0.0.1:62420".parse().unwrap()).unwrap();
    assert!(answer.starts_with("dual 10.254.3."), "{answer}");
    let (answer, _) = fetch("[::1]:62420".parse().unwrap()).unwrap();
    assert!(answer.starts_with("dual fd00:254:3:"), "{answer}");
    portfwd_cni("CHECK", id, &ns_path, "eth0", &conf).expect_ok("CHECK");

    // Another container asking for a taken port fails, and leaves nothing
    // behind (not even its other, free port).
    let mut other = conf.clone();
    other["runtimeConfig"]["portMappings"] = json!([
        {"hostPort": 62422, "containerPort": 80},
        {"hostPort": 62420, "containerPort": 80},
    ]);
    portfwd_cni("ADD", "pftn-dual-2", &ns_path, "eth0", &other).expect_error(100, "taken port");
    assert!(
        listed().iter().all(|m| m["host_port"] != 62422),
        "{:?}",
        listed()
    );
    // A mapping removed behind the plugin's back fails CHECK.
    portfwd_ok(&["unmap", "[::1]:62421"]);
    portfwd_cni("CHECK", id, &ns_path, "eth0", &conf).expect_error(102, "CHECK");
    // A repeated ADD restores the attachment's mappings.
    portfwd_cni("ADD", id, &ns_path, "eth0", &conf).expect_ok("ADD again");
    portfwd_cni("CHECK", id, &ns_path, "eth0", &conf).expect_ok("CHECK");
    portfwd_cni("DEL", id, &ns_path, "eth0", &conf).expect_ok("DEL");
    assert!(listed().is_empty(), "{:?}", listed());
}

/// Runs `command` for containers `pftn-conc-N` (N in `ids`) at once, each
/// publishing tcp and udp 62430+N; every invocation must succeed.
fn run_concurrently(command: &'static str, ids: Vec<u16>, uplink: &str) {
    let handles: Vec<_> = ids
        .into_iter()
        .map(|n| {
            let uplink = uplink.to_owned();
            thread::spawn(move || {
                let prev = json!({
                    "cniVersion": "1.0.0",
                    "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
                    "ips": [{"address": format!("10.254.4.{}/24", 10 + n), "interface": 0}],
                });
                let conf = portfwd_conf(
                    "pftn-conc",
                    &uplink,
                    json!([
                        {"hostPort": 62430 + n, "containerPort": 80},
                        {"hostPort": 62430 + n, "containerPort": 53, "protocol": "udp"},
                    ]),
                    Some(&prev),
                );
                let id = format!("pftn-conc-{n}");
                (n, portfwd_cni(command, &id, "/run/netns/x", "eth0", &conf))
            })
        })
        .collect();
    for handle in handles {
        let (n, out) = handle.join().unwrap();
        out.expect_ok(&format!("{command} {n}"));
    }
}

#[test]
fn concurrent_adds_and_dels_keep_each_others_entries() {
    let Some(_serial) = root_test("cni concurrency") else {
        return;
    };
    let ctr = Container::with_prefix(4, "ncni", 254);
    // Starts down: the first ADDs race to bring portfwd up.
    let _down = down_on_drop();
    let uplink = ctr.host_if.clone();
    run_concurrently("ADD", (0..8).collect(), &uplink);
    assert_eq!(listed().len(), 8 * 2 * 2, "{:?}", listed());
    // DEL half while ADDing others.
    let dels = thread::spawn({
        let uplink = uplink.clone();
        move || run_concurrently("DEL", (0..8).step_by(2).collect(), &uplink)
    });
    run_concurrently("ADD", (8..14).collect(), &uplink);
    dels.join().unwrap();
    let mut names = names_listed();
    names.sort();
    names.dedup();
    let mut want: Vec<String> = [1, 3, 5, 7, 8, 9, 10, 11, 12, 13]
        .iter()
        .map(|n| format!("pftn-conc-{n}/eth0"))
        .collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(listed().len(), want.len() * 4);
}

// --- podman -----------------------------------------------------------

const PODMAN_DIR: &str = "/tmp/pftn-podman";
const PODMAN_PORT: u16 = 62477;

/// podman with the test's own configuration and storage: the machine's
/// containers.conf, /etc/cni/net.d and /var/lib/containers stay untouched.
fn podman(args: &[&str]) -> std::process::Output {
    let dir = Path::new(PODMAN_DIR);
    let mut all: Vec<String> = [
        "120",
        "podman",
        "--root",
        &format!("{PODMAN_DIR}/root"),
        "--runroot",
        &format!("{PODMAN_DIR}/runroot"),
        "--tmpdir",
        &format!("{PODMAN_DIR}/tmp"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    Command::new("timeout")
        .args(&all)
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .output()
        .expect("running podman")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the container and everything the podman test created.
struct PodmanGuard;

impl Drop for PodmanGuard {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "--time", "0", "pftn-web"]);
        let _ = podman(&["rm", "-f", "--time", "0", "pftn-probe"]);
        let _ = run("ip", &["link", "del", "pftnbr7"]);
        let _ = fs::remove_dir_all(PODMAN_DIR);
    }
}

/// The test's podman setup: runc, cgroupfs, file events, ulimits the VM
/// can grant (runtimes.md), the CNI backend with a plugin directory where
/// `portfwd` stands in for `portmap`, and a network pftn-net on
/// 10.254.77.0/24 whose conflist chains bridge, host-local and portfwd.
fn podman_setup(uplink: &str) {
    let dir = Path::new(PODMAN_DIR);
    let _ = fs::remove_dir_all(dir);
    for sub in [
        "rootfs/bin",
        "rootfs/www",
        "net.d",
        "plugins",
        "ipam",
        "tmp",
    ] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    busybox_rootfs(&dir.join("rootfs"), &["sh", "httpd", "true"], None);
    fs::write(dir.join("rootfs/www/index.html"), "hello from podman\n").unwrap();
    // The plugin directory: Debian's plugins, and portfwd.
    for entry in fs::read_dir(CNI_PLUGINS).unwrap() {
        let entry = entry.unwrap();
        symlink(entry.path(), dir.join("plugins").join(entry.file_name())).unwrap();
    }
    symlink(PORTFWD, dir.join("plugins/portfwd")).unwrap();
    fs::write(
        dir.join("containers.conf"),
        format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{PODMAN_DIR}/plugins"]
network_config_dir = "{PODMAN_DIR}/net.d"
default_network = "pftn-net"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{PODMAN_DIR}/events.log"
"#
        ),
    )
    .unwrap();
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "pftn-net",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "pftnbr7",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "ranges": [[{"subnet": "10.254.77.0/24", "gateway": "10.254.77.1"}]],
                },
            },
            {
                "type": "portfwd",
                "capabilities": {"portMappings": true},
                "bpffs": pin_dir(),
                "uplinks": [uplink],
            },
        ],
    });
    fs::write(
        dir.join("net.d/pftn-net.conflist"),
        serde_json::to_string_pretty(&conflist).unwrap(),
    )
    .unwrap();
}

fn curl(netns: Option<&str>, url: &str) -> Result<String, String> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["ip", "netns", "exec", ns]);
    }
    args.extend(["curl", "-sS", "-m", "5", url]);
    let out = run(args[0], &args[1..]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn podman_publishes_through_portfwd() {
    let Some(_serial) = root_test("podman") else {
        return;
    };
    require_cni_plugins();
    assert!(
        run("sh", &["-c", "command -v podman && command -v runc"])
            .status
            .success(),
        "podman and runc are missing: install podman runc (`cargo xtask setup` does)"
    );
    let client = Container::with_prefix(107, "ncni", 254);
    let _ip_forward = RestoreIpForward::save();
    let _down = down_on_drop();
    let _guard = PodmanGuard;
    podman_setup(&client.host_if);

    // Can this machine run a container at all? If not, say why, loudly.
    let probe = podman(&[
        "run",
        "--rm",
        "--name",
        "pftn-probe",
        "--network",
        "none",
        "--rootfs",
        &format!("{PODMAN_DIR}/rootfs"),
        "/bin/true",
    ]);
    if !probe.status.success() {
        eprintln!(
            "\n\n*** SKIPPED podman_publishes_through_portfwd: podman cannot run a container \
             on this machine: {} ***\n",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        return;
    }

    let publish = format!("{PODMAN_PORT}:80");
    let id = podman_ok(&[
        "run",
        "-d",
        "--name",
        "pftn-web",
        "--network",
        "pftn-net",
        "--stop-signal",
        "KILL",
        "-p",
        &publish,
        "--rootfs",
        &format!("{PODMAN_DIR}/rootfs"),
        "/bin/busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    assert_eq!(id.len(), 64, "container ID: {id}");
    let rows = listed();
    let ours: Vec<&Value> = rows
        .iter()
        .filter(|m| m["name"].as_str().unwrap().starts_with(&id[..40]))
        .collect();
    assert!(
        ours.iter().any(|m| m["host_port"] == PODMAN_PORT),
        "{rows:?}"
    );

    let local = format!("http://127.0.0.1:{PODMAN_PORT}/");
    let mut last = Err(String::new());
    let served = wait_until(Duration::from_secs(20), || {
        last = curl(None, &local);
        last.is_ok()
    });
    assert!(served, "curl {local}: {last:?}");
    assert_eq!(last.unwrap(), "hello from podman\n");
    for url in [
        format!("http://[::1]:{PODMAN_PORT}/"),
        format!("http://10.254.77.1:{PODMAN_PORT}/"),
    ] {
        assert_eq!(
            curl(None, &url).as_deref(),
            Ok("hello from podman\n"),
            "{url}"
        );
    }
    let external = format!("http://{}:{PODMAN_PORT}/", client.host_v4());
    assert_eq!(
        curl(Some(&client.netns), &external).as_deref(),
        Ok("hello from podman\n"),
        "from the client namespace: {external}"
    );

    podman_ok(&["rm", "-f", "--time", "0", "pftn-web"]);
    let rows = listed();
    assert!(
        rows.iter()
            .all(|m| !m["name"].as_str().unwrap().starts_with(&id[..40])),
        "podman rm left mappings: {rows:?}"
    );
    assert!(curl(None, &local).is_err(), "still served after podman rm");
}

// --- shipped configuration --------------------------------------------

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// The portfwd entry of a conflist, as libcni hands it to the plugin.
fn plugin_conf(conflist: &Value) -> Value {
    let mut conf = conflist["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "portfwd")
        .expect("a portfwd plugin")
        .clone();
    assert_eq!(conf["capabilities"]["portMappings"], true, "{conf}");
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    conf
}

#[test]
fn example_conflists_are_accepted() {
    let mut seen = 0;
    for entry in fs::read_dir(repo_path("examples/cni")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        let conflist: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut conf = plugin_conf(&conflist);
        // No port mappings: ADD checks the configuration, passes prevResult
        // through, and loads nothing.
        conf["prevResult"] = json!({"cniVersion": conflist["cniVersion"], "ips": []});
        let out = portfwd_cni("ADD", "pftn-example", "/run/netns/none", "eth0", &conf);
        let result =
            serde_json::from_str::<Value>(&out.expect_ok(&path.display().to_string())).unwrap();
        assert_eq!(result, conf["prevResult"]);
        seen += 1;
    }
    assert!(seen >= 3, "examples/cni has {seen} conflists");
}

#[test]
fn the_node_script_switches_portmap_to_portfwd_and_back() {
    let dir = PathBuf::from(format!("/tmp/pftn-node-script-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    // Debian podman's 87-podman-bridge.conflist, as shipped.
    let original = r#"{
  "cniVersion": "0.4.0",
  "name": "podman",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni-podman0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "routes": [{ "dst": "0.0.0.0/0" }],
        "ranges": [[{ "subnet": "10.88.0.0/16", "gateway": "10.88.0.1" }]]
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    },
    { "type": "firewall" },
    { "type": "tuning" }
  ]
}
"#;
    let file = dir.join("87-podman-bridge.conflist");
    fs::write(&file, original).unwrap();
    fs::write(dir.join("unrelated.txt"), r#""type": "portmap""#).unwrap();
    let script = repo_path("deploy/kubernetes/portfwd-node.sh");
    let script = script.to_str().unwrap();
    sh("sh", &[script, "patch", dir.to_str().unwrap()]);
    let patched: Value = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
    let types: Vec<&str> = patched["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bridge", "portfwd", "firewall", "tuning"]);
    plugin_conf(&patched);
    // Idempotent, and only CNI configuration files are touched.
    sh("sh", &[script, "patch", dir.to_str().unwrap()]);
    assert_eq!(
        fs::read_to_string(dir.join("unrelated.txt")).unwrap(),
        r#""type": "portmap""#
    );
    let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    // The way back (uninstall) restores the original byte for byte.
    sh("sh", &[script, "unpatch", dir.to_str().unwrap()]);
    assert_eq!(fs::read_to_string(&file).unwrap(), original);
    let _ = fs::remove_dir_all(&dir);
}
