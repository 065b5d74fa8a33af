//! portfwd as dockerd's userland proxy (`"userland-proxy-path"` in
//! daemon.json): the `portfwd` binary is the proxy when it is run by the
//! name `docker-proxy` (a symlink or a copy), or with `-proto` first.
//!
//! dockerd starts one proxy per published port, host address family and
//! protocol, and speaks this interface (moby `cmd/docker-proxy`,
//! `libnetwork/portmapper`):
//! - arguments `-proto tcp|udp|sctp -host-ip IP -host-port N -container-ip IP
//!   -container-port N`, Go `flag` syntax (`-f v`, `-f=v`, `--f v`); Docker
//!   28 adds `-use-listen-fd`: dockerd bound the host socket and passes it
//!   as fd 4. Unknown flags are ignored with a note (a future dockerd may
//!   pass more; none changes what a mapping is);
//! - fd 3 is a pipe: `0\n` when ready, `1\n<message>` on failure (dockerd
//!   shows the message after "Error starting userland proxy:");
//! - SIGINT (dockerd) or SIGTERM (its parent-death signal) stops it.
//!
//! Instead of copying bytes, the proxy publishes the port in the kernel, as
//! `portfwd map` does, under the name `docker:<container-ip>:<port>`, keeps
//! the host port bound (a socket that serves nothing, as the port holder binds them:
//! `ss -lntp` shows `docker-proxy`, no other process can take the port),
//! reports ready and waits. On SIGINT/SIGTERM it removes exactly its own
//! mapping. A claim (see `owner`) lets the next portfwd command remove the
//! mapping of a proxy that was killed with SIGKILL. When portfwd is not up
//! under the pin directory (`PORTFWD_BPFFS`, as for the CLI), the proxy
//! brings it up, on the uplinks in `PORTFWD_UPLINKS` (comma-separated;
//! default: the interfaces of the default routes).

use std::{
    ffi::OsStr,
    fs::File,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use nix::{
    fcntl::{FcntlArg, FdFlag, fcntl},
    sys::{
        signal::{SigSet, Signal},
        socket::{Backlog, SockaddrStorage, getsockname, getsockopt, listen, sockopt},
    },
};

use crate::{
    holder, instance,
    model::{HostPorts, Mapping, PortRange, Protocol, PublishSpec},
    ops::{self, PublishOptions},
    state::owner::{self, Claim, Owner},
};

/// The name dockerd's proxy has; the binary run by it is the proxy.
pub(crate) const PROGRAM_NAME: &str = "docker-proxy";
/// The readiness pipe and the host socket `-use-listen-fd` passes.
const STATUS_FD: RawFd = 3;
const LISTEN_FD: RawFd = 4;

/// Whether this process was run as `docker-proxy` (argv[0], which dockerd
/// sets to the full path it was configured with), or with dockerd's
/// arguments whatever the file is called: dockerd passes `-proto` first,
/// which is no CLI command.
pub fn invoked_as_proxy() -> bool {
    let mut args = std::env::args_os();
    let named = args
        .next()
        .is_some_and(|arg0| Path::new(&arg0).file_name() == Some(OsStr::new(PROGRAM_NAME)));
    named || args.next().is_some_and(|first| first == "-proto")
}

/// What dockerd asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyArgs {
    pub proto: String,
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
    pub use_listen_fd: bool,
    pub version: bool,
    /// Flags this version does not know, as given.
    pub unknown: Vec<String>,
}

/// Parses docker-proxy's arguments (without argv[0]) as Go's `flag`
/// package does: one or two dashes, `-name value` or `-name=value`, bools
/// without a value; parsing stops at `--` or the first non-flag.
pub(crate) fn parse_args(args: &[String]) -> Result<ProxyArgs, String> {
    let mut parsed = ProxyArgs {
        proto: "tcp".into(),
        host_ip: Ipv4Addr::UNSPECIFIED.into(),
        host_port: 0,
        container_ip: Ipv4Addr::UNSPECIFIED.into(),
        container_port: 0,
        use_listen_fd: false,
        version: false,
        unknown: Vec::new(),
    };
    let (mut host_port, mut container_port) = (None, None);
    let mut rest = args.iter().peekable();
    while let Some(arg) = rest.next() {
        if arg == "--" || !arg.starts_with('-') || arg == "-" {
            break;
        }
        let flag = arg.trim_start_matches('-');
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (flag, None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => rest
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("flag needs an argument: -{name}")),
            }
        };
        let boolean = |inline: &Option<String>| -> Result<bool, String> {
            match inline.as_deref() {
                None | Some("true" | "1" | "t" | "T" | "TRUE" | "True") => Ok(true),
                Some("false" | "0" | "f" | "F" | "FALSE" | "False") => Ok(false),
                Some(other) => Err(format!("invalid boolean value {other:?} for -{name}")),
            }
        };
        let ip = |text: String| -> Result<IpAddr, String> {
            text.parse()
                .map_err(|_| format!("invalid value {text:?} for -{name}: not an IP address"))
        };
        let port = |text: String| -> Result<u16, String> {
            match text.parse::<u16>() {
                Ok(port) if port > 0 => Ok(port),
                _ => Err(format!("invalid value {text:?} for -{name}: not a port")),
            }
        };
        match name {
            "proto" => parsed.proto = value(name)?,
            "host-ip" => parsed.host_ip = ip(value(name)?)?,
            "host-port" => host_port = Some(port(value(name)?)?),
            "container-ip" => parsed.container_ip = ip(value(name)?)?,
            "container-port" => container_port = Some(port(value(name)?)?),
            "use-listen-fd" => parsed.use_listen_fd = boolean(&inline)?,
            "v" | "version" => parsed.version = boolean(&inline)?,
            _ => {
                // A flag of a newer dockerd: its value, if it has one, is
                // the next argument unless that is a flag.
                let mut given = arg.clone();
                if inline.is_none()
                    && let Some(next) = rest.next_if(|next| !next.starts_with('-'))
                {
                    given = format!("{arg} {next}");
                }
                parsed.unknown.push(given);
            }
        }
    }
    if !parsed.version {
        parsed.host_port = host_port.ok_or("-host-port is required")?;
        parsed.container_port = container_port.ok_or("-container-port is required")?;
    }
    Ok(parsed)
}

/// The mapping's name: the container endpoint, marked as Docker's.
pub(crate) fn mapping_name(container: SocketAddr) -> String {
    format!("docker:{container}")
}

/// The proxy process (argv[0] is `docker-proxy`).
pub fn main() -> ExitCode {
    // Neither the port holder nor anything else this process starts may
    // keep dockerd's pipe (dockerd would wait for its end) or socket.
    // An fd dockerd did not pass is simply not there: nothing to protect.
    for fd in [STATUS_FD, LISTEN_FD] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            report(Err(&message));
            return ExitCode::from(2);
        }
    };
    if parsed.version {
        println!(
            "docker-proxy (portfwd {}): publishes ports with eBPF",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    for flag in &parsed.unknown {
        eprintln!("{PROGRAM_NAME} (portfwd): note: ignoring unknown flag {flag}");
    }
    // Block the stop signals before anything can run in other threads, so
    // that they wait for `sigwait` below. Children get an empty mask again.
    let mut stop = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        stop.add(signal);
    }
    if let Err(error) = stop.thread_block() {
        report(Err(&format!("blocking signals: {error}")));
        return ExitCode::FAILURE;
    }
    // dockerd sets this too; a proxy started by something else should not
    // outlive it either.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    let pin_dir = std::env::var_os("PORTFWD_BPFFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(instance::DEFAULT_PIN_DIR));
    let proxy = match Proxy::start(&pin_dir, &parsed) {
        Ok(proxy) => proxy,
        Err(error) => {
            report(Err(&format!("{error:#}")));
            return ExitCode::FAILURE;
        }
    };
    report(Ok(()));
    // Any signal, or a failed wait, means: stop.
    stop.wait().ok();
    match proxy.stop() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{PROGRAM_NAME} (portfwd): {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Tells dockerd (fd 3) whether the proxy is ready; without the pipe (run
/// by hand), stderr.
fn report(status: Result<(), &str>) {
    let text = match status {
        Ok(()) => "0\n".to_owned(),
        Err(message) => format!("1\n{message}"),
    };
    if fcntl(STATUS_FD, FcntlArg::F_GETFD).is_ok() {
        // SAFETY: fd 3 is open (checked) and ours: dockerd passes it for
        // this report, and nothing else in this process uses it.
        let mut pipe = unsafe { File::from_raw_fd(STATUS_FD) };
        // dockerd gone: nobody is left to read the report.
        pipe.write_all(text.as_bytes()).ok();
        // Dropped: closed, as dockerd expects after the report.
    } else if let Err(message) = status {
        eprintln!("{PROGRAM_NAME} (portfwd): {message}");
    }
}

/// A running proxy: the published mapping and the held host socket.
struct Proxy {
    pin_dir: PathBuf,
    mapping: Mapping,
    _socket: OwnedFd,
}

impl Proxy {
    fn start(pin_dir: &Path, args: &ProxyArgs) -> Result<Proxy> {
        let protocol = match args.proto.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => bail!(
                "portfwd does not forward SCTP: publish this port over tcp or udp, or \
                 set userland-proxy-path back to Docker's docker-proxy"
            ),
            other => bail!("unsupported protocol {other}"),
        };
        let host = SocketAddr::new(args.host_ip, args.host_port);
        let container = SocketAddr::new(args.container_ip, args.container_port);
        let socket = if args.use_listen_fd {
            adopt_listen_socket(protocol, host)?
        } else {
            holder::reserve(protocol, host)
                .with_context(|| format!("failed to listen on {host}/{protocol}"))?
        };
        if !ops::is_up(pin_dir) {
            bring_up(pin_dir)?;
        }
        let name = mapping_name(container);
        owner::record(
            pin_dir,
            &Claim {
                name: name.clone(),
                protocol,
                host,
                owner: Owner::current()?,
            },
        )?;
        let spec = PublishSpec {
            host_ip: Some(args.host_ip),
            host_ports: HostPorts::Each(PortRange::single(args.host_port)),
            container_ports: PortRange::single(args.container_port),
            protocol,
        };
        // This process holds the port: portfwd's holder must not, and the
        // port being in use is expected.
        let options = PublishOptions {
            refuse_ports_in_use: false,
            hold_ports: false,
            allow: None,
        };
        let published = ops::publish_with(pin_dir, &name, args.container_ip, &[spec], options)
            .inspect_err(|_| owner::release(pin_dir, protocol, host));
        let mapping = match published {
            Ok(mut published) if published.mappings.len() == 1 => published.mappings.remove(0),
            Ok(published) => {
                // Best effort: the error below is what dockerd shows.
                for m in &published.mappings {
                    ops::withdraw_exact(pin_dir, m).ok();
                }
                owner::release(pin_dir, protocol, host);
                bail!("expected one mapping, got {}", published.mappings.len())
            }
            Err(error) => return Err(error),
        };
        Ok(Proxy {
            pin_dir: pin_dir.to_owned(),
            mapping,
            _socket: socket,
        })
    }

    /// Removes exactly this proxy's mapping, then its claim; the socket
    /// closes on exit.
    fn stop(self) -> Result<()> {
        let removed = ops::withdraw_exact(&self.pin_dir, &self.mapping);
        owner::release(&self.pin_dir, self.mapping.protocol, self.mapping.host);
        removed.map(drop).context("removing the mapping")
    }
}

/// Takes the host socket dockerd bound (fd 4, `-use-listen-fd`): checks it
/// is bound where the flags say, makes it drop everything (portfwd's
/// programs translate before any socket lookup) and, for TCP, listening.
fn adopt_listen_socket(protocol: Protocol, host: SocketAddr) -> Result<OwnedFd> {
    fcntl(LISTEN_FD, FcntlArg::F_GETFD).context("-use-listen-fd given but fd 4 is not open")?;
    // SAFETY: fd 4 is open (checked) and dockerd hands it to this process.
    let socket = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    let bound: SockaddrStorage = getsockname(socket.as_raw_fd()).context("fd 4 is not a socket")?;
    let port = bound
        .as_sockaddr_in()
        .map(|a| a.port())
        .or_else(|| bound.as_sockaddr_in6().map(|a| a.port()));
    if port != Some(host.port()) {
        bail!(
            "the socket on fd 4 is not bound to port {} (bound to {bound})",
            host.port()
        );
    }
    holder::attach_hold_filter(&socket, protocol).context("filtering the socket on fd 4")?;
    if protocol == Protocol::Tcp && !getsockopt(&socket, sockopt::AcceptConn).unwrap_or(false) {
        listen(&socket, Backlog::new(1).unwrap_or(Backlog::MAXCONN))
            .context("listening on the socket of fd 4")?;
    }
    Ok(socket)
}

/// `portfwd up` as the CNI plugin does it, on `PORTFWD_UPLINKS`.
fn bring_up(pin_dir: &Path) -> Result<()> {
    let ifaces: Vec<String> = std::env::var("PORTFWD_UPLINKS")
        .unwrap_or_default()
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    ops::up(&ops::UpOptions {
        pin_dir: pin_dir.to_owned(),
        ifaces,
        ..Default::default()
    })
    .with_context(|| format!("bringing portfwd up under {}", pin_dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_what_dockerd_20_10_passes() {
        let parsed = parse_args(&args(
            "-proto udp -host-ip :: -host-port 18082 -container-ip 172.30.0.2 -container-port 80",
        ))
        .unwrap();
        assert_eq!(parsed.proto, "udp");
        assert_eq!(parsed.host_ip, "::".parse::<IpAddr>().unwrap());
        assert_eq!(parsed.host_port, 18082);
        assert_eq!(parsed.container_ip, "172.30.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(parsed.container_port, 80);
        assert!(!parsed.use_listen_fd);
        assert!(parsed.unknown.is_empty());
    }

    #[test]
    fn parses_docker_28_and_future_flags() {
        let parsed = parse_args(&args(
            "--proto=tcp -host-port=1 -container-ip 10.0.0.2 -container-port 2 \
             -use-listen-fd -bridge-name br0 -some-bool -x=y",
        ))
        .unwrap();
        assert!(parsed.use_listen_fd);
        assert_eq!(parsed.host_ip, IpAddr::from(Ipv4Addr::UNSPECIFIED));
        assert_eq!(
            parsed.unknown,
            ["-bridge-name br0", "-some-bool", "-x=y"].map(String::from)
        );
        let parsed = parse_args(&args("-host-port 1 -container-port 2 -use-listen-fd=false"));
        assert!(!parsed.unwrap().use_listen_fd);
    }

    #[test]
    fn rejects_what_cannot_be_a_mapping() {
        for (line, expected) in [
            ("-host-port 1", "-container-port is required"),
            ("-container-port 1", "-host-port is required"),
            ("-host-port 0 -container-port 1", "not a port"),
            ("-host-port 1 -container-port 1 -host-ip x", "not an IP"),
            ("-host-port", "needs an argument"),
            (
                "-host-port 1 -container-port 1 -use-listen-fd=maybe",
                "boolean",
            ),
        ] {
            let error = parse_args(&args(line)).unwrap_err();
            assert!(error.contains(expected), "{line}: {error}");
        }
        assert!(parse_args(&args("-v")).unwrap().version);
    }

    #[test]
    fn names_say_docker_and_the_container_endpoint() {
        assert_eq!(
            mapping_name("172.30.0.2:80".parse().unwrap()),
            "docker:172.30.0.2:80"
        );
        assert_eq!(
            mapping_name("[fd00::2]:80".parse().unwrap()),
            "docker:[fd00::2]:80"
        );
    }
}
