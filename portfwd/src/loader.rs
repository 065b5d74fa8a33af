//! Loading, attaching and pinning the eBPF programs (`up`), and removing
//! every trace of them (`down`).
//!
//! Pin layout under the pin directory (default /sys/fs/bpf/portfwd):
//! - one pinned map per name in `portfwd_common::ALL_MAPS`: the state;
//! - `links/<program>`: the pinned attachment of each socket program, and
//!   `links/tc/<interface>/<program>` of each TC program. A pinned link keeps
//!   its program attached after the CLI exits; unpinning detaches it.

use std::{
    fs::{self, DirBuilder, File},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use portfwd_common::{ALL_MAPS, Config};

use crate::{
    holder, host,
    maps::{PinnedMaps, StateLock},
    netlink,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portfwd";

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portfwd.bpf.o"));

/// The socket programs, attached to the cgroup v2 root.
const SOCK_PROGRAMS: [&str; 8] = [
    "pf_connect4",
    "pf_connect6",
    "pf_getpeername4",
    "pf_getpeername6",
    "pf_sendmsg4",
    "pf_sendmsg6",
    "pf_recvmsg4",
    "pf_recvmsg6",
];

/// A TC program and the direction it attaches to.
type TcProgram = (&'static str, TcAttachType);

/// On uplinks: DNAT of new external flows, reverse NAT of routed replies.
const UPLINK_PROGRAMS: [TcProgram; 2] = [
    ("pf_tc_uplink_in", TcAttachType::Ingress),
    ("pf_tc_uplink_out", TcAttachType::Egress),
];

/// On the interface towards the containers: reverse NAT of their replies.
const BACKEND_PROGRAMS: [TcProgram; 1] = [("pf_tc_backend_in", TcAttachType::Ingress)];

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
    /// Uplinks the TC programs were attached to now, and those that had them.
    pub uplinks_attached: Vec<String>,
    pub uplinks_already: Vec<String>,
    pub mappings: usize,
    /// Published ports that another process holds.
    pub busy_ports: Vec<String>,
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn tc_dir(pin_dir: &Path, ifname: &str) -> PathBuf {
    links_dir(pin_dir).join("tc").join(ifname)
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

    let uplinks = if options.ifaces.is_empty() {
        netlink::default_route_interfaces()?
    } else {
        options.ifaces.clone()
    };
    for ifname in &uplinks {
        netlink::ifindex(ifname)?;
        if attach_tc(&mut ebpf, &options.pin_dir, ifname, &UPLINK_PROGRAMS)? {
            report.uplinks_attached.push(ifname.clone());
        } else {
            report.uplinks_already.push(ifname.clone());
        }
    }

    let mut maps = PinnedMaps::open(&options.pin_dir, &lock)?;
    maps.set_config(Config {
        host_netns_cookie: host::netns_cookie()?,
    })?;
    maps.sync_local_addrs(&host::local_addresses()?)?;
    report.mappings = maps.mappings()?.len();
    // Hold every published port (after a reboot: the restored ones too).
    report.busy_ports = holder::sync(&options.pin_dir)?;
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

/// Attaches `programs` to `ifname` where they are not attached yet; true if
/// anything was attached.
fn attach_tc(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    ifname: &str,
    programs: &[TcProgram],
) -> Result<bool> {
    let dir = tc_dir(pin_dir, ifname);
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut attached = false;
    for &(name, direction) in programs {
        let pin = dir.join(name);
        if pin.exists() {
            continue;
        }
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load().with_context(|| format!("loading {name}"))?;
        }
        // A TCX link (kernel >= 6.6): pinned, it outlives this process, and
        // it coexists with other programs on the interface.
        let link_id = program
            .attach(ifname, direction)
            .with_context(|| format!("attaching {name} to {ifname}"))?;
        let link: FdLink = program.take_link(link_id)?.try_into()?;
        link.pin(&pin)?;
        attached = true;
    }
    Ok(attached)
}

/// Attaches the uplink programs to `ifname` (`portfwd attach`); false if
/// they were already there.
pub fn attach_uplink(pin_dir: &Path, ifname: &str) -> Result<bool> {
    host::require_root()?;
    netlink::ifindex(ifname)?;
    let _lock = StateLock::acquire(pin_dir)?;
    let mut ebpf = load_object(pin_dir)?;
    attach_tc(&mut ebpf, pin_dir, ifname, &UPLINK_PROGRAMS)
}

/// Makes sure the reply program runs on the interface towards a container.
/// The caller holds the state lock.
pub fn attach_backend(pin_dir: &Path, ifname: &str, _lock: &StateLock) -> Result<bool> {
    if tc_dir(pin_dir, ifname).join(BACKEND_PROGRAMS[0].0).exists() {
        return Ok(false);
    }
    let mut ebpf = load_object(pin_dir)?;
    attach_tc(&mut ebpf, pin_dir, ifname, &BACKEND_PROGRAMS)
}

/// Whether the uplink programs are attached to `ifname`.
pub fn is_uplink(pin_dir: &Path, ifname: &str) -> bool {
    tc_dir(pin_dir, ifname).join(UPLINK_PROGRAMS[0].0).exists()
}

/// The interfaces with TC programs, and which programs.
pub fn tc_attachments(pin_dir: &Path) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(links_dir(pin_dir).join("tc")) else {
        return out;
    };
    for entry in entries.flatten() {
        let ifname = entry.file_name().to_string_lossy().into_owned();
        let mut programs: Vec<String> = fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|p| p.file_name().to_string_lossy().into_owned())
            .collect();
        programs.sort();
        out.push((ifname, programs));
    }
    out.sort();
    out
}

/// Detaches every TC program from `ifname` (`portfwd detach`); the number
/// of programs detached.
pub fn detach_interface(pin_dir: &Path, ifname: &str) -> Result<usize> {
    host::require_root()?;
    let _lock = StateLock::acquire(pin_dir)?;
    let dir = tc_dir(pin_dir, ifname);
    if !dir.exists() {
        return Ok(0);
    }
    unpin_links_in(&dir)
}

/// Unpins (and so detaches) every link pinned in `dir`, then removes it.
fn unpin_links_in(dir: &Path) -> Result<usize> {
    let mut detached = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            detached += unpin_links_in(&path)?;
            continue;
        }
        let link =
            PinnedLink::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        // Dropping the unpinned link closes its last reference: detached.
        drop(
            link.unpin()
                .with_context(|| format!("unpinning {}", path.display()))?,
        );
        detached += 1;
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(detached)
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
    // Release the held ports first: once the maps are gone, nothing could
    // tell the holder which ports are published.
    holder::stop(pin_dir)?;
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
        report.detached = unpin_links_in(&links)?;
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
