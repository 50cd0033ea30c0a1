//! Raw tracepoint `sock_send_length` (every sendmsg on the node, with the socket and
//! what it returned): replaces what `sk_msg` charged to a receiver during the call
//! with what the call really sent. They differ when the TCP path takes only part of
//! a message (a full send buffer on a non-blocking socket): the kernel frees the rest
//! and the application sends it again, so without this correction those bytes would
//! be counted twice and the receiver would never look caught up.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::{
    atomic::add_i64,
    maps::{MESH_SOCK_SENDING, add_unread},
};

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn mesh_send_guard(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk, int ret, int flags)
    let sk: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg::<i32>(1).into();
    let Some(sending) = MESH_SOCK_SENDING.get_ptr_mut(&sk) else {
        return 0;
    };
    let sent = if ret > 0 { ret } else { 0 };
    // SAFETY: a live map value; both fields are 8-byte aligned. `charged` is taken
    // back with an atomic add, not zeroed, so a charge made meanwhile by a concurrent
    // sendmsg on the same socket survives for its own call to settle.
    let (charged, receiver) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*sending).charged)),
            (*sending).receiver,
        )
    };
    if charged == 0 && sent == 0 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { add_i64(core::ptr::addr_of_mut!((*sending).charged), -charged) };
    if sent != charged {
        let _ = add_unread(receiver, sent - charged);
    }
    0
}
