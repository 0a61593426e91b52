//! `cargo xtask bench sam2`: SAM2 image-encoder and mask-decoder latency, ours beside the
//! official PyTorch code on the same weights, in one run (the VM is noisy; compare ratios).
//!
//! For each size, `tools/bench/sam2_pytorch_bench.py` builds the official model (random
//! weights) and writes its state dict as safetensors, then in a second process times its
//! stages; we load those weights and time the same stages:
//! - encode: `forward_image` + `_prepare_backbone_features` + `no_mem_embed` on `[1,3,S,S]`;
//! - decode: `_forward_sam_heads` with a box prompt, multimask output, masks upsampled to S.
//!
//! `--rounds R` alternates the two sides R times (PyTorch, ours, PyTorch, ...) and reports
//! each stage's median over the rounds, with the range of the per-round ratios of the
//! totals: on a shared VM one side's single run was seen 50% off its usual time.
//!
//! Without a Python that has `sam2`, we time ours alone on random (untracked) weights.
//! `--profile` adds a per-part breakdown (Hiera stages, neck, decoder parts) on both sides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Module, Tensor};
use sgp_sam2::ops::gelu;
use sgp_sam2::PointInputs;
use sgp_sam2::Sam2Config;
use sgp_sam2::Sam2Model;

#[derive(clap::Args)]
pub struct Args {
    /// Model input sizes S (multiples of 32).
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    sizes: Vec<usize>,
    /// Preset name (e.g. sam2.1_hiera_t).
    #[arg(long, default_value = "sam2.1_hiera_t")]
    config: String,
    /// Timed iterations per stage (median reported).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Untimed warm-up iterations per stage.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Python with the official `sam2` package, torch and safetensors.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Threads for both sides (default: candle's, i.e. RAYON_NUM_THREADS or the cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Also time the parts (Hiera stages, neck, decoder pieces).
    #[arg(long)]
    profile: bool,
    /// Rounds of (PyTorch, ours); each stage reports its median over the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Folder for the exchanged weights (default: a temp folder; files are removed after use).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// (stage, size) -> median ms.
type Timings = BTreeMap<(String, usize), f64>;
/// (stage, size) -> that stage's median ms in each round.
type Rounds = BTreeMap<(String, usize), Vec<f64>>;

fn add_round(all: &mut Rounds, round: Timings) {
    for (k, ms) in round {
        all.entry(k).or_default().push(ms);
    }
}

fn medians(all: Rounds) -> Timings {
    all.into_iter().map(|(k, v)| (k, median(v))).collect()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub(crate) fn time_ms<T>(warmup: usize, iters: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        f()?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ts))
}

const PYTORCH_SCRIPT: &str = "sam2_pytorch_bench.py";

fn write_pytorch_weights(args: &Args, size: usize, threads: usize, weights: &Path) -> anyhow::Result<()> {
    eprintln!("[{size}] PyTorch writes its weights ...");
    let model_args = crate::bench::pytorch_model_args(&args.config, size, threads);
    crate::bench::write_pytorch_weights(&args.python, PYTORCH_SCRIPT, &model_args, weights)
}

/// Runs the PyTorch side for one size (one round) and returns its timings.
fn run_pytorch(args: &Args, size: usize, threads: usize) -> anyhow::Result<Timings> {
    let mut cmd = Command::new(&args.python);
    cmd.arg(crate::bench::pytorch_script(PYTORCH_SCRIPT))
        .args(crate::bench::pytorch_model_args(&args.config, size, threads))
        .args(["--iters", &args.iters.to_string()])
        .args(["--warmup", &args.warmup.to_string()]);
    if args.profile {
        cmd.arg("--profile");
    }
    let out = cmd.output().with_context(|| format!("cannot run {}", args.python))?;
    if !out.status.success() {
        bail!("PyTorch bench failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON from PyTorch bench")?;
    let v: serde_json::Value = serde_json::from_str(line).context("PyTorch bench JSON")?;
    let mut t = Timings::new();
    for key in ["results", "profile"] {
        for r in v[key].as_array().into_iter().flatten() {
            let stage = r["stage"].as_str().unwrap_or("?").to_string();
            let ms = r["median_ms"].as_f64().unwrap_or(f64::NAN);
            t.insert((stage, size), ms);
        }
    }
    Ok(t)
}

fn box_prompt(size: usize, dev: &Device) -> anyhow::Result<PointInputs> {
    let s = size as f32;
    Ok(PointInputs {
        coords: Tensor::new(&[[[0.2 * s, 0.25 * s], [0.7 * s, 0.8 * s]]], dev)?,
        labels: Tensor::new(&[[2f32, 3.]], dev)?,
    })
}

fn run_ours(args: &Args, model: &Sam2Model, size: usize) -> anyhow::Result<Timings> {
    let dev = Device::Cpu;
    let image = Tensor::randn(0f32, 1.0, (1, 3, size, size), &dev)?;
    let points = box_prompt(size, &dev)?;
    let mut t = Timings::new();
    let enc = time_ms(args.warmup, args.iters, || Ok(model.image_features(&image)?))?;
    t.insert(("encode".into(), size), enc);
    let (pix, hi) = model.image_features(&image)?;
    let hi_ref = hi.as_ref().map(|(a, b)| (a, b));
    let dec = time_ms(args.warmup, args.iters, || {
        Ok(model
            .sam_heads()
            .forward(&pix, Some(&points), None, hi_ref, sgp_sam2::Multimask::Multi)?)
    })?;
    t.insert(("decode".into(), size), dec);
    if args.profile {
        profile_ours(args, model, &image, &pix, hi_ref, &points, size, &mut t)?;
    }
    Ok(t)
}

/// Times the parts of encode and decode by running the public sub-modules in order.
#[allow(clippy::too_many_arguments)]
fn profile_ours(
    args: &Args,
    model: &Sam2Model,
    image: &Tensor,
    pix: &Tensor,
    hi: Option<(&Tensor, &Tensor)>,
    points: &PointInputs,
    size: usize,
    t: &mut Timings,
) -> anyhow::Result<()> {
    let (w, n) = (args.warmup, args.iters);
    let trunk = &model.image_encoder().trunk;
    // Hiera: patch embedding + position embedding, then each stage's blocks.
    let mut x = {
        let f = || -> anyhow::Result<Tensor> {
            let x = trunk.patch_embed.forward(image)?.permute((0, 2, 3, 1))?;
            let (_, h, w, _) = x.dims4()?;
            Ok(x.broadcast_add(&trunk.pos_embed_for(h, w)?)?.contiguous()?)
        };
        t.insert(("  hiera.patch+pos".into(), size), time_ms(w, n, f)?);
        f()?
    };
    let mut stage = 0;
    let mut i = 0;
    let mut trunk_outs = Vec::new();
    while i < trunk.blocks.len() {
        // A stage starts where the width changes (and queries are pooled).
        let mut j = i + 1;
        while j < trunk.blocks.len() && trunk.blocks[j].dim == trunk.blocks[j].dim_out {
            j += 1;
        }
        stage += 1;
        let blocks = &trunk.blocks[i..j];
        let input = x.clone();
        let run = || -> anyhow::Result<Tensor> {
            let mut y = input.clone();
            for b in blocks {
                y = b.forward(&y)?;
            }
            Ok(y)
        };
        let ws: Vec<usize> = blocks.iter().map(|b| b.window_size).collect();
        if size == args.sizes[0] {
            eprintln!(
                "hiera stage {stage}: {} blocks, window sizes {:?} (0 = global)",
                blocks.len(),
                dedup(&ws)
            );
        }
        t.insert((format!("  hiera.stage{stage}"), size), time_ms(w, n, run)?);
        // Inside the blocks: attention (qkv, core, proj) and MLP, on inputs of the shapes
        // the block gives them (timing does not depend on the values).
        let (mut attn, mut qkv, mut proj, mut mlp) = (0.0, 0.0, 0.0, 0.0);
        let mut y = x.clone();
        for b in blocks {
            let (bb, h, ww, _) = y.dims4()?;
            let normed = Tensor::randn(0f32, 1.0, (bb, h, ww, b.dim), &Device::Cpu)?;
            // Windowed input of the shape Hiera's window partition gives (H and W padded
            // up to multiples of the window; values do not matter for timing).
            let win = if b.window_size > 0 {
                let ws = b.window_size;
                let windows = h.div_ceil(ws) * ww.div_ceil(ws);
                Tensor::randn(0f32, 1.0, (bb * windows, ws, ws, b.dim), &Device::Cpu)?
            } else {
                normed
            };
            attn += time_ms(w, n, || Ok(b.attn.forward(&win)?))?;
            qkv += time_ms(w, n, || Ok(b.attn.qkv.forward(&win)?))?;
            let attn_out = b.attn.forward(&win)?;
            proj += time_ms(w, n, || Ok(b.attn.proj.forward(&attn_out)?))?;
            y = b.forward(&y)?;
            let m = Tensor::randn(0f32, 1.0, y.dims(), &Device::Cpu)?;
            mlp += time_ms(w, n, || Ok(b.mlp.forward(&m)?))?;
        }
        for (part, ms) in [("attn", attn), ("attn.qkv", qkv), ("attn.proj", proj), ("mlp", mlp)] {
            t.insert((format!("  hiera.stage{stage}.{part}"), size), ms);
        }
        x = run()?;
        trunk_outs.push(x.permute((0, 3, 1, 2))?.contiguous()?);
        i = j;
    }
    let neck = || Ok(model.image_encoder().neck.forward(&trunk_outs)?);
    t.insert(("  neck (FPN + pos enc)".into(), size), time_ms(w, n, neck)?);

    // Decoder parts.
    let heads = model.sam_heads();
    let pe = &heads.prompt_encoder;
    let dec = &heads.mask_decoder;
    let prompt = || Ok(pe.forward(Some((&points.coords, &points.labels)), None, None)?);
    t.insert(("  dec.prompt_encoder".into(), size), time_ms(w, n, prompt)?);
    let (sparse, dense) = prompt()?;
    let tokens = {
        let c = dec.cfg.transformer_dim;
        let mut parts = Vec::new();
        if let Some(o) = &dec.obj_score_token {
            parts.push(o.clone());
        }
        parts.push(dec.iou_token.clone());
        parts.push(dec.mask_tokens.clone());
        let out = Tensor::cat(&parts, 0)?.unsqueeze(0)?;
        let n_out = out.dim(1)?;
        Tensor::cat(&[&out.expand((1, n_out, c))?, &sparse], 1)?
    };
    let src = pix.broadcast_add(&dense)?;
    let tf = || Ok(dec.transformer.forward(&src, pe.get_dense_pe(), &tokens)?);
    t.insert(("  dec.two_way_transformer".into(), size), time_ms(w, n, tf)?);
    let (_, keys) = tf()?;
    let (b, c, h, ww) = src.dims4()?;
    let src2 = keys.transpose(1, 2)?.reshape((b, c, h, ww))?;
    let up = || -> anyhow::Result<Tensor> {
        let x = dec.upscale_conv1.forward(&src2)?;
        let x = match hi {
            Some((_, s1)) => x.broadcast_add(s1)?,
            None => x,
        };
        let x = gelu(&dec.upscale_norm.forward(&x)?)?;
        let x = dec.upscale_conv2.forward(&x)?;
        let x = match hi {
            Some((s0, _)) => x.broadcast_add(s0)?,
            None => x,
        };
        Ok(gelu(&x)?)
    };
    t.insert(("  dec.upscaling (2x convT 2x2)".into(), size), time_ms(w, n, up)?);
    let low = Tensor::randn(0f32, 1.0, (1, 3, size / 4, size / 4), &Device::Cpu)?;
    let ups = || Ok(sgp_kernels::resize::bilinear(&low, size, size, false)?);
    t.insert(("  dec.upsample masks to S".into(), size), time_ms(w, n, ups)?);
    Ok(())
}

fn dedup(v: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for &x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle and rayon read this before their first parallel op.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let threads = candle_core::utils::get_num_threads();
    if args.iters == 0 || args.rounds == 0 {
        bail!("--iters and --rounds must be at least 1");
    }
    for &s in &args.sizes {
        if s == 0 || s % 32 != 0 {
            bail!("--sizes: {s} is not a positive multiple of 32");
        }
    }
    let base = Sam2Config::preset(&args.config)?.with_real_use_settings();
    let python = crate::bench::python_has_sam2(&args.python);
    if let Err(why) = &python {
        eprintln!("PyTorch side skipped: {why} (use --python PATH)");
    }
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("sgp-bench-sam2"));
    std::fs::create_dir_all(&work_dir).with_context(|| format!("cannot create {}", work_dir.display()))?;

    let mut ours = Rounds::new();
    let mut theirs = Rounds::new();
    for &size in &args.sizes {
        let cfg = base.clone().with_image_size(size)?;
        let model = if python.is_ok() {
            let weights = work_dir.join(format!("{}_{size}.safetensors", args.config));
            let res = write_pytorch_weights(&args, size, threads, &weights)
                .and_then(|()| Ok(Sam2Model::load(&cfg, &weights, &Device::Cpu)?));
            let _ = std::fs::remove_file(&weights);
            res?
        } else {
            // Untracked random weights: a model built on Vars would take the
            // differentiable paths and record a graph, and timing that says nothing.
            crate::bench_propagate::load_model(&cfg, None)?
        };
        for round in 1..=args.rounds {
            if python.is_ok() {
                eprintln!(
                    "[{size}] round {round}/{}: PyTorch ({threads} threads) ...",
                    args.rounds
                );
                add_round(&mut theirs, run_pytorch(&args, size, threads)?);
            }
            eprintln!("[{size}] round {round}/{}: ours ({threads} threads) ...", args.rounds);
            add_round(&mut ours, run_ours(&args, &model, size)?);
        }
    }

    println!(
        "SAM2 {} on CPU, {threads} threads, median of {} (after {} warm-up)",
        args.config, args.iters, args.warmup
    );
    println!(
        "{:<42} {:>6} {:>12} {:>12} {:>7}",
        "stage", "size", "ours ms", "PyTorch ms", "ratio"
    );
    let per_round_ratios = |key: &(String, usize)| -> Option<String> {
        let (o, p) = (ours.get(key)?, theirs.get(key)?);
        let r: Vec<f64> = o.iter().zip(p).map(|(o, p)| o / p).collect();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (r.len() > 1).then(|| format!("{lo:.2}–{hi:.2}"))
    };
    let ranges: BTreeMap<(String, usize), String> = ours
        .keys()
        .filter(|(s, _)| !s.starts_with(' '))
        .filter_map(|k| Some((k.clone(), per_round_ratios(k)?)))
        .collect();
    let mut ours = medians(ours);
    let mut theirs = medians(theirs);
    add_attention_core(&mut ours);
    add_attention_core(&mut theirs);
    let mut keys: Vec<&(String, usize)> = ours.keys().collect();
    // Totals first, then parts, each by size.
    keys.sort_by_key(|(s, z)| (s.starts_with(' '), *z, order(s), s.clone()));
    for k in keys {
        let o = ours[k];
        let (p, r) = match theirs.get(k) {
            Some(p) => (format!("{p:.1}"), format!("{:.2}", o / p)),
            None => ("n/a".into(), "n/a".into()),
        };
        let range = ranges.get(k).map(|r| format!("  (rounds {r})")).unwrap_or_default();
        println!("{:<42} {:>6} {:>12.1} {:>12} {:>7}{range}", k.0, k.1, o, p, r);
    }
    println!("ratio = ours / PyTorch (lower is better for us)");
    if args.rounds > 1 {
        println!("each figure: the median over {} rounds of its side", args.rounds);
    }
    Ok(())
}

/// `attn.core` = attention - qkv - proj: the q·kᵀ, softmax, ·v part (plus head reshapes
/// and query pooling).
fn add_attention_core(t: &mut Timings) {
    let keys: Vec<(String, usize)> = t.keys().filter(|(s, _)| s.ends_with(".attn")).cloned().collect();
    for (s, z) in keys {
        let base = s.trim_end_matches(".attn");
        let get = |p: &str| t.get(&(format!("{base}.{p}"), z)).copied();
        if let (Some(a), Some(q), Some(p)) = (get("attn"), get("attn.qkv"), get("attn.proj")) {
            t.insert((format!("{base}.attn.core"), z), a - q - p);
        }
    }
}

fn order(stage: &str) -> usize {
    let s = stage.trim_start();
    [
        "encode",
        "decode",
        "hiera.patch",
        "hiera.stage",
        "neck",
        "dec.prompt",
        "dec.two",
        "dec.upscaling",
        "dec.upsample",
    ]
    .iter()
    .position(|p| s.starts_with(p))
    .unwrap_or(99)
}
