//! `cargo xtask bench train`: one training step (forward + backward + AdamW update) of
//! SAM2-SGP, ours beside the official PyTorch SAM2 doing the same step with the same
//! trainable set, on the same weights and inputs, in one run.
//!
//! The common step is PMG training (our `SgpModel` under the `no_pma` ablation), the part
//! the official code can run unchanged; `tools/bench/train_pytorch_bench.py` spells it
//! out. One query and K supports per step; the supports' image features are detached (our
//! default [`sgp::model::SupportGrad::Detached`]); LoRA rank 16 on Hiera's q and v, memory
//! modules, prompt encoder and mask decoder train; the image encoder is frozen. Loss:
//! Dice + BCE + object-score BCE. Our full step (PMA + hierarchical decoder and the KL term
//! on top) is timed too; it has no PyTorch counterpart.
//!
//! Every measurement runs in a fresh process (ours: this binary with hidden `--child-*`
//! arguments), so each peak RSS is that of a process that loads the model and trains.
//! The first step's loss terms are printed for both sides: LoRA's B starts at zero, so
//! they are the base model's and must agree (a check that the two steps compute the same
//! thing). Without a Python that has `sam2`, ours runs alone on random weights and inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use sgp::loss::LossWeights;
use sgp::model::{Ablation, BaseWeights, SgpModel, SgpModelConfig, SupportGrad, TrainableConfig};
use sgp::optim::{AdamW, AdamWConfig, Schedule};
use sgp_memory::SupportItem;

use crate::bench_propagate::{config, last_json, vm_hwm_mb, RandomSlices};

#[derive(clap::Args)]
pub struct Args {
    /// Model input sizes S (multiples of 32).
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    sizes: Vec<usize>,
    /// Preset name (e.g. sam2.1_hiera_t).
    #[arg(long, default_value = "sam2.1_hiera_t")]
    config: String,
    /// K, supports per query.
    #[arg(long, default_value_t = 4)]
    support_size: usize,
    /// Timed steps (median reported).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Python with the official `sam2` package, torch and safetensors.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Threads for both sides (default: the machine's cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Skip our full SGP step (PMA + hierarchical decoder).
    #[arg(long)]
    no_full: bool,
    /// Internal: run our timed steps in this process on the files in this folder.
    #[arg(long, hide = true)]
    child_dir: Option<PathBuf>,
    /// Internal: the child's size.
    #[arg(long, hide = true)]
    child_size: Option<usize>,
    /// Internal: the child trains the full model (PMA + decoder) instead of PMG alone.
    #[arg(long, hide = true)]
    child_full: bool,
}

/// An ellipse mask `[S, S]` (about 10% of the image), different per `seed`.
fn ellipse(size: usize, seed: usize) -> candle_core::Result<Tensor> {
    let s = size as f32;
    let f = (seed % 5) as f32 / 5.0;
    let (cy, cx, ry, rx) = (
        s * (0.35 + 0.3 * f),
        s * (0.6 - 0.2 * f),
        s * 0.18,
        s * (0.14 + 0.06 * f),
    );
    let v: Vec<f32> = (0..size * size)
        .map(|i| {
            let (y, x) = ((i / size) as f32, (i % size) as f32);
            let d = ((y - cy) / ry).powi(2) + ((x - cx) / rx).powi(2);
            if d <= 1.0 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (size, size), &Device::Cpu)
}

/// The step's inputs: from the PyTorch side's `inputs.safetensors`, or made here.
struct Inputs {
    query: Tensor,
    target: Tensor,
    supports: Vec<SupportItem>,
}

impl Inputs {
    fn read(dir: Option<&Path>, size: usize, k: usize) -> anyhow::Result<Self> {
        let (query, target, images, masks) = match dir.map(|d| d.join("inputs.safetensors")).filter(|p| p.is_file()) {
            Some(p) => {
                let mut t = candle_core::safetensors::load(&p, &Device::Cpu)?;
                let mut take = |n: &str| t.remove(n).with_context(|| format!("{} has no `{n}`", p.display()));
                let q = take("query")?;
                let y = take("target")?;
                let si = take("support_images")?;
                let sm = take("support_masks")?;
                let images = (0..si.dim(0)?)
                    .map(|i| si.get(i))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let masks = (0..sm.dim(0)?)
                    .map(|i| sm.get(i))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (q, y, images, masks)
            }
            None => {
                let src = RandomSlices { n: k + 1, size };
                let images = (0..k)
                    .map(|i| src.make(i + 1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let masks = (0..k)
                    .map(|i| ellipse(size, i + 1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (src.make(0)?, ellipse(size, 0)?, images, masks)
            }
        };
        let supports = images
            .into_iter()
            .zip(masks)
            .enumerate()
            .map(|(i, (image, mask))| SupportItem {
                image,
                masks: BTreeMap::from([(1, mask)]),
                case_id: format!("support{i}"),
            })
            .collect();
        Ok(Self {
            query,
            target: target.unsqueeze(0)?.unsqueeze(0)?,
            supports,
        })
    }
}

/// Our side, in this (fresh) process: build, train `warmup + iters` steps, print JSON.
fn child(args: &Args, dir: &Path, size: usize) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let weights = dir.join("weights.safetensors");
    let base = if weights.is_file() {
        sgp::model::state_dict_base(sgp_sam2::load_state_dict(&weights, &dev)?.into_iter().collect())
    } else {
        BaseWeights::Random { seed: 0 }
    };
    let model = SgpModel::new(
        SgpModelConfig {
            sam2: config(&args.config, size)?,
            trainable: TrainableConfig::fine_tune(),
            head: Default::default(),
            ablation: Ablation {
                no_pma: !args.child_full,
                ..Default::default()
            },
            support_grad: SupportGrad::Detached,
            seed: 0,
        },
        &base,
        &dev,
    )?;
    let inputs = Inputs::read(Some(dir), size, args.support_size)?;
    let schedule = Schedule {
        warmup_steps: 0,
        total_steps: 0,
        min_ratio: 1.0,
    };
    let mut optimizer = AdamW::new(model.trainable_vars(), AdamWConfig::default(), schedule, Some(1.0), 1)?;
    let weights = LossWeights::default();
    let mut times = Vec::new();
    let mut parts = Vec::new();
    let mut first = None;
    for i in 0..args.warmup + args.iters {
        let t0 = Instant::now();
        let out = sgp::train::model_loss(&model, &inputs.query, &inputs.target, 1, &inputs.supports, &weights)?;
        let t1 = Instant::now();
        let grads = out.total.backward()?;
        let t2 = Instant::now();
        optimizer.accumulate(&grads)?;
        let t3 = Instant::now();
        if first.is_none() {
            first = Some(out.breakdown);
        }
        if i >= args.warmup {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            times.push(ms(t0, t3));
            parts.push([ms(t0, t1), ms(t1, t2), ms(t2, t3)]);
        }
    }
    let first = first.context("no step ran")?;
    println!(
        "{}",
        serde_json::json!({
            "ms_per_step": crate::bench_sam2::median(times),
            "forward_ms": crate::bench_sam2::median(parts.iter().map(|p| p[0]).collect()),
            "backward_ms": crate::bench_sam2::median(parts.iter().map(|p| p[1]).collect()),
            "update_ms": crate::bench_sam2::median(parts.iter().map(|p| p[2]).collect()),
            "first_loss": {"dice": first.dice, "bce": first.bce, "object": first.object, "kl": first.kl, "total": first.total},
            "trainable_params": model.num_trainable(),
            "peak_rss_mb": vm_hwm_mb()?,
        })
    );
    Ok(())
}

fn ours(args: &Args, dir: &Path, size: usize, threads: usize, full: bool) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["bench", "train", "--config", &args.config])
        .args(["--support-size", &args.support_size.to_string()])
        .args(["--iters", &args.iters.to_string(), "--warmup", &args.warmup.to_string()])
        .args(["--threads", &threads.to_string(), "--child-size", &size.to_string()])
        .arg("--child-dir")
        .arg(dir);
    if full {
        cmd.arg("--child-full");
    }
    last_json(&cmd.output()?, "our training step")
}

fn python(args: &Args, size: usize, threads: usize, what: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(&args.python)
        .arg(crate::bench::pytorch_script("train_pytorch_bench.py"))
        .args(["--config", &args.config, "--size", &size.to_string()])
        .args([
            "--supports",
            &args.support_size.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .args(["--iters", &args.iters.to_string(), "--warmup", &args.warmup.to_string()])
        .args(what)
        .output()
        .with_context(|| format!("cannot run {}", args.python))?;
    last_json(&out, "PyTorch training step")
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let (Some(dir), Some(size)) = (&args.child_dir, args.child_size) {
        crate::bench::set_threads(args.threads);
        return child(&args, dir, size);
    }
    let threads = crate::bench::set_threads(args.threads);
    let py = crate::bench::pytorch_available(&args.python);
    let k = args.support_size;
    println!(
        "One training step (forward + backward + AdamW), K = {k}, {threads} threads, {}.",
        args.config
    );
    println!("PMG step: ours and PyTorch; full: ours with PMA + hierarchical decoder (no PyTorch counterpart).");
    println!();
    println!("| S | ours PMG ms/step | PyTorch ms/step | ratio ours/PyTorch | ours img/s | PyTorch img/s | ours peak MB | PyTorch peak MB | ours full ms/step | ours full peak MB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut checks = Vec::new();
    for &size in &args.sizes {
        let dir = std::env::temp_dir().join(format!("sgp-bench-train-{}-{size}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir_s = dir.to_string_lossy().to_string();
        let theirs = if py {
            python(&args, size, threads, &["--write", &dir_s])?;
            Some(python(&args, size, threads, &["--dir", &dir_s])?)
        } else {
            None
        };
        let pmg = ours(&args, &dir, size, threads, false)?;
        let full = if args.no_full {
            None
        } else {
            Some(ours(&args, &dir, size, threads, true)?)
        };
        let _ = std::fs::remove_dir_all(&dir);
        let num = |v: &serde_json::Value, key: &str| v[key].as_f64();
        let f0 = |x: Option<f64>| x.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        let f2 = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let ours_ms = num(&pmg, "ms_per_step");
        let py_ms = theirs.as_ref().and_then(|t| num(t, "ms_per_step"));
        let ratio = ours_ms.zip(py_ms).map(|(a, b)| a / b);
        let ips = |ms: Option<f64>| ms.map(|m| 1e3 / m);
        println!(
            "| {size} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f0(ours_ms),
            f0(py_ms),
            f2(ratio),
            f2(ips(ours_ms)),
            f2(ips(py_ms)),
            f0(num(&pmg, "peak_rss_mb")),
            f0(theirs.as_ref().and_then(|t| num(t, "peak_rss_mb"))),
            f0(full.as_ref().and_then(|v| num(v, "ms_per_step"))),
            f0(full.as_ref().and_then(|v| num(v, "peak_rss_mb"))),
        );
        checks.push((size, pmg, theirs));
    }
    println!();
    println!("Where the PMG step's time goes (forward / backward / AdamW update, ms):");
    for (size, pmg, theirs) in &checks {
        let split = |v: &serde_json::Value| {
            let f = |k: &str| v[k].as_f64().map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
            format!("{} / {} / {}", f("forward_ms"), f("backward_ms"), f("update_ms"))
        };
        let py = theirs.as_ref().map(split).unwrap_or_else(|| "-".into());
        println!("- {size}: ours {}, PyTorch {py}", split(pmg));
    }
    println!();
    println!("Same step? First-step loss terms (LoRA B = 0: the base model's) and trainable scalars:");
    for (size, pmg, theirs) in checks {
        let terms = |v: &serde_json::Value| {
            let l = &v["first_loss"];
            format!(
                "dice {:.6} bce {:.6} object {:.6}, {} trainable",
                l["dice"].as_f64().unwrap_or(f64::NAN),
                l["bce"].as_f64().unwrap_or(f64::NAN),
                l["object"].as_f64().unwrap_or(f64::NAN),
                v["trainable_params"]
            )
        };
        println!("- {size}: ours {}", terms(&pmg));
        if let Some(t) = theirs {
            println!("- {size}: PyTorch {}", terms(&t));
        }
    }
    Ok(())
}
