//! LoRA hyper-parameters.

use crate::error::{LoraError, Result};
use crate::target::Target;

/// Rank, scaling, dropout and targets of a set of LoRA adapters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank `r` of every adapter (A is `[r, in]`, B is `[out, r]`).
    pub rank: usize,
    /// The delta is scaled by `alpha / rank`, so changing the rank does not change the
    /// effective learning rate much (as in the LoRA paper and peft).
    pub alpha: f64,
    /// Dropout on the adapter's input, active only in training mode.
    pub dropout: f32,
    /// Layers to adapt; the first target matching a layer wins.
    pub targets: Vec<Target>,
    /// Seed of the Kaiming-uniform initialisation of A, so runs are reproducible.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// The paper's targets (q and v of every Hiera block) at rank 16, alpha 16.
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![Target::hiera_qv()],
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// Default targets (Hiera q and v) with the given rank and alpha.
    pub fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            ..Self::default()
        }
    }

    /// Replaces the default targets ([`Target::hiera_qv`]).
    pub fn with_targets(mut self, targets: Vec<Target>) -> Self {
        self.targets = targets;
        self
    }

    /// Dropout on the adapter input in training mode (0 = off).
    pub fn with_dropout(mut self, dropout: f32) -> Self {
        self.dropout = dropout;
        self
    }

    /// Seed of the A initialisation and of dropout, for reproducible runs.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// `alpha / rank`, the factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks rank > 0, a finite alpha, dropout in [0, 1) and non-empty targets.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(LoraError::InvalidConfig("rank must be positive".into()));
        }
        if !self.alpha.is_finite() {
            return Err(LoraError::InvalidConfig(format!(
                "alpha must be finite, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::InvalidConfig(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(LoraError::InvalidConfig("no targets".into()));
        }
        Ok(())
    }
}
