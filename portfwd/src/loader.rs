//! Loading, attaching and pinning the eBPF programs (`up`), and removing
//! every trace of them (`down`).
//!
//! Pin layout under the pin directory (default /sys/fs/bpf/portfwd):
//! - one pinned map per name in `portfwd_common::ALL_MAPS`: the state;
//! - `links/<program>`: the pinned attachment of each socket program, and
//!   `links/tc/<interface>/<program>` of each TC program. A pinned link keeps
//!   its program attached after the CLI exits; unpinning detaches it.

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
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use portfwd_common::{ALL_MAPS, Config};

use crate::{
    holder, host,
    kernel_features::{self, KernelFeatures},
    maps::{PinnedMaps, StateLock},
    netlink, state, tc_attach,
    up_rollback::UpRollback,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portfwd";

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portfwd.bpf.o"));

/// The socket programs, attached to the cgroup v2 root.
const SOCK_PROGRAMS: [&str; 8] = [
    "pf_connect4",
    "pf_connect6",
    "pf_getpeername4",
    "pf_getpeername6",
    "pf_sendmsg4",
    "pf_sendmsg6",
    "pf_recvmsg4",
    "pf_recvmsg6",
];

/// A TC program and the direction it attaches to.
type TcProgram = (&'static str, TcAttachType);

/// On uplinks: DNAT of new external flows, reverse NAT of routed replies.
const UPLINK_PROGRAMS: [TcProgram; 2] = [
    ("pf_tc_uplink_in", TcAttachType::Ingress),
    ("pf_tc_uplink_out", TcAttachType::Egress),
];

/// On the interface towards the containers: reverse NAT of their replies.
const BACKEND_PROGRAMS: [TcProgram; 1] = [("pf_tc_backend_in", TcAttachType::Ingress)];

#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    pub pin_dir: PathBuf,
    pub cgroup: Option<PathBuf>,
    /// Replace attached programs even when they are this build's already.
    pub reload: bool,
    /// Capacities of maps created now (existing maps keep theirs).
    pub max_mappings: Option<u32>,
    pub max_flows: Option<u32>,
    /// Uplinks for the TC programs (external traffic).
    pub ifaces: Vec<String>,
}

/// What `up` did.
#[derive(Debug, Default)]
pub struct UpReport {
    pub cgroup: PathBuf,
    pub attached: Vec<&'static str>,
    pub already_attached: Vec<&'static str>,
    /// Uplinks the TC programs were attached to now, and those that had them.
    pub uplinks_attached: Vec<String>,
    pub uplinks_already: Vec<String>,
    pub mappings: usize,
    /// Published ports that another process holds.
    pub busy_ports: Vec<String>,
    /// Attached programs replaced by this build's (an upgrade, or --reload).
    pub replaced: Vec<String>,
    /// What the state file made `up` change in the maps.
    pub fixes: state::Fixes,
    /// Whether the state file was created from the maps (first `up` of a
    /// portfwd that records state).
    pub adopted: bool,
    /// Notes for the user (sizes that could not change, ...).
    pub notes: Vec<String>,
    /// What the kernel offers, as probed by this `up`.
    pub kernel: Option<KernelFeatures>,
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn tc_dir(pin_dir: &Path, ifname: &str) -> PathBuf {
    links_dir(pin_dir).join("tc").join(ifname)
}

/// Loads and attaches whatever is not attached yet, reusing pinned maps, so
/// that a second `up` keeps every mapping. A failed `up` leaves the
/// instance as it found it: the kernel is probed and the interfaces checked
/// before anything is created, every program is loaded (verified) before
/// any is attached, and what this `up` attached or pinned is undone if a
/// later step fails.
pub fn up(options: &UpOptions) -> Result<UpReport> {
    host::require_capabilities("up", host::LOAD)?;
    let cgroup = match &options.cgroup {
        Some(path) => path.clone(),
        None => host::cgroup2_mount()?,
    };
    let mut notes = Vec::new();
    let uplinks = if options.ifaces.is_empty() {
        // Default-route interfaces without Ethernet framing (wireguard,
        // tun) cannot carry the TC programs: left out, and said.
        let (ethernet, other): (Vec<String>, Vec<String>) = netlink::default_route_interfaces()?
            .into_iter()
            .partition(|ifname| is_ethernet(ifname));
        for ifname in other {
            notes.push(format!(
                "{ifname} (a default route) is not an Ethernet device: external traffic through it is not forwarded"
            ));
        }
        ethernet
    } else {
        options.ifaces.clone()
    };
    // Uplinks (named or found) are checked before anything is attached.
    for ifname in &uplinks {
        check_uplink(ifname)?;
    }
    let kernel = kernel_features::probe()?;
    host::ensure_bpffs(&options.pin_dir)?;
    let mut rollback = UpRollback::new(&options.pin_dir);
    let mut report = up_attached(options, cgroup, &uplinks, &mut rollback)?;
    report.notes.extend(notes);
    kernel_features::record(&options.pin_dir, &kernel)?;
    report.kernel = Some(kernel);
    rollback.disarm();
    // Hold every published port (after a reboot: the restored ones too).
    report.busy_ports = holder::sync(&options.pin_dir)?;
    Ok(report)
}

/// The part of `up` that creates things, each recorded in `rollback`.
fn up_attached(
    options: &UpOptions,
    cgroup: PathBuf,
    uplinks: &[String],
    rollback: &mut UpRollback,
) -> Result<UpReport> {
    let links = links_dir(&options.pin_dir);
    // Root-only: the pins are the forwarding state of the whole host.
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&links)
        .with_context(|| format!("creating {}", links.display()))?;
    let lock = StateLock::acquire(&options.pin_dir)?;

    check_pinned_layouts(&options.pin_dir)?;
    let mut ebpf = load_object_sized(&options.pin_dir, options.max_mappings, options.max_flows)?;
    load_all(&mut ebpf)?;
    let mut report = UpReport {
        cgroup: cgroup.clone(),
        ..UpReport::default()
    };
    let cgroup_file =
        File::open(&cgroup).with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    for name in SOCK_PROGRAMS {
        let pin = links.join(name);
        if pin.exists() {
            let program: &mut CgroupSockAddr = program_of(&mut ebpf, name)?.try_into()?;
            if program.fd().is_err() {
                program.load().with_context(|| format!("loading {name}"))?;
            }
            let tag = program.info()?.tag();
            if replace_program(program.fd()?.as_fd(), tag, &pin, options.reload)? {
                report.replaced.push(name.to_owned());
            } else {
                report.already_attached.push(name);
            }
            continue;
        }
        attach_sock_program(&mut ebpf, name, &cgroup_file, &pin)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        rollback.created(pin);
        report.attached.push(name);
    }

    // TC programs already attached (uplinks, interfaces towards containers):
    // replaced by this build's where they differ.
    for (ifname, programs) in tc_attachments(&options.pin_dir) {
        for name in programs {
            let pin = tc_dir(&options.pin_dir, &ifname).join(&name);
            let program: &mut SchedClassifier = program_of(&mut ebpf, &name)?.try_into()?;
            if program.fd().is_err() {
                program.load().with_context(|| format!("loading {name}"))?;
            }
            let tag = program.info()?.tag();
            let replaced = if tc_attach::is_netlink(&pin) {
                tc_attach::replace_netlink(program, &pin, options.reload)?
            } else {
                replace_program(program.fd()?.as_fd(), tag, &pin, options.reload)?
            };
            if replaced {
                report.replaced.push(format!("{name} on {ifname}"));
            }
        }
    }
    for ifname in uplinks {
        let created = attach_tc(&mut ebpf, &options.pin_dir, ifname, &UPLINK_PROGRAMS)?;
        if !created.is_empty() {
            rollback.created_all(created);
            report.uplinks_attached.push(ifname.clone());
        } else {
            report.uplinks_already.push(ifname.clone());
        }
    }

    let mut maps = PinnedMaps::open(&options.pin_dir, &lock)?;
    maps.set_config(Config {
        host_netns_cookie: host::netns_cookie()?,
    })?;
    maps.sync_local_addrs(&host::local_addresses()?)?;
    report.notes.extend(size_notes(&options.pin_dir, options));
    restore_state(&options.pin_dir, &lock, &mut maps, &mut report)?;
    report.mappings = maps.mappings()?.len();
    Ok(report)
}

/// Loads (and so verifies) every program, before anything is attached: a
/// program this kernel's verifier rejects must not leave the others
/// attached.
fn load_all(ebpf: &mut Ebpf) -> Result<()> {
    for name in SOCK_PROGRAMS {
        let program: &mut CgroupSockAddr = program_of(ebpf, name)?.try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
    }
    for (name, _) in UPLINK_PROGRAMS.iter().chain(&BACKEND_PROGRAMS) {
        let program: &mut SchedClassifier = program_of(ebpf, name)?.try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

fn load_object(pin_dir: &Path) -> Result<Ebpf> {
    load_object_sized(pin_dir, None, None)
}

/// Loads the object, reusing the pinned maps; maps created now get the
/// given capacities.
fn load_object_sized(
    pin_dir: &Path,
    max_mappings: Option<u32>,
    max_flows: Option<u32>,
) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    if let Some(n) = max_mappings {
        loader.map_max_entries(portfwd_common::SERVICES_MAP, n);
        loader.map_max_entries(portfwd_common::COUNTERS_MAP, n);
    }
    if let Some(n) = max_flows {
        // Two conntrack entries per flow, one reverse-NAT entry per socket.
        loader.map_max_entries(portfwd_common::CONNTRACK_MAP, n.saturating_mul(2));
        loader.map_max_entries(portfwd_common::SOCK_REVNAT_MAP, n);
    }
    let paths: Vec<(&str, PathBuf)> = ALL_MAPS
        .iter()
        .map(|&name| (name, pin_dir.join(name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(OBJECT).context(
        "loading portfwd's eBPF object (a map pinned by another portfwd version with a different layout? `portfwd down` removes it)",
    )
}

/// Attaches `programs` to `ifname` where they are not attached yet; the
/// pins of what was attached.
fn attach_tc(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    ifname: &str,
    programs: &[TcProgram],
) -> Result<Vec<PathBuf>> {
    let dir = tc_dir(pin_dir, ifname);
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tcx = kernel_features::tcx_supported();
    let mut attached: Vec<PathBuf> = Vec::new();
    for &(name, direction) in programs {
        let pin = dir.join(name);
        if pin.exists() {
            continue;
        }
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load().with_context(|| format!("loading {name}"))?;
        }
        let result = tc_attach::attach(program, ifname, direction, &pin, tcx)
            .with_context(|| format!("attaching {name} to {ifname}"));
        if let Err(error) = result {
            // All or nothing on this interface.
            for pin in attached.iter().rev() {
                let _ = detach_pin(pin);
            }
            return Err(error);
        }
        attached.push(pin);
    }
    Ok(attached)
}

/// Attaches the uplink programs to `ifname` (`portfwd attach`); false if
/// they were already there.
pub fn attach_uplink(pin_dir: &Path, ifname: &str) -> Result<bool> {
    host::require_capabilities("attach", host::LOAD)?;
    check_uplink(ifname)?;
    let _lock = StateLock::acquire(pin_dir)?;
    let mut ebpf = load_object(pin_dir)?;
    Ok(!attach_tc(&mut ebpf, pin_dir, ifname, &UPLINK_PROGRAMS)?.is_empty())
}

/// The loopback device's index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// An uplink must exist and must not be the loopback device: the host's own
/// traffic is served by the socket programs, and the TC programs drop every
/// packet with a loopback address (only forged ones reach them elsewhere).
fn check_uplink(ifname: &str) -> Result<()> {
    if netlink::ifindex(ifname)? == LOOPBACK_IFINDEX {
        bail!(
            "{ifname} is the loopback device: host processes reach published ports without an uplink; \
             name an interface that external clients come in on"
        );
    }
    if !is_ethernet(ifname) {
        bail!(
            "{ifname} is not an Ethernet device (tun, wireguard and other devices without a link-layer header \
             are not supported as uplinks: the TC programs parse Ethernet frames)"
        );
    }
    Ok(())
}

/// The interface's hardware type is ARPHRD_ETHER (veth, bridges, bonds,
/// VLANs and physical NICs; not tun or wireguard). Asked with an ioctl in
/// this process's network namespace: /sys/class/net shows the namespace
/// sysfs was mounted in, which `setns` does not change.
fn is_ethernet(ifname: &str) -> bool {
    // No crate wraps SIOCGIFHWADDR; the request is a plain `ifreq`.
    let Ok(socket) = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    // SAFETY: all-zero is a valid ifreq.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= request.ifr_name.len() {
        return false;
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: a valid socket and an ifreq the kernel fills in.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCGIFHWADDR,
            &mut request,
        )
    };
    // SAFETY: SIOCGIFHWADDR filled the hardware address member.
    rc == 0 && unsafe { request.ifr_ifru.ifru_hwaddr.sa_family } == libc::ARPHRD_ETHER
}

/// Makes sure the reply program runs on the interface towards a container.
/// The caller holds the state lock.
pub fn attach_backend(pin_dir: &Path, ifname: &str, _lock: &StateLock) -> Result<bool> {
    if tc_dir(pin_dir, ifname).join(BACKEND_PROGRAMS[0].0).exists() {
        return Ok(false);
    }
    let mut ebpf = load_object(pin_dir)?;
    Ok(!attach_tc(&mut ebpf, pin_dir, ifname, &BACKEND_PROGRAMS)?.is_empty())
}

/// Whether the uplink programs are attached to `ifname`.
pub fn is_uplink(pin_dir: &Path, ifname: &str) -> bool {
    tc_dir(pin_dir, ifname).join(UPLINK_PROGRAMS[0].0).exists()
}

/// The interfaces with TC programs, and which programs.
pub fn tc_attachments(pin_dir: &Path) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(links_dir(pin_dir).join("tc")) else {
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

/// Detaches every TC program from `ifname` (`portfwd detach`); the number
/// of programs detached.
pub fn detach_interface(pin_dir: &Path, ifname: &str) -> Result<usize> {
    host::require_capabilities("detach", host::LOAD)?;
    let _lock = StateLock::acquire(pin_dir)?;
    let dir = tc_dir(pin_dir, ifname);
    if !dir.exists() {
        return Ok(0);
    }
    unpin_links_in(&dir)
}

/// Unpins (and so detaches) every attachment pinned in `dir`, then removes it.
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

fn program_of<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))
}

/// Points the pinned link at `new` if the program it runs is another one
/// (an upgrade) or `force`: one atomic BPF_LINK_UPDATE, so packets and
/// connections flow on. True if replaced.
fn replace_program(new: BorrowedFd<'_>, new_tag: u64, pin: &Path, force: bool) -> Result<bool> {
    let link = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let link: FdLink = link.into();
    let running = link.info()?.program_id();
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

/// The key and value sizes this build uses for each pinned map.
fn expected_layouts() -> [(&'static str, usize, usize); 8] {
    use portfwd_common::*;
    [
        (
            SERVICES_MAP,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
        ),
        (LOCAL_ADDRS_MAP, size_of::<LocalAddrKey>(), 1),
        (CONFIG_MAP, 4, size_of::<Config>()),
        (
            SOCK_REVNAT_MAP,
            size_of::<SockRevNatKey>(),
            size_of::<SockRevNatValue>(),
        ),
        (CONNTRACK_MAP, size_of::<CtKey>(), size_of::<CtValue>()),
        (
            COUNTERS_MAP,
            size_of::<ServiceKey>(),
            size_of::<MappingCounters>(),
        ),
        (STATS_MAP, 4, 8),
        (
            FRAGMENTS_MAP,
            size_of::<FragmentKey>(),
            size_of::<FragmentValue>(),
        ),
    ]
}

/// Refuses to mix this build with maps pinned by a build whose layout
/// differs: their entries would be misread.
fn check_pinned_layouts(pin_dir: &Path) -> Result<()> {
    for (name, key, value) in expected_layouts() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapData::from_pin(&path)?.info()?;
        if (info.key_size() as usize, info.value_size() as usize) != (key, value) {
            bail!(
                "the pinned map {name} has another layout (key {}/value {} bytes; this portfwd uses {key}/{value}): \
                 run `portfwd down --keep-state` with the portfwd that created it, then `portfwd up` with this one \
                 (mappings come back from the state file; tracked flows restart)",
                info.key_size(),
                info.value_size()
            );
        }
    }
    Ok(())
}

/// Notes when asked-for capacities differ from those of existing maps.
fn size_notes(pin_dir: &Path, options: &UpOptions) -> Vec<String> {
    let mut notes = Vec::new();
    let asked = [
        (
            portfwd_common::SERVICES_MAP,
            options.max_mappings,
            "--max-mappings",
        ),
        (
            portfwd_common::SOCK_REVNAT_MAP,
            options.max_flows,
            "--max-flows",
        ),
    ];
    for (name, wanted, flag) in asked {
        let Some(wanted) = wanted else { continue };
        let Ok(info) = aya::maps::MapData::from_pin(pin_dir.join(name)).and_then(|m| m.info())
        else {
            continue;
        };
        if info.max_entries() != wanted {
            notes.push(format!(
                "{flag} {wanted} not applied: the existing maps hold {} (sizes apply when the maps are created: `portfwd down --keep-state`, then `up`)",
                info.max_entries()
            ));
        }
    }
    notes
}

/// Brings the maps in line with the state file (after a reboot: restores
/// every mapping), or records the maps as the state when there is none.
fn restore_state(
    pin_dir: &Path,
    lock: &StateLock,
    maps: &mut PinnedMaps,
    report: &mut UpReport,
) -> Result<()> {
    let store = state::Store::new(state::default_path(pin_dir));
    let recovered = state::recover(&store, maps)?;
    match store.load()? {
        Some(records) => {
            let mut ifindexes = std::collections::HashMap::new();
            let mut ifindex_of = |ip: std::net::IpAddr| {
                *ifindexes.entry(ip).or_insert_with(|| {
                    crate::ops::prepare_backend_path(pin_dir, ip, lock).unwrap_or(0)
                })
            };
            let mut fixes = state::reconcile(maps, &records, &mut ifindex_of)?;
            // Interfaces are recreated with new indexes (a restarted
            // container): redirect to where the container is now.
            for m in maps.mappings()? {
                let ifindex = ifindex_of(m.container.ip());
                if ifindex != m.ifindex {
                    maps.set_ifindex(&m, ifindex)?;
                }
            }
            if let Some(recovered) = recovered {
                fixes.added.extend(recovered.added);
                fixes.removed.extend(recovered.removed);
            }
            report.fixes = fixes;
        }
        None => {
            let records: Vec<state::Record> =
                maps.mappings()?.iter().map(state::Record::from).collect();
            store.save(&records)?;
            report.adopted = true;
        }
    }
    Ok(())
}

fn attach_sock_program(ebpf: &mut Ebpf, name: &str, cgroup: &File, pin: &Path) -> Result<()> {
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()?;
    // Loaded by `load_all`.
    // Single: aya's AllowMultiple passes BPF_F_ALLOW_MULTI as link flags,
    // which the kernel rejects; a link attachment coexists with other
    // programs on the cgroup anyway.
    let link_id = program.attach(cgroup, CgroupAttachMode::Single)?;
    let link: FdLink = program.take_link(link_id)?.try_into()?;
    link.pin(pin)?;
    Ok(())
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub was_up: bool,
    pub detached: usize,
    pub mappings_dropped: usize,
}

/// Detaches every program and removes every pin; the kernel frees the
/// programs and maps once nothing refers to them.
pub fn down(pin_dir: &Path, keep_state: bool) -> Result<DownReport> {
    host::require_capabilities("down", host::LOAD)?;
    if !pin_dir.exists() {
        return Ok(DownReport::default());
    }
    // Release the held ports first: once the maps are gone, nothing could
    // tell the holder which ports are published.
    holder::stop(pin_dir)?;
    let lock = StateLock::acquire(pin_dir)?;
    let mut report = DownReport {
        was_up: true,
        mappings_dropped: PinnedMaps::open(pin_dir, &lock)
            .and_then(|maps| maps.mappings())
            .map(|m| m.len())
            .unwrap_or(0),
        ..DownReport::default()
    };
    let links = links_dir(pin_dir);
    if links.exists() {
        report.detached = unpin_links_in(&links)?;
    }
    for name in ALL_MAPS {
        let path = pin_dir.join(name);
        match fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    }
    fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    // Without --keep-state, down forgets the mappings too; with it, the next
    // `up` (after a reboot, say) restores them.
    if !keep_state {
        state::Store::new(state::default_path(pin_dir)).remove()?;
    }
    kernel_features::forget(pin_dir)?;
    Ok(report)
}
