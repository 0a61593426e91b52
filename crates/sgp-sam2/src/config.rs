//! The model configuration, mirroring the `model:` tree of the official hydra yaml files.
//!
//! Field names equal the yaml keys (hydra's `_target_` keys are ignored), and every key
//! absent from a file takes the default of the corresponding Python constructor
//! (`SAM2Base`, `Hiera`, `FpnNeck`, ...), so a config written for the official package
//! builds the same model here.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::memory_attention::MemoryAttentionConfig;
use crate::memory_encoder::MemoryEncoderConfig;
use crate::{Error, Result};

/// `sam2.modeling.backbones.hieradet.Hiera` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HieraConfig {
    pub embed_dim: usize,
    pub num_heads: usize,
    pub drop_path_rate: f64,
    pub q_pool: usize,
    pub q_stride: [usize; 2],
    pub stages: Vec<usize>,
    pub dim_mul: f64,
    pub head_mul: f64,
    pub window_pos_embed_bkg_spatial_size: [usize; 2],
    pub window_spec: Vec<usize>,
    pub global_att_blocks: Vec<usize>,
    pub return_interm_layers: bool,
}

impl Default for HieraConfig {
    fn default() -> Self {
        Self {
            embed_dim: 96,
            num_heads: 1,
            drop_path_rate: 0.0,
            q_pool: 3,
            q_stride: [2, 2],
            stages: vec![2, 3, 16, 3],
            dim_mul: 2.0,
            head_mul: 2.0,
            window_pos_embed_bkg_spatial_size: [14, 14],
            window_spec: vec![8, 4, 14, 7],
            global_att_blocks: vec![12, 16, 20],
            return_interm_layers: true,
        }
    }
}

/// `PositionEmbeddingSine` arguments (the cache warm-up arguments are irrelevant here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PositionEmbeddingSineConfig {
    pub num_pos_feats: usize,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_true")]
    pub normalize: bool,
    #[serde(default)]
    pub scale: Option<f64>,
}

fn default_temperature() -> f64 {
    10000.0
}
fn default_true() -> bool {
    true
}

/// `FpnNeck` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FpnNeckConfig {
    pub position_encoding: PositionEmbeddingSineConfig,
    pub d_model: usize,
    pub backbone_channel_list: Vec<usize>,
    #[serde(default = "one")]
    pub kernel_size: usize,
    #[serde(default = "one")]
    pub stride: usize,
    #[serde(default)]
    pub padding: usize,
    #[serde(default = "default_interp")]
    pub fpn_interp_model: String,
    #[serde(default = "default_fuse")]
    pub fuse_type: String,
    #[serde(default)]
    pub fpn_top_down_levels: Option<Vec<usize>>,
}

fn one() -> usize {
    1
}
fn default_interp() -> String {
    "bilinear".into()
}
fn default_fuse() -> String {
    "sum".into()
}

/// `ImageEncoder` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEncoderConfig {
    pub trunk: HieraConfig,
    pub neck: FpnNeckConfig,
    #[serde(default)]
    pub scalp: usize,
}

/// `MaskDecoder` keyword arguments that `build_sam2` may override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MaskDecoderExtraArgs {
    pub dynamic_multimask_via_stability: bool,
    pub dynamic_multimask_stability_delta: f64,
    pub dynamic_multimask_stability_thresh: f64,
}

impl Default for MaskDecoderExtraArgs {
    fn default() -> Self {
        Self {
            dynamic_multimask_via_stability: false,
            dynamic_multimask_stability_delta: 0.05,
            dynamic_multimask_stability_thresh: 0.98,
        }
    }
}

/// `SAM2Base` arguments; defaults are `SAM2Base.__init__`'s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sam2Config {
    pub image_encoder: ImageEncoderConfig,
    pub memory_attention: MemoryAttentionConfig,
    pub memory_encoder: MemoryEncoderConfig,
    #[serde(default = "d_num_maskmem")]
    pub num_maskmem: usize,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    #[serde(default = "d_backbone_stride")]
    pub backbone_stride: usize,
    #[serde(default = "d_one_f64")]
    pub sigmoid_scale_for_mem_enc: f64,
    #[serde(default)]
    pub sigmoid_bias_for_mem_enc: f64,
    #[serde(default)]
    pub binarize_mask_from_pts_for_mem_enc: bool,
    #[serde(default)]
    pub use_mask_input_as_output_without_sam: bool,
    #[serde(default = "d_minus_one")]
    pub max_cond_frames_in_attn: i64,
    #[serde(default)]
    pub directly_add_no_mem_embed: bool,
    #[serde(default)]
    pub use_high_res_features_in_sam: bool,
    #[serde(default)]
    pub multimask_output_in_sam: bool,
    #[serde(default = "one")]
    pub multimask_min_pt_num: usize,
    #[serde(default = "one")]
    pub multimask_max_pt_num: usize,
    #[serde(default)]
    pub multimask_output_for_tracking: bool,
    #[serde(default)]
    pub use_multimask_token_for_obj_ptr: bool,
    #[serde(default)]
    pub iou_prediction_use_sigmoid: bool,
    #[serde(default = "one")]
    pub memory_temporal_stride_for_eval: usize,
    #[serde(default)]
    pub non_overlap_masks_for_mem_enc: bool,
    #[serde(default)]
    pub use_obj_ptrs_in_encoder: bool,
    #[serde(default = "d_max_obj_ptrs")]
    pub max_obj_ptrs_in_encoder: usize,
    #[serde(default = "default_true")]
    pub add_tpos_enc_to_obj_ptrs: bool,
    #[serde(default)]
    pub proj_tpos_enc_in_obj_ptrs: bool,
    #[serde(default)]
    pub use_signed_tpos_enc_to_obj_ptrs: bool,
    #[serde(default)]
    pub only_obj_ptrs_in_the_past_for_eval: bool,
    #[serde(default)]
    pub pred_obj_scores: bool,
    #[serde(default)]
    pub pred_obj_scores_mlp: bool,
    #[serde(default)]
    pub fixed_no_obj_ptr: bool,
    #[serde(default)]
    pub soft_no_obj_ptr: bool,
    #[serde(default)]
    pub use_mlp_for_obj_ptr_proj: bool,
    #[serde(default)]
    pub no_obj_embed_spatial: bool,
    #[serde(default)]
    pub sam_mask_decoder_extra_args: Option<MaskDecoderExtraArgs>,
    #[serde(default)]
    pub compile_image_encoder: bool,
    /// `SAM2VideoPredictor.fill_hole_area` (0 = off); `build_sam2_video_predictor` sets 8.
    #[serde(default)]
    pub fill_hole_area: usize,
}

fn d_num_maskmem() -> usize {
    7
}
fn d_image_size() -> usize {
    512
}
fn d_backbone_stride() -> usize {
    16
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_minus_one() -> i64 {
    -1
}
fn d_max_obj_ptrs() -> usize {
    16
}

/// Names accepted by [`Sam2Config::preset`].
pub const PRESET_NAMES: [&str; 8] = [
    "sam2.1_hiera_t",
    "sam2.1_hiera_s",
    "sam2.1_hiera_b+",
    "sam2.1_hiera_l",
    "sam2_hiera_t",
    "sam2_hiera_s",
    "sam2_hiera_b+",
    "sam2_hiera_l",
];

impl Sam2Config {
    /// Parses JSON or yaml text: either the bare `model:` node or a whole file with a
    /// `model:` key. JSON is a subset of yaml 1.2, but JSON is tried first for clearer errors.
    pub fn from_text(text: &str) -> Result<Self> {
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => {
                serde_yaml_ng::from_str(text).map_err(|e| Error::Config(format!("neither JSON nor yaml: {e}")))?
            }
        };
        Self::from_value(value)
    }

    /// Builds the config from a parsed tree (bare `model:` node or a file with `model:`).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let node = match value {
            serde_json::Value::Object(mut m) if m.contains_key("model") && !m.contains_key("image_encoder") => {
                m.remove("model").unwrap_or_default()
            }
            v => v,
        };
        let cfg: Self = serde_json::from_value(node).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a `.json` / `.yaml` config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// The official configs, as the raw yaml defines them (no `build_sam2` overrides).
    /// Accepts the names in [`PRESET_NAMES`], with or without `.yaml`.
    pub fn preset(name: &str) -> Result<Self> {
        let name = name.trim_end_matches(".yaml");
        let (v21, size) = if let Some(s) = name.strip_prefix("sam2.1_hiera_") {
            (true, s)
        } else if let Some(s) = name.strip_prefix("sam2_hiera_") {
            (false, s)
        } else {
            return Err(unknown_preset(name));
        };
        // (embed_dim, num_heads, stages, global_att_blocks, bkg size, window_spec)
        let trunk = match size {
            "t" | "tiny" => json!({"embed_dim": 96, "num_heads": 1, "stages": [1, 2, 7, 2],
                "global_att_blocks": [5, 7, 9], "window_pos_embed_bkg_spatial_size": [7, 7]}),
            "s" | "small" => json!({"embed_dim": 96, "num_heads": 1, "stages": [1, 2, 11, 2],
                "global_att_blocks": [7, 10, 13], "window_pos_embed_bkg_spatial_size": [7, 7]}),
            "b+" | "base_plus" => json!({"embed_dim": 112, "num_heads": 2}),
            "l" | "large" => json!({"embed_dim": 144, "num_heads": 2, "stages": [2, 6, 36, 4],
                "global_att_blocks": [23, 33, 43], "window_pos_embed_bkg_spatial_size": [7, 7],
                "window_spec": [8, 4, 16, 8]}),
            _ => return Err(unknown_preset(name)),
        };
        let e = trunk["embed_dim"].as_u64().unwrap_or(96);
        let channels = json!([8 * e, 4 * e, 2 * e, e]);
        let sine = |n: usize| json!({"num_pos_feats": n, "normalize": true, "scale": null, "temperature": 10000});
        let rope = |kv_in_dim: Option<usize>| {
            let mut a = json!({"_target_": "sam2.modeling.sam.transformer.RoPEAttention",
                "rope_theta": 10000.0, "feat_sizes": [64, 64], "embedding_dim": 256,
                "num_heads": 1, "downsample_rate": 1, "dropout": 0.1});
            if let Some(kv) = kv_in_dim {
                a["rope_k_repeat"] = json!(true);
                a["kv_in_dim"] = json!(kv);
            }
            a
        };
        let mut model = json!({
            "image_encoder": {
                "scalp": 1,
                "trunk": trunk,
                "neck": {
                    "position_encoding": sine(256),
                    "d_model": 256,
                    "backbone_channel_list": channels,
                    "fpn_top_down_levels": [2, 3],
                    "fpn_interp_model": "nearest",
                },
            },
            "memory_attention": {
                "d_model": 256,
                "pos_enc_at_input": true,
                "layer": {
                    "activation": "relu",
                    "dim_feedforward": 2048,
                    "dropout": 0.1,
                    "pos_enc_at_attn": false,
                    "self_attention": rope(None),
                    "d_model": 256,
                    "pos_enc_at_cross_attn_keys": true,
                    "pos_enc_at_cross_attn_queries": false,
                    "cross_attention": rope(Some(64)),
                },
                "num_layers": 4,
            },
            "memory_encoder": {
                "out_dim": 64,
                "position_encoding": sine(64),
                "mask_downsampler": {"kernel_size": 3, "stride": 2, "padding": 1},
                "fuser": {
                    "layer": {"dim": 256, "kernel_size": 7, "padding": 3,
                        "layer_scale_init_value": 1e-6, "use_dwconv": true},
                    "num_layers": 2,
                },
            },
            "num_maskmem": 7,
            "image_size": 1024,
            "sigmoid_scale_for_mem_enc": 20.0,
            "sigmoid_bias_for_mem_enc": -10.0,
            "use_mask_input_as_output_without_sam": true,
            "directly_add_no_mem_embed": true,
            "use_high_res_features_in_sam": true,
            "multimask_output_in_sam": true,
            "iou_prediction_use_sigmoid": true,
            "use_obj_ptrs_in_encoder": true,
            "add_tpos_enc_to_obj_ptrs": false,
            "only_obj_ptrs_in_the_past_for_eval": true,
            "pred_obj_scores": true,
            "pred_obj_scores_mlp": true,
            "fixed_no_obj_ptr": true,
            "multimask_output_for_tracking": true,
            "use_multimask_token_for_obj_ptr": true,
            "multimask_min_pt_num": 0,
            "multimask_max_pt_num": 1,
            "use_mlp_for_obj_ptr_proj": true,
            "compile_image_encoder": false,
        });
        if v21 {
            // SAM2.1 adds the spatial no-object embedding and signed, projected
            // temporal encodings of object pointers.
            model["no_obj_embed_spatial"] = json!(true);
            model["add_tpos_enc_to_obj_ptrs"] = json!(true);
            model["proj_tpos_enc_in_obj_ptrs"] = json!(true);
            model["use_signed_tpos_enc_to_obj_ptrs"] = json!(true);
        }
        Self::from_value(model)
    }

    /// Applies the overrides `build_sam2` / `build_sam2_video_predictor` apply by default
    /// (`apply_postprocessing=True`): what users of the official package actually run.
    pub fn with_real_use_settings(mut self) -> Self {
        self.sam_mask_decoder_extra_args = Some(MaskDecoderExtraArgs {
            dynamic_multimask_via_stability: true,
            dynamic_multimask_stability_delta: 0.05,
            dynamic_multimask_stability_thresh: 0.98,
        });
        self.binarize_mask_from_pts_for_mem_enc = true;
        self.fill_hole_area = 8;
        self
    }

    /// Same config at another input resolution (multiple of 32).
    pub fn with_image_size(mut self, image_size: usize) -> Result<Self> {
        self.image_size = image_size;
        self.validate()?;
        Ok(self)
    }

    /// `SAM2Base.hidden_dim` (the neck's `d_model`).
    pub fn hidden_dim(&self) -> usize {
        self.image_encoder.neck.d_model
    }

    /// The side of the lowest-resolution feature map, `image_size / backbone_stride`.
    pub fn image_embedding_size(&self) -> usize {
        self.image_size / self.backbone_stride
    }

    /// `sam_mask_decoder_extra_args`, with the constructor defaults when absent.
    pub fn mask_decoder_extra_args(&self) -> MaskDecoderExtraArgs {
        self.sam_mask_decoder_extra_args.clone().unwrap_or_default()
    }

    /// Checks the invariants the model code relies on, with messages a user can act on.
    pub fn validate(&self) -> Result<()> {
        let s = self.image_size;
        if s == 0 || s % 32 != 0 {
            return Err(Error::Config(format!(
                "image_size must be a positive multiple of 32, got {s}"
            )));
        }
        if self.backbone_stride == 0 || s % self.backbone_stride != 0 {
            return Err(Error::Config(format!(
                "image_size {s} is not a multiple of backbone_stride {}",
                self.backbone_stride
            )));
        }
        let t = &self.image_encoder.trunk;
        if t.stages.is_empty() || t.stages.len() != t.window_spec.len() {
            return Err(Error::Config(format!(
                "trunk.stages ({}) and trunk.window_spec ({}) must have the same non-zero length",
                t.stages.len(),
                t.window_spec.len()
            )));
        }
        if t.q_pool > t.stages.len() - 1 {
            return Err(Error::Config(format!(
                "trunk.q_pool {} exceeds the number of stage transitions {}",
                t.q_pool,
                t.stages.len() - 1
            )));
        }
        if t.embed_dim == 0 || t.num_heads == 0 || t.q_stride.contains(&0) {
            return Err(Error::Config(
                "trunk embed_dim, num_heads and q_stride must be > 0".into(),
            ));
        }
        let neck = &self.image_encoder.neck;
        let expected_levels = if t.return_interm_layers { t.stages.len() } else { 1 };
        if neck.backbone_channel_list.len() != expected_levels {
            return Err(Error::Config(format!(
                "neck.backbone_channel_list has {} entries but the trunk returns {expected_levels} levels",
                neck.backbone_channel_list.len()
            )));
        }
        if neck.fpn_interp_model != "nearest" && neck.fpn_interp_model != "bilinear" {
            return Err(Error::Config(format!(
                "neck.fpn_interp_model {:?} is not supported (nearest, bilinear)",
                neck.fpn_interp_model
            )));
        }
        if neck.fuse_type != "sum" && neck.fuse_type != "avg" {
            return Err(Error::Config(format!(
                "neck.fuse_type must be sum or avg, got {:?}",
                neck.fuse_type
            )));
        }
        if neck.position_encoding.num_pos_feats % 2 != 0 {
            return Err(Error::Config("position_encoding.num_pos_feats must be even".into()));
        }
        if self.image_encoder.scalp >= neck.backbone_channel_list.len() {
            return Err(Error::Config("image_encoder.scalp removes every feature level".into()));
        }
        if self.use_high_res_features_in_sam && neck.backbone_channel_list.len() - self.image_encoder.scalp < 3 {
            return Err(Error::Config(
                "use_high_res_features_in_sam needs 3 feature levels after scalp".into(),
            ));
        }
        if self.fixed_no_obj_ptr && !(self.pred_obj_scores && self.use_obj_ptrs_in_encoder) {
            return Err(Error::Config(
                "fixed_no_obj_ptr needs pred_obj_scores and use_obj_ptrs_in_encoder".into(),
            ));
        }
        if self.proj_tpos_enc_in_obj_ptrs && !self.add_tpos_enc_to_obj_ptrs {
            return Err(Error::Config(
                "proj_tpos_enc_in_obj_ptrs needs add_tpos_enc_to_obj_ptrs".into(),
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for Sam2Config {
    type Err = Error;

    /// [`Sam2Config::from_text`].
    fn from_str(text: &str) -> Result<Self> {
        Self::from_text(text)
    }
}

fn unknown_preset(name: &str) -> Error {
    Error::Config(format!("unknown preset {name:?}; known: {}", PRESET_NAMES.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for n in PRESET_NAMES {
            let c = Sam2Config::preset(n).unwrap();
            assert_eq!(c.image_size, 1024);
            assert_eq!(c.image_encoder.neck.backbone_channel_list.len(), 4);
        }
        let l = Sam2Config::preset("sam2.1_hiera_l").unwrap();
        assert_eq!(l.image_encoder.trunk.window_spec, vec![8, 4, 16, 8]);
        assert_eq!(l.image_encoder.neck.backbone_channel_list, vec![1152, 576, 288, 144]);
        assert!(l.no_obj_embed_spatial && l.proj_tpos_enc_in_obj_ptrs);
        let v2 = Sam2Config::preset("sam2_hiera_b+").unwrap();
        assert!(!v2.no_obj_embed_spatial && !v2.add_tpos_enc_to_obj_ptrs);
        assert_eq!(v2.image_encoder.trunk.stages, vec![2, 3, 16, 3]);
        assert!(Sam2Config::preset("sam3_hiera_t").is_err());
    }

    #[test]
    fn yaml_with_model_key_and_defaults() {
        let yaml = r#"
# @package _global_
model:
  _target_: sam2.modeling.sam2_base.SAM2Base
  image_encoder:
    _target_: x
    trunk: {embed_dim: 96, num_heads: 1, stages: [1, 2, 7, 2], global_att_blocks: [5, 7, 9], window_pos_embed_bkg_spatial_size: [7, 7]}
    neck:
      position_encoding: {num_pos_feats: 256, normalize: true, scale: null, temperature: 10000}
      d_model: 256
      backbone_channel_list: [768, 384, 192, 96]
  memory_attention: {d_model: 256}
  memory_encoder: {out_dim: 64}
"#;
        let c = yaml.parse::<Sam2Config>().unwrap();
        assert_eq!(c.image_size, 512);
        assert_eq!(c.num_maskmem, 7);
        assert_eq!(c.image_encoder.scalp, 0);
        assert_eq!(c.image_encoder.neck.fpn_interp_model, "bilinear");
        assert!(c.add_tpos_enc_to_obj_ptrs);
        assert_eq!(c.image_encoder.trunk.window_spec, vec![8, 4, 14, 7]);
        let real = c.with_real_use_settings();
        assert!(real.mask_decoder_extra_args().dynamic_multimask_via_stability);
        assert_eq!(real.fill_hole_area, 8);
    }

    #[test]
    fn image_size_must_be_multiple_of_32() {
        let c = Sam2Config::preset("sam2.1_hiera_t").unwrap();
        assert!(c.clone().with_image_size(512).is_ok());
        let e = c.with_image_size(500).unwrap_err().to_string();
        assert!(e.contains("multiple of 32"), "{e}");
    }
}
