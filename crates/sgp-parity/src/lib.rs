//! The parity runner: proves, case by case, that our SAM2 (and the SGP path built on it)
//! computes the same function as the official PyTorch code. Dev-only (`publish = false`):
//! the library crates carry no test harness in their public API.
//!
//! A case is a folder with `case.json`, `config.json`, weights and `io.safetensors`
//! (format, kinds and pass rule: `docs/parity-format.md` in the repository). For each case
//! the runner computes every output its kind defines, compares those the case holds as
//! `out.<name>` under the pass rule ([`compare`]), and optionally saves all of them.
//!
//! New kinds go into the [`Registry`] (`src/kinds/`: one module per family of kinds, each
//! with a `register` function; [`Registry::builtin`] lists them).
//!
//! The pass rule on its own, for a check outside the runner:
//!
//! ```rust
//! use candle_core::{Device, Tensor};
//! let reference = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
//! let ours = (&reference * 1.000_01)?;
//! let report = sgp_parity::compare("masks", &ours, &reference, sgp_parity::DEFAULT_RTOL, 0)?;
//! assert!(report.passed, "{report:?}");
//! let off = Tensor::new(&[[1f32, 2.0], [3.0, 5.0]], &Device::Cpu)?;
//! assert!(!sgp_parity::compare("masks", &off, &reference, sgp_parity::DEFAULT_RTOL, 0)?.passed);
//! # Ok::<(), sgp_parity::Error>(())
//! ```
//!
//! A directory of cases (what `cargo xtask parity --dir` runs):
//!
//! ```no_run
//! let summary = sgp_parity::run_dir(std::path::Path::new("fixtures/parity"), None)?;
//! assert_eq!(summary.failed, 0);
//! # Ok::<(), sgp_parity::Error>(())
//! ```

#![warn(missing_docs)]

mod case;
mod compare;
mod error;
mod kinds;
mod runner;

pub use case::{Case, DEFAULT_RTOL};
pub use compare::{compare, TensorReport};
pub use error::{Error, Result};
pub use kinds::{KindFn, KindSpec, Registry};
pub use runner::{compute_outputs, discover_cases, run_case, run_dir, run_dir_with, save_outputs, CaseReport, Summary};
