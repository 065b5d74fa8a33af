//! BIG TCP on an uplink: a NIC's GRO, on a host that raised
//! `gro_ipv4_max_size`, hands the TC programs TCP packets over 64 KiB
//! (IPv4 total length 0), the client's FIN on the last of them. A veth
//! cannot bring one in: a GSO packet that a packet socket sends is marked
//! untrusted (`SKB_GSO_DODGY`), which veth does not take, so the stack cuts
//! it into segments first. The client here is the test itself, behind a
//! tap uplink: a frame written to the tap with a virtio-net header is
//! received by the host whole, as GRO would hand it. Needs root
//! (`cargo xtask test`). Topology, created and removed by the test:
//!
//! ```text
//! the test (10.252.N.2, a permanent neighbour entry) --tap pftbNt (10.252.N.1, TC programs)
//! host pftcNh --veth-- container ns pft-ctrN (TCP server)
//! ```

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    sync::Arc,
    time::{Duration, Instant},
};

use etherparse::{IpNumber, Ipv4Header, TcpHeader, TcpOptionElement};

use crate::{
    hostile::{checksum, ethernet, parse_mac, tcp_flow_entries},
    support::*,
};

const ETH_P_IP: u16 = 0x0800;
const TCP: u8 = 6;
/// `_IOW('T', 202, int)`, which the libc crate does not define.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// virtio-net header: checksum to be completed, GSO type TCPv4.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
/// The client's MSS, as GRO keeps it for the aggregate.
const MSS: u16 = 1448;
/// The client's packets before the BIG one, to grow the container's
/// window: at most this many, of at most this many bytes.
const WARM_UP_ROUNDS: usize = 32;
const WARM_UP_CHUNK: u32 = 16_000;

/// A tap device whose other end is this test: what it writes is received
/// by the host on the tap, what the host sends there it reads. Deleted
/// when dropped (the device lives as long as its file).
struct Tap {
    file: File,
    name: String,
    mac: [u8; 6],
}

impl Tap {
    fn create(name: &str) -> Self {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .expect("opening /dev/net/tun");
        // SAFETY: all-zero is a valid ifreq.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes the ifreq passed.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        let mac =
            parse_mac(&std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap());
        Tap {
            file,
            name: name.to_string(),
            mac,
        }
    }

    /// Hands `frame` to the host as received on the tap, after a
    /// virtio-net header (`gso`: that of a GSO packet, else none).
    fn receive(&self, gso: Option<VirtioNetHdr>, frame: &[u8]) {
        let header = gso.unwrap_or_default().to_bytes();
        let written = (&self.file)
            .write(&[&header[..], frame].concat())
            .expect("writing to the tap");
        assert_eq!(
            written,
            header.len() + frame.len(),
            "short write to the tap"
        );
    }

    /// The first frame the host sends on the tap within `limit` that
    /// `wanted` picks (it returns Some), skipping the others.
    fn sent<T>(&self, limit: Duration, mut wanted: impl FnMut(&[u8]) -> Option<T>) -> Option<T> {
        let start = Instant::now();
        let mut buf = vec![0u8; 70_000];
        while start.elapsed() < limit {
            match (&self.file).read(&mut buf) {
                Ok(n) if n > VIRTIO_NET_HDR_LEN => {
                    if let Some(found) = wanted(&buf[VIRTIO_NET_HDR_LEN..n]) {
                        return Some(found);
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        None
    }
}

const VIRTIO_NET_HDR_LEN: usize = 10;

/// `struct virtio_net_hdr`, in the host's byte order (a tap without
/// `TUNSETVNETLE` on a little-endian host).
#[derive(Default, Clone, Copy)]
struct VirtioNetHdr {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl VirtioNetHdr {
    fn to_bytes(self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut bytes = [0u8; VIRTIO_NET_HDR_LEN];
        bytes[0] = self.flags;
        bytes[1] = self.gso_type;
        for (i, value) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        ]
        .into_iter()
        .enumerate()
        {
            bytes[2 + 2 * i..4 + 2 * i].copy_from_slice(&value.to_ne_bytes());
        }
        bytes
    }
}

/// The client's half of one TCP connection, written frame by frame.
struct Client {
    mac: [u8; 6],
    addr: Ipv4Addr,
    port: u16,
    /// The host's MAC on the tap, its address there and the published port.
    host_mac: [u8; 6],
    host: Ipv4Addr,
    published: u16,
}

/// What the host sent the client: a TCP segment's numbers, flags, window
/// and data.
struct Segment {
    seq: u32,
    ack: u32,
    syn: bool,
    fin: bool,
    /// The window field as sent: unscaled on a SYN-ACK, else to be
    /// shifted by the sender's window scale.
    window: u16,
    /// The window scale option's shift, on a SYN-ACK that has one.
    window_scale: Option<u8>,
    payload: Vec<u8>,
}

impl Client {
    /// The IPv4 packet of `tcp` and `payload` to the published port; its
    /// total length 0 when it is over 64 KiB (BIG TCP).
    fn frame(&self, tcp: &TcpHeader, payload: &[u8], id: u16) -> Vec<u8> {
        let mut ip =
            Ipv4Header::new(0, 64, IpNumber(TCP), self.addr.octets(), self.host.octets()).unwrap();
        ip.identification = id;
        ip.dont_fragment = true;
        let segment_len = tcp.header_len() + payload.len();
        let mut header = ip.to_bytes().to_vec();
        let total = IPV4_HLEN + segment_len;
        let total_field = u16::try_from(total).unwrap_or(0);
        header[2..4].copy_from_slice(&total_field.to_be_bytes());
        header[10..12].fill(0);
        let sum = checksum(&header);
        header[10..12].copy_from_slice(&sum.to_be_bytes());
        [&header[..], &tcp.to_bytes()[..], payload].concat()
    }

    fn tcp(&self, seq: u32, ack: Option<u32>) -> TcpHeader {
        let mut tcp = TcpHeader::new(self.port, self.published, seq, 64_000);
        if let Some(ack) = ack {
            tcp.ack = true;
            tcp.acknowledgment_number = ack;
        }
        tcp
    }

    /// A frame of `tcp` and `payload` with both checksums complete.
    fn whole(&self, mut tcp: TcpHeader, payload: &[u8], id: u16) -> Vec<u8> {
        tcp.checksum = tcp
            .calc_checksum_ipv4_raw(self.addr.octets(), self.host.octets(), payload)
            .unwrap();
        ethernet(
            self.host_mac,
            self.mac,
            ETH_P_IP,
            &self.frame(&tcp, payload, id),
        )
    }

    /// A GSO frame of `tcp` and `payload` as GRO leaves it: the TCP
    /// checksum field holds the pseudo header's sum, for the device to
    /// complete (CHECKSUM_PARTIAL), and the virtio-net header that says so
    /// and gives the segment size. Over 64 KiB, it is a BIG TCP packet
    /// (IPv4 total length 0).
    fn gso(&self, mut tcp: TcpHeader, payload: &[u8], id: u16) -> (VirtioNetHdr, Vec<u8>) {
        let segment_len = (tcp.header_len() + payload.len()) as u32;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&self.addr.octets());
        pseudo.extend_from_slice(&self.host.octets());
        pseudo.extend_from_slice(&[0, TCP]);
        pseudo.extend_from_slice(&segment_len.to_be_bytes());
        // The folded sum, not its complement: `checksum` complements.
        tcp.checksum = !checksum(&pseudo);
        let gso = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: (ETH_HLEN + IPV4_HLEN + tcp.header_len()) as u16,
            gso_size: MSS,
            csum_start: (ETH_HLEN + IPV4_HLEN) as u16,
            csum_offset: 16,
        };
        let frame = ethernet(
            self.host_mac,
            self.mac,
            ETH_P_IP,
            &self.frame(&tcp, payload, id),
        );
        (gso, frame)
    }

    /// The TCP segment in `frame` if it is the host's to this client.
    fn segment_to_me(&self, frame: &[u8]) -> Option<Segment> {
        let ip = frame.get(ETH_HLEN..)?;
        if u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP
            || ip.len() < IPV4_HLEN
            || ip[9] != TCP
            || ip[12..16] != self.host.octets()
            || ip[16..20] != self.addr.octets()
        {
            return None;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let (tcp, rest) = TcpHeader::from_slice(ip.get(ihl..total)?).ok()?;
        (tcp.source_port == self.published && tcp.destination_port == self.port).then(|| Segment {
            seq: tcp.sequence_number,
            ack: tcp.acknowledgment_number,
            syn: tcp.syn,
            fin: tcp.fin,
            window: tcp.window_size,
            window_scale: tcp.options_iterator().find_map(|option| match option {
                Ok(TcpOptionElement::WindowScale(shift)) => Some(shift),
                _ => None,
            }),
            payload: rest.to_vec(),
        })
    }
}

/// A client's FIN on a BIG TCP packet (80,000 bytes of data) closes its
/// side: the flow then ends at its last ACK. Before, the FIN was judged
/// after the client's mark had moved to the packet's end, and a FIN whose
/// segment starts more than 64 KiB before its end did not fit there: the
/// flow was left open, its entries waiting out the established timeout.
#[test]
fn a_fin_on_a_big_tcp_packet_closes_its_side() {
    use portfwd_common::{CT_FLAG_FIN, CT_FLAG_REPLY};
    let Some(_serial) = root_test("fin_on_big_tcp") else {
        return;
    };
    let index = 53u8;
    let (published, server_port, client_port) = (62367u16, 5305u16, 40_367u16);
    const DATA_LEN: usize = 80_000;
    let ctr = Container::new(index);
    // Room for the BIG TCP packet in the server's receive buffer from the
    // start (the listener's sockets take the default when created), so
    // that its window can grow past the packet (below).
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &ctr.netns,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_rmem=4096 1048576 4194304",
        ],
    );
    let _server = ctr.serve_with(
        &format!("[::]:{server_port}"),
        Arc::new(|mut stream: TcpStream, _| {
            let mut request = Vec::new();
            if stream.read_to_end(&mut request).is_ok() {
                let _ = stream.write_all(format!("{}", request.len()).as_bytes());
            }
        }),
    );
    let tap = Tap::create(&format!("pftb{index}t"));
    let host: Ipv4Addr = format!("10.252.{index}.1").parse().unwrap();
    let client = Client {
        mac: [0x02, 0, 0, 0xfb, index, 2],
        addr: format!("10.252.{index}.2").parse().unwrap(),
        port: client_port,
        host_mac: tap.mac,
        host,
        published,
    };
    sh(
        "ip",
        &["addr", "add", &format!("{host}/24"), "dev", &tap.name],
    );
    sh("ip", &["link", "set", &tap.name, "up"]);
    let mac = client
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    sh(
        "ip",
        &[
            "neigh",
            "replace",
            &client.addr.to_string(),
            "lladdr",
            &mac,
            "dev",
            &tap.name,
            "nud",
            "permanent",
        ],
    );
    let _pf = Portfwd::up(&["--iface", &tap.name]);
    portfwd_ok(&[
        "map",
        "--name",
        "big-tcp",
        &ctr.v4().to_string(),
        &format!("{published}:{server_port}"),
    ]);

    let isn = 0x1000_0000u32;
    let mut syn = client.tcp(isn, None);
    syn.syn = true;
    syn.set_options(&[
        TcpOptionElement::MaximumSegmentSize(MSS),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ])
    .unwrap();
    tap.receive(None, &client.whole(syn, &[], 1));
    let syn_ack = tap
        .sent(TIMEOUT, |frame| {
            client
                .segment_to_me(frame)
                .filter(|s| s.syn && s.ack == isn + 1)
        })
        .expect("the container's SYN-ACK on the tap");
    let server_next = syn_ack.seq.wrapping_add(1);
    tap.receive(
        None,
        &client.whole(client.tcp(isn + 1, Some(server_next)), &[], 2),
    );

    // A new connection's window is 64 KiB at most, smaller than a BIG TCP
    // packet, and it grows only as data arrives. So the client first sends
    // what the window takes, as a real sender does, until the window takes
    // the BIG packet and its FIN. (Sent at once, the packet's end was
    // beyond the window whenever the container was slow to acknowledge,
    // as on a loaded machine, and the container dropped that part: CI
    // failed so once.)
    let scale = syn_ack
        .window_scale
        .expect("window scaling in the container's SYN-ACK");
    let mut window = u32::from(syn_ack.window);
    let mut next = isn + 1;
    let mut id = 3;
    let mut warm_up = 0usize;
    for _ in 0..WARM_UP_ROUNDS {
        if window > DATA_LEN as u32 {
            break;
        }
        if window > 0 {
            let chunk = vec![b'w'; window.min(WARM_UP_CHUNK) as usize];
            let (gso, frame) = client.gso(client.tcp(next, Some(server_next)), &chunk, id);
            tap.receive(Some(gso), &frame);
            (next, id, warm_up) = (next + chunk.len() as u32, id + 1, warm_up + chunk.len());
        }
        // All of it acknowledged, with room for more (a window of 0 waits
        // for the server to read).
        let acknowledged = tap
            .sent(TIMEOUT, |frame| {
                client
                    .segment_to_me(frame)
                    .filter(|s| s.ack == next && s.window > 0)
            })
            .expect("the container's acknowledgement of the data so far");
        window = u32::from(acknowledged.window) << scale;
    }
    assert!(
        window > DATA_LEN as u32,
        "the container's window grew to {window} bytes only"
    );

    let payload: Vec<u8> = (0..DATA_LEN).map(|i| b'a' + (i % 26) as u8).collect();
    let mut data = client.tcp(next, Some(server_next));
    (data.psh, data.fin) = (true, true);
    let (gso, frame) = client.gso(data, &payload, id);
    assert!(
        frame.len() - ETH_HLEN > usize::from(u16::MAX),
        "a BIG TCP packet"
    );
    // The mapping's inbound packets and bytes, to tell that the programs
    // saw the packet whole (one packet of all its bytes), not cut into
    // segments on the way in.
    let inbound = || {
        let row = listed()
            .into_iter()
            .find(|row| row["name"] == "big-tcp")
            .expect("the mapping's row");
        (
            row["packets_in"].as_u64().unwrap(),
            row["bytes_in"].as_u64().unwrap(),
        )
    };
    let (packets, bytes) = inbound();
    tap.receive(Some(gso), &frame);
    let fin_end = next + DATA_LEN as u32 + 1;
    // The container acknowledges the data and the FIN, and answers.
    let answer = tap
        .sent(TIMEOUT, |frame| {
            client
                .segment_to_me(frame)
                .filter(|s| s.ack == fin_end && !s.payload.is_empty())
        })
        .expect("the container's answer after the data and the FIN");
    assert_eq!(answer.payload, (warm_up + DATA_LEN).to_string().as_bytes());
    let (packets_after, bytes_after) = inbound();
    assert_eq!(
        (
            packets_after - packets,
            bytes_after - bytes >= DATA_LEN as u64
        ),
        (1, true),
        "the programs saw one packet of {} bytes",
        bytes_after - bytes
    );

    let side_closed = |reply: bool| {
        tcp_flow_entries(client_port).iter().any(|entry| {
            (entry.flags & CT_FLAG_REPLY != 0) == reply && entry.flags & CT_FLAG_FIN != 0
        })
    };
    assert!(
        side_closed(false),
        "the client's FIN, on a packet of {} bytes, closed its side",
        frame.len()
    );
    // The container's FIN, then the client's ACK of it: the flow's last
    // packet, which ends it.
    let container_fin = if answer.fin {
        answer
    } else {
        tap.sent(TIMEOUT, |frame| {
            client.segment_to_me(frame).filter(|s| s.fin)
        })
        .expect("the container's FIN")
    };
    let container_end = container_fin
        .seq
        .wrapping_add(container_fin.payload.len() as u32 + 1);
    assert!(
        wait_until(Duration::from_secs(2), || side_closed(true)),
        "the container's FIN closed its side"
    );
    tap.receive(
        None,
        &client.whole(client.tcp(fin_end, Some(container_end)), &[], id + 1),
    );
    assert!(
        wait_until(Duration::from_secs(2), || tcp_flow_entries(client_port)
            .is_empty()),
        "the flow ended at its last ACK: {} entries left",
        tcp_flow_entries(client_port).len()
    );
}
