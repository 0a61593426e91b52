//! SAM2 memory encoder: fuses a frame's image embedding with its (sigmoid) mask into a
//! compact memory (64 channels in SAM2.1) plus a sine position encoding.
//!
//! Mirrors `sam2.modeling.memory_encoder` (`MaskDownSampler`, `CXBlock`, `Fuser`,
//! `MemoryEncoder`). The model-level scaling of mask logits (`_encode_new_memory`) lives
//! in `track.rs`, because it needs `SAM2Base` parameters.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::{Deserialize, Deserializer, Serialize};

use crate::adapt::AdaptableLinear;
use crate::config::PositionEmbeddingSineConfig;
use crate::ops::{conv2d, LayerNorm2d};
use crate::position_encoding::PositionEmbeddingSine;

fn default_256() -> usize {
    256
}
fn default_4() -> usize {
    4
}
fn default_16() -> usize {
    16
}
fn default_7() -> usize {
    7
}
fn default_3() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_layer_scale() -> f64 {
    1e-6
}

/// YAML 1.1 (PyYAML, hydra) reads `1e-6` as a string; accept numbers and numeric strings.
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        N(f64),
        S(String),
    }
    match NumOrStr::deserialize(d)? {
        NumOrStr::N(x) => Ok(x),
        NumOrStr::S(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

/// `MaskDownSampler` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskDownSamplerConfig {
    /// Output channels.
    #[serde(default = "default_256")]
    pub embed_dim: usize,
    /// Kernel of each downsampling conv.
    #[serde(default = "default_4")]
    pub kernel_size: usize,
    /// Stride of each downsampling conv.
    #[serde(default = "default_4")]
    pub stride: usize,
    /// Padding of each downsampling conv.
    #[serde(default)]
    pub padding: usize,
    /// Overall downsampling (S to S/16); the number of convs follows.
    #[serde(default = "default_16")]
    pub total_stride: usize,
}

/// `CXBlock` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CXBlockConfig {
    /// Channels.
    pub dim: usize,
    /// Depth-wise conv kernel.
    #[serde(default = "default_7")]
    pub kernel_size: usize,
    /// Depth-wise conv padding.
    #[serde(default = "default_3")]
    pub padding: usize,
    /// Initial layer scale γ (0 or less: no layer scale).
    #[serde(default = "default_layer_scale", deserialize_with = "lenient_f64")]
    pub layer_scale_init_value: f64,
    /// Depth-wise (else dense) conv.
    #[serde(default = "default_true")]
    pub use_dwconv: bool,
}

/// `Fuser` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuserConfig {
    /// Every block's arguments.
    pub layer: CXBlockConfig,
    /// Number of blocks.
    pub num_layers: usize,
    /// Channels of the optional input projection.
    #[serde(default)]
    pub dim: Option<usize>,
    /// Project the input with a 1×1 conv first.
    #[serde(default)]
    pub input_projection: bool,
}

/// The yaml `memory_encoder:` subtree (`MemoryEncoder` constructor arguments).
///
/// `MemoryEncoder` has no defaults for `mask_downsampler`, `fuser` and
/// `position_encoding`; when a config omits them we take the values that every official
/// SAM2/SAM2.1 yaml uses, so a partial config still describes the released models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEncoderConfig {
    /// Memory channels (64).
    #[serde(default = "default_out_dim")]
    pub out_dim: usize,
    /// Downsamples the mask to the feature grid.
    #[serde(default = "official_mask_downsampler")]
    pub mask_downsampler: MaskDownSamplerConfig,
    /// Fuses features and mask.
    #[serde(default = "official_fuser")]
    pub fuser: FuserConfig,
    /// Encoding of the memory tokens.
    #[serde(default = "official_position_encoding")]
    pub position_encoding: PositionEmbeddingSineConfig,
    /// Feature channels C.
    #[serde(default = "default_256")]
    pub in_dim: usize,
}

fn default_out_dim() -> usize {
    64
}
fn official_mask_downsampler() -> MaskDownSamplerConfig {
    MaskDownSamplerConfig {
        embed_dim: 256,
        kernel_size: 3,
        stride: 2,
        padding: 1,
        total_stride: 16,
    }
}
fn official_fuser() -> FuserConfig {
    FuserConfig {
        layer: CXBlockConfig {
            dim: 256,
            kernel_size: 7,
            padding: 3,
            layer_scale_init_value: 1e-6,
            use_dwconv: true,
        },
        num_layers: 2,
        dim: None,
        input_projection: false,
    }
}
fn official_position_encoding() -> PositionEmbeddingSineConfig {
    PositionEmbeddingSineConfig {
        num_pos_feats: 64,
        temperature: 10000.0,
        normalize: true,
        scale: None,
    }
}

fn conv(
    in_c: usize,
    out_c: usize,
    k: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        groups,
        ..Default::default()
    };
    candle_nn::conv2d(in_c, out_c, k, cfg, vb)
}

/// Downsamples the mask by `total_stride` in `stride` steps (conv, LayerNorm2d, GELU),
/// then projects to `embed_dim` channels. Checkpoint keys `encoder.{i}`.
#[derive(Debug, Clone)]
pub struct MaskDownSampler {
    pub stages: Vec<(Conv2d, LayerNorm2d)>,
    pub out_conv: Conv2d,
}

impl MaskDownSampler {
    pub fn new(cfg: &MaskDownSamplerConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.stride < 2 || cfg.total_stride < cfg.stride {
            candle_core::bail!("mask downsampler: bad strides {} / {}", cfg.stride, cfg.total_stride);
        }
        let num_layers = ((cfg.total_stride as f64).log2() / (cfg.stride as f64).log2()).floor() as u32;
        if cfg.stride.pow(num_layers) != cfg.total_stride {
            candle_core::bail!(
                "mask downsampler: total_stride {} is not a power of {}",
                cfg.total_stride,
                cfg.stride
            );
        }
        let vb = vb.pp("encoder");
        let mut stages = Vec::new();
        let (mut in_c, mut out_c) = (1, 1);
        for i in 0..num_layers as usize {
            out_c = in_c * cfg.stride * cfg.stride;
            let c = conv(in_c, out_c, cfg.kernel_size, cfg.stride, cfg.padding, 1, vb.pp(3 * i))?;
            let n = LayerNorm2d::new(out_c, 1e-6, vb.pp(3 * i + 1))?;
            stages.push((c, n));
            in_c = out_c;
        }
        let out_conv = conv(out_c, cfg.embed_dim, 1, 1, 0, 1, vb.pp(3 * num_layers as usize))?;
        Ok(Self { stages, out_conv })
    }
}

impl Module for MaskDownSampler {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (c, n) in &self.stages {
            x = n.forward_gelu(&conv2d(c, &x)?)?;
        }
        conv2d(&self.out_conv, &x)
    }
}

/// ConvNeXt block: depthwise conv, LayerNorm2d, pointwise MLP, layer scale, residual.
#[derive(Debug, Clone)]
pub struct CXBlock {
    pub dwconv: Conv2d,
    pub norm: LayerNorm2d,
    pub pwconv1: AdaptableLinear,
    pub pwconv2: AdaptableLinear,
    pub gamma: Option<Tensor>,
}

impl CXBlock {
    pub fn new(cfg: &CXBlockConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        let groups = if cfg.use_dwconv { d } else { 1 };
        Ok(Self {
            dwconv: conv(d, d, cfg.kernel_size, 1, cfg.padding, groups, vb.pp("dwconv"))?,
            norm: LayerNorm2d::new(d, 1e-6, vb.pp("norm"))?,
            pwconv1: AdaptableLinear::load(d, 4 * d, true, vb.pp("pwconv1"))?,
            pwconv2: AdaptableLinear::load(4 * d, d, true, vb.pp("pwconv2"))?,
            gamma: if cfg.layer_scale_init_value > 0.0 {
                Some(vb.get(d, "gamma")?)
            } else {
                None
            },
        })
    }
}

impl CXBlock {
    /// The 7×7 depthwise conv: `sgp_kernels`' direct loop on f32 CPU tensors (candle runs
    /// `groups = C` as C separate convolutions, each with its own backward).
    fn depthwise(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.dwconv;
        let cfg = c.config();
        let w = c.weight();
        let (out_c, in_per_group, kh, kw) = w.dims4()?;
        let depthwise = cfg.groups == out_c && in_per_group == 1 && kh == kw && cfg.stride == 1 && cfg.dilation == 1;
        match c.bias() {
            Some(b) if depthwise && crate::ops::cpu_f32(&[x, w, b]) => {
                sgp_kernels::depthwise::depthwise_conv2d(x, w, b, cfg.padding)
                    .map_err(crate::ops::kernel_err("depthwise conv"))
            }
            _ => c.forward(x),
        }
    }
}

impl Module for CXBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.norm.forward(&self.depthwise(x)?)?;
        let y = crate::ops::contiguous(&y.permute((0, 2, 3, 1))?)?;
        let y = self
            .pwconv2
            .forward(&self.pwconv1.forward_activated(&y, crate::adapt::Activation::Gelu)?)?;
        let y = match &self.gamma {
            Some(g) => y.broadcast_mul(g)?,
            None => y,
        };
        x + crate::ops::contiguous(&y.permute((0, 3, 1, 2))?)?
    }
}

/// Optional 1×1 input projection followed by CXBlocks.
#[derive(Debug, Clone)]
pub struct Fuser {
    pub proj: Option<Conv2d>,
    pub layers: Vec<CXBlock>,
}

impl Fuser {
    pub fn new(cfg: &FuserConfig, vb: VarBuilder) -> Result<Self> {
        let proj = if cfg.input_projection {
            let d = cfg
                .dim
                .ok_or_else(|| candle_core::Error::Msg("fuser: input_projection needs dim".into()))?;
            Some(conv(d, d, 1, 1, 0, 1, vb.pp("proj"))?)
        } else {
            None
        };
        let layers = (0..cfg.num_layers)
            .map(|i| CXBlock::new(&cfg.layer, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { proj, layers })
    }
}

impl Module for Fuser {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = match &self.proj {
            Some(p) => conv2d(p, x)?,
            None => x.clone(),
        };
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        Ok(x)
    }
}

/// `MemoryEncoder`.
#[derive(Debug, Clone)]
pub struct MemoryEncoder {
    /// Downsamples the mask to the feature grid.
    pub mask_downsampler: MaskDownSampler,
    /// 1×1 projection of the image features.
    pub pix_feat_proj: Conv2d,
    /// Fuses features and mask.
    pub fuser: Fuser,
    /// Projection to `out_dim` when it differs from C.
    pub out_proj: Option<Conv2d>,
    /// Encoding of the memory tokens.
    pub position_encoding: PositionEmbeddingSine,
    /// Memory channels.
    pub out_dim: usize,
}

/// The memory of one or more frames.
#[derive(Debug, Clone)]
pub struct MemoryEncoderOutput {
    /// [B, out_dim, E, E]
    pub vision_features: Tensor,
    /// [B, out_dim, E, E]
    pub vision_pos_enc: Tensor,
}

impl MemoryEncoder {
    /// `vb` at the checkpoint prefix `memory_encoder`.
    pub fn new(cfg: &MemoryEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let out_proj = if cfg.out_dim != cfg.in_dim {
            Some(conv(cfg.in_dim, cfg.out_dim, 1, 1, 0, 1, vb.pp("out_proj"))?)
        } else {
            None
        };
        Ok(Self {
            mask_downsampler: MaskDownSampler::new(&cfg.mask_downsampler, vb.pp("mask_downsampler"))?,
            pix_feat_proj: conv(cfg.in_dim, cfg.in_dim, 1, 1, 0, 1, vb.pp("pix_feat_proj"))?,
            fuser: Fuser::new(&cfg.fuser, vb.pp("fuser"))?,
            out_proj,
            position_encoding: PositionEmbeddingSine::new(&cfg.position_encoding)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            out_dim: cfg.out_dim,
        })
    }

    /// `pix_feat` `[B,C,E,E]`; `masks` `[B,1,S,S]` (probabilities when `skip_mask_sigmoid`,
    /// logits otherwise).
    pub fn forward(&self, pix_feat: &Tensor, masks: &Tensor, skip_mask_sigmoid: bool) -> Result<MemoryEncoderOutput> {
        let _span = tracing::debug_span!("memory_encoder").entered();
        let masks = if skip_mask_sigmoid {
            masks.clone()
        } else {
            candle_nn::ops::sigmoid(masks)?
        };
        let masks = self.mask_downsampler.forward(&masks)?;
        if masks.dims() != pix_feat.dims() {
            candle_core::bail!(
                "memory encoder: downsampled mask {:?} does not match image features {:?}",
                masks.dims(),
                pix_feat.dims()
            );
        }
        let x = (conv2d(&self.pix_feat_proj, pix_feat)? + masks)?;
        let x = self.fuser.forward(&x)?;
        let x = match &self.out_proj {
            Some(p) => conv2d(p, &x)?,
            None => x,
        };
        let pos = self.position_encoding.forward(&x)?;
        Ok(MemoryEncoderOutput {
            vision_features: x,
            vision_pos_enc: pos,
        })
    }

    /// Adaptable linear layers by checkpoint path relative to `memory_encoder`.
    pub fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        let mut v = Vec::new();
        for (i, l) in self.fuser.layers.iter_mut().enumerate() {
            v.push((format!("fuser.layers.{i}.pwconv1"), &mut l.pwconv1));
            v.push((format!("fuser.layers.{i}.pwconv2"), &mut l.pwconv2));
        }
        v
    }
}
