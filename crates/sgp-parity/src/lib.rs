//! The parity runner: proves, case by case, that our SAM2 (and the SGP path built on it)
//! computes the same function as the official PyTorch code. Dev-only (`publish = false`):
//! the library crates carry no test harness in their public API.
//!
//! A case is a folder with `case.json`, `config.json`, weights and `io.safetensors`
//! (format: `shared/specs/sam2-parity-fixtures.md`, summarised in `docs/`). For each case
//! the runner computes every output its kind defines, compares those the case holds as
//! `out.<name>` under the pass rule ([`compare`]), and optionally saves all of them.
//!
//! New kinds go into the [`kinds`] registry: one module with a `register` function.
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
pub mod kinds;
mod runner;

pub use case::{Case, DEFAULT_RTOL};
pub use compare::{compare, TensorReport};
pub use error::{Error, Result};
pub use kinds::{KindFn, KindSpec, Registry};
pub use runner::{compute_outputs, discover_cases, run_case, run_dir, run_dir_with, save_outputs, CaseReport, Summary};
