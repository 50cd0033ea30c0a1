//! `getpeername4` / `getpeername6`: the application sees the ClusterIP it dialled, not
//! the agent's listener.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use core::ptr::addr_of_mut;
use mesh_common::{OrigDst, counters};

use crate::{
    addr::write_ip6,
    maps::{MESH_SOCK_ORIG_DST, count},
};

const ALLOW: i32 = 1;

#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: `sk` of a sock_addr context is a full socket; the value is copied out.
    let slot = unsafe { MESH_SOCK_ORIG_DST.get_ptr_mut(ctx) };
    if slot.is_null() {
        return None;
    }
    // SAFETY: non-null storage of this socket, sized for an OrigDst.
    let orig = unsafe { *slot };
    count(counters::PEERNAME_RESTORED);
    Some(orig)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx) {
        let a = orig.addr;
        // SAFETY: user_ip4 and user_port are writable in getpeername4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
            (*ctx.sock_addr).user_port = u32::from(orig.port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx) {
        // SAFETY: user_ip6 and user_port are writable in getpeername6.
        unsafe {
            write_ip6(addr_of_mut!((*ctx.sock_addr).user_ip6), &orig.addr);
            (*ctx.sock_addr).user_port = u32::from(orig.port.to_be());
        }
    }
    ALLOW
}
