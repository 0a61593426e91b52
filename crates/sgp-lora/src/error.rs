//! Errors of the LoRA crate. Every user-facing failure (bad pattern, wrong base model,
//! truncated file, shape mismatch) is a variant here rather than a panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("invalid LoRA configuration: {0}")]
    InvalidConfig(String),

    #[error("invalid LoRA target `{spec}`: {reason}")]
    InvalidTarget { spec: String, reason: String },

    #[error("no adaptable layer of the model matches the LoRA targets {targets:?}")]
    NoMatchingLayer { targets: Vec<String> },

    #[error("layer `{path}` has {out_dim} outputs, which do not split into {chunks} equal fused parts")]
    IndivisibleOutput {
        path: String,
        out_dim: usize,
        chunks: usize,
    },

    #[error("layer `{path}` already carries an adapter; detach it first")]
    AlreadyAdapted { path: String },

    #[error("layer `{path}` is missing from the model or no longer carries this LoRA's adapter")]
    NotAttached { path: String },

    #[error("the adapters are already merged into the base weights")]
    AlreadyMerged,

    #[error("the adapters are not merged")]
    NotMerged,

    #[error(
        "the adapter file was trained on a different base model: its targeted base weights hash to \
         {expected}, this model's hash to {found}"
    )]
    BaseMismatch { expected: String, found: String },

    #[error("the adapter file targets layers {in_file:?}, but on this model its targets resolve to {in_model:?}")]
    TargetMismatch {
        in_file: Vec<String>,
        in_model: Vec<String>,
    },

    #[error("shape mismatch for `{name}`: the adapter file has {found:?}, the model needs {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("the adapter file lacks tensor `{0}`")]
    MissingTensor(String),

    #[error("the adapter file holds unexpected tensor `{0}`")]
    UnexpectedTensor(String),

    #[error("bad adapter file metadata: {0}")]
    BadMetadata(String),

    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LoraError>;
