//! The seam through which adapters (LoRA, in `sgp-lora`) reach SAM2's linear layers
//! without `sgp-sam2` depending on them.
//!
//! Every linear layer that adapters may target is an [`AdaptableLinear`]. Models expose
//! them by their checkpoint path (e.g. `image_encoder.trunk.blocks.3.attn.qkv`), so an
//! adapter crate can select layers by pattern, attach a delta, merge it into the base
//! weight, and detach it again.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};

/// An additive low-rank (or any) correction to a linear layer's output.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// The delta added to `base(x)`; same shape as the base output.
    fn delta(&self, x: &Tensor) -> Result<Tensor>;
}

/// A linear layer `y = x Wᵀ + b (+ adapter(x))`, loaded from `{path}.weight`/`{path}.bias`.
#[derive(Debug, Clone)]
pub struct AdaptableLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl AdaptableLinear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`, without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
        }
    }

    /// Loads `weight` `[out, in]` and `bias` `[out]` like `nn.Linear(in, out)`.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, vb: candle_nn::VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self::new(weight, bias))
    }

    /// The base weight `[out, in]` (merged adapters included).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The attached adapter, if any.
    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    /// Attaches (`Some`) or detaches (`None`) an adapter; the base weight is untouched.
    pub fn set_adapter(&mut self, adapter: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = adapter;
    }

    /// Replaces the base weight (used to merge / unmerge adapters). The shape must match.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight.dims() {
            candle_core::bail!(
                "set_weight: shape {:?} does not match {:?}",
                weight.dims(),
                self.weight.dims()
            );
        }
        self.weight = weight;
        Ok(())
    }

    /// The base layer alone, without the adapter.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let params: Vec<&Tensor> = std::iter::once(x)
            .chain(Some(&self.weight))
            .chain(self.bias.as_ref())
            .collect();
        if params
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
        {
            // One gemm with the bias fused; in training, a backward that skips the
            // gradients of frozen weights (candle's matmul computes them regardless).
            return sgp_kernels::linear::linear(x, &self.weight, self.bias.as_ref())
                .map_err(crate::ops::kernel_err("linear"));
        }
        let w = self.weight.t()?;
        let y = match *x.dims() {
            [b1, b2, m, k] => x.reshape((b1 * b2 * m, k))?.matmul(&w)?.reshape((b1, b2, m, ()))?,
            [b1, b2, b3, m, k] => x
                .reshape((b1 * b2 * b3 * m, k))?
                .matmul(&w)?
                .reshape((b1, b2, b3, m, ()))?,
            [bsize, m, k] => x.reshape((bsize * m, k))?.matmul(&w)?.reshape((bsize, m, ()))?,
            _ => x.matmul(&w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Module for AdaptableLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        match &self.adapter {
            Some(a) => y + a.delta(x)?,
            None => Ok(y),
        }
    }
}

/// Models that expose their adaptable layers by checkpoint path.
pub trait AdaptableModel {
    /// Every adaptable linear layer with its full checkpoint path (without `.weight`).
    fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)>;
}
