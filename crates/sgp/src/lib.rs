//! SAM2-SGP: SAM2.1 with support-set guided prompting, in Rust.
//!
//! This facade composes the workspace crates and adds what users reach for first:
//! loading official SAM2/SAM2.1 weights by hub repo id or path, in any of their formats.
//!
//! ```no_run
//! use sgp::prelude::*;
//! let model = Sam2Model::from_pretrained("facebook/sam2.1-hiera-tiny")?;
//! # Ok::<(), sgp::Error>(())
//! ```

pub mod augment;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod evaluate;
#[cfg(feature = "hub")]
pub mod hub;
pub mod loss;
pub mod model;
pub mod model_params;
pub mod optim;
pub mod pipeline;
pub mod predictor;
pub mod predictor_files;
pub mod pretrained;
pub mod train;
pub mod train_error;

pub use device::{select_device, DeviceSpec};
pub use error::{Error, Result};
pub use pretrained::{load_pretrained, LoadOptions, Pretrained, WeightsFormat, WeightsSpec};
pub use train_error::TrainError;

pub use sgp_data as data;
pub use sgp_eval as eval;
pub use sgp_kernels as kernels;
pub use sgp_lora as lora;
pub use sgp_sam2 as sam2;

/// `use sgp::prelude::*;` brings the model and `from_pretrained` into scope.
pub mod prelude {
    pub use crate::pretrained::{FromPretrained, LoadOptions};
    pub use sgp_sam2::config::Sam2Config;
    pub use sgp_sam2::model::Sam2Model;
}
