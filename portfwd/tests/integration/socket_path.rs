//! The socket path end to end: the real programs on the cgroup v2 root, the
//! real CLI, and real connections into a network namespace. Needs root
//! (`cargo xtask test`).

use std::{net::SocketAddr, time::Duration};

use crate::support::*;

fn addr(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

#[test]
fn host_connections_reach_the_container_through_every_local_address() {
    let Some(_serial) = root_test("host_connections_reach_the_container") else {
        return;
    };
    let ctr = Container::new(11);
    let _server = ctr.serve("[::]:80", "hello from ctr11 to");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    // The veth's host address exists before `map`, which records it.
    portfwd_ok(&["map", "--name", "web", &ctr.v4().to_string(), "62011:80"]);

    let expected = format!("hello from ctr11 to {}", ctr.host_v4());
    for dialed in [
        "127.0.0.1:62011".parse().unwrap(),
        "[::1]:62011".parse().unwrap(),
        addr(ctr.host_v4(), 62011),
        addr(ctr.host_v6(), 62011),
    ] {
        let (answer, peer) = fetch(dialed).unwrap_or_else(|e| panic!("{dialed}: {e}"));
        // IPv6 sockets reach the IPv4 container over IPv4 (mapped address).
        assert_eq!(answer, expected, "via {dialed}");
        // getpeername reports what the application dialed.
        assert_eq!(peer, dialed, "getpeername via {dialed}");
    }
}

#[test]
fn ipv6_container_is_reached_through_ipv6_loopback() {
    let Some(_serial) = root_test("ipv6_container") else {
        return;
    };
    let ctr = Container::new(12);
    let _server = ctr.serve("[::]:80", "v6 ctr12 to");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v6().to_string(), "[::1]:62012:80"]);
    let (answer, peer) = fetch("[::1]:62012".parse().unwrap()).unwrap();
    assert_eq!(answer, format!("v6 ctr12 to {}", ctr.host_v6()));
    assert_eq!(peer, "[::1]:62012".parse().unwrap());
    // Published on ::1 only: 127.0.0.1 is not forwarded.
    assert!(fetch("127.0.0.1:62012".parse().unwrap()).is_err());
}

#[test]
fn replies_of_host_connections_leave_the_container_link_as_the_hosts_own() {
    let Some(_serial) = root_test("replies_of_host_connections") else {
        return;
    };
    let ctr = Container::new(17);
    // An uplink of its own: the container's link gets the backend program.
    let uplink = Container::with_prefix(17, "ext", 252);
    let _server = ctr.serve("[::]:80", "ctr17 to");
    let _pf = Portfwd::up(&["--iface", &uplink.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62017:80"]);
    portfwd_ok(&["map", &ctr.v6().to_string(), "[::1]:62018:80"]);
    wait_for_the_sweeps_mark();
    // IPv4, IPv6, and an IPv6 socket to the IPv4 container (v4-mapped).
    for (dialed, host) in [
        ("127.0.0.1:62017", ctr.host_v4()),
        ("[::1]:62018", ctr.host_v6()),
        ("[::1]:62017", ctr.host_v4()),
    ] {
        let before = stats()["passed_host_connection"];
        let (answer, _) = fetch(dialed.parse().unwrap()).unwrap();
        assert_eq!(answer, format!("ctr17 to {host}"));
        // SYN-ACK, the answer, its FIN and ACKs: the container's packets
        // pass as the host's own connection, before any conntrack lookup.
        let passed = stats()["passed_host_connection"] - before;
        assert!(
            passed >= 3,
            "{dialed}: {passed} packets passed as the host's"
        );
    }
    assert_eq!(
        stats()["flows_new"],
        0,
        "no flow tracked for the socket path"
    );
    // The container dialing the same host address (hairpin): its packets
    // are a tracked flow's, not a host connection's.
    let before = stats()["passed_host_connection"];
    let gateway = SocketAddr::new(ctr.host_v4(), 62017);
    let (answer, _) = ctr.inside(move || fetch(gateway)).unwrap();
    assert_eq!(answer, format!("ctr17 to {}", gateway.ip()));
    assert_eq!(stats()["flows_new"], 1, "the hairpin flow");
    assert_eq!(stats()["passed_host_connection"], before, "hairpin packets");
}

#[test]
fn a_second_process_sees_and_removes_mappings_and_unmap_stops_forwarding() {
    let Some(_serial) = root_test("second_process") else {
        return;
    };
    let ctr = Container::new(13);
    let _server = ctr.serve("[::]:80", "ctr13");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&[
        "map",
        "--name",
        "first",
        &ctr.v4().to_string(),
        "127.0.0.1:62013:80",
        "62014:80/udp",
    ]);
    assert!(fetch("127.0.0.1:62013".parse().unwrap()).is_ok());

    let rows = listed();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["name"] == "first" && r["container_ip"] == ctr.v4().to_string())
    );
    assert!(
        rows.iter()
            .any(|r| r["protocol"] == "udp" && r["host_ip"] == "::" && r["host_port"] == 62014)
    );

    portfwd_ok(&["unmap", "127.0.0.1:62013"]);
    let error = fetch("127.0.0.1:62013".parse().unwrap()).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    portfwd_ok(&["unmap", "--name", "first"]);
    assert!(listed().is_empty());
}

#[test]
fn connections_inside_other_namespaces_are_never_redirected() {
    let Some(_serial) = root_test("other_namespaces") else {
        return;
    };
    let ctr = Container::new(14);
    let _public = ctr.serve("[::]:80", "published");
    // The container's own service on its own loopback, same port number.
    let _own = ctr.serve("127.0.0.1:62015", "own loopback");
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62015:80"]);

    let (answer, _) = fetch("127.0.0.1:62015".parse().unwrap()).unwrap();
    assert!(answer.starts_with("published"), "{answer}");
    let inside = ctr.inside(|| fetch("127.0.0.1:62015".parse().unwrap()).map(|(a, _)| a));
    assert!(inside.unwrap().starts_with("own loopback"));
}

#[test]
fn bad_input_and_conflicts_change_nothing() {
    let Some(_serial) = root_test("bad_input") else {
        return;
    };
    let ctr = Container::new(15);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", "--name", "a", "10.251.15.2", "62016:80"]);
    let before = listed();

    let usage = [
        vec!["map", "10.251.15.2", "70000:80"],
        vec!["map", "10.251.15.2", "62020:80", "3000-3001:80-82"],
        vec!["map", "not-an-ip", "62020:80"],
        vec!["map", "10.251.15.2", "62020:80/sctp"],
        vec!["map", "--name", "has space", "10.251.15.2", "62020:80"],
        vec!["unmap", "62016/icmp"],
        vec!["unmap"],
    ];
    for args in usage {
        let out = portfwd(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one-line error, got {stderr}"
        );
    }
    // A conflict in the second PUBLISH must not leave the first one behind.
    let runtime = [
        vec!["map", "10.251.15.2", "62021:80", "127.0.0.1:62016:80"],
        vec!["map", "10.251.15.2", "62022:80", "62022:81"],
        vec!["unmap", "62016", "62099"],
        vec!["unmap", "--name", "nobody"],
    ];
    for args in runtime {
        let out = portfwd(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one-line error, got {stderr}"
        );
    }
    assert_eq!(listed(), before);

    // Without root, and before `up`, the CLI says so plainly.
    let out = run(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            PORTFWD,
            "--bpffs",
            &pin_dir(),
            "list",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing: CAP_BPF"), "{stderr}");
    let out = run(
        PORTFWD,
        &["--bpffs", "/sys/fs/bpf/portfwd-test-absent", "list"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `portfwd up` first"));
}

#[test]
fn up_is_idempotent_and_down_leaves_nothing_behind() {
    let Some(_serial) = root_test("down_leaves_nothing") else {
        return;
    };
    let ctr = Container::new(16);
    let _server = ctr.serve("[::]:80", "ctr16");
    let pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62017:80"]);
    // A second `up` keeps the mappings and attaches nothing twice.
    let again = portfwd_ok(&["up", "--iface", &ctr.host_if]);
    assert!(again.contains("already up (2 mappings)"), "{again}");
    assert!(fetch("127.0.0.1:62017".parse().unwrap()).is_ok());

    let (program_ids, map_ids) = pinned_object_ids();
    // The socket programs, two on the uplink (the veth here).
    assert_eq!(program_ids.len(), portfwd_common::SOCK_PROGRAMS.len() + 2);
    assert_eq!(map_ids.len(), portfwd_common::MAPS.len());
    portfwd_ok(&["down"]);
    std::mem::forget(pf);

    assert!(!std::path::Path::new(&pin_dir()).exists());
    assert!(fetch("127.0.0.1:62017".parse().unwrap()).is_err());
    // The kernel frees programs and maps once the last reference goes
    // (after an RCU grace period, hence the wait).
    let gone = wait_until(Duration::from_secs(5), || {
        let programs: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .collect();
        let maps: Vec<u32> = aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .map(|m| m.id())
            .collect();
        program_ids.iter().all(|id| !programs.contains(id))
            && map_ids.iter().all(|id| !maps.contains(id))
    });
    assert!(
        gone,
        "programs {program_ids:?} or maps {map_ids:?} still loaded after down"
    );
}

/// The ids of the programs behind our pinned links and of our pinned maps.
fn pinned_object_ids() -> (Vec<u32>, Vec<u32>) {
    let dir = pin_dir();
    let dir = std::path::Path::new(&dir);
    let mut pins = Vec::new();
    let mut dirs = vec![dir.join("links")];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path)
            } else {
                pins.push(path)
            }
        }
    }
    let programs = pins
        .into_iter()
        .map(|pin| {
            // Without TCX (before 6.6) a TC program is attached as a netlink
            // filter, and its program is pinned under the filter's name.
            let is_filter = pin
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("netlink-"));
            if is_filter {
                return aya::programs::ProgramInfo::from_pin(&pin).unwrap().id();
            }
            let link = aya::programs::links::PinnedLink::from_pin(pin).unwrap();
            let link: aya::programs::links::FdLink = link.into();
            link.info().unwrap().program_id()
        })
        .collect();
    let maps = portfwd_common::MAPS
        .iter()
        .map(|map| {
            aya::maps::MapData::from_pin(dir.join(map.name))
                .unwrap()
                .info()
                .unwrap()
                .id()
        })
        .collect();
    (programs, maps)
}
