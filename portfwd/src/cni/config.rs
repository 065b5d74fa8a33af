//! The plugin's network configuration: the CNI fields it uses, `portmap`'s
//! options (runtimeConfig.portMappings) and its own, and the container's
//! addresses from prevResult.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use serde::Deserialize;
use serde_json::Value;

use super::spec::CniError;
use crate::{
    error::cni_code as code,
    instance,
    model::{Allowlist, Protocol},
};

/// The plugin's network configuration: the CNI fields it uses, `portmap`'s
/// options, and its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NetConf {
    pub(crate) cni_version: String,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "parsed so that a value of the wrong type is refused, as portmap does"
    )]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) runtime_config: RuntimeConfig,
    pub(crate) prev_result: Option<Value>,

    /// portmap: masquerade hairpin and localhost traffic (default true).
    /// portfwd needs no SNAT for localhost (its socket programs connect
    /// straight to the container) and masquerades hairpin flows itself:
    /// accepted and ignored.
    #[allow(
        dead_code,
        reason = "parsed so that a value of the wrong type is refused, as portmap does"
    )]
    pub(crate) snat: Option<bool>,
    /// portmap: masquerade all traffic to published ports. Ignored (noted).
    pub(crate) masq_all: Option<bool>,
    /// portmap: the mark bit of its SNAT. Accepted and ignored.
    #[allow(
        dead_code,
        reason = "parsed so that a value of the wrong type is refused, as portmap does"
    )]
    pub(crate) mark_masq_bit: Option<i64>,
    /// portmap: an external chain that sets the SNAT mark. Accepted and ignored.
    #[allow(
        dead_code,
        reason = "parsed so that a value of the wrong type is refused, as portmap does"
    )]
    pub(crate) external_set_mark_chain: Option<String>,
    /// portmap: iptables match conditions limiting its DNAT. Ignored (noted).
    #[serde(rename = "conditionsV4")]
    pub(crate) conditions_v4: Option<Vec<String>>,
    #[serde(rename = "conditionsV6")]
    pub(crate) conditions_v6: Option<Vec<String>>,

    /// portfwd: the pin directory (default /sys/fs/bpf/portfwd).
    pub(crate) bpffs: Option<PathBuf>,
    /// portfwd: uplinks for external traffic, used when ADD has to bring
    /// portfwd up (default, or empty: the interfaces of the default routes).
    #[serde(default)]
    pub(crate) uplinks: Vec<String>,
    /// portfwd: the cgroup v2 directory for the socket programs, used when
    /// ADD has to bring portfwd up (default: the cgroup2 mount).
    pub(crate) cgroup: Option<PathBuf>,
    /// portfwd: have portfwd's holder bind the published host ports, so no
    /// host process can take them (default false, as with portmap: podman's
    /// conmon binds them itself, after ADD; set it for nerdctl/containerd
    /// and Kubernetes hostPort).
    pub(crate) hold_ports: Option<bool>,
    /// portfwd: the source allowlist of every port this network publishes,
    /// as `portfwd map --allow` takes it: networks (CIDR or a bare
    /// address) and the keyword `host` for this host's processes. Absent:
    /// everyone may connect, as with portmap. (portmap's own way to limit
    /// sources, iptables `conditionsV4/V6`, has no meaning here.)
    pub(crate) allow: Option<Vec<String>>,
}

impl NetConf {
    /// The `allow` option, checked: an entry that is not a network or
    /// `host` makes the configuration invalid.
    pub(crate) fn allowlist(&self) -> Result<Option<Allowlist>, CniError> {
        let Some(entries) = &self.allow else {
            return Ok(None);
        };
        Allowlist::parse(entries).map(Some).map_err(|why| {
            CniError::new(code::INVALID_CONFIG, format!("invalid allow option: {why}"))
        })
    }

    pub(crate) fn pin_dir(&self) -> PathBuf {
        self.bpffs
            .clone()
            .unwrap_or_else(|| PathBuf::from(instance::DEFAULT_PIN_DIR))
    }

    /// Notes (on stderr) the portmap options that would change portmap's
    /// behaviour but mean nothing to portfwd. Defaults stay silent.
    pub(crate) fn ignored_options(&self) -> Vec<String> {
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
                     limit sources with portfwd's \"allow\" option, or publish on a specific hostIP"
                ));
            }
        }
        notes
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RuntimeConfig {
    #[serde(default)]
    pub(crate) port_mappings: Vec<PortMapEntry>,
}

/// One `runtimeConfig.portMappings` entry, as the runtimes write it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PortMapEntry {
    pub(crate) host_port: i64,
    pub(crate) container_port: i64,
    #[serde(default)]
    pub(crate) protocol: String,
    #[serde(rename = "hostIP", default)]
    pub(crate) host_ip: String,
}

/// A port mapping, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PortMap {
    pub(crate) host_ip: Option<IpAddr>,
    pub(crate) host_port: u16,
    pub(crate) container_port: u16,
    pub(crate) protocol: Protocol,
}

impl PortMapEntry {
    pub(crate) fn check(&self) -> Result<PortMap, CniError> {
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
pub(crate) struct ContainerAddrs {
    pub(crate) v4: Option<Ipv4Addr>,
    pub(crate) v6: Option<Ipv6Addr>,
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
pub(crate) fn container_addrs(prev: &Value, ifname: &str) -> Result<ContainerAddrs, CniError> {
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

/// The checked port mappings of a configuration, without duplicates.
pub(crate) fn port_maps(conf: &NetConf) -> Result<Vec<PortMap>, CniError> {
    let set: BTreeSet<PortMap> = conf
        .runtime_config
        .port_mappings
        .iter()
        .map(PortMapEntry::check)
        .collect::<Result<_, _>>()?;
    Ok(set.into_iter().collect())
}

pub(crate) fn prev_result(conf: &NetConf) -> Result<&Value, CniError> {
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
