//! Gives the heap's free memory back to the kernel after one-off large work.
//!
//! Why: building the guest kit decompresses the kernel (tens of MiB) and building an
//! image base holds layer buffers; once freed, glibc keeps those pages in its arenas, so
//! the daemon's RSS would show its high-water mark for good rather than what it holds.
//! Trimming after such work keeps RSS an honest measure (the API fuzz and hostile-guest
//! tests bound it). A no-op where the allocator is not glibc's.

/// Returns free heap pages to the kernel. Cheap next to the work it follows; call it
/// after an allocation-heavy one-off task, never on a hot path.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no
    // pointers from us and is safe to call from any thread at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
