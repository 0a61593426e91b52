//! PMA: pseudo-mask attention over the memory-conditioned features (design step 6).
//!
//! `p = resize(sigmoid(y0), E×E)` (antialiased bilinear, the pseudo-mask's probability at
//! the token grid). Multi-head self-attention over the E² tokens of `F'` adds the key bias
//! `ln max(p, ε)` (soft) or drops keys with `p < 0.5` (hard) through
//! [`sgp_kernels::masked_attention`], so background tokens lose their say; the result is
//! multiplied by `p` per token, `Z = Attn(F'; p) ⊙ p`, and joins through a gated residual
//! `F'' = F' + γ·Z`. γ is learnable and starts at 0, so an untrained PMA is the identity
//! (the `sgp_init` pipeline), while its gradient `∂L/∂γ = ⟨∂L/∂F'', Z⟩` is non-zero from
//! the first step.
//!
//! The block is pre-norm (layer norm over channels) and adds SAM2's fixed sine position
//! encoding to queries and keys, since `F'` tokens are otherwise unordered for attention.

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use sgp_kernels::masked_attention::{
    masked_attention, naive_masked_attention, MaskMode as KernelMode, MaskedAttentionOptions, QueryScaling,
};
use sgp_sam2::PositionEmbeddingSine;
use sgp_sam2::PositionEmbeddingSineConfig;

use crate::layers::{ChannelNorm, Linear};
use crate::{PmaError, Result};

/// How the pseudo-mask acts on the attention logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskMode {
    /// Key bias `ln max(p, ε)`: a graded, differentiable mask (the paper's).
    #[default]
    Soft,
    /// Keys with `p < 0.5` are excluded (Mask2Former); a row with no key left attends to
    /// every key, as the kernel documents.
    Hard,
}

/// Which attention implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionBackend {
    /// `sgp_kernels::masked_attention::masked_attention`: fused, O(L·D) memory, f32.
    #[default]
    Fused,
    /// `naive_masked_attention`: the exact candle-op reference (f64 capable), for checks.
    Reference,
}

/// Configuration of [`PseudoMaskAttention`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PmaConfig {
    /// Attention heads; must divide the feature width C.
    pub num_heads: usize,
    /// Floor of `p` before the log in soft mode.
    pub eps: f32,
    /// Soft or hard masking.
    pub mode: MaskMode,
    /// Fused kernel or reference.
    pub backend: AttentionBackend,
    /// Stop the gradient at the pseudo-mask (default): PMG then learns from the loss's KL
    /// term and through `F'`, not through the mask that weights the attention.
    pub detach_mask: bool,
}

impl Default for PmaConfig {
    fn default() -> Self {
        Self {
            num_heads: 8,
            eps: sgp_kernels::masked_attention::DEFAULT_EPS,
            mode: MaskMode::Soft,
            backend: AttentionBackend::Fused,
            detach_mask: true,
        }
    }
}

impl PmaConfig {
    /// Checks the values against the feature width `dim`.
    pub fn validate(&self, dim: usize) -> Result<()> {
        if self.num_heads == 0 || !dim.is_multiple_of(self.num_heads) {
            return Err(PmaError::Config(format!(
                "pma.num_heads = {} must be positive and divide the feature width {dim}",
                self.num_heads
            )));
        }
        if !(self.eps.is_finite() && self.eps > 0.0 && self.eps < 1.0) {
            return Err(PmaError::Config(format!("pma.eps = {} must lie in (0, 1)", self.eps)));
        }
        Ok(())
    }
}

/// What [`PseudoMaskAttention::forward`] returns.
#[derive(Debug, Clone)]
pub struct PmaOutput {
    /// `F'' = F' + γ·Z`, `[B, C, E, E]`.
    pub features: Tensor,
    /// `Z = Attn(F'; p) ⊙ p`, `[B, C, E, E]`.
    pub z: Tensor,
    /// The key map `p`, `[B, E²]` (row-major over the E×E grid).
    pub key_map: Tensor,
}

/// The masked-attention block with its gate (parameters under `pma.*`).
#[derive(Debug, Clone)]
pub struct PseudoMaskAttention {
    cfg: PmaConfig,
    dim: usize,
    norm: ChannelNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    /// `[1]`, the residual gate γ.
    gamma: Tensor,
    pos: PositionEmbeddingSine,
}

impl PseudoMaskAttention {
    /// Builds the block for features of width `dim` (SAM2's `hidden_dim`); `vb` at `pma`.
    pub fn new(cfg: &PmaConfig, dim: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate(dim)?;
        let pos = PositionEmbeddingSine::new(&PositionEmbeddingSineConfig {
            num_pos_feats: dim,
            temperature: 10000.0,
            normalize: true,
            scale: None,
        })?;
        Ok(Self {
            cfg: cfg.clone(),
            dim,
            norm: ChannelNorm::new(dim, vb.pp("norm"))?,
            q_proj: Linear::new(dim, dim, true, vb.pp("q_proj"))?,
            // No key bias: it adds q·b to every logit of a row, which softmax cancels, so it
            // could never learn (its gradient is exactly zero).
            k_proj: Linear::new(dim, dim, false, vb.pp("k_proj"))?,
            v_proj: Linear::new(dim, dim, true, vb.pp("v_proj"))?,
            out_proj: Linear::new(dim, dim, true, vb.pp("out_proj"))?,
            gamma: vb.get_with_hints(1, "gamma", Init::Const(0.0))?,
            pos,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PmaConfig {
        &self.cfg
    }

    /// The gate γ, `[1]`.
    pub fn gamma(&self) -> &Tensor {
        &self.gamma
    }

    /// The q, k, v and output projections, in that order.
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
    }

    /// `p` `[B, E²]` from pseudo-mask logits `[B, 1, h, w]` (any size; S/4 in SGP):
    /// `sigmoid`, then antialiased bilinear to E×E.
    pub fn key_map(&self, pseudo_mask_logits: &Tensor, e: usize) -> Result<Tensor> {
        let (b, c, h, w) = pseudo_mask_logits.dims4().map_err(|_| {
            PmaError::Input(format!(
                "pseudo-mask logits must be [B,1,H,W], got {:?}",
                pseudo_mask_logits.dims()
            ))
        })?;
        if c != 1 || h < e || w < e {
            return Err(PmaError::Input(format!(
                "pseudo-mask logits must be [B,1,H,W] with H,W >= {e}, got {:?}",
                pseudo_mask_logits.dims()
            )));
        }
        let y = if self.cfg.detach_mask {
            pseudo_mask_logits.detach()
        } else {
            pseudo_mask_logits.clone()
        };
        let prob = candle_nn::ops::sigmoid(&y)?;
        let p = if (h, w) == (e, e) {
            prob
        } else {
            sgp_kernels::resize::bilinear_antialias(&prob, e, e)?
        };
        Ok(p.reshape((b, e * e))?)
    }

    /// The tokens `[B, L, C]` of `[B, C, E, E]` features, after the pre-norm, and the same
    /// with the position encoding added (the query/key input).
    pub fn token_inputs(&self, features: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = features.dims4()?;
        let x = features.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // [B, L, C]
        let xn = self.norm.forward(&x)?;
        let pe = self
            .pos
            .encode(h, w, features.device())?
            .to_dtype(features.dtype())?
            .reshape((c, h * w))?
            .t()?
            .contiguous()?; // [L, C]
        let xq = xn.broadcast_add(&pe.unsqueeze(0)?.expand((b, h * w, c))?)?;
        Ok((xn, xq))
    }

    /// The attention output `Attn(F'; p)` `[B, L, C]` (after the output projection, before
    /// the product with `p`).
    pub fn attend(&self, features: &Tensor, key_map: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = features.dims4()?;
        let l = h * w;
        let heads = self.cfg.num_heads;
        let d = self.dim / heads;
        let (xn, xq) = self.token_inputs(features)?;
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?) };
        let q = split(self.q_proj.forward(&xq)?)?;
        let k = split(self.k_proj.forward(&xq)?)?;
        let v = split(self.v_proj.forward(&xn)?)?;
        let mode = match self.cfg.mode {
            MaskMode::Soft => KernelMode::Soft { eps: self.cfg.eps },
            MaskMode::Hard => KernelMode::Hard,
        };
        let opts = MaskedAttentionOptions {
            mode,
            softmax_scale: None,
            query_scaling: QueryScaling::Off,
        };
        let p = key_map.to_dtype(q.dtype())?;
        let a = match self.cfg.backend {
            AttentionBackend::Fused => masked_attention(&q, &k, &v, &p, &opts)?,
            AttentionBackend::Reference => naive_masked_attention(&q, &k, &v, &p, &opts)?,
        };
        let a = a.transpose(1, 2)?.reshape((b, l, self.dim))?;
        self.out_proj.forward(&a)
    }

    /// `F'' = F' + γ·(Attn(F'; p) ⊙ p)` for features `[B, C, E, E]` and the pseudo-mask
    /// logits `[B, 1, h, w]` they came with.
    pub fn forward(&self, features: &Tensor, pseudo_mask_logits: &Tensor) -> Result<PmaOutput> {
        let _span = tracing::debug_span!("pma").entered();
        let (b, c, h, w) = features
            .dims4()
            .map_err(|_| PmaError::Input(format!("PMA features must be [B,C,E,E], got {:?}", features.dims())))?;
        if c != self.dim || h != w {
            return Err(PmaError::Input(format!(
                "PMA features must be [B,{},E,E], got {:?}",
                self.dim,
                features.dims()
            )));
        }
        if pseudo_mask_logits.dim(0)? != b {
            return Err(PmaError::Input(format!(
                "pseudo-mask batch {} != feature batch {b}",
                pseudo_mask_logits.dim(0)?
            )));
        }
        if !matches!(features.dtype(), DType::F32 | DType::F64) {
            return Err(PmaError::Input(format!(
                "PMA computes in f32 or f64, got {:?}",
                features.dtype()
            )));
        }
        let p = self.key_map(pseudo_mask_logits, h)?.to_dtype(features.dtype())?;
        let a = self.attend(features, &p)?; // [B, L, C]
        let z = a.broadcast_mul(&p.unsqueeze(2)?)?;
        let z = z.transpose(1, 2)?.reshape((b, c, h, w))?;
        let gamma = self.gamma.to_dtype(features.dtype())?;
        let features = (features + z.broadcast_mul(&gamma)?)?;
        Ok(PmaOutput {
            features,
            z,
            key_map: p,
        })
    }
}
