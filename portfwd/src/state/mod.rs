//! The desired state on disk, and how every change reaches the maps
//! without ever leaving half of it behind.
//!
//! The state file (default `/var/lib/portfwd/state.json`, root-only) lists
//! every mapping. It is the source of truth: `up` after a reboot restores
//! the maps from it, and `up` on a running system reconciles them with it.
//!
//! A change (map, unmap, apply, CNI ADD/DEL), under the state lock:
//! 1. writes the new state to `<state>.pending`: the intent;
//! 2. changes the maps;
//! 3. fsyncs `<state>.pending` and renames it over the state file.
//!
//! The intent needs no fsync of its own: it guards against a killed
//! process (whose writes the page cache keeps), while a power loss empties
//! the maps anyway and `up` restores them from the last committed state.
//!
//! A process killed before step 3 leaves the pending file behind. The next
//! command (or `up`) finds it, and rolls the maps back to the state file:
//! either all of a change happened, or none of it did.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{
    instance,
    model::{FORMAT_VERSION, Record, StateFile, parse_state},
};

pub(crate) mod owner;
mod reconcile;

pub(crate) use reconcile::{Fixes, reconcile, recover};

/// A state file that cannot be read as one. The kernel's maps are intact
/// (forwarding goes on); the message says how to rewrite the file from them.
#[derive(Debug)]
pub(crate) struct Damaged {
    pub(crate) path: PathBuf,
    why: String,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the state file {} is damaged ({}): the kernel's maps are what forwards and are untouched; \
             `portfwd state rebuild` rewrites the file from them (the damaged one is kept as .damaged)",
            self.path.display(),
            self.why.replace('\n', " ")
        )
    }
}

impl std::error::Error for Damaged {}

/// The state file and its pending twin.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    path: PathBuf,
}

impl Store {
    pub(crate) fn new(path: PathBuf) -> Self {
        Store { path }
    }

    /// The store of the instance pinned at `pin_dir`.
    pub(crate) fn of(pin_dir: &Path) -> Self {
        Store::new(instance::state_path(pin_dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn pending(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".pending");
        PathBuf::from(name)
    }

    /// The recorded mappings; None when there is no state file yet. A file
    /// that does not parse (truncated, garbage, empty) is a `Damaged` error.
    pub(crate) fn load(&self) -> Result<Option<Vec<Record>>> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", self.path.display()));
            }
        };
        let parsed = std::str::from_utf8(&bytes)
            .map_err(anyhow::Error::from)
            .and_then(parse_state);
        match parsed {
            Ok(records) => Ok(Some(records)),
            Err(error) => Err(Damaged {
                path: self.path.clone(),
                why: format!("{error:#}"),
            }
            .into()),
        }
    }

    /// Rewrites the state file from the maps (`portfwd state rebuild`): a
    /// damaged file is kept beside it as `<state>.damaged`, a pending change
    /// is dropped (the maps are the truth). Returns where the damaged file
    /// went, if there was one.
    pub(crate) fn rebuild(&self, records: &[Record]) -> Result<Option<PathBuf>> {
        let damaged = match self.load() {
            Err(error) if error.downcast_ref::<Damaged>().is_some() => {
                let mut aside = self.path.as_os_str().to_owned();
                aside.push(".damaged");
                let aside = PathBuf::from(aside);
                fs::rename(&self.path, &aside)
                    .with_context(|| format!("moving {} aside", self.path.display()))?;
                Some(aside)
            }
            _ => None,
        };
        self.abort();
        self.save(records)?;
        Ok(damaged)
    }

    /// Writes `records` to `path`, through a temporary file and a rename so
    /// that readers see the old or the new file, never a part; `durable`
    /// fsyncs it first. Root-only (0600 in a 0700 dir).
    fn write_atomically(&self, path: &Path, records: &[Record], durable: bool) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut sorted = records.to_vec();
        sorted.sort();
        // Compact: with tens of thousands of mappings, every byte is written
        // (and read) on every change.
        let text = serde_json::to_string(&StateFile {
            version: FORMAT_VERSION,
            mappings: sorted,
        })?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
        Ok(())
    }

    /// Step 1 of a change: the intent.
    pub(crate) fn begin(&self, records: &[Record]) -> Result<()> {
        self.write_atomically(&self.pending(), records, false)
    }

    /// Step 3 of a change: the intent, on disk, becomes the state.
    pub(crate) fn commit(&self) -> Result<()> {
        File::open(self.pending())?.sync_all()?;
        fs::rename(self.pending(), &self.path)
            .with_context(|| format!("committing {}", self.path.display()))?;
        Ok(())
    }

    /// Writes the state directly (no change of the maps involved).
    pub(crate) fn save(&self, records: &[Record]) -> Result<()> {
        self.write_atomically(&self.path, records, true)
    }

    /// Forgets a change that did not reach the maps.
    pub(crate) fn abort(&self) {
        // Best effort: an intent left behind makes the next command roll
        // the maps back to the state file, which they already match.
        fs::remove_file(self.pending()).ok();
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.pending().exists()
    }

    pub(crate) fn remove(&self) -> Result<()> {
        self.abort();
        match fs::remove_file(&self.path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).with_context(|| format!("removing {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn record(port: u16) -> Record {
        Record {
            name: "web".into(),
            protocol: Protocol::Tcp,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: port,
            container_ip: "10.0.0.2".parse().unwrap(),
            container_port: 80,
            hold: true,
        }
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = std::env::temp_dir().join(format!("portfwd-state-{}", std::process::id()));
        let store = Store::new(dir.join("state.json"));
        assert_eq!(store.load().unwrap(), None);
        store.save(&[record(8081), record(8080)]).unwrap();
        assert_eq!(
            store.load().unwrap(),
            Some(vec![record(8080), record(8081)])
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        store.begin(&[record(1)]).unwrap();
        assert!(store.has_pending());
        store.commit().unwrap();
        assert!(!store.has_pending());
        assert_eq!(store.load().unwrap(), Some(vec![record(1)]));
        fs::remove_dir_all(dir).unwrap();
    }
}
