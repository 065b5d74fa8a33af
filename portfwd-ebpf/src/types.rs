//! Types private to the eBPF programs (the shared ones are in
//! `portfwd-common`), kept apart so that `maps` and the modules that use
//! the maps import them without importing each other.

use portfwd_common::{CtKey, CtValue};

/// A conntrack entry under construction (in the per-CPU scratch map).
pub(crate) struct Scratch {
    pub key: CtKey,
    pub value: CtValue,
}
