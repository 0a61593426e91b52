//! `cargo xtask predict-2d`: prompted segmentation of one 2D image with SAM2, as
//! `SAM2ImagePredictor` does it (resize to S×S, ImageNet normalisation, prompts mapped to
//! the model frame, logits upsampled back to the input size), with the settings users of
//! the official package get (`build_sam2(..., apply_postprocessing=True)`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use sgp_sam2::model::PromptInput;

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

/// Parses "x0,y0,x1,y1".
pub fn parse_box(s: &str) -> anyhow::Result<[f32; 4]> {
    let v = parse_floats(s, "--box")?;
    if v.len() != 4 {
        bail!("--box needs 4 numbers x0,y0,x1,y1, got {} in {s:?}", v.len());
    }
    if v[2] <= v[0] || v[3] <= v[1] {
        bail!("--box {s:?}: need x0 < x1 and y0 < y1");
    }
    Ok([v[0], v[1], v[2], v[3]])
}

/// Parses "x,y,label;x,y,label;...".
pub fn parse_points(s: &str) -> anyhow::Result<(Vec<[f32; 2]>, Vec<i32>)> {
    let mut pts = Vec::new();
    let mut labels = Vec::new();
    for (i, item) in s.split(';').map(str::trim).filter(|t| !t.is_empty()).enumerate() {
        let v = parse_floats(item, "--points")?;
        if v.len() != 3 {
            bail!("--points item {} ({item:?}) must be x,y,label", i + 1);
        }
        let label = v[2];
        if label != 0.0 && label != 1.0 {
            bail!(
                "--points item {} ({item:?}): label must be 1 (foreground) or 0 (background)",
                i + 1
            );
        }
        pts.push([v[0], v[1]]);
        labels.push(label as i32);
    }
    if pts.is_empty() {
        bail!("--points {s:?} holds no point");
    }
    Ok((pts, labels))
}

fn parse_floats(s: &str, flag: &str) -> anyhow::Result<Vec<f32>> {
    s.split(',')
        .map(|t| {
            let t = t.trim();
            let v: f32 = t.parse().with_context(|| format!("{flag}: {t:?} is not a number"))?;
            if !v.is_finite() {
                bail!("{flag}: {t:?} is not a finite number");
            }
            Ok(v)
        })
        .collect()
}

/// Loads an image as RGB `[3, H, W]` f32 in [0, 1] (torchvision `ToTensor`).
pub fn load_rgb(path: &Path) -> anyhow::Result<Tensor> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| {
            format!(
                "cannot decode image {} (PNG, JPEG, BMP or TIFF expected)",
                path.display()
            )
        })?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        bail!("image {} is empty", path.display());
    }
    let t = Tensor::from_vec(rgb.into_raw(), (h as usize, w as usize, 3), &Device::Cpu)?;
    Ok((t.permute((2, 0, 1))?.to_dtype(DType::F32)? / 255.0)?)
}

/// Writes a `[H, W]` u8 0/1 mask as a 0/255 grayscale PNG via a temp file + rename.
pub fn write_mask_png(mask: &Tensor, out: &Path) -> anyhow::Result<()> {
    let (h, w) = mask.dims2()?;
    let data: Vec<u8> = mask
        .flatten_all()?
        .to_vec1::<u8>()?
        .into_iter()
        .map(|v| if v > 0 { 255 } else { 0 })
        .collect();
    let img = image::GrayImage::from_raw(w as u32, h as u32, data).context("mask buffer size")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("cannot encode the mask as PNG")?;
    sgp_data::write_atomic(out, &png).with_context(|| format!("cannot write {}", out.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Check everything cheap before loading the model.
    let boxes = args.box_.as_deref().map(parse_box).transpose()?;
    let points = args.points.as_deref().map(parse_points).transpose()?;
    if boxes.is_none() && points.is_none() {
        bail!("give a prompt: --box x0,y0,x1,y1 and/or --points \"x,y,label;...\"");
    }
    match args.out.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => {}
        _ => bail!("--out must be a .png file, got {}", args.out.display()),
    }
    let image = load_rgb(&args.image)?;
    let (_, h, w) = image.dims3()?;
    let in_image = |x: f32, y: f32| x >= 0.0 && y >= 0.0 && x <= w as f32 && y <= h as f32;
    if let Some(b) = boxes {
        if !in_image(b[0], b[1]) || !in_image(b[2], b[3]) {
            eprintln!("warning: box {b:?} reaches outside the {w}x{h} image");
        }
    }
    if let Some((pts, _)) = &points {
        for p in pts.iter().filter(|p| !in_image(p[0], p[1])) {
            eprintln!("warning: point {p:?} lies outside the {w}x{h} image");
        }
    }

    let t0 = Instant::now();
    // Real-use settings (`build_sam2` post-processing) are on for user commands.
    let loaded = args.model.load()?;
    let (model, cfg) = (loaded.model, loaded.config);
    let t_load = t0.elapsed();
    let t1 = Instant::now();
    let emb = model.encode_image(&image)?;
    let t_enc = t1.elapsed();
    let t2 = Instant::now();
    let prompt = PromptInput {
        points,
        boxes,
        mask_input: None,
    };
    let pred = model.predict(&emb, &prompt, args.multimask)?;
    let t_dec = t2.elapsed();

    let ious: Vec<f32> = pred.iou_scores.to_vec1()?;
    let best = ious
        .iter()
        .enumerate()
        .fold(0, |b, (i, v)| if *v > ious[b] { i } else { b });
    let mask = pred.masks.get(best)?;
    write_mask_png(&mask, &args.out)?;
    let fg: f32 = mask.to_dtype(DType::F32)?.sum_all()?.to_scalar()?;
    let obj: f32 = pred.object_score_logits.flatten_all()?.get(0)?.to_scalar()?;
    println!(
        "wrote {} ({w}x{h}, {} foreground pixels)",
        args.out.display(),
        fg as u64
    );
    if args.multimask {
        println!("predicted IoUs {ious:.4?}; kept mask {best}");
    }
    println!(
        "predicted IoU {:.4}; object score logit {obj:.4} (object {})",
        ious[best],
        if obj > 0.0 { "present" } else { "absent" }
    );
    eprintln!(
        "timing: load {:.2}s, encode {:.2}s, decode {:.3}s (S = {})",
        t_load.as_secs_f64(),
        t_enc.as_secs_f64(),
        t_dec.as_secs_f64(),
        cfg.image_size
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_boxes_and_points() {
        assert_eq!(parse_box("1, 2.5,30,40").unwrap(), [1.0, 2.5, 30.0, 40.0]);
        assert!(parse_box("1,2,3").is_err());
        assert!(parse_box("10,2,3,40").is_err(), "x0 > x1");
        assert!(parse_box("1,2,a,4").is_err());
        assert!(parse_box("1,2,inf,4").is_err());
        let (p, l) = parse_points("10,20,1; 30,40,0;").unwrap();
        assert_eq!(p, vec![[10.0, 20.0], [30.0, 40.0]]);
        assert_eq!(l, vec![1, 0]);
        assert!(parse_points("10,20,2").is_err(), "labels are 0/1");
        assert!(parse_points("10,20").is_err());
        assert!(parse_points(" ; ").is_err());
    }

    #[test]
    fn writes_a_0_255_png_of_the_mask_size_atomically() {
        let dir = std::env::temp_dir().join(format!("predict2d-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("mask.png");
        let mask = Tensor::new(&[[0u8, 1, 1], [1, 0, 0]], &Device::Cpu).unwrap();
        write_mask_png(&mask, &out).unwrap();
        let img = image::open(&out).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(img.into_raw(), vec![0, 255, 255, 255, 0, 0]);
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(write_mask_png(&mask, &dir.join("missing/mask.png")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
