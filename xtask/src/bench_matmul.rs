//! `cargo xtask bench matmul`: f32 linear-layer throughput (`x · wᵀ`, GFLOP/s) at the
//! shapes Hiera runs, ours (`sgp_kernels::linear` on the `gemm` crate) beside PyTorch's in the
//! same run. It gives the machine's measured matmul peak that the encoder's effective
//! GFLOP/s is compared against.

use std::process::Command;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Shapes as m:k:n (x is m×k, w is n×k). Default: hiera_t's qkv and MLP linears at 512.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "16384:96:288,16384:96:384,16384:384:96,4096:192:576,4096:192:768,4096:768:192,1024:384:1152,1024:384:1536,1024:1536:384,256:768:2304,256:768:3072,256:3072:768"
    )]
    shapes: Vec<String>,
    /// Timed iterations per shape (median reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Python with torch (the PyTorch side is skipped when it cannot import torch).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Threads for both sides.
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

fn parse(spec: &str) -> anyhow::Result<(usize, usize, usize)> {
    let v: Vec<usize> = spec
        .split(':')
        .map(|s| s.parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("shape {spec:?}: want m:k:n"))?;
    match v[..] {
        [m, k, n] if m > 0 && k > 0 && n > 0 => Ok((m, k, n)),
        _ => bail!("shape {spec:?}: want m:k:n, all positive"),
    }
}

fn ours_ms(m: usize, k: usize, n: usize, iters: usize) -> anyhow::Result<f64> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
    // The layer our models run: `sgp_kernels::linear` (one gemm, no bias here, like F.linear(x, w)).
    sgp_kernels::linear::linear(&x, &w, None)?;
    crate::bench_sam2::time_ms(0, iters, || Ok(sgp_kernels::linear::linear(&x, &w, None)?))
}

fn torch_results(args: &Args, threads: usize) -> anyhow::Result<Vec<f64>> {
    let out = Command::new(&args.python)
        .arg(crate::bench::pytorch_script("matmul_pytorch_bench.py"))
        .args(["--threads", &threads.to_string()])
        .args(["--iters", &args.iters.to_string()])
        .args(["--shapes", &args.shapes.join(",")])
        .output()
        .with_context(|| format!("cannot run {}", args.python))?;
    if !out.status.success() {
        bail!("PyTorch matmul bench failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let v = crate::bench_propagate::last_json(&out, "PyTorch matmul bench")?;
    Ok(v["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["median_ms"].as_f64().unwrap_or(f64::NAN))
        .collect())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let threads = crate::bench::set_threads(args.threads);
    let shapes: Vec<_> = args.shapes.iter().map(|s| parse(s)).collect::<anyhow::Result<_>>()?;
    let has_torch = Command::new(&args.python)
        .args(["-c", "import torch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let torch = if has_torch {
        torch_results(&args, threads)?
    } else {
        eprintln!(
            "PyTorch side skipped: {} cannot import torch (use --python PATH)",
            args.python
        );
        vec![f64::NAN; shapes.len()]
    };
    println!("f32 linear x·wᵀ on CPU, {threads} threads, median of {}", args.iters);
    println!(
        "{:>6} {:>5} {:>5} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "m", "k", "n", "ours ms", "GFLOP/s", "torch ms", "GFLOP/s", "ratio"
    );
    let (mut flops, mut ours_total, mut torch_total) = (0.0, 0.0, 0.0);
    for (&(m, k, n), &t) in shapes.iter().zip(&torch) {
        let ours = ours_ms(m, k, n, args.iters)?;
        let f = 2.0 * (m * k * n) as f64;
        flops += f;
        ours_total += ours;
        torch_total += t;
        println!(
            "{m:>6} {k:>5} {n:>5} {ours:>10.2} {:>10.1} {t:>10.2} {:>10.1} {:>7.2}",
            f / ours / 1e6,
            f / t / 1e6,
            ours / t
        );
    }
    println!(
        "all shapes: ours {:.1} GFLOP/s, PyTorch {:.1} GFLOP/s, ratio {:.2}",
        flops / ours_total / 1e6,
        flops / torch_total / 1e6,
        ours_total / torch_total
    );
    Ok(())
}
