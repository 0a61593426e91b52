//! SAM2 / SAM2.1 in candle.
//!
//! Every module mirrors one component of Meta's `sam2` package, and every `VarBuilder`
//! path equals the official checkpoint key, so an official `state_dict` loads as is.
//! Numerical faithfulness is proven by the parity fixtures (the dev-only `sgp-parity`
//! crate, `cargo xtask parity`).

pub mod adapt;
pub mod config;
pub mod error;
pub mod hiera;
pub mod image_encoder;
pub mod mask_decoder;
pub mod memory_attention;
pub mod memory_encoder;
pub mod model;
pub mod neck;
pub mod ops;
pub mod position_encoding;
pub mod preprocess;
pub mod prompt_encoder;
pub mod propagation;
pub mod rope;
pub mod sam_heads;
pub mod track;
pub mod transformer;
pub mod transformers_format;
pub mod weights;

pub use adapt::{AdaptableLinear, AdaptableModel, LinearAdapter};
pub use config::{
    FpnInterp, FpnNeckConfig, FuseType, HieraConfig, ImageEncoderConfig, MaskDecoderExtraArgs,
    PositionEmbeddingSineConfig, Sam2Config, PRESET_NAMES,
};
pub use error::{Error, Result};
pub use image_encoder::BackboneOutput;
pub use mask_decoder::{MaskDecoder, MaskDecoderConfig, MaskDecoderOutput, Multimask, PredictedMasks};
pub use memory_attention::{MemoryAttention, MemoryAttentionConfig};
pub use memory_encoder::{MemoryEncoder, MemoryEncoderConfig, MemoryEncoderOutput};
pub use model::{ImageEmbedding, Prediction, PreparedFeatures, PromptInput, Sam2Model};
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
    config_from_transformers_json, load_transformers, looks_like_transformers, LoadedTransformers, TransformersModel,
};
pub use weights::{detect_format, load_state_dict, StrictWeights, WeightsFileFormat};
