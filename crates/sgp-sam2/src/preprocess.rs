//! `SAM2Transforms`: the one way an image reaches the model and a mask comes back.
//!
//! Images are RGB `[3, H, W]` in [0, 1], any size. They are resized to S×S with
//! antialiased bilinear (torchvision `Resize` on a tensor) and normalised with the ImageNet
//! statistics. Prompt coordinates are scaled `x / W · S` (`transform_coords` with
//! `normalize_coords=True`), mask prompts are resized the same way and binarised at 0.5
//! (the video predictor's `add_new_mask`), and mask logits go back to `H × W` with plain
//! bilinear, `align_corners=False` (`postprocess_masks`).
//!
//! [`Sam2Model::encode_image`](crate::Sam2Model::encode_image), the image predictor,
//! volume propagation and the pipelines all use this type, so that no copy can drift.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// ImageNet mean used by `SAM2Transforms`.
pub const IMAGE_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation used by `SAM2Transforms`.
pub const IMAGE_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The model-side image transform for a model of input size S.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preprocess {
    image_size: usize,
}

impl Preprocess {
    /// The transform for model input size `image_size` (S).
    pub fn new(image_size: usize) -> Result<Self> {
        if image_size == 0 {
            return Err(Error::Config("image_size must be positive".into()));
        }
        Ok(Self { image_size })
    }

    /// S.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// An RGB image `[3, H, W]` in [0, 1] → the model input `[1, 3, S, S]` on `device`.
    pub fn image(&self, image: &Tensor, device: &Device) -> Result<Tensor> {
        let (c, h, w) = image
            .dims3()
            .map_err(|_| Error::Input(format!("image must be [3,H,W], got {:?}", image.dims())))?;
        if c != 3 || h == 0 || w == 0 {
            return Err(Error::Input(format!(
                "image must be [3,H,W] RGB, got {:?}",
                image.dims()
            )));
        }
        let x = image
            .to_device(device)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?
            .contiguous()?;
        self.normalize(&self.resize(&x)?)
    }

    /// ImageNet normalisation of `[B, 3, S, S]` images in [0, 1] (already at the model size;
    /// differentiable, for training batches).
    pub fn normalize(&self, images: &Tensor) -> Result<Tensor> {
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != 3 {
            return Err(Error::Input(format!("images must be [B,3,H,W], got {dims:?}")));
        }
        let dev = images.device();
        let mean = Tensor::new(&IMAGE_MEAN, dev)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&IMAGE_STD, dev)?.reshape((1, 3, 1, 1))?;
        Ok(images.to_dtype(DType::F32)?.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }

    /// `[B, C, H, W]` → `[B, C, S, S]`, antialiased bilinear (unchanged when already S×S).
    fn resize(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.image_size;
        let (_, _, h, w) = x.dims4()?;
        if (h, w) == (s, s) {
            return Ok(x.clone());
        }
        sgp_kernels::resize::bilinear_antialias(x, s, s).map_err(kernel_err)
    }

    /// A point `(x, y)` in pixels of an `orig_hw = (H, W)` image → the S×S model frame.
    pub fn point(&self, p: [f32; 2], orig_hw: (usize, usize)) -> [f32; 2] {
        let s = self.image_size as f32;
        let (h, w) = orig_hw;
        [p[0] / w as f32 * s, p[1] / h as f32 * s]
    }

    /// A mask prompt `[H, W]` (object where ≥ 0.5) → `[1, 1, S, S]` 0/1 on `device`.
    pub fn mask(&self, mask: &Tensor, device: &Device) -> Result<Tensor> {
        let (h, w) = mask
            .dims2()
            .map_err(|_| Error::Input(format!("a mask prompt must be [H,W], got {:?}", mask.dims())))?;
        if h == 0 || w == 0 {
            return Err(Error::Input("a mask prompt must not be empty".into()));
        }
        let m = mask.to_device(device)?.to_dtype(DType::F32)?.reshape((1, 1, h, w))?;
        Ok(self.resize(&m)?.ge(0.5f32)?.to_dtype(DType::F32)?)
    }

    /// Mask logits at model resolution (`[h, w]`, `[N, h, w]` or `[B, N, h, w]`) → the
    /// same rank at `orig_hw`, bilinear with `align_corners=False` ([`logits_to_size`]).
    pub fn logits_to_original(&self, logits: &Tensor, orig_hw: (usize, usize)) -> Result<Tensor> {
        logits_to_size(logits, orig_hw)
    }
}

/// Mask logits (`[h, w]`, `[N, h, w]` or `[B, N, h, w]`) → the same rank at `(H, W)`,
/// bilinear with `align_corners=False` (`postprocess_masks`); unchanged at the same size.
pub fn logits_to_size(logits: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let rank = logits.rank();
    let x = match rank {
        2 => logits.unsqueeze(0)?.unsqueeze(0)?,
        3 => logits.unsqueeze(0)?,
        4 => logits.clone(),
        r => {
            return Err(Error::Input(format!(
                "logits must be [h,w], [N,h,w] or [B,N,h,w], got rank {r}"
            )))
        }
    };
    let (_, _, lh, lw) = x.dims4()?;
    let y = if (lh, lw) == (h, w) {
        x
    } else {
        sgp_kernels::resize::bilinear(&x.to_dtype(DType::F32)?, h, w, false).map_err(kernel_err)?
    };
    Ok(match rank {
        2 => y.squeeze(0)?.squeeze(0)?,
        3 => y.squeeze(0)?,
        _ => y,
    })
}

pub(crate) fn kernel_err(e: sgp_kernels::Error) -> Error {
    match e {
        sgp_kernels::Error::Candle(c) => Error::Candle(c),
        other => Error::Input(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_scale_like_transform_coords() {
        let p = Preprocess::new(64).unwrap();
        assert_eq!(p.point([30.0, 10.0], (20, 60)), [32.0, 32.0]);
        assert!(Preprocess::new(0).is_err());
    }

    #[test]
    fn logits_keep_their_rank_and_masks_are_binary() {
        let dev = Device::Cpu;
        let p = Preprocess::new(8).unwrap();
        let l = Tensor::randn(0f32, 1f32, (2, 8, 8), &dev).unwrap();
        assert_eq!(p.logits_to_original(&l, (5, 7)).unwrap().dims(), [2, 5, 7]);
        assert_eq!(p.logits_to_original(&l.get(0).unwrap(), (5, 7)).unwrap().dims(), [5, 7]);
        let m = Tensor::new(&[[0f32, 1.0], [1.0, 0.0]], &dev).unwrap();
        let up: Vec<f32> = p.mask(&m, &dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(up.iter().all(|&v| v == 0.0 || v == 1.0));
        assert!(p
            .image(&Tensor::zeros((1, 4, 4), DType::F32, &dev).unwrap(), &dev)
            .is_err());
    }
}
