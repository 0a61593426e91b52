//! `cargo xtask predict-3d`: prompted 3D segmentation of a NIfTI volume by propagating
//! SAM2's memory through its slices (`sgp_sam2::propagation`, the semantics of
//! `SAM2VideoPredictor` for one object) with the settings users of the official package get.
//!
//! Slices are taken along `--axis`; in a slice image, columns run along the lower remaining
//! array axis and rows along the higher one (for axis 2: x → columns, y → rows), so prompt
//! coordinates `x,y` are voxel indices. Intensities are mapped to [0, 1] per volume
//! (`sgp_data::preprocess`, per-modality defaults or `--window`). The 0/1 label volume
//! is written atomically with the input's header and affine (`sgp_data::write_labels_like`
//! picks the datatype).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use sgp_data::preprocess::{normalize_intensity, IntensityMethod};
use sgp_data::Modality;
use sgp_sam2::propagation::{Direction, SlicePrompt, VolumePropagator, VolumeSlices};

use crate::predict2d::{parse_box, parse_points};

#[derive(clap::Args)]
pub struct Args {
    /// Input volume (.nii or .nii.gz).
    #[arg(long)]
    volume: PathBuf,
    /// The prompted slice index along --axis.
    #[arg(long)]
    slice: usize,
    /// Box prompt on the prompted slice, in voxels: x0,y0,x1,y1 (see the module docs).
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

fn intensity_method(args: &Args) -> anyhow::Result<IntensityMethod> {
    if let Some(w) = &args.window {
        let v: Vec<f32> = w
            .split(',')
            .map(|t| {
                t.trim()
                    .parse::<f32>()
                    .with_context(|| format!("--window {w:?}: {t:?} is not a number"))
            })
            .collect::<anyhow::Result<_>>()?;
        if v.len() != 2 || v[1].is_nan() || v[1] <= 0.0 {
            bail!("--window needs level,width with width > 0, got {w:?}");
        }
        return Ok(IntensityMethod::Window {
            level: v[0],
            width: v[1],
        });
    }
    Ok(IntensityMethod::default_for(&Modality::parse(&args.modality)))
}

/// The prompt of the prompted slice from exactly one of --box, --mask, --points.
fn slice_prompt(args: &Args, volume_shape: &[usize], slices: &VolumeSlices) -> anyhow::Result<SlicePrompt> {
    let given = [args.box_.is_some(), args.mask.is_some(), args.points.is_some()]
        .iter()
        .filter(|&&b| b)
        .count();
    if given != 1 {
        bail!("give exactly one prompt: --box, --mask or --points");
    }
    let (h, w) = slices.slice_hw();
    if let Some(b) = &args.box_ {
        let b = parse_box(b)?;
        if b[0] < 0.0 || b[1] < 0.0 || b[2] > w as f32 || b[3] > h as f32 {
            bail!("--box {b:?} lies outside the {w}×{h} slice");
        }
        return Ok(SlicePrompt::Box(b));
    }
    if let Some(p) = &args.points {
        let (pts, labels) = parse_points(p)?;
        if let Some(bad) = pts
            .iter()
            .find(|q| q[0] < 0.0 || q[1] < 0.0 || q[0] >= w as f32 || q[1] >= h as f32)
        {
            bail!("point {bad:?} lies outside the {w}×{h} slice");
        }
        return Ok(SlicePrompt::Points(pts, labels));
    }
    let path = args.mask.as_ref().context("no prompt")?;
    let m = sgp_data::read_labels(path).with_context(|| format!("reading --mask {}", path.display()))?;
    if m.shape() != volume_shape {
        bail!(
            "--mask {} has shape {:?}, the volume {:?}",
            path.display(),
            m.shape(),
            volume_shape
        );
    }
    let flat: Vec<u16> = m.data.iter().copied().collect();
    let mut mask = vec![0f32; h * w];
    for r in 0..h {
        for c in 0..w {
            mask[r * w + c] = f32::from(flat[slices.voxel_index(args.slice, r, c)] > 0);
        }
    }
    if !mask.iter().any(|&v| v > 0.0) {
        bail!("--mask {} is empty on slice {}", path.display(), args.slice);
    }
    Ok(SlicePrompt::Mask(Tensor::from_vec(mask, (h, w), &Device::Cpu)?))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let direction: Direction = args.direction.parse()?;
    let img = sgp_data::read_image(&args.volume).with_context(|| format!("reading {}", args.volume.display()))?;
    let shape: [usize; 3] = match img.shape() {
        [a, b, c] => [*a, *b, *c],
        [a, b, c, 1] => [*a, *b, *c],
        s => bail!("{} is not a 3D volume (shape {s:?})", args.volume.display()),
    };
    if args.axis > 2 {
        bail!("--axis must be 0, 1 or 2");
    }
    if args.slice >= shape[args.axis] {
        bail!(
            "--slice {} out of range: axis {} has {} slices",
            args.slice,
            args.axis,
            shape[args.axis]
        );
    }
    let norm = normalize_intensity(&img.data, intensity_method(&args)?, None)?;
    let slices = VolumeSlices::new(norm.iter().copied().collect(), shape, args.axis)?;
    let prompt = slice_prompt(&args, img.shape(), &slices)?;

    let loaded = args.model.load()?;
    if !loaded.has_memory_path {
        bail!(
            "`{}` is an image-only checkpoint (transformers Sam2Model); propagation needs the \
             memory path: use the official .pt or a Sam2VideoModel checkpoint",
            args.model.weights
        );
    }
    let model = loaded.model;

    let n = shape[args.axis];
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} slices ({elapsed}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("propagating");
    let mut prop = VolumePropagator::new(&model);
    let labels = prop.segment_volume(&slices, &[(args.slice, prompt)], direction, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();

    let arr = ndarray_labels(&labels, img.shape())?;
    write_labels(&args.out, &arr, &img)?;
    let fg = labels.iter().filter(|&&v| v > 0).count();
    eprintln!(
        "wrote {} ({} foreground voxels, {} slices, {:.1}s, peak memory bank {} frames)",
        args.out.display(),
        fg,
        n,
        t0.elapsed().as_secs_f64(),
        prop.peak_bank_len
    );
    Ok(())
}

fn ndarray_labels(labels: &[u8], shape: &[usize]) -> anyhow::Result<ndarray::ArrayD<u16>> {
    Ok(ndarray::ArrayD::from_shape_vec(
        ndarray::IxDyn(shape),
        labels.iter().map(|&v| u16::from(v)).collect(),
    )?)
}

fn write_labels(out: &Path, arr: &ndarray::ArrayD<u16>, reference: &sgp_data::Volume<f32>) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // sgp-data writes atomically (temp file in the same folder, then rename).
    sgp_data::write_labels_like(out, arr, reference).with_context(|| format!("writing {}", out.display()))
}
