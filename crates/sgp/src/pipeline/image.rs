//! Prompted segmentation of one 2D image, as `SAM2ImagePredictor` does it: the image is
//! resized to S×S and normalised ([`Sam2Model::encode_image`]), the prompts are mapped to
//! the model frame, and the logits come back at the input size; the mask with the highest
//! predicted IoU is kept.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sgp_sam2::{PromptInput, Sam2Model};

use crate::{Error, Result};

/// Prompts in input-image pixels: a box, points, or both.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImagePrompt {
    /// `[x0, y0, x1, y1]`.
    pub boxes: Option<[f32; 4]>,
    /// `(x, y)` points and their labels (1 foreground, 0 background).
    pub points: Option<(Vec<[f32; 2]>, Vec<i32>)>,
}

impl ImagePrompt {
    /// Checks the prompt against an image of `(h, w)` pixels: an empty prompt is an error;
    /// a box or point outside the image is allowed (SAM2 accepts it) but returned as a
    /// warning for the user.
    pub fn check(&self, (h, w): (usize, usize)) -> Result<Vec<String>> {
        if self.boxes.is_none() && self.points.is_none() {
            return Err(Error::Input(
                "give a prompt: --box x0,y0,x1,y1 and/or --points \"x,y,label;...\"".into(),
            ));
        }
        let inside = |x: f32, y: f32| x >= 0.0 && y >= 0.0 && x <= w as f32 && y <= h as f32;
        let mut warnings = Vec::new();
        if let Some(b) = self.boxes {
            if !inside(b[0], b[1]) || !inside(b[2], b[3]) {
                warnings.push(format!("box {b:?} reaches outside the {w}x{h} image"));
            }
        }
        if let Some((pts, labels)) = &self.points {
            if pts.len() != labels.len() {
                return Err(Error::Input(format!(
                    "{} points but {} labels",
                    pts.len(),
                    labels.len()
                )));
            }
            for p in pts.iter().filter(|p| !inside(p[0], p[1])) {
                warnings.push(format!("point {p:?} lies outside the {w}x{h} image"));
            }
        }
        Ok(warnings)
    }
}

/// The outcome of [`segment_image`].
#[derive(Debug, Clone)]
pub struct ImageSegmentation {
    /// `[H, W]` u8 0/1 mask at the input size (the kept candidate).
    pub mask: Tensor,
    /// Predicted IoU of every candidate (3 with multimask output, else 1).
    pub iou_scores: Vec<f32>,
    /// Index of the kept candidate: the highest predicted IoU (the first on ties).
    pub best: usize,
    /// Object score logit; > 0 means SAM2 thinks the object is present.
    pub object_score_logit: f32,
}

impl ImageSegmentation {
    /// Number of foreground pixels of [`Self::mask`].
    pub fn foreground_pixels(&self) -> Result<usize> {
        let n: f32 = self.mask.to_dtype(DType::F32)?.sum_all()?.to_scalar()?;
        Ok(n as usize)
    }
}

/// Reads an image file (PNG, JPEG, BMP, TIFF; grey images become RGB) as `[3, H, W]` f32
/// in [0, 1], torchvision's `ToTensor`.
pub fn read_rgb(path: &Path) -> Result<Tensor> {
    let rgb = sgp_data::read_rgb(path)?;
    rgb_to_tensor(&rgb)
}

/// `(row, col, 3)` values 0..255 (what [`sgp_data::read_rgb`] returns) to `[3, H, W]` in
/// [0, 1].
pub fn rgb_to_tensor(rgb: &sgp_data::Volume<f32>) -> Result<Tensor> {
    let (h, w) = match rgb.shape() {
        &[h, w, 3] if h > 0 && w > 0 => (h, w),
        s => return Err(Error::Input(format!("an RGB image must be (rows, cols, 3), got {s:?}"))),
    };
    let values: Vec<f32> = rgb.data.iter().copied().collect();
    let t = Tensor::from_vec(values, (h, w, 3), &Device::Cpu)?;
    Ok((t.permute((2, 0, 1))?.contiguous()? / 255.0)?)
}

/// Encodes `image` (`[3, H, W]` in [0, 1]) and decodes `prompt`; keeps the candidate with
/// the highest predicted IoU. `multimask` asks for SAM2's three candidates.
pub fn segment_image(
    model: &Sam2Model,
    image: &Tensor,
    prompt: &ImagePrompt,
    multimask: bool,
) -> Result<ImageSegmentation> {
    let _span = tracing::info_span!("segment_image", multimask).entered();
    let (_, h, w) = image
        .dims3()
        .map_err(|_| Error::Input(format!("image must be [3,H,W], got {:?}", image.dims())))?;
    prompt.check((h, w))?;
    let emb = model.encode_image(image)?;
    let input = PromptInput {
        points: prompt.points.clone(),
        boxes: prompt.boxes,
        mask_input: None,
    };
    let pred = model.predict(&emb, &input, model.multimask(multimask))?;
    let iou_scores: Vec<f32> = pred.iou_scores.to_dtype(DType::F32)?.to_vec1()?;
    let best = iou_scores
        .iter()
        .enumerate()
        .fold(0, |b, (i, v)| if *v > iou_scores[b] { i } else { b });
    let mask = pred.masks.get(best)?.to_device(&Device::Cpu)?;
    let object_score_logit: f32 = pred
        .object_score_logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .get(0)?
        .to_scalar()?;
    Ok(ImageSegmentation {
        mask,
        iou_scores,
        best,
        object_score_logit,
    })
}

/// Writes a `[H, W]` 0/1 mask as a 0/255 8-bit grey PNG, atomically
/// ([`sgp_data::write_atomic`]: a reader never sees half a file).
pub fn write_mask_png(mask: &Tensor, out: &Path) -> Result<()> {
    let (h, w) = mask
        .dims2()
        .map_err(|_| Error::Input(format!("a mask must be [H,W], got {:?}", mask.dims())))?;
    let data: Vec<u8> = mask
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?
        .into_iter()
        .map(|v| if v > 0 { 255 } else { 0 })
        .collect();
    let img = image::GrayImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::Input(format!("mask buffer does not hold {w}x{h} pixels")))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Input(format!("cannot encode the mask as PNG: {e}")))?;
    sgp_data::write_atomic(out, &png)?;
    Ok(())
}
