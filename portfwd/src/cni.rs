//! The CNI plugin: a drop-in replacement for the reference `portmap` plugin.
//!
//! The `portfwd` binary is the plugin when `CNI_COMMAND` is set and it has
//! no arguments, as runtimes run plugins (copy or symlink it into the
//! runtime's CNI plugin directory, and write `"type": "portfwd"` where the
//! conflist said `"type": "portmap"`). It
//! takes what `portmap` takes: `capabilities: {"portMappings": true}`,
//! `runtimeConfig.portMappings: [{hostPort, containerPort, protocol,
//! hostIP}]` and the container's addresses from `prevResult`, which it
//! passes through unchanged.
//!
//! - ADD publishes the ports under one name per attachment (see
//!   [`attachment_name`]), bringing portfwd up first when nothing is loaded
//!   under the configured pin directory.
//! - DEL removes exactly the mappings of that name; it succeeds when they
//!   (or portfwd itself) are already gone.
//! - CHECK verifies that the attachment's mappings are all present, and
//!   nothing else under its name.
//! - VERSION, and STATUS/GC of CNI 1.1.0 (STATUS: ready; GC: nothing, see
//!   the docs).
//!
//! Errors are CNI error JSON on stdout with exit status 1; notes go to
//! stderr. Concurrent invocations serialize on the pin directory's lock
//! (`ops`), so ADD/DEL of different containers never lose each other's
//! entries.

use std::{
    collections::BTreeSet,
    fmt,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
};

use portfwd_common::{ALL_MAPS, NAME_LEN};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    UsageError, loader,
    mapping::{self, Mapping},
    ops::{self, Missing},
    publish::{HostPorts, PortRange, Protocol, PublishSpec},
};

/// The CNI versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Well-known CNI error codes, and ours (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// Publishing or removing mappings failed (e.g. the host port is
    /// already published by another container).
    pub const PUBLISH_FAILED: u32 = 100;
    /// portfwd was not up and could not be brought up.
    pub const UP_FAILED: u32 = 101;
    /// CHECK: the attachment's mappings are not what they should be.
    pub const CHECK_FAILED: u32 = 102;
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn details(mut self, details: impl fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// From a library error: usage errors (bad input) are configuration
    /// errors, everything else is `code`.
    fn from_anyhow(code: u32, msg: impl Into<String>, error: &anyhow::Error) -> Self {
        let usage = error
            .chain()
            .any(|c| c.downcast_ref::<UsageError>().is_some());
        let code = if usage { code::INVALID_CONFIG } else { code };
        CniError::new(code, msg).details(format!("{error:#}"))
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct ErrorJson<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&ErrorJson {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("serializing an error")
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

/// The CNI environment variables of one invocation.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    pub fn from_process() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |name: &str| get(name).filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: nonempty("CNI_CONTAINERID"),
            netns: nonempty("CNI_NETNS"),
            ifname: nonempty("CNI_IFNAME"),
            args: nonempty("CNI_ARGS"),
            path: nonempty("CNI_PATH"),
        }
    }

    /// The attachment: CNI_CONTAINERID and CNI_IFNAME, both checked.
    fn attachment(&self) -> Result<(&str, &str), CniError> {
        let missing = |var: &str| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("{var} is not set (required for {})", self.command),
            )
        };
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| missing("CNI_CONTAINERID"))?;
        let ifname = self
            .ifname
            .as_deref()
            .ok_or_else(|| missing("CNI_IFNAME"))?;
        check_container_id(id)?;
        check_ifname(ifname)?;
        Ok((id, ifname))
    }
}

/// The spec: a container ID starts with an alphanumeric character, followed
/// by alphanumerics, `_`, `.` or `-`.
fn check_container_id(id: &str) -> Result<(), CniError> {
    let valid = id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("invalid CNI_CONTAINERID {id:?}"),
        )
        .details(
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        ))
    }
}

/// The spec: a Linux interface name.
fn check_ifname(ifname: &str) -> Result<(), CniError> {
    let valid = ifname.len() <= 15
        && ifname != "."
        && ifname != ".."
        && !ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if valid {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("invalid CNI_IFNAME {ifname:?}: not a Linux interface name"),
        ))
    }
}

/// The name of an attachment's mappings: `<CNI_CONTAINERID>/<CNI_IFNAME>`,
/// which the CNI spec makes unique per attachment. When that exceeds the
/// 64 bytes a mapping name holds (podman's and containerd's IDs are 64 hex
/// digits), the ID is shortened to a prefix plus `~` and a hash of the whole
/// ID: `<ID prefix>~<8 hex digits>/<ifname>`, e.g.
/// `73aac9b3093f7b14af23965d8d93a330aae356cc6012b9d14c~1b2c3d4e/eth0`.
pub fn attachment_name(container_id: &str, ifname: &str) -> String {
    let suffix = format!("/{ifname}");
    let room = NAME_LEN - suffix.len();
    if container_id.len() <= room {
        return format!("{container_id}{suffix}");
    }
    // FNV-1a, folded to 32 bits: stable across builds and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let folded = (hash ^ (hash >> 32)) as u32;
    let mut cut = room - 9;
    while !container_id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{folded:08x}{suffix}", &container_id[..cut])
}

/// The plugin's network configuration: the CNI fields it uses, `portmap`'s
/// options, and its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    pub prev_result: Option<Value>,

    /// portmap: masquerade hairpin and localhost traffic (default true).
    /// portfwd needs no SNAT for localhost (its socket programs connect
    /// straight to the container) and masquerades hairpin flows itself:
    /// accepted and ignored.
    pub snat: Option<bool>,
    /// portmap: masquerade all traffic to published ports. Ignored (noted).
    pub masq_all: Option<bool>,
    /// portmap: the mark bit of its SNAT. Accepted and ignored.
    pub mark_masq_bit: Option<i64>,
    /// portmap: an external chain that sets the SNAT mark. Accepted and ignored.
    pub external_set_mark_chain: Option<String>,
    /// portmap: iptables match conditions limiting its DNAT. Ignored (noted).
    #[serde(rename = "conditionsV4")]
    pub conditions_v4: Option<Vec<String>>,
    #[serde(rename = "conditionsV6")]
    pub conditions_v6: Option<Vec<String>>,

    /// portfwd: the pin directory (default /sys/fs/bpf/portfwd).
    pub bpffs: Option<PathBuf>,
    /// portfwd: uplinks for external traffic, used when ADD has to bring
    /// portfwd up (default, or empty: the interfaces of the default routes).
    #[serde(default)]
    pub uplinks: Vec<String>,
    /// portfwd: the cgroup v2 directory for the socket programs, used when
    /// ADD has to bring portfwd up (default: the cgroup2 mount).
    pub cgroup: Option<PathBuf>,
    /// portfwd: have portfwd's holder bind the published host ports, so no
    /// host process can take them (default false, as with portmap: podman's
    /// conmon binds them itself, after ADD; set it for nerdctl/containerd
    /// and Kubernetes hostPort).
    pub hold_ports: Option<bool>,
}

impl NetConf {
    fn pin_dir(&self) -> PathBuf {
        self.bpffs
            .clone()
            .unwrap_or_else(|| PathBuf::from(loader::DEFAULT_PIN_DIR))
    }

    /// Notes (on stderr) the portmap options that would change portmap's
    /// behaviour but mean nothing to portfwd. Defaults stay silent.
    fn ignored_options(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.masq_all == Some(true) {
            notes.push(
                "masqAll is ignored: portfwd never masquerades (containers see the real client address)"
                    .to_owned(),
            );
        }
        for (option, conditions) in [
            ("conditionsV4", &self.conditions_v4),
            ("conditionsV6", &self.conditions_v6),
        ] {
            if conditions.as_ref().is_some_and(|c| !c.is_empty()) {
                notes.push(format!(
                    "{option} is ignored: portfwd has no iptables rules to add conditions to; \
                     publish on a specific hostIP to limit where a port is reachable"
                ));
            }
        }
        notes
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapEntry>,
}

/// One `runtimeConfig.portMappings` entry, as the runtimes write it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapEntry {
    pub host_port: i64,
    pub container_port: i64,
    #[serde(default)]
    pub protocol: String,
    #[serde(rename = "hostIP", default)]
    pub host_ip: String,
}

/// A port mapping, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PortMap {
    host_ip: Option<IpAddr>,
    host_port: u16,
    container_port: u16,
    protocol: Protocol,
}

impl PortMapEntry {
    fn check(&self) -> Result<PortMap, CniError> {
        let invalid = |why: String| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("invalid port mapping {}: {why}", self.describe()),
            )
        };
        let port = |value: i64, which: &str| {
            u16::try_from(value)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| invalid(format!("{which} {value} is not in 1-65535")))
        };
        let protocol = if self.protocol.is_empty() {
            Protocol::Tcp
        } else {
            self.protocol
                .parse::<Protocol>()
                .map_err(|e| invalid(e.to_string()))?
        };
        let host_ip = if self.host_ip.is_empty() {
            None
        } else {
            Some(
                self.host_ip
                    .parse::<IpAddr>()
                    .map_err(|_| invalid(format!("hostIP {:?} is not an address", self.host_ip)))?,
            )
        };
        if let Some(ip) = host_ip
            && (ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST))
        {
            return Err(invalid(format!("hostIP {ip} is not a unicast address")));
        }
        Ok(PortMap {
            host_ip,
            host_port: port(self.host_port, "hostPort")?,
            container_port: port(self.container_port, "containerPort")?,
            protocol,
        })
    }

    fn describe(&self) -> String {
        let proto = if self.protocol.is_empty() {
            "tcp"
        } else {
            &self.protocol
        };
        let host = match self.host_ip.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:"),
            _ if self.host_ip.is_empty() => String::new(),
            _ => format!("{}:", self.host_ip),
        };
        format!("{host}{}:{}/{proto}", self.host_port, self.container_port)
    }
}

/// The container's addresses for this attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

#[derive(Debug, Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<PrevInterface>,
    #[serde(default)]
    ips: Vec<PrevIp>,
}

#[derive(Debug, Deserialize)]
struct PrevInterface {
    #[serde(default)]
    name: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Debug, Deserialize)]
struct PrevIp {
    address: String,
    interface: Option<usize>,
}

/// The container's IPv4 and IPv6 address from `prevResult`: the first of
/// each family on the sandbox interface named CNI_IFNAME, or, when no
/// address names such an interface, the first of each family.
pub fn container_addrs(prev: &Value, ifname: &str) -> Result<ContainerAddrs, CniError> {
    let prev: PrevResult = serde_json::from_value(prev.clone()).map_err(|e| {
        CniError::new(code::INVALID_CONFIG, "prevResult is not a CNI result").details(e)
    })?;
    let mut ips = Vec::new();
    for ip in &prev.ips {
        let text = ip.address.split('/').next().unwrap_or_default();
        let address: IpAddr = text.parse().map_err(|_| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("prevResult has an invalid address {:?}", ip.address),
            )
        })?;
        let ours = ip
            .interface
            .and_then(|i| prev.interfaces.get(i))
            .is_some_and(|i| i.name == ifname && !i.sandbox.is_empty());
        ips.push((address, ours));
    }
    let any_ours = ips.iter().any(|&(_, ours)| ours);
    let candidates = ips
        .iter()
        .filter(|&&(_, ours)| ours || !any_ours)
        .map(|&(ip, _)| ip);
    let mut addrs = ContainerAddrs { v4: None, v6: None };
    for ip in candidates {
        match ip {
            IpAddr::V4(v4) if addrs.v4.is_none() => addrs.v4 = Some(v4),
            IpAddr::V6(v6) if addrs.v6.is_none() => addrs.v6 = Some(v6),
            _ => {}
        }
    }
    Ok(addrs)
}

/// The publications of one attachment: for each container address, the
/// specs that forward to it. With one address family, a mapping without
/// hostIP is what `portfwd map` does with no host address (an IPv4
/// container: the IPv4 and the IPv6 wildcard). A dual-stack container gets
/// each family's wildcard forwarded to its own address of that family.
fn publications(
    maps: &[PortMap],
    addrs: ContainerAddrs,
) -> Result<Vec<(IpAddr, Vec<PublishSpec>)>, CniError> {
    let (v4, v6) = (addrs.v4.map(IpAddr::V4), addrs.v6.map(IpAddr::V6));
    let mut v4_specs = Vec::new();
    let mut v6_specs = Vec::new();
    let spec = |host_ip: Option<IpAddr>, m: &PortMap| PublishSpec {
        host_ip,
        host_ports: HostPorts::Each(PortRange::single(m.host_port)),
        container_ports: PortRange::single(m.container_port),
        protocol: m.protocol,
    };
    for m in maps {
        match (m.host_ip, v4, v6) {
            (_, None, None) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "prevResult has no IP address for the container: portfwd must be chained \
                     after a plugin that configures one (e.g. bridge with host-local)",
                ));
            }
            (None, Some(_), Some(_)) => {
                v4_specs.push(spec(Some(Ipv4Addr::UNSPECIFIED.into()), m));
                v6_specs.push(spec(Some(Ipv6Addr::UNSPECIFIED.into()), m));
            }
            (None, Some(_), None) => v4_specs.push(spec(None, m)),
            (None, None, Some(_)) => v6_specs.push(spec(None, m)),
            (Some(IpAddr::V4(_)), Some(_), _) => v4_specs.push(spec(m.host_ip, m)),
            (Some(IpAddr::V4(ip)), None, Some(v6)) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "hostIP {ip} is IPv4 but the container has only an IPv6 address ({v6})"
                    ),
                ));
            }
            (Some(IpAddr::V6(_)), _, Some(_)) => v6_specs.push(spec(m.host_ip, m)),
            // An IPv6 host address to an IPv4-only container: its
            // IPv4-mapped address, as `portfwd map` does.
            (Some(IpAddr::V6(_)), Some(_), None) => v4_specs.push(spec(m.host_ip, m)),
        }
    }
    let mut out = Vec::new();
    if let (Some(ip), false) = (v4, v4_specs.is_empty()) {
        out.push((ip, v4_specs));
    }
    if let (Some(ip), false) = (v6, v6_specs.is_empty()) {
        out.push((ip, v6_specs));
    }
    Ok(out)
}

/// Parses "a.b.c" into a comparable triple.
fn version_triple(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let triple = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(triple)
}

fn supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// The `cniVersion` an error result carries: the request's, when it is
/// one this plugin speaks.
fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| supported(v))
        .unwrap_or_else(|| "1.0.0".to_owned())
}

/// The plugin's entry point: `portfwd` with `CNI_COMMAND` set.
pub fn main() -> ExitCode {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let result = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => Err(CniError::new(code::IO_FAILURE, "reading stdin").details(e)),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(text) => {
            if !text.is_empty() {
                let _ = writeln!(out, "{text}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("portfwd (CNI {}): {error}", env.command);
            let _ = writeln!(out, "{}", error.to_json(&error_version(&stdin)));
            ExitCode::FAILURE
        }
    }
}

/// One invocation: what to print on stdout, or the error.
pub fn run(env: &Env, stdin: &[u8]) -> Result<String, CniError> {
    if env.command == "VERSION" {
        return Ok(version_info(stdin));
    }
    if !["ADD", "DEL", "CHECK", "STATUS", "GC"].contains(&env.command.as_str()) {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!(
                "unknown CNI_COMMAND {:?} (expected ADD, DEL, CHECK, VERSION, STATUS or GC)",
                env.command
            ),
        ));
    }
    let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            "decoding the network configuration on stdin",
        )
        .details(e)
    })?;
    let version = match raw.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        Some(_) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "cniVersion must be a string",
            ));
        }
        None => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "the network configuration has no cniVersion",
            ));
        }
    };
    if !supported(&version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {version:?} is not supported"),
        )
        .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
    }
    let since = |minimum: &str| -> Result<(), CniError> {
        if version_triple(&version) < version_triple(minimum) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{} needs CNI {minimum} or later (config: {version})",
                    env.command
                ),
            ));
        }
        Ok(())
    };
    match env.command.as_str() {
        "CHECK" => since("0.4.0")?,
        "STATUS" | "GC" => since("1.1.0")?,
        _ => {}
    }
    let conf: NetConf = serde_json::from_value(raw).map_err(|e| {
        CniError::new(code::INVALID_CONFIG, "invalid network configuration").details(e)
    })?;
    if env.command == "ADD" {
        for note in conf.ignored_options() {
            eprintln!("portfwd (CNI): note: {note}");
        }
    }
    match env.command.as_str() {
        "ADD" => add(env, &conf),
        "DEL" => del(env, &conf),
        "CHECK" => check(env, &conf),
        // Ready whenever it can run: ADD brings portfwd up if needed.
        "STATUS" => Ok(String::new()),
        // Mapping names record the attachment but not the network, so a
        // GC of one network cannot tell another network's stale mappings
        // from live ones: nothing is collected (DEL removes everything).
        _ => Ok(String::new()),
    }
}

fn version_info(stdin: &[u8]) -> String {
    let requested = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| supported(v))
        .unwrap_or_else(|| "1.0.0".to_owned());
    serde_json::json!({
        "cniVersion": requested,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The checked port mappings of a configuration, without duplicates.
fn port_maps(conf: &NetConf) -> Result<Vec<PortMap>, CniError> {
    let set: BTreeSet<PortMap> = conf
        .runtime_config
        .port_mappings
        .iter()
        .map(PortMapEntry::check)
        .collect::<Result<_, _>>()?;
    Ok(set.into_iter().collect())
}

fn prev_result(conf: &NetConf) -> Result<&Value, CniError> {
    match &conf.prev_result {
        Some(prev @ Value::Object(_)) => Ok(prev),
        Some(_) => Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult is not a JSON object",
        )),
        None => Err(CniError::new(
            code::INVALID_CONFIG,
            "no prevResult: portfwd must be chained after a plugin that configures the \
             container's interface (e.g. bridge with host-local), like portmap",
        )),
    }
}

/// Whether portfwd's maps and socket programs are pinned under `pin_dir`.
pub(crate) fn is_up(pin_dir: &Path) -> bool {
    ALL_MAPS.iter().all(|m| pin_dir.join(m).exists())
        && ["pf_connect4", "pf_connect6"]
            .iter()
            .all(|p| pin_dir.join("links").join(p).exists())
}

/// Whether there is any state to remove under `pin_dir`.
fn has_state(pin_dir: &Path) -> bool {
    ALL_MAPS.iter().any(|m| pin_dir.join(m).exists())
}

fn ensure_up(conf: &NetConf) -> Result<(), CniError> {
    let pin_dir = conf.pin_dir();
    if is_up(&pin_dir) {
        return Ok(());
    }
    let report = loader::up(&loader::UpOptions {
        pin_dir: pin_dir.clone(),
        cgroup: conf.cgroup.clone(),
        ifaces: conf.uplinks.clone(),
        ..Default::default()
    })
    .map_err(|e| {
        CniError::from_anyhow(
            code::UP_FAILED,
            format!("bringing portfwd up under {}", pin_dir.display()),
            &e,
        )
    })?;
    if !report.attached.is_empty() {
        let uplinks: Vec<&String> = report
            .uplinks_attached
            .iter()
            .chain(&report.uplinks_already)
            .collect();
        eprintln!(
            "portfwd (CNI): brought portfwd up under {} (uplinks: {})",
            pin_dir.display(),
            if uplinks.is_empty() {
                "none".to_owned()
            } else {
                uplinks
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    Ok(())
}

/// ADD: publish, then pass prevResult through.
fn add(env: &Env, conf: &NetConf) -> Result<String, CniError> {
    let (id, ifname) = env.attachment()?;
    let prev = prev_result(conf)?;
    let maps = port_maps(conf)?;
    if !maps.is_empty() {
        let addrs = container_addrs(prev, ifname)?;
        let groups = publications(&maps, addrs)?;
        ensure_up(conf)?;
        let pin_dir = conf.pin_dir();
        let name = attachment_name(id, ifname);
        // A repeated ADD of an attachment replaces its mappings.
        ops::withdraw(&pin_dir, Some(&name), &[], Missing::Ignore).map_err(|e| {
            CniError::from_anyhow(code::PUBLISH_FAILED, "removing earlier mappings", &e)
        })?;
        for (container, specs) in &groups {
            // The runtime may hold (or be about to bind) the host ports:
            // never refuse them, and hold them only when asked to.
            let options = ops::PublishOptions {
                refuse_ports_in_use: false,
                hold_ports: conf.hold_ports.unwrap_or(false),
            };
            if let Err(e) = ops::publish_with(&pin_dir, &name, *container, specs, options) {
                // All or nothing: undo the other family's mappings too.
                let _ = ops::withdraw(&pin_dir, Some(&name), &[], Missing::Ignore);
                return Err(CniError::from_anyhow(
                    code::PUBLISH_FAILED,
                    format!("publishing the ports of {name}"),
                    &e,
                ));
            }
        }
    }
    let mut result = prev.clone();
    result["cniVersion"] = Value::String(conf.cni_version.clone());
    Ok(result.to_string())
}

/// DEL: remove the attachment's mappings; nothing to remove is success.
fn del(env: &Env, conf: &NetConf) -> Result<String, CniError> {
    let (id, ifname) = env.attachment()?;
    let pin_dir = conf.pin_dir();
    if !has_state(&pin_dir) {
        return Ok(String::new());
    }
    let name = attachment_name(id, ifname);
    match ops::withdraw(&pin_dir, Some(&name), &[], Missing::Ignore) {
        Ok(_) => Ok(String::new()),
        // `portfwd down` ran meanwhile: the mappings are gone with it.
        Err(_) if !has_state(&pin_dir) => Ok(String::new()),
        Err(e) => Err(CniError::from_anyhow(
            code::PUBLISH_FAILED,
            format!("removing the mappings of {name}"),
            &e,
        )),
    }
}

/// What CHECK compares: a mapping without its interface index.
fn endpoint(m: &Mapping) -> (Protocol, SocketAddr, SocketAddr) {
    (m.protocol, m.host, m.container)
}

/// CHECK: the attachment's mappings are exactly those ADD published.
fn check(env: &Env, conf: &NetConf) -> Result<String, CniError> {
    let (id, ifname) = env.attachment()?;
    let prev = prev_result(conf)?;
    let maps = port_maps(conf)?;
    let name = attachment_name(id, ifname);
    let mut expected = BTreeSet::new();
    if !maps.is_empty() {
        let addrs = container_addrs(prev, ifname)?;
        for (container, specs) in publications(&maps, addrs)? {
            let planned = mapping::plan(&name, container, &specs, &[], |_, _| false)
                .map_err(|e| CniError::from_anyhow(code::INVALID_CONFIG, "planning", &e))?;
            expected.extend(planned.iter().map(endpoint));
        }
    }
    let pin_dir = conf.pin_dir();
    if !has_state(&pin_dir) {
        if expected.is_empty() {
            return Ok(String::new());
        }
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("portfwd is not up under {}", pin_dir.display()),
        ));
    }
    let all = ops::mappings(&pin_dir)
        .map_err(|e| CniError::from_anyhow(code::CHECK_FAILED, "reading the mappings", &e))?;
    let actual: BTreeSet<_> = all
        .iter()
        .filter(|m| m.name == name)
        .map(endpoint)
        .collect();
    let show = |set: Vec<&(Protocol, SocketAddr, SocketAddr)>| {
        set.iter()
            .map(|(p, h, c)| format!("{h}/{p} -> {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing: Vec<_> = expected.difference(&actual).collect();
    if !missing.is_empty() {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("mappings of {name} are missing"),
        )
        .details(show(missing)));
    }
    let extra: Vec<_> = actual.difference(&expected).collect();
    if !extra.is_empty() {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("{name} has mappings that its configuration does not ask for"),
        )
        .details(show(extra)));
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> PortMapEntry {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn names_fit_and_stay_unique() {
        assert_eq!(attachment_name("abc", "eth0"), "abc/eth0");
        let id = "73aac9b3093f7b14af23965d8d93a330aae356cc6012b9d14cc525864f8ab2f0";
        let name = attachment_name(id, "eth0");
        assert!(name.len() <= NAME_LEN, "{name}");
        assert!(
            name.starts_with(&id[..40]) && name.ends_with("/eth0"),
            "{name}"
        );
        let mut other = id.to_owned();
        other.replace_range(63.., "1");
        assert_ne!(attachment_name(&other, "eth0"), name);
        assert_ne!(attachment_name(id, "eth1"), name);
        let long_if = attachment_name(id, "abcdefghijklmno");
        assert!(long_if.len() <= NAME_LEN);
        mapping::check_name(&name).unwrap();
        mapping::check_name(&long_if).unwrap();
    }

    #[test]
    fn port_mappings_are_checked() {
        let m = entry(r#"{"hostPort":8080,"containerPort":80}"#)
            .check()
            .unwrap();
        assert_eq!(m.protocol, Protocol::Tcp);
        assert_eq!(m.host_ip, None);
        let m = entry(r#"{"hostPort":53,"containerPort":53,"protocol":"UDP","hostIP":"::1"}"#)
            .check()
            .unwrap();
        assert_eq!(m.protocol, Protocol::Udp);
        assert_eq!(m.host_ip, Some("::1".parse().unwrap()));
        for bad in [
            r#"{"hostPort":0,"containerPort":80}"#,
            r#"{"hostPort":70000,"containerPort":80}"#,
            r#"{"hostPort":80,"containerPort":-1}"#,
            r#"{"hostPort":80,"containerPort":80,"protocol":"sctp"}"#,
            r#"{"hostPort":80,"containerPort":80,"hostIP":"localhost"}"#,
        ] {
            let error = entry(bad).check().unwrap_err();
            assert_eq!(error.code, code::INVALID_CONFIG, "{bad}: {error}");
        }
    }

    #[test]
    fn addresses_come_from_the_named_sandbox_interface() {
        let prev: Value = serde_json::from_str(
            r#"{"interfaces":[{"name":"br0"},{"name":"eth0","sandbox":"/run/netns/x"},
                {"name":"eth1","sandbox":"/run/netns/x"}],
                "ips":[{"address":"10.0.0.1/24","interface":0},
                       {"address":"10.0.1.2/24","interface":2},
                       {"address":"10.0.0.2/24","interface":1},
                       {"address":"fd00::2/64","interface":1}]}"#,
        )
        .unwrap();
        let addrs = container_addrs(&prev, "eth0").unwrap();
        assert_eq!(addrs.v4, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(addrs.v6, Some("fd00::2".parse().unwrap()));
        let addrs = container_addrs(&prev, "eth1").unwrap();
        assert_eq!(addrs.v4, Some("10.0.1.2".parse().unwrap()));
        assert_eq!(addrs.v6, None);
        // No interface matches: the first address of each family.
        let addrs = container_addrs(&prev, "eth9").unwrap();
        assert_eq!(addrs.v4, Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn dual_stack_containers_get_each_family_to_its_own_address() {
        let maps = [entry(r#"{"hostPort":8080,"containerPort":80}"#)
            .check()
            .unwrap()];
        let both = ContainerAddrs {
            v4: Some("10.0.0.2".parse().unwrap()),
            v6: Some("fd00::2".parse().unwrap()),
        };
        let groups = publications(&maps, both).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].1[0].host_ip, Some(Ipv4Addr::UNSPECIFIED.into()));
        assert_eq!(groups[1].0, IpAddr::V6("fd00::2".parse().unwrap()));
        assert_eq!(groups[1].1[0].host_ip, Some(Ipv6Addr::UNSPECIFIED.into()));
        let v4_only = ContainerAddrs {
            v4: both.v4,
            v6: None,
        };
        let groups = publications(&maps, v4_only).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].1[0].host_ip, None);
        let v6_only = ContainerAddrs {
            v4: None,
            v6: both.v6,
        };
        let v4_host = [
            entry(r#"{"hostPort":8080,"containerPort":80,"hostIP":"127.0.0.1"}"#)
                .check()
                .unwrap(),
        ];
        assert_eq!(
            publications(&v4_host, v6_only).unwrap_err().code,
            code::INVALID_CONFIG
        );
        let none = ContainerAddrs { v4: None, v6: None };
        assert!(publications(&maps, none).is_err());
    }

    fn env(command: &str) -> Env {
        Env {
            command: command.into(),
            container_id: Some("c1".into()),
            ifname: Some("eth0".into()),
            ..Env::default()
        }
    }

    #[test]
    fn errors_before_touching_anything() {
        let err = run(&env("ADD"), b"{not json").unwrap_err();
        assert_eq!(err.code, code::DECODING_FAILURE);
        let err = run(&env("ADD"), br#"{"cniVersion":"9.9.9","name":"n"}"#).unwrap_err();
        assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
        let err = run(&env("ADD"), br#"{"name":"n"}"#).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        let err = run(&env("CHECK"), br#"{"cniVersion":"0.3.1","name":"n"}"#).unwrap_err();
        assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
        let err = run(&env("FROB"), b"{}").unwrap_err();
        assert_eq!(err.code, code::INVALID_ENVIRONMENT);
        let mut no_id = env("ADD");
        no_id.container_id = None;
        let conf = br#"{"cniVersion":"1.0.0","name":"n","prevResult":{}}"#;
        assert_eq!(
            run(&no_id, conf).unwrap_err().code,
            code::INVALID_ENVIRONMENT
        );
        // ADD without port mappings passes prevResult through, loading nothing.
        let out = run(&env("ADD"), conf).unwrap();
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out, serde_json::json!({"cniVersion":"1.0.0"}));
        let err = run(&env("ADD"), br#"{"cniVersion":"1.0.0","name":"n"}"#).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
    }

    #[test]
    fn version_lists_what_is_supported() {
        let out: Value = serde_json::from_str(&run(&env("VERSION"), b"").unwrap()).unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(out["supportedVersions"][2], "0.4.0");
        let out: Value =
            serde_json::from_str(&run(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#).unwrap())
                .unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
    }

    #[test]
    fn error_json_has_code_msg_details() {
        let json = CniError::new(7, "bad").details("why").to_json("0.4.0");
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"0.4.0","code":7,"msg":"bad","details":"why"})
        );
    }
}
