//! Source allowlists (`portfwd map --allow`): which clients may start a flow
//! to a mapping, and their encoding as `pf_allow` LPM trie keys.

use std::{fmt, net::IpAddr, str::FromStr};

use portfwd_common::{ALLOW_SERVICE_BITS, Addr, AllowKey, FAMILY_V4, ServiceKey};
use serde::{Deserialize, Serialize};

/// The keyword that lets the host's own processes (the socket path) in.
const HOST_KEYWORD: &str = "host";

/// A client network: an address and a prefix length, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Network {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Network {
    fn max_prefix(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        masked(ip, self.prefix) == self.addr
    }
}

/// `ip` with the bits after the first `prefix` cleared.
fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

impl FromStr for Network {
    type Err = String;

    /// `ADDR/PREFIX`, or a bare address (one host).
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid allowed source {text:?}: {why}");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("expected a CIDR such as 10.0.0.0/8 or 2001:db8::/32, or `host`"))?;
        let max = Self::max_prefix(addr);
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` also takes a leading `+`.
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(bad(&format!("the prefix length must be 0 to {max}"))),
            },
        };
        if masked(addr, prefix) != addr {
            return Err(bad(&format!(
                "host bits are set (did you mean {}/{prefix}?)",
                masked(addr, prefix)
            )));
        }
        Ok(Network { addr, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What a client outside the list gets (`--refuse`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Refuse {
    /// What a closed port gives: a TCP reset, an ICMP port unreachable.
    #[default]
    Reject,
    /// Nothing: the packet is dropped.
    Drop,
}

impl Refuse {
    pub fn as_str(self) -> &'static str {
        match self {
            Refuse::Reject => "reject",
            Refuse::Drop => "drop",
        }
    }

    pub fn is_reject(&self) -> bool {
        *self == Refuse::Reject
    }
}

impl FromStr for Refuse {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "reject" => Ok(Refuse::Reject),
            "drop" => Ok(Refuse::Drop),
            _ => Err(format!(
                "invalid refusal {text:?}: expected `reject` (a TCP reset, an ICMP port unreachable) or `drop` (no answer)"
            )),
        }
    }
}

impl fmt::Display for Refuse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mapping's source allowlist: client networks, whether the host's own
/// processes may connect, and what the others get. Stored and shown as a
/// list of strings (`["10.0.0.0/8", "host"]`); the refusal is stored
/// beside it (see `model::files`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Allowlist {
    pub host: bool,
    /// Sorted, without duplicates.
    pub networks: Vec<Network>,
    /// What a refused external client gets (host processes get EPERM).
    pub refuse: Refuse,
}

impl Allowlist {
    /// Parses entries, each a CIDR, a bare address or `host`; an entry may
    /// hold several, comma-separated (`--allow 10.0.0.0/8,host`).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut list = Allowlist::default();
        for entry in entries {
            for item in entry.as_ref().split(',') {
                let item = item.trim();
                if item == HOST_KEYWORD {
                    list.host = true;
                } else {
                    list.networks.push(item.parse()?);
                }
            }
        }
        list.networks.sort();
        list.networks.dedup();
        Ok(list)
    }

    /// The list as a mapping of one family keeps it: a network of the other
    /// family can never match its clients (and has no key: see `keys`).
    pub fn for_family(&self, v4: bool) -> Allowlist {
        Allowlist {
            host: self.host,
            refuse: self.refuse,
            networks: self
                .networks
                .iter()
                .filter(|n| n.addr.is_ipv4() == v4)
                .copied()
                .collect(),
        }
    }

    /// Whether a client at `ip` (None: a host process) may start a flow.
    pub fn allows(&self, client: Option<IpAddr>) -> bool {
        match client {
            None => self.host,
            Some(ip) => self.networks.iter().any(|n| n.contains(ip)),
        }
    }

    /// The `pf_allow` keys of the mapping `service`: (prefix length, key)
    /// for each network of the mapping's family (a network of the other
    /// family can never match its clients).
    pub fn keys(&self, service: &ServiceKey) -> Vec<(u32, AllowKey)> {
        self.networks
            .iter()
            .filter(|n| (n.addr.is_ipv4()) == (service.family == FAMILY_V4))
            .map(|n| {
                let (_, client) = Addr::from_ip(n.addr);
                (
                    ALLOW_SERVICE_BITS + u32::from(n.prefix),
                    AllowKey {
                        service: *service,
                        client,
                    },
                )
            })
            .collect()
    }

    /// Decodes one `pf_allow` key (for the mapping `key.service`).
    pub fn network_of(prefix_len: u32, key: &AllowKey) -> Option<Network> {
        let prefix = u8::try_from(prefix_len.checked_sub(ALLOW_SERVICE_BITS)?).ok()?;
        let addr = key.client.to_ip(key.service.family)?;
        (prefix <= Network::max_prefix(addr)).then_some(Network { addr, prefix })
    }

    pub fn strings(&self) -> Vec<String> {
        let mut out: Vec<String> = self.networks.iter().map(Network::to_string).collect();
        if self.host {
            out.push(HOST_KEYWORD.to_owned());
        }
        out
    }
}

impl TryFrom<Vec<String>> for Allowlist {
    type Error = String;

    fn try_from(entries: Vec<String>) -> Result<Self, String> {
        Allowlist::parse(&entries)
    }
}

impl From<Allowlist> for Vec<String> {
    fn from(list: Allowlist) -> Self {
        list.strings()
    }
}

impl fmt::Display for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let strings = self.strings();
        if strings.is_empty() {
            f.write_str("nobody")
        } else {
            f.write_str(&strings.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use portfwd_common::{FAMILY_V6, IPPROTO_TCP};

    use super::*;

    #[test]
    fn entries_parse_as_networks_and_the_host_keyword() {
        let list = Allowlist::parse(&["10.0.0.0/8,host", "2001:db8::/32", "192.0.2.7"]).unwrap();
        assert!(list.host);
        assert_eq!(
            list.strings(),
            ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "host"]
        );
        let again = Allowlist::parse(&list.strings()).unwrap();
        assert_eq!(again, list);
        assert_eq!(
            serde_json::to_string(&list).unwrap(),
            r#"["10.0.0.0/8","192.0.2.7/32","2001:db8::/32","host"]"#
        );
    }

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        for (text, why) in [
            ("10.0.0.0/33", "prefix length must be 0 to 32"),
            ("2001:db8::/129", "0 to 128"),
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/+8", "prefix length"),
            ("10.0.0.0/", "prefix length"),
            ("localhost", "expected a CIDR"),
            ("", "expected a CIDR"),
            ("10.0.0.0/8,,host", "expected a CIDR"),
        ] {
            let error = Allowlist::parse(&[text]).unwrap_err();
            assert!(error.contains(why), "{text}: {error}");
        }
    }

    #[test]
    fn membership_follows_the_prefix() {
        let list = Allowlist::parse(&["10.1.0.0/16", "2001:db8::/64", "0.0.0.0/0"]).unwrap();
        assert!(list.allows(Some("10.1.2.3".parse().unwrap())));
        assert!(list.allows(Some("192.0.2.1".parse().unwrap())));
        assert!(!list.allows(Some("2001:db8:1::1".parse().unwrap())));
        assert!(list.allows(Some("2001:db8::9".parse().unwrap())));
        assert!(!list.allows(None));
        let only_v6 = Allowlist::parse(&["2001:db8::/64"]).unwrap();
        assert!(!only_v6.allows(Some("10.1.2.3".parse().unwrap())));
        assert_eq!(
            list.for_family(true).strings(),
            ["0.0.0.0/0", "10.1.0.0/16"]
        );
        assert_eq!(list.for_family(false).strings(), ["2001:db8::/64"]);
    }

    #[test]
    fn keys_hold_the_mapping_and_the_network_of_its_family() {
        let list = Allowlist::parse(&["10.1.0.0/16", "2001:db8::/64", "host"]).unwrap();
        let (family, addr) = Addr::from_ip("0.0.0.0".parse().unwrap());
        let v4 = ServiceKey::new(family, addr, 8080u16.to_be(), IPPROTO_TCP);
        let keys = list.keys(&v4);
        assert_eq!(keys.len(), 1);
        let (prefix_len, key) = keys[0];
        assert_eq!(prefix_len, 160 + 16);
        assert_eq!(key.service, v4);
        // Network byte order: the LPM trie matches the address's bytes.
        assert_eq!(key.client.words[0].to_ne_bytes(), [10, 1, 0, 0]);
        assert_eq!(
            Allowlist::network_of(prefix_len, &key).unwrap().to_string(),
            "10.1.0.0/16"
        );
        let v6 = ServiceKey::new(FAMILY_V6, Addr::UNSPECIFIED, 8080u16.to_be(), IPPROTO_TCP);
        let keys = list.keys(&v6);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, 160 + 64);
        assert_eq!(
            Allowlist::network_of(keys[0].0, &keys[0].1)
                .unwrap()
                .to_string(),
            "2001:db8::/64"
        );
        assert_eq!(Allowlist::network_of(100, &keys[0].1), None);
    }
}
