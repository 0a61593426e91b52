//! Errors of the parity runner. A case that cannot run becomes a failed report, never a
//! panic; these are the reasons.

use std::path::PathBuf;

/// Why a parity case or run could not proceed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model under test failed (bad config, weights or inputs).
    #[error(transparent)]
    Sam2(#[from] sgp_sam2::Error),

    /// A tensor operation of the runner itself failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `case.json` is not valid JSON.
    #[error("{path}: {source}")]
    Json {
        /// The `case.json` file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// The case folder is malformed: a missing input, an option of the wrong type, ...
    #[error("case {case}: {reason}")]
    Case {
        /// The case name (folder relative to the run directory).
        case: String,
        /// What is wrong.
        reason: String,
    },

    /// No kind of that name is registered.
    #[error("unknown kind {0:?}")]
    UnknownKind(String),

    /// `weights_format` names a format the runner cannot load.
    #[error("unsupported weights_format {0:?}")]
    UnsupportedFormat(String),

    /// A kind could not assemble its outputs.
    #[error("outputs: {0}")]
    Output(String),

    /// The run directory is missing, not a folder, or holds no case.
    #[error("{0}")]
    Dir(String),

    /// An error of another workspace crate a kind calls (sgp-memory, sgp-pma, ...).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// Wraps an error of another crate (`.map_err(Error::other)`), so that kinds built on
    /// other workspace crates need no variant of their own here.
    pub fn other(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Other(Box::new(e))
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
