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
    collections::BTreeSet,
    fs::{self, DirBuilder, File, OpenOptions},
    io::Write,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{UsageError, loader, mapping::Mapping, maps::PinnedMaps, publish::Protocol};

/// One mapping as the state file stores it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub protocol: Protocol,
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
    /// Whether the holder binds the host port (see `Mapping::hold`).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub hold: bool,
}

fn yes() -> bool {
    true
}

fn is_yes(value: &bool) -> bool {
    *value
}

impl From<&Mapping> for Record {
    fn from(m: &Mapping) -> Self {
        Record {
            name: m.name.clone(),
            protocol: m.protocol,
            host_ip: m.host.ip(),
            host_port: m.host.port(),
            container_ip: m.container.ip(),
            container_port: m.container.port(),
            hold: m.hold,
        }
    }
}

impl Record {
    pub fn to_mapping(&self) -> Mapping {
        Mapping {
            name: self.name.clone(),
            protocol: self.protocol,
            host: SocketAddr::new(self.host_ip, self.host_port),
            container: SocketAddr::new(self.container_ip, self.container_port),
            ifindex: 0,
            hold: self.hold,
        }
    }
}

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    mappings: Vec<Record>,
}

/// Parses a state file's text.
pub fn parse_state(text: &str) -> Result<Vec<Record>> {
    let file: StateFile = serde_json::from_str(text).context("not a portfwd state file")?;
    if file.version != FORMAT_VERSION {
        bail!(
            "state file version {} (this portfwd reads version {FORMAT_VERSION})",
            file.version
        );
    }
    Ok(file.mappings)
}

/// The state file of the instance pinned at `pin_dir`: the default
/// instance's is /var/lib/portfwd/state.json, others get their own.
pub fn default_path(pin_dir: &Path) -> PathBuf {
    let dir = Path::new("/var/lib/portfwd");
    if pin_dir == Path::new(loader::DEFAULT_PIN_DIR) {
        dir.join("state.json")
    } else {
        dir.join(format!(
            "state{}.json",
            crate::holder::instance_tag(pin_dir)
        ))
    }
}

/// The state file and its pending twin.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(path: PathBuf) -> Self {
        Store { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn pending(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".pending");
        PathBuf::from(name)
    }

    /// The recorded mappings; None when there is no state file yet.
    pub fn load(&self) -> Result<Option<Vec<Record>>> {
        match fs::read_to_string(&self.path) {
            Ok(text) => parse_state(&text)
                .with_context(|| format!("reading {}", self.path.display()))
                .map(Some),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("reading {}", self.path.display())),
        }
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
    pub fn begin(&self, records: &[Record]) -> Result<()> {
        self.write_atomically(&self.pending(), records, false)
    }

    /// Step 3 of a change: the intent, on disk, becomes the state.
    pub fn commit(&self) -> Result<()> {
        File::open(self.pending())?.sync_all()?;
        fs::rename(self.pending(), &self.path)
            .with_context(|| format!("committing {}", self.path.display()))?;
        Ok(())
    }

    /// Writes the state directly (no change of the maps involved).
    pub fn save(&self, records: &[Record]) -> Result<()> {
        self.write_atomically(&self.path, records, true)
    }

    /// Forgets a change that did not reach the maps.
    pub fn abort(&self) {
        let _ = fs::remove_file(self.pending());
    }

    pub fn has_pending(&self) -> bool {
        self.pending().exists()
    }

    pub fn remove(&self) -> Result<()> {
        self.abort();
        match fs::remove_file(&self.path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).with_context(|| format!("removing {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// What a reconciliation changed in the maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fixes {
    pub added: Vec<Mapping>,
    pub removed: Vec<Mapping>,
}

impl Fixes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// Makes the maps hold exactly `records` (entries that differ in their
/// container are replaced). The caller holds the state lock.
pub fn reconcile(
    maps: &mut PinnedMaps,
    records: &[Record],
    mut ifindex_of: impl FnMut(IpAddr) -> u32,
) -> Result<Fixes> {
    let wanted: BTreeSet<Record> = records.iter().cloned().collect();
    let current: Vec<Mapping> = maps.mappings()?;
    let have: BTreeSet<Record> = current.iter().map(Record::from).collect();
    let removed: Vec<Mapping> = current
        .iter()
        .filter(|m| !wanted.contains(&Record::from(*m)))
        .cloned()
        .collect();
    let added: Vec<Mapping> = wanted
        .difference(&have)
        .map(|r| {
            let mut m = r.to_mapping();
            m.ifindex = ifindex_of(r.container_ip);
            m
        })
        .collect();
    maps.remove_all(&removed)?;
    maps.add_all(&added)?;
    Ok(Fixes { added, removed })
}

/// Finishes or undoes a change that a killed process left half done: the
/// maps go back to the state file. Called under the state lock by every
/// command that reads or changes mappings. Returns what it fixed.
pub fn recover(store: &Store, maps: &mut PinnedMaps) -> Result<Option<Fixes>> {
    if !store.has_pending() {
        return Ok(None);
    }
    let records = store.load()?.unwrap_or_default();
    let fixes = reconcile(maps, &records, |_| 0)?;
    store.abort();
    Ok(Some(fixes))
}

/// A file that `portfwd apply` reads: the whole set of mappings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyFile {
    #[serde(default, alias = "mapping")]
    pub mappings: Vec<ApplyEntry>,
}

/// One container's publications, as `portfwd map` takes them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyEntry {
    /// Defaults to the container address, as with `portfwd map`.
    pub name: Option<String>,
    pub container: IpAddr,
    pub publish: Vec<String>,
}

/// Which syntax an apply file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
}

impl Format {
    /// By extension; otherwise JSON if it starts like JSON.
    pub fn guess(path: &Path, text: &str) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Format::Json,
            Some("toml") => Format::Toml,
            _ if text.trim_start().starts_with('{') => Format::Json,
            _ => Format::Toml,
        }
    }
}

/// Parses an apply file; errors are usage errors naming the problem.
pub fn parse_apply(text: &str, format: Format) -> Result<ApplyFile> {
    let parsed = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
        Format::Toml => toml::from_str(text).map_err(|e| e.to_string()),
    };
    parsed.map_err(|why| {
        let why = why
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        // The parser quotes the offending line: control characters in it
        // (a lone CR, escape sequences) must not reach the terminal.
        let why: String = why.chars().flat_map(char::escape_debug).collect();
        UsageError(format!("invalid apply file: {why}")).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn state_files_of_another_version_are_refused() {
        assert!(parse_state(r#"{"version": 2, "mappings": []}"#).is_err());
        assert!(parse_state("garbage").is_err());
        assert_eq!(
            parse_state(r#"{"version": 1, "mappings": []}"#).unwrap(),
            vec![]
        );
    }

    #[test]
    fn apply_files_in_toml_and_json() {
        let toml = r#"
            [[mappings]]
            name = "web"
            container = "10.88.0.5"
            publish = ["8080:80", "127.0.0.1:5353:53/udp"]

            [[mappings]]
            container = "fd00::5"
            publish = ["[::1]:9000:9000"]
        "#;
        let parsed = parse_apply(toml, Format::Toml).unwrap();
        assert_eq!(parsed.mappings.len(), 2);
        assert_eq!(parsed.mappings[0].name.as_deref(), Some("web"));
        assert_eq!(parsed.mappings[1].name, None);
        let json = r#"{"mappings": [{"container": "10.88.0.5", "publish": ["80"]}]}"#;
        assert_eq!(
            parse_apply(json, Format::Json).unwrap().mappings[0].publish,
            ["80"]
        );
        for bad in [
            "[[mappings]]\ncontainer = 'nope'\npublish = []",
            "[[mappings]]\ncontainer = '10.0.0.1'",
            "[[mappings]]\ncontainer = '10.0.0.1'\npublish = []\nextra = 1",
            "not toml at all [",
            "x = \"\r\u{1b}[31m\u{0}",
        ] {
            let err = parse_apply(bad, Format::Toml).unwrap_err();
            assert!(err.downcast_ref::<UsageError>().is_some(), "{bad}");
            assert_eq!(err.to_string().lines().count(), 1, "{err}");
            assert!(!err.to_string().chars().any(char::is_control), "{err:?}");
        }
        assert_eq!(Format::guess(Path::new("x.json"), ""), Format::Json);
        assert_eq!(Format::guess(Path::new("x"), " {"), Format::Json);
        assert_eq!(
            Format::guess(Path::new("x.conf"), "[[mappings]]"),
            Format::Toml
        );
    }
}
