//! The holder's sweep of the connection tracking: the entries of flows that
//! closed or timed out are removed (`datapath::sweep_expired`), so that the
//! LRU map has free entries for new flows and evicts no live one until live
//! and recently closed flows fill it. It runs on a thread of its own, at
//! the lowest priority: a pass over a full table takes a fifth of a second,
//! which neither the holder's requests nor the traffic need wait for.

use std::{
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use crate::datapath;

/// How often the table is swept at most: an entry outlives its flow by
/// about this (after the closing time, `CT_TCP_CLOSING_NS`, 10 s).
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// The sweep takes at most one hundredth of a CPU: a pass costs what the
/// table holds (about 0.2 s for 524,288 entries, the default size full:
/// then a pass every 20 s; an empty table costs a millisecond).
const IDLE_PER_BUSY: u32 = 100;
/// The sweep's rest between two steps of its work (a read of 4,096
/// entries, or of 256 dead ones: about a millisecond each): a pass that removes
/// the entries of a burst of closed flows spreads over seconds, so that its
/// memory traffic does not delay the packets of the moment.
const PAUSE: Duration = Duration::from_millis(2);

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
    if let Err(error) = run_only_when_idle() {
        eprintln!("portfwd hold: the conntrack sweep at the lowest priority: {error}");
    }
    let mut failing = false;
    // The first pass at once: it also tells the TC programs that a new
    // instance's table holds no masqueraded flow (`sweep_expired`), which
    // spares host connections a conntrack lookup per packet from the start.
    loop {
        if !pin_dir.exists() {
            return;
        }
        let started = thread_cpu_time();
        match datapath::sweep_expired(pin_dir, || thread::sleep(PAUSE)) {
            Ok(_) => failing = false,
            // Said once per run of failures.
            Err(error) if !failing => {
                eprintln!("portfwd hold: sweeping the conntrack: {error:#}");
                failing = true;
            }
            Err(_) => {}
        }
        let busy = thread_cpu_time().saturating_sub(started);
        thread::sleep(SWEEP_EVERY.max(busy * IDLE_PER_BUSY));
    }
}

/// Puts the calling thread under SCHED_IDLE: it runs only on a CPU that has
/// nothing else to run, and any other task that wakes there preempts it. A
/// pass that removes the entries of a burst of closed flows (100,000 of
/// them after a few seconds of 30,000 new connections/s) takes a few
/// hundred milliseconds of CPU, which must not delay the traffic itself.
fn run_only_when_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU time this thread has used: a pass's cost without its pauses.
fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}
