//! Source allowlists (`portfwd map --allow`, `allow = [...]` in apply
//! files), enforced by the programs: external clients outside the list get
//! what a closed port gives on the TC path (v4 and v6, TCP and UDP), or
//! nothing with `--refuse drop`; host processes are
//! refused on the socket path unless the list names `host`, a container's
//! hairpin flow is judged by its own address, and a changed list holds for
//! the next flow. Needs root (`cargo xtask test`). Topology:
//!
//! ```text
//! client A ns (10.252.75.2) --veth-- host uplink pfte75h (10.252.75.1)
//! client B ns (10.252.76.2) --veth-- host uplink pfte76h (10.252.76.1)
//! host pftc75h (10.251.75.1) --veth-- container ns (10.251.75.2, servers)
//! ```

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use crate::support::*;

struct Topology {
    ctr: Container,
    allowed: Container,
    refused: Container,
    _tcp: Server,
    _udp: Server,
}

impl Topology {
    fn new() -> Self {
        let ctr = Container::new(75);
        let _tcp = ctr.serve("[::]:80", "container");
        let _udp = ctr.serve_udp("[::]:5000", "container");
        Topology {
            ctr,
            allowed: Container::with_prefix(75, "ext", 252),
            refused: Container::with_prefix(76, "ext", 252),
            _tcp,
            _udp,
        }
    }

    fn up(&self) -> Portfwd {
        Portfwd::up(&[
            "--iface",
            &self.allowed.host_if,
            "--iface",
            &self.refused.host_if,
        ])
    }
}

/// Whether `client` gets the container's TCP and UDP answers on `port`
/// (TCP) and `port + 1` (UDP) of the host's address on its uplink.
fn reaches(client: &Container, v6: bool, port: u16) -> (bool, bool) {
    let host = if v6 {
        client.host_v6()
    } else {
        client.host_v4()
    };
    let me = if v6 { client.v6() } else { client.v4() };
    let (tcp, udp) = (SocketAddr::new(host, port), SocketAddr::new(host, port + 1));
    let (tcp, udp) = client.inside(move || (fetch(tcp).map(|a| a.0), udp_ask(udp, None, b"hi")));
    if let Ok(answer) = &tcp {
        assert_eq!(answer, &format!("container {me}"));
    }
    if let Ok(answer) = &udp {
        assert_eq!(answer, &format!("container hi {me}"));
    }
    (tcp.is_ok(), udp.is_ok())
}

fn stat(name: &str) -> u64 {
    stats().get(name).copied().unwrap_or(0)
}

/// What `client` gets from the host's address on its uplink, TCP `port`
/// and UDP `port + 1` (a connected socket): the errors, as a socket sees
/// them.
fn refusal(client: &Container, v6: bool, port: u16) -> (ErrorKind, ErrorKind) {
    let host = if v6 {
        client.host_v6()
    } else {
        client.host_v4()
    };
    let (tcp, udp) = (SocketAddr::new(host, port), SocketAddr::new(host, port + 1));
    let (tcp, udp) = client.inside(move || (fetch(tcp), udp_ask(udp, None, b"hi")));
    let kind = |result: Result<_, std::io::Error>| match result {
        Ok(_) => panic!("{client_ip} reached the container", client_ip = client.v4()),
        Err(error) => error.kind(),
    };
    (kind(tcp.map(|_| ())), kind(udp.map(|_| ())))
}

/// Whether an error is a timeout (no answer came): a connect times out, a
/// receive with SO_RCVTIMEO says EAGAIN.
fn timed_out(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

fn explain_code(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    let out = portfwd(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn external_clients_outside_the_list_are_refused_v4_and_v6_tcp_and_udp() {
    let Some(_serial) = root_test("allowlist_external") else {
        return;
    };
    let topo = Topology::new();
    let _pf = topo.up();
    let allow = format!("{}/32,fd00:252:75::/64", topo.allowed.v4());
    let (ctr4, ctr6) = (topo.ctr.v4().to_string(), topo.ctr.v6().to_string());
    portfwd_ok(&[
        "map",
        "--allow",
        &allow,
        &ctr4,
        "62750:80",
        "62751:5000/udp",
    ]);
    portfwd_ok(&[
        "map",
        "--allow",
        &allow,
        &ctr6,
        "[::]:62752:80",
        "[::]:62753:5000/udp",
    ]);
    let before = stat("refused_answered");
    assert_eq!(reaches(&topo.allowed, false, 62750), (true, true));
    assert_eq!(reaches(&topo.allowed, true, 62752), (true, true));
    assert_eq!(reaches(&topo.refused, false, 62750), (false, false));
    assert_eq!(reaches(&topo.refused, true, 62752), (false, false));
    // A SYN and a datagram per family, each answered once.
    assert_eq!(stat("refused_answered"), before + 4, "{:?}", stats());

    let listed = listed();
    let on = |port: u64| {
        listed
            .iter()
            .find(|m| m["host_port"] == port)
            .unwrap_or_else(|| panic!("{port} in {listed:?}"))["allow"]
            .clone()
    };
    // Each mapping holds the networks of its own family.
    let v4 = serde_json::json!([format!("{}/32", topo.allowed.v4())]);
    assert_eq!(on(62750), v4);
    assert_eq!(on(62751), v4);
    assert_eq!(on(62753), serde_json::json!(["fd00:252:75::/64"]));

    let text = portfwd_ok(&["list"]);
    assert!(
        text.contains(&format!(
            "allow {ctr4} 0.0.0.0:62750/tcp: {}/32 (others: reject)",
            topo.allowed.v4()
        )),
        "{text}"
    );

    let published = format!("{}:62750", topo.allowed.host_v4());
    let (code, text) = explain_code(&[&published, "--from", &topo.refused.v4().to_string()]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("not in the mapping's source allowlist"),
        "{text}"
    );
    let (code, text) = explain_code(&[&published, "--from", &topo.allowed.v4().to_string()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("allow"), "{text}");
}

/// A refused client gets what a closed port gives, at once: connect() and
/// a connected UDP socket fail with ECONNREFUSED (a TCP reset, an ICMP
/// port unreachable), v4 and v6; checksummed for real (the client's veth
/// checks them: no offload on either end). With `--refuse drop` it gets
/// nothing (both time out), and allowed clients still get through.
#[test]
fn refused_clients_get_a_closed_ports_answer_or_nothing_with_refuse_drop() {
    let Some(_serial) = root_test("allowlist_reject") else {
        return;
    };
    let topo = Topology::new();
    let _pf = topo.up();
    // Checksums computed in software and checked on receipt: without this
    // a veth marks every packet as checked (or leaves it partial).
    sh(
        "ethtool",
        &["-K", &topo.refused.host_if, "rx", "off", "tx", "off"],
    );
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &topo.refused.netns,
            "ethtool",
            "-K",
            &topo.refused.ctr_if,
            "rx",
            "off",
            "tx",
            "off",
        ],
    );
    let allow = format!("{}/32,fd00:252:75::/64", topo.allowed.v4());
    let (ctr4, ctr6) = (topo.ctr.v4().to_string(), topo.ctr.v6().to_string());
    for (refuse, ports4, ports6) in [
        (
            "reject",
            ["62770:80", "62771:5000/udp"],
            ["[::]:62772:80", "[::]:62773:5000/udp"],
        ),
        (
            "drop",
            ["62774:80", "62775:5000/udp"],
            ["[::]:62776:80", "[::]:62777:5000/udp"],
        ),
    ] {
        for (ctr, ports) in [(&ctr4, ports4), (&ctr6, ports6)] {
            portfwd_ok(&[
                "map", "--allow", &allow, "--refuse", refuse, ctr, ports[0], ports[1],
            ]);
        }
    }
    let refused = ErrorKind::ConnectionRefused;
    let (answered, dropped) = (stat("refused_answered"), stat("refused_not_allowed"));
    assert_eq!(refusal(&topo.refused, false, 62770), (refused, refused));
    assert_eq!(refusal(&topo.refused, true, 62772), (refused, refused));
    assert_eq!(stat("refused_answered"), answered + 4, "{:?}", stats());
    assert_eq!(stat("refused_not_allowed"), dropped, "{:?}", stats());

    for (v6, port) in [(false, 62774), (true, 62776)] {
        let (tcp, udp) = refusal(&topo.refused, v6, port);
        assert!(timed_out(tcp) && timed_out(udp), "{port}: {tcp:?} {udp:?}");
    }
    assert_eq!(stat("refused_answered"), answered + 4, "{:?}", stats());
    assert!(stat("refused_not_allowed") >= dropped + 4, "{:?}", stats());
    assert_eq!(reaches(&topo.allowed, false, 62770), (true, true));
    assert_eq!(reaches(&topo.allowed, true, 62776), (true, true));

    let listed = listed();
    let refuse_of = |port: u64| {
        listed
            .iter()
            .find(|m| m["host_port"] == port)
            .unwrap_or_else(|| panic!("{port} in {listed:?}"))["refuse"]
            .clone()
    };
    assert_eq!(refuse_of(62771), "reject");
    assert_eq!(refuse_of(62777), "drop");
    let published = format!("{}:62774", topo.refused.host_v4());
    let (code, text) = explain_code(&[&published, "--from", &topo.refused.v4().to_string()]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("dropped without an answer"), "{text}");

    // `--refuse` without `--allow` means nothing: a usage error.
    let out = portfwd(&["map", "--refuse", "drop", &ctr4, "62778:80"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Whether a host process reaches the container through `127.0.0.1`: TCP
/// on `port`, UDP on `port + 1`; a refusal is EPERM.
fn host_reaches(port: u16) -> (bool, bool) {
    let tcp = fetch(SocketAddr::new([127, 0, 0, 1].into(), port));
    let udp = udp_ask(
        SocketAddr::new([127, 0, 0, 1].into(), port + 1),
        None,
        b"hi",
    );
    for result in [tcp.as_ref().err(), udp.as_ref().err()]
        .into_iter()
        .flatten()
    {
        assert_eq!(result.kind(), ErrorKind::PermissionDenied, "{result}");
    }
    (tcp.is_ok(), udp.is_ok())
}

fn write_apply(dir: &std::path::Path, ctr: IpAddr, allow: &[String]) -> PathBuf {
    let file = dir.join("allow.toml");
    let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    std::fs::write(
        &file,
        format!(
            "[[mappings]]\nname = \"web\"\ncontainer = \"{ctr}\"\npublish = [\"62755:80\", \"62756:5000/udp\"]\nallow = [{}]\n",
            allow.join(", ")
        ),
    )
    .unwrap();
    file
}

#[test]
fn host_processes_need_the_host_keyword_and_a_changed_list_holds_at_once() {
    let Some(_serial) = root_test("allowlist_host") else {
        return;
    };
    let topo = Topology::new();
    let _pf = topo.up();
    let dir = std::env::temp_dir().join(format!("portfwd-allow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let apply = |allow: &[String]| {
        let file = write_apply(&dir, topo.ctr.v4(), allow);
        portfwd_ok(&["apply", "-f", file.to_str().unwrap()]);
    };
    let (a, b) = ("10.252.75.0/24".to_owned(), "10.252.76.0/24".to_owned());

    // Client A's network only: host processes and client B are refused.
    apply(std::slice::from_ref(&a));
    let host_refused = || {
        stats()
            .get("refused_host_not_allowed")
            .copied()
            .unwrap_or(0)
    };
    let before = host_refused();
    assert_eq!(host_reaches(62755), (false, false));
    assert!(host_refused() >= before + 2, "{:?}", stats());
    assert_eq!(reaches(&topo.allowed, false, 62755), (true, true));
    assert_eq!(reaches(&topo.refused, false, 62755), (false, false));
    // A container's hairpin flow is judged by its own address.
    let ctr = topo.ctr.v4();
    let hairpin = SocketAddr::new(topo.allowed.host_v4(), 62755);
    assert!(topo.ctr.inside(move || fetch(hairpin)).is_err(), "{ctr}");

    // The list changes: client B, the container and host processes in,
    // client A out, for the very next flows.
    apply(&[b, format!("{ctr}/32"), "host".into()]);
    assert_eq!(host_reaches(62755), (true, true));
    assert_eq!(reaches(&topo.refused, false, 62755), (true, true));
    assert_eq!(reaches(&topo.allowed, false, 62755), (false, false));
    let (greeting, _) = topo.ctr.inside(move || fetch(hairpin)).unwrap();
    assert!(greeting.starts_with("container "), "{greeting}");

    // `map` again of the same ports with `--allow host`: this machine only,
    // at once.
    portfwd_ok(&[
        "map",
        "--name",
        "web",
        "--allow",
        "host",
        &topo.ctr.v4().to_string(),
        "62755:80",
        "62756:5000/udp",
    ]);
    assert_eq!(host_reaches(62755), (true, true));
    assert_eq!(reaches(&topo.refused, false, 62755), (false, false));
    // Replaced, not added: 0.0.0.0 and [::], TCP and UDP.
    assert_eq!(listed().len(), 4, "{:?}", listed());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bad_cidr_is_a_usage_error_that_changes_nothing() {
    let Some(_serial) = root_test("allowlist_bad_cidr") else {
        return;
    };
    let ctr = Container::new(77);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    let ip = ctr.v4().to_string();
    for bad in ["10.0.0.1/8", "10.0.0.0/33", "somewhere", "10.0.0.0/8,,host"] {
        let out = portfwd(&["map", "--allow", bad, &ip, "62760:80"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{bad}: {stderr}");
        assert!(stderr.contains("invalid allowed source"), "{bad}: {stderr}");
    }
    let dir = std::env::temp_dir().join(format!("portfwd-allow-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = write_apply(&dir, ctr.v4(), &["10.0.0.0/40".into()]);
    let out = portfwd(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listed().is_empty(), "{:?}", listed());
    std::fs::remove_dir_all(&dir).ok();
}
