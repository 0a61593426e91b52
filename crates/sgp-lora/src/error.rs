//! Errors of the LoRA crate. Every user-facing failure (bad pattern, wrong base model,
//! truncated file, shape mismatch) is a variant here rather than a panic.

use std::path::PathBuf;

/// Every way attaching, merging, saving or loading adapters can fail.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Rank, alpha, dropout or targets out of range.
    #[error("invalid LoRA configuration: {0}")]
    InvalidConfig(String),

    /// A target pattern that does not parse.
    #[error("invalid LoRA target `{spec}`: {reason}")]
    InvalidTarget {
        /// The pattern as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The targets select nothing on this model (a typo, or another architecture).
    #[error("no adaptable layer of the model matches the LoRA targets {targets:?}")]
    NoMatchingLayer {
        /// The target patterns.
        targets: Vec<String>,
    },

    /// A fused-layer target whose output does not split evenly.
    #[error("layer `{path}` has {out_dim} outputs, which do not split into {chunks} equal fused parts")]
    IndivisibleOutput {
        /// Checkpoint path of the layer.
        path: String,
        /// Its output features.
        out_dim: usize,
        /// The requested number of parts.
        chunks: usize,
    },

    /// Two adapter sets on one layer would silently add up.
    #[error("layer `{path}` already carries an adapter; detach it first")]
    AlreadyAdapted {
        /// Checkpoint path of the layer.
        path: String,
    },

    /// The model changed under the adapters (or another set replaced them).
    #[error("layer `{path}` is missing from the model or no longer carries this LoRA's adapter")]
    NotAttached {
        /// Checkpoint path of the layer.
        path: String,
    },

    /// `merge` twice would add the delta twice.
    #[error("the adapters are already merged into the base weights")]
    AlreadyMerged,

    /// `unmerge` without a `merge` before it.
    #[error("the adapters are not merged")]
    NotMerged,

    /// The file's base-weight fingerprint differs from the model's.
    #[error(
        "the adapter file was trained on a different base model: its targeted base weights hash to \
         {expected}, this model's hash to {found}"
    )]
    BaseMismatch {
        /// Hash stored in the file.
        expected: String,
        /// Hash of this model's targeted weights.
        found: String,
    },

    /// The file's targets resolve to other layers on this model.
    #[error("the adapter file targets layers {in_file:?}, but on this model its targets resolve to {in_model:?}")]
    TargetMismatch {
        /// Layers listed in the file.
        in_file: Vec<String>,
        /// Layers the targets select on this model.
        in_model: Vec<String>,
    },

    /// A tensor in the file has the wrong shape for this model.
    #[error("shape mismatch for `{name}`: the adapter file has {found:?}, the model needs {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },

    /// The file lacks an A or B the layers need.
    #[error("the adapter file lacks tensor `{0}`")]
    MissingTensor(String),

    /// The file holds a tensor no adapter uses (a different target set).
    #[error("the adapter file holds unexpected tensor `{0}`")]
    UnexpectedTensor(String),

    /// Missing or malformed header metadata.
    #[error("bad adapter file metadata: {0}")]
    BadMetadata(String),

    /// Reading or writing an adapter file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// The safetensors container is malformed.
    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),

    /// A tensor op failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`LoraError`].
pub type Result<T> = std::result::Result<T, LoraError>;
