//! The crate's error type: every failure on user input is one of these, never a panic.

use std::path::PathBuf;

/// Errors of metric computation, report writing and folder evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Prediction and ground truth (or image) do not share a grid.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Spacing, tolerance or label arguments that make no sense.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A folder or file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The folder or file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A prediction, label or image file that `sgp-data` could not read.
    #[error("reading {path}: {source}")]
    Data {
        /// The file.
        path: PathBuf,
        /// Why `sgp-data` refused it.
        #[source]
        source: sgp_data::DataError,
    },
    /// Two files in one folder name the same case (`a.nii` and `a.nii.gz`).
    #[error("duplicate case `{case}` in {dir}: {first} and {second}")]
    DuplicateCase {
        /// The case name.
        case: String,
        /// The folder.
        dir: PathBuf,
        /// The first file name.
        first: String,
        /// The second file name.
        second: String,
    },
    /// Nothing to evaluate.
    #[error("no case matched between {pred} and {gt}")]
    NoMatchedCases {
        /// The predictions folder.
        pred: PathBuf,
        /// The ground-truth folder.
        gt: PathBuf,
    },
    /// Encoding a report or a picture failed.
    #[error("encoding {what}: {message}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The encoder's message.
        message: String,
    },
    /// An evaluation of one case failed; the case name gives the context.
    #[error("case `{case}`: {source}")]
    Case {
        /// The case name.
        case: String,
        /// What failed.
        #[source]
        source: Box<EvalError>,
    },
}

impl EvalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn in_case(self, case: &str) -> Self {
        EvalError::Case {
            case: case.to_string(),
            source: Box::new(self),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
