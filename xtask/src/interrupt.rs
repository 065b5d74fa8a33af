//! Ctrl-C for the long-running commands (demo, bench): a flag that the
//! command checks between steps, so that it unwinds through the guards
//! that tear down what it created. SIGTERM and SIGHUP set it too (`kill`,
//! a closed terminal): without them, the command died where it stood and
//! left its namespaces, servers and pins behind. Children get the default
//! disposition back on exec, so they die, and the step that ran them
//! fails.

use std::sync::{
    Once,
    atomic::{AtomicBool, Ordering},
};

use anyhow::{Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// From now on, Ctrl-C sets the flag instead of killing this process.
pub(crate) fn catch() -> Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
    Ok(result?)
}

pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once Ctrl-C was pressed.
pub(crate) fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}
