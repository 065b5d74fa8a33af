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
    io::{Read, Write},
    net::SocketAddr,
    path::Path,
    process::ExitCode,
};

use portfwd_common::MAPS;
use serde_json::Value;

use crate::{
    error::cni_code as code,
    model::{self, Allowlist, Mapping, Protocol},
    ops::{self, Missing},
};

mod config;
mod portmap;
mod spec;

use config::{NetConf, container_addrs, port_maps, prev_result};
use portmap::{attachment_name, publications};
use spec::{
    CniError, Env, SUPPORTED_VERSIONS, error_version, supported, version_info, version_triple,
};

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
                // The runtime reads this; if stdout is gone, nobody can be told.
                writeln!(out, "{text}").ok();
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("portfwd (CNI {}): {error}", env.command);
            writeln!(out, "{}", error.to_json(&error_version(&stdin))).ok();
            ExitCode::FAILURE
        }
    }
}

/// One invocation: what to print on stdout, or the error.
pub(crate) fn run(env: &Env, stdin: &[u8]) -> Result<String, CniError> {
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

/// Whether there is any state to remove under `pin_dir`.
fn has_state(pin_dir: &Path) -> bool {
    MAPS.iter().any(|m| pin_dir.join(m.name).exists())
}

fn ensure_up(conf: &NetConf) -> Result<(), CniError> {
    let pin_dir = conf.pin_dir();
    if ops::is_up(&pin_dir) {
        return Ok(());
    }
    let report = ops::up(&ops::UpOptions {
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
    let install = &report.install;
    if !install.attached.is_empty() {
        let uplinks: Vec<&String> = install
            .uplinks_attached
            .iter()
            .chain(&install.uplinks_already)
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
    let allow = conf.allowlist()?;
    if !maps.is_empty() {
        let addrs = container_addrs(prev, ifname)?;
        let groups = publications(&maps, addrs)?;
        ensure_up(conf)?;
        let pin_dir = conf.pin_dir();
        let name = attachment_name(id, ifname);
        model::check_name(&name)
            .map_err(|e| CniError::from_anyhow(code::INVALID_ENVIRONMENT, "CNI_CONTAINERID", &e))?;
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
                allow: allow.clone(),
            };
            if let Err(e) = ops::publish_with(&pin_dir, &name, *container, specs, options) {
                // All or nothing: undo the other family's mappings too.
                let mut error = CniError::from_anyhow(
                    code::PUBLISH_FAILED,
                    format!("publishing the ports of {name}"),
                    &e,
                );
                if let Err(undo) = ops::withdraw(&pin_dir, Some(&name), &[], Missing::Ignore) {
                    error.details = format!("{}; and undoing the rest: {undo:#}", error.details);
                }
                return Err(error);
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
    let allow = conf.allowlist()?;
    let name = attachment_name(id, ifname);
    let mut expected = BTreeSet::new();
    if !maps.is_empty() {
        let addrs = container_addrs(prev, ifname)?;
        for (container, specs) in publications(&maps, addrs)? {
            let planned = model::plan(&name, container, &specs, &[], |_, _| false)
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
    let want_allow = |m: &Mapping| allow.as_ref().map(|a| a.for_family(m.host.is_ipv4()));
    if let Some(m) = all
        .iter()
        .find(|m| m.name == name && m.allow != want_allow(m))
    {
        let shown = |list: Option<Allowlist>| list.map_or("everyone".to_owned(), |l| l.to_string());
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!(
                "{name} allows {} on {}/{}, its configuration {}",
                shown(m.allow.clone()),
                m.host,
                m.protocol,
                shown(want_allow(m))
            ),
        ));
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use portfwd_common::NAME_LEN;

    use super::*;
    use crate::cni::config::{ContainerAddrs, PortMapEntry};

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
        model::check_name(&name).unwrap();
        model::check_name(&long_if).unwrap();
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
