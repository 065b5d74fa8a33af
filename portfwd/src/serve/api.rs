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
            eprintln!(
                "portfwd serve: api: uid {}: refused: {}",
                caller.uid,
                for_log(&error)
            );
            let mut reply = Reply::refused(error);
            reply.usage = true;
            return reply;
        }
    };
    let what = describe(&request);
    let result = match &request {
        Request::Map(map) => {
            ops_rootless::map(&shared.pin_dir, &shared.policy, &shared.ways, caller, map)
        }
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
            let message = format!("{error:#}");
            eprintln!(
                "portfwd serve: api: uid {}: {what}: refused: {}",
                caller.uid,
                for_log(&message)
            );
            let mut reply = Reply::refused(rootless::one_line(&message));
            reply.usage = crate::error::exit_status(&error) == 2;
            reply
        }
    }
}

/// A user's text as the log shows it: printable ASCII as it is, a
/// backslash doubled, anything else escaped (`\n`, `\u{1b}`, `\u{2028}`),
/// so that no string a user sends can end a log line, start one, or
/// rewrite one on a terminal, and the log still says what was sent.
fn for_log(text: &str) -> String {
    let mut logged = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => logged.push_str("\\\\"),
            ' ' => logged.push(' '),
            c if c.is_ascii_graphic() => logged.push(c),
            c => logged.extend(c.escape_default()),
        }
    }
    logged
}

/// The request, for the log; the user's strings through `for_log`.
fn describe(request: &Request) -> String {
    let all = |texts: &[String], option: &str| -> String {
        texts
            .iter()
            .map(|text| format!("{option}{}", for_log(text)))
            .collect()
    };
    match request {
        Request::Map(map) => format!(
            "map --netns {}{}{}{}{}",
            for_log(&map.netns),
            all(map.name.as_slice(), " --name "),
            all(&map.allow, " --allow "),
            map.refuse
                .map(|r| format!(" --refuse {}", r.as_str()))
                .unwrap_or_default(),
            all(&map.publish, " ")
        ),
        Request::Unmap { name, selectors } => format!(
            "unmap{}{}",
            all(name.as_slice(), " --name "),
            all(selectors, " ")
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

/// At start: removes what lost its namespace while no service ran (the
/// host's rules of its way in, its mappings), and returns the ways in
/// still used, to watch.
fn startup_sweep(shared: &Shared) -> Vec<String> {
    match shared.ways.remove_rules_left() {
        Ok(gone) => {
            for name in gone {
                eprintln!("portfwd serve: removed the rules of {name} (its namespace is gone)");
            }
        }
        Err(error) => eprintln!("portfwd serve: removing the rules of ended ways in: {error:#}"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rootless::MapRequest;

    /// What a user sends is theirs: a control character in it must not
    /// start a line of the service's log, nor rewrite one on a terminal.
    #[test]
    fn a_logged_request_is_one_line_whatever_the_user_sent() {
        let forged = "portfwd serve: api: uid 0: map --netns 1 80: done";
        let requests = [
            Request::Map(MapRequest {
                netns: format!("1\r{forged}"),
                name: None,
                publish: vec![format!("46399:80\n{forged}")],
                allow: vec!["10.0.0.0/8\u{2028}x\u{1b}[2K".into()],
                refuse: None,
            }),
            Request::Unmap {
                name: None,
                selectors: vec![format!("46399\n{forged}"), "a\\nb".into()],
            },
        ];
        for request in &requests {
            let logged = describe(request);
            assert!(
                logged.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
                "{logged:?}"
            );
            // Escaped, not dropped: the log still says what was asked.
            assert!(logged.contains(forged), "{logged}");
        }
        // A backslash the user sent is told from an escaped newline.
        assert!(describe(&requests[1]).contains(r"46399\n"));
        assert!(describe(&requests[1]).contains(r"a\\nb"));
    }
}
