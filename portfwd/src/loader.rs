//! Loading, attaching and pinning the eBPF programs (`up`), and removing
//! every trace of them (`down`).
//!
//! Pin layout under the pin directory (default /sys/fs/bpf/portfwd):
//! - one pinned map per name in `portfwd_common::ALL_MAPS`: the state;
//! - `links/<program>`: the pinned attachment of each program. A pinned link
//!   keeps its program attached after the CLI exits; unpinning detaches it.

use std::{
    fs::{self, DirBuilder, File},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use portfwd_common::{ALL_MAPS, Config};

use crate::{
    host,
    maps::{PinnedMaps, StateLock},
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portfwd";

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portfwd.bpf.o"));

/// The socket programs, attached to the cgroup v2 root.
const SOCK_PROGRAMS: [&str; 4] = [
    "pf_connect4",
    "pf_connect6",
    "pf_getpeername4",
    "pf_getpeername6",
];

pub struct UpOptions {
    pub pin_dir: PathBuf,
    pub cgroup: Option<PathBuf>,
    /// Uplinks for the TC programs (external traffic).
    pub ifaces: Vec<String>,
}

/// What `up` did.
#[derive(Debug, Default)]
pub struct UpReport {
    pub cgroup: PathBuf,
    pub attached: Vec<&'static str>,
    pub already_attached: Vec<&'static str>,
    pub mappings: usize,
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Loads and attaches whatever is not attached yet, reusing pinned maps, so
/// that a second `up` keeps every mapping.
pub fn up(options: &UpOptions) -> Result<UpReport> {
    host::require_root()?;
    let cgroup = match &options.cgroup {
        Some(path) => path.clone(),
        None => host::cgroup2_mount()?,
    };
    host::ensure_bpffs(&options.pin_dir)?;
    let links = links_dir(&options.pin_dir);
    // Root-only: the pins are the forwarding state of the whole host.
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&links)
        .with_context(|| format!("creating {}", links.display()))?;
    let lock = StateLock::acquire(&options.pin_dir)?;

    let mut ebpf = load_object(&options.pin_dir)?;
    let mut report = UpReport {
        cgroup: cgroup.clone(),
        ..UpReport::default()
    };
    let cgroup_file =
        File::open(&cgroup).with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    for name in SOCK_PROGRAMS {
        let pin = links.join(name);
        if pin.exists() {
            report.already_attached.push(name);
            continue;
        }
        attach_sock_program(&mut ebpf, name, &cgroup_file, &pin)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        report.attached.push(name);
    }

    let mut maps = PinnedMaps::open(&options.pin_dir, &lock)?;
    maps.set_config(Config {
        host_netns_cookie: host::netns_cookie()?,
    })?;
    maps.sync_local_addrs(&host::local_addresses()?)?;
    report.mappings = maps.mappings()?.len();
    Ok(report)
}

fn load_object(pin_dir: &Path) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = ALL_MAPS
        .iter()
        .map(|&name| (name, pin_dir.join(name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(OBJECT).context(
        "loading portfwd's eBPF object (a map pinned by another portfwd version with a different layout? `portfwd down` removes it)",
    )
}

fn attach_sock_program(ebpf: &mut Ebpf, name: &str, cgroup: &File, pin: &Path) -> Result<()> {
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()?;
    program.load()?;
    // Single: aya's AllowMultiple passes BPF_F_ALLOW_MULTI as link flags,
    // which the kernel rejects; a link attachment coexists with other
    // programs on the cgroup anyway.
    let link_id = program.attach(cgroup, CgroupAttachMode::Single)?;
    let link: FdLink = program.take_link(link_id)?.try_into()?;
    link.pin(pin)?;
    Ok(())
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub was_up: bool,
    pub detached: usize,
    pub mappings_dropped: usize,
}

/// Detaches every program and removes every pin; the kernel frees the
/// programs and maps once nothing refers to them.
pub fn down(pin_dir: &Path) -> Result<DownReport> {
    host::require_root()?;
    if !pin_dir.exists() {
        return Ok(DownReport::default());
    }
    let lock = StateLock::acquire(pin_dir)?;
    let mut report = DownReport {
        was_up: true,
        mappings_dropped: PinnedMaps::open(pin_dir, &lock)
            .and_then(|maps| maps.mappings())
            .map(|m| m.len())
            .unwrap_or(0),
        ..DownReport::default()
    };
    let links = links_dir(pin_dir);
    if links.exists() {
        for entry in fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))? {
            let path = entry?.path();
            let link = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // Dropping the unpinned link closes its last reference: detached.
            drop(
                link.unpin()
                    .with_context(|| format!("unpinning {}", path.display()))?,
            );
            report.detached += 1;
        }
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for name in ALL_MAPS {
        let path = pin_dir.join(name);
        match fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    }
    fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(report)
}
