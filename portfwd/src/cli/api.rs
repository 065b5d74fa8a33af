//! The client of `portfwd serve`'s API (see `serve::api`): what `map
//! --netns`, `unmap` and `list` do for a user who is not root.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{
    error::Error,
    instance,
    model::rootless::{Reply, Request},
};

/// Long enough for a map that makes a way in and attaches a program.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// A reply to `list` holds one line per mapping.
const MAX_REPLY_LEN: u64 = 64 << 20;

/// Whether this process runs as root (then it changes the maps itself).
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether this user's `unmap` and `list` go through the service: not root,
/// and a service answers on its socket (a killed one leaves the file).
/// Without one, the command runs here and says which privileges it lacks,
/// as it did before the service.
pub(crate) fn serves_this_user(pin_dir: &Path) -> bool {
    !is_root() && UnixStream::connect(instance::api_socket(pin_dir)).is_ok()
}

/// Sends `request` to the service of `pin_dir` and prints its lines; a
/// refusal is the error (one line).
pub(crate) fn call(pin_dir: &Path, request: &Request) -> Result<()> {
    let path = instance::api_socket(pin_dir);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to the portfwd service at {} (is `portfwd serve` running?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream)
        .take(MAX_REPLY_LEN)
        .read_line(&mut reply)
        .context("reading the service's reply")?;
    let reply: Reply = serde_json::from_str(&reply)
        .map_err(|e| anyhow!("the service's reply is malformed: {e}"))?;
    if !reply.ok {
        let message = reply.error.unwrap_or_else(|| "refused".into());
        if reply.usage {
            bail!(Error::usage(message));
        }
        bail!(message);
    }
    let mut out = std::io::stdout().lock();
    for line in reply.lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}
