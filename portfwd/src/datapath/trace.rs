//! The reader's side of `portfwd trace`: the switch that turns the
//! programs' trace events on (`pf_trace_on`) and the ring buffer they write
//! them into (`pf_trace`). One reader at a time: a second would steal
//! events from the first, and turn tracing off under it when it ends.

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, Map, MapData, RingBuf};
use nix::{
    fcntl::{Flock, FlockArg},
    poll::{PollFd, PollFlags, PollTimeout, poll},
};
use portfwd_common::{
    Addr, CT_FLAG_NAT46, FAMILY_V4, Stat, TRACE, TRACE_FLOW_NEW, TRACE_ON, TRACE_PATH_CONNECT,
    TRACE_PATH_CONTAINERS, TRACE_PATH_EGRESS, TRACE_PATH_SENDMSG, TRACE_PATH_UPLINK, TRACE_SOCKET,
    TRACE_STAT, TraceConfig, TraceEvent,
};
use serde::Serialize;

use crate::{instance, model::Protocol};

/// What to trace.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TraceFilter {
    pub(crate) port: Option<u16>,
    pub(crate) protocol: Option<Protocol>,
    pub(crate) drops_only: bool,
}

/// Tracing, on while this lives: the programs write events, `next` reads
/// them. Dropping it turns tracing off.
pub(crate) struct Tracer {
    switch: Array<MapData, TraceConfig>,
    ring: RingBuf<MapData>,
    _only_reader: Flock<File>,
}

/// The lock a running trace holds (one reader per instance); None when
/// another process holds it.
fn reader_lock(pin_dir: &Path) -> Result<Option<Flock<File>>> {
    let lock_path = instance::run_dir().join(format!("trace{}.lock", instance::tag(pin_dir)));
    std::fs::create_dir_all(instance::run_dir())?;
    let lock_file =
        File::create(&lock_path).with_context(|| format!("opening {}", lock_path.display()))?;
    Ok(Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).ok())
}

/// Turns tracing off if no trace runs: a trace killed with SIGKILL leaves
/// the switch on, and the programs writing events nobody reads (`up`
/// calls this). Best effort: nothing to do when portfwd has no switch.
pub(crate) fn switch_off_abandoned(pin_dir: &Path) {
    let Ok(Some(_no_reader)) = reader_lock(pin_dir) else {
        return;
    };
    let Ok(data) = MapData::from_pin(pin_dir.join(TRACE_ON.name)) else {
        return;
    };
    if let Ok(mut switch) = Array::<MapData, TraceConfig>::try_from(Map::Array(data)) {
        switch.set(0, TraceConfig::default(), 0).ok();
    }
}

impl Tracer {
    pub(crate) fn start(pin_dir: &Path, filter: TraceFilter) -> Result<Self> {
        let only_reader = reader_lock(pin_dir)?
            .ok_or_else(|| anyhow!("another `portfwd trace` runs for {}", pin_dir.display()))?;
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path).map_err(|_| {
                anyhow!(
                    "portfwd is not up, or was brought up by a build without tracing (no {}): run `portfwd up`",
                    path.display()
                )
            })
        };
        let mut switch: Array<MapData, TraceConfig> =
            Array::try_from(Map::Array(open(TRACE_ON.name)?))
                .context("the trace switch map has an unexpected layout")?;
        let mut ring = RingBuf::try_from(Map::RingBuf(open(TRACE.name)?))
            .context("opening the trace ring buffer")?;
        // Events an earlier trace left unread (it was killed) are not this
        // trace's: dropped before the switch goes on (bounded: the buffer
        // holds a few thousand).
        for _ in 0..100_000 {
            if ring.next().is_none() {
                break;
            }
        }
        let config = TraceConfig {
            enabled: 1,
            port: filter.port.unwrap_or(0).to_be(),
            proto: filter.protocol.map_or(0, Protocol::number),
            drops_only: u8::from(filter.drops_only),
        };
        switch.set(0, config, 0).context("turning tracing on")?;
        Ok(Tracer {
            switch,
            ring,
            _only_reader: only_reader,
        })
    }

    /// The next event, waiting at most `timeout`.
    pub(crate) fn next(&mut self, timeout: Duration) -> Result<Option<TraceEvent>> {
        if let Some(event) = self.take() {
            return Ok(Some(event));
        }
        let fd = self.ring.as_fd();
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => bail!("waiting for trace events on fd {}: {errno}", fd.as_raw_fd()),
        }
        Ok(self.take())
    }

    fn take(&mut self) -> Option<TraceEvent> {
        let item = self.ring.next()?;
        if item.len() < size_of::<TraceEvent>() {
            return None;
        }
        // SAFETY: the programs write whole TraceEvents; read unaligned.
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceEvent>()) })
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Best effort: a later `portfwd trace` sets it again anyway.
        self.switch.set(0, TraceConfig::default(), 0).ok();
    }
}

/// An event as `portfwd trace` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Traced {
    /// `flow_new`, `socket` (a host socket pointed at the container), or
    /// the name of the stat (`dropped_loopback`, ...).
    pub(crate) event: &'static str,
    /// `uplink`, `containers` (hairpin), `egress`, `tc`, or for sockets
    /// `connect` or `sendmsg`.
    pub(crate) path: &'static str,
    /// The socket path's events: the process whose socket it is.
    pub(crate) pid: Option<u32>,
    pub(crate) ifindex: u32,
    pub(crate) protocol: Option<Protocol>,
    /// The packet as it arrived.
    pub(crate) source: Option<SocketAddr>,
    pub(crate) destination: Option<SocketAddr>,
    /// A new flow: where it now goes, and (hairpin) the source the container
    /// sees.
    pub(crate) translated_to: Option<SocketAddr>,
    pub(crate) masqueraded_as: Option<SocketAddr>,
    /// Kernel monotonic time.
    #[serde(skip)]
    pub(crate) time_ns: u64,
}

impl Traced {
    pub(crate) fn from_event(e: &TraceEvent) -> Self {
        let at_family = |addr: &Addr, port: u16, family: u8| {
            addr.to_ip(family)
                .map(|ip| SocketAddr::new(ip, u16::from_be(port)))
        };
        let at = |addr: &Addr, port: u16| at_family(addr, port, e.family);
        // A NAT46 flow's container side is IPv4.
        let nat46 = e.kind == TRACE_FLOW_NEW && e.stat & u32::from(CT_FLAG_NAT46) != 0;
        let container_family = if nat46 { FAMILY_V4 } else { e.family };
        let translated = e.kind == TRACE_FLOW_NEW || e.kind == TRACE_SOCKET;
        // The socket programs' events: a translated socket, or a refused
        // connect or send.
        let socket = matches!(e.path, TRACE_PATH_CONNECT | TRACE_PATH_SENDMSG);
        let event = match e.kind {
            TRACE_FLOW_NEW => "flow_new",
            TRACE_SOCKET => "socket",
            TRACE_STAT => Stat::ALL
                .get(e.stat as usize)
                .map_or("unknown", |stat| stat.name()),
            _ => "unknown",
        };
        let path = match e.path {
            TRACE_PATH_UPLINK => "uplink",
            TRACE_PATH_CONTAINERS => "containers",
            TRACE_PATH_EGRESS => "egress",
            TRACE_PATH_CONNECT => "connect",
            TRACE_PATH_SENDMSG => "sendmsg",
            _ => "tc",
        };
        Traced {
            event,
            path,
            ifindex: e.ifindex,
            pid: socket.then_some(e.pid),
            protocol: Protocol::from_number(e.proto),
            // A socket's own address is not known yet at connect().
            source: (!socket).then(|| at(&e.saddr, e.sport)).flatten(),
            destination: at(&e.daddr, e.dport),
            translated_to: translated
                .then(|| at_family(&e.nat_addr, e.nat_port, container_family))
                .flatten(),
            masqueraded_as: (translated && !e.masq_addr.is_unspecified())
                .then(|| at_family(&e.masq_addr, e.masq_port, container_family))
                .flatten(),
            time_ns: e.time_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use portfwd_common::FAMILY_V4;

    use super::*;

    #[test]
    fn events_decode() {
        let v4 = |a: [u8; 4]| Addr::v4(u32::from_ne_bytes(a));
        let mut e = TraceEvent {
            saddr: v4([192, 0, 2, 7]),
            daddr: v4([10, 0, 0, 1]),
            nat_addr: v4([10, 88, 0, 5]),
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
            nat_port: 80u16.to_be(),
            kind: TRACE_FLOW_NEW,
            family: FAMILY_V4,
            proto: 6,
            path: TRACE_PATH_UPLINK,
            ..TraceEvent::default()
        };
        let t = Traced::from_event(&e);
        assert_eq!(t.event, "flow_new");
        assert_eq!(t.path, "uplink");
        assert_eq!(t.source, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(t.translated_to, Some("10.88.0.5:80".parse().unwrap()));
        assert_eq!(t.masqueraded_as, None);
        e.kind = TRACE_STAT;
        e.stat = Stat::DroppedLoopback.index();
        let t = Traced::from_event(&e);
        assert_eq!((t.event, t.translated_to), ("dropped_loopback", None));
        // A host process refused by an allowlist: the process, no source.
        e.path = TRACE_PATH_CONNECT;
        e.stat = Stat::RefusedHostProcess.index();
        e.pid = 4242;
        let t = Traced::from_event(&e);
        assert_eq!(
            (t.event, t.pid, t.source, t.translated_to),
            ("refused_host_not_allowed", Some(4242), None, None)
        );
    }
}
