//! The control plane at scale: automatic host ports by the thousand,
//! requests that cannot be met, and commands waiting for one another.
//! Needs root (`cargo xtask test`).

use std::collections::BTreeSet;

use crate::support::*;

/// The host ports of the listed mappings named `name`.
fn ports_of(name: &str) -> BTreeSet<u64> {
    listed()
        .iter()
        .filter(|m| m["name"] == name)
        .map(|m| m["host_port"].as_u64().unwrap())
        .collect()
}

#[test]
fn automatic_ports_by_the_thousand_and_requests_that_cannot_be_met() {
    let Some(_serial) = root_test("automatic_ports_at_scale") else {
        return;
    };
    let ctr = Container::new(61);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    let ip = ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "keep", &ip, "62560:80"]);
    let before = listed();

    // More automatic ports than the range 49153-60999 holds (11,847): a
    // usage error on one line, before any search, and nothing changes.
    let out = portfwd(&["map", "--name", "toomany", &ip, "49153-61000"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("11848") && stderr.contains("11847"),
        "{stderr}"
    );
    assert_eq!(listed(), before);

    // 2,000 automatic ports in one command: each container port its own.
    portfwd_ok(&["map", "--name", "auto", &ip, "20000-21999/udp"]);
    let auto = ports_of("auto");
    assert_eq!(auto.len(), 2000);
    assert!(auto.iter().all(|&p| (49153..=60999).contains(&p)));
    portfwd_ok(&["unmap", "--name", "auto"]);

    // A pool of two ports serves two publications; a third finds it full:
    // one line, exit 1, nothing changes.
    portfwd_ok(&["map", "--name", "pool", &ip, "62561-62562:80"]);
    portfwd_ok(&["map", "--name", "pool", &ip, "62561-62562:81"]);
    assert_eq!(ports_of("pool"), BTreeSet::from([62561, 62562]));
    let full = listed();
    let out = portfwd(&["map", "--name", "pool", &ip, "62561-62562:82"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no free host port in 62561-62562"),
        "{stderr}"
    );
    assert_eq!(listed(), full);
}

#[test]
fn a_command_waiting_for_the_lock_names_who_holds_it() {
    let Some(_serial) = root_test("lock_wait_notice") else {
        return;
    };
    let ctr = Container::new(62);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    // flock(1) takes the same lock portfwd commands take, for 3 s.
    let mut holder = std::process::Command::new("flock")
        .args([pin_dir().as_str(), "sleep", "3"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let held = || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .contains(&format!(" {} ", holder.id()))
    };
    while !held() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = portfwd(&["list"]);
    let _ = holder.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("waiting for flock") && stderr.contains(&format!("(pid {})", holder.id())),
        "{stderr}"
    );
}

/// The lowest file descriptor number that process `pid` has free.
fn lowest_free_fd(pid: u32) -> u64 {
    let open: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

/// Sets the open-files limit (soft) of process `pid`; the old limits.
fn set_open_files_limit(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads `new` and writes `old`, both valid structs.
    unsafe {
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old),
            0
        );
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()),
            0
        );
    }
    old
}

/// A port holder with no open file left for a connection answers it (and
/// says why) instead of leaving it pending while poll wakes it up again and
/// again (a busy loop at 100 % CPU, every command waiting for it in vain).
#[test]
fn a_holder_out_of_open_files_answers_and_goes_on() {
    use std::io::{BufRead, BufReader, Write};
    let Some(_serial) = root_test("holder_out_of_files") else {
        return;
    };
    let ctr = Container::new(63);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    let pid = holder_pid().expect("the port holder runs");
    // Every descriptor number it may still use is taken: accept fails with
    // EMFILE.
    let old = set_open_files_limit(pid, lowest_free_fd(pid));
    let socket = portfwd::instance::holder_socket(std::path::Path::new(&pin_dir()));
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    // The holder may have answered and hung up already.
    writeln!(stream, "ping").ok();
    let mut reply = String::new();
    let read = BufReader::new(&stream).read_line(&mut reply);
    set_open_files_limit(pid, old.rlim_cur);
    assert!(
        read.is_ok(),
        "the holder left the connection pending: {read:?}"
    );
    assert!(reply.contains("open files"), "{reply:?}");
    // With files again, it serves as before.
    let ip = ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "files", &ip, "62563:80"]);
    assert_eq!(holder_pid(), Some(pid), "the same holder");
    portfwd_ok(&["unmap", "--name", "files"]);
}
