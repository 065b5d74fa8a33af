//! cgroup sock_addr programs: a host process that connects to a published
//! `hostIP:hostPort` is connected straight to the container endpoint, so the
//! kernel never sees a packet to the published address and there is no
//! per-packet cost. getpeername then reports the address that was dialed.
//!
//! UDP is translated per datagram: sendmsg rewrites an unconnected send to a
//! published port, and recvmsg rewrites the replies' source back to the
//! address the application sent to.
//!
//! What a connected socket was translated from is kept in the slot of
//! `SOCK_CONNECTED` that its cookie selects, and freed by `release` when
//! the socket closes: one array write per connect. A socket whose slot
//! another socket holds (their cookies share the low 16 bits), and every
//! unconnected UDP socket, keeps it in the socket's own storage
//! (`SOCK_DIALED`) instead, freed by the kernel with the socket; creating
//! that storage costs two kernel allocations (about 0.8 µs, three times
//! the rest of the connect). A map keyed by socket would fill with closed
//! sockets and push out live ones; neither of these can. recvmsg and
//! getpeername of a socket whose peer's port no mapping leads to
//! (`BACKEND_PORTS`) cost one array read; of other namespaces' sockets,
//! that and the netns check; only a host socket talking to such a port
//! pays for its cookie, its slot and its storage lookup.
//!
//! Only sockets of the host network namespace are translated: the programs
//! sit on the cgroup v2 root, which also holds every container's processes,
//! and a container's own `127.0.0.1:PORT` must stay its own. A container
//! that dials the host's published address goes through the TC path
//! (hairpin), like any client outside the host.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockContext},
};
use portfwd_common::{
    Addr, DialedSlot, FAMILY_V4, FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP, SERVICE_FLAG_HAS_ALLOWLIST,
    SERVICE_FLAG_HOST_ALLOWED, SOCK_DIALED_SLOTS, ServiceKey, SockConnected, Stat,
    TRACE_PATH_CONNECT, TRACE_PATH_SENDMSG,
};

use crate::{
    maps::{
        BACKEND_PORTS, CONFIG, PUBLISHED_PORTS, SERVICES, SOCK_CONNECTED, SOCK_DIALED, STATS,
        is_host_address, lacks_port,
    },
    trace,
};

/// sock_addr programs return 1 to let the syscall proceed, 0 to fail it
/// with EPERM: portfwd refuses only a host process that dials a mapping
/// whose source allowlist lacks `host`.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

/// `::ffff:0:0/96`, the prefix of IPv4-mapped IPv6 addresses, in network order.
const V4_MAPPED_WORD2: u32 = 0x0000_ffffu32.to_be();

pub(crate) fn connect4(ctx: SockAddrContext) -> i32 {
    if in_host_netns(&ctx) {
        return translate4(&ctx, Call::Connect);
    }
    PROCEED
}

pub(crate) fn connect6(ctx: SockAddrContext) -> i32 {
    if in_host_netns(&ctx) {
        return translate6(&ctx, Call::Connect);
    }
    PROCEED
}

pub(crate) fn sendmsg4(ctx: SockAddrContext) -> i32 {
    // Only UDP reaches this hook with a destination address.
    if in_host_netns(&ctx) {
        return translate4(&ctx, Call::SendMsg);
    }
    PROCEED
}

pub(crate) fn sendmsg6(ctx: SockAddrContext) -> i32 {
    if in_host_netns(&ctx) {
        return translate6(&ctx, Call::SendMsg);
    }
    PROCEED
}

// recvmsg and getpeername: most peers' ports are no mapping's container
// port (a container's server runs getpeername in every accept(), with a
// client's port), and leave after one array read, before the netns
// check's helper call. Only host sockets are ever translated, and a host
// socket that was never translated holds no slot and has no storage.

pub(crate) fn recvmsg4(ctx: SockAddrContext) -> i32 {
    if may_be_translated(&ctx) {
        restore_peer4(&ctx);
    }
    PROCEED
}

pub(crate) fn recvmsg6(ctx: SockAddrContext) -> i32 {
    if may_be_translated(&ctx) {
        restore_peer6(&ctx);
    }
    PROCEED
}

pub(crate) fn getpeername4(ctx: SockAddrContext) -> i32 {
    if may_be_translated(&ctx) {
        restore_peer4(&ctx);
    }
    PROCEED
}

pub(crate) fn getpeername6(ctx: SockAddrContext) -> i32 {
    if may_be_translated(&ctx) {
        restore_peer6(&ctx);
    }
    PROCEED
}

/// Whether the socket's peer (recvmsg: the datagram's source) may be a
/// container endpoint a host socket was translated to: its port has a bit
/// in `BACKEND_PORTS` and the socket is the host's.
fn may_be_translated(ctx: &SockAddrContext) -> bool {
    // SAFETY: context field reads, checked by the verifier.
    let (protocol, port) = unsafe { ((*ctx.sock_addr).protocol, (*ctx.sock_addr).user_port) };
    !lacks_port(&BACKEND_PORTS, protocol as u8, u16::from_be(port as u16)) && in_host_netns(ctx)
}

/// A socket closes: the `SOCK_CONNECTED` slot it holds, if any, is free
/// again. Runs for every TCP and UDP socket of the cgroup, in every
/// namespace: only the host's sockets can hold a slot (`connect` translates
/// only theirs, and a socket never changes namespace), so the others leave
/// after the namespace check, without the socket cookie and the read of a
/// slot that is cold in cache; a host socket holding none pays both.
pub(crate) fn release(ctx: SockContext) -> i32 {
    // SAFETY: the helper only reads the context's socket.
    if !is_host_netns(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }) {
        return PROCEED;
    }
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(entry) = SOCK_CONNECTED.get_ptr_mut(SockConnected::index_of(cookie))
        && owner_of(entry) == cookie
    {
        // No stale record for whoever takes the slot next.
        // SAFETY: the slot is this socket's until the addition below.
        unsafe { (*entry).slot.family = 0 };
        add_to_owner(entry, cookie.wrapping_neg());
    }
    PROCEED
}

/// A container endpoint, copied out of the services map.
struct Backend {
    addr: Addr,
    port: u16,
    family: u8,
    /// `SERVICE_FLAG_*`.
    flags: u8,
}

impl Backend {
    /// The host's own processes may not use this mapping: it has a source
    /// allowlist without `host`.
    fn refuses_host(&self) -> bool {
        self.flags & (SERVICE_FLAG_HAS_ALLOWLIST | SERVICE_FLAG_HOST_ALLOWED)
            == SERVICE_FLAG_HAS_ALLOWLIST
    }
}

fn in_host_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper only reads the context's socket.
    is_host_netns(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
}

/// Whether `cookie` is the host namespace's (`Config`; never before `up`
/// wrote it).
fn is_host_netns(cookie: u64) -> bool {
    match CONFIG.get(0) {
        Some(config) => config.host_netns_cookie != 0 && config.host_netns_cookie == cookie,
        None => false,
    }
}

/// TCP or UDP, as the service key spells it; None for other sockets.
fn socket_protocol(sa: *mut bpf_sock_addr) -> Option<u8> {
    // SAFETY: `sa` is the program's context; the verifier checks each access.
    let protocol = unsafe { (*sa).protocol };
    if protocol == IPPROTO_TCP as u32 {
        Some(IPPROTO_TCP)
    } else if protocol == IPPROTO_UDP as u32 {
        Some(IPPROTO_UDP)
    } else {
        None
    }
}

/// Exact (address, port, protocol) first; then, when the destination is one
/// of the host's own addresses, the family's wildcard mapping.
fn find_backend(key: ServiceKey) -> Option<Backend> {
    // Most connects and sends go to ports nobody published.
    if lacks_port(&PUBLISHED_PORTS, key.proto, u16::from_be(key.port)) {
        return None;
    }
    let loopback = is_loopback(key.family, &key.addr);
    // SAFETY: the value is copied out at once; the map has no preallocation,
    // so a concurrent delete cannot recycle the element under us.
    let found = unsafe { SERVICES.get(&key) }.or_else(|| {
        let local = loopback || is_host_address(key.family, &key.addr);
        if key.addr.is_unspecified() || !local {
            return None;
        }
        unsafe { SERVICES.get(&key.wildcard()) }
    })?;
    Some(Backend {
        addr: found.addr,
        port: found.port,
        family: found.family,
        flags: found.flags,
    })
}

fn is_loopback(family: u8, addr: &Addr) -> bool {
    if family == FAMILY_V4 {
        u32::from_be(addr.words[0]) >> 24 == 127
    } else {
        addr.words[0] == 0
            && addr.words[1] == 0
            && addr.words[2] == 0
            && addr.words[3] == 1u32.to_be()
    }
}

/// A host process refused by an allowlist: counted and traced, and the
/// syscall fails.
fn refuse(proto: u8, call: Call, key: &ServiceKey) -> i32 {
    if let Some(count) = STATS.get_ptr_mut(Stat::RefusedHostProcess.index()) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *count += 1 };
    }
    trace::socket_refused(proto, call.trace_path(), key);
    REFUSE
}

/// Which syscall a translation serves: they differ in what the kernel
/// accepts after the program, and in what the socket remembers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Connect,
    SendMsg,
}

impl Call {
    fn trace_path(self) -> u8 {
        match self {
            Call::Connect => TRACE_PATH_CONNECT,
            Call::SendMsg => TRACE_PATH_SENDMSG,
        }
    }
}

/// Rewrites an IPv4 destination (connect, or an unconnected UDP send); the
/// program's verdict.
fn translate4(ctx: &SockAddrContext, call: Call) -> i32 {
    let sa = ctx.sock_addr;
    let Some(proto) = socket_protocol(sa) else {
        return PROCEED;
    };
    // SAFETY (all context accesses below): `sa` is the program's context.
    // The verifier demands full 32-bit stores to user_ip4 and user_port.
    let (dialed_ip, dialed_port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let key = ServiceKey::new(FAMILY_V4, Addr::v4(dialed_ip), dialed_port, proto);
    let Some(backend) = find_backend(key) else {
        return PROCEED;
    };
    if backend.refuses_host() {
        return refuse(proto, call, &key);
    }
    if backend.family != FAMILY_V4 {
        // An IPv4 socket cannot reach an IPv6 container.
        return PROCEED;
    }
    unsafe {
        (*sa).user_ip4 = backend.addr.words[0];
        (*sa).user_port = backend.port as u32;
    }
    remember_dialed(
        ctx,
        call,
        DialedSlot {
            backend: backend.addr,
            dialed: key.addr,
            backend_port: backend.port,
            dialed_port,
            family: FAMILY_V4,
            _pad: [0; 3],
        },
    );
    PROCEED
}

/// Rewrites an IPv6 destination (connect, or an unconnected UDP send); the
/// program's verdict.
fn translate6(ctx: &SockAddrContext, call: Call) -> i32 {
    let sa = ctx.sock_addr;
    let Some(proto) = socket_protocol(sa) else {
        return PROCEED;
    };
    let dialed = read_user_ip6(sa);
    let dialed_port = unsafe { (*sa).user_port as u16 };
    // A dual-stack socket dialing ::ffff:a.b.c.d is an IPv4 connection.
    let key = if is_v4_mapped(&dialed) {
        ServiceKey::new(FAMILY_V4, Addr::v4(dialed.words[3]), dialed_port, proto)
    } else {
        ServiceKey::new(FAMILY_V6, dialed, dialed_port, proto)
    };
    let Some(backend) = find_backend(key) else {
        return PROCEED;
    };
    if backend.refuses_host() {
        return refuse(proto, call, &key);
    }
    let seen = if backend.family == FAMILY_V6 {
        if key.family == FAMILY_V4 {
            // An IPv4 connection cannot be turned into an IPv6 one.
            return PROCEED;
        }
        backend.addr
    } else {
        // An IPv4 container is reached from an IPv6 socket through its
        // mapped address; the kernel then connects over IPv4. (A socket with
        // IPV6_V6ONLY gets ENETUNREACH, as it would dialing the address.)
        // An unconnected UDP send cannot be turned into IPv4 this way: the
        // kernel fails it (ENOTSUPP), so it is left alone. (A send to a
        // mapped address never gets here: the kernel hands it to sendmsg4.)
        if call == Call::SendMsg {
            return PROCEED;
        }
        Addr::v6([0, 0, V4_MAPPED_WORD2, backend.addr.words[0]])
    };
    write_user_ip6(sa, &seen);
    unsafe { (*sa).user_port = backend.port as u32 };
    remember_dialed(
        ctx,
        call,
        DialedSlot {
            backend: seen,
            dialed,
            backend_port: backend.port,
            dialed_port,
            family: FAMILY_V6,
            _pad: [0; 3],
        },
    );
    PROCEED
}

fn is_v4_mapped(addr: &Addr) -> bool {
    addr.words[0] == 0 && addr.words[1] == 0 && addr.words[2] == V4_MAPPED_WORD2
}

// user_ip6 is accessed one 32-bit word at a time: that is the access size
// the verifier accepts for every kernel that has these hooks.
fn read_user_ip6(sa: *mut bpf_sock_addr) -> Addr {
    // SAFETY: context field reads, checked by the verifier.
    unsafe {
        let ip6 = &raw const (*sa).user_ip6;
        Addr::v6([
            core::ptr::read_volatile(&raw const (*ip6)[0]),
            core::ptr::read_volatile(&raw const (*ip6)[1]),
            core::ptr::read_volatile(&raw const (*ip6)[2]),
            core::ptr::read_volatile(&raw const (*ip6)[3]),
        ])
    }
}

fn write_user_ip6(sa: *mut bpf_sock_addr, addr: &Addr) {
    // SAFETY: context field writes, checked by the verifier.
    unsafe {
        let ip6 = &raw mut (*sa).user_ip6;
        core::ptr::write_volatile(&raw mut (*ip6)[0], addr.words[0]);
        core::ptr::write_volatile(&raw mut (*ip6)[1], addr.words[1]);
        core::ptr::write_volatile(&raw mut (*ip6)[2], addr.words[2]);
        core::ptr::write_volatile(&raw mut (*ip6)[3], addr.words[3]);
    }
}

/// Records the backend the socket now talks to and the address the
/// application dialed, for getpeername and recvmsg: a connected socket in
/// its `SOCK_CONNECTED` slot if it gets it, otherwise (and an unconnected
/// send always) in the socket's storage, created now if it has none.
fn remember_dialed(ctx: &SockAddrContext, call: Call, slot: DialedSlot) {
    // SAFETY: reading a context field, checked by the verifier.
    trace::socket(
        unsafe { (*ctx.sock_addr).protocol } as u8,
        call.trace_path(),
        &slot,
    );
    if call == Call::Connect && remember_connected(ctx, &slot) {
        return;
    }
    // SAFETY: the helper reads the context's socket; the storage it returns
    // (zeroed when created) belongs to this socket until the socket is freed.
    let Some(dialed) = (unsafe { SOCK_DIALED.get_or_insert_ptr_mut(ctx, None).as_mut() }) else {
        // Out of memory: getpeername and recvmsg show the container.
        return;
    };
    if call == Call::Connect {
        // A connected socket talks to one peer: whatever it sent to before
        // is forgotten.
        dialed.slots[0] = slot;
        for i in 1..SOCK_DIALED_SLOTS {
            dialed.slots[i].family = 0;
        }
        dialed.next = 1;
        return;
    }
    // An unconnected send: its backend's slot, or the oldest. Written only
    // when it changes, so that repeated sends do not bounce the cache line.
    for i in 0..SOCK_DIALED_SLOTS {
        let known = &mut dialed.slots[i];
        if known.family == slot.family
            && known.backend == slot.backend
            && known.backend_port == slot.backend_port
        {
            if known.dialed != slot.dialed || known.dialed_port != slot.dialed_port {
                known.dialed = slot.dialed;
                known.dialed_port = slot.dialed_port;
            }
            return;
        }
    }
    // Masked: the verifier needs the index bounded (a power of two).
    let oldest = dialed.next as usize & (SOCK_DIALED_SLOTS - 1);
    dialed.slots[oldest] = slot;
    dialed.next = dialed.next.wrapping_add(1);
}

/// Records a connected socket's translation in its `SOCK_CONNECTED` slot;
/// false when another socket holds the slot.
fn remember_connected(ctx: &SockAddrContext, slot: &DialedSlot) -> bool {
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = SOCK_CONNECTED.get_ptr_mut(SockConnected::index_of(cookie)) else {
        return false;
    };
    if !claim(entry, cookie) {
        return false;
    }
    // SAFETY: the slot is this socket's (`claim`) until it closes.
    unsafe { (*entry).slot = *slot };
    true
}

/// Makes the socket with `cookie` the owner of `entry`, unless another
/// socket is. The owner changes only by atomic additions (BPF has no
/// compare-and-swap before `-mcpu=v3`, which this build does not use): a
/// claimant adds its cookie to a free slot's 0 and reads the sum back; one
/// that reads anything but its own cookie met another claimant and takes
/// its addition back. A claimant wins only by reading its own cookie alone,
/// after which nobody else can, so at most one wins; two that meet may
/// both lose (both then use their storage). A claimant adds only to a slot
/// it saw free, so a held slot is disturbed only when two sockets met on
/// it as it was taken: for that instant the winner's getpeername shows the
/// container, and should the winner close within it, its slot stays held
/// (its cookie's later namesakes use their storage). A socket connecting
/// again (UDP) keeps its slot.
fn claim(entry: *mut SockConnected, cookie: u64) -> bool {
    match owner_of(entry) {
        0 => {}
        held => return held == cookie,
    }
    add_to_owner(entry, cookie);
    if owner_of(entry) == cookie {
        return true;
    }
    add_to_owner(entry, cookie.wrapping_neg());
    false
}

/// Adds `amount` to `entry`'s owner atomically.
fn add_to_owner(entry: *mut SockConnected, amount: u64) {
    // SAFETY: as `owner_of`; the owner is changed only by such additions
    // (and is read by volatile loads). The result is unused, so the addition
    // compiles to BPF_XADD, which every kernel accepts (one that returns
    // the old value needs `-mcpu=v3`).
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).owner, amount);
    }
}

/// The record in the `SOCK_CONNECTED` slot of the socket with `cookie`, if
/// that socket holds the slot (getpeername, recvmsg, the UDP iterator).
#[inline(always)]
pub(crate) fn connected_record(cookie: u64) -> Option<&'static DialedSlot> {
    let entry = SOCK_CONNECTED.get_ptr_mut(SockConnected::index_of(cookie))?;
    if owner_of(entry) != cookie {
        return None;
    }
    // SAFETY: a value of an array map, never freed; this socket's until it
    // closes.
    Some(unsafe { &(*entry).slot })
}

/// `entry`'s owner, read once. A volatile read rather than an atomic load,
/// which the BPF backend cannot select; an aligned 8-byte load is single
/// on every architecture.
fn owner_of(entry: *mut SockConnected) -> u64 {
    // SAFETY: `entry` is a value of an array map: never freed, 8-byte
    // aligned.
    unsafe { core::ptr::read_volatile(&raw const (*entry).owner) }
}

/// The address the application dialed to reach `peer` (family, address,
/// port as the socket sees them), if the socket was translated to it.
/// Inlined: as a call its five arguments and returned value exceed the
/// five registers a BPF call has.
#[inline(always)]
fn dialed_for(ctx: &SockAddrContext, family: u8, peer: &Addr, port: u16) -> Option<(Addr, u16)> {
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(slot) = connected_record(cookie)
        && slot.family == family
        && slot.backend_port == port
        && slot.backend == *peer
    {
        return Some((slot.dialed, slot.dialed_port));
    }
    // SAFETY: a lookup without creation; see `remember_dialed`.
    let dialed = unsafe { SOCK_DIALED.get_ptr_mut(ctx).as_ref() }?;
    for i in 0..SOCK_DIALED_SLOTS {
        let slot = &dialed.slots[i];
        if slot.family == family && slot.backend_port == port && slot.backend == *peer {
            return Some((slot.dialed, slot.dialed_port));
        }
    }
    None
}

fn restore_peer4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let (peer, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    if let Some((dialed, dialed_port)) = dialed_for(ctx, FAMILY_V4, &Addr::v4(peer), port) {
        unsafe {
            (*sa).user_ip4 = dialed.words[0];
            (*sa).user_port = dialed_port as u32;
        }
    }
}

fn restore_peer6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let peer = read_user_ip6(sa);
    let port = unsafe { (*sa).user_port as u16 };
    if let Some((dialed, dialed_port)) = dialed_for(ctx, FAMILY_V6, &peer, port) {
        write_user_ip6(sa, &dialed);
        unsafe { (*sa).user_port = dialed_port as u32 };
        return;
    }
    // A datagram of a dual-stack socket to ::ffff:a.b.c.d was translated by
    // sendmsg4, which the kernel runs for it: its slot is an IPv4 one.
    if is_v4_mapped(&peer) {
        let v4 = Addr::v4(peer.words[3]);
        if let Some((dialed, dialed_port)) = dialed_for(ctx, FAMILY_V4, &v4, port) {
            write_user_ip6(sa, &Addr::v6([0, 0, V4_MAPPED_WORD2, dialed.words[0]]));
            unsafe { (*sa).user_port = dialed_port as u32 };
        }
    }
}
