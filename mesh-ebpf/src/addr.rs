//! Reading and writing the 16-byte addresses of the context structs.
//!
//! The verifier only accepts 4-byte accesses to `user_ip6` and `local_ip6` on older
//! kernels, so each word goes through a volatile access the compiler cannot merge.
use core::ptr::{read_volatile, write_volatile};

#[inline(always)]
pub fn read_ip6(words: *const [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let base = words.cast::<u32>();
    let mut i = 0;
    while i < 4 {
        // SAFETY: `words` points at a 4-word field of a context struct.
        let w = unsafe { read_volatile(base.add(i)) };
        let b = w.to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[inline(always)]
pub fn write_ip6(words: *mut [u32; 4], addr: &[u8; 16]) {
    let base = words.cast::<u32>();
    let mut i = 0;
    while i < 4 {
        let w = u32::from_ne_bytes([
            addr[i * 4],
            addr[i * 4 + 1],
            addr[i * 4 + 2],
            addr[i * 4 + 3],
        ]);
        // SAFETY: `words` points at a writable 4-word field of a context struct.
        unsafe { write_volatile(base.add(i), w) };
        i += 1;
    }
}

/// `true` for `::ffff:a.b.c.d`.
#[inline(always)]
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff
}

pub const LOOPBACK_V4_MAPPED: [u8; 16] = mesh_common::v4_mapped([127, 0, 0, 1]);
pub const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
