//! The C allocator's thresholds, set once at the start of each binary.
//!
//! Both binaries move gigabytes through buffers of 1–5 MiB (chunks, upload
//! bodies, compressed and sealed records) that are allocated and freed
//! thousands of times a second on many threads. With glibc's defaults such a
//! buffer is often `mmap`ed and `munmap`ed, or the arena that held it is
//! trimmed as soon as it is freed, so the next one faults its pages in again
//! (zeroed by the kernel): measured on the benchmark disk, a full backup
//! spent 16.3–16.9 CPU seconds with the defaults and 13.4–13.6 with the
//! thresholds below (305 → 365 MB/s; docs/benchmarks.md). Peak RSS stays
//! bounded by the peak working set, which configuration bounds: memory is
//! only kept for reuse after it was in use, at most [`TRIM_THRESHOLD`] per
//! arena above what is live, in at most [`ARENAS`] arenas.
//!
//! glibc gives busy threads arenas of their own (up to eight per core), and
//! a buffer freed on another thread goes back to the arena it came from: the
//! gateway's network threads allocate every chunk's buffer and the
//! compressing threads free them, so each network thread's arena grew to
//! 45–50 MiB in a full backup. With one arena the gateway's peak RSS in a
//! full backup of the benchmark disk fell from 131–158 MiB to 91–103 MiB
//! at the same CPU time, with two to 111–122 MiB (docs/benchmarks.md).
//! Buffers of 1 KiB and less come from glibc's per-thread caches without an
//! arena's lock; the cost of few arenas shows where many threads allocate
//! at once: with one, the catalog's warm lookups from eight connections ran
//! 5–10 % slower (docs/scale.md) and restores inside the benchmark script
//! missed their target in three of six runs, so two it is: restores then
//! ran as with glibc's default in alternated runs.

/// Allocations below this come from the arenas and are reused after free.
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory an arena keeps at its top before giving it back.
pub const TRIM_THRESHOLD: usize = 64 << 20;
/// Arenas the allocator may use, for all threads together.
pub const ARENAS: usize = 2;

/// Sets [`MMAP_THRESHOLD`], [`TRIM_THRESHOLD`] and [`ARENAS`] (glibc only;
/// elsewhere a no-op). Call first thing in `main`, before any thread
/// starts. Returns whether the allocator took all three.
pub fn tune() -> bool {
    imp::tune()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    #[allow(unsafe_code)]
    pub fn tune() -> bool {
        let mmap = libc::c_int::try_from(super::MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
        let trim = libc::c_int::try_from(super::TRIM_THRESHOLD).unwrap_or(libc::c_int::MAX);
        let arenas = libc::c_int::try_from(super::ARENAS).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only changes glibc's malloc parameters under its
        // own lock; it takes plain integers and touches no memory of ours.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
                && libc::mallopt(libc::M_ARENA_MAX, arenas) == 1
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn tune() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_thresholds() {
        // glibc refuses an mmap threshold above its maximum (32 MiB on 64-bit).
        assert!(super::tune(), "glibc refused the allocator settings");
    }
}
