//! Small ops shared by all SAM2 modules, and by the layers built on them downstream
//! (sgp-pma uses [`layer_norm_last_dim`]).
//!
//! The candle trap these exist for: in candle 0.11, the fast `candle_nn::ops::softmax_last_dim`
//! and `candle_nn::ops::layer_norm` (and so `candle_nn::LayerNorm::forward` on a contiguous
//! input with a bias) are applied with `apply_op*_no_bwd`. They record no backward, so a
//! gradient through them is not an error: it is silently zero or absent, and training
//! quietly stops updating whatever lies behind them. The compositions
//! `candle_nn::ops::softmax(x, D::Minus1)` and `candle_nn::ops::layer_norm_slow` are
//! differentiable. Training (LoRA, PMA) needs gradients through the frozen network, so
//! these helpers pick the differentiable composition whenever the input is tracked by
//! autograd, and the fast kernel otherwise. Both compute the same function (up to float
//! rounding, about 1e-7). Any new op on a training path needs a test that the gradient
//! reaches the parameters and matches finite differences.

use candle_core::{DType, Module, Result, Tensor, D};

/// Whether the kernels' inference fast paths apply: every tensor on the CPU, f32, and
/// untracked by autograd (tracked ones keep candle's differentiable ops).
pub(crate) fn untracked_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

/// Whether every tensor is f32 on the CPU (the kernels with their own backward).
pub(crate) fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// An `sgp-kernels` error as a candle error, naming the op.
pub(crate) fn kernel_err(what: &'static str) -> impl Fn(sgp_kernels::Error) -> candle_core::Error {
    move |e| candle_core::Error::Msg(format!("{what}: {e}"))
}

/// `x.contiguous()`; transposed and permuted f32 CPU views (NCHW maps to token
/// sequences and back) take the tiled copy of [`sgp_kernels::layout::contiguous`], which
/// keeps candle's op, and so the gradient, for tracked tensors.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    sgp_kernels::layout::contiguous(x).map_err(kernel_err("contiguous"))
}

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
    let tracked = x.track_op() || weight.track_op() || bias.track_op();
    if x.device().is_cpu() && [x, weight, bias].iter().all(|t| t.dtype() == DType::F32) {
        // One pass each way in training (candle's composition is ~20 ops). In inference
        // too: candle's fast kernel zeroes its output on the calling thread before its
        // parallel pass, and its one-pass variance is further from PyTorch's two passes.
        return sgp_kernels::norm::layer_norm(x, weight, bias, eps).map_err(kernel_err("layer norm"));
    }
    // The fast kernel has no f64 CPU version; the composition handles every dtype.
    if tracked || x.dtype() == DType::F64 {
        candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32)
    } else {
        candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32)
    }
}

/// `nn.LayerNorm` over the last dimension, loaded from `{prefix}.weight` / `{prefix}.bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale `[dim]`.
    pub weight: Tensor,
    /// Shift `[dim]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of width `dim` from `vb`.
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
    /// Scale `[C]`.
    pub weight: Tensor,
    /// Shift `[C]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm2d {
    /// Loads `weight` and `bias` of `channels` from `vb`.
    pub fn new(channels: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            eps,
        })
    }
}

impl LayerNorm2d {
    /// `gelu(norm(x))`, SAM2's pairing in the mask downsampler, the mask-prompt encoder and
    /// the decoder's upscaling; one pass over the data in inference.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        if untracked_cpu_f32(&[x, &self.weight, &self.bias]) && x.rank() == 4 {
            return sgp_kernels::conv::channel_layer_norm(x, &self.weight, &self.bias, self.eps, true)
                .map_err(kernel_err("layer norm 2d"));
        }
        gelu(&self.forward(x)?)
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if untracked_cpu_f32(&[x, &self.weight, &self.bias]) && x.rank() == 4 {
            return sgp_kernels::conv::channel_layer_norm(x, &self.weight, &self.bias, self.eps, false)
                .map_err(kernel_err("layer norm 2d"));
        }
        // NCHW -> NHWC, normalise the last dim, back. Same function as the official
        // mean/var formulation (biased variance, eps inside the sqrt).
        let y = x.permute((0, 2, 3, 1))?;
        let y = layer_norm_last_dim(&y, &self.weight, &self.bias, self.eps)?;
        y.permute((0, 3, 1, 2))?.contiguous()
    }
}

/// `nn.Conv2d` forward. Inference on f32 CPU tensors (groups 1, dilation 1, with a bias)
/// takes `sgp-kernels`' im2col + gemm, which writes NCHW directly (candle's CPU conv
/// computes NHWC and copies it back); anything else, training included, keeps candle's
/// differentiable conv.
pub fn conv2d(conv: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    let cfg = conv.config();
    match conv.bias() {
        Some(b) if cfg.groups == 1 && cfg.dilation == 1 && untracked_cpu_f32(&[x, conv.weight(), b]) => {
            sgp_kernels::conv::conv2d(x, conv.weight(), b, cfg.stride, cfg.padding).map_err(kernel_err("conv2d"))
        }
        _ => conv.forward(x),
    }
}

/// Exact (erf) GELU, PyTorch's `nn.GELU()` default: one vectorised pass on f32 CPU
/// tensors (candle's `gelu_erf` evaluates a scalar f64 erf per element), differentiable.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    sgp_kernels::activation::gelu_erf(x)
}

/// Inputs must be f32 for parity; other dtypes are converted by callers.
pub fn ensure_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}

/// Upper bound on attention-score elements held at once; larger problems are split over
/// query rows (same result, bounded memory for global attention at 1024 px).
const MAX_SCORE_ELEMS: usize = 1 << 26;

/// Key count from which inference uses the fused kernel (Hiera's global blocks, memory
/// attention over several frames).
const FUSED_MIN_KEYS: usize = 1024;

/// `softmax(q kᵀ/√d) v` over `[B, H, L, d]` tensors.
///
/// Long inference attentions go through the tiled online-softmax kernel of `sgp-kernels`
/// (no L×L score matrix is materialised); shorter ones through its strided dense kernel, without copies.
/// Tracked inputs on other devices and dtypes use the differentiable composition.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let lk = k.dim(2)?;
    let fast = untracked_cpu_f32(&[q, k, v]);
    if fast && lk >= FUSED_MIN_KEYS {
        return sgp_kernels::masked_attention::attention_inference(q, k, v).map_err(kernel_err("fused attention"));
    }
    if fast || cpu_f32(&[q, k, v]) {
        // Short key sets, and training on the CPU (fused backward, scores recomputed per
        // query block): the strided kernel reads [B, L, H, D] views of the same buffers.
        let blhd = |x: &Tensor| -> Result<Tensor> {
            let x = if x.stride()[3] == 1 { x.clone() } else { x.contiguous()? };
            x.transpose(1, 2)
        };
        let o =
            sgp_kernels::attention::attention_blhd(&blhd(q)?, &blhd(k)?, &blhd(v)?).map_err(kernel_err("attention"))?;
        return o.transpose(1, 2);
    }
    attention_chunked(q, k, v, MAX_SCORE_ELEMS)
}

/// The composition behind [`scaled_dot_product_attention`], holding at most about
/// `max_score_elems` scores at once (query rows in blocks; each row's result is the same).
pub fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, max_score_elems: usize) -> Result<Tensor> {
    let (b, nh, lq, hd) = q.dims4()?;
    let lk = k.dim(2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let kt = k.transpose(2, 3)?.contiguous()?;
    let v = v.contiguous()?;
    let per_row = b * nh * lk;
    let chunk = (max_score_elems / per_row.max(1)).max(1);
    let one = |q: &Tensor| -> Result<Tensor> {
        let s = (q.contiguous()?.matmul(&kt)? * scale)?;
        softmax_last_dim(&s)?.matmul(&v)
    };
    if chunk >= lq {
        return one(q);
    }
    let mut outs = Vec::with_capacity(lq.div_ceil(chunk));
    let mut start = 0;
    while start < lq {
        let len = chunk.min(lq - start);
        outs.push(one(&q.narrow(2, start, len)?)?);
        start += len;
    }
    Tensor::cat(&outs, 2)?.reshape((b, nh, lq, hd))
}
