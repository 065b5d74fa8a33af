//! The test topology that portfwd's integration tests and its benchmark
//! share: named network namespaces, veth pairs between them and the host,
//! commands and threads inside a namespace (`netns`), and small TCP/UDP
//! servers and clients (`serve`).
//!
//! Everything here changes only what it creates (namespaces and links with
//! the names it is given) and removes it again; callers pick names and
//! addresses that nothing else on the machine uses.

pub mod netns;
pub mod serve;
