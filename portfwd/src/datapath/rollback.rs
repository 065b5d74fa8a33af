//! Undoing a failed `up`: what it attached and pinned goes, and an
//! instance that did not exist before `up` is removed whole, so that a
//! failed `up` leaves the host as it found it. (The state file, which `up`
//! may create too, is `ops`'s to remove.)

use std::{
    fs,
    path::{Path, PathBuf},
};

use portfwd_common::{MAPS, SERVICES};

use super::links::{detach_pin, unpin_links_in};
use crate::instance;

/// Armed from the start of `up`; `disarm` once `up` has succeeded.
pub(crate) struct Rollback {
    pin_dir: PathBuf,
    /// No instance was pinned here before this `up`.
    fresh: bool,
    /// Pins of the attachments this `up` made, in order.
    created: Vec<PathBuf>,
    armed: bool,
}

impl Rollback {
    pub(crate) fn new(pin_dir: &Path) -> Self {
        Rollback {
            pin_dir: pin_dir.to_owned(),
            fresh: !pin_dir.join(SERVICES.name).exists(),
            created: Vec::new(),
            armed: true,
        }
    }

    /// Whether no instance existed here before this `up`.
    pub(crate) fn is_fresh(&self) -> bool {
        self.fresh
    }

    pub(crate) fn created(&mut self, pin: PathBuf) {
        self.created.push(pin);
    }

    pub(crate) fn created_all(&mut self, pins: Vec<PathBuf>) {
        self.created.extend(pins);
    }

    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }

    /// Best effort: the error that made `up` fail is what the user sees.
    fn undo(&self) {
        for pin in self.created.iter().rev() {
            detach_pin(pin).ok();
        }
        let links = instance::links_dir(&self.pin_dir);
        // Interface directories this `up` created and left empty.
        if let Ok(entries) = fs::read_dir(links.join("tc")) {
            for entry in entries.flatten() {
                fs::remove_dir(entry.path()).ok();
            }
        }
        if !self.fresh {
            return;
        }
        if links.exists() {
            unpin_links_in(&links).ok();
        }
        for map in MAPS {
            fs::remove_file(self.pin_dir.join(map.name)).ok();
        }
        fs::remove_dir(&self.pin_dir).ok();
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        if self.armed {
            self.undo();
        }
    }
}
