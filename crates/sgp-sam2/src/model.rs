//! `Sam2Model`: every module and parameter `SAM2Base` registers, with the image path
//! (`forward_image`, `_prepare_backbone_features`) and a user-level image predictor API
//! (`encode_image` + `predict`, the semantics of `SAM2ImagePredictor`).
//!
//! Video tracking (`track_step` and memory selection) lives in `track.rs` and uses the
//! public fields here.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::adapt::{AdaptableLinear, AdaptableModel};
use crate::config::Sam2Config;
use crate::image_encoder::{BackboneOutput, ImageEncoder};
use crate::mask_decoder::Multimask;
use crate::memory_attention::MemoryAttention;
use crate::memory_encoder::MemoryEncoder;
use crate::sam_heads::{SamHeads, SamHeadsConfig};
use crate::weights::StrictWeights;
use crate::{Error, Result};

use crate::preprocess::Preprocess;

/// `SAM2Base` with every sub-module and top-level parameter, named as in the checkpoint.
#[derive(Debug, Clone)]
pub struct Sam2Model {
    pub(crate) config: Sam2Config,
    pub(crate) image_encoder: ImageEncoder,
    /// `sam_prompt_encoder`, `sam_mask_decoder`, `obj_ptr_proj`, `no_obj_ptr`.
    pub(crate) sam_heads: SamHeads,
    pub(crate) memory_attention: MemoryAttention,
    pub(crate) memory_encoder: MemoryEncoder,
    /// `[num_maskmem, 1, 1, mem_dim]`, temporal encodings of memory frames.
    pub(crate) maskmem_tpos_enc: Tensor,
    /// `[1, 1, C]`, added to the image features of a frame without memory.
    pub(crate) no_mem_embed: Tensor,
    /// `[1, 1, C]`.
    pub(crate) no_mem_pos_enc: Tensor,
    /// `[1, mem_dim]` when `no_obj_embed_spatial` (SAM2.1).
    pub(crate) no_obj_embed_spatial: Option<Tensor>,
    /// `Linear(C, mem_dim)` when `proj_tpos_enc_in_obj_ptrs`; otherwise identity.
    pub(crate) obj_ptr_tpos_proj: Option<AdaptableLinear>,
    /// `Conv2d(1, 1, 4, stride 4)` when `use_obj_ptrs_in_encoder`.
    pub(crate) mask_downsample: Option<candle_nn::Conv2d>,
    /// `SAM2Base.hidden_dim`.
    pub(crate) hidden_dim: usize,
    /// `SAM2Base.mem_dim` (the memory encoder's output channels).
    pub(crate) mem_dim: usize,
    /// `SAM2Base.num_feature_levels`: 3 with high-res features in SAM, else 1.
    pub(crate) num_feature_levels: usize,
    preprocess: Preprocess,
}

/// Flattened backbone features, `SAM2Base._prepare_backbone_features`.
#[derive(Debug, Clone)]
pub struct PreparedFeatures {
    /// The last `num_feature_levels` levels as `[H·W, B, C_l]`, highest resolution first.
    pub vision_feats: Vec<Tensor>,
    /// Their position encodings, `[H·W, B, C]`.
    pub vision_pos_embeds: Vec<Tensor>,
    /// `(H, W)` of each level.
    pub feat_sizes: Vec<(usize, usize)>,
}

/// An encoded image, ready for any number of [`Sam2Model::predict`] calls.
#[derive(Debug, Clone)]
pub struct ImageEmbedding {
    /// `[1, C, S/16, S/16]`, with `no_mem_embed` added when the config says so.
    pub image_embed: Tensor,
    /// `conv_s0`/`conv_s1`-projected levels `[1, C/8, S/4, S/4]`, `[1, C/4, S/8, S/8]`.
    pub high_res_feats: Option<(Tensor, Tensor)>,
    /// The original image size `(H, W)`.
    pub orig_hw: (usize, usize),
}

/// Prompts in ORIGINAL image pixels (as `SAM2ImagePredictor.predict` with
/// `normalize_coords=True`).
#[derive(Debug, Clone, Default)]
pub struct PromptInput {
    /// `(x, y)` points and their labels (1 positive, 0 negative).
    pub points: Option<(Vec<[f32; 2]>, Vec<i32>)>,
    /// `[x0, y0, x1, y1]`.
    pub boxes: Option<[f32; 4]>,
    /// Low-res mask logits from a previous prediction, `[1, S/4, S/4]` or `[S/4, S/4]`.
    pub mask_input: Option<Tensor>,
}

/// The result of [`Sam2Model::predict`]; N = 3 with multimask output, else 1.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// `[N, H, W]` logits at the original image size.
    pub mask_logits: Tensor,
    /// `[N, H, W]` u8, `mask_logits > 0`.
    pub masks: Tensor,
    /// `[N]` predicted IoUs.
    pub iou_scores: Tensor,
    /// `[1]` object score logit (0 when the model does not predict object scores).
    pub object_score_logits: Tensor,
    /// `[N, S/4, S/4]` logits clamped to [-32, 32]; feed back as `mask_input`.
    pub low_res_logits: Tensor,
}

impl Sam2Model {
    /// Builds the model from `vb` at the checkpoint root.
    pub fn new(config: &Sam2Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let c = config.hidden_dim();
        let image_encoder = ImageEncoder::new(&config.image_encoder, vb.pp("image_encoder"))?;
        let mask_downsample = if config.use_obj_ptrs_in_encoder {
            let cfg = candle_nn::Conv2dConfig {
                stride: 4,
                ..Default::default()
            };
            Some(candle_nn::conv2d(1, 1, 4, cfg, vb.pp("mask_downsample"))?)
        } else {
            None
        };
        let memory_attention = MemoryAttention::new(&config.memory_attention, vb.pp("memory_attention"))?;
        let memory_encoder = MemoryEncoder::new(&config.memory_encoder, vb.pp("memory_encoder"))?;
        let me = &config.memory_encoder;
        let mem_dim = if me.out_dim != me.in_dim { me.out_dim } else { c };
        let maskmem_tpos_enc = vb.get((config.num_maskmem, 1, 1, mem_dim), "maskmem_tpos_enc")?;
        let no_mem_embed = vb.get((1, 1, c), "no_mem_embed")?;
        let no_mem_pos_enc = vb.get((1, 1, c), "no_mem_pos_enc")?;
        let no_obj_embed_spatial = if config.no_obj_embed_spatial {
            Some(vb.get((1, mem_dim), "no_obj_embed_spatial")?)
        } else {
            None
        };
        let sam_heads = SamHeads::new(&config.sam_heads_config(), vb.clone())?;
        let obj_ptr_tpos_proj = if config.proj_tpos_enc_in_obj_ptrs {
            Some(AdaptableLinear::load(c, mem_dim, true, vb.pp("obj_ptr_tpos_proj"))?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            image_encoder,
            sam_heads,
            memory_attention,
            memory_encoder,
            maskmem_tpos_enc,
            no_mem_embed,
            no_mem_pos_enc,
            no_obj_embed_spatial,
            obj_ptr_tpos_proj,
            mask_downsample,
            hidden_dim: c,
            mem_dim,
            num_feature_levels: if config.use_high_res_features_in_sam { 3 } else { 1 },
            preprocess: Preprocess::new(config.image_size)?,
        })
    }

    /// Loads an official checkpoint (`.pt` or `.safetensors`, detected by content) in f32,
    /// checking that its keys and shapes match the config exactly.
    pub fn load(config: &Sam2Config, weights_path: &Path, device: &Device) -> Result<Self> {
        let _span = tracing::info_span!("sam2_load", path = %weights_path.display()).entered();
        let weights = StrictWeights::from_file(weights_path, device)?;
        Self::from_weights(config, &weights, device)
    }

    /// Builds from an already-read state dict; reports every key problem at once.
    pub fn from_weights(config: &Sam2Config, weights: &StrictWeights, device: &Device) -> Result<Self> {
        let model = Self::new(config, weights.var_builder(DType::F32, device));
        weights.finish()?;
        model
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        self.no_mem_embed.device()
    }

    /// The config the model was built from (validated).
    pub fn config(&self) -> &Sam2Config {
        &self.config
    }

    /// The image encoder (Hiera trunk + FPN neck).
    pub fn image_encoder(&self) -> &ImageEncoder {
        &self.image_encoder
    }

    /// The prompt encoder, mask decoder and object-pointer head.
    pub fn sam_heads(&self) -> &SamHeads {
        &self.sam_heads
    }

    /// The memory attention (current features attend to the memory bank).
    pub fn memory_attention(&self) -> &MemoryAttention {
        &self.memory_attention
    }

    /// The memory encoder (features + mask → memory).
    pub fn memory_encoder(&self) -> &MemoryEncoder {
        &self.memory_encoder
    }

    /// `[1, 1, C]`, added to the image features of a frame without memory.
    pub fn no_mem_embed(&self) -> &Tensor {
        &self.no_mem_embed
    }

    /// `SAM2Base.hidden_dim` C (the neck's `d_model`, 256 in every release).
    pub fn hidden_dim(&self) -> usize {
        self.hidden_dim
    }

    /// `SAM2Base.mem_dim` (the memory encoder's output channels, 64 in every release).
    pub fn mem_dim(&self) -> usize {
        self.mem_dim
    }

    /// `SAM2Base.num_feature_levels`: 3 with high-res features in the SAM heads, else 1.
    pub fn num_feature_levels(&self) -> usize {
        self.num_feature_levels
    }

    /// `SAM2Base.forward_image`: backbone features of `[B, 3, S, S]` normalised images,
    /// with levels 0 and 1 already projected by `conv_s0`/`conv_s1` when the decoder
    /// uses high-resolution features.
    pub fn forward_image(&self, images: &Tensor) -> Result<BackboneOutput> {
        let _span = tracing::info_span!("forward_image").entered();
        let s = self.config.image_size;
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != s || dims[3] != s {
            return Err(Error::Input(format!(
                "forward_image expects [B,3,{s},{s}], got {dims:?}"
            )));
        }
        let mut out = self.image_encoder.forward(images)?;
        if self.config.use_high_res_features_in_sam {
            let (s0, s1) = self
                .sam_heads
                .mask_decoder
                .project_high_res(&out.backbone_fpn[0], &out.backbone_fpn[1])?;
            out.backbone_fpn[0] = s0;
            out.backbone_fpn[1] = s1;
        }
        Ok(out)
    }

    /// `SAM2Base._prepare_backbone_features`: the last `num_feature_levels` levels,
    /// flattened to `[H·W, B, C]`.
    pub fn prepare_backbone_features(&self, out: &BackboneOutput) -> Result<PreparedFeatures> {
        let n = out.backbone_fpn.len();
        let k = self.num_feature_levels;
        if n < k || out.vision_pos_enc.len() != n {
            return Err(Error::Input(format!("backbone output has {n} levels, need {k}")));
        }
        let flat = |x: &Tensor| -> candle_core::Result<Tensor> { x.flatten_from(2)?.permute((2, 0, 1)) };
        let mut vision_feats = Vec::with_capacity(k);
        let mut vision_pos_embeds = Vec::with_capacity(k);
        let mut feat_sizes = Vec::with_capacity(k);
        for i in n - k..n {
            let (_, _, h, w) = out.vision_pos_enc[i].dims4()?;
            feat_sizes.push((h, w));
            vision_feats.push(flat(&out.backbone_fpn[i])?);
            vision_pos_embeds.push(flat(&out.vision_pos_enc[i])?);
        }
        Ok(PreparedFeatures {
            vision_feats,
            vision_pos_embeds,
            feat_sizes,
        })
    }

    /// The image-predictor features of a batch of normalised `[B, 3, S, S]` images: the
    /// lowest level `[B, C, E, E]` (plus `no_mem_embed` when `directly_add_no_mem_embed`)
    /// and the projected high-res levels. This is `SAM2ImagePredictor.set_image` after
    /// its transforms, and the `sam_heads` parity path.
    pub fn image_features(&self, images: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let bo = self.forward_image(images)?;
        let prep = self.prepare_backbone_features(&bo)?;
        let b = images.dim(0)?;
        let to_map = |x: &Tensor, (h, w): (usize, usize)| -> candle_core::Result<Tensor> {
            let c = x.dim(2)?;
            crate::ops::contiguous(&x.permute((1, 2, 0))?)?.reshape((b, c, h, w))
        };
        let last = prep.vision_feats.len() - 1;
        let mut top = prep.vision_feats[last].clone();
        if self.config.directly_add_no_mem_embed {
            top = top.broadcast_add(&self.no_mem_embed)?;
        }
        let image_embed = to_map(&top, prep.feat_sizes[last])?;
        let high_res = if self.num_feature_levels == 3 {
            Some((
                to_map(&prep.vision_feats[0], prep.feat_sizes[0])?,
                to_map(&prep.vision_feats[1], prep.feat_sizes[1])?,
            ))
        } else {
            None
        };
        Ok((image_embed, high_res))
    }

    /// The model-side image transform ([`Preprocess`]) for this model's input size.
    pub fn preprocess(&self) -> Preprocess {
        self.preprocess
    }

    /// Encodes one RGB image `[3, H, W]` with values in [0, 1], any size, through
    /// [`Preprocess::image`] (`SAM2Transforms`).
    pub fn encode_image(&self, image: &Tensor) -> Result<ImageEmbedding> {
        let _span = tracing::info_span!("encode_image").entered();
        let x = self.preprocess.image(image, self.device())?;
        let (_, h, w) = image.dims3()?;
        let (image_embed, high_res_feats) = self.image_features(&x)?;
        Ok(ImageEmbedding {
            image_embed,
            high_res_feats,
            orig_hw: (h, w),
        })
    }

    /// The official `multimask_output` bool as a [`Multimask`] under this model's
    /// `dynamic_multimask_via_stability` setting.
    pub fn multimask(&self, multimask_output: bool) -> Multimask {
        self.sam_heads.multimask(multimask_output)
    }

    /// `SAM2ImagePredictor.predict` for one image and one prompt set
    /// (`predict(multimask_output=b)` is `multimask = model.multimask(b)`).
    pub fn predict(&self, emb: &ImageEmbedding, prompt: &PromptInput, multimask: Multimask) -> Result<Prediction> {
        let _span = tracing::info_span!("predict").entered();
        let orig_hw = emb.orig_hw;
        let dev = self.device();
        let to_model = |x: f32, y: f32| self.preprocess.point([x, y], orig_hw);

        let mut coords: Vec<f32> = Vec::new();
        let mut labels: Vec<f32> = Vec::new();
        if let Some([x0, y0, x1, y1]) = prompt.boxes {
            if [x0, y0, x1, y1].iter().any(|v| !v.is_finite()) {
                return Err(Error::Input("box coordinates must be finite".into()));
            }
            coords.extend(to_model(x0, y0));
            coords.extend(to_model(x1, y1));
            labels.extend([2.0, 3.0]);
        }
        if let Some((pts, lbl)) = &prompt.points {
            if pts.len() != lbl.len() {
                return Err(Error::Input(format!("{} points but {} labels", pts.len(), lbl.len())));
            }
            for (p, &l) in pts.iter().zip(lbl) {
                if !p[0].is_finite() || !p[1].is_finite() {
                    return Err(Error::Input("point coordinates must be finite".into()));
                }
                coords.extend(to_model(p[0], p[1]));
                labels.push(l as f32);
            }
        }
        let n = labels.len();
        let points = if n > 0 {
            Some((
                Tensor::from_vec(coords, (1, n, 2), dev)?,
                Tensor::from_vec(labels, (1, n), dev)?,
            ))
        } else {
            None
        };

        let pe = &self.sam_heads.prompt_encoder;
        let mask = match &prompt.mask_input {
            Some(m) => {
                let (mh, mw) = pe.mask_input_size;
                let m = m.to_device(dev)?.to_dtype(DType::F32)?;
                let m = match m.rank() {
                    2 => m.unsqueeze(0)?.unsqueeze(0)?,
                    3 => m.unsqueeze(0)?,
                    _ => m,
                };
                if m.dims() != [1, 1, mh, mw] {
                    return Err(Error::Input(format!(
                        "mask_input must be [1,{mh},{mw}] low-res logits, got {:?}",
                        m.dims()
                    )));
                }
                Some(m)
            }
            None => None,
        };
        let (sparse, dense) = pe.forward(points.as_ref().map(|(c, l)| (c, l)), None, mask.as_ref())?;
        let high_res = emb.high_res_feats.as_ref().map(|(a, b)| (a, b));
        let dec = self.sam_heads.mask_decoder.forward(
            &emb.image_embed,
            pe.get_dense_pe(),
            &sparse,
            &dense,
            multimask,
            high_res,
        )?;
        let low_res = dec.masks; // [1, N, S/4, S/4]
        let mask_logits = self.preprocess.logits_to_original(&low_res, orig_hw)?.squeeze(0)?;
        let masks = mask_logits.gt(0f32)?;
        let low_res_logits = low_res.clamp(-32f32, 32f32)?.squeeze(0)?;
        let iou_scores = dec.iou_pred.squeeze(0)?;
        let object_score_logits = dec.object_score_logits.flatten_all()?;
        Ok(Prediction {
            mask_logits,
            masks,
            iou_scores,
            object_score_logits,
            low_res_logits,
        })
    }
}

impl Sam2Config {
    /// The arguments of the SAM heads (`_build_sam_heads` / `_forward_sam_heads`).
    pub fn sam_heads_config(&self) -> SamHeadsConfig {
        SamHeadsConfig::from_sam2_config(self)
    }
}

impl AdaptableModel for Sam2Model {
    fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        let mut v = self.image_encoder.adaptable_linears_mut();
        v.extend(self.sam_heads.adaptable_linears_mut());
        if let Some(l) = self.obj_ptr_tpos_proj.as_mut() {
            v.push(("obj_ptr_tpos_proj".to_string(), l));
        }
        v
    }
}
