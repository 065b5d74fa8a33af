//! The kernel's socket diagnostics (NETLINK_SOCK_DIAG), for the calling
//! process's network namespace: a dump of the TCP or UDP sockets of one
//! family, and `SOCK_DESTROY` of one socket (`CONFIG_INET_DIAG_DESTROY`;
//! TCP since Linux 4.5, UDP later, both before 5.10). The destroyed
//! socket's owner sees ECONNABORTED; a TCP peer gets a reset.
//!
//! (sock_diag can also report a socket's BPF storage, but the kernel does
//! so for TCP sockets only: `inet_sk_diag_fill` leaves before it for
//! sockets without a connection-oriented part, UDP's.)
//!
//! Hand-written because the two messages are small and fixed.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

// include/uapi/linux/sock_diag.h and inet_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;

const NLMSG_HDRLEN: usize = 16;
/// struct inet_diag_sockid: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// struct inet_diag_req_v2.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// struct inet_diag_msg.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// The TCP state ESTABLISHED (include/net/tcp_states.h), which a UDP socket
/// has once connected.
pub(crate) const TCP_ESTABLISHED: u8 = 1;

/// One socket of a dump.
#[derive(Debug, Clone)]
pub(crate) struct InetSocket {
    pub(crate) family: u8,
    pub(crate) protocol: u8,
    pub(crate) state: u8,
    /// Where the socket is connected to, as the socket sees it (an IPv6
    /// socket connected over IPv4 shows `::ffff:a.b.c.d`).
    pub(crate) peer: IpAddr,
    pub(crate) peer_port: u16,
    /// The address and port the socket is bound to.
    pub(crate) local: IpAddr,
    pub(crate) local_port: u16,
    /// The kernel's socket cookie (what `bpf_get_socket_cookie` returns).
    pub(crate) cookie: u64,
    /// The raw `inet_diag_sockid` (with the cookie), to name the socket to
    /// `SOCK_DESTROY`.
    sockid: [u8; SOCKID_LEN],
}

#[cfg(test)]
impl InetSocket {
    /// A connected socket as a dump would show it.
    pub(crate) fn connected(protocol: u8, peer: std::net::SocketAddr, cookie: u64) -> Self {
        let family = if peer.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        } as u8;
        InetSocket {
            family,
            protocol,
            state: TCP_ESTABLISHED,
            peer: peer.ip(),
            peer_port: peer.port(),
            local: peer.ip(),
            local_port: 0,
            cookie,
            sockid: [0; SOCKID_LEN],
        }
    }
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: the buffer is valid for its length; the kernel is the peer
    // (a zeroed sockaddr_nl).
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn receive(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap())
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message: header and `body`.
fn message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    out.extend_from_slice(body);
    out
}

fn request(family: u8, protocol: u8, states: u32, sockid: &[u8; SOCKID_LEN]) -> [u8; REQ_LEN] {
    let mut req = [0u8; REQ_LEN];
    req[0] = family;
    req[1] = protocol;
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    req[8..].copy_from_slice(sockid);
    req
}

/// The `protocol` sockets of `family` (`AF_INET`/`AF_INET6`) in this
/// network namespace whose state is one of `states` (a bit per TCP state).
pub(crate) fn dump(family: u8, protocol: u8, states: u32) -> io::Result<Vec<InetSocket>> {
    let fd = netlink_socket()?;
    let req = request(family, protocol, states, &[0; SOCKID_LEN]);
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    send(&fd, &message(SOCK_DIAG_BY_FAMILY, flags, &req))?;

    let mut sockets = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = receive(&fd, &mut buf)?;
        let mut at = 0;
        while at + NLMSG_HDRLEN <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if len < NLMSG_HDRLEN || at + len > n {
                return Err(io::Error::other("truncated sock_diag message"));
            }
            let body = &buf[at + NLMSG_HDRLEN..at + len];
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(sockets),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let errno = i32::from_ne_bytes(body[..4].try_into().unwrap());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
                    sockets.push(parse_socket(protocol, body));
                }
                _ => {}
            }
            at += align4(len);
        }
    }
}

fn parse_socket(protocol: u8, body: &[u8]) -> InetSocket {
    let family = body[0];
    let state = body[1];
    let sockid: [u8; SOCKID_LEN] = body[4..4 + SOCKID_LEN].try_into().unwrap();
    // sockid: sport, dport (network order), src[16], dst[16], if, cookie.
    let local_port = u16::from_be_bytes([sockid[0], sockid[1]]);
    let peer_port = u16::from_be_bytes([sockid[2], sockid[3]]);
    let address = |bytes: &[u8]| {
        let bytes: [u8; 16] = bytes.try_into().unwrap_or_default();
        if i32::from(family) == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
    };
    let local = address(&sockid[4..20]);
    let peer = address(&sockid[20..36]);
    let cookie = u64::from(u32_at(&sockid, 40)) | (u64::from(u32_at(&sockid, 44)) << 32);
    InetSocket {
        family,
        protocol,
        state,
        peer,
        peer_port,
        local,
        local_port,
        cookie,
        sockid,
    }
}

/// Ends `socket` (`SOCK_DESTROY`): its owner's next call fails with
/// ECONNABORTED. EOPNOTSUPP: a kernel without `CONFIG_INET_DIAG_DESTROY`;
/// ENOENT: the socket is already gone.
pub(crate) fn destroy(socket: &InetSocket) -> io::Result<()> {
    let fd = netlink_socket()?;
    let req = request(socket.family, socket.protocol, u32::MAX, &socket.sockid);
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    send(&fd, &message(SOCK_DESTROY, flags, &req))?;
    let mut buf = [0u8; 512];
    let n = receive(&fd, &mut buf)?;
    if n >= NLMSG_HDRLEN + 4 && u16_at(&buf, 4) == libc::NLMSG_ERROR as u16 {
        let errno = i32::from_ne_bytes(buf[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].try_into().unwrap());
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(-errno));
        }
    }
    Ok(())
}
