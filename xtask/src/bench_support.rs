//! `cargo xtask bench support`: support-set propagation (SGP's 3DM path) per slice, beside
//! SAM2's own mask-prompted propagation and beside the official PyTorch code doing the
//! `support_track` computation, on the same weights in one run; plus the support cache's
//! speedup.
//!
//! Per slice, every side runs image encoder + memory attention + heads + memory encoder.
//! Ours runs [`SupportTracker`] with SAM2's own bank (the parity kind's semantics, the
//! like-for-like comparison) and with similarity eviction (the default policy). The
//! supports are encoded once before the loop on every side and timed separately.
//!
//! Cache: K supports encoded into an empty on-disk [`SupportCache`] (cold), then read by a
//! fresh pool from the same folder (as a second `predict` would), then again from memory.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use sgp_memory::support::image_features;
use sgp_memory::{
    encode_support, identity_refine, BankKind, SliceContext, SupportCache, SupportItem, SupportPool, SupportTracker,
    WeightsId,
};
use sgp_sam2::Sam2Model;

use crate::bench_propagate::{
    config, last_json, load_model, propagate_ms_per_slice, python_bench, RandomSlices, PROPAGATE_SCRIPT,
};

#[derive(clap::Args)]
pub struct Args {
    /// Model input sizes S (multiples of 32).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    sizes: Vec<usize>,
    /// Preset name (e.g. sam2.1_hiera_t).
    #[arg(long, default_value = "sam2.1_hiera_t")]
    config: String,
    /// Supports K.
    #[arg(long, default_value_t = 4)]
    supports: usize,
    /// Slices of the timed volume.
    #[arg(long, default_value_t = 8)]
    slices: usize,
    /// Python with the official `sam2` package, torch and safetensors.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Threads for both sides (default: the machine's cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

/// A support: a random image with a rectangle mask of class 1 (as the PyTorch side uses).
fn support_item(size: usize, i: usize) -> anyhow::Result<SupportItem> {
    let image = RandomSlices { n: 1, size }.make(500 + i)?;
    let mut m = vec![0f32; size * size];
    for r in size / 4..size / 2 {
        for c in size / 3..3 * size / 4 {
            m[r * size + c] = 1.0;
        }
    }
    Ok(SupportItem {
        image,
        masks: BTreeMap::from([(1u32, Tensor::from_vec(m, (size, size), &Device::Cpu)?)]),
        case_id: format!("support{i}"),
    })
}

/// (support encoding ms, ms per tracked slice) of our support-set propagation.
fn support_propagation(
    model: &Sam2Model,
    size: usize,
    k: usize,
    slices: usize,
    bank: BankKind,
) -> anyhow::Result<(f64, f64)> {
    let t0 = Instant::now();
    let encoded = (0..k)
        .map(|i| Ok(encode_support(model, &support_item(size, i)?)?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let support_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mems = vec![encoded
        .iter()
        .map(|e| e.memory(1).context("a support lost its class"))
        .collect::<anyhow::Result<Vec<_>>>()?];
    let mut tracker = SupportTracker::new(model, &mems, bank.policy(k)?, slices)?;
    let src = RandomSlices { n: slices, size };
    let mut refine = identity_refine;
    let t0 = Instant::now();
    for i in 0..slices {
        let feats = image_features(model, &src.make(i)?.unsqueeze(0)?)?;
        let ctx = SliceContext {
            index: i,
            pass: 0,
            reverse: false,
            step: i,
        };
        tracker.step(&feats, ctx, &mut refine)?;
    }
    Ok((support_ms, t0.elapsed().as_secs_f64() * 1e3 / slices.max(1) as f64))
}

/// (cold ms, disk-hit ms, memory-hit ms) for encoding K supports through the cache.
fn cache_speedup(model: &Sam2Model, size: usize, k: usize) -> anyhow::Result<(f64, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let weights = WeightsId::new("bench");
    let fill = |pool: &mut SupportPool| -> anyhow::Result<()> {
        for i in 0..k {
            pool.push(support_item(size, i)?)?;
        }
        Ok(())
    };
    let timed = |pool: &mut SupportPool| -> anyhow::Result<f64> {
        let t0 = Instant::now();
        pool.encode_all(&mut |_, _| {})?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    let mut cold = SupportPool::new(model, weights.clone(), "bench", SupportCache::on_disk(dir.path())?);
    fill(&mut cold)?;
    let cold_ms = timed(&mut cold)?;
    anyhow::ensure!(
        cold.encoder_calls() == k,
        "cold run: {} encoder calls",
        cold.encoder_calls()
    );
    let mut warm = SupportPool::new(model, weights, "bench", SupportCache::on_disk(dir.path())?);
    fill(&mut warm)?;
    let disk_ms = timed(&mut warm)?;
    anyhow::ensure!(
        warm.encoder_calls() == 0,
        "disk run re-encoded {} supports",
        warm.encoder_calls()
    );
    let memory_ms = timed(&mut warm)?;
    Ok((cold_ms, disk_ms, memory_ms))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let threads = crate::bench::set_threads(args.threads);
    let py = crate::bench::pytorch_available(&args.python);
    let work = tempfile::tempdir()?;
    let k = args.supports;
    anyhow::ensure!(k > 0, "--supports must be at least 1");
    println!(
        "| S | K | slices | ours support (sam2 bank) ms/slice | ours support (similarity) ms/slice | PyTorch support_track ms/slice | ratio ours/PyTorch | ours SAM2 propagation ms/slice | PyTorch SAM2 propagation ms/slice | ours K-support encode ms | PyTorch K-support encode ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cache_rows = Vec::new();
    for &size in &args.sizes {
        let weights = work.path().join(format!("weights_{size}.safetensors"));
        let (py_sup, py_prop, w) = if py {
            let mut base = crate::bench::pytorch_model_args(&args.config, size, threads);
            crate::bench::write_pytorch_weights(&args.python, PROPAGATE_SCRIPT, &base, &weights)?;
            base.extend(["--slices", &args.slices.to_string(), "--mode", "time"].map(String::from));
            let mut sup = base.clone();
            sup.extend(["--supports".into(), k.to_string()]);
            let s = last_json(&python_bench(&args.python, &sup)?, "PyTorch support bench")?;
            let p = last_json(&python_bench(&args.python, &base)?, "PyTorch propagation bench")?;
            (Some(s), p["ms_per_slice"].as_f64(), Some(weights.as_path()))
        } else {
            (None, None, None)
        };
        let cfg = config(&args.config, size)?;
        let model = load_model(&cfg, w)?;
        let (enc_ms, sam2_bank_ms) = support_propagation(&model, size, k, args.slices, BankKind::Sam2)?;
        let (_, sim_ms) = support_propagation(&model, size, k, args.slices, BankKind::Similarity)?;
        let prop_ms = propagate_ms_per_slice(&model, size, args.slices)?;
        cache_rows.push((size, cache_speedup(&model, size, k)?));
        let f = |x: Option<f64>| x.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        let py_ms = py_sup.as_ref().and_then(|v| v["ms_per_slice"].as_f64());
        let py_enc = py_sup.as_ref().and_then(|v| v["support_ms"].as_f64());
        let ratio = py_ms
            .map(|p| format!("{:.2}", sam2_bank_ms / p))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {size} | {k} | {} | {sam2_bank_ms:.0} | {sim_ms:.0} | {} | {ratio} | {prop_ms:.0} | {} | {enc_ms:.0} | {} |",
            args.slices,
            f(py_ms),
            f(py_prop),
            f(py_enc)
        );
    }
    println!();
    println!("| S | K | cold encode ms | disk-cache ms | memory-cache ms | speedup (disk) |");
    println!("|---|---|---|---|---|---|");
    for (size, (cold, disk, mem)) in cache_rows {
        println!(
            "| {size} | {k} | {cold:.0} | {disk:.1} | {mem:.2} | {:.0}× |",
            cold / disk.max(1e-9)
        );
    }
    Ok(())
}
