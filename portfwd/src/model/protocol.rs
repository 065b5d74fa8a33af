//! Transport protocols and port ranges, as the `-p` grammar and the maps
//! use them.

use std::{fmt, str::FromStr};

use crate::error::Error;

/// Transport protocol of a publication.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// The `IPPROTO_*` number, as used in IP headers and by the eBPF side.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Protocol::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Protocol::Udp)
        } else if s.eq_ignore_ascii_case("sctp") {
            // Docker accepts sctp, so say plainly that this is a limitation
            // rather than calling a well-known protocol "unknown".
            Err(Error::parse("sctp is not supported (only tcp and udp)"))
        } else if s.is_empty() {
            Err(Error::parse("protocol is empty"))
        } else {
            Err(Error::parse(format!(
                "unknown protocol {s:?} (expected tcp or udp)"
            )))
        }
    }
}

/// Inclusive port range; start <= end, both in 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

/// Automatic host ports come from this range, as in docker.
pub const AUTO_PORTS: PortRange = PortRange {
    start: 49153,
    end: 60999,
};

impl PortRange {
    /// # Panics
    /// If `p` is 0, which is never a valid port to forward.
    pub const fn single(p: u16) -> Self {
        assert!(p != 0, "port 0 is not a valid port");
        PortRange { start: p, end: p }
    }

    /// Number of ports; u32 because 1-65535 holds 65535 ports and a reversed
    /// (invalid) range must not underflow.
    pub fn len(self) -> u32 {
        (u32::from(self.end) + 1).saturating_sub(u32::from(self.start))
    }

    /// Always false for a range that upholds the invariant; it exists so a
    /// hand-built reversed range can be detected.
    pub fn is_empty(self) -> bool {
        self.start > self.end
    }

    pub fn is_single(self) -> bool {
        self.start == self.end
    }

    pub fn iter(self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }

    pub fn contains(self, p: u16) -> bool {
        self.start <= p && p <= self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PortRange {
    type Err = Error;

    /// Error messages start with "port" so the publish parser can prefix them
    /// with "host " or "container ".
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(Error::parse("port is empty"));
        }
        let (start, end) = s.split_once('-').unwrap_or((s, s));
        let range = PortRange {
            start: parse_port(start, s)?,
            end: parse_port(end, s)?,
        };
        if range.is_empty() {
            return Err(Error::parse(format!("port range {s} is reversed")));
        }
        Ok(range)
    }
}

/// Parses one port of `whole`, the range text it came from; errors quote the
/// whole range because "80-" is clearer than an empty string.
fn parse_port(p: &str, whole: &str) -> Result<u16, Error> {
    // Checking digits first rejects "+80" and " 80", which u16::from_str would
    // partly accept, and leaves overflow as the only possible parse failure.
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::parse(format!(
            "port {whole:?} is not a number or a range"
        )));
    }
    match p.parse() {
        Ok(0) | Err(_) => Err(Error::parse(format!("port {p} is out of range 1-65535"))),
        Ok(port) => Ok(port),
    }
}
