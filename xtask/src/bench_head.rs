//! `cargo xtask bench head`: PMA + hierarchical decoder (the [`SgpHead`]) forward and
//! forward+backward time beside SAM2's mask decoder alone (the same box prompt on the same
//! features), with each step's peak memory.
//!
//! Inputs are one query: real image features of a random image (the model's own encoder),
//! a disc pseudo-mask, so the box and the masked attention are active. Forward runs the
//! inference copies (plain tensors, fast kernels). Forward+backward makes the
//! memory-conditioned features a variable, so the backward pass runs through SAM2's
//! decoder as it does in training (LoRA sits upstream), and the head is trainable.
//!
//! Peak memory: `VmHWM` is reset through `/proc/self/clear_refs` before each step and read
//! after it; the table shows the peak above the RSS at the step's start.

use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor, Var};
use sgp_pma::{HeadDims, PmgParts, SgpHead, SgpHeadConfig};
use sgp_sam2::{PointInputs, Sam2Model};

use crate::bench_propagate::{config, load_model, RandomSlices};

#[derive(clap::Args)]
pub struct Args {
    /// Model input sizes S (multiples of 32).
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    sizes: Vec<usize>,
    /// Preset name (e.g. sam2.1_hiera_t).
    #[arg(long, default_value = "sam2.1_hiera_t")]
    config: String,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Threads (default: the machine's cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

fn status_mb(key: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key}"))?;
    let kb: f64 = line.split_whitespace().nth(1).context("value")?.parse()?;
    Ok(kb / 1024.0)
}

/// Mean ms over `iters` runs after a warm-up, and the peak RSS above the start (MB).
fn measure(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(f64, f64)> {
    f()?;
    // "5" resets the peak-RSS counter (Linux ≥ 4.0); without it the peak is the process's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let start = status_mb("VmRSS:")?;
    let t0 = Instant::now();
    for _ in 0..iters.max(1) {
        f()?;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
    Ok((ms, (status_mb("VmHWM:")? - start).max(0.0)))
}

/// A disc of logits +8 inside, −8 outside, centred, radius S/8, at `[1, 1, n, n]`.
fn disc(n: usize) -> anyhow::Result<Tensor> {
    let c = n as f32 / 2.0;
    let r = n as f32 / 8.0;
    let v: Vec<f32> = (0..n * n)
        .map(|i| {
            let (y, x) = ((i / n) as f32 - c, (i % n) as f32 - c);
            if x * x + y * y <= r * r {
                8.0
            } else {
                -8.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, (1, 1, n, n), &Device::Cpu)?)
}

fn parts(model: &Sam2Model, image: &Tensor, s: usize) -> anyhow::Result<PmgParts> {
    let (emb, hr) = model.image_features(image)?;
    Ok(PmgParts {
        pix_feat_with_mem: emb,
        pred_masks: disc(s / 4)?,
        pred_masks_high_res: disc(s)?,
        object_score_logits: Tensor::full(3f32, (1, 1), &Device::Cpu)?,
        high_res_feats: hr,
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::bench::set_threads(args.threads);
    println!(
        "| S | step | SAM2 decoder ms | PMA + decoder ms | ratio | SAM2 decoder peak MB | PMA + decoder peak MB |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut counts = None;
    for &size in &args.sizes {
        let cfg = config(&args.config, size)?;
        let model = load_model(&cfg, None)?;
        let dims = HeadDims::of(&model);
        let (trainable, _varmap) = SgpHead::init(&SgpHeadConfig::default(), dims, &Device::Cpu, 0)?;
        counts = Some(trainable.num_parameters());
        let head = trainable.detached()?;
        let image = RandomSlices { n: 1, size }.make(0)?.unsqueeze(0)?;
        let pmg = parts(&model, &image, size)?;
        let boxes = head.forward(&model, &pmg, &image)?.boxes;
        let [x0, y0, x1, y1] = boxes[0].context("the disc pseudo-mask has no box")?;
        let points = PointInputs {
            coords: Tensor::from_vec(vec![x0, y0, x1, y1], (1, 2, 2), &Device::Cpu)?,
            labels: Tensor::new(&[[2f32, 3.0]], &Device::Cpu)?,
        };
        let heads = model.sam_heads();
        let single = heads.multimask(false);
        let hr = pmg.high_res_feats.clone();
        let hr_ref = |h: &Option<(Tensor, Tensor)>| h.as_ref().map(|(a, b)| (a.clone(), b.clone()));
        let sam2_fwd = measure(args.iters, || {
            let h = hr_ref(&hr);
            heads.forward(
                &pmg.pix_feat_with_mem,
                Some(&points),
                None,
                h.as_ref().map(|(a, b)| (a, b)),
                single,
            )?;
            Ok(())
        })?;
        let head_fwd = measure(args.iters, || {
            head.forward(&model, &pmg, &image)?;
            Ok(())
        })?;
        let feat = Var::from_tensor(&pmg.pix_feat_with_mem)?;
        let sam2_bwd = measure(args.iters, || {
            let h = hr_ref(&hr);
            let out = heads.forward(
                feat.as_tensor(),
                Some(&points),
                None,
                h.as_ref().map(|(a, b)| (a, b)),
                single,
            )?;
            out.high_res_masks.mean_all()?.backward()?;
            Ok(())
        })?;
        let tracked = PmgParts {
            pix_feat_with_mem: feat.as_tensor().clone(),
            ..pmg.clone()
        };
        let head_bwd = measure(args.iters, || {
            trainable
                .forward(&model, &tracked, &image)?
                .final_logits
                .mean_all()?
                .backward()?;
            Ok(())
        })?;
        for (step, (a, b)) in [
            ("forward", (sam2_fwd, head_fwd)),
            ("forward+backward", (sam2_bwd, head_bwd)),
        ] {
            println!(
                "| {size} | {step} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} |",
                a.0,
                b.0,
                b.0 / a.0,
                a.1,
                b.1
            );
        }
    }
    if let Some((pma, decoder)) = counts {
        println!();
        println!(
            "Head parameters ({}, default SgpHeadConfig): PMA {pma}, hierarchical decoder {decoder}, total {}",
            args.config,
            pma + decoder
        );
    }
    Ok(())
}
