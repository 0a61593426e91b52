//! The crate's error type: every failure on user data ends here, never in a panic.

use std::path::{Path, PathBuf};

/// Errors from reading, writing, checking and preprocessing medical data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A path that must exist does not.
    #[error("{path}: not found{}", hint_suffix(.hint))]
    NotFound {
        /// The file or folder.
        path: PathBuf,
        /// What was expected there (may be empty).
        hint: String,
    },
    /// The file exists but is not a valid NIfTI-1 file (truncated, bad header, bad type).
    #[error("{path}: not a readable NIfTI-1 file: {reason}")]
    Nifti {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file exists but is not a readable raster image.
    #[error("{path}: not a readable image: {reason}")]
    Image {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file extension this crate does not read or write.
    #[error("{path}: unsupported file type (expected .nii, .nii.gz, .png, .jpg, .jpeg, .bmp, .tif or .tiff)")]
    UnsupportedFormat {
        /// The file or folder.
        path: PathBuf,
    },
    /// Voxel values that are not a valid label map (negative, fractional, too large, or not in
    /// the dataset's definition).
    #[error("{path}: invalid label map: {reason}")]
    InvalidLabels {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Arrays whose shapes (or geometries) should agree but do not.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A dataset folder that does not have the expected layout.
    #[error("{path}: {reason}")]
    Layout {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A metadata file (`Info.cfg`, `dataset.json`, ...) that cannot be parsed.
    #[error("{path}: cannot parse: {reason}")]
    Parse {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A DICOM file that cannot be decoded, or a folder that is not one consistent series.
    #[error("{path}: DICOM: {reason}")]
    Dicom {
        /// The file, or the series folder for problems between files.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A bad argument (empty input, impossible split fractions, zero size, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound {
                path: path.to_path_buf(),
                hint: String::new(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
    pub(crate) fn nifti(path: &Path, reason: impl Into<String>) -> Self {
        DataError::Nifti {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
    pub(crate) fn image(path: &Path, reason: impl Into<String>) -> Self {
        DataError::Image {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
    pub(crate) fn labels(path: &Path, reason: impl Into<String>) -> Self {
        DataError::InvalidLabels {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
    pub(crate) fn layout(path: &Path, reason: impl Into<String>) -> Self {
        DataError::Layout {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
    pub(crate) fn parse(path: &Path, reason: impl Into<String>) -> Self {
        DataError::Parse {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, DataError>;
