//! Errors of the facade: where a model comes from and why it could not be had.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sam2(#[from] sgp_sam2::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "`{0}` is neither an existing file or folder nor a hub repo id (`owner/name`, \
         optionally `owner/name@revision`)"
    )]
    BadWeightsSpec(String),

    #[error("cannot tell the weights format of {path}: {reason}")]
    UnknownFormat { path: PathBuf, reason: String },

    #[error("{0}")]
    NeedConfig(String),

    #[error(
        "`{repo}`: `{file}` is not in the local cache and the hub is offline \
         (HF_HUB_OFFLINE is set or --offline was given). Download it once with network \
         access, or pass a local path with --weights."
    )]
    NotCached { repo: String, file: String },

    #[error(
        "cannot reach the hub at {endpoint} for `{repo}` ({detail}), and `{file}` is not \
         cached. Check the network or HF_ENDPOINT, or pass a local path with --weights."
    )]
    Unreachable {
        repo: String,
        file: String,
        endpoint: String,
        detail: String,
    },

    #[error("hub: {0}")]
    Hub(String),

    #[error("the `hub` feature is off: `{0}` can only be loaded from a local path")]
    HubDisabled(String),
}

pub type Result<T> = std::result::Result<T, Error>;
