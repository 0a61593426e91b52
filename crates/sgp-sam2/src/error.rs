//! Errors of the SAM2 crate. User input (configs, weights, prompts, images) never panics:
//! it comes back as one of these.

use std::path::PathBuf;

/// Every failure of the SAM2 crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor op failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A config that does not parse or describes no valid model.
    #[error("invalid config: {0}")]
    Config(String),

    /// One error lists every problem with a checkpoint, so a user fixes them in one go.
    #[error("weights do not match the model:{}", format_key_problems(.missing, .unexpected, .mismatched))]
    WeightKeys {
        /// Keys the model needs that the checkpoint lacks.
        missing: Vec<String>,
        /// Keys the checkpoint holds that the model does not use.
        unexpected: Vec<String>,
        /// (key, expected shape, found shape)
        mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    },

    /// A weights file in no format we read, or a corrupt one.
    #[error("cannot read weights {path}: {reason}")]
    WeightsFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A prompt, image or tensor argument of the wrong shape or range.
    #[error("invalid input: {0}")]
    Input(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn format_key_problems(
    missing: &[String],
    unexpected: &[String],
    mismatched: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    let mut s = String::new();
    if !missing.is_empty() {
        s.push_str(&format!("\n  missing ({}): {}", missing.len(), missing.join(", ")));
    }
    if !unexpected.is_empty() {
        s.push_str(&format!(
            "\n  unexpected ({}): {}",
            unexpected.len(),
            unexpected.join(", ")
        ));
    }
    for (k, want, got) in mismatched {
        s.push_str(&format!("\n  shape mismatch: {k}: expected {want:?}, found {got:?}"));
    }
    s
}
