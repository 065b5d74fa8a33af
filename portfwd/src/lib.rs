//! portfwd: publishes container ports with eBPF instead of iptables DNAT
//! rules or a userspace proxy.
//!
//! The library is what the `portfwd` binary is made of: `publish` parses the
//! docker/nerdctl `-p` grammar, `mapping` plans and encodes mappings, `maps`
//! gives typed access to the pinned BPF maps, `loader` loads, attaches and
//! pins the programs, `host` reads facts about the host, and `commands`
//! implements each CLI command on top of them.

pub mod cni;
pub mod commands;
pub mod docker_proxy;
pub mod holder;
pub mod host;
pub mod kernel_features;
pub mod loader;
pub mod mapping;
pub mod maps;
pub mod netlink;
pub mod ops;
pub mod owner;
pub mod publish;
pub mod state;
pub mod tc_attach;
mod up_rollback;

use std::fmt;

/// A mistake in what the user typed (as opposed to a failure while doing
/// it): the CLI exits with status 2 and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Exit status for an error: 2 for usage errors, 1 for everything else.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    let usage = error.chain().any(|cause| {
        cause.downcast_ref::<UsageError>().is_some()
            || cause.downcast_ref::<publish::PublishError>().is_some()
    });
    if usage { 2 } else { 1 }
}
