//! `portfwd serve`: the one long-running portfwd process of a host (run by
//! `deploy/systemd/portfwd.service` after `portfwd up`).
//!
//! - It runs the port holder (with its address watcher) in-process: it
//!   replaces the holder that `up` started, and starts one again whenever
//!   there is none (after `portfwd down` and `up`). Another process's holder
//!   that starts later (a race with a CLI) is left alone and watched.
//! - With `--metrics ADDR` it serves Prometheus metrics on `/metrics`
//!   (`metrics`), read from the pinned maps at each scrape.
//! - It serves the local API (`api`): rootless users publish ports of
//!   their own network namespaces through it, under the administrator's
//!   policy, and it removes their mappings when the namespace ends.
//! - SIGINT or SIGTERM stop it; the mappings and the forwarding stay (they
//!   live in the kernel), only the ports' reservations go until it or the
//!   next portfwd command starts a holder again.
//!
//! No async runtime: there are two blocking loops (the holder's `poll` and
//! the HTTP server's accept), each on its own thread, and the main thread
//! waits for a signal.

use std::{
    fs,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::{
    fcntl::{Flock, FlockArg},
    sys::signal::{SigSet, Signal},
};

use crate::{datapath, holder, instance};

mod api;
mod metrics;

pub(crate) use api::ApiOptions;

pub(crate) struct ServeOptions {
    pub(crate) pin_dir: PathBuf,
    /// Where to serve `/metrics`; None: no metrics.
    pub(crate) metrics: Option<SocketAddr>,
    /// Turn the kernel's per-program run-time statistics on while serving.
    pub(crate) program_stats: bool,
    /// The API socket and the rootless policy; None: no API.
    pub(crate) api: Option<ApiOptions>,
}

/// How often the supervisor checks that a port holder runs. A CLI that
/// needs a holder while the service runs waits for this one (see
/// `holder::ensure_running`), so it is short.
const HOLDER_CHECK: Duration = Duration::from_millis(50);
/// How long the supervisor waits after a holder failed.
const HOLDER_RETRY: Duration = Duration::from_secs(2);

pub(crate) fn run(options: ServeOptions) -> Result<()> {
    // The stop signals are blocked before any thread starts, so that every
    // thread inherits the mask and only `wait` below receives them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block().context("blocking SIGINT and SIGTERM")?;

    let _statistics = options
        .program_stats
        .then(datapath::enable_run_statistics)
        .transpose()?;
    if let Some(addr) = options.metrics {
        let server = metrics::bind(addr)?;
        eprintln!("portfwd serve: metrics on http://{addr}/metrics");
        let pin_dir = options.pin_dir.clone();
        thread::Builder::new()
            .name("metrics".into())
            .spawn(move || metrics::serve(&server, &pin_dir))
            .context("starting the metrics thread")?;
    }
    // One service per instance: the pid file is locked for its whole life.
    let pid_file = instance::service_pid_file(&options.pin_dir);
    fs::create_dir_all(instance::run_dir())?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&pid_file)
        .with_context(|| format!("opening {}", pid_file.display()))?;
    let mut only_service = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another portfwd serve runs for {} (pid file {})",
            options.pin_dir.display(),
            pid_file.display()
        )
    })?;
    only_service.set_len(0)?;
    writeln!(only_service, "{}", std::process::id())
        .with_context(|| format!("writing {}", pid_file.display()))?;
    let api_socket = options.api.as_ref().map(|api| api.socket.clone());
    if let Some(api) = options.api {
        let socket = api.socket.clone();
        api::start(&options.pin_dir, api)?;
        eprintln!("portfwd serve: API on {}", socket.display());
    }
    let pin_dir = options.pin_dir.clone();
    thread::Builder::new()
        .name("holder".into())
        .spawn(move || supervise_holder(&pin_dir))
        .context("starting the port holder thread")?;

    let signal = stop.wait().context("waiting for a signal")?;
    eprintln!("portfwd serve: {signal}, stopping");
    // Releases the ports this process holds; a holder of another process
    // is asked to stop too, so that `serve` stopping means the same
    // whichever process held them. Forwarding goes on.
    fs::remove_file(&pid_file).ok();
    if let Some(socket) = api_socket {
        fs::remove_file(socket).ok();
    }
    holder::stop(&options.pin_dir).ok();
    Ok(())
}

/// Keeps a port holder running in this process while portfwd is up. A
/// holder that `up` started before is replaced at once, so that the
/// service's process holds the ports (and `ss -lntp` names it).
fn supervise_holder(pin_dir: &Path) {
    if holder::is_running(pin_dir) {
        // The ports are unreserved for the moment between the two.
        if let Err(error) = holder::stop(pin_dir) {
            eprintln!("portfwd serve: replacing the running port holder: {error:#}");
        }
    }
    loop {
        // Up means the maps are pinned (`up` creates the directory first).
        let up = pin_dir.join(portfwd_common::SERVICES.name).exists();
        if up && !holder::is_running(pin_dir) && !run_holder(pin_dir) {
            // A holder that fails at once would otherwise be retried (and
            // logged) twenty times a second.
            thread::sleep(HOLDER_RETRY);
        }
        thread::sleep(HOLDER_CHECK);
    }
}

/// Runs a port holder on another thread until `portfwd down` asks it to
/// quit, and has it hold what is published at once (a new holder holds
/// nothing until asked). False when it failed.
fn run_holder(pin_dir: &Path) -> bool {
    let dir = pin_dir.to_owned();
    let holder = thread::spawn(move || holder::run(&dir));
    // Bounded: a holder binds its socket at once or fails.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !holder::is_running(pin_dir) && !holder.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if holder::is_running(pin_dir) {
        match holder::sync(pin_dir) {
            Ok(busy) if !busy.is_empty() => {
                eprintln!("portfwd serve: held by another process: {}", busy.join(" "));
            }
            Ok(_) => eprintln!("portfwd serve: port holder running"),
            Err(error) => eprintln!("portfwd serve: port holder: {error:#}"),
        }
    }
    match holder.join() {
        Ok(Err(error)) => eprintln!("portfwd serve: port holder: {error:#}"),
        Ok(Ok(())) => {
            eprintln!("portfwd serve: port holder stopped");
            return true;
        }
        Err(_) => eprintln!("portfwd serve: the port holder panicked"),
    }
    false
}
