//! How the holder follows the host: an rtnetlink subscription to link,
//! address and route changes, and when, after a burst of them, it
//! refreshes the local addresses map and re-attaches recreated interfaces.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use nix::{
    poll::PollTimeout,
    sys::socket::{AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket},
};

use crate::{
    datapath::{self, PinnedMaps, StateLock},
    host,
};

/// When the holder refreshes the local addresses and follows the host's
/// links: after a burst of host changes has settled, and again after a
/// failed attempt.
pub(super) struct HostFollowing {
    addresses_stale: bool,
    links_due: Option<Instant>,
    last_follow: Instant,
    burst_started: Option<Instant>,
}

impl HostFollowing {
    pub(super) fn new() -> Self {
        Self {
            addresses_stale: true,
            // At start too: interfaces may have been recreated while no holder ran.
            links_due: Some(Instant::now()),
            last_follow: Instant::now(),
            burst_started: None,
        }
    }

    /// Does what is due now.
    pub(super) fn catch_up(&mut self, pin_dir: &Path) {
        if self.addresses_stale {
            self.addresses_stale = !refresh_local_addresses(pin_dir);
        }
        if self.links_due.is_some_and(|due| Instant::now() >= due) {
            let followed = follow_host(pin_dir);
            if followed {
                self.last_follow = Instant::now();
                self.burst_started = None;
            }
            self.links_due = (!followed).then(|| Instant::now() + RETRY);
        }
    }

    /// Wake up when links are due to be followed, and every second to retry
    /// a deferred address refresh.
    pub(super) fn poll_timeout(&self) -> PollTimeout {
        let wait = self.links_due.map_or(Duration::from_secs(1), |due| {
            due.saturating_duration_since(Instant::now())
        });
        PollTimeout::try_from(wait.min(Duration::from_secs(1))).unwrap_or(PollTimeout::ZERO)
    }

    /// The host's links, addresses or routes changed (`links_changed`: an
    /// interface was added or removed).
    pub(super) fn host_changed(&mut self, links_changed: bool) {
        self.addresses_stale = true;
        // A burst of changes (a veth created, addressed, set up, its routes
        // added) is followed once, when it has settled. An interface added or
        // removed is followed at once (then); a host whose addresses or
        // routes never settle (a routing daemon) at most once every MIN_GAP.
        let now = Instant::now();
        let began = *self.burst_started.get_or_insert(now);
        let settled = now + SETTLE;
        let due = if links_changed {
            settled
        } else {
            settled.max(self.last_follow + MIN_GAP)
        };
        // A burst that never settles is followed MIN_GAP after it began.
        self.links_due = Some(due.min(began + MIN_GAP));
    }
}

/// An rtnetlink socket that becomes readable when an interface, an address
/// or a route is added, changed or removed anywhere on the host.
pub(super) fn host_events() -> Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )?;
    let groups = (libc::RTMGRP_LINK
        | libc::RTMGRP_IPV4_IFADDR
        | libc::RTMGRP_IPV6_IFADDR
        | libc::RTMGRP_IPV4_ROUTE
        | libc::RTMGRP_IPV6_ROUTE
        // Queueing disciplines and filters, and IPv4 forwarding per
        // interface: each decides whether packets to a container's veth go
        // straight into its peer (`datapath::link_bits`).
        | libc::RTMGRP_TC
        | (1 << (libc::RTNLGRP_IPV4_NETCONF - 1)) as libc::c_int) as u32;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    Ok(fd)
}

/// How long the host must be quiet after a change before the links are
/// followed.
const SETTLE: Duration = Duration::from_millis(100);
/// The least time between two follows.
const MIN_GAP: Duration = Duration::from_secs(1);
/// How soon a follow that found the state lock busy is retried.
const RETRY: Duration = Duration::from_millis(200);

/// Re-attaches the programs of recreated interfaces and points mappings
/// and flows at their containers' interfaces (`datapath::follow_host`);
/// false when the state lock is busy (retried soon, never waited for).
fn follow_host(pin_dir: &Path) -> bool {
    let Ok(Some(lock)) = StateLock::try_acquire(pin_dir) else {
        return false;
    };
    let result = PinnedMaps::open(pin_dir, &lock).and_then(|mut maps| {
        datapath::follow_host(pin_dir, &lock, &mut maps, datapath::Follow::Everything)
    });
    match result {
        Ok(fixes) => {
            for note in fixes.links.notes() {
                eprintln!("portfwd hold: {note}");
            }
            if !fixes.moved.is_empty() || fixes.flows > 0 {
                eprintln!(
                    "portfwd hold: {} mapping(s) and {} flow(s) follow their container's new interface",
                    fixes.moved.len(),
                    fixes.flows
                );
            }
        }
        Err(error) => eprintln!("portfwd hold: following the host's interfaces: {error:#}"),
    }
    true
}

/// Reads and discards pending notifications (bounded): only "something
/// changed" matters, the addresses and routes are then read afresh.
/// Returns whether an interface was added or removed (RTM_NEWLINK or
/// RTM_DELLINK), read from the messages' headers.
pub(super) fn drain(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 8192];
    let mut links = false;
    for _ in 0..64 {
        let len = nix::unistd::read(fd.as_raw_fd(), &mut buf).unwrap_or(0);
        if len == 0 {
            break;
        }
        links |= has_link_message(&buf[..len]);
    }
    links
}

/// Whether a datagram of rtnetlink messages holds an RTM_NEWLINK or
/// RTM_DELLINK (struct nlmsghdr: length u32, type u16, ...).
fn has_link_message(mut datagram: &[u8]) -> bool {
    while datagram.len() >= 16 {
        let length = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]);
        let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
        if kind == libc::RTM_NEWLINK || kind == libc::RTM_DELLINK {
            return true;
        }
        let next = (length as usize).next_multiple_of(4);
        if next < 16 || next > datagram.len() {
            break;
        }
        datagram = &datagram[next..];
    }
    false
}

/// Writes the host's current addresses to the local addresses map; false
/// when the state lock is busy (retried a second later, never waited for:
/// the CLI may hold it while it waits for this process).
fn refresh_local_addresses(pin_dir: &Path) -> bool {
    let Ok(Some(lock)) = StateLock::try_acquire(pin_dir) else {
        return false;
    };
    let result = PinnedMaps::open(pin_dir, &lock)
        .and_then(|mut maps| maps.sync_local_addrs(&host::local_addresses()?));
    if let Err(error) = result {
        eprintln!("portfwd hold: refreshing local addresses: {error:#}");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_messages_are_told_from_the_others() {
        let header = |kind: u16, len: u32| {
            let mut message = vec![0u8; len as usize];
            message[..4].copy_from_slice(&len.to_ne_bytes());
            message[4..6].copy_from_slice(&kind.to_ne_bytes());
            message
        };
        let address = header(libc::RTM_NEWADDR, 20);
        let route = header(libc::RTM_NEWROUTE, 16);
        assert!(!has_link_message(
            &[address.clone(), route.clone()].concat()
        ));
        let link = header(libc::RTM_DELLINK, 32);
        assert!(has_link_message(&[address.clone(), route, link].concat()));
        // A length that runs past the datagram ends the walk.
        let mut broken = header(libc::RTM_NEWADDR, 4096);
        broken.extend(header(libc::RTM_NEWLINK, 16));
        assert!(!has_link_message(&broken[..40]));
        assert!(!has_link_message(&address[..8]));
    }
}
