//! SAM2's prompt encoder + mask decoder + object-pointer head, i.e. `SAM2Base._build_sam_heads`
//! and `SAM2Base._forward_sam_heads`.
//!
//! # For the model / tracking code
//! ```text
//! let heads = SamHeads::new(&SamHeadsConfig::from_sam2_config(&cfg), vb /* model root */)?;
//! let out: SamHeadsOutput = heads.forward(
//!     &backbone_features,            // [B, C, S/16, S/16] (after no_mem_embed / memory)
//!     Some(&PointInputs { coords, labels }), // [B, P, 2] pixels in the S×S frame, [B, P]; or None
//!     mask_inputs,                   // Option<&Tensor> [B, 1, H, W] (any H, W; S or S/4 usual)
//!     Some((&feat_s0, &feat_s1)),    // high-res features after conv_s0 / conv_s1, or None
//!     Multimask::Multi,              // or heads.multimask(official_bool)
//! )?;
//! ```
//! [`SamHeads::forward_with_intermediates`] also returns the decoder's mask tokens and
//! upscaled embedding ([`DecoderIntermediates`]), the seam SGP's hierarchical decoder
//! builds on.
//! `SamHeads::new` reads `sam_prompt_encoder.*`, `sam_mask_decoder.*` (including `conv_s0`/
//! `conv_s1`, see [`MaskDecoder::project_high_res`]), `obj_ptr_proj.*` and `no_obj_ptr`.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::adapt::AdaptableLinear;
use crate::config::Sam2Config;
use crate::mask_decoder::{MaskDecoder, MaskDecoderConfig, Multimask};
use crate::prompt_encoder::PromptEncoder;
use crate::transformer::{Activation, Mlp};
use crate::{Error, Result};

/// Placeholder logit for masks of objects judged absent (`sam2_base.NO_OBJ_SCORE`).
pub const NO_OBJ_SCORE: f32 = -1024.0;

/// The `SAM2Base` scalar arguments the SAM heads depend on. `Default` = `SAM2Base`'s
/// constructor defaults (with `hidden_dim` 256).
#[derive(Debug, Clone, PartialEq)]
pub struct SamHeadsConfig {
    /// `SAM2Base.hidden_dim` (the neck's `d_model`).
    pub hidden_dim: usize,
    /// Input side S.
    pub image_size: usize,
    /// S over the embedding side (16).
    pub backbone_stride: usize,
    /// The mask decoder uses the S/4 and S/8 levels.
    pub use_high_res_features_in_sam: bool,
    /// Predict an object-presence score.
    pub pred_obj_scores: bool,
    /// The object-score head is an MLP.
    pub pred_obj_scores_mlp: bool,
    /// Without an object, the pointer is the learned `no_obj_ptr`.
    pub fixed_no_obj_ptr: bool,
    /// Blend towards `no_obj_ptr` by the object probability.
    pub soft_no_obj_ptr: bool,
    /// Object pointers are computed (for the memory).
    pub use_obj_ptrs_in_encoder: bool,
    /// The pointer projection is an MLP.
    pub use_mlp_for_obj_ptr_proj: bool,
    /// The pointer comes from the chosen multimask token.
    pub use_multimask_token_for_obj_ptr: bool,
    /// IoU head output through a sigmoid.
    pub iou_prediction_use_sigmoid: bool,
    /// Multimask output for ambiguous prompts.
    pub multimask_output_in_sam: bool,
    /// Multimask output also on tracked frames.
    pub multimask_output_for_tracking: bool,
    /// Fewest points for multimask output.
    pub multimask_min_pt_num: usize,
    /// Most points for multimask output.
    pub multimask_max_pt_num: usize,
    /// `sam_mask_decoder_extra_args` (`build_sam2` turns this on for real use).
    pub dynamic_multimask_via_stability: bool,
    /// Logit offset of the stability score.
    pub dynamic_multimask_stability_delta: f64,
    /// Stability below which the fallback applies.
    pub dynamic_multimask_stability_thresh: f64,
}

impl Default for SamHeadsConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 256,
            image_size: 512,
            backbone_stride: 16,
            use_high_res_features_in_sam: false,
            pred_obj_scores: false,
            pred_obj_scores_mlp: false,
            fixed_no_obj_ptr: false,
            soft_no_obj_ptr: false,
            use_obj_ptrs_in_encoder: false,
            use_mlp_for_obj_ptr_proj: false,
            use_multimask_token_for_obj_ptr: false,
            iou_prediction_use_sigmoid: false,
            multimask_output_in_sam: false,
            multimask_output_for_tracking: false,
            multimask_min_pt_num: 1,
            multimask_max_pt_num: 1,
            dynamic_multimask_via_stability: false,
            dynamic_multimask_stability_delta: 0.05,
            dynamic_multimask_stability_thresh: 0.98,
        }
    }
}

impl SamHeadsConfig {
    /// The SAM-head arguments of a model config.
    pub fn from_sam2_config(cfg: &Sam2Config) -> Self {
        let extra = cfg.mask_decoder_extra_args();
        Self {
            hidden_dim: cfg.hidden_dim(),
            image_size: cfg.image_size,
            backbone_stride: cfg.backbone_stride,
            use_high_res_features_in_sam: cfg.use_high_res_features_in_sam,
            pred_obj_scores: cfg.pred_obj_scores,
            pred_obj_scores_mlp: cfg.pred_obj_scores_mlp,
            fixed_no_obj_ptr: cfg.fixed_no_obj_ptr,
            soft_no_obj_ptr: cfg.soft_no_obj_ptr,
            use_obj_ptrs_in_encoder: cfg.use_obj_ptrs_in_encoder,
            use_mlp_for_obj_ptr_proj: cfg.use_mlp_for_obj_ptr_proj,
            use_multimask_token_for_obj_ptr: cfg.use_multimask_token_for_obj_ptr,
            iou_prediction_use_sigmoid: cfg.iou_prediction_use_sigmoid,
            multimask_output_in_sam: cfg.multimask_output_in_sam,
            multimask_output_for_tracking: cfg.multimask_output_for_tracking,
            multimask_min_pt_num: cfg.multimask_min_pt_num,
            multimask_max_pt_num: cfg.multimask_max_pt_num,
            dynamic_multimask_via_stability: extra.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta: extra.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh: extra.dynamic_multimask_stability_thresh,
        }
    }

    /// `S / backbone_stride`, the side of the image embedding.
    pub fn image_embedding_size(&self) -> usize {
        self.image_size / self.backbone_stride
    }

    /// The mask decoder arguments `_build_sam_heads` passes.
    pub fn mask_decoder_config(&self) -> MaskDecoderConfig {
        MaskDecoderConfig {
            transformer_dim: self.hidden_dim,
            use_high_res_features: self.use_high_res_features_in_sam,
            iou_prediction_use_sigmoid: self.iou_prediction_use_sigmoid,
            dynamic_multimask_via_stability: self.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta: self.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh: self.dynamic_multimask_stability_thresh,
            pred_obj_scores: self.pred_obj_scores,
            pred_obj_scores_mlp: self.pred_obj_scores_mlp,
            use_multimask_token_for_obj_ptr: self.use_multimask_token_for_obj_ptr,
            ..MaskDecoderConfig::default()
        }
    }

    /// `SAM2Base._use_multimask`: multimask output on (initial conditioning or tracking)
    /// frames when the click count lies in `[multimask_min_pt_num, multimask_max_pt_num]`.
    pub fn use_multimask(&self, is_init_cond_frame: bool, num_points: usize) -> bool {
        self.multimask_output_in_sam
            && (is_init_cond_frame || self.multimask_output_for_tracking)
            && (self.multimask_min_pt_num..=self.multimask_max_pt_num).contains(&num_points)
    }
}

/// Point prompts as `_forward_sam_heads` takes them.
#[derive(Debug, Clone)]
pub struct PointInputs {
    /// `[B, P, 2]` (x, y) pixels in the S×S model frame.
    pub coords: Tensor,
    /// `[B, P]`: 1 positive, 0 negative, 2/3 box corners, -1 padding (any numeric dtype).
    pub labels: Tensor,
}

/// `obj_ptr_proj`: identity without object pointers, else a linear layer or a 3-layer MLP.
#[derive(Debug, Clone)]
pub enum ObjPtrProj {
    Identity,
    Linear(AdaptableLinear),
    Mlp(Mlp),
}

impl Module for ObjPtrProj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            ObjPtrProj::Identity => Ok(x.clone()),
            ObjPtrProj::Linear(l) => l.forward(x),
            ObjPtrProj::Mlp(m) => m.forward(x),
        }
    }
}

/// The seven returns of `_forward_sam_heads`, in order.
#[derive(Debug, Clone)]
pub struct SamHeadsOutput {
    /// `[B, M, S/4, S/4]`, M = 3 with multimask output else 1 (NO_OBJ_SCORE where absent).
    pub low_res_multimasks: Tensor,
    /// `[B, M, S, S]`.
    pub high_res_multimasks: Tensor,
    /// `[B, M]`.
    pub ious: Tensor,
    /// `[B, 1, S/4, S/4]`, the best (highest-IoU) mask.
    pub low_res_masks: Tensor,
    /// `[B, 1, S, S]`.
    pub high_res_masks: Tensor,
    /// `[B, C]`.
    pub obj_ptr: Tensor,
    /// `[B, 1]`.
    pub object_score_logits: Tensor,
}

/// What the mask decoder computed on the way to [`SamHeadsOutput`] (SGP's stage-1 tokens
/// and embeddings).
#[derive(Debug, Clone)]
pub struct DecoderIntermediates {
    /// `[B, T, C]`: all T mask tokens (single-mask token first) after the two-way
    /// transformer, before the hypernetwork MLPs.
    pub mask_tokens_out: Tensor,
    /// `[B, C/8, S/4, S/4]`: the image embedding after upscaling (and the high-res skips),
    /// before the product with the hypernetwork outputs.
    pub upscaled_embedding: Tensor,
}

/// `SAM2Base._forward_sam_heads`: prompt encoder, mask decoder and object-pointer head.
#[derive(Debug, Clone)]
pub struct SamHeads {
    /// The arguments.
    pub cfg: SamHeadsConfig,
    /// Checkpoint `sam_prompt_encoder`.
    pub prompt_encoder: PromptEncoder,
    /// Checkpoint `sam_mask_decoder`.
    pub mask_decoder: MaskDecoder,
    /// Checkpoint `obj_ptr_proj`: mask token to object pointer.
    pub obj_ptr_proj: ObjPtrProj,
    /// `[1, C]`, present when `pred_obj_scores && use_obj_ptrs_in_encoder`.
    pub no_obj_ptr: Option<Tensor>,
}

impl SamHeads {
    /// `vb` is the model root (keys `sam_prompt_encoder.*`, `sam_mask_decoder.*`, ...).
    pub fn new(cfg: &SamHeadsConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.backbone_stride == 0 || !cfg.image_size.is_multiple_of(cfg.backbone_stride) {
            return Err(Error::Config(format!(
                "image_size {} is not a multiple of backbone_stride {}",
                cfg.image_size, cfg.backbone_stride
            )));
        }
        if cfg.fixed_no_obj_ptr && !(cfg.pred_obj_scores && cfg.use_obj_ptrs_in_encoder) {
            return Err(Error::Config(
                "fixed_no_obj_ptr needs pred_obj_scores and use_obj_ptrs_in_encoder".into(),
            ));
        }
        let c = cfg.hidden_dim;
        let e = cfg.image_embedding_size();
        let prompt_encoder = PromptEncoder::new(
            c,
            (e, e),
            (cfg.image_size, cfg.image_size),
            16,
            vb.pp("sam_prompt_encoder"),
        )?;
        let mask_decoder = MaskDecoder::new(&cfg.mask_decoder_config(), vb.pp("sam_mask_decoder"))?;
        let obj_ptr_proj = if !cfg.use_obj_ptrs_in_encoder {
            ObjPtrProj::Identity
        } else if cfg.use_mlp_for_obj_ptr_proj {
            ObjPtrProj::Mlp(Mlp::new(c, c, c, 3, Activation::Relu, false, vb.pp("obj_ptr_proj"))?)
        } else {
            ObjPtrProj::Linear(AdaptableLinear::load(c, c, true, vb.pp("obj_ptr_proj"))?)
        };
        let no_obj_ptr = if cfg.pred_obj_scores && cfg.use_obj_ptrs_in_encoder {
            Some(vb.get((1, c), "no_obj_ptr")?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            prompt_encoder,
            mask_decoder,
            obj_ptr_proj,
            no_obj_ptr,
        })
    }

    /// Brings a mask prompt `[B, 1, H, W]` to the prompt encoder's `[B, 1, S/4, S/4]` with
    /// antialiased bilinear, unless it already has that size.
    pub fn prepare_mask_prompt(&self, mask_inputs: &Tensor) -> Result<Tensor> {
        let (mh, mw) = self.prompt_encoder.mask_input_size;
        let dims = mask_inputs.dims();
        if dims.len() != 4 || dims[1] != 1 {
            return Err(Error::Input(format!("mask_inputs must be [B,1,H,W], got {dims:?}")));
        }
        let m = mask_inputs.to_dtype(DType::F32)?;
        if (dims[2], dims[3]) == (mh, mw) {
            Ok(m)
        } else {
            sgp_kernels::resize::bilinear_antialias(&m, mh, mw).map_err(kernel_err)
        }
    }

    /// The official `multimask_output` bool as a [`Multimask`] under this model's
    /// `dynamic_multimask_via_stability` setting (what `_forward_sam_heads` does).
    pub fn multimask(&self, multimask_output: bool) -> Multimask {
        Multimask::from_official(multimask_output, self.cfg.dynamic_multimask_via_stability)
    }

    /// `SAM2Base._forward_sam_heads` (eval mode).
    pub fn forward(
        &self,
        backbone_features: &Tensor,
        point_inputs: Option<&PointInputs>,
        mask_inputs: Option<&Tensor>,
        high_res_features: Option<(&Tensor, &Tensor)>,
        multimask: Multimask,
    ) -> Result<SamHeadsOutput> {
        Ok(self
            .forward_with_intermediates(
                backbone_features,
                point_inputs,
                mask_inputs,
                high_res_features,
                multimask,
            )?
            .0)
    }

    /// [`Self::forward`], also returning the decoder's intermediates.
    pub fn forward_with_intermediates(
        &self,
        backbone_features: &Tensor,
        point_inputs: Option<&PointInputs>,
        mask_inputs: Option<&Tensor>,
        high_res_features: Option<(&Tensor, &Tensor)>,
        multimask: Multimask,
    ) -> Result<(SamHeadsOutput, DecoderIntermediates)> {
        let _span = tracing::debug_span!("sam_heads").entered();
        let (b, c, h, w) = backbone_features.dims4().map_err(|_| {
            Error::Input(format!(
                "backbone_features must be 4D, got {:?}",
                backbone_features.dims()
            ))
        })?;
        let e = self.cfg.image_embedding_size();
        if c != self.cfg.hidden_dim || h != e || w != e {
            return Err(Error::Input(format!(
                "backbone_features must be [B,{},{e},{e}], got {:?}",
                self.cfg.hidden_dim,
                backbone_features.dims()
            )));
        }
        let dev = backbone_features.device();

        // a) points; without any, a single (0,0) point of label -1.
        let (coords, labels) = match point_inputs {
            Some(p) => {
                let cd = p.coords.dims();
                let ld = p.labels.dims();
                if cd.len() != 3 || cd[0] != b || cd[2] != 2 || ld.len() != 2 || ld[0] != b || ld[1] != cd[1] {
                    return Err(Error::Input(format!(
                        "point coords must be [B={b},P,2] and labels [B,P], got {cd:?} and {ld:?}"
                    )));
                }
                (p.coords.to_dtype(DType::F32)?, p.labels.to_dtype(DType::F32)?)
            }
            None => (
                Tensor::zeros((b, 1, 2), DType::F32, dev)?,
                Tensor::full(-1f32, (b, 1), dev)?,
            ),
        };

        // b) mask prompt, resized to S/4 when needed.
        let mask_prompt = match mask_inputs {
            Some(m) => {
                if m.dims().first() != Some(&b) {
                    return Err(Error::Input(format!(
                        "mask_inputs batch must be {b}, got {:?}",
                        m.dims()
                    )));
                }
                Some(self.prepare_mask_prompt(m)?)
            }
            None => None,
        };

        if let Some((s0, s1)) = high_res_features {
            let c8 = self.cfg.hidden_dim / 8;
            let c4 = self.cfg.hidden_dim / 4;
            if s0.dims() != [b, c8, 4 * e, 4 * e] || s1.dims() != [b, c4, 2 * e, 2 * e] {
                return Err(Error::Input(format!(
                    "high-res features must be [B,{c8},{},{}] and [B,{c4},{},{}], got {:?} and {:?}",
                    4 * e,
                    4 * e,
                    2 * e,
                    2 * e,
                    s0.dims(),
                    s1.dims()
                )));
            }
        }
        if self.cfg.use_high_res_features_in_sam != high_res_features.is_some() {
            return Err(Error::Input(format!(
                "use_high_res_features_in_sam is {} but high-res features were {}",
                self.cfg.use_high_res_features_in_sam,
                if high_res_features.is_some() {
                    "given"
                } else {
                    "not given"
                }
            )));
        }

        let (sparse, dense) = self
            .prompt_encoder
            .forward(Some((&coords, &labels)), None, mask_prompt.as_ref())?;
        let dec = self.mask_decoder.forward(
            backbone_features,
            self.prompt_encoder.get_dense_pe(),
            &sparse,
            &dense,
            multimask,
            high_res_features,
        )?;
        let intermediates = DecoderIntermediates {
            mask_tokens_out: dec.mask_tokens_out,
            upscaled_embedding: dec.upscaled_embedding,
        };
        let ious = dec.iou_pred;
        let object_score_logits = dec.object_score_logits;
        let sam_output_tokens = dec.sam_tokens_out;

        let mut low_res_multimasks = dec.masks;
        let is_obj_appearing = object_score_logits.gt(0f32)?; // [B, 1] u8
        if self.cfg.pred_obj_scores {
            let cond = is_obj_appearing
                .reshape((b, 1, 1, 1))?
                .broadcast_as(low_res_multimasks.shape())?;
            let no_obj = Tensor::full(NO_OBJ_SCORE, low_res_multimasks.shape(), dev)?;
            low_res_multimasks = cond.where_cond(&low_res_multimasks, &no_obj)?;
        }
        let low_res_multimasks = low_res_multimasks.to_dtype(DType::F32)?;
        let s = self.cfg.image_size;
        let high_res_multimasks =
            sgp_kernels::resize::bilinear(&low_res_multimasks, s, s, false).map_err(kernel_err)?;

        let (low_res_masks, high_res_masks, sam_output_token) = if multimask.is_multi() {
            let best: Vec<u32> = ious.argmax(D::Minus1)?.to_vec1()?;
            let multi_tokens = sam_output_tokens.dim(1)? > 1;
            let mut lo = Vec::with_capacity(b);
            let mut hi = Vec::with_capacity(b);
            let mut tok = Vec::with_capacity(b);
            for (i, &k) in best.iter().enumerate() {
                let k = k as usize;
                lo.push(low_res_multimasks.narrow(0, i, 1)?.narrow(1, k, 1)?);
                hi.push(high_res_multimasks.narrow(0, i, 1)?.narrow(1, k, 1)?);
                let t = sam_output_tokens.narrow(0, i, 1)?;
                tok.push(if multi_tokens {
                    t.narrow(1, k, 1)?
                } else {
                    t.narrow(1, 0, 1)?
                });
            }
            (
                Tensor::cat(&lo, 0)?,
                Tensor::cat(&hi, 0)?,
                Tensor::cat(&tok, 0)?.squeeze(1)?,
            )
        } else {
            (
                low_res_multimasks.clone(),
                high_res_multimasks.clone(),
                sam_output_tokens.narrow(1, 0, 1)?.squeeze(1)?,
            )
        };

        // Object pointer, mixed with the learned "no object" pointer.
        let mut obj_ptr = self.obj_ptr_proj.forward(&sam_output_token)?;
        if self.cfg.pred_obj_scores {
            // Python raises here when there is no `no_obj_ptr` (pred_obj_scores without
            // object pointers); we leave the pointer unmixed instead.
            if let Some(no_obj_ptr) = &self.no_obj_ptr {
                let lambda = if self.cfg.soft_no_obj_ptr {
                    candle_nn::ops::sigmoid(&object_score_logits)?
                } else {
                    is_obj_appearing.to_dtype(DType::F32)?
                };
                if self.cfg.fixed_no_obj_ptr {
                    obj_ptr = obj_ptr.broadcast_mul(&lambda)?;
                }
                obj_ptr = (obj_ptr + (1.0 - &lambda)?.broadcast_mul(no_obj_ptr)?)?;
            }
        }

        Ok((
            SamHeadsOutput {
                low_res_multimasks,
                high_res_multimasks,
                ious,
                low_res_masks,
                high_res_masks,
                obj_ptr,
                object_score_logits,
            },
            intermediates,
        ))
    }

    /// Every adaptable linear layer of the heads with its checkpoint path.
    pub fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        let mut v = self.mask_decoder.linears_mut("sam_mask_decoder");
        match &mut self.obj_ptr_proj {
            ObjPtrProj::Identity => {}
            ObjPtrProj::Linear(l) => v.push(("obj_ptr_proj".to_string(), l)),
            ObjPtrProj::Mlp(m) => v.extend(m.linears_mut("obj_ptr_proj")),
        }
        v
    }
}

fn kernel_err(e: sgp_kernels::Error) -> Error {
    match e {
        sgp_kernels::Error::Candle(c) => Error::Candle(c),
        other => Error::Input(other.to_string()),
    }
}
