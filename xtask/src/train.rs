//! `cargo xtask train`: parses the arguments into a `sgp::train::TrainConfig` and calls
//! `sgp::train::train` (all checks happen there, before any training).

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset layout: acdc, camus, busi, refuge, wbc, nnunet, biomedparse, folder, demo.
    #[arg(long)]
    dataset: String,
    /// Dataset folder.
    #[arg(long)]
    root: PathBuf,
    /// Official SAM2 weights (hub id or path); or pass --from-scratch.
    #[arg(long)]
    weights: Option<String>,
    /// Random initialisation; every parameter trains (needs --config).
    #[arg(long)]
    from_scratch: bool,
    /// SAM2 config: a preset (sam2.1_hiera_t) or a yaml/JSON file.
    #[arg(long)]
    config: Option<String>,
    /// Model input size S (a multiple of 32).
    #[arg(long, default_value_t = 512)]
    image_size: usize,
    /// K, supports per query.
    #[arg(long, default_value_t = 4)]
    support_size: usize,
    /// Optimiser updates (the learning-rate schedule spans them).
    #[arg(long)]
    steps: Option<usize>,
    /// Time budget in minutes.
    #[arg(long)]
    max_minutes: Option<f64>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Micro-batches per update.
    #[arg(long)]
    accumulation: Option<usize>,
    /// Validate (and checkpoint) every N updates.
    #[arg(long)]
    val_every: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run folder (config.json, metrics.jsonl, last/best checkpoints).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// How a query's supports are chosen: `similar` (the K most similar pool planes, as
    /// at inference) or `random`.
    #[arg(long, default_value = "similar", value_parser = ["similar", "random"])]
    selection: String,
    /// With `--selection similar`: re-embed the support pool every N updates (0: once).
    #[arg(long)]
    selection_refresh: Option<usize>,
    /// Slices per query on volumes (1: 2D training): chunks of consecutive slices through
    /// the memory bank, as at inference.
    #[arg(long)]
    chunk_slices: Option<usize>,
    /// Memory-bank policy of chunk training: similarity, fifo, sam2.
    #[arg(long)]
    bank: Option<String>,
    /// Table V ablation: train without support conditioning (no pseudo-mask, no box, no
    /// masked attention: SAM2 fine-tuned with the new head).
    #[arg(long)]
    no_pmg: bool,
    /// Table V ablation: train without PMA and the hierarchical decoder.
    #[arg(long)]
    no_pma: bool,
    #[command(flatten)]
    device: crate::model_source::DeviceArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut cfg = sgp::train::TrainConfig::new(&a.dataset, &a.root, a.weights.clone());
    cfg.from_scratch = a.from_scratch;
    cfg.ablation.no_pmg = a.no_pmg;
    cfg.ablation.no_pma = a.no_pma;
    if a.from_scratch {
        cfg.trainable = sgp::model::TrainableConfig::from_scratch();
    }
    cfg.model_config = a.config;
    cfg.image_size = a.image_size;
    cfg.support_size = a.support_size;
    cfg.seed = a.seed;
    match (a.steps, a.max_minutes) {
        (None, None) => anyhow::bail!("pass --steps N or --max-minutes M"),
        (s, m) => {
            // The schedule needs a length: --steps, else a nominal 2000 cut by the budget.
            cfg.steps = s.unwrap_or(2000);
            cfg.max_minutes = m;
        }
    }
    cfg.selection = match a.selection.as_str() {
        "random" => sgp::train::TrainSelection::Random,
        _ => sgp::train::TrainSelection::Similar,
    };
    if let Some(n) = a.chunk_slices {
        cfg.chunk_slices = n;
    }
    if let Some(b) = a.bank {
        cfg.bank = b;
    }
    if let Some(n) = a.selection_refresh {
        cfg.selection_refresh = n;
    }
    if let Some(lr) = a.lr {
        cfg.optimizer.lr = lr;
    }
    if let Some(n) = a.accumulation {
        cfg.accumulation = n;
    }
    if let Some(n) = a.val_every {
        cfg.val_every = n;
        cfg.checkpoint_every = n;
    }
    let opts = sgp::train::RunOptions {
        resume: a.resume,
        progress: true,
        stop_after: None,
        device: a.device.resolve()?,
    };
    let summary = sgp::train::train(cfg, &a.out, &opts).context("training failed")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
