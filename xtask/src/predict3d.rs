//! `cargo xtask predict-3d`: prompted 3D segmentation of a NIfTI volume by propagating
//! SAM2's memory through its slices (`sgp::pipeline::volume`; the slice geometry and the
//! intensity mapping are documented there).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sgp::pipeline::{self, Direction, VolumePrompt, VolumeRequest};

#[derive(clap::Args)]
pub struct Args {
    /// Input volume (.nii or .nii.gz).
    #[arg(long)]
    volume: PathBuf,
    /// The prompted slice index along --axis.
    #[arg(long)]
    slice: usize,
    /// Box prompt on the prompted slice, in voxels: x0,y0,x1,y1 (columns along the lower
    /// remaining axis, rows along the higher one).
    #[arg(long = "box", value_name = "x0,y0,x1,y1")]
    box_: Option<String>,
    /// Mask prompt: a label volume on the same grid; its non-zero voxels on the prompted
    /// slice are the object.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Point prompts on the prompted slice, in voxels: "x,y,label;x,y,label".
    #[arg(long)]
    points: Option<String>,
    /// Slice axis of the volume array (0, 1 or 2).
    #[arg(long, default_value_t = 2)]
    axis: usize,
    /// forward, backward or both.
    #[arg(long, default_value = "both")]
    direction: String,
    /// Intensity preset: ct, mr or other (min-max). CT and MR clip to percentiles 0.5/99.5.
    #[arg(long, default_value = "other")]
    modality: String,
    /// Fixed intensity window "level,width" (e.g. -600,1500 for lung CT); overrides --modality.
    #[arg(long, value_name = "L,W", allow_hyphen_values = true)]
    window: Option<String>,
    #[command(flatten)]
    model: crate::model_source::ModelArgs,
    /// Output label volume (.nii.gz).
    #[arg(long)]
    out: PathBuf,
}

fn prompt(args: &Args) -> anyhow::Result<VolumePrompt> {
    match (&args.box_, &args.mask, &args.points) {
        (Some(b), None, None) => Ok(VolumePrompt::Box(pipeline::parse_box(b)?)),
        (None, None, Some(p)) => {
            let (pts, labels) = pipeline::parse_points(p)?;
            Ok(VolumePrompt::Points(pts, labels))
        }
        (None, Some(m), None) => {
            let labels = sgp_data::read_labels(m).with_context(|| format!("reading --mask {}", m.display()))?;
            Ok(VolumePrompt::Mask(labels.data))
        }
        _ => bail!("give exactly one prompt: --box, --mask or --points"),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    // Everything that can fail on user input fails before the model loads.
    let request = VolumeRequest {
        axis: args.axis,
        slice: args.slice,
        prompt: prompt(&args)?,
        direction: args.direction.parse::<Direction>()?,
        intensity: pipeline::intensity_method(&args.modality, args.window.as_deref())?,
    };
    let image = sgp_data::read_image(&args.volume).with_context(|| format!("reading {}", args.volume.display()))?;
    let prepared = pipeline::prepare_volume(&image, &request).with_context(|| format!("{}", args.volume.display()))?;

    let loaded = args.model.load()?;
    if !loaded.has_memory_path {
        bail!(
            "`{}` is an image-only checkpoint (transformers Sam2Model); propagation needs the \
             memory path: use the official .pt or a Sam2VideoModel checkpoint",
            args.model.weights
        );
    }

    let bar = ProgressBar::new(prepared.num_slices() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} slices ({elapsed}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("propagating");
    let seg = prepared.segment(&loaded.model, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();

    pipeline::write_labels(&args.out, &seg.labels, &image)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} foreground voxels, {} slices, {:.1}s, peak memory bank {} frames)",
        args.out.display(),
        seg.foreground_voxels,
        seg.slices,
        t0.elapsed().as_secs_f64(),
        seg.peak_bank_len
    );
    Ok(())
}
