//! Max pooling on channels-last maps for inference, reading the input where it lies.
//!
//! Hiera pools its queries (`nn.MaxPool2d(k = stride = s)`) on a `[B, H, W, C]` view of
//! the qkv output; candle's pool wants NCHW, which costs two full transposes around it.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::attention::view;
use crate::{Error, Result};

/// `nn.MaxPool2d(kernel = stride = s, ceil_mode = False)` on a `[B, H, W, C]` f32 CPU view
/// (any strides, unit stride on C). Returns `[B, H / s0, W / s1, C]`, contiguous.
pub fn max_pool_nhwc(x: &Tensor, s: [usize; 2]) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Err(Error::Unsupported("max_pool_nhwc: CPU f32 tensors only".into()));
    }
    if s[0] == 0 || s[1] == 0 {
        return Err(Error::Shape(format!("max_pool_nhwc: stride {s:?}")));
    }
    let (st, l) = x.storage_and_layout();
    let Storage::Cpu(st) = &*st else {
        return Err(Error::Unsupported("max_pool_nhwc: CPU tensors only".into()));
    };
    let xv = view("x", st, l)?;
    let [b, h, w, c] = xv.dims;
    let (ho, wo) = (h / s[0], w / s[1]);
    let mut out = vec![0f32; b * ho * wo * c];
    if !out.is_empty() {
        out.par_chunks_mut(wo * c).enumerate().for_each(|(row, orow)| {
            let (bi, oy) = (row / ho, row % ho);
            for ox in 0..wo {
                let o = &mut orow[ox * c..(ox + 1) * c];
                o.fill(f32::NEG_INFINITY);
                for dy in 0..s[0] {
                    for dx in 0..s[1] {
                        let at = xv.offset
                            + bi * xv.strides[0]
                            + (oy * s[0] + dy) * xv.strides[1]
                            + (ox * s[1] + dx) * xv.strides[2];
                        for (o, &v) in o.iter_mut().zip(&xv.data[at..at + c]) {
                            // PyTorch's max pooling propagates NaN.
                            *o = if v > *o || v.is_nan() { v } else { *o };
                        }
                    }
                }
            }
        });
    }
    Tensor::from_vec(out, (b, ho, wo, c), x.device()).map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_pool_on_strided_views() -> Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::randn(0f32, 1.0, (2, 9, 7, 3, 5), &dev)?; // odd sizes: floor mode
        let x = base.narrow(3, 1, 1)?.squeeze(3)?; // [2, 9, 7, 5], strided
        let got = max_pool_nhwc(&x, [2, 2])?;
        let want = x
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .max_pool2d_with_stride((2, 2), (2, 2))?
            .permute((0, 2, 3, 1))?;
        assert_eq!(got.dims(), [2, 4, 3, 5]);
        assert_eq!(crate::testing::max_abs_diff(&got, &want)?, 0.0);
        assert!(max_pool_nhwc(&x, [0, 2]).is_err());
        Ok(())
    }
}
