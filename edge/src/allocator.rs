//! Tuning of the C allocator (glibc's malloc), which RocksDB and Rust share.
//!
//! glibc raises its mmap threshold each time a large block it mapped is freed, up to 32 MiB.
//! RocksDB allocates its memtable arenas in blocks of a few MiB and frees them at every flush,
//! so after the first flushes those blocks come from the heap instead, where the small
//! allocations of the broker and the pipeline pin them, and RSS grows with time while RocksDB
//! itself holds under 30 MB. A fixed threshold keeps large blocks in their own mappings, which
//! go back to the system when freed. Measured (1,000 devices, 10,000 events/s, 75 s, two runs
//! each; docs/benchmarks.md): median RSS 131–132 MiB with it, 142–160 MiB without.
//!
//! Elsewhere (musl, other systems) this does nothing.

/// Blocks of at least this size are mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] (which also stops it adapting). Call it
/// once, first thing in `main`. Returns whether the allocator accepted it.
pub fn fix_mmap_threshold() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it has no memory-safety
        // preconditions and is thread-safe in glibc.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) };
        ok == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
