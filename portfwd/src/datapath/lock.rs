//! The state lock: an exclusive flock on the instance's pin directory.
//! Every command that changes the maps (or the state file) holds it, so
//! concurrent CLI processes never interleave their read-check-write steps;
//! one that waits more than a second for it says who holds it.

use std::{fs::File, path::Path};

use anyhow::{Context, Result, anyhow, bail};
use nix::fcntl::{Flock, FlockArg};

/// An exclusive lock on the pin directory, held until dropped.
pub(crate) struct StateLock(#[allow(dead_code)] Flock<File>);

impl StateLock {
    /// The lock if it is free now, None if another process holds it.
    pub(crate) fn try_acquire(dir: &Path) -> Result<Option<Self>> {
        let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(StateLock(lock))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(anyhow!("locking {}: {errno}", dir.display())),
        }
    }

    pub(crate) fn acquire(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "portfwd is not up ({} does not exist): run `portfwd up` first",
                dir.display()
            );
        }
        if let Some(lock) = Self::try_acquire(dir)? {
            return Ok(lock);
        }
        // Another command holds it: say so if the wait is noticeable.
        let (done, waited) = std::sync::mpsc::channel::<()>();
        let who = dir.to_owned();
        let notice = std::thread::spawn(move || {
            if waited.recv_timeout(LOCK_NOTICE_AFTER).is_err() {
                let holder = lock_holder(&who).unwrap_or_else(|| "another portfwd".into());
                eprintln!(
                    "portfwd: waiting for {holder} to release the state lock on {}",
                    who.display()
                );
            }
        });
        let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| anyhow!("locking {}: {errno}", dir.display()));
        // The notice thread ends now (a send to it cannot fail while it
        // waits, and its end is no error of ours).
        done.send(()).ok();
        notice.join().ok();
        Ok(StateLock(lock?))
    }
}

/// How long a command waits for the state lock before saying so.
const LOCK_NOTICE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The process holding the flock on `dir`, as `name (pid N)`, from
/// /proc/locks (which names locks by device and inode).
fn lock_holder(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).ok()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = find_lock_holder(&locks, &wanted)?;
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    Some(format!("{} (pid {pid})", name.trim_end()))
}

/// The pid of the FLOCK on `device_inode` (`MAJ:MIN:INODE`, hex device) in
/// a /proc/locks text: `1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF`.
fn find_lock_holder(locks: &str, device_inode: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Waiters are listed as `1: -> FLOCK ...`; they hold nothing.
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&device_inode))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_holder_is_found_in_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:1a:77 0 EOF
1: -> FLOCK  ADVISORY  WRITE 4343 00:1a:77 0 EOF
2: POSIX  ADVISORY  WRITE 99 00:1a:78 0 EOF
";
        assert_eq!(find_lock_holder(locks, "00:1a:77"), Some(4242));
        assert_eq!(find_lock_holder(locks, "00:1a:78"), None);
        // This process holding a lock on a directory of its own.
        let dir = std::env::temp_dir().join(format!("portfwd-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = StateLock::try_acquire(&dir).unwrap().unwrap();
        let holder = lock_holder(&dir).unwrap();
        assert!(
            holder.ends_with(&format!("(pid {})", std::process::id())),
            "{holder}"
        );
        drop(lock);
        std::fs::remove_dir(dir).unwrap();
    }
}
