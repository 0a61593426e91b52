//! `cargo xtask eval`: a dataset as downloaded, every case of a split segmented prompt-free
//! from supports of the other side, the metrics and the paper-shaped Dice table
//! (`sgp::evaluate::evaluate_dataset` / `evaluate_ablation`; this file only parses
//! arguments and draws the progress bar).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sgp::evaluate::{evaluate_ablation, evaluate_dataset, EvalProgress, EvalRequest, EvalSplit, SplitSettings};
use sgp::load_run;
use sgp_eval::MetricOptions;

use crate::model_source::{DeviceArgs, ModelArgs};
use crate::predict::{cache_dir, SgpArgs};

/// Evaluate SAM2-SGP on a dataset: predictions, per-case metrics, summary and Dice table
/// into --out. Cases whose prediction file already exists in --out are not segmented again.
#[derive(clap::Args)]
pub struct Args {
    /// Dataset layout: acdc, camus, busi, refuge, wbc, nnunet, biomedparse, folder, demo.
    #[arg(long)]
    dataset: String,
    /// Dataset folder as downloaded.
    #[arg(long)]
    root: PathBuf,
    /// A trained run folder (`cargo xtask train --out`): its weights, head and split.
    #[arg(long, conflicts_with_all = ["weights", "head"])]
    run: Option<PathBuf>,
    /// Training-free: SAM2.1 weights, a hub repo id (facebook/sam2.1-hiera-tiny) or a local
    /// path (official .pt, .safetensors, transformers folder).
    #[arg(long, required_unless_present = "run")]
    weights: Option<String>,
    /// With --weights: preset name (sam2.1_hiera_t) or a yaml/JSON config file (default:
    /// implied by the weights).
    #[arg(long, requires = "weights")]
    config: Option<String>,
    /// With --weights: model input size S (multiple of 32; default: the config's).
    #[arg(long, requires = "weights")]
    image_size: Option<usize>,
    /// Cases evaluated: test, val (the patient-level split training uses) or all
    /// (leave-one-patient-out over every labelled case).
    #[arg(long, default_value = "test")]
    split: String,
    /// Split seed (default: the run's, else 0 as training's default).
    #[arg(long)]
    seed: Option<u64>,
    /// Output folder (created if needed; an existing one with the same settings resumes).
    #[arg(long)]
    out: PathBuf,
    /// Run the ablations instead: full, no-pmg, no-pma, no-3dm (volumes) and the K sweep,
    /// one Dice table (out/ablation.md).
    #[arg(long)]
    ablation: bool,
    /// Support sizes of the --ablation sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    k_sweep: Vec<usize>,
    /// NSD tolerance in mm.
    #[arg(long, default_value_t = 1.0)]
    nsd_tolerance: f64,
    /// Overlay pictures for this many cases (the first ones).
    #[arg(long, default_value_t = 4)]
    overlays: usize,
    /// At most this many evaluated cases (the first ones).
    #[arg(long)]
    max_cases: Option<usize>,
    /// At most this many support cases (the first of the support side).
    #[arg(long)]
    max_support_cases: Option<usize>,
    /// Support cache folder (default: ~/.cache/sgp/supports); "none" keeps it in memory.
    #[arg(long)]
    cache: Option<String>,
    /// Accept (and leave out) the unlabelled images of releases that ship some (ACDC
    /// testing/ of 2017, REFUGE's test images), as `data verify --allow-unlabelled`.
    #[arg(long)]
    allow_unlabelled: bool,
    #[command(flatten)]
    sgp: SgpArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

fn bar() -> ProgressBar {
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

fn show(pb: &ProgressBar, prefix: &str, p: EvalProgress) {
    let (what, done, total) = match p {
        EvalProgress::Supports(d, t) => ("encoding supports", d, t),
        EvalProgress::Cases(d, t) => ("cases", d, t),
    };
    pb.set_message(format!("{prefix}{what}"));
    pb.set_length(total as u64);
    pb.set_position(done as u64);
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dataset: sgp_data::DatasetKind = args.dataset.parse()?;
    let split: EvalSplit = args.split.parse()?;
    let mut options = args.sgp.options()?;
    let mut split_settings = SplitSettings::default();

    // The model: a trained run, or official (or test) weights with the training-free head.
    let device = args.device.resolve()?;
    let run;
    let pretrained;
    let (model, weights, head) = match &args.run {
        Some(dir) => {
            run = load_run(dir, &device).with_context(|| format!("cannot load the run {}", dir.display()))?;
            split_settings = SplitSettings {
                seed: run.config.seed,
                val_fraction: run.config.val_fraction,
                test_fraction: run.config.test_fraction,
            };
            // A run trained as an ablation is evaluated as that ablation: its model never
            // learned the parts it was trained without.
            let trained = run.config.ablation;
            options.ablation.no_pmg |= trained.no_pmg;
            options.ablation.no_pma |= trained.no_pma;
            if trained.no_pmg || trained.no_pma {
                tracing::info!(variant = %trained.name(), "the run was trained as an ablation; evaluating it as one");
            }
            if run.config.axis != options.axis {
                tracing::warn!(
                    run = run.config.axis,
                    eval = options.axis,
                    "slice axis differs from the run's"
                );
            }
            (run.model.sam(), run.weights_id()?, run.head())
        }
        None => {
            let model_args = ModelArgs {
                weights: args.weights.clone().context("pass --run or --weights")?,
                config: args.config.clone(),
                image_size: args.image_size,
                device: args.device.clone(),
            };
            pretrained = model_args.load()?;
            if !pretrained.has_memory_path {
                anyhow::bail!(
                    "`{}` is an image-only checkpoint: support-set segmentation needs SAM2's memory \
                     path (use the official .pt or a Sam2VideoModel checkpoint)",
                    model_args.weights
                );
            }
            let id = sgp_memory::WeightsId::of_file(&pretrained.weights_path)?;
            (&pretrained.model, id, args.sgp.head())
        }
    };
    if let Some(seed) = args.seed {
        split_settings.seed = seed;
    }
    if options.classes.as_ref().is_some_and(|c| c.is_empty()) {
        options.classes = None;
    }
    let req = EvalRequest {
        dataset,
        root: args.root.clone(),
        split,
        split_settings,
        out: args.out.clone(),
        options,
        metrics: MetricOptions {
            nsd_tolerance_mm: args.nsd_tolerance,
        },
        overlays: args.overlays,
        cache_dir: cache_dir(args.cache.as_deref()),
        max_support_cases: args.max_support_cases,
        max_cases: args.max_cases,
        allow_unlabelled: args.allow_unlabelled,
    };

    let pb = bar();
    if args.ablation {
        if args.k_sweep.is_empty() || args.k_sweep.contains(&0) {
            anyhow::bail!("--k-sweep needs support sizes of at least 1");
        }
        let table = evaluate_ablation(model, &weights, &head, &req, &args.k_sweep, &mut |name, p| {
            show(&pb, &format!("{name}: "), p)
        });
        pb.finish_and_clear();
        let table = table?;
        println!("{table}");
        eprintln!(
            "wrote {} ({:.1}s)",
            args.out.join("ablation.md").display(),
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let outcome = evaluate_dataset(model, &weights, &head, &req, &mut |p| show(&pb, "", p));
    pb.finish_and_clear();
    let outcome = outcome?;
    println!("{}", outcome.report.to_markdown());
    println!("{}", outcome.table);
    eprintln!(
        "{} cases ({} segmented, {} from earlier predictions; {} support items); wrote {} ({:.1}s)",
        outcome.cases.len(),
        outcome.predicted,
        outcome.resumed,
        outcome.support_items,
        args.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
