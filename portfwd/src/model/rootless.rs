//! Rootless publishing, as plain data: the administrator's policy
//! (`/etc/portfwd/rootless.toml`), the private address pool the ways into
//! user namespaces take their addresses from, the names of rootless
//! mappings (which carry their owner's uid) and the API's requests and
//! replies (one JSON object per line).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use super::{ListedMapping, Mapping, Network, PortRange, Refuse};

/// The default IPv4 pool: part of 198.18.0.0/15, reserved for benchmarking
/// (RFC 2544), never routed on the Internet and rarely configured on hosts
/// (unlike 10/8, 172.16/12, 192.168/16, or 100.64/10 which Tailscale and
/// carrier NAT use). One /31 per namespace: 32768 namespaces.
pub(crate) const DEFAULT_POOL_V4: &str = "198.19.0.0/16";
/// The default IPv6 pool: a unique local /64 of portfwd's own ("portfwd"
/// in ASCII, truncated); one /127 per namespace.
pub(crate) const DEFAULT_POOL_V6: &str = "fd70:6f72:7466:7764::/64";
/// The most mappings a user may have when the policy does not say.
pub(crate) const DEFAULT_MAX_MAPPINGS: usize = 64;
/// The longest request line the API reads; longer is refused.
pub(crate) const MAX_REQUEST_LEN: usize = 8 * 1024;
/// The most PUBLISH specs one request may carry.
pub(crate) const MAX_SPECS: usize = 16;

/// The administrator's policy. No file: no rootless publishing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Policy {
    /// Users (names or numeric uids) who may publish.
    #[serde(default)]
    pub(crate) users: Vec<String>,
    /// Groups (names or numeric gids) whose members may publish.
    #[serde(default)]
    pub(crate) groups: Vec<String>,
    /// Host ports users may publish, e.g. "1024-65535" (the default).
    #[serde(default = "default_ports")]
    pub(crate) ports: String,
    /// Host addresses users may publish on; empty: any (the wildcards
    /// included).
    #[serde(default)]
    pub(crate) host_addresses: Vec<IpAddr>,
    /// The most mappings (one per host port, protocol and family) per user.
    #[serde(default = "default_max_mappings")]
    pub(crate) max_mappings: usize,
    #[serde(default = "default_pool_v4")]
    pub(crate) pool_v4: String,
    #[serde(default = "default_pool_v6")]
    pub(crate) pool_v6: String,
}

fn default_ports() -> String {
    "1024-65535".into()
}
fn default_max_mappings() -> usize {
    DEFAULT_MAX_MAPPINGS
}
fn default_pool_v4() -> String {
    DEFAULT_POOL_V4.into()
}
fn default_pool_v6() -> String {
    DEFAULT_POOL_V6.into()
}

impl Policy {
    /// Parses and checks a policy file's text; the error is one line.
    pub(crate) fn parse(text: &str) -> Result<(Policy, PortRange, Pool), String> {
        let policy: Policy = toml::from_str(text)
            .map_err(|e| e.message().lines().next().unwrap_or("").to_owned())?;
        let ports: PortRange = policy
            .ports
            .parse()
            .map_err(|e| format!("ports {:?}: {e}", policy.ports))?;
        let pool = Pool::new(&policy.pool_v4, &policy.pool_v6)?;
        Ok((policy, ports, pool))
    }

    /// Whether the user (by uid and name) or one of their groups (gids and
    /// names) is listed.
    pub(crate) fn admits(&self, uid: u32, user: &str, groups: &[(u32, String)]) -> bool {
        let named = |list: &[String], id: u32, name: &str| {
            list.iter()
                .any(|entry| entry == name || *entry == id.to_string())
        };
        named(&self.users, uid, user)
            || groups
                .iter()
                .any(|(gid, name)| named(&self.groups, *gid, name))
    }

    /// Why a host address may not be published on, if it may not.
    pub(crate) fn refuses_address(&self, ip: IpAddr) -> Option<String> {
        (!self.host_addresses.is_empty() && !self.host_addresses.contains(&ip)).then(|| {
            let allowed: Vec<String> = self.host_addresses.iter().map(|a| a.to_string()).collect();
            format!(
                "host address {ip} is not allowed by the policy (allowed: {})",
                allowed.join(", ")
            )
        })
    }
}

/// The private pool of the ways in: slot N is the pair of addresses
/// (host end, namespace end) N*2 and N*2+1 of each family's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pool {
    pub(crate) v4: Network,
    pub(crate) v6: Network,
}

/// The addresses of one way in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) index: u32,
    pub(crate) host_v4: Ipv4Addr,
    pub(crate) ns_v4: Ipv4Addr,
    pub(crate) host_v6: Ipv6Addr,
    pub(crate) ns_v6: Ipv6Addr,
}

impl Slot {
    /// The host end of the veth pair: its name says which slot it is, so
    /// that the service finds it again after a restart.
    pub(crate) fn host_ifname(&self) -> String {
        format!("pfr{}", self.index)
    }

    /// Whether `name` is the host end of a way in.
    pub(crate) fn is_host_ifname(name: &str) -> bool {
        Slot::index_of(name).is_some()
    }

    /// The slot whose host end `name` is.
    pub(crate) fn index_of(name: &str) -> Option<u32> {
        name.strip_prefix("pfr")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))?
            .parse()
            .ok()
    }

    /// The namespace end: the slot keeps it from clashing with a way in an
    /// earlier service made into the same namespace.
    pub(crate) fn ns_ifname(&self) -> String {
        format!("portfwd{}", self.index)
    }
}

/// The prefix lengths of a point-to-point pair.
pub(crate) const PAIR_PREFIX_V4: u8 = 31;
pub(crate) const PAIR_PREFIX_V6: u8 = 127;

impl Pool {
    pub(crate) fn new(v4: &str, v6: &str) -> Result<Pool, String> {
        let parse = |text: &str, want_v4: bool, longest: u8| -> Result<Network, String> {
            let bad = |why: &str| format!("pool {text:?}: {why}");
            let (addr, prefix) = text
                .split_once('/')
                .ok_or_else(|| bad("expected ADDRESS/PREFIX"))?;
            let addr = IpAddr::from_str(addr).map_err(|_| bad("not an address"))?;
            let prefix: u8 = prefix.parse().map_err(|_| bad("not a prefix length"))?;
            if addr.is_ipv4() != want_v4 {
                return Err(bad(if want_v4 {
                    "pool_v4 must be IPv4"
                } else {
                    "pool_v6 must be IPv6"
                }));
            }
            if prefix > longest {
                return Err(bad(&format!("the prefix must be /{longest} or shorter")));
            }
            let network = Network { addr, prefix };
            if !network.contains(addr) || network_base(network) != addr {
                return Err(bad("host bits are set"));
            }
            Ok(network)
        };
        Ok(Pool {
            v4: parse(v4, true, 30)?,
            v6: parse(v6, false, 126)?,
        })
    }

    /// How many namespaces the pool serves (the smaller family's count).
    pub(crate) fn capacity(&self) -> u32 {
        let pairs = |bits: u32| 1u64.checked_shl(bits - 1).unwrap_or(u64::MAX);
        let v4 = pairs(32 - u32::from(self.v4.prefix));
        let v6 = pairs(128 - u32::from(self.v6.prefix));
        v4.min(v6).min(u64::from(u32::MAX)) as u32
    }

    pub(crate) fn slot(&self, index: u32) -> Option<Slot> {
        if index >= self.capacity() {
            return None;
        }
        let (IpAddr::V4(base4), IpAddr::V6(base6)) = (self.v4.addr, self.v6.addr) else {
            return None;
        };
        let v4 = u32::from(base4) + index * 2;
        let v6 = u128::from(base6) + u128::from(index) * 2;
        Some(Slot {
            index,
            host_v4: v4.into(),
            ns_v4: (v4 + 1).into(),
            host_v6: v6.into(),
            ns_v6: (v6 + 1).into(),
        })
    }
}

fn network_base(network: Network) -> IpAddr {
    match network.addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(network.prefix))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(network.prefix))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// The prefix of every rootless mapping name of `uid`: `list` shows the
/// owner, and a user names (and so removes) only their own.
pub(crate) fn owner_prefix(uid: u32) -> String {
    format!("u{uid}.")
}

/// Whether a mapping name is a rootless one (`u<UID>.<NAME>`): such names
/// are the service's.
pub(crate) fn is_rootless_name(name: &str) -> bool {
    name.strip_prefix('u')
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(uid, _)| !uid.is_empty() && uid.parse::<u32>().is_ok())
}

/// Whether `mapping` is one of `uid`'s rootless mappings.
pub(crate) fn owned_by(mapping: &Mapping, uid: u32) -> bool {
    mapping.name.starts_with(&owner_prefix(uid))
}

/// What `{"op": "map", ...}` asks: publish ports of the namespace `netns`
/// (a pid, or a path to a network namespace file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MapRequest {
    pub(crate) netns: String,
    #[serde(default)]
    pub(crate) name: Option<String>,
    pub(crate) publish: Vec<String>,
    /// `--allow`: the clients that may connect (none: everyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) allow: Vec<String>,
    /// `--refuse`: what the others get (with `allow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) refuse: Option<Refuse>,
}

impl MapRequest {
    /// The request's own limits, before any work.
    fn check(&self) -> Result<(), String> {
        if self.publish.is_empty() || self.publish.len() > MAX_SPECS {
            return Err(format!("map needs 1 to {MAX_SPECS} PUBLISH specs"));
        }
        if self.allow.len() > MAX_SPECS {
            return Err(format!("map takes at most {MAX_SPECS} --allow"));
        }
        if self.refuse.is_some() && self.allow.is_empty() {
            return Err("--refuse needs --allow".into());
        }
        if self.netns.is_empty() || self.netns.len() > 4096 {
            return Err("netns must be a pid or a path".into());
        }
        if let Some(name) = &self.name {
            check_user_name(name)?;
        }
        Ok(())
    }
}

/// A request on the API socket: one JSON object on one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Request {
    /// Publish ports of a namespace of the caller's.
    Map(MapRequest),
    /// Remove the caller's mappings of a name and/or on host ports.
    Unmap {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        selectors: Vec<String>,
    },
    /// The caller's mappings (root: every mapping); with `json`, as one
    /// JSON document (`listing_json`).
    List {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        json: bool,
    },
}

/// `{"mappings": [...]}`, as root's `list --json` begins.
pub(crate) fn listing_json(mappings: &[Mapping]) -> String {
    let mappings: Vec<ListedMapping> = mappings.iter().map(ListedMapping::from).collect();
    let document = serde_json::json!({ "mappings": mappings });
    // Serialising plain data cannot fail.
    serde_json::to_string_pretty(&document).unwrap_or_default()
}

/// The reply: `ok` with lines to print, or one line saying why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) lines: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// Whether the error is the caller's (exit status 2) rather than a
    /// refusal or a failure (1).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) usage: bool,
}

impl Reply {
    pub(crate) fn lines(lines: Vec<String>) -> Reply {
        Reply {
            ok: true,
            lines,
            error: None,
            usage: false,
        }
    }

    pub(crate) fn refused(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            lines: Vec::new(),
            error: Some(one_line(&error.into())),
            usage: false,
        }
    }
}

/// The first line of a message: every refusal is one line.
pub(crate) fn one_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_owned()
}

/// Parses one request line; the error is one line. Bounded: longer lines,
/// too many specs and over-long fields are refused before any work.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_LEN {
        return Err(format!("request longer than {MAX_REQUEST_LEN} bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_owned())?;
    let request: Request = serde_json::from_str(text.trim_end_matches(['\n', '\r']))
        .map_err(|e| format!("malformed request: {}", one_line(&e.to_string())))?;
    match &request {
        Request::Map(map) => map.check()?,
        Request::Unmap { name, selectors } => {
            if name.is_none() && selectors.is_empty() {
                return Err("unmap needs a name or at least one [HOSTIP:]HOSTPORT[/PROTO]".into());
            }
            if selectors.len() > MAX_SPECS {
                return Err(format!("unmap takes at most {MAX_SPECS} selectors"));
            }
            if let Some(name) = name {
                check_user_name(name)?;
            }
        }
        Request::List { .. } => {}
    }
    Ok(request)
}

/// A name as a user gives it (the service prefixes the owner): printable,
/// no spaces, short enough that the prefixed name fits the map's field.
pub(crate) fn check_user_name(name: &str) -> Result<(), String> {
    // "u4294967295." is 12 bytes; the map's field is 64.
    const MAX: usize = portfwd_common::NAME_LEN - 12;
    if name.is_empty() || name.len() > MAX {
        return Err(format!(
            "invalid name {name:?}: it must be 1 to {MAX} bytes long"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(format!(
            "invalid name {name:?}: use letters, digits and - _ . :"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_default_pool_gives_pairs() {
        let pool = Pool::new(DEFAULT_POOL_V4, DEFAULT_POOL_V6).unwrap();
        assert_eq!(pool.capacity(), 32768);
        let slot = pool.slot(3).unwrap();
        assert_eq!(slot.host_v4, Ipv4Addr::new(198, 19, 0, 6));
        assert_eq!(slot.ns_v4, Ipv4Addr::new(198, 19, 0, 7));
        assert_eq!(
            slot.ns_v6,
            "fd70:6f72:7466:7764::7".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            slot.host_v6,
            "fd70:6f72:7466:7764::6".parse::<Ipv6Addr>().unwrap()
        );
        assert!(pool.slot(32768).is_none());
        assert_eq!(slot.host_ifname(), "pfr3");
        assert!(Slot::is_host_ifname("pfr3"));
        assert!(!Slot::is_host_ifname("pfr") && !Slot::is_host_ifname("pfrx"));
        assert_eq!(Slot::index_of("pfr12"), Some(12));
        assert_eq!(Slot::index_of("pfr+1"), None);
        assert!(is_rootless_name("u1001.web") && !is_rootless_name("u.web"));
        assert!(!is_rootless_name("user.web") && !is_rootless_name("10.0.0.2"));
    }

    #[test]
    fn bad_pools_are_refused() {
        assert!(Pool::new("198.19.0.1/16", DEFAULT_POOL_V6).is_err());
        assert!(Pool::new("198.19.0.0/31", DEFAULT_POOL_V6).is_err());
        assert!(Pool::new("fd00::/64", DEFAULT_POOL_V6).is_err());
        assert!(Pool::new(DEFAULT_POOL_V4, "10.0.0.0/8").is_err());
        assert!(Pool::new(DEFAULT_POOL_V4, "fd00::").is_err());
        assert_eq!(
            Pool::new("10.9.0.0/30", "fd00::/126").unwrap().capacity(),
            2
        );
    }

    #[test]
    fn policies_parse_with_defaults() {
        let (policy, ports, pool) = Policy::parse("users = [\"alice\", \"1001\"]\n").unwrap();
        assert_eq!(ports, "1024-65535".parse().unwrap());
        assert_eq!(policy.max_mappings, DEFAULT_MAX_MAPPINGS);
        assert_eq!(pool.capacity(), 32768);
        assert!(policy.admits(1001, "bob", &[]));
        assert!(policy.admits(7, "alice", &[]));
        assert!(!policy.admits(7, "mallory", &[(1001, "x".into())]));
        let (grouped, _, _) = Policy::parse("groups = [\"pf\"]").unwrap();
        assert!(grouped.admits(7, "mallory", &[(50, "pf".into())]));
        assert!(Policy::parse("userz = []").is_err());
        assert!(Policy::parse("ports = \"0-10\"").is_err());
        assert!(Policy::parse("pool_v4 = \"1.2.3.4\"").is_err());
        let (limited, _, _) = Policy::parse("host_addresses = [\"127.0.0.1\"]").unwrap();
        assert!(
            limited
                .refuses_address("0.0.0.0".parse().unwrap())
                .is_some()
        );
        assert!(
            limited
                .refuses_address("127.0.0.1".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(br#"{"op":"map","netns":"42","publish":["8080:80"]}"#).unwrap(),
            Request::Map(MapRequest {
                netns: "42".into(),
                name: None,
                publish: vec!["8080:80".into()],
                allow: Vec::new(),
                refuse: None,
            })
        );
        // A field the service does not know is refused, not ignored.
        assert!(parse_request(br#"{"op":"map","netns":"42","publish":["80"],"user":0}"#).is_err());
        assert_eq!(
            parse_request(b"{\"op\":\"list\"}\n").unwrap(),
            Request::List { json: false }
        );
        assert_eq!(
            parse_request(br#"{"op":"list","json":true}"#).unwrap(),
            Request::List { json: true }
        );
        for bad in [
            &b"{\"op\":\"map\",\"netns\":\"1\",\"publish\":[]}"[..],
            b"{\"op\":\"unmap\"}",
            b"{\"op\":\"list\",\"uid\":0}",
            b"{\"op\":\"map\",\"netns\":\"1\",\"publish\":[\"80\"],\"refuse\":\"drop\"}",
            b"{\"op\":\"map\",\"netns\":\"1\",\"publish\":[\"80\"],\"allow\":[\"host\"],\"refuse\":\"x\"}",
            b"{\"op\":\"map\",\"netns\":\"1\",\"name\":\"a b\",\"publish\":[\"80\"]}",
            b"\xff",
            b"",
            b"[]",
        ] {
            let error = parse_request(bad).unwrap_err();
            assert!(!error.contains('\n'), "{error}");
        }
        assert!(parse_request(&vec![b' '; MAX_REQUEST_LEN + 1]).is_err());
    }

    proptest! {
        /// Any bytes: a request or a one-line error, never a panic.
        #[test]
        fn the_request_parser_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            match parse_request(&bytes) {
                Ok(_) => {}
                Err(error) => prop_assert!(!error.contains('\n') && !error.is_empty()),
            }
        }

        /// Near-valid JSON: fields shuffled, values of other types.
        #[test]
        fn the_request_parser_takes_any_json(
            op in prop::sample::select(vec!["map", "unmap", "list", "x"]),
            netns in prop::option::of(".{0,20}"),
            name in prop::option::of(".{0,80}"),
            publish in prop::collection::vec(".{0,12}", 0..20),
        ) {
            let mut object = serde_json::json!({ "op": op, "publish": publish });
            if let Some(netns) = netns { object["netns"] = netns.into(); }
            if let Some(name) = name { object["name"] = name.into(); }
            if let Err(error) = parse_request(object.to_string().as_bytes()) {
                prop_assert!(!error.contains('\n') && !error.is_empty());
            }
        }
    }
}
