//! The LoRA adapter of one linear layer: `delta(x) = alpha/r · B (A dropout(x))`,
//! applied to some (or all) equal chunks of the layer's output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Result as CandleResult, Shape, Tensor, Var};
use sgp_sam2::LinearAdapter;

use crate::target::ResolvedLayer;

/// One adapted chunk of the output: `A [r, in]`, `B [chunk_out, r]`.
#[derive(Debug, Clone)]
pub struct LoraChunk {
    /// Index of the output chunk this adapter corrects (e.g. 0 = q, 2 = v of a fused qkv).
    pub chunk: usize,
    /// `A [r, in]`, Kaiming-uniform at start.
    pub a: Var,
    /// `B [chunk_out, r]`, zero at start.
    pub b: Var,
}

/// LoRA on one linear layer. Attached to an [`sgp_sam2::AdaptableLinear`], whose
/// base weight stays frozen; only the `A`/`B` variables train.
#[derive(Debug)]
pub struct LoraLinear {
    layer: ResolvedLayer,
    chunks: Vec<LoraChunk>,
    rank: usize,
    scale: f64,
    dropout: f32,
    /// Shared by all adapters of one [`crate::Lora`], so one switch flips training mode.
    train: Arc<AtomicBool>,
}

impl LoraLinear {
    /// `chunks` must follow `layer.selected` in order, with shapes `[rank, in]`/`[chunk_out, rank]`.
    pub(crate) fn new(
        layer: ResolvedLayer,
        chunks: Vec<LoraChunk>,
        rank: usize,
        scale: f64,
        dropout: f32,
        train: Arc<AtomicBool>,
    ) -> Self {
        Self {
            layer,
            chunks,
            rank,
            scale,
            dropout,
            train,
        }
    }

    /// The adapted layer and the chunks it corrects.
    pub fn layer(&self) -> &ResolvedLayer {
        &self.layer
    }

    /// The adapters, one per selected chunk, in `layer().selected` order.
    pub fn chunks(&self) -> &[LoraChunk] {
        &self.chunks
    }

    /// `alpha / r`, the factor on `B A x`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    fn is_train(&self) -> bool {
        self.train.load(Ordering::Relaxed)
    }

    /// All A's stacked: `[n·r, in]`.
    fn a_stacked(&self) -> CandleResult<Tensor> {
        if let [only] = self.chunks.as_slice() {
            return Ok(only.a.as_tensor().clone());
        }
        let a: Vec<&Tensor> = self.chunks.iter().map(|c| c.a.as_tensor()).collect();
        Tensor::cat(&a, 0)
    }

    /// The B's placed block-diagonally into the full output: `[out, n·r]`, zero on the
    /// rows of chunks that are not adapted. With it, one `[N, n·r] x [n·r, out]` product
    /// gives the deltas of every chunk at their rows, and zeros elsewhere.
    fn b_full(&self) -> CandleResult<Tensor> {
        let first = self.chunks[0].b.as_tensor();
        let (dtype, device) = (first.dtype(), first.device());
        let n = self.chunks.len();
        let r = self.rank;
        if n == 1 && self.layer.chunks == 1 {
            return Ok(first.clone());
        }
        let chunk_out = self.layer.out_dim / self.layer.chunks;
        let mut row_blocks = Vec::with_capacity(self.layer.chunks);
        let mut next = self.chunks.iter().enumerate().peekable();
        for chunk in 0..self.layer.chunks {
            match next.peek() {
                Some((i, c)) if c.chunk == chunk => {
                    let (i, c) = (*i, *c);
                    next.next();
                    let mut cols = Vec::with_capacity(3);
                    if i > 0 {
                        cols.push(Tensor::zeros((chunk_out, i * r), dtype, device)?);
                    }
                    cols.push(c.b.as_tensor().clone());
                    if i + 1 < n {
                        cols.push(Tensor::zeros((chunk_out, (n - 1 - i) * r), dtype, device)?);
                    }
                    row_blocks.push(Tensor::cat(&cols, 1)?);
                }
                _ => row_blocks.push(Tensor::zeros((chunk_out, n * r), dtype, device)?),
            }
        }
        Tensor::cat(&row_blocks, 0)
    }

    /// The change of the base weight, `alpha/r · B_full A_stacked`: `[out, in]`.
    pub fn delta_weight(&self) -> CandleResult<Tensor> {
        self.b_full()?.matmul(&self.a_stacked()?)? * self.scale
    }
}

/// `x [..., k] · wᵀ` for any number of leading dims.
fn matmul_last(x: &Tensor, w_t: &Tensor) -> CandleResult<Tensor> {
    let dims = x.dims();
    if dims.is_empty() {
        candle_core::bail!("LoRA input must have a feature dimension, got a scalar");
    }
    let k = dims[dims.len() - 1];
    let lead = &dims[..dims.len() - 1];
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, k))?.matmul(w_t)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(w_t.dims()[1]);
    y.reshape(Shape::from(out_dims))
}

impl LinearAdapter for LoraLinear {
    /// In training mode the delta is tracked by autograd (and dropout acts). In eval mode
    /// A and B enter detached: nothing downstream is tracked, so sgp-sam2's ops keep
    /// their fast inference kernels, and a fresh adapter (B = 0) leaves the model's
    /// output bit-identical to the model without adapters.
    fn delta(&self, x: &Tensor) -> CandleResult<Tensor> {
        let train = self.is_train();
        let x = if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout)?
        } else {
            x.clone()
        };
        let (a, b) = (self.a_stacked()?, self.b_full()?);
        let (a, b) = if train { (a, b) } else { (a.detach(), b.detach()) };
        let h = matmul_last(&x, &a.t()?)?;
        // The scale goes on B ([out, n·r]), not on the full-size delta: one full-size pass
        // fewer each way.
        matmul_last(&h, &(b * self.scale)?.t()?)
    }
}

/// SplitMix64: a tiny, seedable generator, so that A's initialisation is reproducible
/// on every device (candle's CPU RNG cannot be seeded).
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// PyTorch's `kaiming_uniform_(w, a=sqrt(5))` for a `[rows, fan_in]` weight, which
/// `nn.Linear` and peft's `lora_A` use: gain `sqrt(2/(1+a²)) = sqrt(1/3)`, bound
/// `gain·sqrt(3/fan_in) = 1/sqrt(fan_in)`, so `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
pub(crate) fn kaiming_uniform_a_sqrt5(
    rng: &mut SplitMix64,
    rows: usize,
    fan_in: usize,
    dtype: DType,
    device: &Device,
) -> CandleResult<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let values: Vec<f64> = (0..rows * fan_in)
        .map(|_| (2.0 * rng.next_f64() - 1.0) * bound)
        .collect();
    Tensor::from_vec(values, (rows, fan_in), device)?.to_dtype(dtype)
}
