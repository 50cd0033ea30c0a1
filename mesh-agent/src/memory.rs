//! Keeping the agent's resident memory small: it runs on every node, so each MiB it
//! holds is paid once per node.
//!
//! glibc's malloc gives each thread that allocates its own arena (up to 8 per core)
//! and keeps freed memory mapped. The agent has few threads but many of them allocate
//! (runtime workers, one per pod netns, the admin thread), and its largest allocation
//! (the kernel's BTF, parsed while loading the programs) is freed right after start.

/// Blocks of this size and more are mapped on their own and unmapped when freed.
/// glibc starts at this value but raises it (up to 32 MiB) each time such a block is
/// freed; after the first config, whose lists and tables are large, every later
/// large table then came from the heap and left holes there when it was freed. Held
/// fixed, the agent at 10,000 Services and 20,000 pods kept 20 MiB less anonymous
/// memory (docs/kubernetes.md, "Scale"). Nothing on the data path allocates this much
/// per request or per connection.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Free memory at the top of a heap that glibc keeps instead of handing it back at
/// once. Fixing the mmap threshold also fixes this at its default (128 KiB), and a
/// bulk transfer's 64 KiB stream buffers, freed and allocated again for every write,
/// then made the heap shrink and grow under them: the agents spent a twentieth of
/// their CPU in page faults (docs/benchmarks.md, "Where the bulk path's time goes").
/// At most this much per arena (two) stays resident; the trims after a load peak
/// (`release_free_heap`) still return it.
const TRIM_THRESHOLD: i32 = 2 * 1024 * 1024;

/// Caps the number of malloc arenas and fixes the mmap and trim thresholds. Call
/// before any thread starts.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; M_ARENA_MAX, M_MMAP_THRESHOLD
    // and M_TRIM_THRESHOLD are valid parameters with valid values.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
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

/// Connections below which a fall in load is not worth a trim: a few hundred
/// connections' buffers are a few MiB.
const TRIM_FLOOR: usize = 512;

/// Whether the heap is worth trimming now that `open` connections remain, after at
/// most `peak` since the last trim: when at least half of a large peak has gone.
/// glibc keeps freed memory mapped; after a burst of 10,000 connections ended, an
/// idle agent held 150 MiB of anonymous memory that it no longer used (the soak).
pub fn worth_trimming(peak: usize, open: usize) -> bool {
    peak >= TRIM_FLOOR && open <= peak / 2
}

/// Samples the open connection count every `every` and trims the heap after a fall
/// (see [`worth_trimming`]).
pub async fn trim_after_falls(open: impl Fn() -> usize, every: std::time::Duration) {
    let mut peak = 0;
    loop {
        tokio::time::sleep(every).await;
        let now = open();
        peak = peak.max(now);
        if worth_trimming(peak, now) {
            release_free_heap();
            tracing::debug!(
                peak,
                open = now,
                "returned freed heap memory after a fall in load"
            );
            peak = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_half_of_a_large_peak_is_gone() {
        assert!(worth_trimming(10_000, 0));
        assert!(worth_trimming(10_000, 5_000));
        assert!(!worth_trimming(10_000, 5_001));
        // Small peaks are not worth a system call that walks the heap.
        assert!(!worth_trimming(100, 0));
    }
}
