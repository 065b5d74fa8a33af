//! The port index: how many mappings each (protocol, family, host port)
//! has, kept beside the state file (`<state>.index`), so that a command that
//! adds or removes a few mappings need not read the whole state file to
//! know that their ports are free, or which ones to look up in the
//! services map.
//!
//! It is a cache, never the record: its header names the state file it
//! describes (inode, size, modification time, and where the snapshot ends).
//! Any write to the state file that the index did not follow (a process
//! killed between the two, a file damaged or replaced, an older portfwd)
//! changes that identity, and the next command reads the state file whole
//! and writes the index anew. A change updates the counts first and the
//! header last, both after its line is committed to the state file.
//!
//! Layout: a 48-byte header, then one native-endian u32 count per (protocol
//! (TCP, UDP), family (IPv4, IPv6), port): 1 MiB, mostly holes.

use std::{
    fs::{self, File, OpenOptions},
    io::{ErrorKind, Write},
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::model::{Mapping, Protocol};

const MAGIC: [u8; 8] = *b"pfindex1";
const HEADER_LEN: u64 = 48;
const PORTS: usize = 1 << 16;
/// Two protocols times two families.
const SLICES: usize = 4;
/// Up to this many counts of one array change one by one; more, and the
/// array is rewritten whole.
const FEW: usize = 64;

/// The state file as the index saw it last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    inode: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    /// Bytes of the snapshot line: what is after it is the journal.
    pub(crate) snapshot_len: u64,
}

impl Identity {
    /// The state file's identity now; its snapshot length is the caller's.
    pub(crate) fn of(file: &File, snapshot_len: u64) -> Result<Identity> {
        let meta = file.metadata()?;
        Ok(Identity {
            inode: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            snapshot_len,
        })
    }

    /// Whether `meta` (of the state file now) is the file this identity
    /// describes.
    fn describes(&self, meta: &fs::Metadata) -> bool {
        (self.inode, self.size, self.mtime, self.mtime_nsec)
            == (meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec())
    }

    /// Bytes of journal after the snapshot.
    pub(crate) fn journal_len(&self) -> u64 {
        self.size.saturating_sub(self.snapshot_len)
    }

    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(&MAGIC);
        let fields = [
            self.inode,
            self.size,
            self.mtime as u64,
            self.mtime_nsec as u64,
            self.snapshot_len,
        ];
        for (i, field) in fields.iter().enumerate() {
            header[8 + i * 8..16 + i * 8].copy_from_slice(&field.to_ne_bytes());
        }
        header
    }

    fn decode(header: &[u8]) -> Option<Identity> {
        if header.len() < HEADER_LEN as usize || header[..8] != MAGIC {
            return None;
        }
        let field = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&header[8 + i * 8..16 + i * 8]);
            u64::from_ne_bytes(bytes)
        };
        Some(Identity {
            inode: field(0),
            size: field(1),
            mtime: field(2) as i64,
            mtime_nsec: field(3) as i64,
            snapshot_len: field(4),
        })
    }
}

/// Which of the four count arrays a mapping's host address is counted in.
fn slice_of(protocol: Protocol, ipv4: bool) -> usize {
    let protocol = match protocol {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    };
    protocol * 2 + usize::from(!ipv4)
}

fn offset(slice: usize, port: u16) -> u64 {
    HEADER_LEN + ((slice * PORTS + usize::from(port)) * 4) as u64
}

/// The port index of one state file, opened for a command.
#[derive(Debug)]
pub(crate) struct PortIndex {
    file: File,
    /// Where the state file's snapshot ends (kept in the header).
    snapshot_len: u64,
    /// The count arrays read so far (each read whole on first use: an
    /// automatic-port search asks about many ports of one).
    slices: [Option<Vec<u32>>; SLICES],
    /// Counts read one by one so far, per array.
    lookups: [usize; SLICES],
}

/// Where the index of the state file `state` lives.
pub(crate) fn path_of(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".index");
    PathBuf::from(name)
}

impl PortIndex {
    /// The index of `state`, and the identity it holds, if it describes the
    /// state file as it is now; None when it is missing, stale or unreadable.
    pub(crate) fn open_current(state: &Path) -> Option<(PortIndex, Identity)> {
        let meta = fs::metadata(state).ok()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path_of(state))
            .ok()?;
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0).ok()?;
        let identity = Identity::decode(&header)?;
        identity.describes(&meta).then_some((
            PortIndex {
                file,
                snapshot_len: identity.snapshot_len,
                slices: Default::default(),
                lookups: [0; SLICES],
            },
            identity,
        ))
    }

    /// How many mappings are published on `port` of `protocol` and the
    /// family (`ipv4` or not), over every host address.
    pub(crate) fn count(&mut self, protocol: Protocol, ipv4: bool, port: u16) -> Result<u32> {
        let slice = slice_of(protocol, ipv4);
        // A few ports are read where they are; a search over many reads
        // their array once.
        if self.slices[slice].is_none() && self.lookups[slice] < FEW {
            self.lookups[slice] += 1;
            let mut bytes = [0u8; 4];
            read_at_most(&self.file, &mut bytes, offset(slice, port))?;
            return Ok(u32::from_ne_bytes(bytes));
        }
        Ok(self.counts(slice)?[usize::from(port)])
    }

    /// One count array, read on first use.
    fn counts(&mut self, slice: usize) -> Result<&mut Vec<u32>> {
        let counts = match self.slices[slice].take() {
            Some(counts) => counts,
            None => {
                let mut bytes = vec![0u8; PORTS * 4];
                read_at_most(&self.file, &mut bytes, offset(slice, 0))?;
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
        };
        Ok(self.slices[slice].insert(counts))
    }

    /// Follows a change appended to the state file (`state`, open): the
    /// counts of what it removed and added, then the header. A failure
    /// leaves the header stale: the next command rebuilds the index.
    pub(crate) fn update(
        &mut self,
        removed: &[Mapping],
        added: &[Mapping],
        state: &File,
    ) -> Result<()> {
        let identity = Identity::of(state, self.snapshot_len)?;
        let mut changed: [std::collections::BTreeMap<u16, i64>; SLICES] = Default::default();
        for (mappings, delta) in [(removed, -1), (added, 1)] {
            for m in mappings {
                let slice = slice_of(m.protocol, m.host.is_ipv4());
                *changed[slice].entry(m.host.port()).or_default() += delta;
            }
        }
        let apply = |count: u32, delta: i64| {
            u32::try_from((i64::from(count) + delta).max(0)).unwrap_or(u32::MAX)
        };
        for (slice, changes) in changed.iter().enumerate() {
            if changes.len() <= FEW {
                // A few counts: each read and written where it is.
                for (&port, &delta) in changes {
                    let mut bytes = [0u8; 4];
                    read_at_most(&self.file, &mut bytes, offset(slice, port))?;
                    let count = apply(u32::from_ne_bytes(bytes), delta);
                    self.file
                        .write_all_at(&count.to_ne_bytes(), offset(slice, port))?;
                }
                continue;
            }
            // Many: the whole array, read and written in one go each.
            let counts = self.counts(slice)?;
            for (&port, &delta) in changes {
                let count = &mut counts[usize::from(port)];
                *count = apply(*count, delta);
            }
            let bytes: Vec<u8> = counts.iter().flat_map(|c| c.to_ne_bytes()).collect();
            self.file.write_all_at(&bytes, offset(slice, 0))?;
        }
        self.slices = Default::default();
        self.file.write_all_at(&identity.encode(), 0)?;
        Ok(())
    }
}

/// Reads into `buf` from `at`; what is past the end of the file reads as
/// zeros (a hole that was never written, or an index written shorter).
fn read_at_most(file: &File, buf: &mut [u8], at: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error).context("reading the port index"),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Writes the index of a state file whose mappings are `mappings` and whose
/// identity is `identity`, whole (after a full read or a new snapshot):
/// through a temporary file and a rename, so that a reader sees the old
/// index (stale, so unused) or the new one. Root-only, like the state.
pub(crate) fn write(state: &Path, mappings: &[Mapping], identity: Identity) -> Result<()> {
    let mut counts = vec![0u32; SLICES * PORTS];
    for m in mappings {
        let slot = slice_of(m.protocol, m.host.is_ipv4()) * PORTS + usize::from(m.host.port());
        counts[slot] = counts[slot].saturating_add(1);
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN as usize + counts.len() * 4);
    bytes.extend_from_slice(&identity.encode());
    for count in counts {
        bytes.extend_from_slice(&count.to_ne_bytes());
    }
    let path = path_of(state);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    // No fsync: after a power loss nothing is pinned, and `up` (which must
    // run first) reads the state file whole and writes the index anew.
    file.write_all(&bytes)?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// Removes the index (with its state file, or when it cannot be kept
/// current). Best effort: a stale index is never used.
pub(crate) fn remove(state: &Path) {
    fs::remove_file(path_of(state)).ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(protocol: Protocol, ip: &str, port: u16) -> Mapping {
        Mapping {
            protocol,
            host: std::net::SocketAddr::new(ip.parse().unwrap(), port),
            ..Mapping::sample(port)
        }
    }

    #[test]
    fn the_index_counts_each_port_and_is_used_only_while_the_state_file_is_unchanged() {
        let dir = std::env::temp_dir().join(format!("portfwd-index-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state.json");
        fs::write(&state, b"snapshot\n").unwrap();
        let identity = |snapshot_len| Identity::of(&File::open(&state).unwrap(), snapshot_len);
        assert!(PortIndex::open_current(&state).is_none(), "no index yet");
        let mappings = [
            record(Protocol::Tcp, "0.0.0.0", 80),
            record(Protocol::Tcp, "127.0.0.1", 80),
            record(Protocol::Tcp, "::", 80),
            record(Protocol::Udp, "0.0.0.0", 53),
        ];
        write(&state, &mappings, identity(8).unwrap()).unwrap();
        let (mut index, seen) = PortIndex::open_current(&state).unwrap();
        assert_eq!(seen.snapshot_len, 8);
        assert_eq!(index.count(Protocol::Tcp, true, 80).unwrap(), 2);
        assert_eq!(index.count(Protocol::Tcp, false, 80).unwrap(), 1);
        assert_eq!(index.count(Protocol::Udp, true, 53).unwrap(), 1);
        assert_eq!(index.count(Protocol::Udp, true, 80).unwrap(), 0);
        assert_eq!(index.count(Protocol::Tcp, true, 65535).unwrap(), 0);
        // Past a few lookups, the array is read whole: the same counts.
        for port in 0..=u16::MAX {
            let expected = match port {
                80 => 2,
                _ => 0,
            };
            assert_eq!(index.count(Protocol::Tcp, true, port).unwrap(), expected);
        }

        // A change appended: stale until the index follows it.
        let mut file = OpenOptions::new().append(true).open(&state).unwrap();
        file.write_all(b"change\n").unwrap();
        assert!(PortIndex::open_current(&state).is_none(), "stale");
        index
            .update(
                &[record(Protocol::Tcp, "127.0.0.1", 80)],
                &[record(Protocol::Udp, "::1", 53)],
                &file,
            )
            .unwrap();
        let (mut index, _) = PortIndex::open_current(&state).unwrap();
        assert_eq!(index.count(Protocol::Tcp, true, 80).unwrap(), 1);
        assert_eq!(index.count(Protocol::Udp, false, 53).unwrap(), 1);

        // A change of many ports rewrites their array whole.
        let many: Vec<Mapping> = (1000..1100)
            .map(|port| record(Protocol::Udp, "0.0.0.0", port))
            .collect();
        file.write_all(b"many\n").unwrap();
        index.update(&[], &many, &file).unwrap();
        let (mut index, _) = PortIndex::open_current(&state).unwrap();
        assert_eq!(index.count(Protocol::Udp, true, 53).unwrap(), 1);
        assert_eq!(index.count(Protocol::Udp, true, 1099).unwrap(), 1);
        assert_eq!(index.count(Protocol::Udp, true, 1100).unwrap(), 0);
        file.write_all(b"fewer\n").unwrap();
        index.update(&many[1..], &[], &file).unwrap();
        let (mut index, _) = PortIndex::open_current(&state).unwrap();
        assert_eq!(index.count(Protocol::Udp, true, 1000).unwrap(), 1);
        assert_eq!(index.count(Protocol::Udp, true, 1001).unwrap(), 0);
        assert_eq!(index.count(Protocol::Udp, true, 53).unwrap(), 1);

        // Written over in place, even at the same size: stale.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&state, b"garbage\nchange\n").unwrap();
        assert!(PortIndex::open_current(&state).is_none());
        // Replaced by a rename: stale.
        write(&state, &mappings, identity(8).unwrap()).unwrap();
        let tmp = dir.join("other");
        fs::write(&tmp, b"garbage\nchange\n").unwrap();
        fs::rename(&tmp, &state).unwrap();
        assert!(PortIndex::open_current(&state).is_none());
        // Garbage in the index itself: unused.
        fs::write(path_of(&state), b"garbage").unwrap();
        assert!(PortIndex::open_current(&state).is_none());
        use std::os::unix::fs::PermissionsExt;
        write(&state, &mappings, identity(8).unwrap()).unwrap();
        let mode = fs::metadata(path_of(&state)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(dir).unwrap();
    }
}
