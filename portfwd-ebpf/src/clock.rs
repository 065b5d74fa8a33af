//! The programs' clock, shared by the modules that keep time (`conntrack`,
//! `verdict`'s next-hop cache) without importing each other.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

/// Monotonic time, to a clock tick (a few ms): the timeouts are seconds, and
/// the coarse clock costs a fraction of the precise one (no clocksource
/// read). Read once per packet, and only by packets that hit a flow or open
/// one (later fragments and ICMP errors of translated flows too); the
/// next-hop cache (`verdict`) is given that read.
pub(crate) fn now() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}
