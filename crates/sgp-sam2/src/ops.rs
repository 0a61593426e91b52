//! Small ops shared by all SAM2 modules.
//!
//! candle's fast `softmax_last_dim` and `layer_norm` have no backward pass (see
//! `shared/docs/candle-notes.md`). Training (LoRA, PMA) needs gradients through the frozen
//! network, so these helpers pick the differentiable composition whenever the input is
//! tracked by autograd, and the fast kernel otherwise. Both compute the same function.

use candle_core::{DType, Module, Result, Tensor, D};

/// Softmax over the last dimension; differentiable when `x` is tracked.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Layer norm over the last dimension with affine weight and bias.
pub fn layer_norm_last_dim(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    // The fast kernel has no f64 CPU version; the composition handles every dtype.
    if x.track_op() || weight.track_op() || bias.track_op() || x.dtype() == DType::F64 {
        candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32)
    } else {
        candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32)
    }
}

/// `nn.LayerNorm` over the last dimension, loaded from `{prefix}.weight` / `{prefix}.bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_last_dim(x, &self.weight, &self.bias, self.eps)
    }
}

/// SAM's `LayerNorm2d`: normalises over channels of an NCHW tensor.
#[derive(Debug, Clone)]
pub struct LayerNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm2d {
    pub fn new(channels: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // NCHW -> NHWC, normalise the last dim, back. Same function as the official
        // mean/var formulation (biased variance, eps inside the sqrt).
        let y = x.permute((0, 2, 3, 1))?;
        let y = layer_norm_last_dim(&y, &self.weight, &self.bias, self.eps)?;
        y.permute((0, 3, 1, 2))?.contiguous()
    }
}

/// Exact (erf) GELU, PyTorch's `nn.GELU()` default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Inputs must be f32 for parity; other dtypes are converted by callers.
pub fn ensure_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}
