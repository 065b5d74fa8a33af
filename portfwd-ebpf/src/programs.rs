//! The programs of the object: one entry point per program of
//! `portfwd-common`'s ABI table, each named by `program_name!` and placed in
//! the section whose name tells aya's loader the program type and hook.
//!
//! Written out instead of with aya's `#[classifier]`/`#[cgroup_sock_addr]`
//! macros because those name a program after its Rust function and take no
//! literal, which would write each name a second time; this is what they
//! expand to, with `export_name` instead of `no_mangle`. aya-ebpf 0.2.1 has
//! no macro for iterators at all.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, bpf_sock_addr},
    programs::{SockAddrContext, SockContext, TcContext},
};
use portfwd_common::program_name;

use crate::{iter, sock, tc};

/// A cgroup sock_addr program on `$hook`, running `sock::$hook`.
macro_rules! sock_addr_program {
    ($hook:ident) => {
        #[unsafe(export_name = program_name!($hook))]
        #[unsafe(link_section = concat!("cgroup/", stringify!($hook)))]
        extern "C" fn $hook(ctx: *mut bpf_sock_addr) -> i32 {
            sock::$hook(SockAddrContext::new(ctx))
        }
    };
}

sock_addr_program!(connect4);
sock_addr_program!(connect6);
sock_addr_program!(sendmsg4);
sock_addr_program!(sendmsg6);
sock_addr_program!(recvmsg4);
sock_addr_program!(recvmsg6);
sock_addr_program!(getpeername4);
sock_addr_program!(getpeername6);

#[unsafe(export_name = program_name!(sock_release))]
#[unsafe(link_section = "cgroup/sock_release")]
extern "C" fn sock_release(ctx: *mut bpf_sock) -> i32 {
    sock::release(SockContext::new(ctx))
}

#[unsafe(export_name = program_name!(tc_uplink_in))]
#[unsafe(link_section = "classifier")]
extern "C" fn tc_uplink_in(skb: *mut __sk_buff) -> i32 {
    tc::uplink_in(TcContext::new(skb))
}

#[unsafe(export_name = program_name!(tc_uplink_out))]
#[unsafe(link_section = "classifier")]
extern "C" fn tc_uplink_out(skb: *mut __sk_buff) -> i32 {
    tc::uplink_out(TcContext::new(skb))
}

#[unsafe(export_name = program_name!(tc_backend_in))]
#[unsafe(link_section = "classifier")]
extern "C" fn tc_backend_in(skb: *mut __sk_buff) -> i32 {
    tc::backend_in(TcContext::new(skb))
}

#[unsafe(export_name = program_name!(iter_udp))]
#[unsafe(link_section = "iter/udp")]
extern "C" fn iter_udp(ctx: *mut c_void) -> i32 {
    iter::udp_sockets(ctx)
}
