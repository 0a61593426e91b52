//! Errors of the SAM2 crate. User input (configs, weights, prompts, images) never panics:
//! it comes back as one of these.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid config: {0}")]
    Config(String),

    /// One error lists every problem with a checkpoint, so a user fixes them in one go.
    #[error("weights do not match the model:{}", format_key_problems(.missing, .unexpected, .mismatched))]
    WeightKeys {
        missing: Vec<String>,
        unexpected: Vec<String>,
        /// (key, expected shape, found shape)
        mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    },

    #[error("cannot read weights {path}: {reason}")]
    WeightsFormat { path: PathBuf, reason: String },

    #[error("invalid input: {0}")]
    Input(String),
}

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
