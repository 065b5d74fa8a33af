//! Mappings owned by a process: dockerd's userland proxies (see
//! `docker_proxy`) publish one mapping each and remove it when they stop.
//! A proxy killed with SIGKILL (or crashed) cannot, and dockerd does not
//! notice until the container is removed; its mapping must not stay behind.
//!
//! So an owning process first writes a claim: one small JSON file per
//! mapping, in a directory beside the instance's state file, naming the
//! mapping and the owner by pid, start time (clock ticks after boot, from
//! `/proc/PID/stat`) and boot id. A pid alone could be reused by an
//! unrelated process; the triple cannot. Every session (`ops`, so every
//! portfwd command, CNI call and `up`) first sweeps: a claim whose owner is
//! gone (or a zombie) has its mapping removed and is deleted itself.

use std::{
    fs::{self, DirBuilder},
    io::Write,
    net::SocketAddr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{mapping::Mapping, publish::Protocol, state};

/// A process, identified so that pid reuse cannot be mistaken for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: when the process started.
    pub start_time: u64,
    pub boot_id: String,
}

impl Owner {
    /// The calling process.
    pub fn current() -> Result<Owner> {
        Owner::of_pid(std::process::id()).context("reading /proc/self/stat")
    }

    /// The process `pid`, when it exists and is not a zombie.
    pub fn of_pid(pid: u32) -> Option<Owner> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: the
        // fields that follow start after its last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (the state), so field N is fields[N - 3].
        if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
            return None;
        }
        let start_time = fields.get(22 - 3)?.parse().ok()?;
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(Owner {
            pid,
            start_time,
            boot_id: boot_id.trim().to_owned(),
        })
    }

    pub fn is_alive(&self) -> bool {
        Owner::of_pid(self.pid).as_ref() == Some(self)
    }
}

/// One owned mapping: its name, protocol and host address, and its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub name: String,
    pub protocol: Protocol,
    pub host: SocketAddr,
    pub owner: Owner,
}

impl Claim {
    /// Whether `mapping` is the one claimed.
    pub fn covers(&self, mapping: &Mapping) -> bool {
        mapping.name == self.name && mapping.protocol == self.protocol && mapping.host == self.host
    }
}

/// Where the claims of the instance pinned at `pin_dir` live: beside its
/// state file, `state.json.owners/` for the default instance.
pub fn claims_dir(pin_dir: &Path) -> PathBuf {
    let mut dir = state::default_path(pin_dir).into_os_string();
    dir.push(".owners");
    PathBuf::from(dir)
}

fn claim_path(pin_dir: &Path, protocol: Protocol, host: SocketAddr) -> PathBuf {
    claims_dir(pin_dir).join(format!("{protocol}-{}-{}", host.ip(), host.port()))
}

/// Writes a claim (before publishing its mapping, so that a crash right
/// after publishing still leaves the claim that lets a sweep clean up).
pub fn record(pin_dir: &Path, claim: &Claim) -> Result<()> {
    let dir = claims_dir(pin_dir);
    let path = claim_path(pin_dir, claim.protocol, claim.host);
    let mut temporary = path.clone().into_os_string();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    // The last claim's `release` removes the directory; one that does so
    // between our mkdir and create makes us try again (bounded).
    let mut attempts = 0;
    let mut file = loop {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        match fs::File::create(&temporary) {
            Ok(file) => break file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && attempts < 3 => {
                attempts += 1;
            }
            Err(error) => {
                return Err(error).with_context(|| format!("creating {}", temporary.display()));
            }
        }
    };
    file.write_all(serde_json::to_string(claim)?.as_bytes())?;
    fs::rename(&temporary, &path).with_context(|| format!("writing {}", path.display()))
}

/// Deletes the claim on `protocol`/`host`, if any, and the directory when
/// it was the last.
pub fn release(pin_dir: &Path, protocol: Protocol, host: SocketAddr) {
    let _ = fs::remove_file(claim_path(pin_dir, protocol, host));
    let _ = fs::remove_dir(claims_dir(pin_dir));
}

/// The claims whose owner is gone, with their files. An unreadable claim
/// (a half-written temporary, garbage) counts as orphaned, with no claim.
pub fn orphans(pin_dir: &Path) -> Vec<(PathBuf, Option<Claim>)> {
    let Ok(entries) = fs::read_dir(claims_dir(pin_dir)) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let claim: Option<Claim> = fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());
        match claim {
            Some(claim) if claim.owner.is_alive() => {}
            // A temporary being written by a live owner right now.
            None if path.extension().is_some_and(|e| e == "tmp") && recent(&path) => {}
            claim => found.push((path, claim)),
        }
    }
    found
}

/// Modified within the last minute.
fn recent(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() < 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_process_is_alive_and_a_reused_pid_is_not_its_owner() {
        let me = Owner::current().unwrap();
        assert!(me.is_alive());
        let reused = Owner {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!reused.is_alive(), "same pid, other start time");
        let other_boot = Owner {
            boot_id: "another boot".into(),
            ..me
        };
        assert!(!other_boot.is_alive());
    }

    #[test]
    fn a_reaped_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(Owner::of_pid(pid), None);
    }
}
