//! Axial 2D rotary position encoding (SAM2's `compute_axial_cis` / `apply_rotary_enc`).
//!
//! SAM2 rotates consecutive channel pairs `(2i, 2i+1)` of each attention head (a complex
//! view), with the first quarter of the frequencies driven by the token's column and the
//! second quarter by its row. The token grid is square and follows from the token count,
//! so the same layer works at any image size.
//!
//! On f32 CPU tensors the rotation is `sgp_kernels::rope` (one pass, with its backward;
//! repeated grids and unrotated trailing tokens without concatenations). Elsewhere
//! candle's `rope_i` runs, whose kernel has no backward: when autograd tracks the input
//! we compose the rotation from differentiable ops (`rope_i_slow`), the same function.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, DeviceLocation, Result, Tensor};

/// Tables built so far, by (head dim, tokens, theta bits, device): the memory attention
/// asks for the same grid in every layer of every slice.
type RopeCache = Vec<((usize, usize, u64, DeviceLocation), Arc<AxialRope>)>;
static ROPE_CACHE: Mutex<RopeCache> = Mutex::new(Vec::new());
/// Sizes kept at once (a few image sizes and head dims in one process).
const ROPE_CACHE_ENTRIES: usize = 16;

/// Cosine and sine tables `[tokens, head_dim/2]` for an `end_x × end_y` grid (row-major,
/// x fastest), matching the complex `freqs_cis` of the official code.
#[derive(Debug, Clone)]
pub struct AxialRope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub end_x: usize,
    pub end_y: usize,
}

impl AxialRope {
    pub fn new(head_dim: usize, end_x: usize, end_y: usize, theta: f64, device: &Device) -> Result<Self> {
        if !head_dim.is_multiple_of(4) {
            candle_core::bail!("axial RoPE needs a head dim divisible by 4, got {head_dim}");
        }
        let quarter = head_dim / 4;
        // Frequencies in f32 like the reference (`arange(0, dim, 4).float() / dim`).
        let freqs: Vec<f32> = (0..quarter)
            .map(|i| 1.0f32 / (theta as f32).powf((4 * i) as f32 / head_dim as f32))
            .collect();
        let n = end_x * end_y;
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for t in 0..n {
            let tx = (t % end_x) as f32;
            let ty = (t / end_x) as f32;
            for &f in &freqs {
                let a = tx * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
            for &f in &freqs {
                let a = ty * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
            end_x,
            end_y,
        })
    }

    /// A square grid inferred from the token count; errors when it is not a square.
    pub fn for_tokens(head_dim: usize, tokens: usize, theta: f64, device: &Device) -> Result<Self> {
        let side = (tokens as f64).sqrt().round() as usize;
        if side * side != tokens {
            candle_core::bail!("RoPE needs a square token grid, got {tokens} tokens");
        }
        Self::new(head_dim, side, side, theta, device)
    }

    /// [`Self::for_tokens`], built once per (head dim, tokens, theta, device) and shared
    /// (the tables are constants; building them costs `tokens × head_dim` sin/cos).
    pub fn cached(head_dim: usize, tokens: usize, theta: f64, device: &Device) -> Result<Arc<Self>> {
        let key = (head_dim, tokens, theta.to_bits(), device.location());
        let mut cache = ROPE_CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, rope)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(rope.clone());
        }
        let rope = Arc::new(Self::for_tokens(head_dim, tokens, theta, device)?);
        if cache.len() >= ROPE_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((key, rope.clone()));
        Ok(rope)
    }

    pub fn tokens(&self) -> usize {
        self.end_x * self.end_y
    }

    /// Rotates `x` [B, heads, T, head_dim] where T = `repeat` × grid tokens (the grid
    /// repeated along the sequence, as `rope_k_repeat` does for memories of several frames).
    pub fn apply(&self, x: &Tensor, repeat: usize) -> Result<Tensor> {
        let (_, _, t, _) = x.dims4()?;
        if t != self.tokens() * repeat {
            candle_core::bail!("RoPE: {t} tokens do not match {repeat} × {} grid tokens", self.tokens());
        }
        self.apply_leading(x, t)
    }

    /// Rotates the first `rotated` tokens of `x` [B, heads, T, head_dim] (a whole number
    /// of grids) and leaves the rest as they are: memories of several frames followed by
    /// object pointers, which SAM2 does not rotate.
    pub fn apply_leading(&self, x: &Tensor, rotated: usize) -> Result<Tensor> {
        let (_, _, t, _) = x.dims4()?;
        let grid = self.tokens();
        if rotated > t || !rotated.is_multiple_of(grid) {
            candle_core::bail!("RoPE: {rotated} rotated tokens of {t} are not a multiple of the {grid}-token grid");
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return sgp_kernels::rope::rope_interleaved(x, &self.cos, &self.sin, rotated)
                .map_err(crate::ops::kernel_err("rope"));
        }
        if rotated < t {
            let head = self.apply_leading(&x.narrow(2, 0, rotated)?, rotated)?;
            return Tensor::cat(&[head, x.narrow(2, rotated, t - rotated)?], 2);
        }
        let repeat = rotated / grid;
        let (cos, sin) = if repeat == 1 {
            (self.cos.clone(), self.sin.clone())
        } else {
            let c: Vec<Tensor> = (0..repeat).map(|_| self.cos.clone()).collect();
            let s: Vec<Tensor> = (0..repeat).map(|_| self.sin.clone()).collect();
            (Tensor::cat(&c, 0)?, Tensor::cat(&s, 0)?)
        };
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        if x.track_op() {
            candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
        }
    }
}

/// SAM2's 1D sine embedding (`get_1d_sine_pe`): `[sin(p/τ_i), cos(p/τ_i)]` with
/// `τ_i = temperature^(2⌊i/2⌋/(dim/2))`, for positions `pos` (any float values).
pub fn sine_pe_1d(pos: &[f32], dim: usize, temperature: f32, device: &Device) -> Result<Tensor> {
    let pe_dim = dim / 2;
    let dim_t: Vec<f32> = (0..pe_dim)
        .map(|i| temperature.powf((2 * (i / 2)) as f32 / pe_dim as f32))
        .collect();
    let mut out = Vec::with_capacity(pos.len() * dim);
    for &p in pos {
        for &d in &dim_t {
            out.push((p / d).sin());
        }
        for &d in &dim_t {
            out.push((p / d).cos());
        }
    }
    Tensor::from_vec(out, (pos.len(), dim), device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let rope = AxialRope::for_tokens(16, 9, 10000.0, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 2, 18, 16), &dev)?;
        // f32: the kernel; tracked f64: candle's differentiable composition.
        let fast = rope.apply(&x, 2)?;
        let var = candle_core::Var::from_tensor(&x.to_dtype(DType::F64)?)?;
        let slow = rope.apply(var.as_tensor(), 2)?.to_dtype(DType::F32)?;
        let diff = (&fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "paths differ by {diff}");
        // Rotation keeps the norm of each pair.
        let n0 = x.sqr()?.sum_all()?.to_scalar::<f32>()?;
        let n1 = fast.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!((n0 - n1).abs() / n0 < 1e-5);
        // Trailing tokens past the rotated grids are left as they are, on both paths.
        let x = Tensor::randn(0f32, 1.0, (1, 1, 12, 16), &dev)?;
        let fast = rope.apply_leading(&x, 9)?;
        let slow = rope.apply_leading(&x.to_dtype(DType::F64)?, 9)?.to_dtype(DType::F32)?;
        assert!((&fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let tail = (fast.narrow(2, 9, 3)? - x.narrow(2, 9, 3)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(tail, 0.0);
        assert!(rope.apply_leading(&x, 10).is_err());
        // The cache hands out one table per size.
        let a = AxialRope::cached(16, 9, 10000.0, &dev)?;
        let b = AxialRope::cached(16, 9, 10000.0, &dev)?;
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &AxialRope::cached(16, 16, 10000.0, &dev)?));
        Ok(())
    }

    #[test]
    fn non_square_grid_is_an_error() {
        assert!(AxialRope::for_tokens(16, 10, 10000.0, &Device::Cpu).is_err());
    }
}
