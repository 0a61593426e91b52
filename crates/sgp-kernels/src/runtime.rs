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
