//! `portfwd trace`: the events match the traffic sent through the TC path
//! (external and hairpin flows, a flow stopped by `unmap`) and the socket
//! path (a host process's connect), filters apply,
//! and tracing ends with the reader. Needs root (`cargo xtask test`).

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::*;

/// `portfwd trace --json ARGS` in the background; its stderr's first line
/// says it is tracing.
fn start_trace(args: &[&str]) -> Child {
    // Bounded even if the events never come.
    let duration: &[&str] = if args.contains(&"--duration") {
        &[]
    } else {
        &["--duration", "20"]
    };
    let mut child = Command::new(PORTFWD)
        .args(["--bpffs", &pin_dir(), "trace", "--json"])
        .args(duration)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting portfwd trace");
    let mut first = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("tracing"), "portfwd trace said {first:?}");
    child
}

/// Waits (bounded) for the trace to end; its events.
fn events_of(mut child: Child) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "portfwd trace did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    out.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

#[test]
fn trace_shows_new_flows_hairpin_and_stopped_flows() {
    let Some(_serial) = root_test("trace") else {
        return;
    };
    let ctr = Container::new(74);
    let client = Container::with_prefix(74, "ext", 252);
    let _web = ctr.serve("[::]:80", "ctr74");
    let _echo = ctr.serve_udp("0.0.0.0:5301", "ctr74");
    let _pf = Portfwd::up(&["--iface", &client.host_if]);
    let ctr_ip = ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "web", &ctr_ip, "62740:80"]);
    portfwd_ok(&["map", "--name", "dns", &ctr_ip, "62741:5301/udp"]);
    let uplink = client.host_v4();
    let client_ip = client.v4();
    let web = SocketAddr::new(uplink, 62740);
    let dns = SocketAddr::new(uplink, 62741);
    let from = SocketAddr::new(client_ip, 41740);

    let trace = start_trace(&["--count", "6"]);
    for _ in 0..2 {
        client.inside(move || fetch(web)).expect("external fetch");
    }
    client
        .inside(move || udp_ask(dns, Some(from), b"hi"))
        .expect("external UDP");
    // Hairpin: the container dials the published address.
    ctr.inside(move || fetch(web)).expect("hairpin fetch");
    // A host process: the socket path.
    fetch("127.0.0.1:62740".parse().unwrap()).expect("host fetch");
    // The UDP flow goes on after its mapping is removed: stopped.
    portfwd_ok(&["unmap", "--name", "dns"]);
    let _ = client.inside(move || udp_ask(dns, Some(from), b"again"));
    let events = events_of(trace);
    assert_eq!(events.len(), 6, "{events:#?}");
    let sockets: Vec<&Value> = events.iter().filter(|e| e["event"] == "socket").collect();
    assert_eq!(sockets.len(), 1, "{events:#?}");
    assert_eq!(sockets[0]["path"], "connect");
    assert_eq!(sockets[0]["pid"], std::process::id());
    assert_eq!(sockets[0]["destination"], "127.0.0.1:62740");
    assert_eq!(sockets[0]["translated_to"], format!("{ctr_ip}:80"));

    let external: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "flow_new" && e["path"] == "uplink")
        .collect();
    assert_eq!(external.len(), 3, "{events:#?}");
    for e in &external {
        assert_eq!(e["interface"], client.host_if.as_str());
        let source: SocketAddr = e["source"].as_str().unwrap().parse().unwrap();
        assert_eq!(source.ip(), client_ip);
        assert!(e["masqueraded_as"].is_null());
    }
    let udp = external.iter().find(|e| e["protocol"] == "udp").unwrap();
    assert_eq!(udp["source"], from.to_string());
    assert_eq!(udp["destination"], dns.to_string());
    assert_eq!(udp["translated_to"], format!("{ctr_ip}:5301"));
    let tcp = external.iter().find(|e| e["protocol"] == "tcp").unwrap();
    assert_eq!(tcp["translated_to"], format!("{ctr_ip}:80"));

    let hairpin: Vec<&Value> = events
        .iter()
        .filter(|e| e["path"] == "containers")
        .collect();
    assert_eq!(hairpin.len(), 1, "{events:#?}");
    assert_eq!(hairpin[0]["event"], "flow_new");
    assert_eq!(hairpin[0]["destination"], web.to_string());
    let masq: SocketAddr = hairpin[0]["masqueraded_as"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(masq.ip(), uplink, "masqueraded to the dialed host address");

    let stopped: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "flows_stopped")
        .collect();
    assert_eq!(stopped.len(), 1, "{events:#?}");
    assert_eq!(stopped[0]["source"], from.to_string());

    // Filters: only drops and untranslated packets, only one port. A new
    // flow is not shown; the stopped one is.
    portfwd_ok(&["map", "--name", "dns", &ctr_ip, "62741:5301/udp"]);
    let trace = start_trace(&["--drops", "--port", "62741", "--count", "1"]);
    client.inside(move || fetch(web)).expect("external fetch");
    client
        .inside(move || udp_ask(dns, Some(SocketAddr::new(client_ip, 41741)), b"x"))
        .expect("external UDP");
    portfwd_ok(&["unmap", "--name", "dns"]);
    let _ = client.inside(move || udp_ask(dns, Some(SocketAddr::new(client_ip, 41741)), b"y"));
    let events = events_of(trace);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["event"], "flows_stopped");
    // One reader at a time; the first's end turned tracing off, so a new
    // one starts.
    let again = start_trace(&["--count", "1", "--duration", "1"]);
    assert!(events_of(again).is_empty());

    // A trace killed with SIGKILL cannot turn the switch off: `up` does,
    // when no trace runs.
    let mut killed = start_trace(&[]);
    assert!(trace_switch_on(), "a running trace turned the switch on");
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(trace_switch_on(), "nobody turned it off");
    portfwd_ok(&["up", "--iface", &client.host_if]);
    assert!(!trace_switch_on(), "up turns an abandoned switch off");
}

/// Whether the programs' trace switch (`pf_trace_on`) is on: the first
/// byte of its single value (`enabled`, little-endian), from bpftool.
fn trace_switch_on() -> bool {
    let pin = format!("{}/pf_trace_on", pin_dir());
    let out = sh("bpftool", &["-j", "map", "dump", "pinned", &pin]);
    let dump: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    let first = dump[0]["value"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no value in {dump}"));
    u8::from_str_radix(first.trim_start_matches("0x"), 16).unwrap() == 1
}

/// A host process that a mapping's allowlist refuses (no `host`): its
/// connect() and its UDP send fail with EPERM, and both show in
/// `trace --drops` with the process and the address it dialed.
#[test]
fn host_processes_refused_by_an_allowlist_are_traced_as_drops() {
    let Some(_serial) = root_test("trace_refused_host") else {
        return;
    };
    let ctr = Container::new(78);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    let ctr_ip = ctr.v4().to_string();
    for publish in ["62745:80", "62746:5301/udp"] {
        portfwd_ok(&["map", "--allow", "192.0.2.0/24", &ctr_ip, publish]);
    }
    let trace = start_trace(&["--drops", "--count", "2"]);
    let refused = fetch("127.0.0.1:62745".parse().unwrap()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let refused = socket.send_to(b"x", "127.0.0.1:62746").unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
    let events = events_of(trace);
    assert_eq!(events.len(), 2, "{events:#?}");
    for (event, (path, protocol, port)) in events
        .iter()
        .zip([("connect", "tcp", 62745), ("sendmsg", "udp", 62746)])
    {
        assert_eq!(event["event"], "refused_host_not_allowed", "{event}");
        assert_eq!(event["path"], path, "{event}");
        assert_eq!(event["protocol"], protocol, "{event}");
        assert_eq!(event["pid"], std::process::id(), "{event}");
        assert_eq!(event["destination"], format!("127.0.0.1:{port}"), "{event}");
        assert!(event["translated_to"].is_null(), "{event}");
    }
}
