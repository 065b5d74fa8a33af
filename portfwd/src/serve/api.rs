//! The local API of `portfwd serve`: a unix socket open to every user
//! (mode 0666), one JSON request per line and one JSON reply per line (see
//! `model::rootless`). The caller is who the kernel says (`SO_PEERCRED`).
//!
//! Bounded everywhere: a request line is at most `MAX_REQUEST_LEN` bytes
//! and each read waits at most `READ_TIMEOUT`; a connection serves at most
//! `MAX_REQUESTS_PER_CONNECTION` requests; at most `MAX_CONNECTIONS`
//! connections are served at once and at most `MAX_CONNECTIONS_PER_UID` of
//! one user, so one user's flood leaves room for the others. A request is
//! read whole before any lock is taken.
//!
//! Besides, a watcher removes the mappings whose namespace ended (its way
//! in, the veth, went with it) within `WATCH_INTERVAL` or so.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::{
    model::rootless::{self, MAX_REQUEST_LEN, Reply, Request},
    ops::rootless::{self as ops_rootless, Caller, WaysIn},
};

const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUESTS_PER_CONNECTION: usize = 64;
const MAX_CONNECTIONS: usize = 64;
const MAX_CONNECTIONS_PER_UID: usize = 8;
/// How often the watcher looks for ways in that are gone.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

pub(crate) struct ApiOptions {
    pub(crate) socket: PathBuf,
    pub(crate) policy: PathBuf,
}

struct Shared {
    pin_dir: PathBuf,
    policy: PathBuf,
    ways: WaysIn,
    /// Connections being served, by uid.
    connections: Mutex<HashMap<u32, usize>>,
}

/// Binds the socket (replacing a stale one) and starts the accept loop
/// and the watcher on their own threads.
pub(crate) fn start(pin_dir: &Path, options: ApiOptions) -> Result<()> {
    if let Some(dir) = options.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Every user connects; the caller is checked on each request.
    // A socket file left by a service that was killed; the pid file's
    // lock (taken before this) says no other service runs.
    std::fs::remove_file(&options.socket).ok();
    let listener = UnixListener::bind(&options.socket)
        .with_context(|| format!("binding the API socket {}", options.socket.display()))?;
    std::fs::set_permissions(&options.socket, std::fs::Permissions::from_mode(0o666))?;
    let shared = Arc::new(Shared {
        pin_dir: pin_dir.to_owned(),
        policy: options.policy,
        ways: WaysIn::default(),
        connections: Mutex::new(HashMap::new()),
    });
    let watcher = Arc::clone(&shared);
    thread::Builder::new()
        .name("rootless-watch".into())
        .spawn(move || watch(&watcher))
        .context("starting the rootless watcher")?;
    thread::Builder::new()
        .name("api".into())
        .spawn(move || accept(&listener, &shared))
        .context("starting the API thread")?;
    Ok(())
}

fn accept(listener: &UnixListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Ok(credentials) = getsockopt(&stream, PeerCredentials) else {
            continue;
        };
        let caller = Caller {
            uid: credentials.uid(),
            gid: credentials.gid(),
        };
        if !shared.enter(caller.uid) {
            let reply = Reply::refused("too many connections to the portfwd API: try again");
            respond(&stream, &reply);
            continue;
        }
        let shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("api-client".into())
            .spawn(move || {
                serve_connection(stream, caller, &shared);
                shared.leave(caller.uid);
            });
        if spawned.is_err() {
            eprintln!("portfwd serve: api: cannot start a thread for a client");
        }
    }
}

impl Shared {
    fn enter(&self, uid: u32) -> bool {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = connections.values().sum();
        let mine = connections.entry(uid).or_default();
        if total >= MAX_CONNECTIONS || *mine >= MAX_CONNECTIONS_PER_UID {
            return false;
        }
        *mine += 1;
        true
    }

    fn leave(&self, uid: u32) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = connections.get_mut(&uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                connections.remove(&uid);
            }
        }
    }
}

fn serve_connection(stream: UnixStream, caller: Caller, shared: &Shared) {
    stream.set_read_timeout(Some(READ_TIMEOUT)).ok();
    stream.set_write_timeout(Some(READ_TIMEOUT)).ok();
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader);
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let mut line = Vec::new();
        // One byte more than allowed: a longer line is seen as such.
        let read = (&mut reader)
            .take(MAX_REQUEST_LEN as u64 + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.len() > MAX_REQUEST_LEN;
        let reply = handle(&line, caller, shared);
        if !respond(&stream, &reply) || too_long || !line.ends_with(b"\n") {
            // The rest of an over-long line is not read: the connection ends.
            return;
        }
    }
}

/// Writes one reply line; false when the client is gone.
fn respond(mut stream: &UnixStream, reply: &Reply) -> bool {
    let mut text = serde_json::to_string(reply).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    stream.write_all(text.as_bytes()).is_ok()
}

fn handle(line: &[u8], caller: Caller, shared: &Shared) -> Reply {
    let request = match rootless::parse_request(line) {
        Ok(request) => request,
        Err(error) => {
            eprintln!("portfwd serve: api: uid {}: refused: {error}", caller.uid);
            let mut reply = Reply::refused(error);
            reply.usage = true;
            return reply;
        }
    };
    let what = describe(&request);
    let result = match &request {
        Request::Map {
            netns,
            name,
            publish,
            allow,
            refuse,
        } => ops_rootless::map(
            &shared.pin_dir,
            &shared.policy,
            &shared.ways,
            caller,
            &ops_rootless::MapRequest {
                target: netns,
                name: name.as_deref(),
                publish,
                allow: (allow, refuse.unwrap_or_default()),
            },
        ),
        Request::Unmap { name, selectors } => {
            ops_rootless::unmap(&shared.pin_dir, caller, name.as_deref(), selectors)
        }
        Request::List { json } => ops_rootless::list(&shared.pin_dir, caller).map(|mappings| {
            if *json {
                return vec![rootless::listing_json(&mappings)];
            }
            mappings
                .iter()
                .map(|m| format!("{} {}/{} -> {}", m.name, m.host, m.protocol, m.container))
                .collect()
        }),
    };
    match result {
        Ok(lines) => {
            if !matches!(request, Request::List { .. }) {
                eprintln!("portfwd serve: api: uid {}: {what}: done", caller.uid);
            }
            Reply::lines(lines)
        }
        Err(error) => {
            let message = rootless::one_line(&format!("{error:#}"));
            eprintln!(
                "portfwd serve: api: uid {}: {what}: refused: {message}",
                caller.uid
            );
            let mut reply = Reply::refused(message);
            reply.usage = crate::error::exit_status(&error) == 2;
            reply
        }
    }
}

fn describe(request: &Request) -> String {
    match request {
        Request::Map {
            netns,
            name,
            publish,
            allow,
            refuse,
        } => format!(
            "map --netns {netns}{}{}{} {}",
            name.as_ref()
                .map(|n| format!(" --name {n}"))
                .unwrap_or_default(),
            allow
                .iter()
                .map(|a| format!(" --allow {a}"))
                .collect::<String>(),
            refuse
                .map(|r| format!(" --refuse {}", r.as_str()))
                .unwrap_or_default(),
            publish.join(" ")
        ),
        Request::Unmap { name, selectors } => format!(
            "unmap{} {}",
            name.as_ref()
                .map(|n| format!(" --name {n}"))
                .unwrap_or_default(),
            selectors.join(" ")
        ),
        Request::List { .. } => "list".into(),
    }
}

/// Removes the mappings of namespaces that ended. Cheap while nothing
/// changes: it checks that the host end of each known way in exists, and
/// opens a session only when one went.
fn watch(shared: &Shared) {
    let mut known = startup_sweep(shared);
    loop {
        thread::sleep(WATCH_INTERVAL);
        let mut gone: Vec<String> = shared
            .ways
            .forget_gone()
            .iter()
            .map(|slot| slot.host_ifname())
            .collect();
        known.retain(|name| {
            let alive = crate::host::netns::link_exists(name);
            if !alive {
                gone.push(name.clone());
            }
            alive
        });
        if gone.is_empty() {
            continue;
        }
        if let Err(error) = shared.ways.remove_rules_of_gone(&gone) {
            eprintln!("portfwd serve: removing the rules of ended ways in: {error:#}");
        }
        match ops_rootless::sweep_gone(&shared.pin_dir) {
            Ok(removed) => {
                for m in removed {
                    eprintln!("portfwd serve: removed (its namespace is gone) {m}");
                }
            }
            Err(error) => {
                eprintln!("portfwd serve: removing the mappings of ended namespaces: {error:#}");
                // Tried again at the next tick.
                known.extend(gone);
            }
        }
    }
}

/// At start: removes what lost its namespace while no service ran, and
/// returns the ways in still used, to watch.
fn startup_sweep(shared: &Shared) -> Vec<String> {
    let up = shared.pin_dir.join(portfwd_common::SERVICES.name).exists();
    if !up {
        return Vec::new();
    }
    let result = ops_rootless::sweep_gone(&shared.pin_dir).and_then(|removed| {
        for m in removed {
            eprintln!("portfwd serve: removed (its namespace is gone) {m}");
        }
        ops_rootless::ways_in_use(&shared.pin_dir)
    });
    result.unwrap_or_else(|error| {
        eprintln!("portfwd serve: rootless mappings: {error:#}");
        Vec::new()
    })
}
