//! SAM2 / SAM2.1 in candle.
//!
//! Every component mirrors one module of Meta's `sam2` package, and every `VarBuilder`
//! path equals the official checkpoint key, so an official `state_dict` loads as is.
//! Numerical faithfulness is proven by the parity fixtures (the dev-only `sgp-parity`
//! crate, `cargo xtask parity`; format in `docs/parity-format.md`).
//!
//! The public surface is the crate root: [`Sam2Model`] and its [`Sam2Config`], the
//! image-predictor path ([`Sam2Model::encode_image`] / [`Sam2Model::predict`]), the
//! tracking seam ([`Tracker`], [`TrackRequest`]), volume propagation
//! ([`VolumePropagator`] with a pluggable [`MemoryBankPolicy`]), the one image transform
//! ([`Preprocess`]), strict weight loading ([`StrictWeights`], the transformers format)
//! and the LoRA seam ([`AdaptableLinear`], [`AdaptableModel`]). [`ops`] holds the
//! autograd-aware primitives that downstream layers share.
//!
//! A reduced SAM2.1 with every parameter zero runs end to end in milliseconds:
//!
//! ```rust
//! use candle_core::{DType, Device, Tensor};
//! use sgp_sam2::{PromptInput, Sam2Config, Sam2Model};
//!
//! let mut cfg = Sam2Config::preset("sam2.1_hiera_t")?.with_image_size(64)?;
//! let trunk = &mut cfg.image_encoder.trunk;
//! trunk.embed_dim = 16;
//! trunk.stages = vec![1, 2, 2, 1];
//! trunk.global_att_blocks = vec![4];
//! trunk.window_pos_embed_bkg_spatial_size = [5, 5];
//! trunk.window_spec = vec![8, 4, 6, 2];
//! cfg.image_encoder.neck.backbone_channel_list = vec![128, 64, 32, 16];
//!
//! let dev = Device::Cpu;
//! let model = Sam2Model::new(&cfg, candle_nn::VarBuilder::zeros(DType::F32, &dev))?;
//! let image = Tensor::zeros((3, 40, 50), DType::F32, &dev)?; // RGB in [0, 1], any size
//! let emb = model.encode_image(&image)?;
//! let prompt = PromptInput {
//!     points: Some((vec![[25.0, 20.0]], vec![1])),
//!     ..Default::default()
//! };
//! let pred = model.predict(&emb, &prompt, model.multimask(true))?;
//! assert_eq!(pred.mask_logits.dims(), [3, 40, 50]);
//! # Ok::<(), sgp_sam2::Error>(())
//! ```

#![warn(missing_docs)]

mod adapt;
mod config;
mod error;
mod hiera;
mod image_encoder;
mod mask_decoder;
mod memory_attention;
mod memory_encoder;
mod model;
mod neck;
pub mod ops;
mod position_encoding;
mod preprocess;
mod prompt_encoder;
mod propagation;
mod rope;
mod sam_heads;
mod track;
mod transformer;
mod transformers_format;
mod weights;

pub use adapt::{AdaptableLinear, AdaptableModel, LinearAdapter};
pub use config::{
    FpnInterp, FpnNeckConfig, FuseType, HieraConfig, ImageEncoderConfig, MaskDecoderExtraArgs,
    PositionEmbeddingSineConfig, Sam2Config, PRESET_NAMES,
};
pub use error::{Error, Result};
pub use image_encoder::{BackboneOutput, ImageEncoder};
pub use mask_decoder::{MaskDecoder, MaskDecoderConfig, MaskDecoderOutput, Multimask, PredictedMasks};
pub use memory_attention::{AttentionConfig, MemoryAttention, MemoryAttentionConfig, MemoryAttentionLayerConfig};
pub use memory_encoder::{
    CXBlockConfig, FuserConfig, MaskDownSamplerConfig, MemoryEncoder, MemoryEncoderConfig, MemoryEncoderOutput,
};
pub use model::{ImageEmbedding, Prediction, PreparedFeatures, PromptInput, Sam2Model};
pub use position_encoding::PositionEmbeddingSine;
pub use preprocess::{logits_to_size, Preprocess, IMAGE_MEAN, IMAGE_STD};
pub use propagation::{
    fill_holes_in_mask_scores, upscale_logits, Direction, MemoryBankPolicy, PolicyContext, Sam2Policy, SlicePrompt,
    SliceResult, SliceSource, VolumePropagator, VolumeSlices,
};
pub use sam_heads::{DecoderIntermediates, PointInputs, SamHeads, SamHeadsConfig, SamHeadsOutput, NO_OBJ_SCORE};
pub use track::{
    apply_non_overlapping_constraints, pooled_embedding, select_closest_cond_frames, FrameOutput, FramePrompt,
    MemoryBank, MemorySelection, TrackRequest, TrackStepOutput, Tracker,
};
pub use transformers_format::{
    config_from_transformers_json, convert_state_dict, load_transformers, looks_like_transformers, Converted,
    LoadedTransformers, TransformersModel,
};
pub use weights::{detect_format, load_state_dict, write_atomic, StrictWeights, WeightsFileFormat};
