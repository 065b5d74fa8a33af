//! The desired state on disk, and how every change reaches the maps
//! without ever leaving half of it behind.
//!
//! The state file (default `/var/lib/portfwd/state.json`, root-only) lists
//! every mapping. It is the source of truth: `up` after a reboot restores
//! the maps from it, and `up` on a running system reconciles them with it.
//!
//! It is a snapshot (one JSON document: every mapping) followed by a
//! journal: one JSON line per change committed since (the mappings it
//! removed and added), so that a change writes what it changes, not
//! everything published. When the journal outgrows the snapshot, a change
//! compacts the file: a new snapshot, written to a temporary file, fsynced
//! and renamed over the old one. A large change whose own line would make
//! it outgrow does so itself (see `Store::outgrows`); a small one, when it
//! finds the journal outgrown.
//!
//! A change (map, unmap, apply, CNI ADD/DEL), under the state lock:
//! 1. writes the change to `<state>.pending`: the intent;
//! 2. changes the maps;
//! 3. appends the change to the state file, fsyncs it, and removes the
//!    intent.
//!
//! The intent needs no fsync of its own: it guards against a killed
//! process (whose writes the page cache keeps), while a power loss empties
//! the maps anyway and `up` restores them from the last committed state.
//!
//! A change that adds or removes a few mappings does not read the state
//! file: the port index beside it (see `index`) says which of their ports
//! are free, and the services map holds the mappings to remove. What needs
//! every mapping (`apply`, `unmap --name`, automatic ports) reads them from
//! the services map while the index is current; only compaction, a stale
//! index, and `up` (which also writes the index anew) read the file whole.
//!
//! A process killed before step 3 completes leaves the intent behind. The
//! next command (or `up`) finds it and rolls the maps back to the state
//! file: either all of a change happened, or none of it did. A change cut
//! short in the middle of its line (killed during the append) is not part
//! of the state; the next writer cuts it off.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{
    instance,
    model::{FORMAT_VERSION, JournalEntry, Mapping, ParsedState, StateFile, parse_state_file},
};

mod index;
pub(crate) mod owner;
mod reconcile;

pub(crate) use index::PortIndex;

pub(crate) use reconcile::{Fixes, reconcile, recover};

/// Below this many bytes of journal, a change never compacts.
const MIN_COMPACT_BYTES: usize = 64 * 1024;

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
             `portfwd state rebuild` rewrites the file from them (the damaged one is kept as .damaged-TIME)",
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

/// The recorded mappings, and what the next commit needs to know of the
/// file they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loaded {
    pub(crate) mappings: Vec<Mapping>,
    /// Whether the next commit writes a new snapshot instead of appending:
    /// the journal has outgrown the snapshot (or there is no file yet).
    pub(crate) compact: bool,
}

/// A change written as an intent, to be committed.
#[derive(Debug)]
pub(crate) struct Intent {
    line: String,
    entry: JournalEntry,
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
    pub(crate) fn load(&self) -> Result<Option<Vec<Mapping>>> {
        Ok(self.load_for_change()?.map(|loaded| loaded.mappings))
    }

    /// The recorded mappings, for a change (under the state lock): a change
    /// that a killed writer left cut short at the end of the file is cut
    /// off, so that the next one starts on a line of its own. A stale port
    /// index is written anew.
    pub(crate) fn load_for_change(&self) -> Result<Option<Loaded>> {
        self.load_indexing(false)
    }

    /// As `load_for_change`, and the port index is written anew even when
    /// it looks current: for `up`, which may run after a power loss (the
    /// index is written without fsync, so its counts may be older than its
    /// header).
    pub(crate) fn load_after_boot(&self) -> Result<Option<Loaded>> {
        self.load_indexing(true)
    }

    fn load_indexing(&self, rewrite_index: bool) -> Result<Option<Loaded>> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", self.path.display()));
            }
        };
        let damaged = |why: String| Damaged {
            path: self.path.clone(),
            why,
        };
        let text = String::from_utf8(bytes).map_err(|error| damaged(error.to_string()))?;
        let ParsedState {
            mappings,
            whole_len,
            snapshot_len,
            journal_len,
            multi_line,
        } = parse_state_file(&text).map_err(|error| damaged(format!("{error:#}")))?;
        if !text[whole_len..].trim().is_empty() {
            let file = OpenOptions::new().write(true).open(&self.path)?;
            file.set_len(whole_len as u64)?;
            let mut file = OpenOptions::new().append(true).open(&self.path)?;
            file.write_all(b"\n")?;
            file.sync_data()?;
        }
        // Read whole: the index is written anew (it was stale, or `up` runs
        // after a reboot, when an index written without fsync may hold
        // counts older than its header).
        if rewrite_index || PortIndex::open_current(&self.path).is_none() {
            self.write_index(&mappings, snapshot_len as u64);
        }
        Ok(Some(Loaded {
            mappings,
            compact: multi_line || journal_len > snapshot_len.max(MIN_COMPACT_BYTES),
        }))
    }

    /// Rewrites the state file from the maps (`portfwd state rebuild`): a
    /// damaged file is kept beside it as `<state>.damaged-<unix time>`, a pending change
    /// is dropped (the maps are the truth). Returns where the damaged file
    /// went, if there was one.
    pub(crate) fn rebuild(&self, mappings: &[Mapping]) -> Result<Option<PathBuf>> {
        let damaged = match self.load() {
            Ok(_) => None,
            Err(error) if error.downcast_ref::<Damaged>().is_some() => {
                // Kept under a name of its own (an earlier damaged copy is
                // not overwritten), by a second link: the snapshot written
                // below replaces the file in one rename, so there is never
                // a moment without a state file.
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let named = |n: u32| {
                    let mut aside = self.path.as_os_str().to_owned();
                    aside.push(format!(".damaged-{stamp}"));
                    if n > 0 {
                        aside.push(format!("-{n}"));
                    }
                    PathBuf::from(aside)
                };
                let aside = (0..100)
                    .map(named)
                    .find(|aside| !aside.exists())
                    .unwrap_or_else(|| named(100));
                fs::hard_link(&self.path, &aside)
                    .with_context(|| format!("keeping {} aside", self.path.display()))?;
                Some(aside)
            }
            // Unreadable for another reason (permissions, I/O): not ours to
            // overwrite.
            Err(error) => return Err(error),
        };
        self.abort();
        self.write_snapshot(mappings)?;
        Ok(damaged)
    }

    /// The port index, when it describes the state file as it is now and
    /// the journal is not due for compaction: then a change needs not read
    /// the state file (see `index`).
    pub(crate) fn current_index(&self) -> Option<PortIndex> {
        let (index, identity) = PortIndex::open_current(&self.path)?;
        let snapshot = identity.snapshot_len.max(MIN_COMPACT_BYTES as u64);
        (identity.journal_len() <= snapshot).then_some(index)
    }

    /// Whether `extra` more bytes of journal would make it outgrow the
    /// snapshot (see `Loaded::compact`). False when the index, which knows
    /// where the snapshot ends, is not current: then the state file was read
    /// whole, which decided it.
    pub(crate) fn outgrows(&self, extra: usize) -> bool {
        PortIndex::open_current(&self.path).is_some_and(|(_, identity)| {
            let journal = identity.journal_len() + extra as u64;
            journal > identity.snapshot_len.max(MIN_COMPACT_BYTES as u64)
        })
    }

    /// The port index, when it describes the state file as it is now (for a
    /// session that read the state file: it keeps the index current).
    pub(crate) fn index(&self) -> Option<PortIndex> {
        PortIndex::open_current(&self.path).map(|(index, _)| index)
    }

    /// Writes the index of the state file as it is now, holding `mappings`.
    /// Best effort: without it, the next change reads the state file.
    fn write_index(&self, mappings: &[Mapping], snapshot_len: u64) {
        let written = File::open(&self.path)
            .map_err(anyhow::Error::from)
            .and_then(|file| index::Identity::of(&file, snapshot_len))
            .and_then(|identity| index::write(&self.path, mappings, identity));
        if written.is_err() {
            index::remove(&self.path);
        }
    }

    /// Writes a snapshot of `mappings` to `path`, through a temporary file
    /// and a rename so that readers see the old or the new file, never a
    /// part; fsynced first. Root-only (0600 in a 0700 dir). The index
    /// follows.
    fn write_snapshot(&self, mappings: &[Mapping]) -> Result<()> {
        let path = &self.path;
        let dir = path.parent().unwrap_or(Path::new("/"));
        create_dir(dir)?;
        let mut sorted = mappings.to_vec();
        sorted.sort();
        // Compact JSON on one line; the journal follows it.
        let text = serde_json::to_string(&StateFile {
            version: FORMAT_VERSION,
            mappings: sorted,
        })?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file = create_private(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
        self.write_index(mappings, text.len() as u64);
        Ok(())
    }

    /// Step 1 of a change: the intent (the mappings removed and added).
    pub(crate) fn begin(&self, removed: &[Mapping], added: &[Mapping]) -> Result<Intent> {
        let entry = JournalEntry {
            remove: removed.to_vec(),
            add: added.to_vec(),
        };
        let mut line = serde_json::to_string(&entry)?;
        line.push('\n');
        let pending = self.pending();
        create_dir(pending.parent().unwrap_or(Path::new("/")))?;
        let mut file = create_private(&pending)?;
        file.write_all(line.as_bytes())
            .with_context(|| format!("writing {}", pending.display()))?;
        Ok(Intent { line, entry })
    }

    /// Step 3 of a change: the intent, on disk, becomes part of the state:
    /// appended, or, given the whole state the change makes (when the
    /// journal is due for compaction, see `Loaded`), as a new snapshot.
    /// The port index (`index`, when the session has it) follows.
    pub(crate) fn commit(
        &self,
        intent: Intent,
        snapshot: Option<&[Mapping]>,
        index: Option<&mut PortIndex>,
    ) -> Result<()> {
        if let Some(mappings) = snapshot {
            self.write_snapshot(mappings)?;
        } else {
            let mut file = OpenOptions::new()
                .append(true)
                .open(&self.path)
                .with_context(|| format!("opening {}", self.path.display()))?;
            // One write: a kill cuts it short at worst, which readers
            // recognize (see `load_for_change`).
            file.write_all(intent.line.as_bytes())
                .and_then(|()| file.sync_data())
                .with_context(|| format!("committing to {}", self.path.display()))?;
            if let Some(index) = index {
                let Intent { entry, .. } = &intent;
                if index.update(&entry.remove, &entry.add, &file).is_err() {
                    index::remove(&self.path);
                }
            }
        }
        fs::remove_file(self.pending())
            .with_context(|| format!("removing {}", self.pending().display()))?;
        Ok(())
    }

    /// Writes the state directly, as a snapshot (no change of the maps
    /// involved).
    pub(crate) fn save(&self, mappings: &[Mapping]) -> Result<()> {
        self.write_snapshot(mappings)
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
        index::remove(&self.path);
        match fs::remove_file(&self.path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).with_context(|| format!("removing {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}

fn create_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Creates (or truncates) a root-only file.
fn create_private(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = std::env::temp_dir().join(format!("portfwd-state-{}", std::process::id()));
        let store = Store::new(dir.join("state.json"));
        assert_eq!(store.load().unwrap(), None);
        store
            .save(&[Mapping::sample(8081), Mapping::sample(8080)])
            .unwrap();
        assert_eq!(
            store.load().unwrap(),
            Some(vec![Mapping::sample(8080), Mapping::sample(8081)])
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A change is journalled after the snapshot, not rewritten whole.
        let loaded = store.load_for_change().unwrap().unwrap();
        let intent = store
            .begin(&[Mapping::sample(8081)], &[Mapping::sample(1)])
            .unwrap();
        assert!(store.has_pending());
        store
            .commit(
                intent,
                loaded
                    .compact
                    .then_some(&[Mapping::sample(1), Mapping::sample(8080)][..]),
                None,
            )
            .unwrap();
        assert!(!store.has_pending());
        assert_eq!(
            store.load().unwrap(),
            Some(vec![Mapping::sample(1), Mapping::sample(8080)])
        );
        let text = fs::read_to_string(store.path()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        // A change cut short by a kill is cut off before the next one.
        let mut file = OpenOptions::new().append(true).open(store.path()).unwrap();
        file.write_all(b"{\"add\":[{\"na").unwrap();
        let loaded = store.load_for_change().unwrap().unwrap();
        assert_eq!(loaded.mappings, [Mapping::sample(1), Mapping::sample(8080)]);
        let intent = store.begin(&[], &[Mapping::sample(2)]).unwrap();
        store
            .commit(
                intent,
                loaded.compact.then_some(
                    &[
                        Mapping::sample(1),
                        Mapping::sample(2),
                        Mapping::sample(8080),
                    ][..],
                ),
                None,
            )
            .unwrap();
        assert_eq!(
            store.load().unwrap(),
            Some(vec![
                Mapping::sample(1),
                Mapping::sample(2),
                Mapping::sample(8080)
            ])
        );
        // A journal that outgrows its snapshot is compacted into a new one.
        for port in 10_000..11_000 {
            let loaded = store.load_for_change().unwrap().unwrap();
            let mut mappings = loaded.mappings.clone();
            mappings.push(Mapping::sample(port));
            let intent = store.begin(&[], &[Mapping::sample(port)]).unwrap();
            store
                .commit(intent, loaded.compact.then_some(&mappings[..]), None)
                .unwrap();
        }
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(text.lines().count() < 1000, "never compacted");
        assert_eq!(store.load().unwrap().unwrap().len(), 1003);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(dir).unwrap();
    }
}
