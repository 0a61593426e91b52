//! Stage 2 of the hierarchical decoder (design step 7): an H-SAM-style pixel decoder that
//! refines SAM2's S/4 mask to full resolution.
//!
//! Stage 1 is SAM2's own prompt encoder + mask decoder on `F''` with the box prompt. Its
//! mask tokens, upscaled embedding and S/4 logits feed this module, which fuses them with
//! the S/8 and S/4 backbone features and a light stem on the input image and outputs a
//! full-resolution residual `R`; the final logits are `upsample(stage1) + R`.
//!
//! ```text
//!  S/4:  U (upscaled emb.) ─┐
//!        token maps T·U ────┤   T = all mask tokens, projected (mask-token cross-attention
//!        σ(stage-1 logits) ─┤       as in H-SAM's second decoder, in its simplest form)
//!        f_s4 (conv_s0) ────┼─ cat → 1×1 → 3×3 → LN → FiLM(mask token 0) → GELU → +3×3
//!        f_s8 ↑2 (learned) ─┤
//!        stem(image) ↓4 ────┘
//!  S/2:  pixel-shuffle ↑2 → GELU → 1×1 → GELU
//!  S:    pixel-shuffle ↑2 → GELU → cat RGB → 1×1 → GELU → 1×1 (zero at start) = R
//! ```
//! All spatial mixing happens at S/4 and below; the two upsampling steps are learned 2×2
//! "transposed convs" (written as matmuls) with per-pixel layers, which keeps memory and
//! time small at S = 1024 and every op differentiable.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::layers::{gelu, space_to_depth, to_nhwc, ChannelNorm, Conv3x3, Linear, PixelShuffleUp};
use crate::{PmaError, Result};

/// Widths of the pixel decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecoderConfig {
    /// Channels at S/4.
    pub dim_s4: usize,
    /// Channels at S/2.
    pub dim_s2: usize,
    /// Channels at S.
    pub dim_s1: usize,
    /// Channels of the image stem (at S/4).
    pub stem_dim: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            dim_s4: 64,
            dim_s2: 32,
            dim_s1: 16,
            stem_dim: 16,
        }
    }
}

impl DecoderConfig {
    /// Every width must be positive.
    pub fn validate(&self) -> Result<()> {
        if self.dim_s4 == 0 || self.dim_s2 == 0 || self.dim_s1 == 0 || self.stem_dim == 0 {
            return Err(PmaError::Config(format!(
                "decoder widths must all be positive, got {self:?}"
            )));
        }
        Ok(())
    }
}

/// What the decoder needs to know of the SAM2 model it sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadDims {
    /// `hidden_dim` C (the transformer width).
    pub hidden_dim: usize,
    /// Mask tokens of SAM2's decoder (1 + `num_multimask_outputs`).
    pub num_mask_tokens: usize,
    /// Whether the SAM heads use the S/4 and S/8 backbone features.
    pub use_high_res_features: bool,
}

impl HeadDims {
    /// The dimensions of `model`.
    pub fn of(model: &sgp_sam2::Sam2Model) -> Self {
        Self {
            hidden_dim: model.hidden_dim(),
            num_mask_tokens: model.sam_heads().mask_decoder.num_mask_tokens(),
            use_high_res_features: model.config().use_high_res_features_in_sam,
        }
    }
}

/// Inputs of stage 2 (NCHW like SAM2's tensors).
#[derive(Debug, Clone, Copy)]
pub struct Stage2Inputs<'a> {
    /// Every mask token the SAM2 decoder output, `[B, T, C]`.
    pub mask_tokens: &'a Tensor,
    /// The upscaled image embedding before the hypernetwork product, `[B, C/8, S/4, S/4]`.
    pub upscaled_embedding: &'a Tensor,
    /// Stage-1 mask logits `[B, 1, S/4, S/4]`.
    pub stage1_logits: &'a Tensor,
    /// `conv_s0`/`conv_s1` backbone levels `[B, C/8, S/4, S/4]`, `[B, C/4, S/8, S/8]`.
    pub high_res_features: Option<(&'a Tensor, &'a Tensor)>,
    /// The normalised model input `[B, 3, S, S]`.
    pub image: &'a Tensor,
}

/// The stage-2 pixel decoder (parameters under `decoder.*`).
#[derive(Debug, Clone)]
pub struct HierarchicalDecoder {
    cfg: DecoderConfig,
    dims: HeadDims,
    token_proj: Linear,
    film: Linear,
    s8_up: Option<PixelShuffleUp>,
    stem: Linear,
    in_proj: Linear,
    conv_a: Conv3x3,
    norm: ChannelNorm,
    conv_b: Conv3x3,
    up_s2: PixelShuffleUp,
    mix_s2: Linear,
    up_s1: PixelShuffleUp,
    mix_s1: Linear,
    /// R's last layer: zero at start, so the untrained decoder returns stage 1 upsampled.
    out: Linear,
}

impl HierarchicalDecoder {
    /// Builds the decoder; `vb` at `decoder`.
    pub fn new(cfg: &DecoderConfig, dims: HeadDims, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let c = dims.hidden_dim;
        if !c.is_multiple_of(8) || c == 0 || dims.num_mask_tokens == 0 {
            return Err(PmaError::Config(format!(
                "hidden_dim {c} must be a positive multiple of 8 and the decoder needs mask tokens"
            )));
        }
        let (c8, c4) = (c / 8, c / 4);
        let d4 = cfg.dim_s4;
        let s8_up = if dims.use_high_res_features {
            Some(PixelShuffleUp::new(c4, d4, vb.pp("s8_up"))?)
        } else {
            None
        };
        let hr_channels = if dims.use_high_res_features { c8 + d4 } else { 0 };
        let in_channels = c8 + dims.num_mask_tokens + 1 + hr_channels + cfg.stem_dim;
        Ok(Self {
            cfg: cfg.clone(),
            dims,
            token_proj: Linear::new(c, c8, false, vb.pp("token_proj"))?,
            film: Linear::new(c, 2 * d4, true, vb.pp("film"))?,
            s8_up,
            stem: Linear::new(48, cfg.stem_dim, true, vb.pp("stem"))?,
            in_proj: Linear::new(in_channels, d4, true, vb.pp("in_proj"))?,
            conv_a: Conv3x3::new(d4, d4, vb.pp("conv_a"))?,
            norm: ChannelNorm::new(d4, vb.pp("norm"))?,
            conv_b: Conv3x3::new(d4, d4, vb.pp("conv_b"))?,
            up_s2: PixelShuffleUp::new(d4, cfg.dim_s2, vb.pp("up_s2"))?,
            mix_s2: Linear::new(cfg.dim_s2, cfg.dim_s2, true, vb.pp("mix_s2"))?,
            up_s1: PixelShuffleUp::new(cfg.dim_s2, cfg.dim_s1, vb.pp("up_s1"))?,
            mix_s1: Linear::new(cfg.dim_s1 + 3, cfg.dim_s1, true, vb.pp("mix_s1"))?,
            out: Linear::zeros(cfg.dim_s1, 1, vb.pp("out"))?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The residual `R` `[B, 1, S, S]`.
    pub fn forward(&self, x: &Stage2Inputs) -> Result<Tensor> {
        let _span = tracing::debug_span!("hierarchical_decoder").entered();
        let c = self.dims.hidden_dim;
        let (c8, c4) = (c / 8, c / 4);
        let (b, uc, h4, w4) = x.upscaled_embedding.dims4()?;
        let bad = |what: &str, t: &Tensor, want: String| {
            PmaError::Input(format!("stage 2: {what} must be {want}, got {:?}", t.dims()))
        };
        if uc != c8 {
            return Err(bad(
                "upscaled_embedding",
                x.upscaled_embedding,
                format!("[B,{c8},S/4,S/4]"),
            ));
        }
        let (tb, nt, tc) = x
            .mask_tokens
            .dims3()
            .map_err(|_| bad("mask_tokens", x.mask_tokens, format!("[{b},T,{c}]")))?;
        if tb != b || tc != c || nt != self.dims.num_mask_tokens {
            return Err(bad(
                "mask_tokens",
                x.mask_tokens,
                format!("[{b},{},{c}]", self.dims.num_mask_tokens),
            ));
        }
        if x.stage1_logits.dims() != [b, 1, h4, w4] {
            return Err(bad("stage1_logits", x.stage1_logits, format!("[{b},1,{h4},{w4}]")));
        }
        let (s_h, s_w) = (4 * h4, 4 * w4);
        if x.image.dims() != [b, 3, s_h, s_w] {
            return Err(bad("image", x.image, format!("[{b},3,{s_h},{s_w}]")));
        }
        let dt = x.upscaled_embedding.dtype();

        // --- S/4 fusion -------------------------------------------------------------
        let u = to_nhwc(x.upscaled_embedding)?; // [B, h4, w4, C/8]
                                                // Mask-token maps: every mask token, projected to C/8, against U (like SAM's
                                                // hypernetwork product, with new weights and all tokens at once).
        let tk = self.token_proj.forward(x.mask_tokens)?; // [B, T, C/8]
        let maps = u
            .reshape((b, h4 * w4, c8))?
            .matmul(&tk.transpose(1, 2)?.contiguous()?)?
            .affine(1.0 / (c8 as f64).sqrt(), 0.0)?
            .reshape((b, h4, w4, nt))?;
        let prior = to_nhwc(&candle_nn::ops::sigmoid(x.stage1_logits)?.to_dtype(dt)?)?;
        let img = to_nhwc(&x.image.to_dtype(dt)?)?; // [B, S, S, 3]
        let stem = gelu(&self.stem.forward(&space_to_depth(&img, 4)?)?)?;
        let mut parts = vec![u, maps, prior];
        match (x.high_res_features, &self.s8_up) {
            (Some((f4, f8)), Some(up)) => {
                if f4.dims() != [b, c8, h4, w4] || f8.dims() != [b, c4, h4 / 2, w4 / 2] {
                    return Err(PmaError::Input(format!(
                        "stage 2: high-res features must be [{b},{c8},{h4},{w4}] and [{b},{c4},{},{}], got {:?} and {:?}",
                        h4 / 2,
                        w4 / 2,
                        f4.dims(),
                        f8.dims()
                    )));
                }
                parts.push(to_nhwc(f4)?);
                parts.push(gelu(&up.forward(&to_nhwc(f8)?)?)?);
            }
            (None, None) => {}
            _ => {
                return Err(PmaError::Input(format!(
                    "stage 2 was built with use_high_res_features = {} but high-res features were {}",
                    self.dims.use_high_res_features,
                    if x.high_res_features.is_some() {
                        "given"
                    } else {
                        "not given"
                    }
                )))
            }
        }
        parts.push(stem);
        let f = Tensor::cat(&parts, 3)?;
        let f = self.in_proj.forward(&f)?;
        let h = self.norm.forward(&self.conv_a.forward(&f)?)?;
        // FiLM from the single-mask token (the one stage 1's mask and object pointer use).
        let film = self.film.forward(&x.mask_tokens.narrow(1, 0, 1)?)?; // [B, 1, 2·d4]
        let d4 = self.cfg.dim_s4;
        let scale = film.narrow(2, 0, d4)?.unsqueeze(1)?; // [B, 1, 1, d4]
        let shift = film.narrow(2, d4, d4)?.unsqueeze(1)?;
        let h = h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
        let h = gelu(&h)?;
        let h = (&h + gelu(&self.conv_b.forward(&h)?)?)?;

        // --- S/2 and S ----------------------------------------------------------------
        let h = gelu(&self.up_s2.forward(&h)?)?;
        let h = gelu(&self.mix_s2.forward(&h)?)?;
        let h = gelu(&self.up_s1.forward(&h)?)?; // [B, S, S, d1]
        let h = Tensor::cat(&[&h, &img], 3)?;
        let h = gelu(&self.mix_s1.forward(&h)?)?;
        let r = self.out.forward(&h)?; // [B, S, S, 1]
        Ok(r.reshape((b, 1, s_h, s_w))?)
    }
}
