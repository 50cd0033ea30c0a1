//! The BPF atomic add (`BPF_ATOMIC | BPF_ADD`, "lock xadd"), available on every kernel
//! the mesh supports. core's `AtomicI64::fetch_add` does not exist for the BPF target.

/// Adds `value` to `*dst` atomically.
///
/// # Safety
/// `dst` must point at an 8-byte aligned, writable i64 (a map value).
#[inline(always)]
pub unsafe fn add_i64(dst: *mut i64, value: i64) {
    // SAFETY: per the contract; the instruction touches exactly those 8 bytes.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({dst} + 0) += {value}",
            dst = in(reg) dst,
            value = in(reg) value,
            options(nostack),
        );
    }
}
