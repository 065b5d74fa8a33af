//! The kernel objects and nothing else: the eBPF object and its programs
//! (load, attach, replace, detach), the pinned maps (typed access, layout
//! checks, the lock that makes a process their only writer) and the path
//! to a container. Imports `model`, `instance` and `host` only.

mod backend;
mod install;
mod links;
mod maps;
mod object;
#[cfg(test)]
mod tc_cases;

pub(crate) use backend::prepare_backend_path;
pub(crate) use install::{
    InstallOptions, InstallReport, UninstallReport, check_uplink, install, uninstall,
};
pub(crate) use links::{attach_uplink, detach_interface, tc_attachments};
pub(crate) use maps::{PinnedMaps, StateLock};
pub(crate) use object::Sizes;
