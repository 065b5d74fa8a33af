//! Userspace conversions (the `user` feature): aya and bytemuck `Pod`
//! markers, std addresses.

use crate::*;

// SAFETY (all impls below): #[repr(C)], made only of integers and arrays
// of integers, with every padding byte spelled out as a field.
macro_rules! plain_old_data {
    ($($t:ty),*) => {$(
        unsafe impl aya::Pod for $t {}
        unsafe impl bytemuck::Zeroable for $t {}
        unsafe impl bytemuck::Pod for $t {}
    )*};
}
plain_old_data!(
    Addr,
    ServiceKey,
    ServiceValue,
    LocalAddrKey,
    Config,
    DialedSlot,
    SockDialed,
    SockConnected,
    FragmentKey,
    FragmentValue,
    CtKey,
    CtValue,
    MappingCounters,
    TraceConfig,
    TraceEvent,
    AllowKey
);

impl From<core::net::Ipv4Addr> for Addr {
    fn from(ip: core::net::Ipv4Addr) -> Self {
        Addr::v4(u32::from_ne_bytes(ip.octets()))
    }
}

impl From<core::net::Ipv6Addr> for Addr {
    fn from(ip: core::net::Ipv6Addr) -> Self {
        let o = ip.octets();
        let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Addr::v6([word(0), word(4), word(8), word(12)])
    }
}

impl Addr {
    /// The family tag and address of a std address.
    pub fn from_ip(ip: core::net::IpAddr) -> (u8, Addr) {
        match ip {
            core::net::IpAddr::V4(v4) => (FAMILY_V4, v4.into()),
            core::net::IpAddr::V6(v6) => (FAMILY_V6, v6.into()),
        }
    }

    /// The std address, given the family tag; None for an unknown tag.
    pub fn to_ip(&self, family: u8) -> Option<core::net::IpAddr> {
        let b = |w: u32| w.to_ne_bytes();
        match family {
            FAMILY_V4 => Some(core::net::Ipv4Addr::from(b(self.words[0])).into()),
            FAMILY_V6 => {
                let mut o = [0u8; 16];
                for (i, w) in self.words.iter().enumerate() {
                    o[i * 4..i * 4 + 4].copy_from_slice(&b(*w));
                }
                Some(core::net::Ipv6Addr::from(o).into())
            }
            _ => None,
        }
    }
}

impl ServiceValue {
    pub fn new(family: u8, addr: Addr, port_be: u16, name: &[u8]) -> Self {
        let mut padded = [0u8; NAME_LEN];
        let len = name.len().min(NAME_LEN);
        padded[..len].copy_from_slice(&name[..len]);
        ServiceValue {
            addr,
            port: port_be,
            family,
            flags: 0,
            ifindex: 0,
            name: padded,
        }
    }

    /// The name without its NUL padding.
    pub fn name_bytes(&self) -> &[u8] {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        &self.name[..end]
    }
}
