//! Installing the datapath (`up`: load the object against the pinned maps,
//! attach what is not attached, replace what another build attached) and
//! removing every trace of it (`down`). A failed install is undone by
//! `rollback`.

use std::{
    fs::{self, DirBuilder, File},
    os::{fd::AsFd, unix::fs::DirBuilderExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{Ebpf, programs::SchedClassifier};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, fstatfs};
use portfwd_common::{Config, MAPS, OBSOLETE_MAPS, SOCK_PROGRAMS, UPLINK_PROGRAMS};

use super::{
    PinnedMaps, StateLock,
    follow::repair_links,
    links::{
        attach_sock_program, attach_tc, load_all, program_of, replace_program, sock_program_fd,
        tc_attachments, unpin_links_in,
    },
    object::{self, Sizes},
    rollback::Rollback,
    tc_attach,
};
use crate::{error::Error, host, instance};

#[derive(Debug, Clone, Default)]
pub(crate) struct InstallOptions {
    pub(crate) pin_dir: PathBuf,
    pub(crate) cgroup: Option<PathBuf>,
    /// Replace attached programs even when they are this build's already.
    pub(crate) reload: bool,
    /// Capacities of maps created now (existing maps keep theirs).
    pub(crate) sizes: Sizes,
    /// Uplinks for the TC programs (external traffic), checked (see
    /// `resolve_uplinks`).
    pub(crate) uplinks: Vec<String>,
}

/// What `install` did.
#[derive(Debug, Default)]
pub(crate) struct InstallReport {
    pub(crate) cgroup: PathBuf,
    pub(crate) attached: Vec<&'static str>,
    pub(crate) already_attached: Vec<&'static str>,
    /// Uplinks the TC programs were attached to now, and those that had them.
    pub(crate) uplinks_attached: Vec<String>,
    pub(crate) uplinks_already: Vec<String>,
    /// Attached programs replaced by this build's (an upgrade, or --reload).
    pub(crate) replaced: Vec<String>,
    /// Notes for the user (sizes that could not change, ...).
    pub(crate) notes: Vec<String>,
}

/// An installed datapath: the lock on its pin directory, and its maps.
pub(crate) struct Installed {
    pub(crate) lock: StateLock,
    pub(crate) maps: PinnedMaps,
    pub(crate) report: InstallReport,
}

/// The uplinks `up` attaches to: `named`, or the interfaces of the default
/// routes; each checked before anything is attached.
/// Default-route interfaces without Ethernet framing (wireguard, tun)
/// cannot carry the TC programs: they are left out, each with a note.
pub(crate) fn resolve_uplinks(named: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let mut notes = Vec::new();
    let uplinks = if named.is_empty() {
        let (ethernet, other): (Vec<String>, Vec<String>) =
            host::netlink::default_route_interfaces()?
                .into_iter()
                .partition(|ifname| is_ethernet(ifname));
        for ifname in other {
            notes.push(format!(
                "{ifname} (a default route) is not an Ethernet device: external traffic through it is not forwarded"
            ));
        }
        ethernet
    } else {
        named.to_vec()
    };
    for ifname in &uplinks {
        check_uplink(ifname)?;
    }
    Ok((uplinks, notes))
}

/// Loads and attaches whatever is not attached yet, reusing pinned maps, so
/// that a second `up` keeps every mapping; returns holding the state lock.
/// Every program is loaded (verified) before any is attached, and what is
/// attached or pinned is recorded in `rollback`.
pub(crate) fn install(options: &InstallOptions, rollback: &mut Rollback) -> Result<Installed> {
    let pin_dir = &options.pin_dir;
    let cgroup = match &options.cgroup {
        Some(path) => path.clone(),
        None => host::cgroup2_mount()?,
    };
    host::ensure_bpffs(pin_dir)?;
    let links = instance::links_dir(pin_dir);
    // Root-only: the pins are the forwarding state of the whole host.
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&links)
        .with_context(|| format!("creating {}", links.display()))?;
    let lock = StateLock::acquire(pin_dir)?;

    object::check_pinned_layouts(pin_dir)?;
    let mut ebpf = object::load(pin_dir, options.sizes)?;
    load_all(&mut ebpf)?;
    // The port bits, from the services map (after unmaps, or an upgrade
    // from a build without them), and the host addresses' bits, before any
    // program that reads them is attached: a published port, a translated
    // socket's peer or a host address must never look unknown.
    let mut maps = PinnedMaps::open(pin_dir, &lock)?;
    maps.rebuild_port_bits()?;
    maps.rebuild_local_addr_bits()?;
    let mut report = InstallReport {
        cgroup: cgroup.clone(),
        ..InstallReport::default()
    };
    attach_sock_programs(&mut ebpf, options, &cgroup, &mut report, rollback)?;
    // Interfaces recreated since their programs were attached have none:
    // attached again first, so that only live links are replaced below.
    let mut loaded = Some(ebpf);
    let links = repair_links(pin_dir, &mut loaded)?;
    let mut ebpf = loaded.context("the eBPF object")?;
    report.notes.extend(links.notes());
    report.notes.extend(links.gone_uplinks.iter().map(|ifname| {
        format!(
            "the uplink {ifname} is gone: it is attached again when it comes back (`portfwd detach {ifname}` forgets it)"
        )
    }));
    replace_tc_programs(&mut ebpf, options, &mut report)?;
    attach_uplinks(&mut ebpf, options, &mut report, rollback)?;

    // Programs of an earlier version held their maps; this build's have
    // replaced them, so their pins go (the kernel frees what nothing uses).
    for name in OBSOLETE_MAPS {
        fs::remove_file(pin_dir.join(name)).ok();
    }

    maps.set_config(Config {
        host_netns_cookie: host::netns_cookie()?,
    })?;
    maps.sync_local_addrs(&host::local_addresses()?)?;
    report
        .notes
        .extend(object::size_notes(pin_dir, options.sizes));
    Ok(Installed { lock, maps, report })
}

/// Attaches the socket programs to the cgroup, or replaces those another
/// build attached.
fn attach_sock_programs(
    ebpf: &mut Ebpf,
    options: &InstallOptions,
    cgroup: &Path,
    report: &mut InstallReport,
    rollback: &mut Rollback,
) -> Result<()> {
    let links = instance::links_dir(&options.pin_dir);
    let cgroup_file =
        File::open(cgroup).with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    // The kernel refuses a directory of another file system (a cgroup v1
    // hierarchy, or the tmpfs that holds them in a hybrid layout) with only
    // "Bad file descriptor": say what is wrong, as bad input.
    let is_cgroup2 =
        fstatfs(&cgroup_file).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC);
    if !is_cgroup2 {
        let mount = host::cgroup2_mount()
            .map(|mount| format!(" (this host's cgroup2 mount: {})", mount.display()))
            .unwrap_or_default();
        return Err(Error::usage(format!(
            "{} is not a cgroup v2 directory{mount}",
            cgroup.display()
        ))
        .into());
    }
    for program_def in &SOCK_PROGRAMS {
        let name = program_def.name;
        let pin = links.join(name);
        if pin.exists() {
            let (fd, tag) = sock_program_fd(ebpf, program_def)?;
            if replace_program(fd, tag, &pin, options.reload)? {
                report.replaced.push(name.to_owned());
            } else {
                report.already_attached.push(name);
            }
            continue;
        }
        attach_sock_program(ebpf, program_def, &cgroup_file, &pin)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        rollback.created(pin);
        report.attached.push(name);
    }
    Ok(())
}

/// TC programs already attached (uplinks, interfaces towards containers):
/// replaced by this build's where they differ.
fn replace_tc_programs(
    ebpf: &mut Ebpf,
    options: &InstallOptions,
    report: &mut InstallReport,
) -> Result<()> {
    for (ifname, programs) in tc_attachments(&options.pin_dir) {
        for name in programs {
            let pin = instance::tc_dir(&options.pin_dir, &ifname).join(&name);
            let program: &mut SchedClassifier = program_of(ebpf, &name)?.try_into()?;
            if program.fd().is_err() {
                program.load().with_context(|| format!("loading {name}"))?;
            }
            let tag = program.info()?.tag();
            let replaced = if tc_attach::is_netlink(&pin) {
                tc_attach::replace_netlink(program, &pin, options.reload)?
            } else {
                replace_program(program.fd()?.as_fd(), tag, &pin, options.reload)?
            };
            if replaced {
                report.replaced.push(format!("{name} on {ifname}"));
            }
        }
    }
    Ok(())
}

fn attach_uplinks(
    ebpf: &mut Ebpf,
    options: &InstallOptions,
    report: &mut InstallReport,
    rollback: &mut Rollback,
) -> Result<()> {
    for ifname in &options.uplinks {
        let created = attach_tc(ebpf, &options.pin_dir, ifname, &UPLINK_PROGRAMS)?;
        if !created.is_empty() {
            rollback.created_all(created);
            report.uplinks_attached.push(ifname.clone());
        } else {
            report.uplinks_already.push(ifname.clone());
        }
    }
    Ok(())
}

/// The loopback device's index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// An uplink must exist and must not be the loopback device: the host's own
/// traffic is served by the socket programs, and the TC programs drop every
/// packet with a loopback address (only forged ones reach them elsewhere).
pub(crate) fn check_uplink(ifname: &str) -> Result<()> {
    if host::netlink::ifindex(ifname)? == LOOPBACK_IFINDEX {
        bail!(
            "{ifname} is the loopback device: host processes reach published ports without an uplink; \
             name an interface that external clients come in on"
        );
    }
    if !is_ethernet(ifname) {
        bail!(
            "{ifname} is not an Ethernet device (tun, wireguard and other devices without a link-layer header \
             are not supported as uplinks: the TC programs parse Ethernet frames)"
        );
    }
    Ok(())
}

/// Whether `ifname` has Ethernet framing: veth, bridges, bonds, VLANs and
/// physical NICs do; tun and wireguard (ARPHRD_NONE) do not.
fn is_ethernet(ifname: &str) -> bool {
    host::netlink::link_type(ifname).is_ok_and(|kind| kind == libc::ARPHRD_ETHER)
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub(crate) struct UninstallReport {
    pub(crate) was_up: bool,
    pub(crate) detached: usize,
    pub(crate) mappings_dropped: usize,
}

/// Detaches every program and removes every pin; the kernel frees the
/// programs and maps once nothing refers to them. Takes the state lock,
/// and releases it with the pin directory gone.
pub(crate) fn uninstall(pin_dir: &Path) -> Result<UninstallReport> {
    if !pin_dir.exists() {
        return Ok(UninstallReport::default());
    }
    let lock = StateLock::acquire(pin_dir)?;
    let mut report = UninstallReport {
        was_up: true,
        mappings_dropped: PinnedMaps::open(pin_dir, &lock)
            .and_then(|maps| maps.mappings())
            .map(|m| m.len())
            .unwrap_or(0),
        ..UninstallReport::default()
    };
    let links = instance::links_dir(pin_dir);
    if links.exists() {
        report.detached = unpin_links_in(&links)?;
    }
    for name in MAPS.iter().map(|m| m.name).chain(OBSOLETE_MAPS) {
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
