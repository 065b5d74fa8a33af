//! Kernel support (issue 18): `up` probes the kernel once, records and
//! reports what it offers, refuses below the minimum, and a failed `up`
//! leaves nothing attached or pinned. The netlink TC path (kernels without
//! TCX, before 6.6) is forced here with `PORTFWD_PROBE_DENY=tcx`, so that
//! it is tested on every kernel, not only in the 6.1 guest.
use std::{collections::BTreeSet, path::Path, process::Command, time::Duration};

use crate::support::*;

/// Programs named like ours that the kernel has loaded now.
fn our_program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| n.starts_with("pf_connect") || n.starts_with("pf_tc_"))
        })
        .map(|p| p.id())
        .collect()
}

/// `portfwd` with the tests' pin directory and extra environment.
fn portfwd_env(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let dir = pin_dir();
    Command::new(PORTFWD)
        .envs(env.iter().copied())
        .args(["--bpffs", dir.as_str()])
        .args(args)
        .output()
        .expect("running portfwd")
}

/// A failed `up` must leave no program that this run loaded: the kernel
/// frees them once their last reference goes (after an RCU grace period).
fn assert_no_new_programs(before: &BTreeSet<u32>, what: &str) {
    let mut left = BTreeSet::new();
    let gone = wait_until(Duration::from_secs(5), || {
        left = our_program_ids().difference(before).copied().collect();
        left.is_empty()
    });
    assert!(gone, "{what}: programs {left:?} still loaded");
}

fn one_line_error(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    stderr
}

#[test]
fn a_failed_up_leaves_nothing_attached_or_pinned() {
    let Some(_serial) = root_test("failed_up_leaves_nothing") else {
        return;
    };
    let _ = portfwd(&["down"]);
    let before = our_program_ids();
    let out = portfwd(&["up", "--iface", "pft-nosuchif"]);
    assert!(!out.status.success(), "up on a missing interface succeeded");
    let stderr = one_line_error(&out);
    assert!(stderr.contains("pft-nosuchif"), "{stderr}");
    assert!(
        !Path::new(&pin_dir()).exists(),
        "a failed first `up` left {} behind",
        pin_dir()
    );
    assert_no_new_programs(&before, "after a failed first up");

    // A failure after the maps were created and pinned (a cgroup path that
    // is no cgroup v2 directory, found when the socket programs are
    // attached) is undone as well. It is bad input, said as such: before,
    // the kernel's "Bad file descriptor" of the attach, exit 1.
    let ctr = Container::new(40);
    let out = portfwd(&["up", "--cgroup", "/tmp", "--iface", &ctr.host_if]);
    assert_eq!(out.status.code(), Some(2), "up with /tmp as the cgroup");
    let stderr = one_line_error(&out);
    assert!(
        stderr.contains("/tmp is not a cgroup v2 directory"),
        "{stderr}"
    );
    assert!(
        !Path::new(&pin_dir()).exists(),
        "a failed attach left {} behind",
        pin_dir()
    );
    assert_no_new_programs(&before, "after a failed attach");

    // A failed `up` on a running instance keeps the instance as it was.
    let _server = ctr.serve("0.0.0.0:80", "ctr40");
    let pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62040:80"]);
    let links = |dir: &str| {
        let mut names: Vec<String> = std::fs::read_dir(Path::new(dir).join("links"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let links_before = links(&pin_dir());
    let running = our_program_ids();
    let out = portfwd(&["up", "--iface", &ctr.host_if, "--iface", "pft-nosuchif"]);
    assert!(!out.status.success());
    one_line_error(&out);
    assert_eq!(links(&pin_dir()), links_before);
    assert_no_new_programs(&running, "after a failed second up");
    let (greeting, _) = fetch("127.0.0.1:62040".parse().unwrap()).unwrap();
    assert!(greeting.starts_with("ctr40 "), "{greeting}");
    drop(pf);
}

#[test]
fn up_reports_the_kernel_and_list_shows_it() {
    let Some(_serial) = root_test("up_reports_the_kernel") else {
        return;
    };
    let ctr = Container::new(41);
    let _ = portfwd(&["down"]);
    let out = portfwd_ok(&["up", "--iface", &ctr.host_if]);
    let _pf = Portfwd;
    let kernel_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("kernel ")).collect();
    assert_eq!(kernel_lines.len(), 1, "{out}");
    let release = sh("uname", &["-r"]);
    assert!(kernel_lines[0].contains(release.trim()), "{out}");
    let listed = portfwd_ok(&["list"]);
    assert!(
        listed.lines().any(|l| l == kernel_lines[0]),
        "list does not show `{}`:\n{listed}",
        kernel_lines[0]
    );
    let json: serde_json::Value = serde_json::from_str(&portfwd_ok(&["list", "--json"])).unwrap();
    assert_eq!(
        json["kernel"]["release"].as_str().unwrap(),
        release.trim(),
        "{json}"
    );
}

#[test]
fn below_the_minimum_up_refuses_with_one_line_and_leaves_nothing() {
    let Some(_serial) = root_test("below_the_minimum") else {
        return;
    };
    let ctr = Container::new(42);
    let _ = portfwd(&["down"]);
    let before = our_program_ids();
    // bpf_ktime_get_coarse_ns (5.11, the conntrack's clock) is the newest
    // thing the programs need; bpf_redirect_neigh (5.10) the one before.
    for (missing, since) in [
        ("bpf_ktime_get_coarse_ns", "5.11"),
        ("bpf_redirect_neigh", "5.10"),
    ] {
        let out = portfwd_env(
            &[("PORTFWD_PROBE_DENY", missing)],
            &["up", "--iface", &ctr.host_if],
        );
        assert_eq!(out.status.code(), Some(1), "without {missing}");
        let stderr = one_line_error(&out);
        assert!(
            stderr.contains(missing) && stderr.contains(since),
            "{stderr}"
        );
        assert!(
            stderr
                .trim_end()
                .ends_with("portfwd needs Linux 5.11 or newer"),
            "{stderr}"
        );
        assert!(!Path::new(&pin_dir()).exists(), "refused up left pins");
        assert_no_new_programs(&before, "after a refused up");
    }
}

/// A pids cgroup that holds one task and allows it no other: a process
/// there can start neither a thread nor a child. The `pids` hierarchy of
/// cgroup v1 (hybrid hosts, as this project's machines) or cgroup v2's
/// `pids` controller where the root delegates it; None (with a notice)
/// where neither is there. Removed on drop.
struct NoRoomForTasks(std::path::PathBuf);

impl NoRoomForTasks {
    fn new(name: &str) -> Option<Self> {
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_pids = std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "pids"));
        let parent = if v1.join("cgroup.procs").exists() {
            v1
        } else if v2_pids {
            v2
        } else {
            eprintln!("\n*** SKIPPED {name}: no pids cgroup controller here ***\n");
            return None;
        };
        let dir = parent.join(format!("portfwd-test-{name}"));
        let _ = std::fs::remove_dir(&dir);
        if let Err(error) = std::fs::create_dir(&dir) {
            eprintln!("\n*** SKIPPED {name}: cannot make a pids cgroup: {error} ***\n");
            return None;
        }
        let cgroup = NoRoomForTasks(dir);
        std::fs::write(cgroup.0.join("pids.max"), "1").expect("setting pids.max");
        Some(cgroup)
    }

    /// `portfwd` with the tests' pin directory, run in the cgroup: the
    /// shell moves itself there ("0": the writing process), then becomes
    /// portfwd.
    fn portfwd(&self, args: &[&str]) -> std::process::Output {
        let procs = self.0.join("cgroup.procs");
        Command::new("sh")
            .args(["-c", r#"echo 0 > "$0" && exec "$@""#])
            .arg(procs)
            .args([PORTFWD, "--bpffs", pin_dir().as_str()])
            .args(args)
            .output()
            .expect("running sh")
    }
}

impl Drop for NoRoomForTasks {
    fn drop(&mut self) {
        // Empty once the process has exited.
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `up` where it cannot start a thread (it verifies the programs on one
/// thread each): a one-line error, exit status 1, nothing attached or
/// pinned. Before, the failed spawn panicked (exit status 101).
#[test]
fn up_without_room_for_a_thread_fails_with_one_line_and_leaves_nothing() {
    let Some(_serial) = root_test("no_room_for_threads") else {
        return;
    };
    let Some(cgroup) = NoRoomForTasks::new("no_room_for_threads") else {
        return;
    };
    let ctr = Container::new(45);
    let _ = portfwd(&["down"]);
    let before = our_program_ids();
    let out = cgroup.portfwd(&["up", "--iface", &ctr.host_if]);
    let stderr = one_line_error(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("portfwd: "), "{stderr}");
    assert!(!Path::new(&pin_dir()).exists(), "the failed up left pins");
    assert_no_new_programs(&before, "after the failed up");
}

#[test]
fn without_tcx_netlink_filters_forward_and_down_removes_them() {
    let Some(_serial) = root_test("netlink_tc") else {
        return;
    };
    let ctr = Container::new(43);
    let client = Container::with_prefix(43, "ext", 252);
    let _server = ctr.serve("0.0.0.0:80", "ctr43");
    let no_tcx = [("PORTFWD_PROBE_DENY", "tcx")];
    let _ = portfwd(&["down"]);
    let out = portfwd_env(&no_tcx, &["up", "--iface", &client.host_if]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _pf = Portfwd;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("netlink"), "{stdout}");
    let filters = |dev: &str, dir: &str| sh("tc", &["filter", "show", "dev", dev, dir]);
    assert!(filters(&client.host_if, "ingress").contains("pf_tc_uplink_in"));
    assert!(filters(&client.host_if, "egress").contains("pf_tc_uplink_out"));

    // External traffic through the uplink reaches the container.
    let out = portfwd_env(
        &no_tcx,
        &[
            "map",
            &ctr.v4().to_string(),
            &format!("{}:62043:80", client.host_v4()),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(filters(&ctr.host_if, "ingress").contains("pf_tc_backend_in"));
    let published: std::net::SocketAddr = format!("{}:62043", client.host_v4()).parse().unwrap();
    let through_uplink = || client.inside(move || fetch(published).map(|(greeting, _)| greeting));
    let got = through_uplink().expect("through the netlink filters");
    assert!(got.starts_with("ctr43 "), "{got}");

    // A second up replaces nothing and attaches nothing twice.
    let again = portfwd_env(&no_tcx, &["up", "--iface", &client.host_if]);
    assert!(again.status.success());
    assert_eq!(
        filters(&client.host_if, "ingress")
            .lines()
            .filter(|l| l.contains("direct-action"))
            .count(),
        1
    );
    // --reload replaces the filters' program in place.
    let reload = portfwd_env(&no_tcx, &["up", "--reload", "--iface", &client.host_if]);
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    let reload = String::from_utf8_lossy(&reload.stdout);
    assert!(
        reload.contains(&format!("pf_tc_uplink_in on {}", client.host_if)),
        "{reload}"
    );
    assert_eq!(
        filters(&client.host_if, "ingress")
            .lines()
            .filter(|l| l.contains("direct-action"))
            .count(),
        1
    );
    assert!(
        through_uplink()
            .expect("after --reload")
            .starts_with("ctr43 ")
    );

    // detach and down remove the filters, not only the pins.
    portfwd_ok(&["detach", &client.host_if]);
    assert!(!filters(&client.host_if, "ingress").contains("pf_tc_"));
    portfwd_ok(&["down"]);
    assert!(!filters(&ctr.host_if, "ingress").contains("pf_tc_"));
    assert!(!Path::new(&pin_dir()).exists());
}
