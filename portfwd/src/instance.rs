//! Where an instance of portfwd lives. An instance is named by its pin
//! directory on a bpf filesystem (default `/sys/fs/bpf/portfwd`); every
//! other path of it derives from that one:
//! - `<pin dir>/<map>`: one pinned map per entry of `portfwd_common::MAPS`;
//! - `<pin dir>/links/<program>`: the pinned attachment of each socket
//!   program, and `links/tc/<interface>/<program>` of each TC program (a
//!   pinned link keeps its program attached; unpinning detaches it);
//! - `/var/lib/portfwd/state<tag>.json`: the state file (see `state`);
//! - `/run/portfwd/holder<tag>.sock` and `.log`: the port holder's socket
//!   and log (see `holder`);
//! - `/run/portfwd/serve<tag>.pid`: the pid of `portfwd serve` (see `serve`);
//! - `/run/portfwd-api/api<tag>.sock`: its API socket (see `serve::api`),
//!   in a directory every user may enter.

use std::path::{Path, PathBuf};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portfwd";

/// Where the port holders listen and log.
const RUN_DIR: &str = "/run/portfwd";
/// Where state files live.
const STATE_DIR: &str = "/var/lib/portfwd";

/// A name for the instance usable in file names:
/// `/sys/fs/bpf/portfwd` -> `_sys_fs_bpf_portfwd`.
pub(crate) fn tag(pin_dir: &Path) -> String {
    pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// The links of the TC programs attached to `ifname`.
pub(crate) fn tc_dir(pin_dir: &Path, ifname: &str) -> PathBuf {
    links_dir(pin_dir).join("tc").join(ifname)
}

/// The state file: the default instance's is /var/lib/portfwd/state.json,
/// others get their own.
pub fn state_path(pin_dir: &Path) -> PathBuf {
    let dir = Path::new(STATE_DIR);
    if pin_dir == Path::new(DEFAULT_PIN_DIR) {
        dir.join("state.json")
    } else {
        dir.join(format!("state{}.json", tag(pin_dir)))
    }
}

pub(crate) fn run_dir() -> &'static Path {
    Path::new(RUN_DIR)
}

/// The port holder's unix socket.
pub fn holder_socket(pin_dir: &Path) -> PathBuf {
    run_dir().join(format!("holder{}.sock", tag(pin_dir)))
}

/// Where the API sockets live: not in `RUN_DIR`, which only root may
/// enter (the holder's socket and log are there).
const API_DIR: &str = "/run/portfwd-api";

/// The API socket of `portfwd serve` (see `serve::api`), open to every user.
pub fn api_socket(pin_dir: &Path) -> PathBuf {
    Path::new(API_DIR).join(format!("api{}.sock", tag(pin_dir)))
}

/// Where the administrator enables rootless publishing (see
/// `model::rootless`).
pub const DEFAULT_ROOTLESS_POLICY: &str = "/etc/portfwd/rootless.toml";

/// The pid of `portfwd serve`, while it runs: the CLI then leaves starting
/// the port holder to it.
pub(crate) fn service_pid_file(pin_dir: &Path) -> PathBuf {
    run_dir().join(format!("serve{}.pid", tag(pin_dir)))
}

/// The port holder's log (its stderr).
pub fn holder_log(pin_dir: &Path) -> PathBuf {
    run_dir().join(format!("holder{}.log", tag(pin_dir)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_tags_are_file_names() {
        assert_eq!(tag(Path::new("/sys/fs/bpf/portfwd")), "_sys_fs_bpf_portfwd");
        assert_eq!(tag(Path::new("/x/a b.c")), "_x_a_b_c");
    }
}
