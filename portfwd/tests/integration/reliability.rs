//! Reliability: concurrent writers, killed commands, restarts, upgrades in
//! place, resource limits, the state file and `apply`. Needs root (`cargo
//! xtask test`).

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::support::*;

/// The (host ip, host port, protocol) of every listed mapping.
fn published() -> BTreeSet<(String, u64, String)> {
    listed()
        .iter()
        .map(|r| {
            (
                r["host_ip"].as_str().unwrap().to_owned(),
                r["host_port"].as_u64().unwrap(),
                r["protocol"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The same, from the state file.
fn recorded() -> BTreeSet<(String, u64, String)> {
    let path = portfwd::instance::state_path(std::path::Path::new(&pin_dir()));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    if text.is_empty() {
        return BTreeSet::new();
    }
    portfwd::model::parse_state(&text)
        .unwrap()
        .iter()
        .map(|m| {
            (
                m.host.ip().to_string(),
                m.host.port() as u64,
                m.protocol.to_string(),
            )
        })
        .collect()
}

fn portfwd_cmd(args: &[&str]) -> Command {
    let mut command = Command::new(PORTFWD);
    command.args(["--bpffs", &pin_dir()]).args(args);
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

#[test]
fn sixteen_concurrent_writers_lose_nothing() {
    let Some(_serial) = root_test("concurrent_writers") else {
        return;
    };
    let ctr = Container::new(51);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    let container = ctr.v4().to_string();
    // Writer w adds 5 ranges of 25 ports (125 mappings: 2,000 in all) and
    // then removes its 2nd and 4th range.
    let start = Instant::now();
    let writers: Vec<_> = (0..16u16)
        .map(|w| {
            let container = container.clone();
            std::thread::spawn(move || {
                let base = 63000 + w * 125;
                for r in 0..5u16 {
                    let first = base + r * 25;
                    let spec = format!(
                        "127.0.0.1:{first}-{}:{}-{}",
                        first + 24,
                        1000 + r * 25,
                        1024 + r * 25
                    );
                    let out = portfwd_cmd(&["map", "--name", &format!("w{w}"), &container, &spec])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                for r in [1u16, 3] {
                    let first = base + r * 25;
                    let range = format!("127.0.0.1:{first}-{}", first + 24);
                    let out = portfwd_cmd(&["unmap", &range]).output().unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    eprintln!("16 writers, 112 commands: {:?}", start.elapsed());
    let mut expected = BTreeSet::new();
    for w in 0..16u64 {
        for r in [0u64, 2, 4] {
            for p in 0..25 {
                expected.insert((
                    "127.0.0.1".to_owned(),
                    63000 + w * 125 + r * 25 + p,
                    "tcp".to_owned(),
                ));
            }
        }
    }
    assert_eq!(expected.len(), 1200);
    assert_eq!(published(), expected, "the maps");
    assert_eq!(recorded(), expected, "the state file");
}

#[test]
fn a_killed_range_map_leaves_all_or_nothing() {
    let Some(_serial) = root_test("killed_map") else {
        return;
    };
    let ctr = Container::new(52);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    let container = ctr.v4().to_string();
    // How long a whole 1,000-port map takes, to spread the kills over it.
    let start = Instant::now();
    assert!(
        portfwd_cmd(&[
            "map",
            "--name",
            "big",
            &container,
            "31000-31999:20000-20999"
        ])
        .status()
        .unwrap()
        .success()
    );
    let full = start.elapsed();
    assert_eq!(published().len(), 2000);
    portfwd_ok(&["unmap", "--name", "big"]);
    eprintln!("a 1,000-port map: {full:?}");

    let mut outcomes = Vec::new();
    for attempt in 0..10u32 {
        let mut child = portfwd_cmd(&[
            "map",
            "--name",
            "big",
            &container,
            "31000-31999:20000-20999",
        ])
        .spawn()
        .unwrap();
        // Spread over the command's run, from start-up to the end.
        std::thread::sleep(full.mul_f64(f64::from(attempt) / 10.0 + 0.05));
        let _ = child.kill();
        let _ = child.wait();
        // The next command sees a whole state: all of it, or none.
        let now = published();
        assert!(
            now.is_empty() || now.len() == 2000,
            "attempt {attempt}: {} entries",
            now.len()
        );
        assert_eq!(recorded(), now, "attempt {attempt}: the state file agrees");
        outcomes.push(now.len());
        if !now.is_empty() {
            portfwd_ok(&["unmap", "--name", "big"]);
        }
    }
    eprintln!("entries after each kill: {outcomes:?}");
}

#[test]
fn a_reboot_brings_every_mapping_back() {
    let Some(_serial) = root_test("reboot") else {
        return;
    };
    let ctr = Container::new(53);
    let _server = ctr.serve("[::]:80", "ctr53");
    let up = ["up", "--iface", ctr.host_if.as_str()];
    let _pf = Portfwd::up(&up[1..]);
    portfwd_ok(&[
        "map",
        "--name",
        "web",
        &ctr.v4().to_string(),
        "62501:80",
        "127.0.0.1:62502:80/udp",
    ]);
    let before = published();
    // A reboot empties bpffs; `down --keep-state` does the same here.
    portfwd_ok(&["down", "--keep-state"]);
    assert!(!std::path::Path::new(&pin_dir()).exists());
    assert!(fetch("127.0.0.1:62501".parse().unwrap()).is_err());
    let out = portfwd_ok(&up);
    assert!(out.contains("restored web: 0.0.0.0:62501/tcp"), "{out}");
    assert_eq!(published(), before);
    assert!(
        fetch("127.0.0.1:62501".parse().unwrap())
            .unwrap()
            .0
            .starts_with("ctr53")
    );
    // A second `up` on the running system has nothing to fix.
    let again = portfwd_ok(&up);
    assert!(!again.contains("restored"), "{again}");
    // A mapping removed behind portfwd's back is put back by `up`.
    let pin = pin_dir();
    let services =
        aya::maps::MapData::from_pin(std::path::Path::new(&pin).join("pf_services")).unwrap();
    let mut services: aya::maps::HashMap<
        _,
        portfwd_common::ServiceKey,
        portfwd_common::ServiceValue,
    > = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(services)).unwrap();
    let key = services.keys().next().unwrap().unwrap();
    services.remove(&key).unwrap();
    assert_eq!(published().len(), before.len() - 1);
    let fixed = portfwd_ok(&up);
    assert!(fixed.contains("restored"), "{fixed}");
    assert_eq!(published(), before);
}

#[test]
fn a_stream_survives_an_upgrade_in_place() {
    let Some(_serial) = root_test("upgrade") else {
        return;
    };
    let ctr = Container::new(54);
    let client = Container::with_prefix(54, "ext", 252);
    // 100 chunks of 200 KB, 20 ms apart: the reload happens mid-stream.
    let chunk: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i % 251) as u8).collect());
    let sent = chunk.clone();
    let _source = ctr.serve_with(
        "[::]:5002",
        Arc::new(move |mut stream: TcpStream, _| {
            for _ in 0..100 {
                if stream.write_all(&sent).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }),
    );
    let up = ["up", "--iface", client.host_if.as_str()];
    let _pf = Portfwd::up(&up[1..]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62510:5002"]);
    let published = SocketAddr::new(client.host_v4(), 62510);
    let client_ns = client.netns_path();
    let download = std::thread::spawn(move || {
        netns::enter(&client_ns).unwrap();
        let mut stream = TcpStream::connect_timeout(&published, TIMEOUT).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut data = Vec::new();
        stream.read_to_end(&mut data).map(|_| data)
    });
    std::thread::sleep(Duration::from_millis(600));
    let out = portfwd_ok(&["up", "--reload", "--iface", &client.host_if]);
    assert!(
        out.contains("replaced by this build") && out.contains("pf_tc_uplink_in"),
        "{out}"
    );
    let data = download.join().unwrap().expect("the stream broke");
    assert_eq!(data.len(), 100 * chunk.len());
    assert!(
        data.chunks(chunk.len()).all(|c| c == chunk.as_slice()),
        "bytes differ"
    );
    // Without --reload, the same build replaces nothing.
    let again = portfwd_ok(&up);
    assert!(!again.contains("replaced"), "{again}");
}

/// `up` with another build (here a copy of the binary: another file, as a
/// package upgrade installs) starts the port holder again, whose earlier
/// build would go on writing the maps as it knew them (the host's
/// addresses without their bits); the same build keeps its holder.
#[test]
fn up_with_another_build_starts_its_own_port_holder() {
    let Some(_serial) = root_test("holder_build") else {
        return;
    };
    let ctr = Container::new(66);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62580:80"]);
    let first = holder_pid().expect("the port holder runs");
    let copy = std::env::temp_dir().join(format!("portfwd-build-{}", std::process::id()));
    std::fs::copy(PORTFWD, &copy).unwrap();
    let up_with = |binary: &str| {
        let dir = pin_dir();
        let out = run(binary, &["--bpffs", &dir, "up", "--iface", &ctr.host_if]);
        assert!(out.status.success(), "{out:?}");
    };
    up_with(copy.to_str().unwrap());
    let second = holder_pid().expect("a port holder runs after the other build's up");
    assert_ne!(second, first, "the other build started its own holder");
    up_with(copy.to_str().unwrap());
    assert_eq!(
        holder_pid(),
        Some(second),
        "the same build keeps its holder"
    );
    // Back to the tests' build, whose holder the instance ends with.
    up_with(PORTFWD);
    assert_ne!(
        holder_pid(),
        Some(second),
        "this build started its own holder"
    );
    assert!(
        std::net::TcpListener::bind("0.0.0.0:62580").is_err(),
        "the port is held"
    );
    std::fs::remove_file(&copy).ok();
}

/// Sets every word of the pinned `pf_local_addr_bits` to zero: the map as
/// an upgrade's `up` creates it, or as an earlier build's holder leaves the
/// bits of the addresses it adds.
fn clear_local_addr_bits() {
    let path = std::path::Path::new(&pin_dir()).join(portfwd_common::LOCAL_ADDR_BITS.name);
    let data = aya::maps::MapData::from_pin(&path).unwrap();
    let mut bits: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    for word in 0..portfwd_common::LOCAL_ADDR_BITMAP_WORDS {
        bits.set(word, 0, 0).unwrap();
    }
}

/// The host-address bits as an upgrade finds them (the map new, empty,
/// while `pf_local_addrs` holds the host's addresses): a wildcard mapping
/// is not served on the host's address through the TC path until `up`
/// sets them, before its programs are attached, or a command's sync sets
/// those an earlier build's holder left out.
#[test]
fn host_address_bits_are_filled_by_up_and_repaired_by_a_sync() {
    let Some(_serial) = root_test("host_address_bits") else {
        return;
    };
    let ctr = Container::new(67);
    let client = Container::with_prefix(67, "ext", 252);
    let _server = ctr.serve("[::]:80", "ctr67");
    let _pf = Portfwd::up(&["--iface", &client.host_if]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62581:80"]);
    let published = SocketAddr::new(client.host_v4(), 62581);
    let served = || {
        client.inside(move || {
            // Short: unserved, the SYN meets the held (silent) socket.
            TcpStream::connect_timeout(&published, Duration::from_secs(1))
                .and_then(|mut stream| {
                    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut answer = String::new();
                    stream.read_to_string(&mut answer)?;
                    Ok(answer)
                })
                .is_ok_and(|answer| answer.starts_with("ctr67"))
        })
    };
    assert!(served(), "served before");
    clear_local_addr_bits();
    assert!(!served(), "served with the host address's bit clear");
    portfwd_ok(&["up", "--iface", &client.host_if]);
    assert!(served(), "served after up set the bits");
    clear_local_addr_bits();
    portfwd_ok(&["map", &ctr.v4().to_string(), "62582:80"]);
    assert!(served(), "served after a command's sync repaired the bits");
}

#[test]
fn map_sizes_are_configurable_and_a_full_map_says_so() {
    let Some(_serial) = root_test("map_sizes") else {
        return;
    };
    let ctr = Container::new(55);
    let _pf = Portfwd::up(&[
        "--iface",
        &ctr.host_if,
        "--max-mappings",
        "4",
        "--max-flows",
        "2",
    ]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62520:80", "62521:80"]);
    let before = listed();
    let out = portfwd(&["map", &ctr.v4().to_string(), "62522:80"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("full"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(listed(), before);
    // So does a change large enough to be written in batches, and its
    // ports bound ahead are let go.
    let out = portfwd(&["map", &ctr.v4().to_string(), "62530-62599:62530-62599"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("full"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(listed(), before);
    assert!(std::net::TcpListener::bind("0.0.0.0:62550").is_ok());
    // Sizes apply when the maps are created: a later `up` says so.
    let out = portfwd(&["up", "--iface", &ctr.host_if, "--max-mappings", "8"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not applied"));
}

#[test]
fn a_full_conntrack_evicts_the_oldest_flow_and_counts_it() {
    let Some(_serial) = root_test("conntrack_eviction") else {
        return;
    };
    let ctr = Container::new(56);
    let client = Container::with_prefix(56, "ext", 252);
    let _echo = ctr.serve_with("[::]:5004", Arc::new(echo_lines));
    // Room for two flows.
    let _pf = Portfwd::up(&["--iface", &client.host_if, "--max-flows", "2"]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62530:5004"]);
    let published = SocketAddr::new(client.host_v4(), 62530);
    let client_ns = client.netns_path();
    let first_flow_lives = std::thread::spawn(move || {
        netns::enter(&client_ns).unwrap();
        let mut first = echoed(published, b"one\n").unwrap();
        // Three more flows: the first one is the least recently used.
        let _others: Vec<_> = (0..3)
            .map(|_| echoed(published, b"more\n").unwrap())
            .collect();
        still_echoes(&mut first)
    });
    assert!(
        !first_flow_lives.join().unwrap(),
        "the evicted flow still flowed"
    );
    let stats = stats();
    assert!(stats["untracked_midflow"] >= 1, "{stats:?}");
}

/// A line-echo server's handler: each line comes back until the client
/// closes, or stays silent for a minute (a flow left idle longer than the
/// server's default 20 s must still be served).
fn echo_lines(stream: TcpStream, _: SocketAddr) {
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
        if writer.write_all(line.as_bytes()).is_err() {
            break;
        }
        line.clear();
    }
}

/// A connection to `published` that sent `msg` and read its echo.
fn echoed(published: SocketAddr, msg: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&published, TIMEOUT)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(msg)?;
    let mut buf = [0u8; 16];
    if s.read(&mut buf)? == 0 {
        return Err(std::io::Error::other("closed before the echo"));
    }
    Ok(s)
}

/// Whether an open connection to the echo server still gets an answer.
fn still_echoes(stream: &mut TcpStream) -> bool {
    let _ = stream.write_all(b"again\n");
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if n > 0)
}

#[test]
fn closed_flows_are_swept_before_the_lru_takes_an_idle_flow() {
    let Some(_serial) = root_test("conntrack_sweep") else {
        return;
    };
    let ctr = Container::new(64);
    let client = Container::with_prefix(64, "ext", 252);
    let _echo = ctr.serve_with("[::]:5005", Arc::new(echo_lines));
    // 2,048 entries, two per flow.
    let _pf = Portfwd::up(&["--iface", &client.host_if, "--max-flows", "1024"]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62570:5005"]);
    let published = SocketAddr::new(client.host_v4(), 62570);
    let client_ns = client.netns_path();
    // Three rounds of 850 short flows, 5,100 entries in all: the map holds
    // any one round and the idle flow, not two rounds. Between rounds, the
    // flows of the last one close and expire (10 s after their last FIN)
    // and the holder's sweep (every 5 s, 3 s after an entry died) removes
    // them; without it the LRU
    // makes room for each round from the oldest entries, and by the third
    // it has taken the idle flow's.
    // Each short flow ends with the client's reset: its entries wait out
    // the closing time (a flow whose sides both close cleanly is forgotten
    // at its last ACK, see `closed_flows_are_forgotten_at_their_last_ack`).
    let round = move || {
        for _ in 0..850 {
            reset(echoed(published, b"short\n").unwrap());
        }
    };
    let idle_flow_lives = std::thread::spawn(move || {
        netns::enter(&client_ns).unwrap();
        // Every SYN on one CPU: a veth passes a packet on in the sender's
        // softirq, so every entry is taken from (and swept back to) that
        // CPU's share of the map. The kernel's LRU hands each CPU that
        // inserts free entries 128 at a time; the spare room of a round
        // (2,048 entries less 1,700 and the idle flow's 2: 346) would run
        // out with SYNs on three CPUs or more, sweep or not.
        let _pinned = PinnedToThisCpu::new();
        let mut idle = echoed(published, b"idle\n").unwrap();
        round();
        for _ in 0..2 {
            std::thread::sleep(Duration::from_secs(10 + 3 + 5 + 2));
            round();
        }
        still_echoes(&mut idle)
    });
    assert!(
        idle_flow_lives.join().unwrap(),
        "the idle flow was evicted to make room for closed ones"
    );
}

/// A flow whose sides both close cleanly (each FIN acknowledged) is
/// forgotten at its last ACK, so that a burst of short connections, faster
/// than any sweep, does not fill the table with ended flows and make the
/// LRU evict a live idle one (issue 11). Before, each ended flow kept its
/// entries for the 10 s closing time and until the sweep: three rounds of
/// 850 short flows back to back through a table of 1,024 flows took the
/// idle flow's entries.
#[test]
fn closed_flows_are_forgotten_at_their_last_ack() {
    let Some(_serial) = root_test("conntrack_last_ack") else {
        return;
    };
    let ctr = Container::new(65);
    let client = Container::with_prefix(65, "ext", 252);
    let _echo = ctr.serve_with("[::]:5005", Arc::new(echo_lines));
    let _pf = Portfwd::up(&["--iface", &client.host_if, "--max-flows", "1024"]);
    portfwd_ok(&["map", &ctr.v4().to_string(), "62571:5005"]);
    let published = SocketAddr::new(client.host_v4(), 62571);
    let client_ns = client.netns_path();
    let flows_ended = || stats().get("flows_ended").copied().unwrap_or(0);
    let ended_before = flows_ended();
    let idle_flow_lives = std::thread::spawn(move || {
        netns::enter(&client_ns).unwrap();
        // As in `closed_flows_are_swept_before_the_lru_takes_an_idle_flow`.
        let _pinned = PinnedToThisCpu::new();
        let mut idle = echoed(published, b"idle\n").unwrap();
        for _ in 0..3 * 850 {
            // The client closes first; the echo server closes at its EOF.
            drop(echoed(published, b"short\n").unwrap());
        }
        still_echoes(&mut idle)
    });
    assert!(
        idle_flow_lives.join().unwrap(),
        "the idle flow was evicted to make room for ended ones"
    );
    // The last flows' ends may still be under way.
    assert!(
        wait_until(Duration::from_secs(5), || flows_ended()
            >= ended_before + 3 * 850 - 10),
        "flows ended at their last ACK: {}",
        flows_ended() - ended_before
    );
}

#[test]
fn apply_replaces_the_whole_set_and_prints_the_difference() {
    let Some(_serial) = root_test("apply") else {
        return;
    };
    let ctr = Container::new(57);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&[
        "map",
        "--name",
        "old",
        &ctr.v4().to_string(),
        "127.0.0.1:62540:80",
    ]);
    let dir = std::env::temp_dir().join(format!("portfwd-apply-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("mappings.toml");
    std::fs::write(
        &toml,
        format!(
            "[[mappings]]\nname = \"web\"\ncontainer = \"{0}\"\npublish = [\"127.0.0.1:62541:80\", \"127.0.0.1:62542:53/udp\"]\n",
            ctr.v4()
        ),
    )
    .unwrap();
    let toml = toml.to_str().unwrap();
    let dry = portfwd_ok(&["apply", "-f", toml, "--dry-run"]);
    assert!(
        dry.contains("- old 127.0.0.1:62540/tcp") && dry.contains("+ web 127.0.0.1:62541/tcp"),
        "{dry}"
    );
    assert!(
        dry.contains("dry run: 2 added, 1 removed, 0 unchanged"),
        "{dry}"
    );
    assert_eq!(published().len(), 1, "a dry run changes nothing");
    let applied = portfwd_ok(&["apply", "-f", toml]);
    assert!(applied.contains("2 added, 1 removed"), "{applied}");
    let expected: BTreeSet<_> = [
        ("127.0.0.1".to_owned(), 62541, "tcp".to_owned()),
        ("127.0.0.1".to_owned(), 62542, "udp".to_owned()),
    ]
    .into();
    assert_eq!(published(), expected);
    assert_eq!(recorded(), expected);
    // Applying the same file again changes nothing.
    assert!(portfwd_ok(&["apply", "-f", toml]).contains("0 added, 0 removed, 2 unchanged"));
    // A JSON file, and bad files: usage errors that change nothing.
    let json = dir.join("m.json");
    std::fs::write(
        &json,
        format!(
            r#"{{"mappings": [{{"container": "{}", "publish": ["127.0.0.1:62543:80"]}}]}}"#,
            ctr.v4()
        ),
    )
    .unwrap();
    assert!(portfwd_ok(&["apply", "-f", json.to_str().unwrap()]).contains("1 added, 2 removed"));
    let after = listed();
    for (name, text) in [
        (
            "bad.toml",
            "[[mappings]]\ncontainer = \"x\"\npublish = []\n",
        ),
        (
            "bad2.toml",
            "[[mappings]]\ncontainer = \"10.0.0.1\"\npublish = [\"70000:80\"]\n",
        ),
        ("bad.json", "{\"mappings\": 3}"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = portfwd(&["apply", "-f", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
    }
    let out = portfwd(&["apply", "-f", "/nonexistent/file.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(listed(), after);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_of_every_kind_changes_nothing() {
    let Some(_serial) = root_test("bad_input_kinds") else {
        return;
    };
    let ctr = Container::new(58);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", "--name", "keep", &ctr.v4().to_string(), "62550:80"]);
    let before = listed();
    let ip = ctr.v4().to_string();
    let long_name = "x".repeat(65);
    let cases: Vec<Vec<&str>> = vec![
        vec!["map"],
        vec!["map", &ip],
        vec!["map", &ip, ""],
        vec!["map", &ip, "0:80"],
        vec!["map", &ip, "80:0"],
        vec!["map", &ip, "[::1:80:80"],
        vec!["map", &ip, "1.2.3.4.5:80:80"],
        vec!["map", &ip, "80/tcp/udp"],
        vec!["map", &ip, "8080:80-81"],
        vec!["map", "::", "80"],
        vec!["map", "224.0.0.1", "80"],
        vec!["map", "--name", "", &ip, "80"],
        vec!["map", "--name", &long_name, &ip, "80"],
        vec!["unmap", "abc"],
        vec!["unmap", "--name", "keep", "1.2.3:80"],
        vec!["up", "--max-mappings", "0", "--iface", &ctr.host_if],
        vec!["attach"],
        vec!["list", "--bogus"],
        vec!["frobnicate"],
    ];
    for args in &cases {
        let out = portfwd(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
    let runtime: Vec<Vec<&str>> = vec![
        vec!["attach", "pft-no-such-if"],
        vec!["up", "--iface", "pft-no-such-if"],
        vec!["unmap", "62999"],
        vec!["map", &ip, "62550:80"],
    ];
    for args in &runtime {
        let out = portfwd(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
    assert_eq!(listed(), before);
}

/// The services map of the tests' instance, to read and change entries
/// behind portfwd's back.
fn services_map()
-> aya::maps::HashMap<aya::maps::MapData, portfwd_common::ServiceKey, portfwd_common::ServiceValue>
{
    let path = std::path::Path::new(&pin_dir()).join(portfwd_common::SERVICES.name);
    let map = aya::maps::MapData::from_pin(path).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap()
}

#[test]
fn a_rolled_back_change_keeps_the_interface_towards_the_container() {
    let Some(_serial) = root_test("rollback_ifindex") else {
        return;
    };
    let ctr = Container::new(59);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    portfwd_ok(&["map", "--name", "web", &ctr.v4().to_string(), "62601:80"]);
    let mut services = services_map();
    let entries: Vec<_> = services.iter().map(Result::unwrap).collect();
    assert_eq!(entries.len(), 2, "the IPv4 and the IPv6 wildcard");
    let ifindex = entries[0].1.ifindex;
    assert_ne!(ifindex, 0, "the TC path redirects to the container's link");
    // A change killed half way: its intent is on disk and one entry is
    // already gone from the map.
    let state = portfwd::instance::state_path(std::path::Path::new(&pin_dir()));
    let mut pending = state.clone().into_os_string();
    pending.push(".pending");
    std::fs::copy(&state, &pending).unwrap();
    services.remove(&entries[0].0).unwrap();
    // The next command rolls the maps back to the state file...
    portfwd_ok(&["list"]);
    assert!(!std::path::Path::new(&pending).exists());
    // ...and the entry it puts back still leads to the container's link.
    let restored = services.get(&entries[0].0, 0).unwrap();
    assert_eq!(restored.ifindex, ifindex);
}

#[test]
fn the_holder_logs_where_an_operator_finds_it() {
    let Some(_serial) = root_test("holder_log") else {
        return;
    };
    let ctr = Container::new(60);
    let _pf = Portfwd::up(&["--iface", &ctr.host_if]);
    let pid = holder_pid().expect("a port holder runs after up");
    let stderr = std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap();
    let log = portfwd::instance::holder_log(std::path::Path::new(&pin_dir()));
    assert_eq!(stderr, log, "the holder's stderr");
}
