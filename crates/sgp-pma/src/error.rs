//! Errors of the PMA / hierarchical-decoder crate. Bad input is an error, never a panic.

use std::path::PathBuf;

/// Everything that can go wrong in `sgp-pma`.
#[derive(Debug, thiserror::Error)]
pub enum PmaError {
    /// A tensor op failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A kernel from `sgp-kernels` rejected its input.
    #[error(transparent)]
    Kernel(#[from] sgp_kernels::Error),

    /// The SAM2 heads (stage 1) failed.
    #[error(transparent)]
    Sam2(#[from] sgp_sam2::Error),

    /// An input tensor has the wrong rank, shape or dtype.
    #[error("invalid input: {0}")]
    Input(String),

    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The head was built for another SAM2 model than the one it is run with.
    #[error("the SGP head was built for {expected}, but the SAM2 model has {found}")]
    ModelMismatch {
        /// What the head expects.
        expected: String,
        /// What the model provides.
        found: String,
    },

    /// A weights file does not match the head: every problem is listed at once.
    #[error("weights file {path} does not match the SGP head:\n  {}", problems.join("\n  "))]
    WeightsMismatch {
        /// The file.
        path: PathBuf,
        /// One line per missing, mis-shaped or unexpected tensor.
        problems: Vec<String>,
    },

    /// The file is not an SGP-head weights file (no or bad metadata).
    #[error("{path} is not an sgp-pma weights file: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },

    /// The safetensors container could not be read or written.
    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),
}

/// `Result` with [`PmaError`].
pub type Result<T> = std::result::Result<T, PmaError>;
