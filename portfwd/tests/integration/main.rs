//! portfwd's integration tests: one binary, one module per feature, over
//! the shared `support` module (namespaces, veths, servers, clients, the
//! CLI), which the benchmark (`cargo xtask bench`) reuses too.
//!
//! Run them as root, one at a time (they attach to the shared cgroup root):
//! `cargo xtask test`, or `cargo test -p portfwd --test integration --
//! --test-threads=1 MODULE::` for one feature.

// The test crate sees every dev-dependency of the package; these are the
// library's and the unit tests'.
#![allow(unused_crate_dependencies)]
// Cleanup (in Drop, mostly) is best effort: what it cannot remove, the
// next run's setup removes first.
#![allow(clippy::let_underscore_must_use)]

mod allowlist;
mod big_tcp;
mod cni;
mod conntrack;
mod control_plane;
mod docker;
mod explain;
mod follow;
mod hostile;
mod kernel_support;
mod nat46;
mod pmtu;
mod properties;
mod reliability;
mod rootless;
mod serve;
mod socket_completeness;
mod socket_lifetime;
mod socket_path;
mod support;
mod tc_path;
mod trace;
