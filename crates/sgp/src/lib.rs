//! SAM2-SGP: SAM2.1 with support-set guided prompting, in Rust.
//!
//! This facade composes the workspace crates and adds what users reach for first:
//! loading official SAM2/SAM2.1 weights by hub repo id or path, in any of their formats.
//!
//! The crate root holds loading ([`load_pretrained`], [`FromPretrained`]) and devices
//! ([`select_device`]); the namespaces are the SGP model ([`model`], [`loss`]), training
//! ([`train`], [`augment`], [`optim`], [`checkpoint`]), inference ([`predictor`],
//! [`pipeline`], [`predict_to_file`]) and evaluation ([`evaluate`]). The workspace crates
//! are re-exported as [`sam2`], [`lora`], [`memory`], [`pma`], [`kernels`], [`data`] and
//! [`eval`].
//!
//! ```rust
//! use sgp::{select_device, WeightsSpec};
//! let device = select_device(Some("cpu"))?;
//! assert_eq!(sgp::device_name(&device), "cpu");
//! // A hub repo id (an existing path would win and be `WeightsSpec::Local`).
//! let spec = WeightsSpec::parse("facebook/sam2.1-hiera-tiny@main")?;
//! assert!(matches!(spec, WeightsSpec::Hub { revision: Some(_), .. }));
//! # Ok::<(), sgp::Error>(())
//! ```
//!
//! Loading official weights (downloads on first use, then reads the hub cache):
//!
//! ```no_run
//! use sgp::prelude::*;
//! let model = Sam2Model::from_pretrained("facebook/sam2.1-hiera-tiny")?;
//! # Ok::<(), sgp::Error>(())
//! ```

#![warn(missing_docs)]

pub mod augment;
pub mod checkpoint;
mod device;
mod error;
pub mod evaluate;
#[cfg(feature = "hub")]
pub mod hub;
pub mod loss;
pub mod model;
mod model_params;
pub mod optim;
pub mod pipeline;
pub mod predictor;
mod predictor_files;
mod pretrained;
pub mod train;
mod train_error;

pub use device::{cuda_compiled, device_name, select_device, DeviceSpec};
pub use error::{Error, Result};
pub use model_params::{hash_tensors, tensor_bytes};
pub use predictor_files::{
    load_run, load_support_dataset, predict_to_file, predictor_for_head, HeadChoice, LoadedRun, PredictOutcome,
    PredictRequest,
};
pub use pretrained::{
    load_pretrained, preset_from_file_name, FromPretrained, LoadOptions, Pretrained, WeightsFormat, WeightsSpec,
    OFFICIAL_REPOS,
};
pub use train_error::TrainError;

pub use sgp_data as data;
pub use sgp_eval as eval;
pub use sgp_kernels as kernels;
pub use sgp_lora as lora;
pub use sgp_memory as memory;
pub use sgp_pma as pma;
pub use sgp_sam2 as sam2;

/// `use sgp::prelude::*;` brings the model and `from_pretrained` into scope.
pub mod prelude {
    pub use crate::{FromPretrained, LoadOptions};
    pub use sgp_sam2::Sam2Config;
    pub use sgp_sam2::Sam2Model;
}
