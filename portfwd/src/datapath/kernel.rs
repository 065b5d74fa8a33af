//! What the running kernel offers portfwd, probed once by `up` before it
//! changes anything, recorded next to the instance's state file, and shown
//! by `up` (one line) and `list`.
//!
//! The minimum kernel is 5.11: each requirement below names the kernel
//! that introduced it, and `bpf_ktime_get_coarse_ns` (5.11) is the newest. On a
//! kernel without one, `up` refuses with one line naming it. Newer kernels
//! add what portfwd uses when present (TCX links, 6.6) or reports (the
//! `bpf_sock_destroy` kfunc, 6.5; BTF); without them it degrades as the
//! README's kernel table says.
//!
//! Each probe asks the kernel directly (loading a two-instruction program,
//! querying an attach point): a version number says nothing about a
//! distribution kernel's backports.

use std::{
    fs,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    programs::{ProgramType, TcAttachType, tc::SchedClassifier},
    sys::{BpfHelper, is_helper_supported, is_program_supported},
};
use serde::{Deserialize, Serialize};

/// The oldest kernel that has everything in `REQUIREMENTS`.
pub(crate) const MINIMUM_KERNEL: &str = "5.11";

/// Lets tests pretend that features are missing: a comma-separated list of
/// feature names (`tcx`, `bpf_redirect_neigh`, ...). Never needed otherwise.
pub(crate) const DENY_ENV: &str = "PORTFWD_PROBE_DENY";

/// A feature portfwd cannot work without.
struct Requirement {
    name: &'static str,
    /// The mainline kernel that introduced it.
    since: &'static str,
    /// What needs it, for the refusal message.
    used_for: &'static str,
    probe: fn() -> bool,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        name: "cgroup sock_addr programs",
        since: "4.17",
        used_for: "the socket path",
        probe: || is_program_supported(ProgramType::CgroupSockAddr).unwrap_or(false),
    },
    Requirement {
        name: "TC classifier programs",
        since: "4.1",
        used_for: "the TC path",
        probe: || is_program_supported(ProgramType::SchedClassifier).unwrap_or(false),
    },
    Requirement {
        name: "cgroup recvmsg hooks",
        since: "5.2",
        used_for: "UDP replies on the socket path",
        probe: || sock_addr_hook_loads(BPF_CGROUP_UDP4_RECVMSG),
    },
    Requirement {
        name: "cgroup getpeername hooks",
        since: "5.8",
        used_for: "getpeername on the socket path",
        probe: || sock_addr_hook_loads(BPF_CGROUP_INET4_GETPEERNAME),
    },
    Requirement {
        name: "bpf_get_netns_cookie",
        since: "5.7",
        used_for: "telling host sockets from containers'",
        probe: || {
            helper(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_get_netns_cookie,
            )
        },
    },
    Requirement {
        name: "bpf_get_socket_cookie in cgroup sock programs",
        since: "5.10",
        used_for: "freeing a closed socket's record (cgroup/sock_release)",
        probe: || {
            helper(
                ProgramType::CgroupSock,
                BpfHelper::BPF_FUNC_get_socket_cookie,
            )
        },
    },
    Requirement {
        name: "bpf_fib_lookup",
        since: "4.18",
        used_for: "recognising the host's own addresses on the TC path",
        probe: || helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_fib_lookup),
    },
    Requirement {
        name: "bpf_redirect_neigh",
        since: "5.10",
        used_for: "redirecting external flows to containers",
        probe: || {
            helper(
                ProgramType::SchedClassifier,
                BpfHelper::BPF_FUNC_redirect_neigh,
            )
        },
    },
    Requirement {
        name: "bpf_ktime_get_coarse_ns",
        since: "5.11",
        used_for: "the TC path's connection tracking clock",
        probe: || {
            helper(
                ProgramType::SchedClassifier,
                BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
            )
        },
    },
];

/// What `up` found, as recorded for the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KernelFeatures {
    /// `uname -r`.
    pub(crate) release: String,
    /// TCX links (6.6): TC programs attach as pinned links; without them,
    /// as netlink clsact filters.
    pub(crate) tcx: bool,
    /// The `bpf_sock_destroy` kfunc (6.5), reported only: portfwd ends host
    /// sockets through sock_diag on every kernel (see `sockets`), since aya
    /// 0.14 cannot load a program that calls a kfunc.
    pub(crate) sock_destroy: bool,
    /// Kernel BTF (/sys/kernel/btf/vmlinux): verifier logs name types.
    pub(crate) btf: bool,
}

impl KernelFeatures {
    /// How TC programs are attached on this kernel.
    pub(crate) fn tc_attachment(&self) -> &'static str {
        if self.tcx {
            "TCX links"
        } else {
            "netlink filters (TCX needs 6.6)"
        }
    }

    /// The one line `up` prints and `list` repeats.
    pub(crate) fn summary(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        format!(
            "kernel {} (minimum {MINIMUM_KERNEL}): TC programs as {}, bpf_sock_destroy {}, BTF {}",
            self.release,
            self.tc_attachment(),
            yes_no(self.sock_destroy),
            yes_no(self.btf)
        )
    }
}

fn denied(name: &str) -> bool {
    std::env::var(DENY_ENV)
        .is_ok_and(|list| list.split(',').any(|d| d.trim().eq_ignore_ascii_case(name)))
}

/// Probes the kernel; fails with one line naming the first missing
/// requirement and the minimum kernel.
pub(crate) fn probe() -> Result<KernelFeatures> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "(unknown)".into());
    for r in REQUIREMENTS {
        if denied(r.name) || !(r.probe)() {
            bail!(
                "kernel {release} lacks {} (Linux {}, for {}): portfwd needs Linux {MINIMUM_KERNEL} or newer",
                r.name,
                r.since,
                r.used_for
            );
        }
    }
    Ok(KernelFeatures {
        tcx: !denied("tcx") && tcx_supported(),
        sock_destroy: !denied("sock_destroy") && kernel_btf_names("bpf_sock_destroy"),
        btf: !denied("btf") && Path::new(VMLINUX_BTF).exists(),
        release,
    })
}

/// Whether TC programs can attach as TCX links: a TCX query on loopback
/// (which every network namespace has) succeeds from 6.6 on. Cheap enough
/// to ask at every attach.
pub(crate) fn tcx_supported() -> bool {
    !denied("tcx") && SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

fn helper(program_type: ProgramType, helper: BpfHelper) -> bool {
    is_helper_supported(program_type, helper).unwrap_or(false)
}

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Whether the kernel's BTF names `symbol` (kfuncs are only known by BTF).
fn kernel_btf_names(symbol: &str) -> bool {
    let Ok(btf) = fs::read(VMLINUX_BTF) else {
        return false;
    };
    // Names are NUL-terminated in the BTF string section. A substring
    // search of the whole file (about 5 MB): byte-window comparisons took
    // a tenth of `up` in a debug build, and seconds of it under emulation
    // (the 6.1 guest), where memmem's skip loop takes milliseconds.
    let needle: Vec<u8> = [b"\0", symbol.as_bytes(), b"\0"].concat();
    memchr::memmem::find(&btf, &needle).is_some()
}

// Attach types from include/uapi/linux/bpf.h (enum bpf_attach_type).
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;

/// Whether the kernel loads a cgroup sock_addr program for `attach_type`
/// (`r0 = 1; exit`): a kernel without the hook rejects the attach type.
/// aya's probes load sock_addr programs for connect4 only, hence this one.
fn sock_addr_hook_loads(attach_type: u32) -> bool {
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    load_constant_program(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach_type, 1).is_some()
}

/// Loads the two-instruction program `r0 = verdict; exit` of `prog_type`
/// (and `expected_attach_type`, 0 where the type has none): the kernel's
/// answer is the probe, and the drop-all socket filter the holder attaches
/// to held UDP ports is one.
pub(crate) fn load_constant_program(
    prog_type: u32,
    expected_attach_type: u32,
    verdict: i32,
) -> Option<OwnedFd> {
    load_program(
        prog_type,
        expected_attach_type,
        &[bpf_insn(0xb7, 0, 0, verdict), bpf_insn(0x95, 0, 0, 0)],
    )
}

/// One eBPF instruction (`struct bpf_insn`): opcode, registers (destination
/// in the low nibble, source in the high one), offset, immediate.
pub(crate) const fn bpf_insn(code: u8, regs: u8, off: i16, imm: i32) -> u64 {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([code, regs, o0, o1, i0, i1, i2, i3])
}

/// Loads the program `insns` of `prog_type` (and `expected_attach_type`).
/// A raw `BPF_PROG_LOAD` because aya 0.14 loads programs from an object
/// file only.
pub(crate) fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
) -> Option<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    let license = c"GPL";
    // The prefix of union bpf_attr that BPF_PROG_LOAD reads, up to
    // expected_attach_type (Linux 4.17); the kernel zero-checks the rest.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    // SAFETY: all-zero bytes are a valid ProgLoad (and what the kernel
    // expects in the fields not set).
    let mut attr: ProgLoad = unsafe { std::mem::zeroed() };
    attr.prog_type = prog_type;
    attr.insn_cnt = insns.len() as u32;
    attr.insns = insns.as_ptr() as u64;
    attr.license = license.as_ptr() as u64;
    attr.expected_attach_type = expected_attach_type;
    // SAFETY: attr is a valid bpf_attr prefix for this command, of the size
    // passed; the pointers it holds outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr, size_of::<ProgLoad>()) };
    // SAFETY: a non-negative return is a new file descriptor that we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Where the instance at `pin_dir` keeps what `up` found: next to its
/// state file (bpffs holds only BPF objects).
pub(crate) fn record_path(pin_dir: &Path) -> PathBuf {
    let state = crate::instance::state_path(pin_dir);
    let name = state
        .file_name()
        .map(|n| n.to_string_lossy().replacen("state", "kernel", 1))
        .unwrap_or_else(|| "kernel.json".into());
    state.with_file_name(name)
}

pub(crate) fn record(pin_dir: &Path, features: &KernelFeatures) -> Result<()> {
    let path = record_path(pin_dir);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(features)?;
    fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// What the last `up` of the instance recorded, if anything.
pub(crate) fn recorded(pin_dir: &Path) -> Option<KernelFeatures> {
    let text = fs::read_to_string(record_path(pin_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Forgets the record (`down`).
pub(crate) fn forget(pin_dir: &Path) -> Result<()> {
    let path = record_path(pin_dir);
    match fs::remove_file(&path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_btf_names_whole_symbols_only() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIPPED: this kernel has no {VMLINUX_BTF}");
            return;
        }
        // A function every kernel with BTF has, and parts of its name.
        assert!(kernel_btf_names("bpf_prog_load"));
        assert!(!kernel_btf_names("bpf_prog_loa"));
        assert!(!kernel_btf_names("pf_prog_load"));
        assert!(!kernel_btf_names("portfwd_no_such_symbol"));
    }

    #[test]
    fn the_minimum_is_the_newest_requirement() {
        let version = |v: &str| -> (u32, u32) {
            let (major, minor) = v.split_once('.').unwrap();
            (major.parse().unwrap(), minor.parse().unwrap())
        };
        let newest = REQUIREMENTS.iter().map(|r| version(r.since)).max();
        assert_eq!(newest, Some(version(MINIMUM_KERNEL)));
    }

    #[test]
    fn the_record_sits_next_to_the_state_file() {
        let default = record_path(Path::new(crate::instance::DEFAULT_PIN_DIR));
        assert_eq!(default, Path::new("/var/lib/portfwd/kernel.json"));
        let other = record_path(Path::new("/sys/fs/bpf/pf-test"));
        assert_eq!(
            other.parent(),
            crate::instance::state_path(Path::new("/sys/fs/bpf/pf-test")).parent()
        );
        assert_ne!(other, default);
    }

    #[test]
    fn the_summary_is_one_line_naming_the_attachment() {
        let features = KernelFeatures {
            release: "6.1.0-57-amd64".into(),
            tcx: false,
            sock_destroy: false,
            btf: true,
        };
        let line = features.summary();
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("kernel 6.1.0-57-amd64 (minimum 5.11)"),
            "{line}"
        );
        assert!(line.contains("netlink filters"), "{line}");
    }
}
