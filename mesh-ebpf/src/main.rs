//! Kernel programs of the mesh. Small on purpose: they find out whether a socket
//! belongs to the mesh and record or restore addresses; every decision that needs
//! policy lives in the agent.
#![no_std]
#![no_main]
// Atomic adds: core has no read-modify-write atomics for the BPF target, so the one
// instruction (`lock ... +=`) is written out in `atomic.rs`.
#![feature(asm_experimental_arch)]

mod addr;
mod atomic;
mod connect;
mod klog;
mod maps;
mod peername;
mod recvguard;
mod sendguard;
mod sklookup;
mod skmsg;
mod sockmap;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so this is
    // never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
