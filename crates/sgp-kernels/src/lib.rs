//! Tensor ops that candle lacks, written to match PyTorch where PyTorch defines them.
//!
//! - [`resize`]: `F.interpolate` bicubic (align_corners=False, A=-0.75) and bilinear with
//!   `antialias=True`, bit-for-bit in spirit with ATen's CPU kernels.
//! - [`masked_attention`]: attention with a probability-map key bias (soft) or key mask
//!   (hard), tiled with an online softmax; CPU and, under feature `cuda`, CUDA; with backward.
//! - [`testing`]: the comparison helpers the workspace's tests share.

pub mod error;
pub mod masked_attention;
pub mod resize;
pub mod testing;

pub use error::{Error, Result};
