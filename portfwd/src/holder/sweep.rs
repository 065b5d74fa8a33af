//! The holder's sweep of the connection tracking: the entries of flows that
//! closed or timed out are removed (`datapath::sweep_expired`), so that the
//! LRU map has free entries for new flows and evicts no live one until live
//! and recently closed flows fill it. It runs on a thread of its own: a
//! pass over a full table takes a fifth of a second, which the holder's
//! requests need not wait for.

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::datapath;

/// How often the table is swept at most: an entry outlives its flow by
/// about this (after the closing time, `CT_TCP_CLOSING_NS`, 10 s).
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// The sweep takes at most one hundredth of a CPU: a pass costs what the
/// table holds (about 0.2 s for 524,288 entries, the default size full:
/// then a pass every 20 s; an empty table costs a few milliseconds).
const IDLE_PER_BUSY: u32 = 100;

/// Starts the sweep; it ends with the instance (its pin directory gone).
pub(super) fn start(pin_dir: PathBuf) {
    let spawned = thread::Builder::new()
        .name("sweep".into())
        .spawn(move || sweep_while_up(&pin_dir));
    if let Err(error) = spawned {
        eprintln!("portfwd hold: starting the conntrack sweep: {error}");
    }
}

fn sweep_while_up(pin_dir: &Path) {
    let mut wait = SWEEP_EVERY;
    let mut failing = false;
    loop {
        thread::sleep(wait);
        if !pin_dir.exists() {
            return;
        }
        let started = Instant::now();
        match datapath::sweep_expired(pin_dir) {
            Ok(_) => failing = false,
            // Said once per run of failures.
            Err(error) if !failing => {
                eprintln!("portfwd hold: sweeping the conntrack: {error:#}");
                failing = true;
            }
            Err(_) => {}
        }
        wait = SWEEP_EVERY.max(started.elapsed() * IDLE_PER_BUSY);
    }
}
