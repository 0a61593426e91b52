//! Errors of the model, loss, training and checkpoint code: each says what is wrong and,
//! where it can, what to do.

use std::path::PathBuf;

/// Why a training run (or its model, loss, data or checkpoint) could not proceed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Loading or building SAM2 failed.
    #[error(transparent)]
    Sam2(#[from] sgp_sam2::Error),
    /// A pretrained-weights problem (format, hub, config).
    #[error(transparent)]
    Pretrained(#[from] crate::Error),
    /// A dataset problem (layout, IO, split).
    #[error(transparent)]
    Data(#[from] sgp_data::DataError),
    /// A LoRA problem (targets, files).
    #[error(transparent)]
    Lora(#[from] sgp_lora::LoraError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Tensors of the wrong shape reached a function.
    #[error("shape: {0}")]
    Shape(String),
    /// The run's configuration or arguments are invalid (checked before training).
    #[error("invalid training setup: {0}")]
    Config(String),
    /// A checkpoint does not fit this model or these base weights.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// A PMG / support-memory problem.
    #[error("support memory: {0}")]
    Memory(String),
    /// A PMA / decoder-head problem.
    #[error("SGP head: {0}")]
    Head(String),
}

/// Result of the training code.
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// An IO error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
