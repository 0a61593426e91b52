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
    /// Channels of the first stage (doubled at each stage change by `dim_mul`).
    pub embed_dim: usize,
    /// Attention heads of the first stage (multiplied by `head_mul` at each stage change).
    pub num_heads: usize,
    /// Stochastic depth; inference ignores it.
    pub drop_path_rate: f64,
    /// How many stage changes pool the query (2×2 max-pool by `q_stride`).
    pub q_pool: usize,
    /// Query-pooling stride.
    pub q_stride: [usize; 2],
    /// Blocks per stage.
    pub stages: Vec<usize>,
    /// Width factor at each stage change.
    pub dim_mul: f64,
    /// Head-count factor at each stage change.
    pub head_mul: f64,
    /// Size of the background position embedding, bicubically resized to the patch grid.
    pub window_pos_embed_bkg_spatial_size: [usize; 2],
    /// Window size of each stage (the `global_att_blocks` attend globally instead).
    pub window_spec: Vec<usize>,
    /// Blocks that attend globally instead of within windows.
    pub global_att_blocks: Vec<usize>,
    /// Return every stage's output (the FPN needs them).
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
    /// Output channels (half for x, half for y).
    pub num_pos_feats: usize,
    /// Frequency base of the sines.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Normalise coordinates to `[0, scale]` before encoding.
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Coordinate scale when normalising (`None` = 2π).
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
    /// Encoding added to every output level.
    pub position_encoding: PositionEmbeddingSineConfig,
    /// Output channels of every level (C).
    pub d_model: usize,
    /// Trunk channels per level, coarsest first.
    pub backbone_channel_list: Vec<usize>,
    /// Lateral conv kernel.
    #[serde(default = "one")]
    pub kernel_size: usize,
    /// Lateral conv stride.
    #[serde(default = "one")]
    pub stride: usize,
    /// Lateral conv padding.
    #[serde(default)]
    pub padding: usize,
    /// Upsampling of the top-down path.
    #[serde(default)]
    pub fpn_interp_model: FpnInterp,
    /// How lateral and top-down features combine.
    #[serde(default)]
    pub fuse_type: FuseType,
    /// Levels that receive top-down features (`None` = all).
    #[serde(default)]
    pub fpn_top_down_levels: Option<Vec<usize>>,
}

fn one() -> usize {
    1
}

/// `FpnNeck.fpn_interp_model`: how a coarser level is upsampled 2× in the top-down path.
/// The yaml holds the torch `interpolate` mode name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FpnInterp {
    /// `mode="nearest"` (every official config).
    Nearest,
    /// `mode="bilinear"`, `align_corners=False` (the constructor default).
    #[default]
    Bilinear,
}

/// `FpnNeck.fuse_type`: how the lateral and top-down features are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FuseType {
    /// Their sum (the default).
    #[default]
    Sum,
    /// Their mean.
    Avg,
}

/// `ImageEncoder` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEncoderConfig {
    /// The Hiera backbone.
    pub trunk: HieraConfig,
    /// The FPN neck.
    pub neck: FpnNeckConfig,
    /// Number of lowest-resolution levels to drop (1 in every official config).
    #[serde(default)]
    pub scalp: usize,
}

/// `MaskDecoder` keyword arguments that `build_sam2` may override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MaskDecoderExtraArgs {
    /// With single-mask output, fall back to the best multimask output when the single mask is unstable.
    pub dynamic_multimask_via_stability: bool,
    /// Logit offset of the stability score.
    pub dynamic_multimask_stability_delta: f64,
    /// Stability below which the fallback applies.
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sam2Config {
    /// Hiera trunk and FPN neck.
    pub image_encoder: ImageEncoderConfig,
    /// Conditions the current frame on the memory bank.
    pub memory_attention: MemoryAttentionConfig,
    /// Turns features and a mask into a memory.
    pub memory_encoder: MemoryEncoderConfig,
    /// Memory frames attended to (1 conditioning frame + up to 6 previous).
    #[serde(default = "d_num_maskmem")]
    pub num_maskmem: usize,
    /// Input side S (a multiple of 32).
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    /// S over the lowest feature level (16).
    #[serde(default = "d_backbone_stride")]
    pub backbone_stride: usize,
    /// Scale on the mask probability before the memory encoder.
    #[serde(default = "d_one_f64")]
    pub sigmoid_scale_for_mem_enc: f64,
    /// Bias on the mask probability before the memory encoder.
    #[serde(default)]
    pub sigmoid_bias_for_mem_enc: f64,
    /// Binarise point-prompted masks before encoding them (real-use setting).
    #[serde(default)]
    pub binarize_mask_from_pts_for_mem_enc: bool,
    /// A mask prompt becomes the output directly (logits `mask·20 − 10`), without the SAM heads.
    #[serde(default)]
    pub use_mask_input_as_output_without_sam: bool,
    /// Conditioning frames in memory attention (-1 = all; else the closest).
    #[serde(default = "d_minus_one")]
    pub max_cond_frames_in_attn: i64,
    /// Add `no_mem_embed` to the features of a frame without memory.
    #[serde(default)]
    pub directly_add_no_mem_embed: bool,
    /// The mask decoder uses the S/4 and S/8 levels.
    #[serde(default)]
    pub use_high_res_features_in_sam: bool,
    /// Three mask outputs for ambiguous prompts on the first click.
    #[serde(default)]
    pub multimask_output_in_sam: bool,
    /// Fewest points for which multimask output applies.
    #[serde(default = "one")]
    pub multimask_min_pt_num: usize,
    /// Most points for which multimask output applies.
    #[serde(default = "one")]
    pub multimask_max_pt_num: usize,
    /// Multimask output also on tracked frames.
    #[serde(default)]
    pub multimask_output_for_tracking: bool,
    /// The object pointer comes from the chosen multimask token.
    #[serde(default)]
    pub use_multimask_token_for_obj_ptr: bool,
    /// IoU head output through a sigmoid.
    #[serde(default)]
    pub iou_prediction_use_sigmoid: bool,
    /// Stride between the previous frames kept in memory.
    #[serde(default = "one")]
    pub memory_temporal_stride_for_eval: usize,
    /// Make object masks non-overlapping before encoding (multi-object).
    #[serde(default)]
    pub non_overlap_masks_for_mem_enc: bool,
    /// Object pointers join the memory as extra tokens.
    #[serde(default)]
    pub use_obj_ptrs_in_encoder: bool,
    /// Most object pointers in memory attention.
    #[serde(default = "d_max_obj_ptrs")]
    pub max_obj_ptrs_in_encoder: usize,
    /// Add a temporal encoding to object pointers.
    #[serde(default = "default_true")]
    pub add_tpos_enc_to_obj_ptrs: bool,
    /// Project that temporal encoding with a linear layer.
    #[serde(default)]
    pub proj_tpos_enc_in_obj_ptrs: bool,
    /// Signed (past/future) temporal distance for pointers.
    #[serde(default)]
    pub use_signed_tpos_enc_to_obj_ptrs: bool,
    /// At inference, only pointers of past frames.
    #[serde(default)]
    pub only_obj_ptrs_in_the_past_for_eval: bool,
    /// Predict an object-presence score.
    #[serde(default)]
    pub pred_obj_scores: bool,
    /// The object-score head is an MLP (else linear).
    #[serde(default)]
    pub pred_obj_scores_mlp: bool,
    /// Without an object, the pointer is the learned `no_obj_ptr`.
    #[serde(default)]
    pub fixed_no_obj_ptr: bool,
    /// Blend towards `no_obj_ptr` by the object probability.
    #[serde(default)]
    pub soft_no_obj_ptr: bool,
    /// The pointer projection is an MLP (else linear).
    #[serde(default)]
    pub use_mlp_for_obj_ptr_proj: bool,
    /// Add a learned embedding to memories of frames without object (SAM2.1).
    #[serde(default)]
    pub no_obj_embed_spatial: bool,
    /// Mask decoder overrides (`build_sam2` sets dynamic multimask).
    #[serde(default)]
    pub sam_mask_decoder_extra_args: Option<MaskDecoderExtraArgs>,
    /// `torch.compile` switch of the reference; ignored here.
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
    /// A config that passes never panics while the model is built or run: every value
    /// that would divide by zero, underflow or index out of range is refused here.
    pub fn validate(&self) -> Result<()> {
        let s = self.image_size;
        if s == 0 || !s.is_multiple_of(32) {
            return Err(Error::Config(format!(
                "image_size must be a positive multiple of 32, got {s}"
            )));
        }
        if self.backbone_stride == 0 || !s.is_multiple_of(self.backbone_stride) {
            return Err(Error::Config(format!(
                "image_size {s} is not a multiple of backbone_stride {}",
                self.backbone_stride
            )));
        }
        let channels = self.validate_trunk()?;
        self.validate_neck(&channels)?;
        self.validate_memory_path()?;
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
        for (name, v) in [
            ("sigmoid_scale_for_mem_enc", self.sigmoid_scale_for_mem_enc),
            ("sigmoid_bias_for_mem_enc", self.sigmoid_bias_for_mem_enc),
        ] {
            if !v.is_finite() {
                return Err(Error::Config(format!("{name} must be finite, got {v}")));
            }
        }
        let extra = self.mask_decoder_extra_args();
        if !extra.dynamic_multimask_stability_delta.is_finite() || !extra.dynamic_multimask_stability_thresh.is_finite()
        {
            return Err(Error::Config(
                "sam_mask_decoder_extra_args: stability delta and thresh must be finite".into(),
            ));
        }
        Ok(())
    }

    /// The Hiera trunk: stage sizes, the per-stage dims and heads it derives (`dim_mul`,
    /// `head_mul`), windows. Returns the stage channels, lowest resolution first.
    fn validate_trunk(&self) -> Result<Vec<usize>> {
        let t = &self.image_encoder.trunk;
        if t.stages.is_empty() || t.stages.len() != t.window_spec.len() {
            return Err(Error::Config(format!(
                "trunk.stages ({}) and trunk.window_spec ({}) must have the same non-zero length",
                t.stages.len(),
                t.window_spec.len()
            )));
        }
        if let Some(i) = t.stages.iter().position(|&n| n == 0) {
            return Err(Error::Config(format!(
                "trunk.stages[{i}] is 0; every stage needs at least one block"
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
        for (name, v) in [("dim_mul", t.dim_mul), ("head_mul", t.head_mul)] {
            if !v.is_finite() || v <= 0.0 {
                return Err(Error::Config(format!(
                    "trunk.{name} must be a positive number, got {v}"
                )));
            }
        }
        // The dims and heads Hiera derives stage by stage, as its constructor does.
        let (mut dim, mut heads) = (t.embed_dim, t.num_heads);
        let mut channels = Vec::with_capacity(t.stages.len());
        for stage in 0..t.stages.len() {
            if stage > 0 {
                dim = (dim as f64 * t.dim_mul) as usize;
                heads = (heads as f64 * t.head_mul) as usize;
            }
            if dim == 0 || heads == 0 {
                return Err(Error::Config(format!(
                    "trunk stage {stage} gets dim {dim} with {heads} heads (embed_dim {}, num_heads {}, dim_mul {}, \
                     head_mul {}); both must stay > 0",
                    t.embed_dim, t.num_heads, t.dim_mul, t.head_mul
                )));
            }
            if dim % heads != 0 {
                return Err(Error::Config(format!(
                    "trunk stage {stage}: dim {dim} is not divisible by its {heads} heads"
                )));
            }
            channels.push(dim);
        }
        channels.reverse();
        if t.window_spec[0] == 0 {
            return Err(Error::Config(
                "trunk.window_spec[0] must be > 0 (it sizes pos_embed_window)".into(),
            ));
        }
        if t.window_pos_embed_bkg_spatial_size.contains(&0) {
            return Err(Error::Config(
                "trunk.window_pos_embed_bkg_spatial_size must be > 0".into(),
            ));
        }
        // A pooling block keeps the previous stage's window, shrunk by the query stride.
        for (j, &w) in t.window_spec.iter().take(t.q_pool).enumerate() {
            if w != 0 && w < t.q_stride[0] {
                return Err(Error::Config(format!(
                    "trunk.window_spec[{j}] = {w} is smaller than q_stride {}; the pooled window would be empty",
                    t.q_stride[0]
                )));
            }
        }
        Ok(channels)
    }

    /// The FPN neck against the trunk it reads.
    fn validate_neck(&self, trunk_channels: &[usize]) -> Result<()> {
        let t = &self.image_encoder.trunk;
        let neck = &self.image_encoder.neck;
        let expected_levels = if t.return_interm_layers { t.stages.len() } else { 1 };
        if neck.backbone_channel_list.len() != expected_levels {
            return Err(Error::Config(format!(
                "neck.backbone_channel_list has {} entries but the trunk returns {expected_levels} levels",
                neck.backbone_channel_list.len()
            )));
        }
        let trunk_channels = if t.return_interm_layers {
            trunk_channels
        } else {
            &trunk_channels[..1]
        };
        if neck.backbone_channel_list != trunk_channels {
            return Err(Error::Config(format!(
                "neck.backbone_channel_list {:?} does not match the trunk's channels {trunk_channels:?}",
                neck.backbone_channel_list
            )));
        }
        let c = neck.d_model;
        if c == 0 || !c.is_multiple_of(8) {
            return Err(Error::Config(format!(
                "neck.d_model (hidden_dim) must be a positive multiple of 8, got {c}"
            )));
        }
        // The lateral convs must keep the map size: the top-down path adds maps of equal size.
        if neck.kernel_size == 0 || neck.stride != 1 || neck.kernel_size != 2 * neck.padding + 1 {
            return Err(Error::Config(format!(
                "neck convs must keep the map size (stride 1, kernel_size = 2·padding + 1), got kernel_size {}, \
                 stride {}, padding {}",
                neck.kernel_size, neck.stride, neck.padding
            )));
        }
        let pe = &neck.position_encoding;
        if pe.num_pos_feats == 0 || !pe.num_pos_feats.is_multiple_of(2) {
            return Err(Error::Config(
                "position_encoding.num_pos_feats must be even and > 0".into(),
            ));
        }
        if pe.num_pos_feats != c {
            return Err(Error::Config(format!(
                "neck.position_encoding.num_pos_feats {} must equal neck.d_model {c}",
                pe.num_pos_feats
            )));
        }
        if self.image_encoder.scalp >= neck.backbone_channel_list.len() {
            return Err(Error::Config("image_encoder.scalp removes every feature level".into()));
        }
        if self.use_high_res_features_in_sam && neck.backbone_channel_list.len() - self.image_encoder.scalp < 3 {
            return Err(Error::Config(
                "use_high_res_features_in_sam needs 3 feature levels after scalp".into(),
            ));
        }
        Ok(())
    }

    /// Memory attention and memory encoder: head counts, rates, strides and the memory
    /// dim the object pointers are split by.
    fn validate_memory_path(&self) -> Result<()> {
        let c = self.hidden_dim();
        let ma = &self.memory_attention;
        for (name, a) in [
            ("self_attention", &ma.layer.self_attention),
            ("cross_attention", &ma.layer.cross_attention),
        ] {
            if a.embedding_dim == 0 || a.num_heads == 0 || a.downsample_rate == 0 {
                return Err(Error::Config(format!(
                    "memory_attention.layer.{name}: embedding_dim, num_heads and downsample_rate must be > 0"
                )));
            }
            let internal = a.embedding_dim / a.downsample_rate;
            if internal == 0 || internal % a.num_heads != 0 {
                return Err(Error::Config(format!(
                    "memory_attention.layer.{name}: embedding_dim {} / downsample_rate {} = {internal} is not a \
                     positive multiple of num_heads {}",
                    a.embedding_dim, a.downsample_rate, a.num_heads
                )));
            }
            if a.uses_rope() && (internal / a.num_heads) % 4 != 0 {
                return Err(Error::Config(format!(
                    "memory_attention.layer.{name}: axial RoPE needs a head dim divisible by 4, got {}",
                    internal / a.num_heads
                )));
            }
            if a.kv_in_dim == Some(0) {
                return Err(Error::Config(format!(
                    "memory_attention.layer.{name}.kv_in_dim must be > 0"
                )));
            }
        }
        let me = &self.memory_encoder;
        if me.out_dim == 0 || me.in_dim == 0 {
            return Err(Error::Config("memory_encoder.in_dim and out_dim must be > 0".into()));
        }
        let md = &me.mask_downsampler;
        if md.kernel_size == 0 || md.stride < 2 || md.total_stride < md.stride {
            return Err(Error::Config(format!(
                "memory_encoder.mask_downsampler needs kernel_size > 0, stride >= 2 and total_stride >= stride \
                 (got {}, {}, {})",
                md.kernel_size, md.stride, md.total_stride
            )));
        }
        // Each conv must divide the map size by exactly `stride` (a kernel wider than the
        // padded map would not even run): 2·padding < kernel_size ≤ stride + 2·padding.
        if md.kernel_size <= 2 * md.padding || md.kernel_size > md.stride + 2 * md.padding {
            return Err(Error::Config(format!(
                "memory_encoder.mask_downsampler: kernel_size {} with padding {} does not downsample by stride {}",
                md.kernel_size, md.padding, md.stride
            )));
        }
        if md.total_stride != self.backbone_stride {
            return Err(Error::Config(format!(
                "memory_encoder.mask_downsampler.total_stride {} must equal backbone_stride {} (the mask memory is \
                 added to the image features)",
                md.total_stride, self.backbone_stride
            )));
        }
        let mut p = 1usize;
        while p < md.total_stride {
            p = p.saturating_mul(md.stride);
        }
        if p != md.total_stride {
            return Err(Error::Config(format!(
                "memory_encoder.mask_downsampler.total_stride {} is not a power of stride {}",
                md.total_stride, md.stride
            )));
        }
        let cx = &me.fuser.layer;
        if cx.dim == 0 || cx.kernel_size == 0 || cx.kernel_size != 2 * cx.padding + 1 {
            return Err(Error::Config(format!(
                "memory_encoder.fuser.layer needs dim > 0 and a size-keeping depthwise conv (kernel_size = \
                 2·padding + 1), got dim {}, kernel_size {}, padding {}",
                cx.dim, cx.kernel_size, cx.padding
            )));
        }
        let pe = &me.position_encoding;
        if pe.num_pos_feats == 0 || !pe.num_pos_feats.is_multiple_of(2) {
            return Err(Error::Config(
                "memory_encoder.position_encoding.num_pos_feats must be even and > 0".into(),
            ));
        }
        // `SAM2Base.mem_dim`; object pointers (C wide) are split into C / mem_dim tokens.
        let mem_dim = if me.out_dim != me.in_dim { me.out_dim } else { c };
        if self.use_obj_ptrs_in_encoder && mem_dim < c && !c.is_multiple_of(mem_dim) {
            return Err(Error::Config(format!(
                "hidden_dim {c} is not a multiple of the memory dim {mem_dim} (object pointers are split into \
                 hidden_dim / mem_dim tokens)"
            )));
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
        assert_eq!(c.image_encoder.neck.fpn_interp_model, FpnInterp::Bilinear);
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
