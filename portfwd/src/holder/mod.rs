//! The port holder: a small background process, started by `portfwd up`
//! and stopped by `portfwd down`, that keeps every published host port
//! bound, as docker does:
//! - no other process can bind a published port (it would get EADDRINUSE,
//!   instead of silently losing its traffic to the container);
//! - published ports show in `ss -lntp` / `ss -lnup` as held by `portfwd`.
//!
//! The sockets never serve traffic: portfwd's programs translate
//! connections to published ports before any socket lookup, UDP sockets
//! drop every datagram, and TCP listeners every SYN (socket filters,
//! `server::attach_hold_filter`); a listener answers other segments (of a
//! flow the TC path forgot) with a reset, as a closed port does.
//!
//! The holder owns no state: on every `sync` it reads the pinned services
//! map and binds what is missing, closes what is gone. A port that another
//! process already holds (podman's conmon holds its containers' ports) is
//! reported as busy and retried at the next sync. It also watches the
//! host's interfaces, addresses and routes (rtnetlink): it keeps the local
//! addresses map current, so wildcard mappings follow address changes, and
//! follows interfaces recreated under the same name (`datapath::follow`):
//! their programs are attached again, mappings and flows redirect to them.
//! And it sweeps the entries of closed and timed-out flows out of the
//! connection tracking (`sweep`).
//!
//! Protocol on its unix socket, one line each way: `sync` (hold exactly
//! what the map publishes) or `update +tcp/ADDR:PORT -udp/ADDR:PORT ...`
//! (a change's difference, so that a change costs what it changes, not what
//! is published) -> `ok HELD` or `busy ADDR:PORT/PROTO ...`; `ping` ->
//! `pong`; `build` -> `build ID` (the holder's own binary, see `build_id`);
//! `quit` -> `bye`.
//!
//! The holder logs to `/run/portfwd/holder<tag>.log` (see `instance`).

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
        net::UnixStream,
        process::CommandExt,
    },
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{instance, model::Mapping};

mod follow;
mod server;
mod sweep;

pub(crate) use server::{attach_hold_filter, reserve, run};

const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one request and returns the reply line.
fn request(pin_dir: &Path, line: &str) -> Result<String> {
    let mut stream = UnixStream::connect(instance::holder_socket(pin_dir))?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    writeln!(stream, "{line}")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply.trim_end().to_owned())
}

/// This process's build: the device and inode of its executable, which
/// a new build installed over the old one (a package upgrade, a copy)
/// changes, and which `/proc/self/exe` still names after the file was
/// replaced or deleted.
pub(crate) fn build_id() -> Option<String> {
    let exe = std::fs::metadata("/proc/self/exe").ok()?;
    Some(format!("{}:{}", exe.dev(), exe.ino()))
}

/// Whether a holder of another build runs (one before `build` existed
/// answers that it does not know the request): it would go on writing
/// the maps as that build knew them.
fn runs_another_build(pin_dir: &Path) -> bool {
    match (request(pin_dir, "build"), build_id()) {
        (Err(_), _) => false,
        (Ok(reply), Some(ours)) => reply != format!("build {ours}"),
        (Ok(_), None) => true,
    }
}

/// Stops a holder of another build, so that the sync after it starts this
/// build's. Under `portfwd serve`, which restarts the holder it runs with
/// its own binary, the holder is left and a note says to restart the
/// service.
pub(crate) fn replace_other_build(pin_dir: &Path) -> Result<Option<String>> {
    if !runs_another_build(pin_dir) {
        return Ok(None);
    }
    if service_runs(pin_dir) {
        return Ok(Some(
            "`portfwd serve` runs the port holder of another portfwd build: restart the service to run this one's".into(),
        ));
    }
    stop(pin_dir)?;
    Ok(None)
}

pub(crate) fn is_running(pin_dir: &Path) -> bool {
    request(pin_dir, "ping").is_ok_and(|reply| reply == "pong")
}

/// Starts the holder unless it runs; waits (bounded) until it answers.
pub(crate) fn ensure_running(pin_dir: &Path) -> Result<()> {
    if is_running(pin_dir) {
        return Ok(());
    }
    // `portfwd serve` runs the holder itself and starts it again within a
    // moment: wait for that rather than start a second process.
    if service_runs(pin_dir) && wait_until_running(pin_dir) {
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding the portfwd binary")?;
    // Its errors go to a log file an operator can find (the holder has no
    // terminal): /run/portfwd/holder<tag>.log, named by `up` when it fails.
    let log_path = instance::holder_log(pin_dir);
    let log = open_log(&log_path)?;
    Command::new(exe)
        .arg("--bpffs")
        .arg(pin_dir)
        .arg("hold")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a Ctrl-C aimed at the CLI does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the port holder")?;
    if wait_until_running(pin_dir) {
        return Ok(());
    }
    bail!("the port holder did not start (see {})", log_path.display())
}

/// Waits (bounded) until a holder answers.
fn wait_until_running(pin_dir: &Path) -> bool {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while Instant::now() < deadline {
        if is_running(pin_dir) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Whether `portfwd serve` runs for this instance (its pid file names a
/// live `portfwd serve` process).
fn service_runs(pin_dir: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(instance::service_pid_file(pin_dir)) else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    cmdline.split(|&b| b == 0).any(|arg| arg == b"serve")
}

/// Asks the holder to hold exactly the published ports; the ports it could
/// not bind (held by another process) are returned.
pub(crate) fn sync(pin_dir: &Path) -> Result<Vec<String>> {
    ensure_running(pin_dir)?;
    let reply = request(pin_dir, "sync").context("asking the port holder to sync")?;
    parse_reply(&reply)
}

/// Tells the holder what a change added and removed (a holder that was not
/// running starts with a full sync instead).
pub(crate) fn update(
    pin_dir: &Path,
    added: &[Mapping],
    removed: &[Mapping],
) -> Result<Vec<String>> {
    let line = update_line(added, removed);
    // One round trip: a holder that does not answer is started (or waited
    // for) by `sync`.
    match request(pin_dir, &line) {
        Ok(reply) => parse_reply(&reply),
        Err(_) if !is_running(pin_dir) => sync(pin_dir),
        Err(error) => Err(error.context("asking the port holder to update")),
    }
}

fn update_line(added: &[Mapping], removed: &[Mapping]) -> String {
    use std::fmt::Write as _;
    let mut line = String::with_capacity(32 * (added.len() + removed.len()) + 8);
    line.push_str("update");
    for (sign, mappings) in [('-', removed), ('+', added)] {
        for m in mappings.iter().filter(|m| m.hold) {
            // Written in place: a large change has tens of thousands.
            write!(line, " {sign}{}/{}", m.protocol, m.host).ok();
        }
    }
    line
}

/// Below this many new ports, a change does not bind them ahead (see
/// `bind_ahead`): the round trip would cost more than it saves.
const AHEAD_FROM: usize = 64;

/// A request to the holder whose reply is read later.
pub(crate) struct Ahead(UnixStream);

/// Asks a running holder to bind the ports of `added` now, before the
/// change that publishes them is written, so that the holder's binds (the
/// larger part of a large change) run while the caller writes the maps.
/// The caller then `finish`es it (which reports the busy ones) and leaves
/// these ports out of its `update`. None for a small change or when no
/// holder answers (`update` starts one).
pub(crate) fn bind_ahead(pin_dir: &Path, added: &[Mapping]) -> Option<Ahead> {
    if added.iter().filter(|m| m.hold).count() < AHEAD_FROM {
        return None;
    }
    let mut stream = UnixStream::connect(instance::holder_socket(pin_dir)).ok()?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT)).ok()?;
    writeln!(stream, "{}", update_line(added, &[])).ok()?;
    Some(Ahead(stream))
}

impl Ahead {
    /// Waits for the holder's answer: the ports it could not bind (another
    /// process holds them), or None when it gave no answer.
    #[must_use]
    pub(crate) fn finish(self) -> Option<Vec<String>> {
        let mut reply = String::new();
        match BufReader::new(self.0).read_line(&mut reply) {
            Ok(read) if read > 0 => parse_reply(&reply).ok(),
            _ => None,
        }
    }
}

/// The busy ports of a reply line (with or without its newline).
fn parse_reply(reply: &str) -> Result<Vec<String>> {
    let reply = reply.trim_end();
    match reply.split_once(' ') {
        Some(("ok", _)) => Ok(Vec::new()),
        Some(("busy", ports)) => Ok(ports.split(' ').map(str::to_owned).collect()),
        _ => bail!("the port holder answered {reply:?}"),
    }
}

/// Stops the holder, releasing every port; waits (bounded) until it is gone.
pub(crate) fn stop(pin_dir: &Path) -> Result<()> {
    if request(pin_dir, "quit").is_err() {
        return Ok(());
    }
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while Instant::now() < deadline {
        if !is_running(pin_dir) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the port holder did not stop")
}

/// Opens the holder's log for appending (root-only, in a root-only dir).
fn open_log(path: &Path) -> Result<File> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(instance::run_dir())
        .with_context(|| format!("creating {}", instance::run_dir().display()))?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}
