//! `cargo xtask bench --rootless`: a port of an unprivileged user's own
//! network namespace, published by RootlessKit's `builtin` port driver (a
//! process that copies every byte), by portfwd's rootless path (`portfwd
//! serve` under a policy, the user's `portfwd map --netns PID`) and by
//! pasta, into the same namespace, to the same servers, on the same host
//! ports, in turns.
//!
//! ```text
//! <p>-cli --veth-- h2e (10.N.2.1) <p>-host: rootlesskit (builtin driver), portfwd serve, pasta
//!                                     |  slirp4netns: tap0 (the namespace's own network)
//!                                     |  pfr0 --veth-- portfwd0 (portfwd's way in)
//!                                     |  pasta: pasta0 (while pasta publishes)
//!                                  the user's namespace (RootlessKit's child): nginx, iperf3
//! ```
//!
//! The user is a system user the bench creates (with a subordinate id range,
//! which RootlessKit needs) and deletes; its files live in a directory of
//! its own under /tmp, deleted too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::json;

use super::measure::{self, Load, Metric, NetPath, PATHS, Target};
use super::modes::{HTTP, IPERF, Mode, Port};
use super::ns::{self, H2E, Role, Topo, check, in_ns, in_ns_as};
use super::report::{self, median, ratio, value};
use super::{NGINX_CONF, Plan, loadavg};
use crate::interrupt;

/// What publishes the namespace's ports on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Driver {
    /// RootlessKit 1.1's `builtin` port driver (`rootlessctl add-ports`).
    Rootlesskit,
    /// portfwd's rootless path: the user's `portfwd map --netns PID`.
    Portfwd,
    /// pasta (Debian's passt 2023-03), joined to the same namespace: a
    /// userspace copy too (splice for local clients, its own TCP/IP
    /// translation through a tap device for external ones).
    Pasta,
}

const DRIVERS: [Driver; 3] = [Driver::Rootlesskit, Driver::Portfwd, Driver::Pasta];

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Rootlesskit => "rootlesskit builtin",
            Driver::Portfwd => "portfwd rootless",
            Driver::Pasta => "pasta",
        }
    }
}

/// The published ports: HTTP (nginx) and iperf3, as in the rootful modes.
const PUBLISHED: [Port; 2] = [HTTP, IPERF];

/// The figures of this comparison (UDP is left out: the issue asks for
/// throughput, request rate and connection rate).
const METRICS: [Metric; 6] = [
    Metric::TcpGbps,
    Metric::KaRps,
    Metric::KaP50Ms,
    Metric::KaP99Ms,
    Metric::ConnPerS,
    Metric::ConnP99Ms,
];

/// A subordinate uid/gid range for the bench's user (RootlessKit maps it
/// into the namespace); far from the usual 100000+ allocations.
const SUBIDS: &str = "493216-558751";

/// The way in's addresses, inside the bench's own host namespace.
const POOL_V4: &str = "198.19.251.0/24";
const POOL_V6: &str = "fd70:6f72:7466:7764::fb00/120";

#[derive(Default)]
pub(crate) struct RootlessResults {
    samples: BTreeMap<(Driver, NetPath, Metric), Vec<f64>>,
    syn_retrans: BTreeMap<(Driver, NetPath), Vec<u64>>,
    errors: BTreeMap<(Driver, NetPath), u64>,
    load: Vec<f64>,
}

/// Everything the comparison creates; Drop removes it (success, error or Ctrl-C).
struct Rig<'a> {
    topo: &'a Topo,
    portfwd: PathBuf,
    bpffs: PathBuf,
    user: String,
    dir: PathBuf,
    rootlesskit: Option<Child>,
    serve: Option<Child>,
    /// pasta, while it publishes (started per trial: its ports are fixed).
    pasta: Option<Child>,
    /// The pid of RootlessKit's child: its namespace is the target.
    child_pid: Option<u32>,
    /// The port ids `rootlessctl add-ports` returned, while published.
    rootlessctl_ids: Vec<String>,
}

pub(crate) fn bench(
    plan: &Plan,
    prefix: &str,
    topo: &Topo,
    portfwd: PathBuf,
    out: &Path,
) -> Result<()> {
    let started = Instant::now();
    let mut rig = Rig {
        topo,
        portfwd,
        bpffs: PathBuf::from(format!("/sys/fs/bpf/portfwd-bench-{prefix}")),
        user: format!("{prefix}-rootless"),
        dir: PathBuf::from(format!("/tmp/portfwd-bench-{prefix}-rootless")),
        rootlesskit: None,
        serve: None,
        pasta: None,
        child_pid: None,
        rootlessctl_ids: Vec::new(),
    };
    rig.cleanup();
    let mut results = RootlessResults::default();
    let result = rig.run(plan, &mut results);
    drop(rig);
    interrupt::check()?;
    result?;

    let markdown = markdown(plan, &results, started.elapsed().as_secs_f64());
    println!("\n{markdown}");
    std::fs::write(out.join("rootless.md"), &markdown)?;
    std::fs::write(
        out.join("rootless.json"),
        serde_json::to_string_pretty(&to_json(plan, &results))? + "\n",
    )?;
    println!(
        "results: {}, {}",
        out.join("rootless.md").display(),
        out.join("rootless.json").display()
    );
    Ok(())
}

impl Drop for Rig<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Rig<'_> {
    fn run(&mut self, plan: &Plan, results: &mut RootlessResults) -> Result<()> {
        println!(
            "==> rootless: user {}, namespaces {} and {} on 10.{}.0.0/16",
            self.user, self.topo.host, self.topo.cli, self.topo.net
        );
        self.topo.create()?;
        // pasta takes the addresses of its namespace interface from the
        // host's default-route interface, and refuses to start without one.
        ns::ip(
            &self.topo.host,
            &format!("route add default via 10.{}.2.2", self.topo.net),
        )?;
        self.create_user()?;
        self.start_rootlesskit()?;
        self.start_portfwd()?;
        let load = Load {
            secs: plan.secs,
            connections: plan.connections,
        };
        for rep in 0..plan.reps {
            // Interleaved: the order reversed and shifted from one
            // repetition to the next, as in the rootful modes.
            let mut order = DRIVERS;
            if rep % 2 == 1 {
                order.reverse();
            }
            order.rotate_left((rep / 2) % DRIVERS.len());
            for driver in order {
                interrupt::check()?;
                if let Some(l) = loadavg() {
                    results.load.push(l);
                }
                self.publish(driver)?;
                let measured = measure_driver(self.topo, driver, rep, plan, &load, results);
                let unpublished = self.unpublish(driver);
                measured?;
                unpublished?;
            }
        }
        Ok(())
    }

    /// A system user with a subordinate id range, and its own directory.
    fn create_user(&mut self) -> Result<()> {
        check(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            &self.user,
        ]))?;
        check(Command::new("usermod").args([
            "--add-subuids",
            SUBIDS,
            "--add-subgids",
            SUBIDS,
            &self.user,
        ]))?;
        std::fs::create_dir_all(self.dir.join("nginx/tmp"))?;
        std::fs::write(self.dir.join("nginx/nginx.conf"), NGINX_CONF)?;
        std::fs::write(
            self.dir.join("rootless.toml"),
            format!(
                "users = [{:?}]\nports = \"1024-65535\"\npool_v4 = {POOL_V4:?}\npool_v6 = {POOL_V6:?}\n",
                self.user
            ),
        )?;
        check(
            Command::new("chown")
                .arg("-R")
                .arg(&self.user)
                .arg(&self.dir),
        )?;
        Ok(())
    }

    /// `cmd ARGS` as the bench's user, in the bench's host namespace.
    fn as_user(&self, program: &str, role: Role) -> Command {
        let mut cmd = in_ns_as(&self.topo.host, "runuser", role);
        cmd.args(["-u", &self.user, "--", "env"])
            .arg(format!("XDG_RUNTIME_DIR={}", self.dir.display()))
            .arg(program);
        cmd
    }

    /// RootlessKit with slirp4netns and the builtin port driver (no port yet:
    /// `rootlessctl add-ports` publishes them per trial), running the servers
    /// in its child namespace. The proxy and the servers share a CPU under
    /// `--pin`, as docker-proxy and the servers do in the rootful modes.
    fn start_rootlesskit(&mut self) -> Result<()> {
        let nginx = self.dir.join("nginx");
        let script = format!(
            "nginx -p {0} -c {0}/nginx.conf -e stderr & iperf3 -s -p {1} & wait",
            nginx.display(),
            IPERF.ctr
        );
        let log = std::fs::File::create(self.dir.join("rootlesskit.log"))?;
        let child = self
            .as_user("rootlesskit", Role::Proxy)
            .arg("--state-dir")
            .arg(self.state_dir())
            .args([
                "--net=slirp4netns",
                "--disable-host-loopback",
                "--port-driver=builtin",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: the guard stops RootlessKit, slirp4netns
            // and the servers together.
            .process_group(0)
            .spawn()
            .context("starting rootlesskit")?;
        self.rootlesskit = Some(child);
        let pid_file = self.state_dir().join("child_pid");
        let pid = poll(Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&pid_file).ok()?;
            text.trim().parse::<u32>().ok()
        })
        .with_context(|| {
            format!(
                "rootlesskit did not start its child: {}",
                self.log_tail("rootlesskit.log")
            )
        })?;
        self.child_pid = Some(pid);
        for port in PUBLISHED {
            let listening = poll(Duration::from_secs(10), || {
                let out = Command::new("nsenter")
                    .arg(format!("--net=/proc/{pid}/ns/net"))
                    .args(["ss", "-Hlnt", &format!("sport = :{}", port.ctr)])
                    .output()
                    .ok()?;
                (!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(())
            });
            if listening.is_none() {
                bail!(
                    "nothing listens on {} in rootlesskit's namespace: {}",
                    port.ctr,
                    self.log_tail("rootlesskit.log")
                );
            }
        }
        Ok(())
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("rootlesskit")
    }

    /// portfwd on the uplink, and `portfwd serve` with the rootless policy.
    fn start_portfwd(&mut self) -> Result<()> {
        check(self.portfwd_cmd().args(["up", "--iface", H2E]))?;
        let log = std::fs::File::create(self.dir.join("serve.log"))?;
        let serve = self
            .portfwd_cmd()
            .args(["serve", "--metrics", "none", "--rootless-policy"])
            .arg(self.dir.join("rootless.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting portfwd serve")?;
        self.serve = Some(serve);
        // Ready once the user's `list` goes through its API.
        let ready = poll(Duration::from_secs(10), || {
            let out = self.user_portfwd().arg("list").output().ok()?;
            out.status.success().then_some(())
        });
        if ready.is_none() {
            bail!(
                "portfwd serve's API never answered: {}",
                self.log_tail("serve.log")
            );
        }
        Ok(())
    }

    /// `portfwd --bpffs B ...` as root in the host namespace.
    fn portfwd_cmd(&self) -> Command {
        let mut cmd = in_ns(&self.topo.host, &self.portfwd);
        cmd.arg("--bpffs").arg(&self.bpffs);
        cmd
    }

    /// `portfwd --bpffs B ...` as the bench's user.
    fn user_portfwd(&self) -> Command {
        let mut cmd = self.as_user(&self.portfwd.to_string_lossy(), Role::Control);
        cmd.arg("--bpffs").arg(&self.bpffs);
        cmd
    }

    fn rootlessctl(&self) -> Command {
        let mut cmd = self.as_user("rootlessctl", Role::Control);
        cmd.arg("--socket").arg(self.state_dir().join("api.sock"));
        cmd
    }

    fn publish(&mut self, driver: Driver) -> Result<()> {
        match driver {
            Driver::Rootlesskit => {
                for port in PUBLISHED {
                    let spec = format!("0.0.0.0:{}:{}/tcp", port.host, port.ctr);
                    let id = check(self.rootlessctl().args(["add-ports", &spec]))?;
                    self.rootlessctl_ids.push(id.trim().to_owned());
                }
            }
            Driver::Portfwd => {
                let pid = self.child_pid.context("no rootlesskit child")?.to_string();
                let mut map = self.user_portfwd();
                map.args(["map", "--netns", &pid, "--name", "bench"]);
                for port in PUBLISHED {
                    map.arg(format!("0.0.0.0:{}:{}", port.host, port.ctr));
                }
                check(&mut map)?;
            }
            Driver::Pasta => {
                let pid = self.child_pid.context("no rootlesskit child")?;
                let log = std::fs::File::create(self.dir.join("pasta.log"))?;
                let mut cmd = self.as_user("pasta", Role::Proxy);
                cmd.arg("--userns")
                    .arg(format!("/proc/{pid}/ns/user"))
                    .arg("--netns")
                    .arg(format!("/proc/{pid}/ns/net"))
                    .args(["-I", "pasta0", "-i", H2E, "--config-net", "-f"])
                    // No UDP, nothing from the namespace to the host.
                    .args(["-u", "none", "-T", "none", "-U", "none"]);
                for port in PUBLISHED {
                    cmd.args(["-t", &format!("{}:{}", port.host, port.ctr)]);
                }
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .process_group(0)
                    .spawn()
                    .context("starting pasta")?;
                self.pasta = Some(child);
                for port in PUBLISHED {
                    ns::wait_listening(&self.topo.host, "t", port.host).with_context(|| {
                        format!("pasta did not publish: {}", self.log_tail("pasta.log"))
                    })?;
                }
            }
        }
        Ok(())
    }

    fn unpublish(&mut self, driver: Driver) -> Result<()> {
        match driver {
            Driver::Rootlesskit => {
                for id in std::mem::take(&mut self.rootlessctl_ids) {
                    check(self.rootlessctl().args(["remove-ports", &id]))?;
                }
            }
            Driver::Portfwd => {
                check(self.user_portfwd().args(["unmap", "--name", "bench"]))?;
            }
            Driver::Pasta => {
                if let Some(child) = self.pasta.take() {
                    stop_group(child);
                }
            }
        }
        Ok(())
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" / ")
    }

    /// Removes what this run (or an earlier one killed hard) left: the
    /// processes by their own ids, the pins, the namespaces, the user (and
    /// with it its subordinate ids), the directory.
    fn cleanup(&mut self) {
        for child in [
            self.pasta.take(),
            self.serve.take(),
            self.rootlesskit.take(),
        ]
        .into_iter()
        .flatten()
        {
            stop_group(child);
        }
        if self.bpffs.exists() {
            Command::new(&self.portfwd)
                .arg("--bpffs")
                .arg(&self.bpffs)
                .arg("down")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok();
        }
        self.topo.destroy();
        if self.dir.exists() || user_exists(&self.user) {
            Command::new("userdel")
                .arg(&self.user)
                .stderr(Stdio::null())
                .status()
                .ok();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// SIGTERM to a child's process group, SIGKILL after 3 s.
fn stop_group(mut child: Child) {
    let group = child.id() as libc::pid_t;
    // SAFETY: killpg has no memory effects; the group is our child's own.
    unsafe { libc::killpg(group, libc::SIGTERM) };
    let exited = poll(Duration::from_secs(3), || child.try_wait().ok().flatten());
    if exited.is_none() {
        // SAFETY: as above.
        unsafe { libc::killpg(group, libc::SIGKILL) };
        child.wait().ok();
    }
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Polls `f` every 50 ms until it gives a value, for at most `limit`.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One driver's figures on both paths (the clients dial the host's ports
/// as in the rootful modes: the uplink address from the client namespace,
/// 127.0.0.1 from the host namespace).
fn measure_driver(
    topo: &Topo,
    driver: Driver,
    rep: usize,
    plan: &Plan,
    load: &Load,
    results: &mut RootlessResults,
) -> Result<()> {
    for path in PATHS {
        // Mode::Portfwd: a client of the host's published ports.
        let target = Target::new(topo, Mode::Portfwd, path);
        measure::probe(&target)
            .with_context(|| format!("{} on the {} path", driver.name(), path.name()))?;
        let mut record = |metric, v| {
            results
                .samples
                .entry((driver, path, metric))
                .or_default()
                .push(v);
        };
        interrupt::check()?;
        let gbps = measure::iperf3(&target, load)?;
        record(Metric::TcpGbps, gbps);
        let mut line = format!(
            "[{}/{}] {:<19} {:<8} tcp {gbps:.1} Gbit/s,",
            rep + 1,
            plan.reps,
            driver.name(),
            path.name()
        );
        let (mut syn, mut errors) = (0, 0);
        for close in [false, true] {
            interrupt::check()?;
            let w = measure::wrk(&target, load, close)?;
            let metrics = if close {
                [Metric::ConnPerS, Metric::ConnP50Ms, Metric::ConnP99Ms]
            } else {
                [Metric::KaRps, Metric::KaP50Ms, Metric::KaP99Ms]
            };
            record(metrics[0], w.rps);
            record(metrics[1], w.p50_ms);
            record(metrics[2], w.p99_ms);
            syn += w.syn_retrans;
            errors += w.errors;
            write!(
                line,
                " {} {:.0}/s p99 {:.2} ms,",
                if close { "conn" } else { "ka" },
                w.rps,
                w.p99_ms
            )
            .expect("writing to a String");
        }
        results
            .syn_retrans
            .entry((driver, path))
            .or_default()
            .push(syn);
        *results.errors.entry((driver, path)).or_default() += errors;
        println!("{line} SYN rtx {syn}, errors {errors}");
    }
    Ok(())
}

impl RootlessResults {
    fn series(&self, driver: Driver, path: NetPath, metric: Metric) -> &[f64] {
        self.samples
            .get(&(driver, path, metric))
            .map_or(&[], Vec::as_slice)
    }

    fn med(&self, driver: Driver, path: NetPath, metric: Metric) -> Option<f64> {
        let s = self.series(driver, path, metric);
        (!s.is_empty()).then(|| median(s))
    }

    /// `a` / `b`, ratio of medians.
    fn ratio(&self, a: Driver, b: Driver, path: NetPath, metric: Metric) -> Option<f64> {
        Some(self.med(a, path, metric)? / self.med(b, path, metric)?)
    }
}

fn markdown(plan: &Plan, r: &RootlessResults, elapsed: f64) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "Rootless: command `{}` ({:.1} min). One user+network namespace made by \
         RootlessKit 1.1 (`--net=slirp4netns --port-driver=builtin`) as an \
         unprivileged user, nginx and iperf3 inside; its ports published on the \
         same host ports, in turns, by RootlessKit's builtin driver (`rootlessctl \
         add-ports 0.0.0.0:8080:80/tcp`), by the user's `portfwd map --netns PID` \
         through `portfwd serve`, or by pasta joined to the namespace (`pasta \
         --userns … --netns … --config-net -t 8080:80`). Each cell: median of {} \
         repetition{} (min–max), each {} s; `[1.50×]`: ratio to RootlessKit's \
         builtin driver (latency: lower is better). wrk: 1 thread, {} connections.\n",
        plan.command,
        elapsed / 60.0,
        plan.reps,
        if plan.reps == 1 { "" } else { "s" },
        plan.secs,
        plan.connections
    )
    .expect("writing to a String");
    if !r.load.is_empty() {
        let (min, max) = report::min_max(&r.load);
        writeln!(
            s,
            "1-minute load average before each configuration: {min:.2}–{max:.2}.\n"
        )
        .expect("writing to a String");
    }
    for path in PATHS {
        let title = match path {
            NetPath::External => "External path: client namespace → host address:port",
            NetPath::Local => "Local path: host process → 127.0.0.1:port",
        };
        writeln!(s, "#### Rootless, {title}\n").expect("writing to a String");
        s += "| published by |";
        for metric in METRICS {
            write!(s, " {} |", metric.label()).expect("writing to a String");
        }
        s += " SYN rtx | errors |\n|---|";
        s += &"---|".repeat(METRICS.len() + 2);
        s += "\n";
        for driver in DRIVERS {
            write!(s, "| {} |", driver.name()).expect("writing to a String");
            for metric in METRICS {
                let samples = r.series(driver, path, metric);
                if samples.is_empty() {
                    s += " – |";
                    continue;
                }
                let med = median(samples);
                let (min, max) = report::min_max(samples);
                write!(s, " {}", value(metric, med)).expect("writing to a String");
                if samples.len() > 1 {
                    write!(s, " ({}–{})", value(metric, min), value(metric, max))
                        .expect("writing to a String");
                }
                if driver != Driver::Rootlesskit
                    && let Some(x) = r.ratio(driver, Driver::Rootlesskit, path, metric)
                {
                    write!(s, " [{}]", ratio(x)).expect("writing to a String");
                }
                s += " |";
            }
            let syn: Vec<String> = r
                .syn_retrans
                .get(&(driver, path))
                .into_iter()
                .flatten()
                .map(u64::to_string)
                .collect();
            let errors = r.errors.get(&(driver, path)).copied().unwrap_or(0);
            writeln!(s, " {} | {errors} |", syn.join(", ")).expect("writing to a String");
        }
        s += "\n";
    }
    s += "#### Rootless, portfwd relative to each (ratio of medians; latency: lower is better)\n\n";
    s += "| path | portfwd vs |";
    for metric in METRICS {
        write!(s, " {} |", metric.label()).expect("writing to a String");
    }
    s += "\n|---|---|";
    s += &"---|".repeat(METRICS.len());
    s += "\n";
    for path in PATHS {
        for other in [Driver::Rootlesskit, Driver::Pasta] {
            write!(s, "| {} | {} |", path.name(), other.name()).expect("writing to a String");
            for metric in METRICS {
                let x = r.ratio(Driver::Portfwd, other, path, metric);
                write!(s, " {} |", x.map_or("–".into(), ratio)).expect("writing to a String");
            }
            s += "\n";
        }
    }
    s
}

fn to_json(plan: &Plan, r: &RootlessResults) -> serde_json::Value {
    let rows: Vec<_> = r
        .samples
        .iter()
        .map(|((driver, path, metric), samples)| {
            json!({
                "driver": driver,
                "path": path,
                "metric": metric,
                "median": median(samples),
                "samples": samples,
            })
        })
        .collect();
    json!({
        "command": plan.command,
        "reps": plan.reps,
        "secs": plan.secs,
        "connections": plan.connections,
        "load_average": r.load,
        "results": rows,
    })
}
