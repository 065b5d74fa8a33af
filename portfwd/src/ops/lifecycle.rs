//! An instance's life: `up` (install the datapath, restore the state, have
//! the holder hold every port), `down`, and `attach`/`detach` of uplinks.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::{
    datapath::{
        self, InstallOptions, InstallReport, LinkState, PinnedMaps, Rollback, Sizes, StateLock,
        UninstallReport,
        kernel::{self, KernelFeatures},
    },
    holder, host,
    state::{self, Fixes, Store},
};

#[derive(Debug, Clone, Default)]
pub(crate) struct UpOptions {
    pub(crate) pin_dir: PathBuf,
    pub(crate) cgroup: Option<PathBuf>,
    /// Replace attached programs even when they are this build's already.
    pub(crate) reload: bool,
    /// Capacities of maps created now (existing maps keep theirs).
    pub(crate) max_mappings: Option<u32>,
    pub(crate) max_flows: Option<u32>,
    /// Uplinks for the TC programs (external traffic).
    pub(crate) ifaces: Vec<String>,
}

/// What `up` did.
#[derive(Debug, Default)]
pub(crate) struct UpReport {
    pub(crate) install: InstallReport,
    pub(crate) mappings: usize,
    /// Published ports that another process holds.
    pub(crate) busy_ports: Vec<String>,
    /// What the state file made `up` change in the maps.
    pub(crate) fixes: Fixes,
    /// Whether the state file was created from the maps (first `up` of a
    /// portfwd that records state).
    pub(crate) adopted: bool,
    /// What the kernel offers, as probed by this `up`.
    pub(crate) kernel: Option<KernelFeatures>,
}

/// Loads and attaches whatever is not attached yet, reusing pinned maps, so
/// that a second `up` keeps every mapping; restores the state file's
/// mappings (after a reboot) and holds every published port. A failed `up`
/// leaves the instance as it found it: the uplinks are checked and the
/// kernel probed before anything is created, and what this `up` attached,
/// pinned or wrote is undone if a later step fails.
pub(crate) fn up(options: &UpOptions) -> Result<UpReport> {
    host::require_capabilities("up", host::LOAD)?;
    let pin_dir = &options.pin_dir;
    let (uplinks, uplink_notes) = datapath::resolve_uplinks(&options.ifaces)?;
    let kernel = kernel::probe()?;
    let state_existed = Store::of(pin_dir).path().exists();
    let mut rollback = Rollback::new(pin_dir);
    let result = install_and_restore(options, uplinks, &mut rollback)
        .and_then(|report| kernel::record(pin_dir, &kernel).map(|()| report));
    let mut report = match result {
        Ok(report) => report,
        Err(error) => {
            if rollback.is_fresh() && !state_existed {
                // Best effort, as the rest of the rollback (when `rollback`
                // drops): the error is what the user needs.
                Store::of(pin_dir).remove().ok();
            }
            return Err(error);
        }
    };
    rollback.disarm();
    report.kernel = Some(kernel);
    report.install.notes.extend(uplink_notes);
    // A holder of another build (an upgrade in place, this `up` or an
    // earlier one that failed half way) would go on writing the maps as
    // that build knew them (the host's addresses without their
    // `pf_local_addr_bits`): stopped, and this build's started by the sync
    // below, which first repairs the addresses' bits. Its ports are unheld
    // for that moment; the traffic to them is forwarded all along.
    report
        .install
        .notes
        .extend(holder::replace_other_build(pin_dir)?);
    // Hold every published port (after a reboot: the restored ones too).
    report.busy_ports = holder::sync(pin_dir)?;
    // A trace killed with SIGKILL left the programs writing events.
    datapath::switch_off_abandoned(pin_dir);
    Ok(report)
}

/// The part of `up` that creates things, each recorded in `rollback`.
fn install_and_restore(
    options: &UpOptions,
    uplinks: Vec<String>,
    rollback: &mut Rollback,
) -> Result<UpReport> {
    let pin_dir = &options.pin_dir;
    let mut installed = datapath::install(
        &InstallOptions {
            pin_dir: pin_dir.clone(),
            cgroup: options.cgroup.clone(),
            reload: options.reload,
            sizes: Sizes {
                max_mappings: options.max_mappings,
                max_flows: options.max_flows,
            },
            uplinks,
        },
        rollback,
    )?;
    let mut report = UpReport::default();
    restore_state(pin_dir, &installed.lock, &mut installed.maps, &mut report)?;
    report.mappings = installed.maps.mappings()?.len();
    report.install = installed.report;
    Ok(report)
}

/// Brings the maps in line with the state file (after a reboot: restores
/// every mapping), or records the maps as the state when there is none.
fn restore_state(
    pin_dir: &Path,
    lock: &StateLock,
    maps: &mut PinnedMaps,
    report: &mut UpReport,
) -> Result<()> {
    let store = Store::of(pin_dir);
    let mut ifindex_of = datapath::backend_paths(pin_dir, lock);
    let recovered = state::recover(&store, maps, &mut ifindex_of)?;
    let Some(recorded) = store.load_after_boot()?.map(|loaded| loaded.mappings) else {
        store.save(&maps.mappings()?)?;
        report.adopted = true;
        return Ok(());
    };
    let mut fixes = state::reconcile(maps, &recorded, &mut ifindex_of)?;
    drop(ifindex_of);
    // Interfaces are recreated with new indexes (a restarted container):
    // redirect to where the container is now, flows included.
    datapath::follow_host(pin_dir, lock, maps, datapath::Follow::Everything)?;
    if let Some(recovered) = recovered {
        fixes.added.extend(recovered.added);
        fixes.removed.extend(recovered.removed);
    }
    report.fixes = fixes;
    Ok(())
}

/// Detaches every program and removes every pin (`down`); with
/// `keep_state`, the next `up` restores the mappings from the state file.
pub(crate) fn down(pin_dir: &Path, keep_state: bool) -> Result<UninstallReport> {
    host::require_capabilities("down", host::LOAD)?;
    if !pin_dir.exists() {
        return Ok(UninstallReport::default());
    }
    let report = datapath::uninstall(pin_dir)?;
    // Then release the held ports (quitting closes every held socket, maps
    // or not). In this order, a `portfwd serve` that keeps a holder running
    // while portfwd is up never sees "up without a holder" in between.
    holder::stop(pin_dir)?;
    if !keep_state {
        Store::of(pin_dir).remove()?;
    }
    kernel::forget(pin_dir)?;
    Ok(report)
}

/// Attaches the uplink programs to `ifname` (`portfwd attach`); false if
/// they were already there.
pub(crate) fn attach(pin_dir: &Path, ifname: &str) -> Result<bool> {
    host::require_capabilities("attach", host::LOAD)?;
    datapath::check_uplink(ifname)?;
    let lock = StateLock::acquire(pin_dir)?;
    // Programs pinned for an interface recreated since are attached again
    // (`already attached` is then the truth).
    datapath::follow_links(pin_dir, &lock)?;
    let attached = datapath::attach_uplink(pin_dir, ifname, &lock)?;
    // An interface towards containers that became an uplink is no longer
    // one (best effort: the next follow of the host tries again).
    datapath::sync_link_bits(pin_dir).ok();
    Ok(attached)
}

/// What `detach` did.
#[derive(Debug)]
pub(crate) struct Detached {
    /// Programs the kernel ran on the interface and no longer does.
    pub(crate) programs: usize,
    /// The state of the attachment before: a gone or severed one had no
    /// program running, only portfwd's record of it (now forgotten).
    pub(crate) was: Option<LinkState>,
}

/// Detaches every TC program from `ifname` (`portfwd detach`).
pub(crate) fn detach(pin_dir: &Path, ifname: &str) -> Result<Detached> {
    host::require_capabilities("detach", host::LOAD)?;
    let lock = StateLock::acquire(pin_dir)?;
    let was = datapath::tc_links(pin_dir)
        .into_iter()
        .find(|link| link.ifname == ifname)
        .map(|link| link.state);
    let unpinned = datapath::detach_interface(pin_dir, ifname, &lock)?;
    // No longer towards containers, nor an uplink (best effort, as above).
    datapath::sync_link_bits(pin_dir).ok();
    Ok(Detached {
        programs: if was == Some(LinkState::Attached) {
            unpinned
        } else {
            0
        },
        was,
    })
}

/// What `state rebuild` did.
#[derive(Debug)]
pub(crate) struct Rebuilt {
    pub(crate) path: PathBuf,
    pub(crate) mappings: usize,
    /// Where the damaged file went, if there was one.
    pub(crate) damaged: Option<PathBuf>,
}

/// Rewrites the state file from the kernel's maps (`portfwd state
/// rebuild`), under the state lock: after the file was damaged, or lost.
pub(crate) fn rebuild_state(pin_dir: &Path) -> Result<Rebuilt> {
    host::require_capabilities("state rebuild", host::CHANGE)?;
    let store = Store::of(pin_dir);
    if !super::is_up(pin_dir) {
        bail!(
            "portfwd is not up ({} holds no maps; after a reboot the kernel has no mappings), so there is nothing \
             to rebuild {} from: it is the only record; repair it or move it aside (its mappings are then lost), \
             then `portfwd up`",
            pin_dir.display(),
            store.path().display()
        );
    }
    let lock = StateLock::acquire(pin_dir)?;
    let maps = PinnedMaps::open(pin_dir, &lock)?;
    let mappings = maps.mappings()?;
    let damaged = store.rebuild(&mappings)?;
    Ok(Rebuilt {
        path: store.path().to_owned(),
        mappings: mappings.len(),
        damaged,
    })
}
