//! Programs attached through pinned links: attaching the socket programs to
//! a cgroup and the TC programs to interfaces, replacing the program of a
//! link in place (an upgrade), detaching by unpinning.
//!
//! Before TCX (kernel 6.6), TC programs attach as netlink filters instead
//! (`tc_attach`), with the same pin layout.
//!
//! aya 0.14 has no API for `BPF_LINK_UPDATE`, nor for the file descriptor
//! of a pinned link (which `BPF_LINK_UPDATE` needs), so those two syscalls
//! are made here directly; everything else goes through aya.

use std::{
    fs::{self, DirBuilder, File},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::DirBuilderExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use portfwd_common::{BACKEND_PROGRAMS, Hook, ProgramDef, UPLINK_PROGRAMS, programs};

use super::{StateLock, kernel, object, tc_attach};
use crate::instance;

pub(crate) fn attach_sock_program(
    ebpf: &mut Ebpf,
    program_def: &ProgramDef,
    cgroup: &File,
    pin: &Path,
) -> Result<()> {
    let name = program_def.name;
    // Loaded by `load_all`. Single: aya's AllowMultiple passes
    // BPF_F_ALLOW_MULTI as link flags, which the kernel rejects; a link
    // attachment coexists with other programs on the cgroup anyway.
    let link: FdLink = match program_def.hook {
        Hook::CgroupSock(_) => {
            let program: &mut CgroupSock = program_of(ebpf, name)?.try_into()?;
            let link_id = program.attach(cgroup, CgroupAttachMode::Single)?;
            program.take_link(link_id)?.try_into()?
        }
        _ => {
            let program: &mut CgroupSockAddr = program_of(ebpf, name)?.try_into()?;
            let link_id = program.attach(cgroup, CgroupAttachMode::Single)?;
            program.take_link(link_id)?.try_into()?
        }
    };
    link.pin(pin)?;
    Ok(())
}

/// A socket program's file descriptor and tag (loaded now if it was not).
pub(crate) fn sock_program_fd<'a>(
    ebpf: &'a mut Ebpf,
    program_def: &ProgramDef,
) -> Result<(BorrowedFd<'a>, u64)> {
    let name = program_def.name;
    let program = program_of(ebpf, name)?;
    if program.fd().is_err() {
        load_program(program, program_def)?;
    }
    let program = program_of(ebpf, name)?;
    let tag = program.info()?.tag();
    Ok((program.fd()?.as_fd(), tag))
}

fn load_program(program: &mut aya::programs::Program, program_def: &ProgramDef) -> Result<()> {
    let name = program_def.name;
    match program_def.hook {
        Hook::CgroupSockAddr(_) => {
            let program: &mut CgroupSockAddr = program.try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        Hook::CgroupSock(_) => {
            let program: &mut CgroupSock = program.try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        Hook::TcIngress | Hook::TcEgress => {
            let program: &mut SchedClassifier = program.try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        // Loaded by the command that runs it (see `sockets`).
        Hook::Iter(_) => {}
    }
    Ok(())
}

/// Loads (and so verifies) every program, before anything is attached: a
/// program this kernel's verifier rejects must not leave the others
/// attached.
///
/// Each on a thread of its own: the kernel verifies a privileged load
/// without a global lock, and verification is most of `up`'s time (the
/// two TC ingress programs, about a third each; in the emulated 6.1 guest
/// of `cargo xtask test`, 3 s each). A program missing from the object is
/// reported before anything loads; of the loads that fail, the first in
/// `programs()`'s order is reported, as when they loaded one after another.
pub(crate) fn load_all(ebpf: &mut Ebpf) -> Result<()> {
    let defs: Vec<&'static ProgramDef> = programs().collect();
    if let Some(missing) = defs.iter().find(|def| ebpf.program(def.name).is_none()) {
        bail!("the eBPF object has no program {}", missing.name);
    }
    let mut loads: Vec<(usize, &ProgramDef, &mut aya::programs::Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| {
            let index = defs.iter().position(|def| def.name == name)?;
            Some((index, defs[index], program))
        })
        .collect();
    loads.sort_by_key(|(index, _, _)| *index);
    std::thread::scope(|scope| {
        let mut threads = Vec::with_capacity(loads.len());
        for (_, def, program) in loads {
            // A thread that cannot start (a pids cgroup's limit, say) is
            // an error of `up`'s, not a panic.
            let thread = std::thread::Builder::new()
                .spawn_scoped(scope, move || load_program(program, def))
                .with_context(|| format!("loading {}: starting a thread", def.name))?;
            threads.push(thread);
        }
        // The scope joins the threads this leaves at the first error.
        threads.into_iter().try_for_each(|thread| {
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

/// Attaches `programs` to `ifname` where they are not attached yet, all or
/// nothing; the pins of what was attached.
pub(crate) fn attach_tc(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    ifname: &str,
    programs: &[ProgramDef],
) -> Result<Vec<PathBuf>> {
    let dir = instance::tc_dir(pin_dir, ifname);
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tcx = kernel::tcx_supported();
    let mut attached: Vec<PathBuf> = Vec::new();
    for program_def in programs {
        let name = program_def.name;
        let direction = match program_def.hook {
            Hook::TcEgress => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        };
        let pin = dir.join(name);
        if pin.exists() {
            continue;
        }
        let program: &mut SchedClassifier = program_of(ebpf, name)?.try_into()?;
        if program.fd().is_err() {
            program.load().with_context(|| format!("loading {name}"))?;
        }
        let result = tc_attach::attach(program, ifname, direction, &pin, tcx)
            .with_context(|| format!("attaching {name} to {ifname}"));
        if let Err(error) = result {
            // All or nothing on this interface; the error says what failed.
            for pin in attached.iter().rev() {
                detach_pin(pin).ok();
            }
            return Err(error);
        }
        attached.push(pin);
    }
    Ok(attached)
}

/// Makes sure the reply program runs on the interface towards a container.
/// The caller holds the state lock.
pub(crate) fn attach_backend(pin_dir: &Path, ifname: &str, _lock: &StateLock) -> Result<bool> {
    if instance::tc_dir(pin_dir, ifname)
        .join(BACKEND_PROGRAMS[0].name)
        .exists()
    {
        return Ok(false);
    }
    let mut ebpf = object::load(pin_dir, object::Sizes::default())?;
    Ok(!attach_tc(&mut ebpf, pin_dir, ifname, &BACKEND_PROGRAMS)?.is_empty())
}

/// Attaches the uplink programs to `ifname` (`portfwd attach`); false if
/// they were already there. The caller holds the state lock.
pub(crate) fn attach_uplink(pin_dir: &Path, ifname: &str, _lock: &StateLock) -> Result<bool> {
    let mut ebpf = object::load(pin_dir, object::Sizes::default())?;
    Ok(!attach_tc(&mut ebpf, pin_dir, ifname, &UPLINK_PROGRAMS)?.is_empty())
}

/// Whether the uplink programs are attached to `ifname`.
pub(crate) fn is_uplink(pin_dir: &Path, ifname: &str) -> bool {
    instance::tc_dir(pin_dir, ifname)
        .join(UPLINK_PROGRAMS[0].name)
        .exists()
}

/// Detaches every TC program from `ifname` (`portfwd detach`); the number
/// of programs detached. The caller holds the state lock.
pub(crate) fn detach_interface(pin_dir: &Path, ifname: &str, _lock: &StateLock) -> Result<usize> {
    let dir = instance::tc_dir(pin_dir, ifname);
    if !dir.exists() {
        return Ok(0);
    }
    unpin_links_in(&dir)
}

/// The interfaces with TC programs, and which programs.
pub(crate) fn tc_attachments(pin_dir: &Path) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(instance::links_dir(pin_dir).join("tc")) else {
        return out;
    };
    for entry in entries.flatten() {
        let ifname = entry.file_name().to_string_lossy().into_owned();
        let mut programs: Vec<String> = fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|p| p.file_name().to_string_lossy().into_owned())
            .collect();
        programs.sort();
        out.push((ifname, programs));
    }
    out.sort();
    out
}

/// Unpins (and so detaches) every attachment pinned in `dir`, then removes
/// it.
pub(crate) fn unpin_links_in(dir: &Path) -> Result<usize> {
    let mut detached = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() && !tc_attach::is_netlink(&path) {
            detached += unpin_links_in(&path)?;
            continue;
        }
        detach_pin(&path)?;
        detached += 1;
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(detached)
}

/// Detaches one pinned attachment: a link (unpinning it drops its last
/// reference) or a netlink TC filter.
pub(crate) fn detach_pin(pin: &Path) -> Result<()> {
    if tc_attach::is_netlink(pin) {
        return tc_attach::detach_netlink(pin);
    }
    let link = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    drop(
        link.unpin()
            .with_context(|| format!("unpinning {}", pin.display()))?,
    );
    Ok(())
}

pub(crate) fn program_of<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))
}

/// Points the pinned link at `new` if the program it runs is another one
/// (an upgrade) or `force`: one atomic BPF_LINK_UPDATE, so packets and
/// connections flow on. True if replaced.
pub(crate) fn replace_program(
    new: BorrowedFd<'_>,
    new_tag: u64,
    pin: &Path,
    force: bool,
) -> Result<bool> {
    let link = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let link: FdLink = link.into();
    let running = link.info()?.program_id();
    // aya 0.14 opens a program by id only inside this iterator (its
    // by-id lookup is private): one pass over the host's programs, once
    // per pinned link at `up`.
    let running_tag = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == running)
        .map(|p| p.tag());
    if !force && running_tag == Some(new_tag) {
        return Ok(false);
    }
    let link_fd = bpf_obj_get(pin)?;
    bpf_link_update(link_fd.as_fd(), new)
        .with_context(|| format!("replacing the program of {}", pin.display()))?;
    Ok(true)
}

fn bpf_obj_get(pin: &Path) -> Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
    }
    // Zeroed as a whole: the kernel rejects nonzero bytes past the fields it
    // knows, and the struct's tail padding is among them.
    // SAFETY: all-zero bytes are a valid ObjGet.
    let mut attr: ObjGet = unsafe { std::mem::zeroed() };
    attr.pathname = path.as_ptr() as u64;
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: attr is a valid bpf_attr prefix for this command, of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr, size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening {}", pin.display()));
    }
    // SAFETY: the kernel returned a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The interface a pinned TCX link is attached to: Some(index), Some(0)
/// once that interface is gone (the kernel severs the link, which then
/// attaches nothing), None when the pin is not a TCX link.
pub(crate) fn tcx_link_ifindex(pin: &Path) -> Result<Option<u32>> {
    let link = bpf_obj_get(pin)?;
    // struct bpf_link_info: type, id, prog_id, then (8-byte aligned) the
    // union whose `tcx` member starts with the ifindex. aya 0.14's LinkInfo
    // does not expose it. The buffer is larger than the kernel's struct and
    // zeroed: the kernel accepts a longer buffer whose tail is zero.
    let mut info = [0u32; 64];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    // SAFETY: attr is a valid bpf_attr prefix for this command, of the size
    // passed; the kernel writes at most info_len bytes to `info`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr,
            size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the link pinned at {}", pin.display()));
    }
    // Offsets 0 (type) and 16 (tcx.ifindex), in 32-bit words.
    let (link_type, ifindex) = (info[0], info[4]);
    Ok((link_type == BPF_LINK_TYPE_TCX).then_some(ifindex))
}

fn bpf_link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    // union bpf_attr for BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // SAFETY: attr is a valid bpf_attr prefix for this command, of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr,
            size_of::<LinkUpdate>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
