//! `cargo xtask predict`: prompt-free segmentation from a support set
//! (`sgp::predict_to_file`; this file only parses arguments).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sgp::predictor::{Ablation, PredictorOptions};
use sgp::{predict_to_file, HeadChoice, PredictRequest};

/// Options shared by `predict` and `eval`: support set, bank, direction, classes.
#[derive(clap::Args, Debug, Clone)]
pub struct SgpArgs {
    /// K, the supports per class and query.
    #[arg(long, default_value_t = 4)]
    pub support_size: usize,
    /// Support selection: topk (cosine similarity), first or random:SEED.
    #[arg(long, default_value = "topk")]
    pub selection: String,
    /// 3D memory bank policy: similarity, fifo or sam2.
    #[arg(long, default_value = "similarity")]
    pub bank: String,
    /// Slice memories kept by the FIFO / similarity bank (default: K).
    #[arg(long)]
    pub bank_size: Option<usize>,
    /// both, forward or backward.
    #[arg(long, default_value = "both")]
    pub direction: String,
    /// Classes to segment, e.g. 1,2,3 (default: every class of the supports).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<u32>>,
    /// Slice axis of volumes (0, 1 or 2).
    #[arg(long, default_value_t = 2)]
    pub axis: usize,
    /// Slices each support volume contributes.
    #[arg(long, default_value_t = 5)]
    pub support_slices: usize,
    /// A trained SGP head (safetensors from training); default: training-free (γ = 0, R = 0).
    #[arg(long)]
    pub head: Option<PathBuf>,
    /// Output the pseudo-mask only (no PMA, no decoder).
    #[arg(long)]
    pub no_pma: bool,
    /// No support conditioning (ablation).
    #[arg(long)]
    pub no_pmg: bool,
    /// No 3D memory bank: volumes slice by slice (ablation).
    #[arg(long = "no-3dm")]
    pub no_3dm: bool,
}

impl SgpArgs {
    /// The predictor options these arguments describe.
    pub fn options(&self) -> anyhow::Result<PredictorOptions> {
        let selection = match self.selection.as_str() {
            "topk" | "top-k" => sgp_memory::Selection::TopK,
            "first" | "first-k" => sgp_memory::Selection::FirstK,
            s => match s.strip_prefix("random:").or_else(|| s.strip_prefix("random-k:")) {
                Some(seed) => sgp_memory::Selection::RandomK {
                    seed: seed.parse().with_context(|| format!("--selection {s}: bad seed"))?,
                },
                None => anyhow::bail!("--selection {s}: expected topk, first or random:SEED"),
            },
        };
        Ok(PredictorOptions {
            support_size: self.support_size,
            selection,
            bank: self.bank.parse()?,
            bank_size: self.bank_size,
            direction: self.direction.parse()?,
            axis: self.axis,
            support_slices: self.support_slices,
            classes: self.classes.clone(),
            ablation: Ablation {
                no_pmg: self.no_pmg,
                no_pma: self.no_pma,
                no_3dm: self.no_3dm,
            },
        })
    }

    /// The head these arguments ask for.
    pub fn head(&self) -> HeadChoice {
        match &self.head {
            Some(p) => HeadChoice::File(p.clone()),
            None => HeadChoice::TrainingFree,
        }
    }
}

/// Segment an image or volume from labelled examples, without any prompt.
#[derive(clap::Args)]
pub struct Args {
    /// Supports: a dataset root in any layout `data verify` reads, or a folder with
    /// images/ and masks/.
    #[arg(long)]
    support: PathBuf,
    /// The support folder's layout (default: detected).
    #[arg(long)]
    support_kind: Option<String>,
    /// Image (PNG, JPEG, BMP, TIFF), volume (.nii, .nii.gz) or DICOM series folder.
    #[arg(long)]
    input: PathBuf,
    /// Output label map: .png for pictures, .nii.gz for volumes (the input's geometry).
    #[arg(long)]
    out: PathBuf,
    /// Modality of the input (ct, mr, us, photo), when it is not a case of the supports.
    #[arg(long)]
    modality: Option<String>,
    /// Support cache folder (default: ~/.cache/sgp/supports); "none" keeps it in memory.
    #[arg(long)]
    cache: Option<String>,
    #[command(flatten)]
    sgp: SgpArgs,
    #[command(flatten)]
    model: crate::model_source::ModelArgs,
}

/// `--cache`: a folder, `none`, or the default under the user's cache folder.
pub fn cache_dir(arg: Option<&str>) -> Option<PathBuf> {
    match arg {
        Some("none") => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("sgp").join("supports")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let req = PredictRequest {
        support: args.support.clone(),
        support_kind: args.support_kind.as_deref().map(str::parse).transpose()?,
        input: args.input.clone(),
        out: args.out.clone(),
        modality: args.modality.clone(),
        cache_dir: cache_dir(args.cache.as_deref()),
        options: args.sgp.options()?,
    };
    req.validate()?;
    let loaded = args.model.load()?;
    if !loaded.has_memory_path {
        anyhow::bail!(
            "`{}` is an image-only checkpoint: support-set segmentation needs SAM2's memory path \
             (use the official .pt or a Sam2VideoModel checkpoint)",
            args.model.weights
        );
    }
    // The cache key holds the weights file's hash: other weights never reuse an entry.
    let weights = sgp_memory::WeightsId::of_file(&loaded.weights_path)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} slices ({elapsed}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("segmenting");
    let outcome = predict_to_file(&loaded.model, &weights, &args.sgp.head(), &req, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let outcome = outcome?;
    let per_class: Vec<String> = outcome
        .classes
        .iter()
        .zip(&outcome.voxels_per_class)
        .map(|(c, n)| format!("class {c}: {n}"))
        .collect();
    eprintln!(
        "wrote {} ({}; {} planes; {} support items from {} cases, {} encoded; {:.1}s)",
        outcome.out.display(),
        per_class.join(", "),
        outcome.planes,
        outcome.support_items,
        outcome.support_cases,
        outcome.support_encoder_calls,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
