//! The kernel objects and nothing else: the eBPF object and its programs
//! (load, attach, replace, detach), the pinned maps (typed access, layout
//! checks, the lock that makes a process their only writer) and the path
//! to a container, what the kernel offers (`kernel`), and following the
//! host's interfaces as they are recreated (`follow`). Imports `model`,
//! `instance` and `host` only.

mod backend;
mod batch;
mod conntrack;
mod follow;
mod install;
pub(crate) mod kernel;
mod link_bits;
mod links;
mod lock;
mod maps;
mod object;
mod observe;
mod rollback;
mod sockets;
mod tc_attach;
#[cfg(test)]
mod tc_cases;
#[cfg(test)]
mod tc_cases_host;
#[cfg(test)]
mod tc_cases_icmp;
#[cfg(test)]
mod tc_cases_nat46;
#[cfg(test)]
mod tc_cases_oversize;
#[cfg(test)]
mod tc_cases_reply;
#[cfg(test)]
mod tc_cases_sequence;
#[cfg(test)]
mod tc_cost;
#[cfg(test)]
mod tc_fixture;
mod trace;

pub(crate) use backend::prepare_backend_path;
pub(crate) use conntrack::{Flow, flows, forget_flows, sweep_expired};
pub(crate) use follow::{
    Follow, LinkState, TcLink, backend_paths, follow_host, follow_links, tc_links,
};
pub(crate) use install::{
    InstallOptions, InstallReport, UninstallReport, check_uplink, install, resolve_uplinks,
    uninstall,
};
pub(crate) use kernel::{bpf_insn, load_constant_program, load_program};
pub(crate) use link_bits::sync as sync_link_bits;
pub(crate) use links::{attach_uplink, detach_interface};
pub(crate) use lock::StateLock;
pub(crate) use maps::PinnedMaps;
pub(crate) use object::Sizes;
pub(crate) use observe::{MapFill, ProgramRuns, enable_run_statistics, map_fill, program_runs};
pub(crate) use rollback::Rollback;
pub(crate) use sockets::end_sockets_through;
pub(crate) use trace::{TraceFilter, Traced, Tracer, switch_off_abandoned};
