//! The rootless comparison's rig: the user, RootlessKit's namespace with
//! its servers, and the three publishers in turns; all removed on drop.

use super::*;

/// Everything the comparison creates; Drop removes it (success, error or Ctrl-C).
pub(super) struct Rig<'a> {
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

impl Drop for Rig<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl<'a> Rig<'a> {
    /// Nothing made yet; the names of what the bench with `prefix` makes.
    pub(super) fn new(topo: &'a Topo, portfwd: PathBuf, prefix: &str) -> Self {
        Self {
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
        }
    }

    pub(super) fn run(&mut self, plan: &Plan, results: &mut RootlessResults) -> Result<()> {
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
    pub(super) fn cleanup(&mut self) {
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
pub(super) fn stop_group(mut child: Child) {
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

pub(super) fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Polls `f` every 50 ms until it gives a value, for at most `limit`.
pub(super) fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
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
