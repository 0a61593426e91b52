//! SGP's pseudo-mask attention (PMA) and hierarchical full-resolution decoder.
//!
//! Given the PMG outputs of a query (memory-conditioned features `F'` and the pseudo-mask
//! `y0`, from `sgp-memory`), [`SgpHead::forward`]
//! 1. takes the box of `y0_highres > 0` ([`box_from_pseudo_mask`]); without one, the
//!    pseudo-mask is the output;
//! 2. runs [`PseudoMaskAttention`]: masked self-attention over `F'` with the key bias
//!    `ln max(p, ε)` (`sgp_kernels::masked_attention`), `Z = Attn ⊙ p`,
//!    `F'' = F' + γ·Z` with γ = 0 at start;
//! 3. runs SAM2's prompt encoder + mask decoder on `F''` with the box (stage 1, S/4), and
//!    the [`HierarchicalDecoder`] (stage 2) for `ŷ = upsample(stage 1) + R` at S×S, with
//!    R's last layer zero at start.
//!
//! An untrained head is therefore exactly the `sgp_init` parity pipeline (official SAM2
//! weights give a working prompt-free segmenter). Every op on the path has a backward.
//!
//! Parameters (f32), [`SgpHeadConfig::default`], C = 256 (hiera_t, s, b+ and l all have
//! `hidden_dim` 256; the count does not depend on the trunk):
//!
//! | part | parameters |
//! |---|---:|
//! | PMA (`pma.*`: norm, q/k/v/out projections, γ) | 263,681 |
//! | decoder (`decoder.*`) | 140,617 |
//! | total | 404,298 |
//!
//! Weights live in their own safetensors file ([`SgpHead::save`] / [`SgpHead::load`]),
//! beside the SAM2 checkpoint, with the configuration in the metadata.
//!
//! ```rust
//! use candle_core::{Device, Tensor};
//! use sgp_pma::{box_from_pseudo_mask, HeadDims, SgpHead, SgpHeadConfig};
//!
//! // The box prompt of a pseudo-mask: foreground rows 1..=2, columns 2..=4; the second
//! // item holds no object, so it gets no box (its pseudo-mask is the answer).
//! let mut logits = vec![-1f32; 2 * 8 * 8];
//! for r in 1..=2 {
//!     for c in 2..=4 {
//!         logits[r * 8 + c] = 1.0;
//!     }
//! }
//! let y0 = Tensor::from_vec(logits, (2, 1, 8, 8), &Device::Cpu)?;
//! assert_eq!(box_from_pseudo_mask(&y0)?, [Some([2.0, 1.0, 4.0, 2.0]), None]);
//!
//! // A fresh head for SAM2.1 (C = 256, 4 mask tokens, high-res features).
//! let dims = HeadDims { hidden_dim: 256, num_mask_tokens: 4, use_high_res_features: true };
//! let (head, _vars) = SgpHead::init(&SgpHeadConfig::default(), dims, &Device::Cpu, 0)?;
//! let (pma, decoder) = head.num_parameters();
//! assert!(pma + decoder < 1_000_000); // a few hundred thousand, against SAM2's tens of millions
//! # Ok::<(), sgp_pma::PmaError>(())
//! ```

#![warn(missing_docs)]

mod attention;
mod boxes;
mod decoder;
mod error;
mod fast;
mod head;
mod layers;

pub use attention::{AttentionBackend, MaskMode, PmaConfig, PmaOutput, PseudoMaskAttention};
pub use boxes::box_from_pseudo_mask;
pub use decoder::{DecoderConfig, HeadDims, HierarchicalDecoder, Stage2Inputs};
pub use error::{PmaError, Result};
pub use head::{PmgParts, SgpHead, SgpHeadConfig, SgpOutput, FILE_FORMAT};
pub use layers::{Conv3x3, Linear};
