//! Correctness and timing of the fused masked attention on one device, against the naive
//! candle composition on the same device (and, off the CPU, against the CPU kernel).
//!
//! ```text
//! cargo run -p sgp-kernels --example masked_attention_check -- cpu [--quick]
//! cargo run -p sgp-kernels --features cuda --example masked_attention_check -- cuda [--dump DIR]
//! ```
//! Prints one `CHECK` line per case (relative L2 errors of out, dq, dk, dv, dp) and one
//! `TIME` line per size (ms, GFLOP/s, achieved bandwidth vs `HBM_GBPS`, default 4800 = H200).
//! Exits non-zero when an error exceeds the tolerance (1e-5 CPU, 1e-4 CUDA). `--dump DIR`
//! writes `DIR/case.safetensors` (inputs, output, gradients) for tools/kernels/sdpa_bench.py.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use sgp_kernels::masked_attention::{
    masked_attention, naive_masked_attention, MaskMode, MaskedAttentionOptions, QueryScaling,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;
type AttnFn = fn(&Tensor, &Tensor, &Tensor, &Tensor, &MaskedAttentionOptions) -> sgp_kernels::Result<Tensor>;

fn rel_l2(a: &Tensor, b: &Tensor) -> Res<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let e = if den == 0.0 { num } else { num / den };
    Ok(if e.is_finite() { e } else { f64::INFINITY })
}

struct Run {
    out: Tensor,
    grads: Vec<Option<Tensor>>, // q, k, v, p
}

fn run(f: AttnFn, x: &[Tensor; 4], w: &Tensor, opts: &MaskedAttentionOptions) -> Res<Run> {
    let vars: Vec<Var> = x.iter().map(Var::from_tensor).collect::<candle_core::Result<_>>()?;
    let out = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        vars[3].as_tensor(),
        opts,
    )?;
    let g = (&out * w)?.sum_all()?.backward()?;
    let grads = vars.iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
    Ok(Run { out, grads })
}

fn inputs(dev: &Device, b: usize, h: usize, lq: usize, lk: usize, d: usize, per_query: bool) -> Res<[Tensor; 4]> {
    let p_shape: Vec<usize> = if per_query { vec![b, lq, lk] } else { vec![b, lk] };
    // p in [0.05, 1]: away from 0 so soft-mode dp stays well conditioned.
    let p = Tensor::rand(0f32, 1.0, p_shape, dev)?.affine(0.95, 0.05)?;
    Ok([
        Tensor::randn(0f32, 1.0, (b, h, lq, d), dev)?,
        Tensor::randn(0f32, 1.0, (b, h, lk, d), dev)?,
        Tensor::randn(0f32, 1.0, (b, h, lk, d), dev)?,
        p,
    ])
}

fn check(dev: &Device, quick: bool, dump: Option<&str>) -> Res<bool> {
    let tol = if dev.is_cpu() { 1e-5 } else { 1e-4 };
    let mut ok = true;
    let heads: &[usize] = if quick { &[32] } else { &[32, 64, 128, 256] };
    let shapes: &[(usize, usize, usize, usize)] = &[(1, 2, 77, 77), (2, 1, 130, 33), (1, 3, 33, 300)];
    for &d in heads {
        for &(b, h, lq, lk) in shapes {
            for per_query in [false, true] {
                for mode in [MaskMode::default(), MaskMode::Soft { eps: 1e-12 }, MaskMode::Hard] {
                    let x = inputs(dev, b, h, lq, lk, d, per_query)?;
                    let w = Tensor::randn(0f32, 1.0, (b, h, lq, d), dev)?;
                    let scaling = if lq == lk && !per_query {
                        QueryScaling::FromKeyMap
                    } else {
                        QueryScaling::Off
                    };
                    let opts = MaskedAttentionOptions {
                        mode,
                        softmax_scale: None,
                        query_scaling: scaling,
                    };
                    let fused = run(masked_attention, &x, &w, &opts)?;
                    let naive = run(naive_masked_attention, &x, &w, &opts)?;
                    let mut errs = vec![rel_l2(&fused.out, &naive.out)?];
                    for i in 0..4 {
                        match (&fused.grads[i], &naive.grads[i]) {
                            (Some(a), Some(b)) => errs.push(rel_l2(a, b)?),
                            _ => errs.push(0.0),
                        }
                    }
                    // Off the CPU, also hold the device kernel against the CPU kernel.
                    let vs_cpu = if dev.is_cpu() {
                        0.0
                    } else {
                        let xc: Vec<Tensor> = x
                            .iter()
                            .map(|t| t.to_device(&Device::Cpu))
                            .collect::<candle_core::Result<_>>()?;
                        let xc: [Tensor; 4] = [xc[0].clone(), xc[1].clone(), xc[2].clone(), xc[3].clone()];
                        let cpu = run(masked_attention, &xc, &w.to_device(&Device::Cpu)?, &opts)?;
                        rel_l2(&fused.out, &cpu.out)?
                    };
                    let worst = errs.iter().cloned().fold(vs_cpu, f64::max);
                    let pass = worst < tol;
                    ok &= pass;
                    println!(
                        "CHECK {} D={d} B={b} H={h} Lq={lq} Lk={lk} per_query={per_query} mode={mode:?} out={:.2e} dq={:.2e} dk={:.2e} dv={:.2e} dp={:.2e} vs_cpu={vs_cpu:.2e}",
                        if pass { "ok  " } else { "FAIL" },
                        errs[0], errs[1], errs[2], errs[3], errs[4]
                    );
                    if let (Some(dir), true) = (
                        dump,
                        d == 32 && b == 1 && h == 2 && !per_query && mode == MaskMode::default(),
                    ) {
                        let mut map = std::collections::HashMap::new();
                        for (name, t) in ["q", "k", "v", "p"].iter().zip(x.iter()) {
                            map.insert(name.to_string(), t.to_device(&Device::Cpu)?);
                        }
                        map.insert("w".to_string(), w.to_device(&Device::Cpu)?);
                        map.insert("out".to_string(), fused.out.to_device(&Device::Cpu)?);
                        for (name, g) in ["dq", "dk", "dv", "dp"].iter().zip(fused.grads.iter()) {
                            if let Some(g) = g {
                                map.insert(name.to_string(), g.to_device(&Device::Cpu)?);
                            }
                        }
                        std::fs::create_dir_all(dir)?;
                        let path = format!("{dir}/case.safetensors");
                        let tmp = format!("{path}.tmp");
                        candle_core::safetensors::save(&map, &tmp)?;
                        std::fs::rename(&tmp, &path)?;
                        println!("DUMP {path} (soft eps=1e-6, key map, query scaling from key map)");
                    }
                }
            }
        }
    }
    Ok(ok)
}

fn time_ms(dev: &Device, iters: usize, mut f: impl FnMut() -> Res<Tensor>) -> Res<f64> {
    f()?; // warm-up (PTX load, allocator)
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        let t = f()?;
        drop(t);
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

fn timing(dev: &Device, quick: bool) -> Res<()> {
    let hbm_gbps: f64 = std::env::var("HBM_GBPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4800.0);
    let iters = if dev.is_cpu() { 1 } else { 10 };
    let batches: &[usize] = if quick { &[1] } else { &[1, 8] };
    let opts = MaskedAttentionOptions {
        query_scaling: QueryScaling::FromKeyMap,
        ..Default::default()
    };
    for &l in &[1024usize, 4096] {
        for &h in &[1usize, 8] {
            for &b in batches {
                let d = 256 / h;
                let x = inputs(dev, b, h, l, l, d, false)?;
                let flops = 4.0 * (b * h * l * l * d) as f64;
                // Compulsory traffic: read q, k, v, p, write out (f32).
                let bytes = 4.0 * (4 * b * h * l * d + b * l) as f64;
                let score_bytes = (b * h * l * l * 4) as f64;
                let naive_ok = if dev.is_cpu() {
                    score_bytes * 6.0 < 6e9
                } else {
                    score_bytes * 6.0 < 100e9
                };
                for (name, f) in [
                    ("fused", masked_attention as AttnFn),
                    ("naive", naive_masked_attention as AttnFn),
                ] {
                    if name == "naive" && !naive_ok {
                        println!("TIME {name} B={b} H={h} L={l} D={d} skipped (scores too large)");
                        continue;
                    }
                    let fwd = time_ms(dev, iters, || Ok(f(&x[0], &x[1], &x[2], &x[3], &opts)?))?;
                    let w = Tensor::ones((b, h, l, d), DType::F32, dev)?;
                    let fwd_bwd = time_ms(dev, iters, || {
                        let r = run(f, &x, &w, &opts)?;
                        Ok(r.out)
                    })?;
                    println!(
                        "TIME {name} B={b} H={h} L={l} D={d} fwd_ms={fwd:.3} fwd_bwd_ms={fwd_bwd:.3} fwd_GFLOPs={:.1} fwd_GBps={:.1} ({:.2}% of {hbm_gbps} GB/s HBM)",
                        flops / fwd / 1e6,
                        bytes / fwd / 1e6,
                        100.0 * bytes / fwd / 1e6 / hbm_gbps
                    );
                }
            }
        }
    }
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dev = match args.first().map(String::as_str) {
        Some("cpu") | None => Device::Cpu,
        Some("cuda") => Device::new_cuda(0)?,
        Some(other) => return Err(format!("unknown device {other}").into()),
    };
    let quick = args.iter().any(|a| a == "--quick");
    let dump = args
        .iter()
        .position(|a| a == "--dump")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let no_timing = args.iter().any(|a| a == "--no-timing");
    let ok = check(&dev, quick, dump)?;
    if !no_timing {
        timing(&dev, quick)?;
    }
    if !ok {
        return Err("some CHECK lines failed".into());
    }
    println!("ALL CHECKS PASSED");
    Ok(())
}
