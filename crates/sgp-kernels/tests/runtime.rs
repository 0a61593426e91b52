//! `keep_workers_awake` in a pool of its own (one test per binary: the spinner count is
//! process-wide, and the other test binaries' kernels would move it).

use std::time::{Duration, Instant};

use rayon::prelude::*;
use sgp_kernels::runtime::{active_spinners, keep_workers_awake};

fn wait_for_no_spinners() {
    let start = Instant::now();
    while active_spinners() > 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "a spinner never stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn spinners_take_forked_work_and_stop_once_idle() {
    // Outside any pool nothing forks from the caller, so nothing starts.
    keep_workers_awake();
    assert_eq!(active_spinners(), 0);

    // One thread: no other worker to keep awake.
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    single.install(keep_workers_awake);
    assert_eq!(active_spinners(), 0);

    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let want: u64 = (0..200_000u64).map(|x| x % 7 * x).sum();
    for round in 0..20 {
        let (got, nested) = pool.install(|| {
            keep_workers_awake();
            assert!(active_spinners() <= 2, "more spinners than other workers");
            // Forked work, nested forks and the caller's own joins all complete while
            // spinners poll (including when the caller pops its own queued spinner).
            let got: u64 = (0..200_000u64).into_par_iter().map(|x| x % 7 * x).sum();
            let nested = rayon::join(
                || {
                    keep_workers_awake();
                    (0..1000u64).into_par_iter().sum::<u64>()
                },
                || (0..1000u64).into_par_iter().map(|x| x * 2).sum::<u64>(),
            );
            (got, nested)
        });
        assert_eq!(got, want, "round {round}");
        assert_eq!(nested, (499_500, 999_000), "round {round}");
        if round % 5 == 4 {
            // Idle pools stop polling (the waiting process frees its cores).
            wait_for_no_spinners();
        }
    }
    wait_for_no_spinners();
}
