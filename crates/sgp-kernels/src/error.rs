//! Errors of the kernels crate.

/// Why a kernel refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle op inside the kernel failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The inputs' shapes do not fit the op (the message names the tensor).
    #[error("shape error: {0}")]
    Shape(String),

    /// A dtype, device or configuration the kernel does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
