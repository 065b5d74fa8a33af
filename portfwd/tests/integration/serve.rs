//! `portfwd serve`: the long-running service. It takes over the port
//! holder and serves Prometheus metrics whose counters follow real traffic
//! through the TC path. Needs root (`cargo xtask test`).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::support::*;

const METRICS: &str = "127.0.0.1:62719";

/// `portfwd serve` as a child process, stopped (SIGTERM) when dropped.
struct Service(Child);

impl Service {
    fn start(extra: &[&str]) -> Self {
        let child = Command::new(PORTFWD)
            .args(["--bpffs", &pin_dir(), "serve", "--metrics", METRICS])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting portfwd serve");
        let service = Service(child);
        assert!(
            wait_until(Duration::from_secs(10), || scrape_text().is_ok()),
            "portfwd serve never answered on {METRICS}"
        );
        service
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = self.0.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";

/// GET (HTTP/1.0, so the body ends with the connection).
fn get(path: &str) -> std::io::Result<(u16, String)> {
    get_accepting(path, "*/*")
}

fn get_accepting(path: &str, accept: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = METRICS.parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {METRICS}\r\nAccept: {accept}\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header in {response:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}

fn scrape_text() -> std::io::Result<String> {
    scrape_as("*/*")
}

fn scrape_as(accept: &str) -> std::io::Result<String> {
    match get_accepting("/metrics", accept)? {
        (200, body) => Ok(body),
        (status, body) => Err(std::io::Error::other(format!("{status}: {body}"))),
    }
}

/// Parses the exposition text strictly enough to catch a malformed line:
/// every sample belongs to a family announced by `# TYPE` (in OpenMetrics,
/// counters' samples add `_total` to the family's name, and the text ends
/// with `# EOF`), label values are quoted, values are numbers. Returns
/// `name{labels}` -> value.
fn parse(text: &str, openmetrics: bool) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut family: Option<(String, String)> = None;
    let mut lines: Vec<&str> = text.lines().collect();
    if openmetrics {
        assert_eq!(lines.pop(), Some("# EOF"), "OpenMetrics ends with # EOF");
    }
    for line in &lines {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE NAME KIND");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            family = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let name = series.split('{').next().unwrap();
        let (family_name, kind) = family
            .as_ref()
            .unwrap_or_else(|| panic!("no # TYPE: {line}"));
        let expected = match kind.as_str() {
            "counter" if openmetrics => format!("{family_name}_total"),
            _ => family_name.clone(),
        };
        assert_eq!(name, expected, "sample outside its family: {line}");
        assert!(name.starts_with("portfwd_"), "{line}");
        let labels = &series[name.len()..];
        if !labels.is_empty() {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels of {line}"));
            for pair in inner.split("\",") {
                let (key, value) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                assert!(!value.trim_end_matches('"').contains('"'), "{line}");
            }
        }
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "twice: {line}"
        );
    }
    samples
}

/// `promtool check metrics` on the text, when promtool is installed
/// (`cargo xtask setup` extracts it from Debian's prometheus package).
fn promtool_check(text: &str) {
    let promtool = std::env::var("PORTFWD_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let Ok(mut child) = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("note: {promtool} not found; only the built-in parser checked the metrics");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Scrapes both formats; checks the classic one with promtool and both
/// with the parser; they must carry the same samples.
fn scrape() -> BTreeMap<String, f64> {
    let classic = scrape_text().expect("scraping /metrics");
    promtool_check(&classic);
    let openmetrics = scrape_as(OPENMETRICS).expect("scraping /metrics as OpenMetrics");
    let samples = parse(&openmetrics, true);
    let classic = parse(&classic, false);
    assert_eq!(
        classic.keys().collect::<Vec<_>>(),
        samples.keys().collect::<Vec<_>>()
    );
    samples
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {:#?}", samples.keys().collect::<Vec<_>>()))
}

/// The pid that holds a TCP port, from `ss -lntpH`.
fn tcp_port_holder(port: u16) -> Option<u32> {
    let out = sh("ss", &["-lntpH", &format!("sport = :{port}")]);
    let at = out.find("pid=")?;
    out[at + 4..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn serve_holds_the_ports_and_its_metrics_follow_the_traffic() {
    let Some(_serial) = root_test("serve_metrics") else {
        return;
    };
    let ctr = Container::new(71);
    let client = Container::with_prefix(71, "ext", 252);
    let _server = ctr.serve("[::]:80", "ctr71");
    let _pf = Portfwd::up(&["--iface", &client.host_if]);
    portfwd_ok(&["map", "--name", "web", &ctr.v4().to_string(), "62710:80"]);
    let held_by_up = tcp_port_holder(62710).expect("up's port holder holds 62710");

    let service = Service::start(&[]);
    // The service replaced the holder that `up` started.
    assert!(
        wait_until(Duration::from_secs(5), || {
            tcp_port_holder(62710) == Some(service.pid())
        }),
        "62710 is held by {:?}, not by serve ({}); up's holder was {held_by_up}",
        tcp_port_holder(62710),
        service.pid()
    );
    let before = scrape();
    assert_eq!(value(&before, "portfwd_up"), 1.0);
    assert_eq!(value(&before, "portfwd_port_holder_running"), 1.0);
    assert_eq!(value(&before, "portfwd_mappings"), 2.0, "0.0.0.0 and ::");
    assert!(value(&before, "portfwd_conntrack_capacity") > 0.0);

    const FETCHES: usize = 3;
    let dialed = SocketAddr::new(client.host_v4(), 62710);
    for _ in 0..FETCHES {
        let (answer, _) = client
            .inside(move || fetch(dialed))
            .unwrap_or_else(|e| panic!("{dialed}: {e}"));
        assert!(answer.starts_with("ctr71"), "{answer}");
    }
    let after = scrape();
    let web = r#"name="web",protocol="tcp",host="0.0.0.0:62710",container=""#;
    let series = |metric: &str, extra: &str| format!("{metric}{{{web}{}:80\"{extra}}}", ctr.v4());
    let grew = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        grew(&series("portfwd_mapping_flows_total", "")),
        FETCHES as f64
    );
    // SYN, ACK, FIN, ACK at least, each way.
    for direction in ["in", "out"] {
        let packets = series(
            "portfwd_mapping_packets_total",
            &format!(",direction=\"{direction}\""),
        );
        assert!(
            grew(&packets) >= (3 * FETCHES) as f64,
            "{packets}: {after:#?}"
        );
        let bytes = series(
            "portfwd_mapping_bytes_total",
            &format!(",direction=\"{direction}\""),
        );
        assert!(grew(&bytes) >= (3 * FETCHES * 40) as f64, "{bytes}");
    }
    assert_eq!(
        grew(r#"portfwd_datapath_packets_total{event="flows_new"}"#),
        FETCHES as f64
    );
    assert_eq!(get("/other").unwrap().0, 404);

    // `down` stops the service's holder; the next `up` and `map` are held
    // again, by the service or a holder the CLI started (whichever first).
    portfwd_ok(&["down"]);
    let _pf = Portfwd::up(&["--iface", &client.host_if]);
    portfwd_ok(&["map", "--name", "web", &ctr.v4().to_string(), "62711:80"]);
    assert!(
        wait_until(Duration::from_secs(5), || tcp_port_holder(62711)
            == Some(service.pid())),
        "after down and up, serve holds the ports again ({:?})",
        tcp_port_holder(62711)
    );

    assert!(service.stop().success(), "SIGTERM is a clean stop");
    assert_eq!(
        tcp_port_holder(62711),
        None,
        "stopping serve releases the ports"
    );
    // Forwarding goes on without the service.
    let dialed = SocketAddr::new(client.host_v4(), 62711);
    assert!(client.inside(move || fetch(dialed)).is_ok());
}

#[test]
fn serve_reports_when_portfwd_is_down() {
    let Some(_serial) = root_test("serve_down") else {
        return;
    };
    let _ = portfwd(&["down"]);
    let service = Service::start(&[]);
    let samples = scrape();
    assert_eq!(value(&samples, "portfwd_up"), 0.0);
    assert_eq!(value(&samples, "portfwd_port_holder_running"), 0.0);
    assert!(service.stop().success());
    // A second service on a busy address fails with one line, exit 1.
    let _first = Service::start(&[]);
    let out = portfwd(&["serve", "--metrics", METRICS]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(METRICS), "{stderr}");
    let bad = portfwd(&["serve", "--metrics", "localhost"]);
    assert_eq!(bad.status.code(), Some(2));
}
