//! Keeping the agent's resident memory small: it runs on every node, so each MiB it
//! holds is paid once per node.
//!
//! glibc's malloc gives each thread that allocates its own arena (up to 8 per core)
//! and keeps freed memory mapped. The agent has few threads but many of them allocate
//! (runtime workers, one per pod netns, the admin thread), and its largest allocation
//! (the kernel's BTF, parsed while loading the programs) is freed right after start.

/// Caps the number of malloc arenas. Call before any thread starts.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; M_ARENA_MAX is a valid parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands freed heap pages back to the kernel (after the one-off peaks of start-up).
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
