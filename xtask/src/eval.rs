//! `cargo xtask eval-folder`: metrics of a folder of predictions against ground-truth labels.

use std::path::PathBuf;

use anyhow::Context;
use sgp_eval::{evaluate_folder, FolderOptions, MetricOptions, OverlayOptions, SliceChoice};

/// Evaluate predictions against labels (NIfTI or PNG, paired by case name) and write
/// metrics.csv, summary.json, summary.md and overlay pictures into --out.
#[derive(clap::Args)]
pub struct EvalFolderArgs {
    /// Folder of predicted label maps.
    #[arg(long)]
    pred: PathBuf,
    /// Folder of ground-truth label maps.
    #[arg(long)]
    gt: PathBuf,
    /// Output folder (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// Labels to evaluate, e.g. 1,2,3 (default: every non-zero label in the ground truth).
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<u16>>,
    /// NSD tolerance in mm.
    #[arg(long, default_value_t = 1.0)]
    nsd_tolerance: f64,
    /// Images to draw the overlays on (default: the ground truth folder's `images*` sibling,
    /// if any; else a grey rendering of the ground truth).
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// Do not draw overlay pictures.
    #[arg(long)]
    no_overlays: bool,
    /// Slice of 3D overlays: `max` (most ground-truth foreground), a slice index, or
    /// `montage` / `montage:N` (N slices with foreground, default 9).
    #[arg(long, default_value = "max")]
    slice: String,
    /// Also draw a per-case mean Dice bar chart (dice_per_case.png).
    #[arg(long)]
    bar_chart: bool,
}

fn parse_slice(s: &str) -> anyhow::Result<SliceChoice> {
    Ok(match s {
        "max" => SliceChoice::MostForeground,
        "montage" => SliceChoice::Montage(9),
        _ => match s.strip_prefix("montage:") {
            Some(n) => SliceChoice::Montage(n.parse().with_context(|| format!("--slice {s}: bad tile count"))?),
            None => SliceChoice::Index(
                s.parse()
                    .with_context(|| format!("--slice {s}: expected max, N or montage[:N]"))?,
            ),
        },
    })
}

pub fn run(args: EvalFolderArgs) -> anyhow::Result<()> {
    let options = FolderOptions {
        labels: args.labels,
        metrics: MetricOptions {
            nsd_tolerance_mm: args.nsd_tolerance,
        },
        image_dir: args.image_dir,
        overlays: !args.no_overlays,
        overlay: OverlayOptions {
            slice: parse_slice(&args.slice)?,
            ..OverlayOptions::default()
        },
        bar_chart: args.bar_chart,
    };
    let pb = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} evaluating {pos}/{len} cases [{elapsed_precise}] {wide_bar} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let outcome = evaluate_folder(&args.pred, &args.gt, &args.out, &options, Some(&pb));
    pb.finish_and_clear();
    let outcome = outcome?;
    let report = &outcome.report;
    for c in &report.unmatched.pred_only {
        eprintln!("unmatched prediction (no ground truth): {c}");
    }
    for c in &report.unmatched.gt_only {
        eprintln!("unmatched ground truth (no prediction): {c}");
    }
    if let Some(d) = &outcome.image_dir {
        eprintln!("overlay images from {}", d.display());
    }
    println!("{}", report.to_markdown());
    eprintln!("wrote {} files to {}", outcome.written.len(), args.out.display());
    Ok(())
}
