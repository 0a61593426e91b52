//! `cargo xtask predict-2d`: prompted segmentation of one 2D image with SAM2
//! (`sgp::pipeline::image`: `SAM2ImagePredictor`'s transform and prompt mapping, with the
//! settings users of the official package get).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use sgp::pipeline::{self, ImagePrompt};

#[derive(clap::Args)]
pub struct Args {
    /// Input image (PNG, JPEG, BMP or TIFF); converted to RGB.
    #[arg(long)]
    image: PathBuf,
    /// Box prompt in input-image pixels: x0,y0,x1,y1.
    #[arg(long = "box", value_name = "x0,y0,x1,y1")]
    box_: Option<String>,
    /// Point prompts in input-image pixels: "x,y,label;x,y,label" (label 1 = foreground,
    /// 0 = background).
    #[arg(long)]
    points: Option<String>,
    /// Predict 3 candidate masks and keep the one with the highest predicted IoU.
    #[arg(long)]
    multimask: bool,
    #[command(flatten)]
    model: crate::model_source::ModelArgs,
    /// Output mask PNG (0/255, input-image size).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything cheap is checked before the model loads.
    let prompt = ImagePrompt {
        boxes: args.box_.as_deref().map(pipeline::parse_box).transpose()?,
        points: args.points.as_deref().map(pipeline::parse_points).transpose()?,
    };
    match args.out.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => {}
        _ => bail!("--out must be a .png file, got {}", args.out.display()),
    }
    let image = pipeline::read_rgb(&args.image)?;
    let (_, h, w) = image.dims3()?;
    for warning in prompt.check((h, w))? {
        eprintln!("warning: {warning}");
    }

    let t0 = Instant::now();
    let loaded = args.model.load()?;
    let t_load = t0.elapsed();
    let t1 = Instant::now();
    let seg = pipeline::segment_image(&loaded.model, &image, &prompt, args.multimask)?;
    let t_run = t1.elapsed();
    pipeline::write_mask_png(&seg.mask, &args.out)?;

    println!(
        "wrote {} ({w}x{h}, {} foreground pixels)",
        args.out.display(),
        seg.foreground_pixels()?
    );
    if args.multimask {
        println!("predicted IoUs {:.4?}; kept mask {}", seg.iou_scores, seg.best);
    }
    let obj = seg.object_score_logit;
    println!(
        "predicted IoU {:.4}; object score logit {obj:.4} (object {})",
        seg.iou_scores.get(seg.best).copied().unwrap_or(f32::NAN),
        if obj > 0.0 { "present" } else { "absent" }
    );
    eprintln!(
        "timing: load {:.2}s, encode + decode {:.2}s (S = {})",
        t_load.as_secs_f64(),
        t_run.as_secs_f64(),
        loaded.config.image_size
    );
    Ok(())
}
