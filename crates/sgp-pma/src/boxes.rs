//! The box prompt from a pseudo-mask (design step 5, parity kind `sgp_init`).

use candle_core::{DType, Tensor};

use crate::{PmaError, Result};

/// The bounding box `[x_min, y_min, x_max, y_max]` of `high_res_logits > 0` for every batch
/// item of `[B, 1, S, S]` logits: inclusive pixel indices in the S×S frame, as floats (the
/// official `sgp_init` reference feeds exactly these to the prompt encoder as corners 2/3).
/// `None` where no pixel is foreground: that query holds no object and its pseudo-mask is
/// the output.
///
/// The box is a discrete function of the logits and carries no gradient; the tensors it is
/// computed from are left untouched.
pub fn box_from_pseudo_mask(high_res_logits: &Tensor) -> Result<Vec<Option<[f32; 4]>>> {
    let (b, c, h, w) = high_res_logits.dims4().map_err(|_| {
        PmaError::Input(format!(
            "pseudo-mask logits must be [B,1,S,S], got {:?}",
            high_res_logits.dims()
        ))
    })?;
    if c != 1 || h == 0 || w == 0 {
        return Err(PmaError::Input(format!(
            "pseudo-mask logits must be [B,1,S,S], got {:?}",
            high_res_logits.dims()
        )));
    }
    if !high_res_logits.dtype().is_float() {
        return Err(PmaError::Input(format!(
            "pseudo-mask logits must be a float tensor, got {:?}",
            high_res_logits.dtype()
        )));
    }
    // One byte per pixel on the host: the only data that leaves the device.
    let fg = high_res_logits
        .detach()
        .gt(0.0)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let plane = h * w;
    let mut boxes = Vec::with_capacity(b);
    for item in fg.chunks_exact(plane) {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0usize, 0usize);
        for (y, row) in item.chunks_exact(w).enumerate() {
            let Some(first) = row.iter().position(|&v| v != 0) else {
                continue;
            };
            // `first` exists, so `rposition` finds at least that pixel.
            let last = row.iter().rposition(|&v| v != 0).unwrap_or(first);
            x0 = x0.min(first);
            x1 = x1.max(last);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        boxes.push((x0 != usize::MAX).then_some([x0 as f32, y0 as f32, x1 as f32, y1 as f32]));
    }
    Ok(boxes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn boxes_are_inclusive_and_batched() -> Result<()> {
        let (s, dev) = (8usize, Device::Cpu);
        let mut v = vec![-1f32; 3 * s * s];
        // Item 0: pixels (x=2,y=1) and (x=5,y=6).
        v[s + 2] = 0.5;
        v[6 * s + 5] = 3.0;
        // Item 1: nothing > 0 (a zero logit is background, like the reference's `> 0`).
        v[s * s + 3] = 0.0;
        // Item 2: one pixel at the corner (7,7).
        v[2 * s * s + s * s - 1] = 1.0;
        let t = Tensor::from_vec(v, (3, 1, s, s), &dev)?;
        let b = box_from_pseudo_mask(&t)?;
        assert_eq!(b, vec![Some([2.0, 1.0, 5.0, 6.0]), None, Some([7.0, 7.0, 7.0, 7.0])]);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let t = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        assert!(box_from_pseudo_mask(&t).is_err());
        let t = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap();
        assert!(box_from_pseudo_mask(&t).is_err());
        let t = Tensor::zeros((1, 1, 4, 4), DType::U8, &dev).unwrap();
        assert!(box_from_pseudo_mask(&t).is_err());
    }
}
