//! Raw tracepoint `sock_recv_length` (every recvmsg on the node, with the socket and
//! what it returned): takes what a receiver read off its unread count, so `sk_msg`
//! knows when it lags. Only sockets with an entry in `MESH_SOCK_UNREAD` (receivers of
//! a mesh hop) are touched. Reads of bytes that came by TCP count too, as they must:
//! the sender charges what it sends by either path. A raw tracepoint needs neither
//! kernel BTF nor BPF trampolines.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::maps::add_unread;

const MSG_PEEK: i64 = 2;

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn mesh_recv_guard(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk, int ret, int flags)
    let sk: u64 = ctx.arg(0);
    let read: i64 = ctx.arg::<i32>(1).into();
    let flags: i64 = ctx.arg::<i32>(2).into();
    if read <= 0 || flags & MSG_PEEK != 0 {
        return 0;
    }
    let _ = add_unread(sk, -read);
    0
}
