//! SAM2's mask decoder (`sam2.modeling.sam.mask_decoder.MaskDecoder`).
//!
//! Output tokens (object score, IoU, 1 + 3 mask tokens) and the prompt tokens run through
//! the two-way transformer with the image embedding; the image tokens are upscaled 4×
//! (with stride-4/8 backbone features added when `use_high_res_features`), and each mask
//! token's hypernetwork MLP turns it into a per-pixel linear classifier.
//!
//! Weights load from `sam_mask_decoder.*` (pass `vb.pp("sam_mask_decoder")`).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2d, VarBuilder};

use crate::adapt::AdaptableLinear;
use crate::ops::{conv2d, gelu, LayerNorm2d};
use crate::transformer::{Activation, Mlp, TwoWayTransformer};

/// `nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)`.
///
/// With kernel = stride the output windows do not overlap, so the op is one matmul
/// `[B·h·w, c_in] × [c_in, c_out·4]` plus a pixel shuffle. This computes the same sums as
/// the transposed convolution (up to float summation order), stays differentiable, and
/// avoids candle's naive CPU transposed-conv loop.
#[derive(Debug, Clone)]
pub struct ConvTranspose2x2 {
    /// PyTorch layout `[c_in, c_out, 2, 2]`.
    pub weight: Tensor,
    pub bias: Tensor,
}

impl ConvTranspose2x2 {
    pub fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((c_in, c_out, 2, 2), "weight")?,
            bias: vb.get(c_out, "bias")?,
        })
    }
}

impl Module for ConvTranspose2x2 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::ops::untracked_cpu_f32(&[x, &self.weight, &self.bias]) {
            return sgp_kernels::conv::conv_transpose_2x2(x, &self.weight, &self.bias)
                .map_err(crate::ops::kernel_err("conv transpose 2x2"));
        }
        let (b, c_in, h, w) = x.dims4()?;
        let c_out = self.weight.dim(1)?;
        let xm = x.permute((0, 2, 3, 1))?.reshape((b * h * w, c_in))?;
        let wm = self.weight.reshape((c_in, c_out * 4))?;
        let y = xm.matmul(&wm)?; // [(b,h,w), (o,ki,kj)]
        let y = y
            .reshape((b, h, w, c_out, 2, 2))?
            .permute((0, 3, 1, 4, 2, 5))? // b, o, h, ki, w, kj
            .reshape((b, c_out, 2 * h, 2 * w))?;
        y.broadcast_add(&self.bias.reshape((1, c_out, 1, 1))?)
    }
}

/// Constructor arguments of `MaskDecoder` (SAM2 passes the ones `_build_sam_heads` sets).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskDecoderConfig {
    /// Token and embedding width C.
    pub transformer_dim: usize,
    /// Masks in multimask output (3); one more token serves single-mask output.
    pub num_multimask_outputs: usize,
    /// Layers of the IoU head.
    pub iou_head_depth: usize,
    /// Hidden width of the IoU head.
    pub iou_head_hidden_dim: usize,
    /// Add the projected S/4 and S/8 levels while upscaling.
    pub use_high_res_features: bool,
    /// IoU head output through a sigmoid.
    pub iou_prediction_use_sigmoid: bool,
    /// Fall back to the best multimask output when the single mask is unstable.
    pub dynamic_multimask_via_stability: bool,
    /// Logit offset of the stability score.
    pub dynamic_multimask_stability_delta: f64,
    /// Stability below which the fallback applies.
    pub dynamic_multimask_stability_thresh: f64,
    /// Predict an object-presence score (an extra token).
    pub pred_obj_scores: bool,
    /// The object-score head is an MLP (else linear).
    pub pred_obj_scores_mlp: bool,
    /// Return the chosen multimask token for the object pointer.
    pub use_multimask_token_for_obj_ptr: bool,
    /// Two-way transformer: depth 2, 8 heads, MLP 2048, downsample 2 in SAM2.
    pub transformer_depth: usize,
    /// Heads of the two-way transformer.
    pub transformer_num_heads: usize,
    /// MLP width of the two-way transformer.
    pub transformer_mlp_dim: usize,
    /// Internal width divisor of the cross-attentions.
    pub attention_downsample_rate: usize,
}

impl Default for MaskDecoderConfig {
    fn default() -> Self {
        Self {
            transformer_dim: 256,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
            use_high_res_features: false,
            iou_prediction_use_sigmoid: false,
            dynamic_multimask_via_stability: false,
            dynamic_multimask_stability_delta: 0.05,
            dynamic_multimask_stability_thresh: 0.98,
            pred_obj_scores: false,
            pred_obj_scores_mlp: false,
            use_multimask_token_for_obj_ptr: false,
            transformer_depth: 2,
            transformer_num_heads: 8,
            transformer_mlp_dim: 2048,
            attention_downsample_rate: 2,
        }
    }
}

/// The object-score head is a linear layer, or an MLP with `pred_obj_scores_mlp`.
#[derive(Debug, Clone)]
pub enum ObjScoreHead {
    Linear(AdaptableLinear),
    Mlp(Mlp),
}

impl Module for ObjScoreHead {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            ObjScoreHead::Linear(l) => l.forward(x),
            ObjScoreHead::Mlp(m) => m.forward(x),
        }
    }
}

/// How many masks the decoder outputs: the official `multimask_output` bool together with
/// the `dynamic_multimask_via_stability` setting, as one explicit choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Multimask {
    /// One mask, from the single-mask token.
    Single,
    /// Three masks, from the multimask tokens (ambiguous prompts such as one click).
    Multi,
    /// One mask: the single-mask output when it is stable, otherwise the multimask output
    /// with the highest predicted IoU (`dynamic_multimask_via_stability`).
    Dynamic,
}

impl Multimask {
    /// The official `multimask_output` bool under a config that does (`dynamic`) or does
    /// not turn on `dynamic_multimask_via_stability`.
    pub fn from_official(multimask_output: bool, dynamic: bool) -> Self {
        match (multimask_output, dynamic) {
            (true, _) => Self::Multi,
            (false, true) => Self::Dynamic,
            (false, false) => Self::Single,
        }
    }

    /// Whether the output has three masks.
    pub fn is_multi(self) -> bool {
        self == Self::Multi
    }
}

/// What `MaskDecoder.forward` returns, plus the intermediates SGP builds on.
#[derive(Debug, Clone)]
pub struct MaskDecoderOutput {
    /// `[B, M, 4h, 4w]` mask logits, M = 3 (multimask) or 1.
    pub masks: Tensor,
    /// `[B, M]` predicted IoUs.
    pub iou_pred: Tensor,
    /// `[B, 1 or 3, C]` the output tokens the object pointer is taken from.
    pub sam_tokens_out: Tensor,
    /// `[B, 1]`.
    pub object_score_logits: Tensor,
    /// `[B, T, C]`, all T = 1 + `num_multimask_outputs` mask tokens after the two-way
    /// transformer (before the hypernetwork MLPs).
    pub mask_tokens_out: Tensor,
    /// `[B, C/8, 4h, 4w]`, the upscaled image embedding (after the high-res skips, before
    /// the product with the hypernetwork outputs).
    pub upscaled_embedding: Tensor,
}

/// The raw result of `predict_masks`: every mask token's output, before the multimask
/// choice.
#[derive(Debug, Clone)]
pub struct PredictedMasks {
    /// `[B, T, 4h, 4w]` logits of all T mask tokens.
    pub masks: Tensor,
    /// `[B, T]` predicted IoUs.
    pub iou_pred: Tensor,
    /// `[B, T, C]` mask tokens after the two-way transformer.
    pub mask_tokens_out: Tensor,
    /// `[B, 1]`.
    pub object_score_logits: Tensor,
    /// `[B, C/8, 4h, 4w]` upscaled image embedding.
    pub upscaled_embedding: Tensor,
}

/// SAM's `MaskDecoder` (checkpoint `sam_mask_decoder`): prompt and image tokens in, masks,
/// IoU predictions and object scores out.
#[derive(Debug, Clone)]
pub struct MaskDecoder {
    /// The constructor arguments.
    pub cfg: MaskDecoderConfig,
    /// Two-way transformer between prompt tokens and image embedding.
    pub transformer: TwoWayTransformer,
    /// Learned IoU token `[1, C]`.
    pub iou_token: Tensor,
    /// Learned mask tokens `[num_mask_tokens, C]`.
    pub mask_tokens: Tensor,
    /// Learned object-score token, with `pred_obj_scores`.
    pub obj_score_token: Option<Tensor>,
    /// First 2× transposed conv of the upscaling path.
    pub upscale_conv1: ConvTranspose2x2,
    /// Norm between the two upscaling convs.
    pub upscale_norm: LayerNorm2d,
    /// Second 2× transposed conv.
    pub upscale_conv2: ConvTranspose2x2,
    /// 1×1 convs that project backbone levels 0/1 to C/8 and C/4. They belong to the
    /// decoder in the checkpoint but `SAM2Base.forward_image` applies them, so the image
    /// path calls [`MaskDecoder::project_high_res`].
    pub conv_s0: Option<Conv2d>,
    /// Projection of level 1 (see `conv_s0`).
    pub conv_s1: Option<Conv2d>,
    /// One MLP per mask token, turning it into mask weights.
    pub output_hypernetworks_mlps: Vec<Mlp>,
    /// Predicts each mask's IoU.
    pub iou_prediction_head: Mlp,
    /// Object-score head, with `pred_obj_scores`.
    pub pred_obj_score_head: Option<ObjScoreHead>,
}

impl MaskDecoder {
    /// `vb` at the checkpoint prefix `sam_mask_decoder`.
    pub fn new(cfg: &MaskDecoderConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.transformer_dim;
        if !c.is_multiple_of(8) {
            candle_core::bail!("mask decoder: transformer_dim ({c}) must be a multiple of 8");
        }
        let num_mask_tokens = cfg.num_multimask_outputs + 1;
        let transformer = TwoWayTransformer::new(
            cfg.transformer_depth,
            c,
            cfg.transformer_num_heads,
            cfg.transformer_mlp_dim,
            cfg.attention_downsample_rate,
            vb.pp("transformer"),
        )?;
        let iou_token = vb.get((1, c), "iou_token.weight")?;
        let mask_tokens = vb.get((num_mask_tokens, c), "mask_tokens.weight")?;
        let obj_score_token = if cfg.pred_obj_scores {
            Some(vb.get((1, c), "obj_score_token.weight")?)
        } else {
            None
        };
        let up = vb.pp("output_upscaling");
        let upscale_conv1 = ConvTranspose2x2::new(c, c / 4, up.pp("0"))?;
        let upscale_norm = LayerNorm2d::new(c / 4, 1e-6, up.pp("1"))?;
        let upscale_conv2 = ConvTranspose2x2::new(c / 4, c / 8, up.pp("3"))?;
        let (conv_s0, conv_s1) = if cfg.use_high_res_features {
            (
                Some(candle_nn::conv2d(c, c / 8, 1, Default::default(), vb.pp("conv_s0"))?),
                Some(candle_nn::conv2d(c, c / 4, 1, Default::default(), vb.pp("conv_s1"))?),
            )
        } else {
            (None, None)
        };
        let output_hypernetworks_mlps = (0..num_mask_tokens)
            .map(|i| {
                Mlp::new(
                    c,
                    c,
                    c / 8,
                    3,
                    Activation::Relu,
                    false,
                    vb.pp(format!("output_hypernetworks_mlps.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let iou_prediction_head = Mlp::new(
            c,
            cfg.iou_head_hidden_dim,
            num_mask_tokens,
            cfg.iou_head_depth,
            Activation::Relu,
            cfg.iou_prediction_use_sigmoid,
            vb.pp("iou_prediction_head"),
        )?;
        let pred_obj_score_head = if !cfg.pred_obj_scores {
            None
        } else if cfg.pred_obj_scores_mlp {
            Some(ObjScoreHead::Mlp(Mlp::new(
                c,
                c,
                1,
                3,
                Activation::Relu,
                false,
                vb.pp("pred_obj_score_head"),
            )?))
        } else {
            Some(ObjScoreHead::Linear(AdaptableLinear::load(
                c,
                1,
                true,
                vb.pp("pred_obj_score_head"),
            )?))
        };
        Ok(Self {
            cfg: cfg.clone(),
            transformer,
            iou_token,
            mask_tokens,
            obj_score_token,
            upscale_conv1,
            upscale_norm,
            upscale_conv2,
            conv_s0,
            conv_s1,
            output_hypernetworks_mlps,
            iou_prediction_head,
            pred_obj_score_head,
        })
    }

    /// Mask tokens: the multimask outputs plus the single-mask one.
    pub fn num_mask_tokens(&self) -> usize {
        self.cfg.num_multimask_outputs + 1
    }

    /// Applies `conv_s0`/`conv_s1` to backbone levels 0 and 1 (stride 4 and 8), as
    /// `SAM2Base.forward_image` does. Errors when the decoder has no high-res path.
    pub fn project_high_res(&self, level0: &Tensor, level1: &Tensor) -> Result<(Tensor, Tensor)> {
        match (&self.conv_s0, &self.conv_s1) {
            (Some(c0), Some(c1)) => Ok((conv2d(c0, level0)?, conv2d(c1, level1)?)),
            _ => candle_core::bail!("mask decoder: use_high_res_features is off, no conv_s0/conv_s1"),
        }
    }

    /// `predict_masks`: the outputs of all mask tokens (T = 4 in SAM2).
    pub fn predict_masks(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse_prompt_embeddings: &Tensor,
        dense_prompt_embeddings: &Tensor,
        high_res_features: Option<(&Tensor, &Tensor)>,
    ) -> Result<PredictedMasks> {
        let nb = sparse_prompt_embeddings.dim(0)?;
        let c = self.cfg.transformer_dim;
        let nm = self.num_mask_tokens();
        let (output_tokens, s) = match &self.obj_score_token {
            Some(t) => (Tensor::cat(&[t, &self.iou_token, &self.mask_tokens], 0)?, 1),
            None => (Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0)?, 0),
        };
        let n_out = output_tokens.dim(0)?;
        let output_tokens = output_tokens.unsqueeze(0)?.expand((nb, n_out, c))?;
        let tokens = Tensor::cat(&[&output_tokens, &sparse_prompt_embeddings.to_dtype(DType::F32)?], 1)?;

        if image_embeddings.dim(0)? != nb {
            candle_core::bail!(
                "mask decoder: image batch {} != prompt batch {nb}",
                image_embeddings.dim(0)?
            );
        }
        let src = image_embeddings.clone();
        let src = src.broadcast_add(dense_prompt_embeddings)?;
        if image_pe.dim(0)? != 1 {
            candle_core::bail!("mask decoder: image_pe must have batch 1");
        }
        let (b, _, h, w) = src.dims4()?;
        let pos_src = image_pe.expand((src.dim(0)?, c, h, w))?;

        let (hs, src) = self.transformer.forward(&src, &pos_src, &tokens)?;
        let iou_token_out = hs.narrow(1, s, 1)?.squeeze(1)?;
        let mask_tokens_out = hs.narrow(1, s + 1, nm)?;

        let src = crate::ops::contiguous(&src.transpose(1, 2)?)?.reshape((b, c, h, w))?;
        let upscaled = match high_res_features {
            None => {
                let x = self.upscale_conv1.forward(&src)?;
                let x = self.upscale_norm.forward_gelu(&x)?;
                gelu(&self.upscale_conv2.forward(&x)?)?
            }
            Some((feat_s0, feat_s1)) => {
                let x = self.upscale_conv1.forward(&src)?.broadcast_add(feat_s1)?;
                let x = self.upscale_norm.forward_gelu(&x)?;
                gelu(&self.upscale_conv2.forward(&x)?.broadcast_add(feat_s0)?)?
            }
        };

        let hyper_in = self
            .output_hypernetworks_mlps
            .iter()
            .enumerate()
            .map(|(i, mlp)| mlp.forward(&mask_tokens_out.narrow(1, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        let hyper_in = Tensor::cat(&hyper_in, 1)?; // [B, nm, C/8]
        let (ub, uc, uh, uw) = upscaled.dims4()?;
        let masks = hyper_in
            .matmul(&upscaled.reshape((ub, uc, uh * uw))?)?
            .reshape((ub, nm, uh, uw))?;

        let iou_pred = self.iou_prediction_head.forward(&iou_token_out)?;
        let object_score_logits = match &self.pred_obj_score_head {
            Some(head) => head.forward(&hs.narrow(1, 0, 1)?.squeeze(1)?)?,
            // No object-score head: "object present" (sigmoid(10) ≈ 1).
            None => Tensor::full(10f32, (iou_pred.dim(0)?, 1), iou_pred.device())?,
        };
        Ok(PredictedMasks {
            masks,
            iou_pred,
            mask_tokens_out,
            object_score_logits,
            upscaled_embedding: upscaled,
        })
    }

    /// `MaskDecoder.forward` in eval mode. `high_res_features` = (stride-4 level after
    /// `conv_s0`, stride-8 level after `conv_s1`). The image batch must equal the prompt
    /// batch (expand one image for several prompt sets).
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse_prompt_embeddings: &Tensor,
        dense_prompt_embeddings: &Tensor,
        multimask: Multimask,
        high_res_features: Option<(&Tensor, &Tensor)>,
    ) -> Result<MaskDecoderOutput> {
        if self.cfg.use_high_res_features != high_res_features.is_some() {
            candle_core::bail!(
                "mask decoder: use_high_res_features is {} but high-res features were {}",
                self.cfg.use_high_res_features,
                if high_res_features.is_some() {
                    "given"
                } else {
                    "not given"
                }
            );
        }
        let p = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            high_res_features,
        )?;
        let nm = self.num_mask_tokens();
        let (masks, iou_pred) = match multimask {
            Multimask::Multi => (p.masks.narrow(1, 1, nm - 1)?, p.iou_pred.narrow(1, 1, nm - 1)?),
            Multimask::Dynamic => self.dynamic_multimask_via_stability(&p.masks, &p.iou_pred)?,
            Multimask::Single => (p.masks.narrow(1, 0, 1)?, p.iou_pred.narrow(1, 0, 1)?),
        };
        let sam_tokens_out = if multimask.is_multi() && self.cfg.use_multimask_token_for_obj_ptr {
            p.mask_tokens_out.narrow(1, 1, nm - 1)?
        } else {
            // The single-mask token is the object-memory token, also after multimask output.
            p.mask_tokens_out.narrow(1, 0, 1)?
        };
        Ok(MaskDecoderOutput {
            masks,
            iou_pred,
            sam_tokens_out,
            object_score_logits: p.object_score_logits,
            mask_tokens_out: p.mask_tokens_out,
            upscaled_embedding: p.upscaled_embedding,
        })
    }

    /// The official `multimask_output` bool as a [`Multimask`] under this decoder's
    /// `dynamic_multimask_via_stability` setting.
    pub fn multimask(&self, multimask_output: bool) -> Multimask {
        Multimask::from_official(multimask_output, self.cfg.dynamic_multimask_via_stability)
    }

    /// Stability of single-mask logits `[B, 1, H, W]`: area(>δ) / area(>-δ), 1 if empty.
    pub fn stability_scores(&self, mask_logits: &Tensor) -> Result<Tensor> {
        let delta = self.cfg.dynamic_multimask_stability_delta;
        let flat = mask_logits.flatten_from(2)?;
        let area_i = flat.gt(delta)?.to_dtype(DType::F32)?.sum(D::Minus1)?;
        let area_u = flat.gt(-delta)?.to_dtype(DType::F32)?.sum(D::Minus1)?;
        let has_u = area_u.gt(0.0)?;
        let ratio = (&area_i / area_u.maximum(1.0)?)?;
        has_u.where_cond(&ratio, &Tensor::ones_like(&ratio)?)
    }

    /// When the single-mask output is unstable, fall back to the multimask output with the
    /// highest predicted IoU (per batch item).
    pub fn dynamic_multimask_via_stability(&self, all_masks: &Tensor, all_ious: &Tensor) -> Result<(Tensor, Tensor)> {
        let nm = self.num_mask_tokens();
        let b = all_masks.dim(0)?;
        let multi_ious = all_ious.narrow(1, 1, nm - 1)?;
        let best: Vec<u32> = multi_ious.argmax(D::Minus1)?.to_vec1()?;
        let single_masks = all_masks.narrow(1, 0, 1)?;
        let stability: Vec<Vec<f32>> = self.stability_scores(&single_masks)?.to_vec2()?;
        let thresh = self.cfg.dynamic_multimask_stability_thresh;
        let mut masks = Vec::with_capacity(b);
        let mut ious = Vec::with_capacity(b);
        for i in 0..b {
            // PyTorch compares in f32: the Python scalar takes the tensor dtype.
            let stable = stability[i][0] >= thresh as f32;
            let k = if stable { 0 } else { 1 + best[i] as usize };
            masks.push(all_masks.narrow(0, i, 1)?.narrow(1, k, 1)?);
            ious.push(all_ious.narrow(0, i, 1)?.narrow(1, k, 1)?);
        }
        Ok((Tensor::cat(&masks, 0)?, Tensor::cat(&ious, 0)?))
    }

    /// Every adaptable linear below `prefix`, by checkpoint path (the LoRA seam).
    pub fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut AdaptableLinear)> {
        let mut v = self.transformer.linears_mut(&format!("{prefix}.transformer"));
        for (i, m) in self.output_hypernetworks_mlps.iter_mut().enumerate() {
            v.extend(m.linears_mut(&format!("{prefix}.output_hypernetworks_mlps.{i}")));
        }
        v.extend(
            self.iou_prediction_head
                .linears_mut(&format!("{prefix}.iou_prediction_head")),
        );
        match &mut self.pred_obj_score_head {
            Some(ObjScoreHead::Linear(l)) => v.push((format!("{prefix}.pred_obj_score_head"), l)),
            Some(ObjScoreHead::Mlp(m)) => v.extend(m.linears_mut(&format!("{prefix}.pred_obj_score_head"))),
            None => {}
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::ConvTranspose2x2;
    use candle_core::{Device, Module, Tensor};
    use sgp_kernels::testing::max_abs_diff;

    /// Deterministic, non-trivial values (a sine of the flat index).
    fn wavy(seed: f32, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731 + seed).sin()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The matmul + pixel-shuffle transposed convolution equals candle's reference
    /// `conv_transpose2d` (kernel 2, stride 2).
    #[test]
    fn conv_transpose_2x2_matches_candle_reference() {
        let weight = wavy(9.0, &[6, 4, 2, 2]);
        let bias = wavy(10.0, &[4]);
        let x = wavy(11.0, &[2, 6, 3, 5]);
        let ours = ConvTranspose2x2 {
            weight: weight.clone(),
            bias: bias.clone(),
        }
        .forward(&x)
        .unwrap();
        let reference = x
            .conv_transpose2d(&weight, 0, 0, 2, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), [2, 4, 6, 10]);
        assert!(max_abs_diff(&ours, &reference).unwrap() < 1e-5);
    }
}
