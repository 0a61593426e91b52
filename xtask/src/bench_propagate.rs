//! `cargo xtask bench propagate`: volume propagation speed (ms per slice) and peak memory,
//! ours beside the official PyTorch `track_step` loop on the same weights, in one run.
//!
//! For each size, `tools/bench/propagate_pytorch_bench.py` builds the official model
//! (real-use settings, random weights), writes its state dict, and times its loop; we load
//! the same weights and time [`VolumePropagator`] (forward from a mask-prompted slice 0).
//! Slices are random and made on demand on both sides. ms/slice averages the tracked
//! slices: image encoder + memory attention + heads + memory encoder each.
//!
//! Peak memory: each side runs a `--peak-slices` volume in a fresh process and reports its
//! RSS high-water mark (ours: `VmHWM` of /proc/self/status; PyTorch: `ru_maxrss`).
//! Without a Python that has `sam2`, ours runs alone on random weights.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sgp_sam2::Sam2Config;
use sgp_sam2::Sam2Model;
use sgp_sam2::{Direction, SlicePrompt, SliceSource, VolumePropagator};

#[derive(clap::Args)]
pub struct Args {
    /// Model input sizes S (multiples of 32).
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    sizes: Vec<usize>,
    /// Preset name (e.g. sam2.1_hiera_t).
    #[arg(long, default_value = "sam2.1_hiera_t")]
    config: String,
    /// Slices of the timed volume.
    #[arg(long, default_value_t = 8)]
    slices: usize,
    /// Slices of the peak-memory volume (0: skip the peak-memory runs).
    #[arg(long, default_value_t = 100)]
    peak_slices: usize,
    /// Python with the official `sam2` package, torch and safetensors.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Threads for both sides (default: the machine's cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Internal: run one peak-memory measurement in this process (size, weights file).
    #[arg(long, hide = true)]
    child_peak: Option<usize>,
    #[arg(long, hide = true)]
    child_weights: Option<PathBuf>,
}

/// Random slices `[3, S, S]` in [0, 1], made on demand (seeded by index).
pub(crate) struct RandomSlices {
    pub(crate) n: usize,
    pub(crate) size: usize,
}

impl RandomSlices {
    /// Slice `idx` (any index: supports use indices past the volume's).
    pub(crate) fn make(&self, idx: usize) -> candle_core::Result<Tensor> {
        let s = self.size;
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (idx as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let v: Vec<f32> = (0..3 * s * s)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        Tensor::from_vec(v, (3, s, s), &Device::Cpu)
    }
}

impl SliceSource for RandomSlices {
    fn num_slices(&self) -> usize {
        self.n
    }
    fn slice(&self, idx: usize) -> sgp_sam2::Result<Tensor> {
        Ok(self.make(idx)?)
    }
}

pub(crate) fn config(name: &str, size: usize) -> anyhow::Result<Sam2Config> {
    Ok(Sam2Config::preset(name)?
        .with_image_size(size)?
        .with_real_use_settings())
}

/// Our model on the exchanged weights, or random weights without them.
pub(crate) fn load_model(cfg: &Sam2Config, weights: Option<&Path>) -> anyhow::Result<Sam2Model> {
    let dev = Device::Cpu;
    if let Some(w) = weights {
        return Ok(Sam2Model::load(cfg, w, &dev)?);
    }
    // A VarMap only serves to learn every parameter's name and shape; the model is then
    // built from plain (untracked) tensors, so inference takes the fast kernels and keeps
    // no autograd graph.
    let varmap = VarMap::new();
    Sam2Model::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut tensors = std::collections::HashMap::new();
    for (name, var) in varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock"))?.iter() {
        let t = var.as_tensor().detach();
        tensors.insert(name.clone(), (Tensor::randn(0f32, 0.02, t.shape(), &dev)? + t)?);
    }
    Ok(Sam2Model::new(
        cfg,
        VarBuilder::from_tensors(tensors, DType::F32, &dev),
    )?)
}

fn prompt(size: usize) -> anyhow::Result<Vec<(usize, SlicePrompt)>> {
    let mut m = vec![0f32; size * size];
    for r in size / 4..size / 2 {
        for c in size / 3..3 * size / 4 {
            m[r * size + c] = 1.0;
        }
    }
    Ok(vec![(
        0,
        SlicePrompt::Mask(Tensor::from_vec(m, (size, size), &Device::Cpu)?),
    )])
}

/// Runs the propagation; returns the time of each emitted slice in ms.
fn propagate(model: &Sam2Model, size: usize, slices: usize) -> anyhow::Result<Vec<f64>> {
    let src = RandomSlices { n: slices, size };
    let prompts = prompt(size)?;
    let mut prop = VolumePropagator::new(model);
    let mut times = Vec::with_capacity(slices);
    let mut t0 = Instant::now();
    prop.propagate(&src, &prompts, Direction::Forward, &mut |_| {
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        t0 = Instant::now();
        Ok(())
    })?;
    Ok(times)
}

/// Mean ms of the tracked slices (all but the prompted slice 0).
pub(crate) fn propagate_ms_per_slice(model: &Sam2Model, size: usize, slices: usize) -> anyhow::Result<f64> {
    let times = propagate(model, size, slices)?;
    let tracked = if times.len() > 1 { &times[1..] } else { &times[..] };
    Ok(tracked.iter().sum::<f64>() / tracked.len().max(1) as f64)
}

pub(crate) const PROPAGATE_SCRIPT: &str = "propagate_pytorch_bench.py";

/// Runs the PyTorch propagation script with `args`.
pub(crate) fn python_bench(python: &str, args: &[String]) -> anyhow::Result<std::process::Output> {
    Command::new(python)
        .arg(crate::bench::pytorch_script(PROPAGATE_SCRIPT))
        .args(args)
        .output()
        .with_context(|| format!("cannot run {python}"))
}

pub(crate) fn vm_hwm_mb() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    let kb: f64 = line.split_whitespace().nth(1).context("VmHWM value")?.parse()?;
    Ok(kb / 1024.0)
}

pub(crate) fn last_json(out: &std::process::Output, what: &str) -> anyhow::Result<serde_json::Value> {
    if !out.status.success() {
        bail!("{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("no JSON from {what}"))?;
    Ok(serde_json::from_str(line)?)
}

fn run_python(
    args: &Args,
    size: usize,
    slices: usize,
    threads: usize,
    mode: &str,
    weights: Option<&Path>,
) -> anyhow::Result<serde_json::Value> {
    let mut run = crate::bench::pytorch_model_args(&args.config, size, threads);
    if let Some(w) = weights {
        crate::bench::write_pytorch_weights(&args.python, PROPAGATE_SCRIPT, &run, w)?;
    }
    run.extend(["--slices".into(), slices.to_string(), "--mode".into(), mode.into()]);
    last_json(&python_bench(&args.python, &run)?, "PyTorch bench")
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(size) = args.child_peak {
        let cfg = config(&args.config, size)?;
        let model = load_model(&cfg, args.child_weights.as_deref())?;
        propagate(&model, size, args.peak_slices)?;
        println!("{}", serde_json::json!({"peak_rss_mb": vm_hwm_mb()?}));
        return Ok(());
    }
    let threads = crate::bench::set_threads(args.threads);
    let py = crate::bench::pytorch_available(&args.python);
    let work = tempfile_dir()?;
    println!("| S | slices | ours ms/slice | PyTorch ms/slice | ratio (PyTorch/ours) | peak slices | ours peak RSS MB | PyTorch peak RSS MB |");
    println!("|---|---|---|---|---|---|---|---|");
    for &size in &args.sizes {
        let weights = work.join(format!("weights_{size}.safetensors"));
        let (py_ms, w) = if py {
            let v = run_python(&args, size, args.slices, threads, "time", Some(&weights))?;
            (v["ms_per_slice"].as_f64(), Some(weights.as_path()))
        } else {
            (None, None)
        };
        let cfg = config(&args.config, size)?;
        let model = load_model(&cfg, w)?;
        let ours_ms = propagate_ms_per_slice(&model, size, args.slices)?;
        drop(model);

        let (mut ours_peak, mut py_peak) = (None, None);
        if args.peak_slices > 0 {
            let exe = std::env::current_exe()?;
            let mut cmd = Command::new(exe);
            cmd.args([
                "bench",
                "propagate",
                "--config",
                &args.config,
                "--child-peak",
                &size.to_string(),
            ])
            .args(["--peak-slices", &args.peak_slices.to_string()]);
            if let Some(w) = w {
                cmd.arg("--child-weights").arg(w);
            }
            ours_peak = last_json(&cmd.output()?, "our peak run")?["peak_rss_mb"].as_f64();
            if py {
                py_peak = run_python(&args, size, args.peak_slices, threads, "peak", None)?["peak_rss_mb"].as_f64();
            }
        }
        let _ = std::fs::remove_file(&weights);
        let f = |x: Option<f64>| x.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        let ratio = py_ms
            .map(|p| format!("{:.2}", p / ours_ms))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {size} | {} | {ours_ms:.0} | {} | {ratio} | {} | {} | {} |",
            args.slices,
            f(py_ms),
            args.peak_slices,
            f(ours_peak),
            f(py_peak)
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("sgp-bench-propagate-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
