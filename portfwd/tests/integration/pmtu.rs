//! Path MTU discovery through a published port (issue 11, case 8): a
//! client behind a router whose link towards it has a smaller MTU than the
//! container's downloads a large response. The router answers the
//! container's full-size segments with "fragmentation needed" / "packet
//! too big" addressed to the host (they quote the host's translated
//! reply); translated back to the container, they make it send smaller
//! segments. Untranslated, the host ignores them and the download stalls.
//! Needs root (`cargo xtask test`). Topology:
//!
//! ```text
//! container ns (10.251.79.2) --veth-- host pftc79h (10.251.79.1)
//! host uplink pftr79h (10.253.79.1, TC programs) --veth-- router ns (10.253.79.2)
//! router pftf79r (10.250.79.1, MTU 1280) --veth-- client ns pftf79c (10.250.79.2, MTU 1500)
//! ```

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use crate::support::*;

/// The download: large enough for full-size segments, small enough to be
/// quick once they fit.
const RESPONSE: usize = 512 * 1024;
const PORT: u16 = 47790;

/// The client's namespace behind the router, and the host routes to it.
struct FarClient {
    netns: String,
}

impl FarClient {
    const NS: &str = "pft-far79";
    const ROUTER_IF: &str = "pftf79r";
    const CLIENT_IF: &str = "pftf79c";
    const NET4: &str = "10.250.79.0/24";
    const NET6: &str = "fd00:250:79::/64";

    fn new(router: &Container) -> Self {
        netns::add(Self::NS).unwrap();
        let far = FarClient {
            netns: Self::NS.to_owned(),
        };
        let (rns, cns) = (router.netns.as_str(), Self::NS);
        netns::veth(Self::ROUTER_IF, Some(rns), Self::CLIENT_IF, cns).unwrap();
        let (r, c) = (Self::ROUTER_IF, Self::CLIENT_IF);
        for (ns, args) in [
            (rns, vec!["addr", "add", "10.250.79.1/24", "dev", r]),
            (
                rns,
                vec!["addr", "add", "fd00:250:79::1/64", "dev", r, "nodad"],
            ),
            // The small link: only the router's end, so that the client
            // still offers a 1460-byte MSS and the router must refuse.
            (rns, vec!["link", "set", r, "mtu", "1280", "up"]),
            (cns, vec!["addr", "add", "10.250.79.2/24", "dev", c]),
            (
                cns,
                vec!["addr", "add", "fd00:250:79::2/64", "dev", c, "nodad"],
            ),
            (cns, vec!["link", "set", c, "up"]),
            (cns, vec!["route", "add", "default", "via", "10.250.79.1"]),
            (
                cns,
                vec!["-6", "route", "add", "default", "via", "fd00:250:79::1"],
            ),
        ] {
            netns::ip_in(ns, &args).unwrap();
        }
        netns::sysctl(rns, "net.ipv4.ip_forward", "1").unwrap();
        netns::sysctl(rns, "net.ipv6.conf.all.forwarding", "1").unwrap();
        // Traffic to the test prefixes never leaves through a real route:
        // unreachable unless the router's routes are there.
        for net in [Self::NET4, Self::NET6] {
            sh(
                "ip",
                &["route", "add", "unreachable", net, "metric", "4000"],
            );
        }
        let (gw4, gw6) = (router.v4().to_string(), router.v6().to_string());
        sh("ip", &["route", "add", Self::NET4, "via", &gw4]);
        sh("ip", &["-6", "route", "add", Self::NET6, "via", &gw6]);
        far
    }

    fn v4() -> IpAddr {
        "10.250.79.2".parse().unwrap()
    }

    fn v6() -> IpAddr {
        "fd00:250:79::2".parse().unwrap()
    }

    fn netns_path(&self) -> std::path::PathBuf {
        netns::path(&self.netns)
    }
}

impl Drop for FarClient {
    fn drop(&mut self) {
        for net in [Self::NET4, Self::NET6] {
            let _ = run("ip", &["route", "del", net]);
            let _ = run(
                "ip",
                &["route", "del", "unreachable", net, "metric", "4000"],
            );
        }
        netns::delete(&self.netns);
    }
}

/// Downloads the response from `addr` inside the client's namespace: the
/// bytes received, or the error that stopped it (a read times out when
/// nothing comes for 5 s: the stall).
fn download(far: &FarClient, addr: SocketAddr) -> Result<usize, String> {
    netns::inside(&far.netns_path(), move || {
        let mut stream =
            TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(b"go\n").map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Ok(received),
                Ok(n) => received += n,
                Err(e) => return Err(format!("after {received} bytes: {e}")),
            }
        }
    })
}

#[test]
fn a_client_behind_a_smaller_mtu_gets_large_responses_v4_and_v6() {
    let Some(_serial) = root_test("pmtu") else {
        return;
    };
    let ctr = Container::new(79);
    let router = Container::with_prefix(79, "rtr", 253);
    let far = FarClient::new(&router);
    let _server = Server::start_with(
        Some(ctr.netns_path()),
        SocketAddr::new("::".parse().unwrap(), 80),
        Arc::new(|mut stream, _| {
            let mut request = [0u8; 3];
            if stream.read_exact(&mut request).is_ok() {
                stream.write_all(&vec![b'x'; RESPONSE]).ok();
            }
        }),
    );
    let _pf = Portfwd::up(&["--iface", &router.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), &format!("{PORT}:80")]);
    portfwd_ok(&[
        "map",
        &ctr.v6().to_string(),
        &format!("[::]:{}:80", PORT + 1),
    ]);
    let before = stats().get("icmp_errors_translated").copied().unwrap_or(0);
    for (host, client, port) in [
        (router.host_v4(), FarClient::v4(), PORT),
        (router.host_v6(), FarClient::v6(), PORT + 1),
    ] {
        let got = download(&far, SocketAddr::new(host, port));
        assert_eq!(got, Ok(RESPONSE), "{client} -> {host}:{port}");
    }
    // At least one "too big" per family reached its container.
    let translated = stats().get("icmp_errors_translated").copied().unwrap_or(0);
    assert!(translated >= before + 2, "{:?}", stats());
}
