//! Errors of the facade: where a model comes from and why it could not be had, and why a
//! pipeline refused its input.

use std::path::PathBuf;

/// Everything the facade can fail with; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model code refused its input or failed.
    #[error(transparent)]
    Sam2(#[from] sgp_sam2::Error),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing images, volumes and datasets.
    #[error(transparent)]
    Data(#[from] sgp_data::DataError),

    /// The support pool, selection, PMG or the 3D memory bank failed (`sgp-memory`).
    #[error(transparent)]
    Memory(#[from] sgp_memory::Error),

    /// The SGP head (PMA, hierarchical decoder) failed or its weights do not fit (`sgp-pma`).
    #[error(transparent)]
    Pma(#[from] sgp_pma::PmaError),

    /// Metrics or reports failed (`sgp-eval`).
    #[error(transparent)]
    Eval(#[from] sgp_eval::EvalError),

    /// A file system operation failed.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },

    /// A pipeline's input (prompt, slice index, option) is not usable; the message says why.
    #[error("{0}")]
    Input(String),

    /// The requested compute device cannot be had (`--device`).
    #[error("{0}")]
    Device(String),

    /// `--weights` is neither a path nor a repo id.
    #[error(
        "`{0}` is neither an existing file or folder nor a hub repo id (`owner/name`, \
         optionally `owner/name@revision`)"
    )]
    BadWeightsSpec(String),

    /// A weights file whose contents match no known format.
    #[error("cannot tell the weights format of {path}: {reason}")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// Original-format weights whose name implies no config.
    #[error("{0}")]
    NeedConfig(String),

    /// Offline, and the file is not cached.
    #[error(
        "`{repo}`: `{file}` is not in the local cache and the hub is offline \
         (HF_HUB_OFFLINE is set or --offline was given). Download it once with network \
         access, or pass a local path with --weights."
    )]
    NotCached {
        /// The repo id.
        repo: String,
        /// The file in it.
        file: String,
    },

    /// The hub cannot be reached and the file is not cached.
    #[error(
        "cannot reach the hub at {endpoint} for `{repo}` ({detail}), and `{file}` is not \
         cached. Check the network or HF_ENDPOINT, or pass a local path with --weights."
    )]
    Unreachable {
        /// The repo id.
        repo: String,
        /// The file in it.
        file: String,
        /// The hub address tried.
        endpoint: String,
        /// The transport's error.
        detail: String,
    },

    /// The hub answered with an error.
    #[error("hub: {0}")]
    Hub(String),

    /// A repo id was given to a build without the `hub` feature.
    #[error("the `hub` feature is off: `{0}` can only be loaded from a local path")]
    HubDisabled(String),
}

/// The facade's result type.
pub type Result<T> = std::result::Result<T, Error>;
