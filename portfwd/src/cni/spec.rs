//! The CNI protocol as the spec defines it: versions, the environment of
//! an invocation, error results. Hand-written: the types are small (spec
//! 1.0/1.1), and the one crate for them (`cni-plugin`) is unmaintained and
//! larger than what it would replace.

use std::fmt;

use serde_json::Value;

use serde::Serialize;

use crate::error::{self, cni_code as code};

/// The CNI versions this plugin speaks, oldest first.
pub(crate) const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CniError {
    pub(crate) code: u32,
    pub(crate) msg: String,
    pub(crate) details: String,
}

impl CniError {
    pub(crate) fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub(crate) fn details(mut self, details: impl fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// From a library error (see `error` for which code it gets).
    pub(crate) fn from_anyhow(code: u32, msg: impl Into<String>, error: &anyhow::Error) -> Self {
        CniError::new(error::cni_code_of(error, code), msg).details(format!("{error:#}"))
    }

    pub(crate) fn to_json(&self, cni_version: &str) -> String {
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

/// The CNI environment variables of one invocation that the plugin uses
/// (it needs neither the netns nor CNI_PATH: it runs in the host namespace
/// and calls no other plugin).
#[derive(Debug, Clone, Default)]
pub(crate) struct Env {
    pub(crate) command: String,
    pub(crate) container_id: Option<String>,
    pub(crate) ifname: Option<String>,
}

impl Env {
    pub(crate) fn from_process() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |name: &str| get(name).filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: nonempty("CNI_CONTAINERID"),
            ifname: nonempty("CNI_IFNAME"),
        }
    }

    /// The attachment: CNI_CONTAINERID and CNI_IFNAME, both checked.
    pub(crate) fn attachment(&self) -> Result<(&str, &str), CniError> {
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

/// Parses "a.b.c" into a comparable triple.
pub(crate) fn version_triple(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let triple = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(triple)
}

pub(crate) fn supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// The `cniVersion` an error result carries: the request's, when it is
/// one this plugin speaks.
pub(crate) fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| supported(v))
        .unwrap_or_else(|| "1.0.0".to_owned())
}

pub(crate) fn version_info(stdin: &[u8]) -> String {
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
