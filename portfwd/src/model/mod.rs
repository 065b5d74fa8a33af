//! What portfwd is about, as plain data: protocols and port ranges, the
//! docker `-p` grammar, the one `Mapping` type and its encoding as map
//! entries, planning which host ports a publication takes, and the state
//! and apply files. Pure (no system calls), so it is unit-tested, property-
//! tested and fuzzed; it imports no other layer.
//!
//! The `-p` parser is hand-written: no crate parses docker's grammar, and
//! its errors must name the bad part.

mod allowlist;
mod files;
mod mapping;
mod plan;
mod protocol;
mod publish;
pub(crate) mod rootless;

pub use allowlist::{Allowlist, Network, Refuse};
pub use files::{ApplyEntry, ApplyFile, Format, parse_apply, parse_state};
pub(crate) use files::{
    FORMAT_VERSION, JournalEntry, ListedMapping, ParsedState, StateFile, journal_line_len,
    parse_state_file,
};
pub use mapping::{Mapping, UnmapSelector};
pub(crate) use mapping::{check_container_ip, check_name, service_key};
pub(crate) use plan::{Planner, PortKey, explicit_ports, plan};
pub use protocol::{AUTO_PORTS, PortRange, Protocol};
pub use publish::{HostPorts, PublishSpec};
