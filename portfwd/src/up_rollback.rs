//! Undoing a failed `up`: what it attached and pinned goes, and an
//! instance that did not exist before `up` is removed whole, so that a
//! failed `up` leaves the host as it found it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use portfwd_common::{ALL_MAPS, SERVICES_MAP};

use crate::{loader, state};

/// Armed from the start of `up`; `disarm` once `up` has succeeded.
pub struct UpRollback {
    pin_dir: PathBuf,
    /// No instance was pinned here before this `up`.
    fresh: bool,
    state_existed: bool,
    /// Pins of the attachments this `up` made, in order.
    created: Vec<PathBuf>,
    armed: bool,
}

impl UpRollback {
    pub fn new(pin_dir: &Path) -> Self {
        UpRollback {
            pin_dir: pin_dir.to_owned(),
            fresh: !pin_dir.join(SERVICES_MAP).exists(),
            state_existed: state::default_path(pin_dir).exists(),
            created: Vec::new(),
            armed: true,
        }
    }

    pub fn created(&mut self, pin: PathBuf) {
        self.created.push(pin);
    }

    pub fn created_all(&mut self, pins: Vec<PathBuf>) {
        self.created.extend(pins);
    }

    pub fn disarm(mut self) {
        self.armed = false;
    }

    /// Best effort: the error that made `up` fail is what the user sees.
    fn undo(&self) {
        for pin in self.created.iter().rev() {
            let _ = loader::detach_pin(pin);
        }
        let links = self.pin_dir.join("links");
        // Interface directories this `up` created and left empty.
        if let Ok(entries) = fs::read_dir(links.join("tc")) {
            for entry in entries.flatten() {
                let _ = fs::remove_dir(entry.path());
            }
        }
        if !self.fresh {
            return;
        }
        if links.exists() {
            let _ = loader::unpin_links_in(&links);
        }
        for name in ALL_MAPS {
            let _ = fs::remove_file(self.pin_dir.join(name));
        }
        let _ = fs::remove_dir(&self.pin_dir);
        if !self.state_existed {
            let _ = state::Store::new(state::default_path(&self.pin_dir)).remove();
        }
    }
}

impl Drop for UpRollback {
    fn drop(&mut self) {
        if self.armed {
            self.undo();
        }
    }
}
