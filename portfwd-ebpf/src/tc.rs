//! TC programs: clients outside the host namespace reaching a published
//! port.
//!
//! - `uplink_in` (uplink ingress): a new TCP (SYN) or UDP flow to a
//!   published (address, port, protocol) gets its destination rewritten to
//!   the container and is tracked; later packets of tracked flows follow
//!   their entry. Rewritten packets are redirected straight to the
//!   container's interface when it is known, skipping the host's forwarding
//!   path (so `ip_forward` may be off).
//! - `backend_in` (ingress of the interface towards the containers):
//!   replies of tracked flows get their source rewritten back to the
//!   published address and are redirected to the interface the flow came in
//!   on. It also serves containers that dial a published address of the
//!   host (hairpin): like an external flow, but masqueraded to the dialed
//!   host address, so that the container answering replies through the
//!   host even when the client shares its link (a bridge) or is itself.
//! - `uplink_out` (uplink egress): the reverse translation for replies
//!   that reached the uplink through the host's routing instead. Replies
//!   that an ingress program translated and redirected carry
//!   `TRANSLATED_MARK`, and leave at once.
//!
//! Packets that are not ours go on untouched (TC_ACT_UNSPEC: the next
//! program or the stack decides), and every kind of untouched packet that
//! could have been ours is counted in the stats map.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
        TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    programs::TcContext,
};
use portfwd_common::{
    ALLOW_SERVICE_BITS, Addr, CT_FLAG_CLOSING, CT_FLAG_HOST, CT_FLAG_MASQ, CT_FLAG_NAT46,
    CT_FLAG_REPLY, CtKey, CtValue, FAMILY_V4, FRAGMENT_FLAG_REPLY, IPPROTO_TCP, IPPROTO_UDP,
    LocalAddrKey, SERVICE_FLAG_HAS_ALLOWLIST, SERVICE_FLAG_REFUSE_SILENTLY, ServiceKey, Stat,
    TRACE_PATH_CONTAINERS, TRACE_PATH_TC, TRACE_PATH_UPLINK, TRANSLATED_MARK,
};

use crate::{
    conntrack::{self, Nat},
    fragments, icmp,
    maps::{ALLOW, COUNTERS, LOCAL_ADDRS, SCRATCH, SERVICES, SERVICES_GEN},
    nat46,
    packet::{self, End, FIRST_FRAGMENT, LATER_FRAGMENT, Packet, TCP_ACK, TCP_SYN},
    reply, trace,
    verdict::{count, deliver, mark_translated},
};

/// Not ours: let the next TC program (or the stack) have it.
const NEXT: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;
const PACKET_HOST: u32 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Frames up to this size are not checked against the MTU of the interface
/// they are redirected to: no IP link has a smaller one in practice (576 is
/// IPv4's minimum datagram every host accepts, plus Ethernet).
const TOO_BIG_CHECKED_FROM: u32 = 576 + 14;

pub(crate) fn uplink_in(ctx: TcContext) -> i32 {
    ingress(&ctx, false)
}

pub(crate) fn backend_in(ctx: TcContext) -> i32 {
    ingress(&ctx, true)
}

pub(crate) fn uplink_out(ctx: TcContext) -> i32 {
    routed_reply(&ctx)
}

/// Packets entering the host: tracked flows in either direction, and new
/// flows to published ports (masqueraded when they come from containers).
#[inline(always)]
fn ingress(ctx: &TcContext, from_containers: bool) -> i32 {
    // Frames not addressed to this host's MAC (promiscuous mode) are not ours.
    // SAFETY: reading a context field, checked by the verifier.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return NEXT;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return NEXT;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let (pkt, key) = unsafe { (&mut (*scratch).pkt, &mut (*scratch).flow_key) };
    let path = if from_containers {
        TRACE_PATH_CONTAINERS
    } else {
        TRACE_PATH_UPLINK
    };
    if let Err(verdict) = parse_or_count(ctx, pkt, path) {
        return verdict;
    }
    if pkt.fragment == LATER_FRAGMENT {
        let untracked = if from_containers {
            Stat::PassFragmentFromContainers
        } else {
            Stat::PassFragment
        };
        return translate_fragment(ctx, pkt, Some(untracked), true);
    }
    conntrack::set_key(key, pkt);
    if let Some((entry, now)) = conntrack::find(key) {
        pkt.now = now;
        // A reply to what the host itself sent from a published port (see
        // `routed_reply`): the host's, not a new flow.
        // SAFETY: a pointer into the map value, valid for this program run.
        if unsafe { (*entry).flags } & CT_FLAG_HOST != 0 {
            conntrack::touch(key, entry, pkt, now);
            return NEXT;
        }
        // A flow that lost its other entry (evicted, or expired alone) is
        // forgotten and started again by this packet.
        if conntrack::orphaned(key, entry, is_new_tcp(pkt), now) {
            return answer_refused(ctx, pkt, path, start_flow(ctx, pkt, from_containers));
        }
        // SAFETY: a pointer into the map value, valid for this program run.
        let (flags, ifindex) = unsafe { ((*entry).flags, (*entry).ifindex) };
        // Larger than the interface it goes to: answered, as the
        // forwarding path would (only large packets pay the check).
        if ifindex != 0
            && pkt.len > TOO_BIG_CHECKED_FROM
            && let Some(verdict) = reply::too_big(ctx, pkt, path, ifindex)
        {
            return verdict;
        }
        if flags & CT_FLAG_REPLY != 0 {
            return translate_reply(ctx, pkt, key, entry, true);
        }
        // A SYN on a closing flow is the client reusing its port: a new flow.
        if !(is_new_tcp(pkt) && flags & CT_FLAG_CLOSING != 0) {
            return translate_forward(ctx, pkt, key, entry);
        }
        forget_closing_flow(key, entry);
    }
    answer_refused(ctx, pkt, path, start_flow(ctx, pkt, from_containers))
}

/// `start_flow`'s verdict, or for a client the allowlist refuses with an
/// answer, the answer (built here, not in `start_flow`'s deep frame).
#[inline(always)]
fn answer_refused(ctx: &TcContext, pkt: &Packet, path: u8, verdict: i32) -> i32 {
    if verdict == reply::ANSWER {
        return reply::refuse(ctx, pkt, path);
    }
    verdict
}

/// A closing flow whose client opens it again: both entries are removed
/// before the new flow is made. The new flow's reply key differs from the
/// old one when it goes to another container or gets another port; left
/// behind, the old reply entry would translate the old container's late
/// packets into the new connection, and its own end (a changed mapping)
/// would remove the new flow's forward entry, its twin by key.
// Not inlined: its locals stay out of the program's frame.
#[inline(never)]
fn forget_closing_flow(key: &CtKey, entry: *mut CtValue) {
    // SAFETY: a pointer into the map value, valid for this program run; not
    // used after the removal.
    conntrack::remove(key, unsafe { &*entry });
}

/// Uplink egress: replies that reached the uplink through the host's
/// routing rather than a redirect.
fn routed_reply(ctx: &TcContext) -> i32 {
    // Translated at ingress and redirected here: nothing left to do. The
    // mark was ours (set on a packet that had none): cleared.
    // SAFETY: reading a context field, checked by the verifier.
    if unsafe { (*ctx.skb.skb).mark } == TRANSLATED_MARK {
        ctx.set_mark(0);
        return NEXT;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return NEXT;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let (pkt, key) = unsafe { (&mut (*scratch).pkt, &mut (*scratch).flow_key) };
    if packet::parse(ctx, pkt).is_err() {
        return NEXT;
    }
    if pkt.fragment == LATER_FRAGMENT {
        // Egress sees all the host's traffic: untracked fragments are not
        // counted here.
        return translate_fragment(ctx, pkt, None, false);
    }
    conntrack::set_key(key, pkt);
    match conntrack::find(key) {
        // SAFETY: a pointer into the map value, valid for this program run.
        Some((entry, now)) if unsafe { (*entry).flags } & CT_FLAG_REPLY != 0 => {
            pkt.now = now;
            translate_reply(ctx, pkt, key, entry, false)
        }
        Some(_) => NEXT,
        // A UDP datagram the host sends from a published port: a container
        // masqueraded by the host's own NAT, which kept its source port (the
        // kernel's automatic ports may be published ones). Its replies will
        // come to that port and must reach the host's NAT, not the mapping.
        // (TCP needs nothing: only a SYN opens a flow, and a reply is none.)
        None if pkt.proto == IPPROTO_UDP && publishes(pkt.family, &pkt.saddr, pkt.sport) => {
            conntrack::pass_replies_to(pkt, conntrack::now());
            NEXT
        }
        None => NEXT,
    }
}

/// Whether UDP `addr:port` is published, by an exact or a wildcard mapping.
#[inline(never)]
fn publishes(family: u8, addr: &Addr, port: u16) -> bool {
    let exact = ServiceKey::new(family, *addr, port, IPPROTO_UDP);
    // SAFETY: only the presence of the values is read.
    unsafe { SERVICES.get(&exact).is_some() || SERVICES.get(&exact.wildcard()).is_some() }
}

/// Parses into `pkt`; for a packet that is not ours, the verdict: passed
/// untouched and counted, or dropped when it carries a loopback address.
/// An ICMP error about a translated flow is translated (`icmp`).
fn parse_or_count(ctx: &TcContext, pkt: &mut Packet, path: u8) -> Result<(), i32> {
    packet::parse(ctx, pkt).map_err(|reason| {
        if reason == Stat::PassNotTcpUdp
            && let Some(verdict) = icmp::translate_error(ctx)
        {
            return verdict;
        }
        count(reason);
        if reason == Stat::DroppedLoopback {
            trace::stat(ctx, pkt, path, reason);
            DROP
        } else {
            NEXT
        }
    })
}

/// Counts a packet that could have been ours and tells `portfwd trace`.
// Not inlined: its locals stay out of `start_flow`'s frame.
#[inline(never)]
fn note(ctx: &TcContext, pkt: &Packet, masquerade: bool, stat: Stat) {
    count(stat);
    let path = if masquerade {
        TRACE_PATH_CONTAINERS
    } else {
        TRACE_PATH_UPLINK
    };
    trace::stat(ctx, pkt, path, stat);
}

fn is_new_tcp(pkt: &Packet) -> bool {
    pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A packet that matches no tracked flow: a new flow if it opens one to a
/// published port.
// Not inlined (nor are the other steps): each BPF function gets its own
// stack frame, and one frame holding every step's locals exceeds 512 bytes.
#[inline(never)]
fn start_flow(ctx: &TcContext, pkt: &Packet, masquerade: bool) -> i32 {
    let opens = pkt.proto != IPPROTO_TCP || is_new_tcp(pkt);
    // From containers, an untracked TCP packet that opens nothing is a reply
    // on a socket-path connection: out at once, without a service lookup.
    if masquerade && !opens {
        return NEXT;
    }
    // Read before the mapping is: a removal after the lookup then comes
    // with a newer generation, and the flow looks its mapping up again.
    let generation = services_generation();
    let Some((service, backend)) = find_service(ctx, pkt) else {
        return NEXT;
    };
    // From an uplink, a source that is one of the host's own addresses is
    // forged: its reply entry could capture the host's own connections.
    if !masquerade && is_host_address(pkt.family, &pkt.saddr) {
        note(ctx, pkt, masquerade, Stat::DroppedLocalSource);
        return DROP;
    }
    // Only a SYN opens a TCP flow. Anything else to a published port is a
    // flow conntrack lost (evicted or expired): counted, and left to the
    // host, which resets it.
    if !opens {
        note(ctx, pkt, masquerade, Stat::UntrackedMidflow);
        return NEXT;
    }
    match refused(ctx, pkt, masquerade, &service, &backend) {
        Refusal::Allowed => {}
        Refusal::Dropped => return DROP,
        Refusal::Answer => return reply::ANSWER,
    }
    // Between families, only IPv6 clients of IPv4 containers (`nat46`).
    let nat46 = backend.family != pkt.family;
    if nat46 {
        let verdict = nat46::start(pkt, &service);
        if verdict != nat46::TRANSLATE {
            return verdict;
        }
    }
    // The source the container will see: for a hairpin flow the dialed host
    // address, else the client itself; with a port that no other flow to
    // this container uses from that address, so that the reply keys never
    // clash. An external client keeps its own port unless another flow to
    // the same container (through another published port) has it: then it
    // gets another, as netfilter's NAT clash resolution does.
    // A NAT46 flow, the host's IPv4 address towards the container.
    let now = conntrack::now();
    let masq_addr = match (nat46, masquerade) {
        (true, _) => match nat46::source() {
            Some(source) => source,
            None => return NEXT,
        },
        (false, true) => &pkt.daddr,
        (false, false) => &pkt.saddr,
    };
    let Some(port) = masquerade_port(ctx, pkt, &backend, masq_addr) else {
        note(ctx, pkt, masquerade, Stat::RewriteFailed);
        return NEXT;
    };
    let masq = (masquerade || nat46 || port != pkt.sport).then_some((*masq_addr, port));
    let nat = Nat {
        backend: backend.addr,
        backend_family: backend.family,
        backend_port: backend.port,
        backend_ifindex: backend.ifindex,
        // SAFETY: reading a context field, checked by the verifier.
        client_ifindex: unsafe { (*ctx.skb.skb).ifindex },
        masq,
        generation,
    };
    let Ok(forward) = conntrack::create(pkt, &service, &nat, now) else {
        // Untracked, the replies could not be translated back: do not start.
        note(ctx, pkt, masquerade, Stat::RewriteFailed);
        return NEXT;
    };
    if pkt.fragment == FIRST_FRAGMENT {
        // SAFETY: the entry just inserted, in scratch memory.
        fragments::remember(
            pkt,
            unsafe { &*forward },
            backend.ifindex,
            ifindex_of(ctx),
            now,
        );
    }
    count(Stat::FlowNew);
    // SAFETY: the entry just inserted, in scratch memory.
    trace::flow_new(ctx, pkt, masquerade, unsafe { &*forward });
    if let Some(counters) = COUNTERS.get_ptr_mut(&service) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { (*counters).connections += 1 };
    }
    add_traffic(&service, pkt.len, true);
    if nat46 {
        // SAFETY: the entry just inserted, in scratch memory.
        return finish_nat46(ctx, pkt, unsafe { &*forward }, backend.ifindex);
    }
    if let Some((addr, port)) = masq
        && !packet::rewrite(ctx, pkt, End::Source, &addr, port)
    {
        count(Stat::RewriteFailed);
        return DROP;
    }
    finish(
        ctx,
        pkt,
        End::Destination,
        &backend.addr,
        backend.port,
        backend.ifindex,
    )
}

/// A source port for a new flow seen by the container as coming from the
/// client (or, `masquerade`, from the host address the container dialed):
/// the client's own when no live flow to this container uses it from that
/// address (nor, masqueraded, a host socket), else one of a few others (a
/// bounded loop, for the verifier).
#[inline(never)]
fn masquerade_port(ctx: &TcContext, pkt: &Packet, backend: &Backend, addr: &Addr) -> Option<u16> {
    // The host's own address (hairpin, NAT46; not the client's own, kept by
    // an external flow): a host socket may hold the port. Derived here, not
    // passed: LLVM counts more than five arguments for this function.
    let host_side = addr.words != pkt.saddr.words;
    // Its own clock read (a coarse one, a few ns): the caller's `now` would
    // be a sixth argument, and a BPF function takes five at most (LLVM
    // counts this one's arguments after its own rewrites).
    let now = conntrack::now();
    // The candidate key lives in scratch memory: this call is the deepest
    // of the hairpin path, where the 512-byte stack runs out.
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU memory that only this program run uses.
    let key = unsafe { &mut (*scratch).key };
    key.saddr = backend.addr;
    key.daddr = *addr;
    key.sport = backend.port;
    key.proto = pkt.proto;
    key.family = backend.family;
    key._pad = 0;
    let mut port = u16::from_be(pkt.sport);
    for attempt in 1..=8u16 {
        key.dport = port.to_be();
        match conntrack::lookup(key, now) {
            // A hairpin or NAT46 flow's address is the host's own: a host
            // socket may already hold this port towards the container.
            None if host_side && host_socket_uses(ctx, key) => {}
            None => return Some(port.to_be()),
            // This very flow's reply entry (its forward entry expired or
            // was evicted alone): its port stays.
            // SAFETY: a pointer into the map value, valid for this run.
            Some(entry) if conntrack::is_reply_of(unsafe { &*entry }, pkt) => {
                return Some(port.to_be());
            }
            Some(_) => {}
        }
        // Another port in the ephemeral range.
        port = 32768 + port.wrapping_add(attempt.wrapping_mul(7919)) % 28232;
    }
    None
}

/// Whether a socket of the host (the namespace of the interface the packet
/// came in on) would receive the packets of `key`, a candidate reply key
/// (container -> host address and port): a connection between the same
/// ends (established, opening, or in TIME_WAIT), or a socket listening or
/// bound on that address and port. Such a port must not be given to a
/// hairpin flow: its reply entry would take that socket's packets, and the
/// container would see the flow's SYN on its side of the host's connection.
/// Looked up rather than avoided by a reserved range: the host binds ports
/// anywhere, and the kernel's automatic range is a per-namespace setting.
// Not inlined, the tuple in scratch memory: one frame of its own, the
// smallest, at the bottom of the hairpin chain (program, `start_flow`,
// `masquerade_port`, this).
#[inline(never)]
fn host_socket_uses(ctx: &TcContext, key: &CtKey) -> bool {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        // Cannot happen (index 0 exists); taken, so no port goes unchecked.
        return true;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let tuple = unsafe { &mut (*scratch).sock_tuple };
    // The tuple is the packet as the host would receive it: from the
    // container (saddr, sport) to the host address (daddr, dport).
    let size = if key.family == FAMILY_V4 {
        // SAFETY: plain integers; the union's IPv4 member is written whole.
        let ipv4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        ipv4.saddr = key.saddr.words[0];
        ipv4.daddr = key.daddr.words[0];
        ipv4.sport = key.sport;
        ipv4.dport = key.dport;
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        // SAFETY: as above, the IPv6 member.
        let ipv6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        ipv6.saddr = key.saddr.words;
        ipv6.daddr = key.daddr.words;
        ipv6.sport = key.sport;
        ipv6.dport = key.dport;
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } as u32;
    // SAFETY: the tuple is valid memory of `size` bytes; a socket found is
    // released at once (the verifier insists).
    unsafe {
        let sock = if key.proto == IPPROTO_TCP {
            // skc: TIME_WAIT and request sockets count too.
            bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        };
        if sock.is_null() {
            return false;
        }
        bpf_sk_release(sock.cast());
    }
    true
}

struct Backend {
    addr: Addr,
    port: u16,
    family: u8,
    /// `SERVICE_FLAG_*`.
    flags: u8,
    ifindex: u32,
}

#[repr(u8)]
enum Refusal {
    Allowed,
    /// Dropped silently (`--refuse drop`): counted and traced.
    Dropped,
    /// To be answered as a closed port would (`reply::refuse`).
    Answer,
}

/// Whether a new flow is refused by the mapping's source allowlist, which
/// judges the packet's source (for a hairpin flow, the container's own
/// address), and how. One lookup, only for mappings with a list.
// Not inlined, and the LPM key in scratch memory: with the key in a frame,
// either `start_flow`'s frame grows or this one, which calls `note` and the
// trace, makes the deepest chain reach the 512-byte limit.
#[inline(never)]
fn refused(
    ctx: &TcContext,
    pkt: &Packet,
    masquerade: bool,
    service: &ServiceKey,
    backend: &Backend,
) -> Refusal {
    if backend.flags & SERVICE_FLAG_HAS_ALLOWLIST == 0 {
        return Refusal::Allowed;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Refusal::Allowed;
    };
    // SAFETY: per-CPU memory that only this program run uses.
    let key = unsafe { &mut (*scratch).allow_key };
    key.prefix_len = ALLOW_SERVICE_BITS + 128;
    key.data.service = *service;
    key.data.client = pkt.saddr;
    if ALLOW.get(&*key).is_some() {
        return Refusal::Allowed;
    }
    if backend.flags & SERVICE_FLAG_REFUSE_SILENTLY == 0 {
        return Refusal::Answer;
    }
    note(ctx, pkt, masquerade, Stat::RefusedNotAllowed);
    Refusal::Dropped
}

/// The mapping for the packet's destination: exact address first, then the
/// family's wildcard when the destination is one of this host's addresses.
fn find_service(ctx: &TcContext, pkt: &Packet) -> Option<(ServiceKey, Backend)> {
    // An unspecified destination is a martian; its key would be the
    // wildcard's.
    if pkt.daddr.is_unspecified() {
        return None;
    }
    let exact = ServiceKey::new(pkt.family, pkt.daddr, pkt.dport, pkt.proto);
    // SAFETY: values are copied out at once (the map is not preallocated,
    // so a concurrent delete cannot recycle the element under us).
    if let Some(value) = unsafe { SERVICES.get(&exact) } {
        return Some((exact, backend_of(value)));
    }
    let wildcard = exact.wildcard();
    let value = unsafe { SERVICES.get(&wildcard) }?;
    if !is_local_destination(ctx, pkt) {
        return None;
    }
    Some((wildcard, backend_of(value)))
}

fn backend_of(value: &portfwd_common::ServiceValue) -> Backend {
    Backend {
        addr: value.addr,
        port: value.port,
        family: value.family,
        flags: value.flags,
        ifindex: value.ifindex,
    }
}

/// One of the host's addresses (`pf_local_addrs`, kept current by the port
/// holder; `up` and every `map` refresh it).
// Not inlined: the key stays out of `start_flow`'s frame.
#[inline(never)]
fn is_host_address(family: u8, addr: &Addr) -> bool {
    // SAFETY: the value is not read, only its presence.
    unsafe { LOCAL_ADDRS.get(&LocalAddrKey::new(family, *addr)) }.is_some()
}

/// Whether the destination is this host: the kernel's FIB does not forward
/// it, and it is one of the host's addresses (`pf_local_addrs`, kept
/// current by the port holder). Neither alone will do: "not forwarded" also
/// means broadcast, multicast or no route at all, and when forwarding is off
/// on the ingress interface the helper says so before it looks at the
/// route (though IPv6 may still forward through a per-interface
/// `force_forwarding`, kernel 6.17), so a packet routed through the host to
/// another machine would be taken for ours.
#[inline(never)]
fn is_local_destination(ctx: &TcContext, pkt: &Packet) -> bool {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) query.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = if pkt.family == FAMILY_V4 {
        AF_INET
    } else {
        AF_INET6
    };
    params.l4_protocol = pkt.proto;
    params.sport = pkt.sport;
    params.dport = pkt.dport;
    // SAFETY: reading a context field, checked by the verifier.
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if pkt.family == FAMILY_V4 {
        params.__bindgen_anon_3.ipv4_src = pkt.saddr.words[0];
        params.__bindgen_anon_4.ipv4_dst = pkt.daddr.words[0];
    } else {
        params.__bindgen_anon_3.ipv6_src = pkt.saddr.words;
        params.__bindgen_anon_4.ipv6_dst = pkt.daddr.words;
    }
    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // "Not forwarded" also covers broadcast, multicast and "no route": the
    // host's addresses decide in both cases.
    (rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 || rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64)
        && is_host_address(pkt.family, &pkt.daddr)
}

/// The services generation (`pf_services_gen`), truncated as flows keep it.
#[inline(always)]
fn services_generation() -> u16 {
    SERVICES_GEN
        .get(0)
        .map_or(0, |generation| *generation as u16)
}

/// The flow's mapping must still exist and still point at the same
/// container: `unmap` (or a remap) stops existing flows, not only new ones.
/// Looked up only when the services changed since the flow last checked
/// (userspace increments the generation after removing mappings).
#[inline(always)]
fn still_mapped(ct: &mut CtValue, backend: &Addr, backend_port: u16) -> bool {
    let generation = services_generation();
    if ct.generation == generation {
        return true;
    }
    // SAFETY: the value is read at once.
    let mapped = match unsafe { SERVICES.get(&ct.service) } {
        Some(value) => value.addr == *backend && value.port == backend_port,
        None => false,
    };
    if mapped {
        ct.generation = generation;
    }
    mapped
}

// The entry is used in place, not copied: the stack is limited to 512 bytes.
#[inline(never)]
fn translate_forward(ctx: &TcContext, pkt: &Packet, key: &CtKey, entry: *mut CtValue) -> i32 {
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &mut *entry };
    let (backend, backend_port) = (ct.nat_addr, ct.nat_port);
    if !still_mapped(ct, &backend, backend_port) {
        conntrack::remove(key, ct);
        count(Stat::FlowStopped);
        trace::stat(ctx, pkt, TRACE_PATH_TC, Stat::FlowStopped);
        // Untouched, the packet meets no listener on the host: the client
        // gets a reset (TCP) or an ICMP error (UDP).
        return NEXT;
    }
    let now = pkt.now;
    conntrack::touch(key, entry, pkt, now);
    if ct.flags & CT_FLAG_NAT46 != 0 {
        add_traffic(&ct.service, pkt.len, true);
        return finish_nat46(ctx, pkt, ct, ct.ifindex);
    }
    if pkt.fragment == FIRST_FRAGMENT {
        fragments::remember(pkt, ct, ct.ifindex, ifindex_of(ctx), now);
    }
    add_traffic(&ct.service, pkt.len, true);
    if ct.flags & CT_FLAG_MASQ != 0
        && !packet::rewrite(ctx, pkt, End::Source, &ct.masq_addr, ct.masq_port)
    {
        count(Stat::RewriteFailed);
        return DROP;
    }
    finish(
        ctx,
        pkt,
        End::Destination,
        &ct.nat_addr,
        ct.nat_port,
        ct.ifindex,
    )
}

#[inline(never)]
fn translate_reply(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtValue,
    redirect: bool,
) -> i32 {
    // SAFETY: a pointer into the map value, valid for this program run.
    let ct = unsafe { &mut *entry };
    if !still_mapped(ct, &pkt.saddr, pkt.sport) {
        conntrack::remove(key, ct);
        count(Stat::FlowStopped);
        // A reply of a stopped flow would reach the client from the
        // container's own address: drop it (counted above).
        return DROP;
    }
    let now = pkt.now;
    conntrack::touch(key, entry, pkt, now);
    let ifindex = if redirect { ct.ifindex } else { 0 };
    if ifindex != 0 {
        mark_translated(ctx);
    }
    if ct.flags & CT_FLAG_NAT46 != 0 {
        add_traffic(&ct.service, pkt.len, false);
        return finish_nat46(ctx, pkt, ct, ifindex);
    }
    if pkt.fragment == FIRST_FRAGMENT {
        fragments::remember(pkt, ct, ifindex, ifindex_of(ctx), now);
    }
    add_traffic(&ct.service, pkt.len, false);
    if ct.flags & CT_FLAG_MASQ != 0
        && !packet::rewrite(ctx, pkt, End::Destination, &ct.masq_addr, ct.masq_port)
    {
        count(Stat::RewriteFailed);
        return DROP;
    }
    finish(ctx, pkt, End::Source, &ct.nat_addr, ct.nat_port, ifindex)
}

/// Rewrites the packet and sends it on: redirected to `ifindex` through the
/// neighbour subsystem when known, else back to the stack.
// Inlined: a BPF-to-BPF call takes at most five arguments.
#[inline(always)]
fn finish(ctx: &TcContext, pkt: &Packet, end: End, addr: &Addr, port: u16, ifindex: u32) -> i32 {
    if !packet::rewrite(ctx, pkt, end, addr, port) {
        // A half-rewritten packet must not leave: its checksums are wrong.
        count(Stat::RewriteFailed);
        return DROP;
    }
    deliver(ifindex)
}

/// Translates a packet of a NAT46 flow to the other family and sends it
/// on (see `finish`); a packet that cannot be translated is dropped.
#[inline(always)]
fn finish_nat46(ctx: &TcContext, pkt: &Packet, ct: &CtValue, ifindex: u32) -> i32 {
    if !nat46::translate(ctx, pkt, ct) {
        return DROP;
    }
    deliver(ifindex)
}

/// A later fragment: translated like its datagram's first fragment, if that
/// was translated (see `fragments`); else passed and counted as `untracked`.
/// `redirect`: sent where the first went (ingress), or left to the stack.
#[inline(never)]
fn translate_fragment(
    ctx: &TcContext,
    pkt: &Packet,
    untracked: Option<Stat>,
    redirect: bool,
) -> i32 {
    let Some(value) = fragments::lookup(pkt, ifindex_of(ctx), conntrack::now()) else {
        if let Some(stat) = untracked {
            count(stat);
        }
        return NEXT;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let value = unsafe { &*value };
    if !packet::rewrite_addresses(ctx, pkt, &value.saddr, &value.daddr) {
        count(Stat::RewriteFailed);
        return DROP;
    }
    let reply = value.flags & FRAGMENT_FLAG_REPLY != 0;
    if reply && redirect && value.ifindex != 0 {
        mark_translated(ctx);
    }
    add_traffic(&value.service, pkt.len, !reply);
    count(if reply {
        Stat::FragmentOut
    } else {
        Stat::FragmentIn
    });
    deliver(if redirect { value.ifindex } else { 0 })
}

/// The interface the packet is on (in at ingress, out at egress).
fn ifindex_of(ctx: &TcContext) -> u32 {
    // SAFETY: reading a context field, checked by the verifier.
    unsafe { (*ctx.skb.skb).ifindex }
}

fn add_traffic(service: &ServiceKey, bytes: u32, inbound: bool) {
    if let Some(counters) = COUNTERS.get_ptr_mut(service) {
        // SAFETY: per-CPU value, only this CPU writes it.
        let counters = unsafe { &mut *counters };
        if inbound {
            counters.packets_in += 1;
            counters.bytes_in += bytes as u64;
        } else {
            counters.packets_out += 1;
            counters.bytes_out += bytes as u64;
        }
    }
}
