//! Fused masked attention vs the naive candle composition at PMA's sizes
//! (token grids 32×32 and 64×64, i.e. Lq = Lk = 1024 / 4096; model width 256, D = 256/H).
//!
//! `cargo bench -p sgp-kernels --bench masked_attention` runs a short representative set:
//! L = 1024 and 4096, H ∈ {1, 8}, B = 1, forward and forward+backward (naive at 4096 only
//! forward, its backward needs ~7 GiB at H = 8). `SGP_BENCH_FULL=1` runs every size
//! (B ∈ {1, 2, 4, 8}); naive variants whose score tensors would exceed ~6 GiB are skipped.
//! Peak memory is measured per process by `examples/masked_attention_peak_mem.rs`.
//! Soft mode, `[B,L]` key map, query scaling on (PMA's configuration).

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sgp_kernels::masked_attention::{masked_attention, naive_masked_attention, MaskedAttentionOptions, QueryScaling};

type AttnFn = fn(&Tensor, &Tensor, &Tensor, &Tensor, &MaskedAttentionOptions) -> sgp_kernels::Result<Tensor>;

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
}

fn inputs(b: usize, h: usize, l: usize) -> candle_core::Result<Inputs> {
    let d = 256 / h;
    let dev = Device::Cpu;
    Ok(Inputs {
        q: Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?,
        k: Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?,
        v: Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?,
        p: Tensor::rand(0f32, 1.0, (b, l), &dev)?,
    })
}

fn opts() -> MaskedAttentionOptions<'static> {
    MaskedAttentionOptions {
        query_scaling: QueryScaling::FromKeyMap,
        ..Default::default()
    }
}

fn run_fwd(f: AttnFn, x: &Inputs) -> Tensor {
    f(&x.q, &x.k, &x.v, &x.p, &opts()).expect("attention forward")
}

fn run_fwd_bwd(f: AttnFn, x: &Inputs) -> Tensor {
    let (q, k, v) = (
        Var::from_tensor(&x.q).expect("var"),
        Var::from_tensor(&x.k).expect("var"),
        Var::from_tensor(&x.v).expect("var"),
    );
    let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), &x.p, &opts()).expect("attention forward");
    let grads = out.sum_all().and_then(|s| s.backward()).expect("backward");
    grads.get(q.as_tensor()).expect("dq").clone()
}

fn bench(c: &mut Criterion) {
    let full = std::env::var("SGP_BENCH_FULL").is_ok_and(|v| v == "1");
    let mut configs: Vec<(usize, usize, usize)> = vec![];
    let batches: &[usize] = if full { &[1, 2, 4, 8] } else { &[1] };
    for &l in &[1024usize, 4096] {
        for &h in &[1usize, 8] {
            for &b in batches {
                configs.push((b, h, l));
            }
        }
    }
    let mut group = c.benchmark_group("masked_attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (b, h, l) in configs {
        let x = inputs(b, h, l).expect("inputs");
        let id = format!("B{b}_H{h}_L{l}");
        // Naive scores: B·H·L² f32 per live copy; forward keeps ~3, backward ~6.
        let score_bytes = (b * h * l * l * 4) as f64;
        let naive_fwd_ok = score_bytes * 3.0 < 6e9;
        let naive_bwd_ok = score_bytes * 6.0 < 6e9 && (full || l <= 1024 || h == 1);
        group.bench_function(BenchmarkId::new("fwd/fused", &id), |bch| {
            bch.iter(|| black_box(run_fwd(masked_attention, &x)))
        });
        if naive_fwd_ok {
            group.bench_function(BenchmarkId::new("fwd/naive", &id), |bch| {
                bch.iter(|| black_box(run_fwd(naive_masked_attention, &x)))
            });
        }
        group.bench_function(BenchmarkId::new("fwd_bwd/fused", &id), |bch| {
            bch.iter(|| black_box(run_fwd_bwd(masked_attention, &x)))
        });
        if naive_bwd_ok {
            group.bench_function(BenchmarkId::new("fwd_bwd/naive", &id), |bch| {
                bch.iter(|| black_box(run_fwd_bwd(naive_masked_attention, &x)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
