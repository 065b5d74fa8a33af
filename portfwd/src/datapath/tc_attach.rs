//! Pinned TC attachments, on every kernel portfwd supports: a TCX link
//! where the kernel has TCX (6.6), else a netlink clsact filter (any
//! kernel), with the same life cycle: the attachment outlives the CLI, is
//! found under `links/tc/<interface>/<program>`, and removing that pin
//! detaches it.
//!
//! - TCX: `<program>` is the pinned link; unpinning it detaches the program.
//! - netlink: a filter is not a BPF object and cannot be pinned, and it
//!   stays on the interface after every process exits. `<program>` is then
//!   a directory holding the filter's program, pinned under a name that is
//!   the filter's identity (`netlink-<ifindex>-<hook>-<priority>-<handle>`),
//!   so that `detach` deletes exactly that filter, then the pin.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::programs::{
    SchedClassifier, TcAttachType,
    links::FdLink,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};

/// The identity of a netlink filter, as its pin's name spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Filter {
    ifindex: u32,
    hook: TcAttachType,
    priority: u16,
    handle: u32,
}

impl Filter {
    fn pin_name(&self) -> String {
        let hook = match self.hook {
            TcAttachType::Egress => "egress",
            _ => "ingress",
        };
        format!(
            "netlink-{}-{hook}-{}-{:x}",
            self.ifindex, self.priority, self.handle
        )
    }

    fn parse(name: &str) -> Option<Filter> {
        let mut parts = name.strip_prefix("netlink-")?.split('-');
        let ifindex = parts.next()?.parse().ok()?;
        let hook = match parts.next()? {
            "ingress" => TcAttachType::Ingress,
            "egress" => TcAttachType::Egress,
            _ => return None,
        };
        let priority = parts.next()?.parse().ok()?;
        let handle = u32::from_str_radix(parts.next()?, 16).ok()?;
        parts.next().is_none().then_some(Filter {
            ifindex,
            hook,
            priority,
            handle,
        })
    }

    /// A handle on the filter, for aya to replace or delete it. It deletes
    /// the filter when dropped.
    fn link(&self) -> Result<SchedClassifierLink> {
        let ifname = crate::host::netlink::ifname(self.ifindex)?;
        Ok(SchedClassifierLink::attached(
            &ifname,
            self.hook,
            self.priority,
            TcHandle::from(self.handle),
            None,
        )?)
    }
}

/// Whether the attachment pinned at `pin` is a netlink filter (a
/// directory holding one; a TCX link's pin is a file).
pub(crate) fn is_netlink(pin: &Path) -> bool {
    pin.is_dir() && netlink_filter(pin).is_ok()
}

/// The filter pinned under a netlink attachment's directory, and its pin.
fn netlink_filter(pin: &Path) -> Result<(Filter, PathBuf)> {
    for entry in fs::read_dir(pin).with_context(|| format!("reading {}", pin.display()))? {
        let path = entry?.path();
        if let Some(filter) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(Filter::parse)
        {
            return Ok((filter, path));
        }
    }
    bail!("{} holds no netlink filter", pin.display())
}

/// Attaches a loaded `program` to `ifname` and pins the attachment at
/// `pin`: a TCX link when `tcx`, else a netlink filter.
pub(crate) fn attach(
    program: &mut SchedClassifier,
    ifname: &str,
    hook: TcAttachType,
    pin: &Path,
    tcx: bool,
) -> Result<()> {
    if tcx {
        // A TCX link coexists with other programs on the interface.
        let link_id = program.attach_with_options(
            ifname,
            hook,
            TcAttachOptions::TcxOrder(Default::default()),
        )?;
        let link: FdLink = program.take_link(link_id)?.try_into()?;
        link.pin(pin)?;
        return Ok(());
    }
    // clsact may be there already (our other hook, or another tool): the
    // kernel then says "Exclusivity flag on". If it is truly missing, the
    // attach below says so.
    tc::qdisc_add_clsact(ifname).ok();
    // Priority and handle chosen by the kernel: no clash with filters that
    // other tools put on the interface.
    let link_id = program.attach_with_options(
        ifname,
        hook,
        TcAttachOptions::Netlink(NlOptions::default()),
    )?;
    let link = program.take_link(link_id)?;
    let filter = Filter {
        ifindex: crate::host::netlink::ifindex(ifname)?,
        hook,
        priority: link.priority()?,
        handle: link.handle()?.into(),
    };
    // The filter must outlive this process, and aya deletes it when its
    // link is dropped: from here on the pin below owns it.
    std::mem::forget(link);
    let pinned = fs::create_dir(pin)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(program.pin(pin.join(filter.pin_name()))?));
    if let Err(error) = pinned {
        drop(filter.link());
        // Best effort: the error below is what the caller needs.
        fs::remove_dir_all(pin).ok();
        return Err(error).with_context(|| format!("pinning {}", pin.display()));
    }
    Ok(())
}

/// The index of the interface a netlink attachment's filter was put on.
pub(crate) fn netlink_ifindex(pin: &Path) -> Result<u32> {
    Ok(netlink_filter(pin)?.0.ifindex)
}

/// Deletes a netlink attachment: the filter, then its pin.
pub(crate) fn detach_netlink(pin: &Path) -> Result<()> {
    let (filter, program_pin) = netlink_filter(pin)?;
    // An interface that is gone took its filters with it, and its index
    // may name another interface by now: the filter is deleted only from
    // the interface the pin is for (`links/tc/<interface>/<program>`).
    let pinned_for = pin
        .parent()
        .and_then(Path::file_name)
        .and_then(|name| name.to_str());
    let still_there = crate::host::netlink::ifname(filter.ifindex).ok();
    if still_there.is_some()
        && still_there.as_deref() == pinned_for
        && let Ok(link) = filter.link()
    {
        // Dropping the handle deletes the filter.
        drop(link);
    }
    fs::remove_file(&program_pin).with_context(|| format!("removing {}", program_pin.display()))?;
    fs::remove_dir(pin).with_context(|| format!("removing {}", pin.display()))
}

/// Points a netlink filter at `program` (loaded) if it runs another
/// program (an upgrade) or `force`: one netlink change of the filter in
/// place, so that packets flow on; then re-pins. True if replaced.
pub(crate) fn replace_netlink(
    program: &mut SchedClassifier,
    pin: &Path,
    force: bool,
) -> Result<bool> {
    let (filter, old_pin) = netlink_filter(pin)?;
    let running = aya::programs::ProgramInfo::from_pin(&old_pin)?.tag();
    if !force && running == program.info()?.tag() {
        return Ok(false);
    }
    let link_id = program
        .attach_to_link(filter.link()?)
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("replacing the program of {}", pin.display()))?;
    // As in `attach`: the filter outlives this process.
    std::mem::forget(program.take_link(link_id)?);
    fs::remove_file(&old_pin).with_context(|| format!("removing {}", old_pin.display()))?;
    program.pin(&old_pin)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_names_round_trip() {
        let filter = Filter {
            ifindex: 17,
            hook: TcAttachType::Egress,
            priority: 49152,
            handle: 0x8001,
        };
        assert_eq!(filter.pin_name(), "netlink-17-egress-49152-8001");
        assert_eq!(Filter::parse(&filter.pin_name()), Some(filter));
        assert_eq!(Filter::parse("netlink-17-sideways-1-1"), None);
        assert_eq!(Filter::parse("netlink-17-ingress-1-1-extra"), None);
        assert_eq!(Filter::parse("pf_tc_uplink_in"), None);
    }
}
