//! Following the host as it changes (issue 19; issue 11 case 7): a
//! container's veth or an uplink deleted and recreated under the same name,
//! a deleted uplink, a killed port holder, a damaged state file. Needs root
//! (`cargo xtask test`). Each test creates and removes its
//! `support::Topology`.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use crate::support::*;

impl Topology {
    /// The published port on the host's uplink address, as the client dials it.
    fn published(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.uplink(false), port)
    }

    /// A TCP connection from the client to `port` on the uplink: the
    /// container's greeting, or the error.
    fn fetch_external(&self, port: u16) -> std::io::Result<String> {
        let published = self.published(port);
        self.client
            .inside(move || fetch(published))
            .map(|(answer, _)| answer)
    }

    /// Whether an external client reaches the container through `port`
    /// within `limit` (retried: the port holder reacts to link events in the
    /// background).
    fn served_within(&self, port: u16, limit: Duration) -> bool {
        wait_until(limit, || self.fetch_external(port).is_ok())
    }

    /// A UDP socket in the client namespace, connected to the published
    /// port: its flow keeps one 5-tuple for the whole test.
    fn udp_client(&self, port: u16) -> UdpSocket {
        let published = self.published(port);
        self.client.inside(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            socket.connect(published).unwrap();
            socket
        })
    }
}

/// One datagram on `socket`, and the answer (3 tries).
fn ask(socket: &UdpSocket, payload: &str) -> Option<String> {
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        socket.send(payload.as_bytes()).ok()?;
        if let Ok(n) = socket.recv(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}

/// The `links` of `portfwd list --json`: interface -> state.
fn link_state(ifname: &str) -> Option<String> {
    listing()["links"][ifname]["state"]
        .as_str()
        .map(str::to_owned)
}

fn kill_holder() {
    let pid = holder_pid().expect("a port holder runs after up");
    sh("kill", &["-9", &pid.to_string()]);
    assert!(
        wait_until(Duration::from_secs(5), || holder_pid().is_none()),
        "the holder did not die"
    );
}

#[test]
fn a_recreated_container_link_is_served_again_at_once() {
    let Some(_serial) = root_test("recreated_container_link") else {
        return;
    };
    let topo = Topology::new(190);
    let _web = topo.ctr.serve("[::]:5190", "web");
    let _echo = topo.ctr.serve_udp("[::]:5191", "echo");
    let _pf = topo.up();
    let ctr = topo.ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "web", &ctr, "62801:5190", "62802:5191/udp"]);
    assert!(topo.fetch_external(62801).unwrap().starts_with("web "));
    let udp = topo.udp_client(62802);
    let before = ask(&udp, "before").expect("UDP through the published port");
    assert!(before.starts_with("echo before"), "{before}");
    // An interface towards containers (new flows on an uplink from an
    // address routed there are forged); the uplink is not one.
    let old_index = ifindex_of(&topo.ctr.host_if);
    assert!(
        container_link_listed(old_index),
        "the container's link is listed"
    );
    let uplink_index = ifindex_of(&topo.client.host_if);
    assert!(!container_link_listed(uplink_index), "the uplink is not");

    // The container restarts: same address, same host-side veth name, a
    // new interface index. Its servers keep running in its namespace.
    topo.ctr.recreate_link();

    // The port holder follows link events: no command needed.
    let recreated = std::time::Instant::now();
    assert!(
        topo.served_within(62801, Duration::from_secs(10)),
        "external TCP clients are not served after the container's veth was recreated"
    );
    // For the README's "how fast" (never asserted: timing is noisy).
    eprintln!(
        "served again {:?} after the veth was recreated",
        recreated.elapsed()
    );
    // A flow opened before the restart (one UDP 5-tuple) follows the new
    // interface too, instead of being redirected to the dead one.
    let after = ask(&udp, "after");
    assert!(
        after
            .as_deref()
            .is_some_and(|a| a.starts_with("echo after")),
        "the old UDP flow is not served: {after:?}"
    );
    assert_eq!(link_state(&topo.ctr.host_if).as_deref(), Some("attached"));
    // The same pass of the holder that served the new link lists it, last.
    let new_index = ifindex_of(&topo.ctr.host_if);
    assert!(
        wait_until(Duration::from_secs(2), || {
            container_link_listed(new_index) && !container_link_listed(old_index)
        }),
        "the new link is listed instead of the old ({new_index}, {old_index})"
    );
    // A reload replaces what is attached (nothing is severed any more).
    let out = portfwd(&["up", "--iface", &topo.client.host_if, "--reload"]);
    assert!(
        out.status.success(),
        "up --reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(topo.fetch_external(62801).unwrap().starts_with("web "));
}

#[test]
fn a_recreated_uplink_is_attached_again_at_once() {
    let Some(_serial) = root_test("recreated_uplink") else {
        return;
    };
    let topo = Topology::new(191);
    let _web = topo.ctr.serve("[::]:5190", "web");
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62811:5190"]);
    assert!(topo.fetch_external(62811).unwrap().starts_with("web "));

    topo.client.recreate_link();

    assert!(
        topo.served_within(62811, Duration::from_secs(10)),
        "external clients are not served after the uplink was recreated"
    );
    assert_eq!(
        link_state(&topo.client.host_if).as_deref(),
        Some("attached")
    );
    // `attach` agrees, and so does `up --reload`.
    let out = portfwd_ok(&["attach", &topo.client.host_if]);
    assert!(out.contains("already attached"), "{out}");
    portfwd_ok(&["up", "--iface", &topo.client.host_if, "--reload"]);
    assert!(topo.fetch_external(62811).unwrap().starts_with("web "));
}

#[test]
fn without_a_holder_severed_links_are_shown_and_the_next_command_repairs_them() {
    let Some(_serial) = root_test("severed_without_holder") else {
        return;
    };
    let topo = Topology::new(192);
    let _web = topo.ctr.serve("[::]:5190", "web");
    let _pf = topo.up();
    let ctr = topo.ctr.v4().to_string();
    portfwd_ok(&["map", &ctr, "62821:5190"]);
    assert!(topo.fetch_external(62821).unwrap().starts_with("web "));

    // The killed holder: forwarding goes on, the ports are not reserved,
    // and `list` says so.
    kill_holder();
    assert!(topo.fetch_external(62821).unwrap().starts_with("web "));
    let text = portfwd_ok(&["list"]);
    assert!(
        text.contains("port holder is not running"),
        "list hides the dead holder:\n{text}"
    );
    assert_eq!(listing()["holder_running"], false);

    // Both interfaces recreated while nothing watches: `list` must not
    // claim attachments the kernel no longer has...
    topo.ctr.recreate_link();
    topo.client.recreate_link();
    assert_eq!(link_state(&topo.ctr.host_if).as_deref(), Some("severed"));
    assert_eq!(link_state(&topo.client.host_if).as_deref(), Some("severed"));
    let text = portfwd_ok(&["list"]);
    assert!(text.contains("severed"), "{text}");
    assert!(topo.fetch_external(62821).is_err());

    // ...and the next change repairs both, and restarts the holder.
    portfwd_ok(&["map", &ctr, "62822:5190"]);
    assert_eq!(link_state(&topo.ctr.host_if).as_deref(), Some("attached"));
    assert_eq!(
        link_state(&topo.client.host_if).as_deref(),
        Some("attached")
    );
    assert!(topo.fetch_external(62821).unwrap().starts_with("web "));
    assert!(topo.fetch_external(62822).unwrap().starts_with("web "));
    assert!(holder_pid().is_some());
    assert_eq!(listing()["holder_running"], true);
}

#[test]
fn a_deleted_uplink_is_shown_gone_and_detach_says_what_it_did() {
    let Some(_serial) = root_test("deleted_uplink") else {
        return;
    };
    let topo = Topology::new(193);
    let other = Container::with_prefix(193, "out", 253);
    let _pf = Portfwd::up(&["--iface", &topo.client.host_if, "--iface", &other.host_if]);
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62831:5190"]);
    let uplink = topo.client.host_if.clone();
    sh("ip", &["link", "del", &uplink]);

    let text = portfwd_ok(&["list"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("external traffic on:"))
        .unwrap_or_else(|| panic!("no uplink line:\n{text}"));
    assert!(
        line.contains(&format!("{uplink} (gone")),
        "the deleted uplink is listed as attached: {line}"
    );
    assert!(line.contains(&other.host_if), "{line}");
    assert!(!line.contains(&format!("{} (", other.host_if)), "{line}");
    assert_eq!(link_state(&uplink).as_deref(), Some("gone"));

    let out = portfwd_ok(&["detach", &uplink]);
    assert!(
        !out.contains("detached 2 programs"),
        "detach claims to detach programs from an interface that is gone: {out}"
    );
    assert!(out.contains("gone"), "{out}");
    assert_eq!(link_state(&uplink), None);
    let text = portfwd_ok(&["list"]);
    assert!(!text.contains(&uplink), "{text}");
    // The interface that is still there is untouched.
    assert_eq!(link_state(&other.host_if).as_deref(), Some("attached"));
    // `down` removes what is pinned for a gone uplink too.
    sh("ip", &["link", "del", &other.host_if]);
    assert_eq!(link_state(&other.host_if).as_deref(), Some("gone"));
    portfwd_ok(&["down"]);
    assert!(!Path::new(&pin_dir()).exists());
}

fn state_file() -> std::path::PathBuf {
    portfwd::instance::state_path(Path::new(&pin_dir()))
}

#[test]
fn a_damaged_state_file_says_what_to_do_and_is_rebuilt_from_the_kernel() {
    let Some(_serial) = root_test("damaged_state_file") else {
        return;
    };
    let topo = Topology::new(194);
    let _web = topo.ctr.serve("[::]:5190", "web");
    let _pf = topo.up();
    let ctr = topo.ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "web", &ctr, "62841:5190"]);
    let good = std::fs::read(state_file()).unwrap();
    // Cut in the snapshot (the first line): a journal line cut short at the
    // end is what a killed writer leaves, a change that did not commit.
    let snapshot_len = good.iter().position(|&b| b == b'\n').unwrap_or(good.len());
    let truncated = good[..snapshot_len / 2].to_vec();

    for damage in [b"garbage\x00\xff".to_vec(), Vec::new(), truncated] {
        std::fs::write(state_file(), &damage).unwrap();
        // A change refuses, in one line that says what to do.
        let out = portfwd(&["map", &ctr, "62842:5190"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&state_file().display().to_string())
                && stderr.contains("portfwd state rebuild"),
            "the error does not say what to do: {stderr}"
        );
        // `list` still shows what the kernel forwards, with a note.
        let out = portfwd(&["list"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("62841"), "{stdout}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("state rebuild"),
            "list does not warn"
        );
        assert_eq!(listed().len(), 2, "the IPv4 and IPv6 wildcard");
        // Forwarding never stopped.
        assert!(topo.fetch_external(62841).unwrap().starts_with("web "));

        let out = portfwd_ok(&["state", "rebuild"]);
        assert!(out.contains("2 mappings"), "{out}");
        let recorded = portfwd::model::parse_state(&std::fs::read_to_string(state_file()).unwrap())
            .expect("a rebuilt state file parses");
        assert_eq!(recorded.len(), 2);
        assert!(
            recorded
                .iter()
                .all(|m| m.name == "web" && m.host.port() == 62841)
        );
        // Changes work again.
        portfwd_ok(&["map", &ctr, "62842:5190"]);
        portfwd_ok(&["unmap", "62842"]);
    }

    // After a reboot (nothing pinned) the damaged file is the only record:
    // `up` refuses, and `state rebuild` says why it cannot help.
    portfwd_ok(&["down", "--keep-state"]);
    std::fs::write(state_file(), b"{\"version\":").unwrap();
    for args in [
        &["up", "--iface", topo.client.host_if.as_str()][..],
        &["state", "rebuild"][..],
    ] {
        let out = portfwd(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&state_file().display().to_string()),
            "{stderr}"
        );
    }
    let stderr = String::from_utf8_lossy(&portfwd(&["state", "rebuild"]).stderr).into_owned();
    assert!(stderr.contains("only record"), "{stderr}");
    assert!(
        !Path::new(&pin_dir()).exists(),
        "a failed up left the instance"
    );
    std::fs::remove_file(state_file()).unwrap();
    // The damaged copies each rebuild kept aside.
    let kept = format!(
        "{}.damaged",
        state_file().file_name().unwrap().to_string_lossy()
    );
    let dir = state_file().parent().unwrap().to_owned();
    let copies: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&kept))
        .collect();
    assert_eq!(
        copies.len(),
        3,
        "one kept copy per rebuild of a damaged file"
    );
    for copy in copies {
        std::fs::remove_file(copy.path()).unwrap();
    }
}

/// Packets to a container's veth go straight into its namespace
/// (`redirected_to_peer`), unless the veth has a queueing discipline of its
/// own: a shaper on it (the CNI `bandwidth` plugin's) must still see them.
/// The holder follows the shaper's coming and going.
#[test]
fn a_shaped_container_link_is_not_redirected_around_its_shaper() {
    let Some(_serial) = root_test("shaped_container_link") else {
        return;
    };
    let topo = Topology::new(195);
    topo.ctr.forward_on_host_link();
    let _web = topo.ctr.serve("[::]:5195", "web");
    let _pf = topo.up();
    portfwd_ok(&["map", &topo.ctr.v4().to_string(), "62851:5195"]);
    // A fetch that is served, and whether its packets went into the peer.
    let served_into_peer = || {
        let before = redirected_to_peer();
        let served = topo
            .fetch_external(62851)
            .is_ok_and(|answer| answer.starts_with("web "));
        served.then(|| redirected_to_peer() > before)
    };
    let host_if = topo.ctr.host_if.as_str();
    let listed_into_peer = || listing()["links"][host_if]["into_peer"].as_bool();
    assert_eq!(served_into_peer(), Some(true), "an unshaped veth");
    assert_eq!(listed_into_peer(), Some(true), "list: an unshaped veth");
    let published = topo.published(62851).to_string();
    let explained_into_peer =
        || portfwd_ok(&["explain", &published]).contains("into the container's namespace");
    assert!(explained_into_peer(), "explain: an unshaped veth");

    let shaper = [
        "root", "tbf", "rate", "1gbit", "burst", "128k", "latency", "50ms",
    ];
    sh(
        "tc",
        &[&["qdisc", "add", "dev", host_if][..], &shaper].concat(),
    );
    // The holder follows each change within its usual settle time.
    let followed = |into_peer: bool| {
        wait_until(Duration::from_secs(10), || {
            served_into_peer() == Some(into_peer)
        })
    };
    assert!(
        followed(false),
        "packets still go around the shaper on {host_if}"
    );
    assert_eq!(listed_into_peer(), Some(false), "list: a shaped veth");
    assert!(!explained_into_peer(), "explain: a shaped veth");
    let shaped = sh("tc", &["-s", "qdisc", "show", "dev", host_if, "root"]);
    assert!(
        !shaped.contains("Sent 0 bytes"),
        "the shaper saw nothing: {shaped}"
    );

    sh("tc", &["qdisc", "del", "dev", host_if, "root"]);
    assert!(
        followed(true),
        "packets do not go into the peer again once the shaper is gone"
    );

    // A filter on the veth's egress (another tool's policy) would be
    // skipped too. (Before TCX, portfwd's own programs are filters on the
    // same clsact qdisc, at ingress.)
    run("tc", &["qdisc", "add", "dev", host_if, "clsact"]);
    let filter = [
        "egress", "prio", "7", "protocol", "all", "u32", "match", "u32", "0", "0",
    ];
    sh(
        "tc",
        &[&["filter", "add", "dev", host_if][..], &filter].concat(),
    );
    assert!(
        followed(false),
        "packets go around an egress filter on {host_if}"
    );
    sh(
        "tc",
        &["filter", "del", "dev", host_if, "egress", "prio", "7"],
    );
    assert!(
        followed(true),
        "packets do not go into the peer again once the filter is gone"
    );

    // Without forwarding the programs cannot learn the container's
    // link-layer address: once each CPU's answer from before is a second
    // old, every packet takes the neighbour subsystem, and `list` says so
    // once the holder has followed.
    set_if_sysctl(None, "ipv4", host_if, "forwarding", "0");
    assert!(followed(false), "forwarding off");
    assert!(
        wait_until(Duration::from_secs(10), || listed_into_peer()
            == Some(false)),
        "list: forwarding off"
    );
}
