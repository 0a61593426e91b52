//! SAM2 / SAM2.1 in candle.
//!
//! Every module mirrors one component of Meta's `sam2` package, and every `VarBuilder`
//! path equals the official checkpoint key, so an official `state_dict` loads as is.
//! Numerical faithfulness is proven by the parity fixtures (`parity` module,
//! `cargo xtask parity`).

pub mod adapt;
pub mod config;
pub mod error;
pub mod hiera;
pub mod image_encoder;
pub mod mask_decoder;
pub mod memory_attention;
pub mod memory_encoder;
pub mod model;
pub mod neck;
pub mod ops;
pub mod parity;
pub mod position_encoding;
pub mod prompt_encoder;
pub mod propagation;
pub mod rope;
pub mod sam_heads;
pub mod track;
pub mod transformer;
pub mod transformers_format;
pub mod weights;

pub use error::{Error, Result};
