//! Metrics on a synthetic CT-like label volume with 15 organ-like labels.
//!
//! Default: 192×192×96 (a short run). `SGP_EVAL_BENCH_FULL=1` measures the target,
//! 512×512×300 with 15 labels.
//!
//!     cargo bench -p sgp-eval --bench metrics
//!     SGP_EVAL_BENCH_FULL=1 cargo bench -p sgp-eval --bench metrics

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::Array3;
use rand::{rngs::StdRng, Rng, SeedableRng};
use sgp_eval::{evaluate_labels, MetricOptions};

/// Fill an ellipsoid (centre, radii in voxels) with `label`, only inside its bounding box.
fn ellipsoid(vol: &mut Array3<u16>, centre: [f64; 3], radii: [f64; 3], label: u16) {
    let dims = vol.dim();
    let dims = [dims.0, dims.1, dims.2];
    let range = |k: usize| {
        let lo = (centre[k] - radii[k]).floor().max(0.0) as usize;
        let hi = ((centre[k] + radii[k]).ceil() as usize).min(dims[k] - 1);
        lo..=hi
    };
    for x in range(0) {
        for y in range(1) {
            for z in range(2) {
                let r = [x as f64, y as f64, z as f64]
                    .iter()
                    .zip(centre.iter().zip(&radii))
                    .map(|(c, (m, r))| ((c - m) / r).powi(2))
                    .sum::<f64>();
                if r <= 1.0 {
                    vol[[x, y, z]] = label;
                }
            }
        }
    }
}

fn synthetic_pair(shape: [usize; 3], n_labels: u16, seed: u64) -> (Array3<u16>, Array3<u16>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gt = Array3::<u16>::zeros(shape);
    let mut pred = Array3::<u16>::zeros(shape);
    for label in 1..=n_labels {
        let radii: [f64; 3] = std::array::from_fn(|k| shape[k] as f64 * rng.random_range(0.04..0.14));
        let centre: [f64; 3] = std::array::from_fn(|k| shape[k] as f64 * rng.random_range(0.2..0.8));
        ellipsoid(&mut gt, centre, radii, label);
        // The "prediction": a slightly moved and resized organ.
        let c2: [f64; 3] = std::array::from_fn(|k| centre[k] + rng.random_range(-2.0..2.0));
        let r2: [f64; 3] = std::array::from_fn(|k| radii[k] * rng.random_range(0.9..1.1));
        ellipsoid(&mut pred, c2, r2, label);
    }
    (gt, pred)
}

fn bench_metrics(c: &mut Criterion) {
    let full = std::env::var("SGP_EVAL_BENCH_FULL").is_ok_and(|v| v == "1");
    let shape = if full { [512, 512, 300] } else { [192, 192, 96] };
    let (gt, pred) = synthetic_pair(shape, 15, 42);
    let labels: Vec<u16> = (1..=15).collect();
    let spacing = [0.78, 0.78, 1.5];
    let options = MetricOptions { nsd_tolerance_mm: 2.0 };
    let name = format!("dice_iou_hd95_nsd_{}x{}x{}_15_labels", shape[0], shape[1], shape[2]);
    let mut group = c.benchmark_group("metrics");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(if full { 30 } else { 3 }));
    group.bench_function(&name, |b| {
        b.iter(|| {
            evaluate_labels(
                pred.view().into_dyn(),
                gt.view().into_dyn(),
                &spacing,
                &labels,
                &options,
            )
            .unwrap()
        })
    });
    // Worst case for the bounding-box restriction: one organ spanning most of the volume.
    let mut big_gt = Array3::<u16>::zeros(shape);
    let mut big_pred = Array3::<u16>::zeros(shape);
    let centre: [f64; 3] = std::array::from_fn(|k| shape[k] as f64 / 2.0);
    ellipsoid(&mut big_gt, centre, std::array::from_fn(|k| shape[k] as f64 * 0.48), 1);
    ellipsoid(
        &mut big_pred,
        [centre[0] + 3.0, centre[1] - 2.0, centre[2] + 1.0],
        std::array::from_fn(|k| shape[k] as f64 * 0.46),
        1,
    );
    let name = format!("one_label_spanning_{}x{}x{}", shape[0], shape[1], shape[2]);
    group.bench_function(&name, |b| {
        b.iter(|| {
            evaluate_labels(
                big_pred.view().into_dyn(),
                big_gt.view().into_dyn(),
                &spacing,
                &[1],
                &options,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_metrics);
criterion_main!(benches);
