//! Errors of the support-set path. Bad input (an empty pool, a class no support holds,
//! mismatched shapes) comes back as one of these, never as a panic.

use std::path::PathBuf;

/// Why a support-set operation could not proceed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The SAM2 model failed (bad features, config or weights).
    #[error(transparent)]
    Sam2(#[from] sgp_sam2::Error),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a cache file failed.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The support pool holds no item.
    #[error("the support pool is empty")]
    EmptyPool,

    /// No support of the pool has a mask of this class.
    #[error("no support holds class {class} (classes present: {present:?})")]
    ClassAbsent {
        /// The requested class.
        class: u32,
        /// The classes the pool's supports hold.
        present: Vec<u32>,
    },

    /// Supports hold the class, but every one of them was excluded (leave-one-out).
    #[error("no support qualifies for class {class}: {reason}")]
    NoQualifying {
        /// The requested class.
        class: u32,
        /// Why the candidates were excluded.
        reason: String,
    },

    /// Invalid input: a wrong shape, an empty mask set, a zero support size, ...
    #[error("invalid input: {0}")]
    Input(String),

    /// A cache entry could not be written (reading failures are recomputed, not errors).
    #[error("support cache: {0}")]
    Cache(String),
}

impl From<sgp_kernels::Error> for Error {
    fn from(e: sgp_kernels::Error) -> Self {
        match e {
            sgp_kernels::Error::Candle(c) => Self::Candle(c),
            other => Self::Input(other.to_string()),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
