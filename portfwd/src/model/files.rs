//! The files portfwd reads and writes, as data: the state file (every
//! mapping, see `state`) and apply files (`portfwd apply -f`). Parsing is
//! pure (and fuzzed); reading and writing them is `state`'s and `ops`'.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{Allowlist, Mapping, Protocol, Refuse};
use crate::error::Error;

/// A mapping as `list --json` shows it (root's, with its counters beside
/// it, and a user's through the rootless API): the state file's fields
/// but `hold`.
#[derive(Serialize)]
pub(crate) struct ListedMapping<'a> {
    name: &'a str,
    protocol: &'a str,
    host_ip: IpAddr,
    host_port: u16,
    container_ip: IpAddr,
    container_port: u16,
    /// The source allowlist; absent: everyone may connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    allow: Option<Vec<String>>,
    /// What a client outside the allowlist gets: `reject` or `drop`
    /// (present with `allow`).
    #[serde(skip_serializing_if = "Option::is_none")]
    refuse: Option<&'static str>,
}

impl<'a> From<&'a Mapping> for ListedMapping<'a> {
    fn from(m: &'a Mapping) -> Self {
        Self {
            name: &m.name,
            protocol: m.protocol.as_str(),
            host_ip: m.host.ip(),
            host_port: m.host.port(),
            container_ip: m.container.ip(),
            container_port: m.container.port(),
            allow: m.allow.as_ref().map(Allowlist::strings),
            refuse: m.allow.as_ref().map(|a| a.refuse.as_str()),
        }
    }
}

/// How the state file stores a mapping (the form every version-1 file
/// holds): the addresses split into IP and port, `hold` only when off, the
/// refusal beside the allowlist's strings (which do not hold it), and no
/// interface (found anew whenever the mapping is installed).
#[derive(Serialize)]
struct Stored<'a> {
    name: &'a str,
    protocol: Protocol,
    host_ip: IpAddr,
    host_port: u16,
    container_ip: IpAddr,
    container_port: u16,
    #[serde(skip_serializing_if = "is_yes")]
    hold: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow: Option<&'a Allowlist>,
    #[serde(skip_serializing_if = "Refuse::is_reject")]
    refuse: Refuse,
}

/// `Stored`, as read back (unknown fields are ignored, as they always were).
#[derive(Deserialize)]
struct StoredOwned {
    name: String,
    protocol: Protocol,
    host_ip: IpAddr,
    host_port: u16,
    container_ip: IpAddr,
    container_port: u16,
    #[serde(default = "yes")]
    hold: bool,
    #[serde(default)]
    allow: Option<Allowlist>,
    #[serde(default)]
    refuse: Refuse,
}

fn yes() -> bool {
    true
}

fn is_yes(value: &bool) -> bool {
    *value
}

impl Serialize for Mapping {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Stored {
            name: &self.name,
            protocol: self.protocol,
            host_ip: self.host.ip(),
            host_port: self.host.port(),
            container_ip: self.container.ip(),
            container_port: self.container.port(),
            hold: self.hold,
            allow: self.allow.as_ref(),
            refuse: self.allow.as_ref().map(|a| a.refuse).unwrap_or_default(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Mapping {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredOwned::deserialize(deserializer)?;
        Ok(Mapping {
            name: stored.name,
            protocol: stored.protocol,
            host: SocketAddr::new(stored.host_ip, stored.host_port),
            container: SocketAddr::new(stored.container_ip, stored.container_port),
            ifindex: 0,
            hold: stored.hold,
            allow: stored.allow.map(|allow| Allowlist {
                refuse: stored.refuse,
                ..allow
            }),
        })
    }
}

pub(crate) const FORMAT_VERSION: u32 = 1;

/// The snapshot that starts a state file.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub(crate) version: u32,
    pub(crate) mappings: Vec<Mapping>,
}

/// One committed change, appended to the state file after its snapshot
/// (see `state`): the mappings it removed, then those it added.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JournalEntry {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) remove: Vec<Mapping>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) add: Vec<Mapping>,
}

/// How long the journal line of a change is (as `JournalEntry` writes it),
/// without building it.
pub(crate) fn journal_line_len(removed: &[Mapping], added: &[Mapping]) -> usize {
    #[derive(Serialize)]
    struct Line<'a> {
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        remove: &'a [Mapping],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        add: &'a [Mapping],
    }
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let line = Line {
        remove: removed,
        add: added,
    };
    // Writing to a counter cannot fail.
    serde_json::to_writer(&mut count, &line).ok();
    count.0 + 1
}

/// A state file's content: the mappings, and how much of the text holds
/// them whole.
#[derive(Debug)]
pub(crate) struct ParsedState {
    pub(crate) mappings: Vec<Mapping>,
    /// Where the last whole entry ends: text after it is an entry whose
    /// writer was killed half-way, never committed.
    pub(crate) whole_len: usize,
    /// Bytes of the snapshot, and of the journal after it.
    pub(crate) snapshot_len: usize,
    pub(crate) journal_len: usize,
    /// Not one line (written or reformatted by hand): the next change must
    /// write a fresh snapshot, not append to it.
    pub(crate) multi_line: bool,
}

/// Parses a state file's text: a snapshot, then the changes committed
/// since, in order (an entry cut short at the end is ignored).
pub fn parse_state(text: &str) -> Result<Vec<Mapping>> {
    parse_state_file(text).map(|parsed| parsed.mappings)
}

pub(crate) fn parse_state_file(text: &str) -> Result<ParsedState> {
    // portfwd writes the snapshot on one line and each change on a line of
    // its own; a snapshot over several lines (written or reformatted by
    // hand, e.g. through `jq .`) is the whole file, with no changes after it.
    if let Ok(file) = serde_json::from_str::<StateFile>(text)
        && text.trim_end().contains('\n')
    {
        if file.version != FORMAT_VERSION {
            bail!(
                "state file version {} (this portfwd reads version {FORMAT_VERSION})",
                file.version
            );
        }
        return Ok(ParsedState {
            mappings: file.mappings,
            whole_len: text.len(),
            snapshot_len: text.len(),
            journal_len: 0,
            multi_line: true,
        });
    }
    let (first, rest) = match text.split_once('\n') {
        Some((first, rest)) if !rest.trim().is_empty() => (first, rest),
        _ => (text, ""),
    };
    let file: StateFile = serde_json::from_str(first).context("not a portfwd state file")?;
    if file.version != FORMAT_VERSION {
        bail!(
            "state file version {} (this portfwd reads version {FORMAT_VERSION})",
            file.version
        );
    }
    let snapshot_len = first.len();
    let mut mappings = file.mappings;
    let mut whole_len = snapshot_len;
    let mut offset = snapshot_len + 1;
    let mut changes: Vec<JournalEntry> = Vec::new();
    for (i, line) in rest.split_inclusive('\n').enumerate() {
        let at = offset;
        offset += line.len();
        if line.trim().is_empty() {
            continue;
        }
        let entry = match serde_json::from_str::<JournalEntry>(line) {
            Ok(entry) => entry,
            // Cut short by a kill: the change it describes did not commit.
            Err(error) if error.is_eof() && !line.ends_with('\n') => break,
            Err(error) => {
                return Err(error).with_context(|| format!("state file change {}", i + 1));
            }
        };
        changes.push(entry);
        whole_len = at + line.trim_end().len();
    }
    if !changes.is_empty() {
        // Applied in order, by host address (what the kernel's map is keyed
        // by; two mappings never share one): a removal names the mapping by
        // its host address, whatever else it says (a mapping read back from
        // the kernel's map may differ in what the map does not keep, as the
        // order of an allowlist), and the last change to an address wins.
        let mut by_host: std::collections::BTreeMap<_, Mapping> =
            mappings.into_iter().map(|m| (m.host_key(), m)).collect();
        for entry in changes {
            for mapping in &entry.remove {
                by_host.remove(&mapping.host_key());
            }
            by_host.extend(entry.add.into_iter().map(|m| (m.host_key(), m)));
        }
        mappings = by_host.into_values().collect();
        mappings.sort();
    }
    Ok(ParsedState {
        mappings,
        whole_len,
        snapshot_len,
        journal_len: whole_len - snapshot_len,
        multi_line: false,
    })
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
    /// The source allowlist of every mapping of the entry (`--allow`).
    #[serde(default)]
    pub allow: Option<Allowlist>,
    /// What a client outside the allowlist gets (`--refuse`); only with
    /// `allow`.
    #[serde(default)]
    pub refuse: Option<Refuse>,
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
        Error::usage(format!("invalid apply file: {why}")).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The form every version-1 state file holds, written before `Mapping`
    /// had serde of its own (as `Record`): read, and written back the same.
    #[test]
    fn mappings_are_stored_as_state_files_always_held_them() {
        let stored = [
            r#"{"name":"web","protocol":"tcp","host_ip":"0.0.0.0","host_port":1,"container_ip":"10.0.0.2","container_port":80}"#,
            r#"{"name":"dns","protocol":"udp","host_ip":"::1","host_port":53,"container_ip":"fd00::2","container_port":5353,"hold":false,"allow":["fd00::/8","host"],"refuse":"drop"}"#,
            r#"{"name":"x","protocol":"tcp","host_ip":"127.0.0.1","host_port":9,"container_ip":"10.0.0.2","container_port":9,"allow":["10.0.0.0/8"]}"#,
        ];
        for text in stored {
            let mapping: Mapping = serde_json::from_str(text).unwrap();
            assert_eq!(mapping.ifindex, 0, "the interface is not stored");
            assert_eq!(serde_json::to_string(&mapping).unwrap(), text);
        }
        let dns: Mapping = serde_json::from_str(stored[1]).unwrap();
        let allow = dns.allow.as_ref().unwrap();
        assert_eq!((allow.host, allow.refuse), (true, Refuse::Drop));
        assert!(!dns.hold);
        // Without a refusal, a list rejects; fields a later version may add
        // are ignored, as they always were.
        let x: Mapping = serde_json::from_str(&stored[2].replace('}', r#","later":1}"#)).unwrap();
        assert_eq!(x.allow.unwrap().refuse, Refuse::Reject);
        // The interface is not part of what a mapping is.
        let installed = Mapping {
            ifindex: 7,
            ..Mapping::sample(1)
        };
        assert_eq!(installed, Mapping::sample(1));
        assert!(!serde_json::to_string(&installed).unwrap().contains('7'));
    }

    #[test]
    fn a_state_file_is_its_snapshot_and_the_changes_after_it() {
        let line = |entry: &JournalEntry| serde_json::to_string(entry).unwrap() + "\n";
        let snapshot = serde_json::to_string(&StateFile {
            version: FORMAT_VERSION,
            mappings: vec![Mapping::sample(1), Mapping::sample(2)],
        })
        .unwrap()
            + "\n";
        let first = line(&JournalEntry {
            remove: vec![Mapping::sample(1)],
            add: vec![Mapping::sample(3)],
        });
        let second = line(&JournalEntry {
            remove: vec![Mapping::sample(3)],
            add: vec![Mapping::sample(1)],
        });
        let text = format!("{snapshot}{first}{second}");
        let parsed = parse_state_file(&text).unwrap();
        assert_eq!(parsed.mappings, [Mapping::sample(1), Mapping::sample(2)]);
        assert_eq!(parsed.whole_len, text.trim_end().len());
        assert_eq!(parsed.snapshot_len, snapshot.trim_end().len());
        // A change cut short by a kill never happened.
        let cut = format!("{snapshot}{first}{}", &second[..10]);
        let parsed = parse_state_file(&cut).unwrap();
        assert_eq!(parsed.mappings, [Mapping::sample(2), Mapping::sample(3)]);
        assert_eq!(parsed.whole_len, snapshot.len() + first.len() - 1);
        // Garbage that is not a cut-short change is an error.
        assert!(parse_state(&format!("{snapshot}{first}[1]\n{second}")).is_err());
        assert!(parse_state(&format!("{snapshot}{{\"bogus\": 1}}\n")).is_err());
        assert!(parse_state("").is_err());
    }

    #[test]
    fn the_length_of_a_journal_line_is_known_before_it_is_written() {
        let (a, b) = (Mapping::sample(1), Mapping::sample(2));
        for (remove, add) in [(vec![], vec![a.clone()]), (vec![a, b.clone()], vec![b])] {
            let line = serde_json::to_string(&JournalEntry {
                remove: remove.clone(),
                add: add.clone(),
            })
            .unwrap();
            assert_eq!(journal_line_len(&remove, &add), line.len() + 1);
        }
    }

    #[test]
    fn a_change_removes_a_mapping_by_its_host_address() {
        let snapshot = serde_json::to_string(&StateFile {
            version: FORMAT_VERSION,
            mappings: vec![Mapping::sample(1), Mapping::sample(2)],
        })
        .unwrap();
        // The mapping as the services map gives it back, with what the map
        // does not keep (here: the allowlist's order) differing.
        let read_back = Mapping {
            allow: Some(Allowlist {
                host: true,
                networks: Vec::new(),
                refuse: Default::default(),
            }),
            ..Mapping::sample(1)
        };
        let change = serde_json::to_string(&JournalEntry {
            remove: vec![read_back],
            add: vec![],
        })
        .unwrap();
        let parsed = parse_state(&format!("{snapshot}\n{change}\n")).unwrap();
        assert_eq!(parsed, [Mapping::sample(2)]);
    }

    #[test]
    fn a_snapshot_reformatted_over_several_lines_is_read_and_rewritten_next() {
        let file = StateFile {
            version: FORMAT_VERSION,
            mappings: vec![Mapping::sample(1), Mapping::sample(2)],
        };
        let pretty = serde_json::to_string_pretty(&file).unwrap() + "\n";
        let parsed = parse_state_file(&pretty).unwrap();
        assert_eq!(parsed.mappings, [Mapping::sample(1), Mapping::sample(2)]);
        assert!(
            parsed.multi_line,
            "the next change writes a one-line snapshot"
        );
        assert_eq!(parsed.whole_len, pretty.len(), "nothing is cut off");
        let one_line = serde_json::to_string(&file).unwrap() + "\n";
        assert!(!parse_state_file(&one_line).unwrap().multi_line);
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
            assert!(err.downcast_ref::<Error>().is_some(), "{bad}");
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
