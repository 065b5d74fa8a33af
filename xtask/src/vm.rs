//! `cargo xtask test --kernel 6.1`: a stated subset of the integration
//! tests, run inside another kernel booted with virtme-ng under QEMU's TCG
//! (KVM is present on these machines but QEMU aborts on it).
//!
//! The guest sees the host's files (read-only, with writable overlays on
//! /etc, /var, /tmp, /run), runs as root, and can create namespaces, veths
//! and bpffs pins; so the test binaries and the `portfwd` binary built here
//! run there unchanged. TCG is 10-30x slower than native: the subset covers
//! each data path once, not every case.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    ERROR_PREFIX,
    build::{TestBinaries, test_binaries},
    is_root, root, setup, stdout_of, succeeds,
};

/// The kernel series CI boots by default: Debian 12's own kernel.
pub(crate) const DEFAULT_KERNEL: &str = "6.1";

/// The guest subset: (module of the integration tests, tests). Both data paths, the CNI
/// plugin, state restore, and what `up` does with the kernel's features.
const SUBSET: &[(&str, &[&str])] = &[
    (
        "kernel_support",
        &[
            "a_failed_up_leaves_nothing_attached_or_pinned",
            "up_reports_the_kernel_and_list_shows_it",
            "below_the_minimum_up_refuses_with_one_line_and_leaves_nothing",
            "without_tcx_netlink_filters_forward_and_down_removes_them",
        ],
    ),
    (
        // The socket path (TCP, every local address; the host's own
        // connections leave a container's link before the conntrack) and
        // up/down.
        "socket_path",
        &[
            "host_connections_reach_the_container_through_every_local_address",
            "replies_of_host_connections_leave_the_container_link_as_the_hosts_own",
            "up_is_idempotent_and_down_leaves_nothing_behind",
        ],
    ),
    (
        // UDP on the socket path; containers dialing the host (hairpin:
        // the deepest BPF call chain, masquerade).
        "socket_completeness",
        &[
            "udp_replies_come_from_the_address_the_client_sent_to",
            "containers_reach_published_ports_through_the_host",
        ],
    ),
    (
        // Socket storage (a BTF map), the slots freed by sock_release, the
        // UDP socket iterator and SOCK_DESTROY on the older kernel.
        "socket_lifetime",
        &[
            "live_sockets_keep_their_dialed_address_through_a_churn_of_short_ones",
            "a_closed_socket_frees_its_slot",
            "unmap_and_republish_end_host_udp_sockets_connected_through_the_mapping",
        ],
    ),
    (
        // The TC path: external clients, UDP, IP fragments, counters,
        // unmap and detach; hairpin ports checked against host sockets
        // (socket lookup helpers, a reference the verifier tracks).
        "tc_path",
        &[
            "udp_request_response_with_forwarding_on_and_off",
            "large_udp_datagrams_cross_the_external_path_both_ways",
            "counters_count_and_unmap_and_detach_stop_flows",
            "hairpin_ports_avoid_the_host_sockets_on_the_gateway_address",
            // The host's own connections before the conntrack: which
            // sockets (states, ports) own a container's packet.
            "a_hairpin_flow_is_not_taken_for_a_host_socket_in_time_wait",
            "a_hairpin_flow_is_not_taken_for_a_host_socket_in_close_wait",
            "a_host_connection_clashing_with_a_hairpin_flow_does_not_reset_it",
            // Into a container's namespace (bpf_redirect_peer), the frame
            // addressed from the FIB (bpf_fib_lookup's neighbour).
            "a_container_that_bridges_its_interface_still_gets_its_frames",
        ],
    ),
    (
        // NAT46: bpf_skb_change_proto both ways, TCP and UDP.
        "nat46",
        &["ipv6_clients_reach_an_ipv4_container_through_the_ipv6_wildcard"],
    ),
    (
        // Forged loopback addresses from outside are dropped.
        "hostile",
        &["loopback_published_ports_are_unreachable_from_outside"],
    ),
    (
        // Refused clients answered by the TC program (a reset, an ICMP
        // port unreachable built in place and redirected back).
        "allowlist",
        &["refused_clients_get_a_closed_ports_answer_or_nothing_with_refuse_drop"],
    ),
    (
        // ICMP errors of translated flows translated back (path MTU
        // discovery through a router with a smaller MTU); the too-big
        // answer (bpf_check_mtu), first datagrams included; datagrams
        // without DF handed to the stack to be fragmented.
        "pmtu",
        &[
            "a_client_behind_a_smaller_mtu_gets_large_responses_v4_and_v6",
            "a_client_sending_too_big_with_df_learns_the_containers_mtu",
            "datagrams_without_df_larger_than_the_next_link_are_fragmented_both_ways",
        ],
    ),
    ("cni", &["chain_publishes_checks_and_deletes"]),
    ("reliability", &["a_reboot_brings_every_mapping_back"]),
    (
        // The trace ring buffer and the programs' events on the older kernel.
        "trace",
        &["trace_shows_new_flows_hairpin_and_stopped_flows"],
    ),
    (
        // A recreated container veth: netlink filters (no TCX on 6.1) are
        // attached again, and an old flow follows the new interface. A
        // shaper on a container's veth stops redirects into its peer.
        "follow",
        &[
            "a_recreated_container_link_is_served_again_at_once",
            "a_shaped_container_link_is_not_redirected_around_its_shaper",
        ],
    ),
];

/// The table-driven `BPF_PROG_TEST_RUN` packet cases (a unit test of the
/// library, where the embedded object is): run in the guest too, so that a
/// verifier or helper difference of the older kernel fails a test.
const PACKET_CASES: &[&str] = &[
    "datapath::tc_cases::uplink_ingress_cases",
    "datapath::tc_cases_reply::refused_clients_get_what_a_closed_port_gives",
    "datapath::tc_cases_icmp::icmp_errors_of_translated_flows_are_translated_both_ways",
    "datapath::tc_cases_reply::packets_too_big_for_the_containers_link_get_a_routers_answer",
    "datapath::tc_cases_nat46::ipv6_clients_of_ipv4_containers_are_translated_between_families",
    // Redirects into a listed veth's peer (bpf_redirect_peer).
    "datapath::tc_cases::packets_to_a_listed_veth_go_into_its_peer",
    // Ports written in place at a constant offset, or by the helper.
    "datapath::tc_cases::ports_are_rewritten_after_ipv4_headers_with_and_without_options",
    // Flow state changes and a closing flow reopened (both directions).
    "datapath::tc_cases::a_syn_that_reopens_a_closing_flow_forgets_its_old_reply_entry",
    // A flow's entries move from the opening table to the main one (TCP, UDP).
    "datapath::tc_cases::a_tcp_flow_moves_to_the_main_table_when_established",
    "datapath::tc_cases::a_udp_flow_moves_to_the_main_table_when_the_client_goes_on_after_an_answer",
    // Resets and FINs judged by sequence numbers (the other sequence cases
    // run on the host only: this machine's guest runs near its limit).
    "datapath::tc_cases_sequence::a_reset_closes_a_flow_only_from_where_its_side_is",
    // A SYN on a flow marked by a reset changes nothing; the container's
    // SYN-ACK starts the flow again.
    "datapath::tc_cases_sequence::a_syn_after_a_reset_opens_a_new_flow",
    // Oversize IPv4 without DF to the stack; first datagrams checked.
    "datapath::tc_cases_oversize::oversize_ipv4_without_df_goes_to_the_stack_which_fragments_it",
    "datapath::tc_cases_oversize::first_datagrams_too_big_are_checked_too",
    // ICMP errors of the host's own stack translated at uplink egress.
    "datapath::tc_cases_icmp::errors_the_host_sends_about_translated_packets_are_translated_at_uplink_egress",
    // The reverse-path check of new flows (bpf_fib_lookup of the source).
    "datapath::tc_cases::new_flows_from_sources_routed_elsewhere_are_dropped",
];

/// The guest's whole run is killed after this long. Its 47 tests took
/// 18–25 min under TCG on a 2-CPU machine shared with other work (sessions
/// 18 and 19: 1,090–1,324 s from boot to shutdown), and 32 min (1,939 s)
/// in session 32: the two conntrack tables made the TC programs about 40 %
/// larger, and each `up` and packet case verifies them under TCG; 22–25
/// min (1,339–1,521 s) in session 33, once the verifier walked them in
/// less than half the instructions. So a hung guest is stopped with room
/// left in CI's 90 minutes, and a slow one is not.
const GUEST_LIMIT: Duration = Duration::from_secs(45 * 60);

/// Marks the guest's exit status in its output (vng's own exit status
/// has not always been the command's).
const RESULT_MARK: &str = "PORTFWD-VM-RESULT";

/// Why the guest tests cannot run on this machine, if they cannot.
pub(crate) fn cannot_run() -> Option<String> {
    if std::env::consts::ARCH != "x86_64" {
        return Some(format!(
            "the guest is an x86_64 Debian kernel; this machine is {}",
            std::env::consts::ARCH
        ));
    }
    if !is_root() {
        return Some("installing the kernel and running the tests needs root".into());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        return Some("the kernel comes from Debian's packages (no apt-get here)".into());
    }
    None
}

/// Prints a notice that nobody can miss.
pub(crate) fn loud_notice(lines: &[String]) {
    let bar = "!".repeat(78);
    eprintln!("\n{bar}");
    for line in lines {
        eprintln!("!! {line}");
    }
    eprintln!("{bar}\n");
}

/// The guest tests of a full `cargo xtask test`, running beside the host's
/// own: the guest needs one CPU of emulation for about 20 minutes, most of
/// the run, and the host's tests leave the other CPU of a 2-CPU machine
/// mostly idle (one test at a time, much of it waiting on traffic and
/// timers). A process of its own, `cargo xtask test --kernel SERIES`, so
/// that it alone is the subreaper of the guest's processes (`run_guest`);
/// the host tests' daemons, orphaned, still go to init, which reaps them
/// (under a subreaper that does not wait for them, an exited holder would
/// stay a zombie, alive to any test that looks for its pid).
pub(crate) struct Beside {
    series: String,
    child: Child,
    /// Whether the guest booted (the process did not end before).
    booted: bool,
    /// The guest process's output from its boot on, kept for the end.
    later: JoinHandle<GuestOutput>,
}

impl Beside {
    /// Starts the guest process, shows its output until the guest boots
    /// (building the test binaries, installing the kernel and QEMU), and
    /// returns then: from there on it needs neither cargo nor apt-get,
    /// which the host's tests use next, one at a time.
    pub(crate) fn start(series: &str) -> Result<Beside> {
        // Its stdout and stderr in one pipe, in order: an error it reports
        // after the boot comes with the rest, at the end.
        let (reader, writer) = std::io::pipe()?;
        let child = Command::new(std::env::current_exe()?)
            .args(["test", "--kernel", series])
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            .spawn()
            .context("starting the guest tests' process")?;
        let (booted, booting) = mpsc::channel();
        let boot_line = booting_line(series);
        let later = thread::spawn(move || {
            let mut booted = Some(booted);
            let mut output = GuestOutput::default();
            for line in BufReader::new(reader).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).into_owned();
                if line.starts_with(ERROR_PREFIX) {
                    output.error = Some(line.clone());
                }
                if booted.is_none() {
                    output.later.push(line);
                    continue;
                }
                println!("{line}");
                if line.starts_with(&boot_line)
                    && let Some(booted) = booted.take()
                {
                    booted.send(()).ok();
                }
            }
            output
        });
        // Err: the process ended before the boot; `finish` reports how.
        let booted = booting.recv().is_ok();
        if booted {
            println!(
                "kernel {series}: the guest's tests run beside the host's; their output follows the host's"
            );
        }
        Ok(Beside {
            series: series.into(),
            child,
            booted,
            later,
        })
    }

    /// Waits for the guest's tests, prints their output, and says whether
    /// they passed.
    pub(crate) fn finish(mut self) -> Result<()> {
        let series = &self.series;
        let output = self.later.join().unwrap_or_default();
        if !output.later.is_empty() {
            println!("\n==> kernel {series}: the guest's tests, run beside the host's");
        }
        for line in &output.later {
            println!("{line}");
        }
        let status = self.child.wait()?;
        if status.success() {
            return Ok(());
        }
        let why = output.error.map_or_else(
            || status.to_string(),
            |line| line.trim_start_matches(ERROR_PREFIX).trim().to_owned(),
        );
        if !self.booted {
            bail!("kernel {series}: the guest did not boot: {why}");
        }
        bail!("kernel {series}: the guest tests failed: {why}");
    }
}

/// What the guest process printed after the guest booted, and the error
/// it exited with, if any.
#[derive(Default)]
struct GuestOutput {
    later: Vec<String>,
    error: Option<String>,
}

/// The start of the line `run_guest` prints as it boots the guest.
fn booting_line(series: &str) -> String {
    format!("kernel {series}: booting ")
}

/// Builds the test binaries, installs what the guest needs, boots
/// `series` and runs the subset in it.
pub(crate) fn test_kernel(series: &str, obj: &Path) -> Result<()> {
    if let Some(reason) = cannot_run() {
        bail!("cannot run the kernel {series} tests here: {reason}");
    }
    let work = root().join("target/vm");
    std::fs::create_dir_all(&work)?;
    let vmlinuz = install(series, &work.join("setup.log"))?;
    let TestBinaries {
        integration: binary,
        library,
        ..
    } = test_binaries(obj)?;
    let script = guest_script(&binary, &library);
    let script_path = work.join(format!("guest-{series}.sh"));
    std::fs::write(&script_path, script)?;
    run_guest(series, &vmlinuz, &script_path)
}

/// The newest Debian `linux-image-<series>.*-amd64-unsigned` kernel in
/// /boot, installed (with QEMU and virtme-ng) when missing. The `-cloud-`
/// flavour lacks the 9p module virtme-ng needs; `-rt-` is not what hosts run.
pub(crate) fn install(series: &str, log: &Path) -> Result<PathBuf> {
    let mut debs: Vec<String> = Vec::new();
    if !succeeds(Command::new("qemu-system-x86_64").arg("--version")) {
        debs.push("qemu-system-x86".into());
    }
    let mut vmlinuz = installed_kernel(series);
    if vmlinuz.is_none() {
        debs.push(newest_kernel_package(series)?);
    }
    let has_vng = succeeds(Command::new("vng").arg("--version"));
    if !has_vng && !succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
        debs.push("python3-pip".into());
    }
    if !debs.is_empty() {
        let debs: Vec<&str> = debs.iter().map(String::as_str).collect();
        setup::apt_install_logged("the guest's packages", &debs, Some(log))?;
        vmlinuz = installed_kernel(series);
    }
    let vmlinuz = vmlinuz.with_context(|| {
        format!("no /boot/vmlinuz-{series}.*-amd64 after installing its package")
    })?;
    if !has_vng {
        println!("setup: installing virtme-ng (log: {})", log.display());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "virtme-ng==1.42"])
            // Debian marks its Python as externally managed.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .context("running pip")?;
        // pyenv installs need their shims refreshed to put vng on PATH.
        Command::new("pyenv")
            .arg("rehash")
            .stderr(Stdio::null())
            .status()
            .ok();
        if !status.success() || !succeeds(Command::new("vng").arg("--version")) {
            bail!("virtme-ng did not install (see {})", log.display());
        }
    }
    Ok(vmlinuz)
}

/// virtme-ng booting `vmlinuz` under TCG (2 CPUs, 2 GiB) to run `exec`
/// as root on this machine's files, with `rwdir` writable from the guest.
pub(crate) fn guest_command(vmlinuz: &Path, rwdir: Option<&Path>, exec: &str) -> Command {
    let mut command = Command::new("vng");
    command.args(["--disable-kvm", "--cpus", "2", "--memory", "2G"]);
    if let Some(dir) = rwdir {
        command.arg("--rwdir").arg(dir);
    }
    command.arg("--run").arg(vmlinuz).arg("--exec").arg(exec);
    command
}

/// /boot/vmlinuz-<series>.N-...-amd64, the newest when several are there.
fn installed_kernel(series: &str) -> Option<PathBuf> {
    let prefix = format!("vmlinuz-{series}.");
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && is_generic_flavour(n, "-amd64"))
        })
        .collect();
    found.sort_by_key(|p| version_key(&p.to_string_lossy()));
    found.pop()
}

/// amd64, not cloud or rt.
fn is_generic_flavour(name: &str, suffix: &str) -> bool {
    name.ends_with(suffix) && !name.contains("-cloud-") && !name.contains("-rt-")
}

/// Numbers in a name, for "newest" comparisons (6.1.0-9 < 6.1.0-57).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn newest_kernel_package(series: &str) -> Result<String> {
    let prefix = format!("linux-image-{series}.");
    let names = stdout_of(Command::new("apt-cache").args([
        "search",
        "--names-only",
        &format!("^{}", prefix.replace('.', "\\.")),
    ]))?;
    let mut packages: Vec<&str> = names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix) && is_generic_flavour(n, "-amd64-unsigned"))
        .collect();
    packages.sort_by_key(|n| version_key(n));
    packages.pop().map(str::to_owned).with_context(|| {
        format!("apt knows no linux-image-{series}.*-amd64-unsigned (apt-get update?)")
    })
}

/// Shell lines that give a script's mount namespace empty state
/// directories. In the guest, /var is an overlay on the host's, whose state
/// files (the host's own test runs') would show through; on the host
/// (`verifier-diff`, under `unshare --mount`), the machine's own stay
/// untouched.
pub(crate) const PRIVATE_STATE_DIRS: &str = "\
for dir in /var/lib/portfwd /var/lib/cni; do
    mkdir -p $dir && mount -t tmpfs portfwd-private $dir || exit 1
done
";

/// The guest's script: the subset's tests one at a time, then the mark.
fn guest_script(exe: &Path, library: &Path) -> String {
    let mut script = format!(
        "#!/bin/bash\n\
         # Generated by `cargo xtask test --kernel`: runs inside the guest.\n\
         echo \"guest kernel: $(uname -r)\"\n\
         {PRIVATE_STATE_DIRS}\
         failed=0\n",
    );
    for (module, tests) in SUBSET {
        let names: Vec<String> = tests.iter().map(|t| format!("{module}::{t}")).collect();
        script.push_str(&format!(
            "{} --test-threads=1 --exact {} || failed=1\n",
            exe.display(),
            names.join(" ")
        ));
    }
    script.push_str(&format!(
        "{} --test-threads=1 --exact {} || failed=1\n",
        library.display(),
        PACKET_CASES.join(" ")
    ));
    script.push_str(&format!("echo \"{RESULT_MARK} failed=$failed\"\n"));
    script
}

fn run_guest(series: &str, vmlinuz: &Path, script: &Path) -> Result<()> {
    let count: usize =
        SUBSET.iter().map(|(_, tests)| tests.len()).sum::<usize>() + PACKET_CASES.len();
    println!(
        "{}{} under TCG (virtme-ng) for {count} tests (integration tests and the packet cases)",
        booting_line(series),
        vmlinuz.display()
    );
    let started = Instant::now();
    // Orphans of the guest's processes become ours, for the watchdog to find
    // (`kill_descendants`).
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut child = guest_command(vmlinuz, None, &format!("bash {} 2>&1", script.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting vng")?;
    // The limit: a watchdog kills a hung guest.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + GUEST_LIMIT;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(1));
            // The guest is done once its process is gone.
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
        }
        kill_descendants(std::process::id());
        true
    });
    let mut result = None;
    // A renamed test would match nothing and pass silently: count them.
    let mut passed = 0;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        if let Some(rest) = line.trim().strip_prefix(RESULT_MARK) {
            result = Some(rest.trim() == "failed=0");
        }
        if line.trim().starts_with("test ") && line.trim().ends_with(" ... ok") {
            passed += 1;
        }
        println!("  [{series}] {line}");
    }
    let status = child.wait()?;
    let killed = watchdog.join().unwrap_or(false);
    let secs = started.elapsed().as_secs();
    match result {
        Some(true) if passed != count => {
            bail!("kernel {series}: {passed} of the {count} guest tests ran and passed ({secs} s)")
        }
        Some(true) => {
            println!("kernel {series}: {count} tests passed in the guest ({secs} s)");
            Ok(())
        }
        Some(false) => bail!("kernel {series}: integration tests failed in the guest ({secs} s)"),
        None if killed => bail!(
            "kernel {series}: the guest ran longer than {} min and was killed",
            GUEST_LIMIT.as_secs() / 60
        ),
        None => bail!("kernel {series}: the guest did not finish its tests ({status}, {secs} s)"),
    }
}

/// Kills every process under `pid`, over again until none is left (a
/// process may fork meanwhile). For the guest, `pid` is xtask itself, made
/// a subreaper before vng starts (`PR_SET_CHILD_SUBREAPER`): vng runs qemu
/// as a child of its own, which outlived a kill of vng alone and held the
/// output pipe open (so the reading loop waited for the guest anyway), and
/// a process whose parent died is then xtask's, not init's, and found here
/// too. The guest's processes stay in xtask's process group, so Ctrl-C
/// still reaches them.
fn kill_descendants(pid: u32) {
    for _ in 0..50 {
        let living = descendants(pid);
        if living.is_empty() {
            return;
        }
        for p in living {
            // SAFETY: kill has no memory-safety preconditions; these are
            // our descendants.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The living (not zombie) processes under `pid`, from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let processes: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?;
            let ppid = fields.next()?.parse().ok()?;
            (state != "Z").then_some((p, ppid))
        })
        .collect();
    let mut found = vec![pid];
    let mut at = 0;
    while at < found.len() {
        let parent = found[at];
        found.extend(
            processes
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        at += 1;
    }
    found.remove(0);
    found
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    #[test]
    fn the_guest_command_boots_under_tcg_and_runs_the_script() {
        let args = |rwdir: Option<&Path>| -> Vec<String> {
            guest_command(Path::new("/boot/vmlinuz-6.1"), rwdir, "bash s")
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let booted = ["--run", "/boot/vmlinuz-6.1", "--exec", "bash s"];
        let tcg = ["--disable-kvm", "--cpus", "2", "--memory", "2G"];
        assert_eq!(args(None), [&tcg[..], &booted[..]].concat());
        assert_eq!(
            args(Some(Path::new("/w"))),
            [&tcg[..], &["--rwdir", "/w"], &booted[..]].concat()
        );
    }

    #[test]
    fn the_guest_script_mounts_empty_state_dirs_before_its_tests() {
        let script = guest_script(Path::new("/t/integration"), Path::new("/t/portfwd"));
        let mounted = script.find(PRIVATE_STATE_DIRS).expect("the mounts");
        let first_test = script.find("/t/integration ").expect("the tests");
        assert!(mounted < first_test, "{script}");
        assert!(script.contains("/t/portfwd --test-threads=1 --exact datapath::"));
    }

    /// Everything under a process dies: its child's child (as qemu under
    /// vng), and an orphan that a subreaper took in (as xtask takes in
    /// the guest's). Reads the pid that `sh` prints on its first line.
    #[test]
    fn kill_descendants_ends_grandchildren_and_orphans() {
        let started = |script: &str, subreaper: bool| {
            let mut command = Command::new("sh");
            command.args(["-c", script]).stdout(Stdio::piped());
            if subreaper {
                // SAFETY: prctl with integer arguments, async-signal-safe.
                unsafe {
                    command.pre_exec(|| {
                        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
                        Ok(())
                    })
                };
            }
            let mut child = command.spawn().unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            (child, line.trim().parse::<u32>().unwrap())
        };
        let alive = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        };
        let gone_soon = |pid: u32| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            !alive(pid)
        };
        let (mut parent, grandchild) = started("sleep 300 & echo $!; wait", false);
        kill_descendants(parent.id());
        assert!(
            gone_soon(grandchild),
            "the grandchild {grandchild} lives on"
        );
        parent.kill().ok();
        parent.wait().unwrap();

        // The middle shell exits at once: its sleep is the subreaper's.
        let (mut reaper, orphan) = started("sh -c 'sleep 300 & echo $!'; exec sleep 300", true);
        assert!(alive(orphan));
        kill_descendants(reaper.id());
        assert!(gone_soon(orphan), "the orphan {orphan} lives on");
        reaper.kill().ok();
        reaper.wait().unwrap();
    }

    #[test]
    fn every_test_of_the_subset_exists() {
        for (bin, tests) in SUBSET {
            let path = root()
                .join("portfwd/tests/integration")
                .join(format!("{bin}.rs"));
            let source = std::fs::read_to_string(&path).unwrap();
            for test in *tests {
                assert!(
                    source.contains(&format!("fn {test}()")),
                    "{} has no test {test}",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn the_packet_cases_exist() {
        for case in PACKET_CASES {
            let (module, test) = case.rsplit_once("::").unwrap();
            let file = root()
                .join("portfwd/src")
                .join(format!("{}.rs", module.replace("::", "/")));
            let source = std::fs::read_to_string(&file).unwrap();
            assert!(
                source.contains(&format!("fn {test}()")),
                "{} has no test {test}",
                file.display()
            );
        }
    }

    #[test]
    fn newest_kernel_is_chosen_by_number() {
        let mut names = ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.1.0-10-amd64"];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names.last(), Some(&"6.1.0-57-amd64"));
    }

    #[test]
    fn only_the_generic_flavour_is_picked() {
        assert!(is_generic_flavour(
            "linux-image-6.1.0-57-amd64-unsigned",
            "-amd64-unsigned"
        ));
        assert!(!is_generic_flavour(
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "-amd64-unsigned"
        ));
        assert!(!is_generic_flavour(
            "linux-image-6.1.0-57-rt-amd64-unsigned",
            "-amd64-unsigned"
        ));
    }
}
