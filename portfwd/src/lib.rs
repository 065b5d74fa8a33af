//! portfwd: publishes container ports with eBPF instead of iptables DNAT
//! rules or a userspace proxy.
//!
//! Layers, each importing only those before it (a unit test below checks):
//! - `model`: protocols, the `-p` grammar, the `Mapping` type and its
//!   encoding, planning, the state and apply file formats. Pure.
//! - `instance`: where an instance lives (pin dir, state file, holder).
//! - `host`: facts about the host (capabilities, filesystems, addresses,
//!   ports, rtnetlink).
//! - `datapath`: the kernel objects (programs, links, pinned maps).
//! - `state`: the state file and reconciling the maps with it.
//! - `holder`: the port holder process and its client.
//! - `ops`: the operations, as sessions that change maps and state together.
//! - `cli`, `cni` and `docker_proxy`: the three front ends (the CLI, the
//!   CNI plugin, dockerd's userland proxy), and `serve`, the long-running
//!   service (port holder and metrics) that the CLI starts.
//!
//! `error` (the error type, exit statuses, CNI codes) is used by all.

pub mod cli;
pub mod cni;
mod datapath;
pub mod docker_proxy;
pub mod error;
mod holder;
mod host;
pub mod instance;
pub mod model;
mod ops;
mod serve;
mod state;

#[cfg(test)]
mod layers;

// Used by the integration tests only.
#[cfg(test)]
use portfwd_testkit as _;
#[cfg(test)]
use proptest as _;
