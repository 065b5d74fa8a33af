//! A BPF iterator over the UDP sockets of the calling process's network
//! namespace, run by userspace (`unmap`, a re-publish; see
//! `portfwd::datapath::sockets`): for each socket the socket programs
//! translated, it writes the socket's cookie and what it remembers (its
//! `SOCK_CONNECTED` slot, as the first slot of a `SockDialed`, or its
//! `SOCK_DIALED` storage) to the iterator's output. Userspace then ends, with sock_diag's
//! `SOCK_DESTROY`, the connected ones whose storage names a removed
//! mapping. (sock_diag reports socket storage for TCP sockets only; TCP
//! needs no iterator.) Needs Linux 5.12 (socket storage and cookies in
//! iterators).
//!
//! The context is the kernel's `struct bpf_iter__udp`, whose layout is
//! fixed (aya-ebpf 0.2.1 has no type for it).

use core::{ffi::c_void, ptr};

use aya_ebpf::helpers::generated::{bpf_get_socket_cookie, bpf_seq_write, bpf_sk_storage_get};
use portfwd_common::SockDialed;

use crate::{maps::SOCK_DIALED, sock};

/// `struct bpf_iter_meta`: the output's seq_file comes first.
#[repr(C)]
struct IterMeta {
    seq: *mut aya_ebpf::bindings::seq_file,
}

/// `struct bpf_iter__udp`.
#[repr(C)]
struct IterUdp {
    meta: *mut IterMeta,
    /// `struct udp_sock *`, NULL at the end of the iteration.
    udp_sk: *mut c_void,
}

pub(crate) fn udp_sockets(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<IterUdp>();
    // SAFETY: `ctx` is the iterator's context; the verifier checks each
    // access, and `udp_sk` is checked for NULL before use.
    unsafe {
        let sk = (*ctx).udp_sk;
        if sk.is_null() {
            return 0;
        }
        let cookie = bpf_get_socket_cookie(sk);
        let seq = (*(*ctx).meta).seq;
        if let Some(slot) = sock::connected_record(cookie) {
            let mut dialed = SockDialed::default();
            dialed.slots[0] = *slot;
            bpf_seq_write(seq, (&raw const cookie).cast(), 8);
            bpf_seq_write(
                seq,
                (&raw const dialed).cast(),
                size_of::<SockDialed>() as u32,
            );
            return 0;
        }
        let map = (&raw const SOCK_DIALED).cast_mut().cast::<c_void>();
        let dialed = bpf_sk_storage_get(map, sk, ptr::null_mut(), 0);
        if dialed.is_null() {
            return 0;
        }
        bpf_seq_write(seq, (&raw const cookie).cast(), 8);
        bpf_seq_write(seq, dialed, size_of::<SockDialed>() as u32);
    }
    0
}
