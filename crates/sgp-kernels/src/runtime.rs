//! Process-wide settings of the CPU runtime underneath the kernels.
//!
//! candle 0.11 runs its elementwise CPU ops (adds, multiplies, casts of 64K values or
//! more) on a pool of its own threads beside rayon's, and those threads spin for 25 000
//! iterations after each op before they park. The kernels here and candle's matmul run on
//! rayon, so on a machine with few cores the spinning threads hold the cores the next
//! matmul needs. Measured on 2 cores, SAM2.1 hiera_t at 512 px: the mask decoder took
//! 23.4 ms with the default spin and 16.6 ms with none; propagation 892 → 830 ms/slice.

/// The environment variable candle reads (once, when its pool starts) for the spin count.
pub const CANDLE_SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Makes candle's elementwise worker threads park as soon as they are idle, unless the
/// user chose a spin count in [`CANDLE_SPIN_VAR`]. Returns the value in effect.
///
/// Call it at the start of `main`, before other threads run: it sets an environment
/// variable, and candle reads it when its pool first starts (so a later call has no
/// effect on a pool already running).
pub fn park_idle_candle_threads() -> String {
    match std::env::var(CANDLE_SPIN_VAR) {
        Ok(v) => v,
        Err(_) => {
            std::env::set_var(CANDLE_SPIN_VAR, "0");
            "0".to_string()
        }
    }
}

/// Makes glibc's `malloc` keep freed memory for reuse instead of handing it back to the
/// kernel. Returns whether the settings took effect (false off glibc, where nothing is
/// changed).
///
/// By default glibc serves every block over its (adaptive) mmap threshold with a fresh
/// `mmap` and returns it on `free`, and trims the heap top beyond 2× that threshold. Each
/// layer's activations are such blocks, so every layer paid a page fault per 4 KiB on
/// first touch. Measured on 2 cores at Hiera's 512 px stage-3 MLP shape (1024×384→1536→384):
/// 650 000 page faults in 200 runs, a quarter of the CPU time in the kernel; the MLP went
/// from 14.2 to 10.3 ms with this (GELU 2.9 → 1.0 ms). The cost is that the process keeps
/// its high-water mark of heap: peak RSS is unchanged, but memory freed after a large
/// image is not returned until the process ends.
///
/// Call it at the start of `main`, like [`park_idle_candle_threads`].
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before other
        // threads allocate (see above), and a rejected value leaves the default.
        unsafe {
            // No block gets its own mapping (so none is unmapped on free), the heap top
            // is never trimmed, and every thread allocates from the main heap: a worker
            // thread's own arena lives in 64 MiB mappings that glibc unmaps once empty.
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Runs `f` on one of rayon's worker threads (directly when already on one), and waits.
///
/// Every kernel here, candle's matmul and gemm fork their work on rayon. Forked from a
/// thread outside the pool, each parallel op is queued for the workers while the caller
/// sleeps until it is done: two thread wake-ups per op. From a worker, the caller takes its
/// own share and the other workers steal the rest. Measured on 2 cores, SAM2.1 hiera_t at
/// 512 px, 6 runs each: the mask decoder 13.8–18.4 ms outside the pool, 13.0–15.7 inside;
/// the image encoder 346–435 ms against 337–395.
///
/// Call it around the whole inference or training job, after the thread count is set
/// (`RAYON_NUM_THREADS` is read when the pool starts, which this call may do).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// The environment variable that turns [`keep_workers_awake`] off (`0`).
pub const SPIN_WAIT_VAR: &str = "SGP_SPIN_WAIT";

/// How long an idle worker keeps polling for the next op before it goes back to sleep:
/// longer than the serial stretches between one model's parallel ops (a few ms), short
/// enough that a process waiting on something else (a child process, a file) frees its
/// cores at once.
const SPIN_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Spinners running or queued (at most one per worker besides the caller).
static SPINNERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    static IN_SPINNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn spin_wait_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(SPIN_WAIT_VAR).map_or(true, |v| v.trim() != "0"))
}

/// Keeps rayon's other workers polling for work while a model runs, as OpenMP's threads
/// do under PyTorch, instead of each going to sleep between ops and being woken by the
/// next one. Every kernel entry point calls it; it costs an atomic load when the workers
/// are already awake.
///
/// A rayon worker that finds no work sleeps after a few microseconds, and waking it is a
/// futex call and, in a VM, an interrupt to a halted vCPU. Measured on a 2-vCPU KVM guest:
/// a `join` of two 1 ms tasks after 50 µs of serial work cost 110 µs on average (worst
/// 1.1 ms), and a model pass forks a few hundred such ops. The spinner (a rayon job)
/// executes whatever work appears via `rayon::yield_now`, and returns once it has found
/// none for [`SPIN_IDLE_LIMIT`], so a waiting process does not hold its cores.
/// `SGP_SPIN_WAIT=0` turns it off.
pub fn keep_workers_awake() {
    use std::sync::atomic::Ordering;
    let Some(host) = rayon::current_thread_index() else {
        return; // outside the pool, nothing forks from here
    };
    let others = rayon::current_num_threads().saturating_sub(1);
    if others == 0 || SPINNERS.load(Ordering::Relaxed) >= others || IN_SPINNER.with(|s| s.get()) {
        return;
    }
    if !spin_wait_enabled() {
        return;
    }
    SPINNERS.fetch_add(1, Ordering::AcqRel);
    rayon::spawn(move || {
        // On the thread that asked (it popped its own job while waiting), or nested in
        // another spinner: polling here would only stall that thread's own work.
        if rayon::current_thread_index() != Some(host) && !IN_SPINNER.with(|s| s.replace(true)) {
            poll_for_work();
            IN_SPINNER.with(|s| s.set(false));
        }
        SPINNERS.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Spinners of [`keep_workers_awake`] running or queued now, in every pool of the process
/// (a diagnostic: zero once the pools have been idle for [`SPIN_IDLE_LIMIT`]).
pub fn active_spinners() -> usize {
    SPINNERS.load(std::sync::atomic::Ordering::Acquire)
}

/// Runs the pool's pending jobs as they appear until none has come for [`SPIN_IDLE_LIMIT`].
fn poll_for_work() {
    let mut last_work = std::time::Instant::now();
    let mut idle_rounds = 0u32;
    loop {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => {
                last_work = std::time::Instant::now();
                idle_rounds = 0;
            }
            Some(rayon::Yield::Idle) => {
                idle_rounds += 1;
                if idle_rounds.is_multiple_of(64) {
                    if last_work.elapsed() > SPIN_IDLE_LIMIT {
                        return;
                    }
                    // Lets another runnable thread on this core (candle's elementwise
                    // pool) run instead of waiting out the poll.
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_pool_runs_on_a_worker_and_nests() {
        let outer = super::on_pool(|| {
            let here = rayon::current_thread_index();
            // Already on a worker: the nested call runs in place.
            let inner = super::on_pool(rayon::current_thread_index);
            (here, inner)
        });
        assert!(outer.0.is_some());
        assert_eq!(outer.0, outer.1);
    }

    #[test]
    fn freed_memory_is_retained_on_glibc() {
        let took = super::retain_freed_memory();
        assert_eq!(took, cfg!(all(target_os = "linux", target_env = "gnu")));
    }
}
