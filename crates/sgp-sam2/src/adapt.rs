//! The seam through which adapters (LoRA, in `sgp-lora`) reach SAM2's linear layers
//! without `sgp-sam2` depending on them.
//!
//! Every linear layer that adapters may target is an [`AdaptableLinear`]. Models expose
//! them by their checkpoint path (e.g. `image_encoder.trunk.blocks.3.attn.qkv`), so an
//! adapter crate can select layers by pattern, attach a delta, merge it into the base
//! weight, and detach it again.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
/// The activation an MLP's first layer applies ([`AdaptableLinear::forward_activated`]).
pub use sgp_kernels::activation::Activation;

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
    /// `Wᵀ`, made on the first few-row inference call (see `forward_base`).
    weight_t: std::sync::OnceLock<Tensor>,
}

impl AdaptableLinear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`, without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
            weight_t: std::sync::OnceLock::new(),
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
        self.weight_t = std::sync::OnceLock::new();
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
            if rows(x) <= sgp_kernels::linear::FEW_ROWS && crate::ops::untracked_cpu_f32(&params) {
                // A few rows (prompt tokens): gemm reads Wᵀ in place, where it would
                // re-pack W on every call. Frozen weights only (a Var's `set` would
                // leave the copy stale; it is tracked, so it never gets here).
                let wt = match self.weight_t.get() {
                    Some(wt) => wt,
                    None => {
                        let wt = self.weight.t()?.contiguous()?;
                        self.weight_t.get_or_init(|| wt)
                    }
                };
                return sgp_kernels::linear::linear_transposed(x, wt, self.bias.as_ref())
                    .map_err(crate::ops::kernel_err("linear"));
            }
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

    /// Whether a fused inference kernel may replace `forward` (plus `extra`, an operand
    /// of its own): no adapter, more than a few rows, every operand an untracked f32 CPU
    /// tensor.
    fn fusable(&self, x: &Tensor, extra: Option<&Tensor>) -> bool {
        let params: Vec<&Tensor> = [x, &self.weight]
            .into_iter()
            .chain(self.bias.as_ref())
            .chain(extra)
            .collect();
        self.adapter.is_none() && rows(x) > sgp_kernels::linear::FEW_ROWS && crate::ops::untracked_cpu_f32(&params)
    }

    /// `act(self.forward(x))`. Without an adapter, on untracked f32 CPU inputs of more
    /// than a few rows, the bias and activation run in one in-place pass over the product
    /// (an MLP's first layer: Hiera's, memory attention's, the decoder's).
    pub fn forward_activated(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        if self.fusable(x, None) {
            return sgp_kernels::linear::linear_activated(x, &self.weight, self.bias.as_ref(), act)
                .map_err(crate::ops::kernel_err("linear"));
        }
        act.apply(&self.forward(x)?)
    }

    /// The layer's output for an all-zero input row, `[1, out_dim]`: the bias (zeros
    /// without one) plus the adapter's delta, without a product (0·W is exactly 0).
    pub fn forward_zero_row(&self) -> Result<Tensor> {
        let out_dim = self.out_dim();
        let dev = self.weight.device();
        let base = match &self.bias {
            Some(b) => b.reshape((1, out_dim))?,
            None => Tensor::zeros((1, out_dim), self.weight.dtype(), dev)?,
        };
        match &self.adapter {
            Some(a) => base + a.delta(&Tensor::zeros((1, self.in_dim()), self.weight.dtype(), dev)?)?,
            None => Ok(base),
        }
    }

    /// `residual + self.forward(x)`. Without an adapter, on untracked f32 CPU inputs of
    /// more than a few rows, the output starts as `residual + bias` and the product
    /// accumulates onto it (no separate add).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.fusable(x, Some(residual)) {
            return sgp_kernels::linear::linear_residual(x, &self.weight, self.bias.as_ref(), residual)
                .map_err(crate::ops::kernel_err("linear"));
        }
        residual + self.forward(x)?
    }
}

/// The rows of `x` `[..., k]`: the product of its leading dims.
fn rows(x: &Tensor) -> usize {
    x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn few_row_inputs_follow_a_replaced_weight() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 32), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 48, &dev)?;
        let mut layer = AdaptableLinear::new(w.clone(), Some(b.clone()));
        // 3 rows take the transposed-weight path, 40 rows the plain one.
        for rows in [3usize, 40] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 32), &dev)?;
            let want = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
            assert!(
                sgp_kernels::testing::max_abs_diff(&layer.forward(&x)?, &want)
                    .map_err(crate::ops::kernel_err("test"))?
                    < 1e-4
            );
        }
        // The cached Wᵀ must not outlive the weight it was made from.
        let w2 = (&w * 2.0)?;
        layer.set_weight(w2.clone())?;
        let x = Tensor::randn(0f32, 1.0, (2, 32), &dev)?;
        let want = x.matmul(&w2.t()?)?.broadcast_add(&b)?;
        assert!(
            sgp_kernels::testing::max_abs_diff(&layer.forward(&x)?, &want).map_err(crate::ops::kernel_err("test"))?
                < 1e-4
        );
        // No input features: the bias rows.
        let empty = AdaptableLinear::new(
            Tensor::zeros((4, 0), DType::F32, &dev)?,
            Some(Tensor::ones(4, DType::F32, &dev)?),
        );
        let y: Vec<Vec<f32>> = empty.forward(&Tensor::zeros((2, 0), DType::F32, &dev)?)?.to_vec2()?;
        assert_eq!(y, vec![vec![1f32; 4]; 2]);
        Ok(())
    }

    /// A constant delta, to tell whether the adapter was applied before the activation.
    #[derive(Debug)]
    struct Shift(f32);

    impl LinearAdapter for Shift {
        fn delta(&self, x: &Tensor) -> Result<Tensor> {
            let n = 48;
            let mut dims = x.dims().to_vec();
            *dims.last_mut().unwrap() = n;
            Tensor::full(self.0, dims, x.device())
        }
    }

    #[test]
    fn activated_and_residual_forwards_equal_the_plain_forward() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 32), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 48, &dev)?;
        let mut layer = AdaptableLinear::new(w, Some(b));
        let x = Tensor::randn(0f32, 1.0, (2, 40, 32), &dev)?;
        for adapter in [None, Some(Arc::new(Shift(-0.7)) as Arc<dyn LinearAdapter>)] {
            layer.set_adapter(adapter);
            for act in [Activation::Gelu, Activation::Relu] {
                let want = act.apply(&layer.forward(&x)?)?;
                let got = layer.forward_activated(&x, act)?;
                let d = sgp_kernels::testing::max_abs_diff(&got, &want).map_err(crate::ops::kernel_err("test"))?;
                assert!(d < 1e-5, "{act:?} with adapter {}: {d}", layer.adapter().is_some());
            }
            let r = Tensor::randn(0f32, 1.0, (2, 40, 48), &dev)?;
            let want = (&r + layer.forward(&x)?)?;
            let d = sgp_kernels::testing::max_abs_diff(&layer.forward_residual(&x, &r)?, &want)
                .map_err(crate::ops::kernel_err("test"))?;
            assert!(d < 1e-5, "residual with adapter {}: {d}", layer.adapter().is_some());
        }
        Ok(())
    }
}
