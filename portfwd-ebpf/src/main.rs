//! portfwd's eBPF programs, organised by hook (`programs` holds the entry
//! points, named from `portfwd-common`'s ABI table):
//! - `sock`: cgroup sock_addr programs that translate host processes'
//!   connections to a published port straight to the container endpoint.
//! - `tc`: TC programs that DNAT external clients' flows to the container
//!   and reverse-NAT the replies (split by concern: see `tc`'s own doc), with `conntrack` and `packet` (header
//!   parsing and checksum-preserving rewrites), and `nat46` (IPv6 clients
//!   of IPv4 containers: the switch between families).
//! - `icmp`: ICMP errors about translated flows, translated like them.
//! - `reply`: the answers the TC programs send themselves (a closed
//!   port's reset or ICMP port unreachable to a refused client).
//! - `trace`: events for `portfwd trace`, written only while it runs.
//! - `verdict`: counting a packet and sending it on, shared by the TC
//!   modules.
//! - `maps`: the maps, declared from `portfwd-common`'s ABI table, and
//!   `types`: the types private to the programs (no module imports a module
//!   that imports it).
#![no_std]
#![no_main]
// The one atomic the socket programs need, an addition, is only reachable
// through the intrinsic: the BPF target has no compare-and-swap, so core's
// `AtomicU64` offers loads and stores but no `fetch_add` (see
// `sock::claim`).
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys and values are passed to aya's `impl Borrow<K>` parameters by
// reference on purpose: by value, each would be copied into the caller's
// frame, and the verifier's 512-byte stack is nearly used up.
#![allow(clippy::needless_borrows_for_generic_args)]

mod clock;
mod conntrack;
mod fragments;
mod iter;
mod maps;
mod nat46;
mod packet;
mod programs;
mod reply;
mod sock;
mod tc;
mod trace;
mod types;
mod verdict;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
