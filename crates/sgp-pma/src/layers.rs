//! Small differentiable building blocks, channels-last (NHWC), made of candle ops that all
//! have a backward pass: matmul, reshape/permute, narrow, cat, broadcast arithmetic.
//!
//! candle's `conv2d` backward runs `conv_transpose2d`, a naive loop on the CPU, and there
//! is no bilinear-upsampling backward, so the decoder uses its own 3×3 convolution (im2col
//! by shifted views + one matmul), learned 2× pixel-shuffle upsampling (SAM's stride-2
//! transposed conv, written as a matmul) and a space-to-depth stem.
//!
//! On the CPU (f32/f64), GELU, the 3×3 im2col and the pixel shuffle run as single-pass
//! custom ops with their own backward (`crate::fast`): candle's strided copies and scalar
//! `erf` made them most of the decoder's time at full resolution. Elsewhere the candle-op
//! forms above run.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::{PmaError, Result};

/// PyTorch's default `nn.Linear`/`nn.Conv2d` init: uniform in `±1/√fan_in`.
pub(crate) fn uniform_init(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// A linear layer over the last dimension of a tensor of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    weight: Tensor,
    /// `[out]`.
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{vb}.weight` `[out, in]` (and `{vb}.bias` `[out]`), PyTorch-initialised when
    /// `vb` creates variables.
    pub(crate) fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", uniform_init(in_dim))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", uniform_init(in_dim))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A layer whose weight and bias start at zero (the residual head's last layer).
    pub(crate) fn zeros(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?;
        let bias = Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?);
        Ok(Self { weight, bias })
    }

    /// `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x · Wᵀ + b` over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(PmaError::Input("linear layer on a scalar".into()));
        };
        let n: usize = lead.iter().product();
        let y = x.reshape((n, last))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = lead.to_vec();
        out.push(self.weight.dim(0)?);
        Ok(y.reshape(out)?)
    }
}

/// 3×3 convolution, stride 1, zero padding 1, on NHWC tensors. The weight is stored in
/// PyTorch's `[out, in, 3, 3]` layout so that saved files read like any conv.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3x3 {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let fan_in = 9 * in_dim;
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim, 3, 3), "weight", uniform_init(fan_in))?,
            bias: vb.get_with_hints(out_dim, "bias", uniform_init(fan_in))?,
        })
    }

    /// `[B, H, W, in]` → `[B, H, W, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (o, i) = (self.weight.dim(0)?, self.weight.dim(1)?);
        if c != i {
            return Err(PmaError::Input(format!("conv3x3 expects {i} channels, got {c}")));
        }
        // Column order (ky, kx, c) matches the weight permuted to [ky, kx, in, out].
        let cols = match crate::fast::im2col_3x3(x)? {
            Some(cols) => cols,
            None => im2col_ops(x)?,
        };
        let wm = self.weight.permute((2, 3, 1, 0))?.reshape((9 * c, o))?;
        let y = cols.matmul(&wm)?.broadcast_add(&self.bias)?;
        Ok(y.reshape((b, h, w, o))?)
    }
}

/// The 3×3, padding-1 im2col of `[B, H, W, C]` as `[B·H·W, 9·C]` (columns `(ky, kx, c)`)
/// from candle ops (any device and dtype; slow strided copies on the CPU).
fn im2col_ops(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let xp = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for ky in 0..3 {
        let rows = xp.narrow(1, ky, h)?;
        for kx in 0..3 {
            taps.push(rows.narrow(2, kx, w)?);
        }
    }
    Ok(Tensor::cat(&taps, 3)?.reshape((b * h * w, 9 * c))?)
}

/// Layer norm over the channels (last dim) of an NHWC tensor; differentiable whenever its
/// input or parameters are tracked (`sgp_sam2::ops`).
#[derive(Debug, Clone)]
pub struct ChannelNorm {
    weight: Tensor,
    bias: Tensor,
}

impl ChannelNorm {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
        })
    }

    /// Normalises the last dimension (eps 1e-6, as SAM's `LayerNorm2d`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(sgp_sam2::ops::layer_norm_last_dim(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            1e-6,
        )?)
    }
}

/// Learned 2× upsampling: a linear map to `4·out` channels, then depth-to-space. This is a
/// `ConvTranspose2d(in, out, 2, stride 2)` (as in SAM's upscaler) without the naive loop.
#[derive(Debug, Clone)]
pub struct PixelShuffleUp {
    proj: Linear,
    out_dim: usize,
}

impl PixelShuffleUp {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(in_dim, 4 * out_dim, true, vb)?,
            out_dim,
        })
    }

    /// `[B, H, W, in]` → `[B, 2H, 2W, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = x.dims4()?;
        let y = self.proj.forward(x)?; // [B, H, W, (dy, dx, out)]
        if let Some(y) = crate::fast::depth_to_space_2(&y, self.out_dim)? {
            return Ok(y);
        }
        let y = y
            .reshape((b, h, w, 2, 2, self.out_dim))?
            .permute((0, 1, 3, 2, 4, 5))? // b, h, dy, w, dx, c
            .reshape((b, 2 * h, 2 * w, self.out_dim))?;
        Ok(y)
    }
}

/// Space-to-depth by `f`: `[B, H, W, C]` → `[B, H/f, W/f, f·f·C]` (a patchify stem input).
pub fn space_to_depth(x: &Tensor, f: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if f == 0 || h % f != 0 || w % f != 0 {
        return Err(PmaError::Input(format!(
            "space_to_depth: {h}x{w} is not divisible by {f}"
        )));
    }
    Ok(x.reshape((b, h / f, f, w / f, f, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, h / f, w / f, f * f * c))?)
}

/// NCHW → NHWC.
pub fn to_nhwc(x: &Tensor) -> Result<Tensor> {
    Ok(x.permute((0, 2, 3, 1))?.contiguous()?)
}

/// NHWC → NCHW.
#[cfg(test)]
pub fn to_nchw(x: &Tensor) -> Result<Tensor> {
    Ok(x.permute((0, 3, 1, 2))?.contiguous()?)
}

/// GELU (erf form, as SAM), differentiable: a fast single-pass op (and backward) for f32
/// on the CPU, candle's `gelu_erf` otherwise.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(crate::fast::gelu(x)?)
}

/// A `VarBuilder` backend that serves deterministic tensors for the requested
/// [`Init`] hints, seeded per name, so that a fresh head initialises reproducibly.
#[derive(Clone)]
pub(crate) struct SeededInit {
    seed: u64,
}

impl SeededInit {
    pub(crate) fn new(seed: u64) -> Self {
        Self { seed }
    }
}

/// Parameters recorded by a [`Recorder`], in creation order.
pub(crate) type Recorded = Arc<Mutex<Vec<(String, Tensor)>>>;

/// A `VarBuilder` backend that forwards every request to another `VarBuilder` (at its
/// root) and records the tensor it hands out under its full name, so a module knows its
/// own parameters by name (for saving and counting) whatever backend built it.
pub(crate) struct Recorder<'a> {
    inner: VarBuilder<'a>,
    made: Recorded,
}

impl<'a> Recorder<'a> {
    pub(crate) fn wrap(inner: VarBuilder<'a>) -> (VarBuilder<'a>, Recorded) {
        let made: Recorded = Arc::new(Mutex::new(Vec::new()));
        let dtype = inner.dtype();
        let device = inner.device().clone();
        let rec = Recorder {
            inner,
            made: made.clone(),
        };
        (VarBuilder::from_backend(Box::new(rec), dtype, device), made)
    }
}

/// Takes what a [`Recorder`] saw.
pub(crate) fn take_recorded(made: &Recorded) -> Result<Vec<(String, Tensor)>> {
    let mut g = made
        .lock()
        .map_err(|_| PmaError::Config("parameter recorder poisoned".into()))?;
    Ok(std::mem::take(&mut *g))
}

impl SimpleBackend for Recorder<'_> {
    fn get(&self, s: Shape, name: &str, init: Init, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, init, dtype)?;
        self.made
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter recorder poisoned".into()))?
            .push((name.to_string(), t.clone()));
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// SplitMix64: a tiny, good-enough generator for reproducible initialisation.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        let mut rng = SplitMix(name_seed(self.seed, name));
        let v: Vec<f64> = {
            match init {
                Init::Const(c) => vec![c; n],
                Init::Uniform { lo, up } => (0..n).map(|_| lo + (up - lo) * rng.next_f64()).collect(),
                Init::Randn { mean, stdev } => (0..n)
                    .map(|_| {
                        // Box-Muller.
                        let u1 = rng.next_f64().max(1e-300);
                        let u2 = rng.next_f64();
                        mean + stdev * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                    })
                    .collect(),
                Init::Kaiming { .. } => candle_core::bail!("sgp-pma: unexpected Kaiming init for {name}"),
            }
        };
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("sgp-pma: parameter `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sgp_kernels::testing::max_abs_diff;

    #[test]
    fn conv3x3_equals_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 4, &dev)?;
        let conv = Conv3x3 {
            weight: w.clone(),
            bias: b.clone(),
        };
        let ours = to_nchw(&conv.forward(&to_nhwc(&x)?)?)?;
        let reference = x.conv2d(&w, 1, 1, 1, 1)?.broadcast_add(&b.reshape((1, 4, 1, 1))?)?;
        let err = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "conv3x3 differs from conv2d by {err}");
        Ok(())
    }

    #[test]
    fn fast_im2col_and_its_backward_match_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::F64] {
            let x = Tensor::randn(0f32, 1.0, (2, 5, 7, 3), &dev)?.to_dtype(dt)?;
            let probe = Tensor::randn(0f32, 1.0, (2 * 5 * 7, 27), &dev)?.to_dtype(dt)?;
            let xv = candle_core::Var::from_tensor(&x)?;
            let fast = crate::fast::im2col_3x3(xv.as_tensor())?.expect("fast path on the CPU");
            let slow = im2col_ops(xv.as_tensor())?;
            let err = max_abs_diff(&fast, &slow)?;
            assert_eq!(err, 0.0);
            let g_fast = (fast * &probe)?.sum_all()?.backward()?;
            let g_slow = (slow * &probe)?.sum_all()?.backward()?;
            let (a, b) = (
                g_fast.get(xv.as_tensor()).expect("grad"),
                g_slow.get(xv.as_tensor()).expect("grad"),
            );
            let err = max_abs_diff(a, b)?;
            assert!(err < 1e-5, "col2im differs by {err}");
        }
        Ok(())
    }

    #[test]
    fn fast_pixel_shuffle_and_its_backward_match_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::F64] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 12), &dev)?.to_dtype(dt)?;
            let probe = Tensor::randn(0f32, 1.0, (2, 6, 10, 3), &dev)?.to_dtype(dt)?;
            let xv = candle_core::Var::from_tensor(&x)?;
            let fast = crate::fast::depth_to_space_2(xv.as_tensor(), 3)?.expect("fast path on the CPU");
            let slow = xv
                .as_tensor()
                .reshape((2, 3, 5, 2, 2, 3))?
                .permute((0, 1, 3, 2, 4, 5))?
                .reshape((2, 6, 10, 3))?;
            let err = max_abs_diff(&fast, &slow)?;
            assert_eq!(err, 0.0);
            let g_fast = (fast * &probe)?.sum_all()?.backward()?;
            let g_slow = (slow * &probe)?.sum_all()?.backward()?;
            let (a, b) = (
                g_fast.get(xv.as_tensor()).expect("grad"),
                g_slow.get(xv.as_tensor()).expect("grad"),
            );
            let err = max_abs_diff(a, b)?;
            assert_eq!(err, 0.0);
        }
        Ok(())
    }

    #[test]
    fn space_to_depth_and_pixel_shuffle_invert() -> Result<()> {
        // A pixel shuffle whose projection is the identity undoes space-to-depth.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 6, 3), &dev)?;
        let s = space_to_depth(&x, 2)?;
        assert_eq!(s.dims(), &[1, 2, 3, 12]);
        let up = PixelShuffleUp {
            proj: Linear {
                weight: Tensor::eye(12, DType::F32, &dev)?,
                bias: None,
            },
            out_dim: 3,
        };
        let back = up.forward(&s)?;
        let err = (back - x)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(err, 0.0);
        Ok(())
    }
}
