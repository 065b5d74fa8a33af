//! `cargo xtask demo`: a scripted first-time-user story on a throwaway network namespace.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{build, interrupt, is_root, run, succeeds};

/// `sh!("ip link set {HOST_IF} up")`: format a command line, show it and run it.
macro_rules! sh {
    ($($fmt:tt)*) => {
        run_line(&format!($($fmt)*))
    };
}

const NS: &str = "pfdemo-ctr";
const HOST_IF: &str = "pfdemo-h";
const CTR_IF: &str = "pfdemo-c";
const CTR_IP: &str = "10.251.77.2";
/// An "external" client: a namespace behind an uplink of the host.
const CLIENT_NS: &str = "pfdemo-cli";
const UPLINK_IF: &str = "pfdemo-u";
const CLIENT_IF: &str = "pfdemo-x";
const UPLINK_IP: &str = "10.251.78.1";
const HOST_PORT: &str = "18480";

/// A minimal HTTP server. Not `http.server.HTTPServer`: its server_bind does a reverse
/// DNS lookup that takes ~10 s in a namespace without DNS. Dual-stack, so it answers
/// whichever address family portfwd forwards with.
const SERVER_PY: &str = r#"
import http.server, socket, socketserver
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from the container (10.251.77.2), you are %s\n"
                % self.client_address[0].removeprefix("::ffff:")).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(socketserver.TCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
Server(("::", 80), Handler).serve_forever()
"#;

/// The demo pins under its own directory, so that it never touches a
/// portfwd that is already running on this machine.
const PIN_ENV: &str = "PORTFWD_BPFFS";
const PIN_DIR: &str = "/sys/fs/bpf/portfwd-demo";

pub(crate) fn demo() -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    build::build(false)?;
    let target = crate::target_dir();
    let mut demo = Demo {
        bin: target.join("debug/portfwd"),
        server: None,
    };
    // Ctrl-C: the current step fails and the error unwinds through `Demo::drop`.
    interrupt::catch()?;
    // Leftovers of an earlier run killed hard would make `ip netns add` fail.
    for ns in [NS, CLIENT_NS] {
        quiet(Command::new("ip").args(["netns", "del", ns]));
    }
    for link in [HOST_IF, UPLINK_IF] {
        quiet(Command::new("ip").args(["link", "del", link]));
    }

    let result = demo.story();
    drop(demo);
    interrupt::check()?;
    result?;
    println!("==> done: that is portfwd. Try `portfwd --help` for more.");
    Ok(())
}

/// Owns everything the demo creates; Drop tears it down on success, error or panic.
struct Demo {
    bin: PathBuf,
    server: Option<Child>,
}

impl Demo {
    /// Shows and runs `portfwd <line>` (the freshly built binary).
    fn portfwd(&self, line: &str) -> Result<()> {
        let args: Vec<&str> = line.split_whitespace().collect();
        show("portfwd", &args);
        run(Command::new(&self.bin).env(PIN_ENV, PIN_DIR).args(&args))
    }

    fn story(&mut self) -> Result<()> {
        println!("==> portfwd is built: {}", self.bin.display());
        println!("    (the demo sets {PIN_ENV}={PIN_DIR}: it leaves any running portfwd alone)");
        self.create_namespaces()?;
        self.start_server()?;

        heading(&format!(
            "loading portfwd: socket programs on the cgroup root, TC programs on the uplink {UPLINK_IF}"
        ))?;
        self.portfwd(&format!("up --iface {UPLINK_IF}"))?;

        heading(&format!(
            "publishing the container's port 80 as port {HOST_PORT} on the host"
        ))?;
        self.portfwd(&format!("map --name web {CTR_IP} {HOST_PORT}:80"))?;

        heading("the host reaches the container on its loopback addresses, IPv4 and IPv6")?;
        sh!("curl -sS --max-time 5 http://127.0.0.1:{HOST_PORT}/")?;
        sh!("curl -sS --max-time 5 http://[::1]:{HOST_PORT}/")?;

        heading(&format!(
            "the external client reaches it through the host's address {UPLINK_IP}, and keeps its own address"
        ))?;
        sh!("ip netns exec {CLIENT_NS} curl -sS --max-time 5 http://{UPLINK_IP}:{HOST_PORT}/")?;

        heading(
            "the published port is held, as docker does: it shows in ss, nobody else can take it",
        )?;
        sh!("ss -Hlntp sport = :{HOST_PORT}")?;

        heading("listing the active mappings, with their traffic")?;
        self.portfwd("list")?;

        heading("what happens to a connection to the published port, and why")?;
        self.portfwd(&format!("explain {UPLINK_IP}:{HOST_PORT}"))?;
        self.trace()?;
        self.unmap()?;

        heading("detaching portfwd")?;
        self.portfwd("down")
    }

    /// `portfwd trace` while the external client connects twice.
    fn trace(&self) -> Result<()> {
        heading(
            "a live trace of the TC programs' decisions while the external client connects twice",
        )?;
        let args = ["trace", "--count", "2", "--duration", "10"];
        show("portfwd", &args);
        let mut trace = Command::new(&self.bin)
            .env(PIN_ENV, PIN_DIR)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting portfwd trace")?;
        // Its first line ("tracing") says the switch is on.
        let mut stderr = std::io::BufReader::new(trace.stderr.take().context("trace's stderr")?);
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut first)?;
        eprint!("{first}");
        for _ in 0..2 {
            quiet(Command::new("ip").args([
                "netns",
                "exec",
                CLIENT_NS,
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                &format!("http://{UPLINK_IP}:{HOST_PORT}/"),
            ]));
        }
        let status = trace.wait()?;
        std::io::copy(&mut stderr, &mut std::io::stderr())?;
        if !status.success() {
            bail!("portfwd trace failed ({status})");
        }
        Ok(())
    }

    /// The "container" and the "external" client, each a namespace behind
    /// a veth pair.
    fn create_namespaces(&mut self) -> Result<()> {
        heading(&format!(
            "creating a throwaway \"container\": network namespace {NS} with address {CTR_IP}"
        ))?;
        sh!("ip netns add {NS}")?;
        sh!("ip link add {HOST_IF} type veth peer name {CTR_IF}")?;
        sh!("ip link set {CTR_IF} netns {NS}")?;
        sh!("ip addr add 10.251.77.1/24 dev {HOST_IF}")?;
        sh!("ip -6 addr add fd00:251:77::1/64 dev {HOST_IF} nodad")?;
        sh!("ip link set {HOST_IF} up")?;
        sh!("ip -n {NS} link set lo up")?;
        sh!("ip -n {NS} addr add {CTR_IP}/24 dev {CTR_IF}")?;
        sh!("ip -n {NS} -6 addr add fd00:251:77::2/64 dev {CTR_IF} nodad")?;
        sh!("ip -n {NS} link set {CTR_IF} up")?;
        sh!("ip -n {NS} route add default via 10.251.77.1")?;

        heading(&format!(
            "creating an \"external\" client: namespace {CLIENT_NS} behind the host's uplink {UPLINK_IF} ({UPLINK_IP})"
        ))?;
        sh!("ip netns add {CLIENT_NS}")?;
        sh!("ip link add {UPLINK_IF} type veth peer name {CLIENT_IF}")?;
        sh!("ip link set {CLIENT_IF} netns {CLIENT_NS}")?;
        sh!("ip addr add {UPLINK_IP}/24 dev {UPLINK_IF}")?;
        sh!("ip link set {UPLINK_IF} up")?;
        sh!("ip -n {CLIENT_NS} link set lo up")?;
        sh!("ip -n {CLIENT_NS} addr add 10.251.78.2/24 dev {CLIENT_IF}")?;
        sh!("ip -n {CLIENT_NS} link set {CLIENT_IF} up")?;
        Ok(())
    }

    /// A web server in the container, started and answering.
    fn start_server(&mut self) -> Result<()> {
        heading("starting a web server inside the container on port 80")?;
        println!("$ ip netns exec {NS} python3 -c '<a tiny HTTP server>' &");
        let server = Command::new("ip")
            .args(["netns", "exec", NS, "python3", "-c", SERVER_PY])
            .stdin(Stdio::null())
            // Its own process group: Ctrl-C should not make it print a traceback;
            // the guard kills it.
            .process_group(0)
            .spawn()
            .context("cannot start the HTTP server")?;
        let server = self.server.insert(server);
        let probe =
            format!("netns exec {NS} curl -s -o /dev/null --max-time 1 http://127.0.0.1:80/");
        let mut ready = false;
        for _ in 0..50 {
            interrupt::check()?;
            if let Some(status) = server.try_wait()? {
                bail!("the HTTP server exited early ({status})");
            }
            if succeeds(Command::new("ip").args(probe.split_whitespace())) {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !ready {
            bail!("the HTTP server in {NS} did not accept connections within 5 s");
        }
        sh!("ip netns exec {NS} curl -sS --max-time 5 http://127.0.0.1:80/")
    }

    /// Removes the mapping and shows that the port is closed again.
    fn unmap(&mut self) -> Result<()> {
        heading("removing the mapping: the port is closed again")?;
        self.portfwd("unmap --name web")?;
        let url = format!("http://127.0.0.1:{HOST_PORT}/");
        let args = ["-sS", "--max-time", "2", &url];
        show("curl", &args);
        let status = Command::new("curl").args(args).status()?;
        match status.code() {
            Some(0) => bail!("port {HOST_PORT} still answers after `portfwd unmap`"),
            Some(7) => println!("(connection refused, as expected)"),
            _ => println!("(curl failed as expected: {status})"),
        }
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        println!(
            "\n==> cleaning up: stopping the server, `portfwd down`, deleting {NS}, {CLIENT_NS} and their links"
        );
        if let Some(mut server) = self.server.take() {
            server.kill().ok();
            server.wait().ok();
        }
        // May already be down (step g) or never have come up: errors are expected.
        quiet(Command::new(&self.bin).env(PIN_ENV, PIN_DIR).arg("down"));
        quiet(Command::new("ip").args(["netns", "del", NS]));
        quiet(Command::new("ip").args(["netns", "del", CLIENT_NS]));
        // Normally gone with the namespaces (their peers lived there); make sure.
        quiet(Command::new("ip").args(["link", "del", HOST_IF]));
        quiet(Command::new("ip").args(["link", "del", UPLINK_IF]));
    }
}

fn heading(text: &str) -> Result<()> {
    interrupt::check()?;
    println!("\n==> {text}");
    Ok(())
}

/// Prints `$ program args` the way a user would type it.
fn show(program: &str, args: &[&str]) {
    let quote = |a: &&str| {
        let plain = a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,".contains(c));
        if plain {
            a.to_string()
        } else {
            format!("'{a}'")
        }
    };
    let args: Vec<String> = args.iter().map(quote).collect();
    println!("$ {program} {}", args.join(" "));
}

/// Shows and runs a command line (split on whitespace: no argument contains spaces);
/// its output goes straight to the terminal.
fn run_line(line: &str) -> Result<()> {
    let mut words = line.split_whitespace();
    let program = words.next().context("empty command line")?;
    let args: Vec<&str> = words.collect();
    show(program, &args);
    run(Command::new(program).args(&args))
}

fn quiet(cmd: &mut Command) {
    succeeds(cmd);
}
