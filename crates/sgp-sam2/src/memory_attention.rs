//! SAM2 memory attention: conditions the current frame's image tokens on the memory bank
//! (spatial memories of earlier frames plus object-pointer tokens).
//!
//! Mirrors `sam2.modeling.memory_attention` and `RoPEAttention` from `sam/transformer.py`.
//! Tensors follow the official sequence-first layout at the API (`[tokens, B, C]`).
//! Dropout is a no-op: this is the eval-mode function.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::adapt::{Activation, AdaptableLinear};
use crate::ops::LayerNorm;
use crate::rope::AxialRope;

fn default_true() -> bool {
    true
}
fn default_theta() -> f64 {
    10000.0
}
fn default_one() -> usize {
    1
}
fn default_feat_sizes() -> [usize; 2] {
    [64, 64]
}
fn default_relu() -> String {
    "relu".to_string()
}

/// `RoPEAttention` (or plain `Attention`) constructor arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionConfig {
    /// Tells `RoPEAttention` from plain `Attention`; absent means RoPE (the SAM2 default).
    #[serde(rename = "_target_", default)]
    pub target: Option<String>,
    /// Query width.
    pub embedding_dim: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Internal width is `embedding_dim / downsample_rate`.
    #[serde(default = "default_one")]
    pub downsample_rate: usize,
    /// Attention dropout; inference ignores it.
    #[serde(default)]
    pub dropout: f64,
    /// Key/value input width when it differs from the query's (cross-attention to memories).
    #[serde(default)]
    pub kv_in_dim: Option<usize>,
    /// RoPE frequency base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Repeat the keys' RoPE over memory frames (cross-attention).
    #[serde(default)]
    pub rope_k_repeat: bool,
    /// Only the default grid of the reference; we compute the grid from the token count.
    #[serde(default = "default_feat_sizes")]
    pub feat_sizes: [usize; 2],
}

impl AttentionConfig {
    /// Whether this is a `RoPEAttention` (else plain `Attention`).
    pub fn uses_rope(&self) -> bool {
        match &self.target {
            None => true,
            Some(t) => t.ends_with("RoPEAttention"),
        }
    }
}

/// `MemoryAttentionLayer` constructor arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryAttentionLayerConfig {
    /// MLP activation (`relu` in every official config).
    #[serde(default = "default_relu")]
    pub activation: String,
    /// Token width C.
    pub d_model: usize,
    /// MLP hidden width.
    pub dim_feedforward: usize,
    /// Dropout; inference ignores it.
    #[serde(default)]
    pub dropout: f64,
    /// Add the position encoding to self-attention queries and keys.
    #[serde(default)]
    pub pos_enc_at_attn: bool,
    /// Add the memory position encoding to cross-attention keys.
    #[serde(default)]
    pub pos_enc_at_cross_attn_keys: bool,
    /// Add the position encoding to cross-attention queries.
    #[serde(default)]
    pub pos_enc_at_cross_attn_queries: bool,
    /// Self-attention over the current frame.
    pub self_attention: AttentionConfig,
    /// Cross-attention to the memory.
    pub cross_attention: AttentionConfig,
}

/// The yaml `memory_attention:` subtree (`MemoryAttention` constructor arguments).
///
/// `MemoryAttention` has no defaults for `pos_enc_at_input`, `layer` and `num_layers`;
/// when a config omits them we take the values every official SAM2/SAM2.1 yaml uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryAttentionConfig {
    /// Token width C.
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    /// Add 0.1 × the position encoding to the input once.
    #[serde(default = "default_true")]
    pub pos_enc_at_input: bool,
    /// Every layer's arguments.
    #[serde(default = "official_layer")]
    pub layer: MemoryAttentionLayerConfig,
    /// Number of layers.
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    /// Token layout of the layers (`true`: `[B, L, C]`).
    #[serde(default = "default_true")]
    pub batch_first: bool,
}

fn default_d_model() -> usize {
    256
}
fn default_num_layers() -> usize {
    4
}
fn official_attention(kv_in_dim: Option<usize>) -> AttentionConfig {
    AttentionConfig {
        target: None,
        embedding_dim: 256,
        num_heads: 1,
        downsample_rate: 1,
        dropout: 0.1,
        kv_in_dim,
        rope_theta: 10000.0,
        rope_k_repeat: kv_in_dim.is_some(),
        feat_sizes: [64, 64],
    }
}
fn official_layer() -> MemoryAttentionLayerConfig {
    MemoryAttentionLayerConfig {
        activation: "relu".into(),
        d_model: 256,
        dim_feedforward: 2048,
        dropout: 0.1,
        pos_enc_at_attn: false,
        pos_enc_at_cross_attn_keys: true,
        pos_enc_at_cross_attn_queries: false,
        self_attention: official_attention(None),
        cross_attention: official_attention(Some(64)),
    }
}

/// Multi-head attention with optional axial RoPE on queries and keys.
#[derive(Debug, Clone)]
pub struct RoPEAttention {
    pub q_proj: AdaptableLinear,
    pub k_proj: AdaptableLinear,
    pub v_proj: AdaptableLinear,
    pub out_proj: AdaptableLinear,
    pub num_heads: usize,
    pub internal_dim: usize,
    pub use_rope: bool,
    pub rope_theta: f64,
    pub rope_k_repeat: bool,
}

impl RoPEAttention {
    pub fn new(cfg: &AttentionConfig, vb: VarBuilder) -> Result<Self> {
        let internal_dim = cfg.embedding_dim / cfg.downsample_rate.max(1);
        if cfg.num_heads == 0 || !internal_dim.is_multiple_of(cfg.num_heads) {
            candle_core::bail!("num_heads {} must divide {internal_dim}", cfg.num_heads);
        }
        let kv_in = cfg.kv_in_dim.unwrap_or(cfg.embedding_dim);
        Ok(Self {
            q_proj: AdaptableLinear::load(cfg.embedding_dim, internal_dim, true, vb.pp("q_proj"))?,
            k_proj: AdaptableLinear::load(kv_in, internal_dim, true, vb.pp("k_proj"))?,
            v_proj: AdaptableLinear::load(kv_in, internal_dim, true, vb.pp("v_proj"))?,
            out_proj: AdaptableLinear::load(internal_dim, cfg.embedding_dim, true, vb.pp("out_proj"))?,
            num_heads: cfg.num_heads,
            internal_dim,
            use_rope: cfg.uses_rope(),
            rope_theta: cfg.rope_theta,
            rope_k_repeat: cfg.rope_k_repeat,
        })
    }

    fn separate_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.num_heads, c / self.num_heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `q` [B,Nq,C], `k`/`v` [B,Nk,kv_in]; the last `num_k_exclude_rope` keys (object
    /// pointers) are not rotated.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, num_k_exclude_rope: usize) -> Result<Tensor> {
        let q = self.separate_heads(&self.q_proj.forward(q)?)?;
        let mut k = self.separate_heads(&self.k_proj.forward(k)?)?;
        // Inference with one head over narrower inputs (SAM2's 64-channel memories, a
        // 256-wide head): attend over the raw inputs and apply v_proj to the output.
        // Softmax rows sum to one, so P·(M Wᵀ + b) = (P·M) Wᵀ + b, LoRA included (it is
        // linear too); the P·V product shrinks by kv_in / head_dim, 4× in SAM2.
        let narrow_values = self.num_heads == 1
            && v.rank() == 3
            && v.dim(2)? < self.internal_dim
            && crate::ops::untracked_cpu_f32(&[&q, &k, v]);
        let v = if narrow_values {
            v.unsqueeze(1)?
        } else {
            self.separate_heads(&self.v_proj.forward(v)?)?
        };
        let (b, h, nq, dh) = q.dims4()?;
        let nk = k.dim(2)?;
        let q = if self.use_rope {
            let rope = AxialRope::cached(dh, nq, self.rope_theta, q.device())?;
            if nq != nk && !self.rope_k_repeat {
                candle_core::bail!("RoPE attention over {nq} queries and {nk} keys needs rope_k_repeat");
            }
            if num_k_exclude_rope > nk {
                candle_core::bail!("{num_k_exclude_rope} excluded keys but only {nk} keys");
            }
            let nk_rope = nk - num_k_exclude_rope;
            if nk_rope > 0 {
                // Errors when the rotated keys are not whole copies of the query grid.
                k = rope.apply_leading(&k, nk_rope)?;
            }
            rope.apply(&q, 1)?
        } else {
            q
        };
        if narrow_values {
            let out = sgp_kernels::masked_attention::attention_inference(&q, &k, &v)
                .map_err(crate::ops::kernel_err("memory attention"))?;
            return self.out_proj.forward(&self.v_proj.forward(&out.squeeze(1)?)?);
        }
        let out = scaled_dot_product_attention(&q, &k, &v)?;
        let out = out.transpose(1, 2)?.reshape((b, nq, h * dh))?;
        self.out_proj.forward(&out)
    }
}

/// `softmax(q kᵀ/√d) v` over [B,H,N,d] (see [`crate::ops::scaled_dot_product_attention`]).
pub use crate::ops::scaled_dot_product_attention;

/// One layer: RoPE self-attention, RoPE cross-attention to the memory, MLP (pre-norm).
#[derive(Debug, Clone)]
pub struct MemoryAttentionLayer {
    pub self_attn: RoPEAttention,
    pub cross_attn_image: RoPEAttention,
    pub linear1: AdaptableLinear,
    pub linear2: AdaptableLinear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
    activation: Activation,
    pub pos_enc_at_attn: bool,
    pub pos_enc_at_cross_attn_keys: bool,
    pub pos_enc_at_cross_attn_queries: bool,
}

impl MemoryAttentionLayer {
    pub fn new(cfg: &MemoryAttentionLayerConfig, vb: VarBuilder) -> Result<Self> {
        let activation = match cfg.activation.as_str() {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            other => candle_core::bail!("unsupported memory-attention activation {other:?}"),
        };
        let d = cfg.d_model;
        Ok(Self {
            self_attn: RoPEAttention::new(&cfg.self_attention, vb.pp("self_attn"))?,
            cross_attn_image: RoPEAttention::new(&cfg.cross_attention, vb.pp("cross_attn_image"))?,
            linear1: AdaptableLinear::load(d, cfg.dim_feedforward, true, vb.pp("linear1"))?,
            linear2: AdaptableLinear::load(cfg.dim_feedforward, d, true, vb.pp("linear2"))?,
            norm1: LayerNorm::new(d, 1e-5, vb.pp("norm1"))?,
            norm2: LayerNorm::new(d, 1e-5, vb.pp("norm2"))?,
            norm3: LayerNorm::new(d, 1e-5, vb.pp("norm3"))?,
            activation,
            pos_enc_at_attn: cfg.pos_enc_at_attn,
            pos_enc_at_cross_attn_keys: cfg.pos_enc_at_cross_attn_keys,
            pos_enc_at_cross_attn_queries: cfg.pos_enc_at_cross_attn_queries,
        })
    }

    /// Batch-first: `tgt` [B,N,C], `memory` [B,M,Cm], positions alike.
    pub fn forward(
        &self,
        tgt: &Tensor,
        memory: &Tensor,
        pos: &Tensor,
        query_pos: &Tensor,
        num_k_exclude_rope: usize,
    ) -> Result<Tensor> {
        // Self-attention.
        let t2 = self.norm1.forward(tgt)?;
        let qk = if self.pos_enc_at_attn {
            (&t2 + query_pos)?
        } else {
            t2.clone()
        };
        let tgt = (tgt + self.self_attn.forward(&qk, &qk, &t2, 0)?)?;
        // Cross-attention to the memory.
        let t2 = self.norm2.forward(&tgt)?;
        let q = if self.pos_enc_at_cross_attn_queries {
            (&t2 + query_pos)?
        } else {
            t2
        };
        let k = if self.pos_enc_at_cross_attn_keys {
            (memory + pos)?
        } else {
            memory.clone()
        };
        let tgt = (&tgt + self.cross_attn_image.forward(&q, &k, memory, num_k_exclude_rope)?)?;
        // MLP.
        let t2 = self
            .linear1
            .forward_activated(&self.norm3.forward(&tgt)?, self.activation)?;
        self.linear2.forward_residual(&t2, &tgt)
    }
}

/// `MemoryAttention`: a stack of memory-attention layers (self-attention, cross-attention
/// to the memory, MLP) and a final LayerNorm.
#[derive(Debug, Clone)]
pub struct MemoryAttention {
    /// The stacked attention layers.
    pub layers: Vec<MemoryAttentionLayer>,
    /// Final layer norm.
    pub norm: LayerNorm,
    /// Add 0.1 × the position encoding to the input once.
    pub pos_enc_at_input: bool,
    /// Token width C.
    pub d_model: usize,
}

impl MemoryAttention {
    /// `vb` at the checkpoint prefix `memory_attention`.
    pub fn new(cfg: &MemoryAttentionConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_layers)
            .map(|i| MemoryAttentionLayer::new(&cfg.layer, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            norm: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("norm"))?,
            pos_enc_at_input: cfg.pos_enc_at_input,
            d_model: cfg.d_model,
        })
    }

    /// Sequence-first like the reference: `curr`/`curr_pos` `[N,B,C]`, `memory`/`memory_pos`
    /// `[M,B,Cm]`, of which the last `num_obj_ptr_tokens` are object pointers (no RoPE).
    /// Returns `[N,B,C]`.
    pub fn forward(
        &self,
        curr: &Tensor,
        curr_pos: &Tensor,
        memory: &Tensor,
        memory_pos: &Tensor,
        num_obj_ptr_tokens: usize,
    ) -> Result<Tensor> {
        let _span = tracing::debug_span!("memory_attention", memory_tokens = memory.dim(0)?).entered();
        if curr.dim(1)? != memory.dim(1)? {
            candle_core::bail!(
                "memory attention: batch of curr ({}) and memory ({}) differ",
                curr.dim(1)?,
                memory.dim(1)?
            );
        }
        let mut out = if self.pos_enc_at_input {
            (curr + (curr_pos * 0.1)?)?
        } else {
            curr.clone()
        };
        let batch_first = |x: &Tensor| crate::ops::contiguous(&x.transpose(0, 1)?);
        out = batch_first(&out)?;
        let curr_pos = batch_first(curr_pos)?;
        let memory = batch_first(memory)?;
        let memory_pos = batch_first(memory_pos)?;
        for layer in &self.layers {
            out = layer.forward(&out, &memory, &memory_pos, &curr_pos, num_obj_ptr_tokens)?;
        }
        crate::ops::contiguous(&self.norm.forward(&out)?.transpose(0, 1)?)
    }

    /// Every adaptable linear layer, by checkpoint path relative to `memory_attention`.
    pub fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, attn) in [
                ("self_attn", &mut l.self_attn),
                ("cross_attn_image", &mut l.cross_attn_image),
            ] {
                v.push((format!("layers.{i}.{name}.q_proj"), &mut attn.q_proj));
                v.push((format!("layers.{i}.{name}.k_proj"), &mut attn.k_proj));
                v.push((format!("layers.{i}.{name}.v_proj"), &mut attn.v_proj));
                v.push((format!("layers.{i}.{name}.out_proj"), &mut attn.out_proj));
            }
            v.push((format!("layers.{i}.linear1"), &mut l.linear1));
            v.push((format!("layers.{i}.linear2"), &mut l.linear2));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn tiny() -> (MemoryAttention, VarMap) {
        let attn = |kv: Option<usize>| AttentionConfig {
            target: None,
            embedding_dim: 16,
            num_heads: 2,
            downsample_rate: 1,
            dropout: 0.0,
            kv_in_dim: kv,
            rope_theta: 10000.0,
            rope_k_repeat: kv.is_some(),
            feat_sizes: [2, 2],
        };
        let cfg = MemoryAttentionConfig {
            d_model: 16,
            pos_enc_at_input: true,
            layer: MemoryAttentionLayerConfig {
                activation: "relu".into(),
                d_model: 16,
                dim_feedforward: 32,
                dropout: 0.0,
                pos_enc_at_attn: false,
                pos_enc_at_cross_attn_keys: true,
                pos_enc_at_cross_attn_queries: false,
                self_attention: attn(None),
                cross_attention: attn(Some(8)),
            },
            num_layers: 2,
            batch_first: true,
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let m = MemoryAttention::new(&cfg, vb).unwrap();
        for v in vm.all_vars() {
            let t = v.as_tensor();
            v.set(&(Tensor::randn(0f32, 0.3, t.shape(), t.device()).unwrap() + 1.0).unwrap())
                .unwrap();
        }
        (m, vm)
    }

    /// Gradients reach the inputs and the projections through RoPE, softmax and the
    /// norms, and agree with finite differences; the untracked (fast) path computes the
    /// same function.
    #[test]
    fn gradients_flow_and_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (m, vm) = tiny();
        // 2×2 grid of queries; memory = 2 frames of 4 tokens + 2 pointer tokens.
        let curr = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 1, 16), &dev)?)?;
        let curr_pos = Tensor::randn(0f32, 1.0, (4, 1, 16), &dev)?;
        let memory = Tensor::randn(0f32, 1.0, (10, 1, 8), &dev)?;
        let memory_pos = Tensor::randn(0f32, 1.0, (10, 1, 8), &dev)?;
        let r = Tensor::randn(0f32, 1.0, (4, 1, 16), &dev)?;
        let loss =
            |c: &Tensor| -> Result<Tensor> { (m.forward(c, &curr_pos, &memory, &memory_pos, 2)? * &r)?.sum_all() };
        let tracked = loss(curr.as_tensor())?;
        let fast = loss(&curr.as_tensor().detach())?;
        let d = (tracked.to_scalar::<f32>()? - fast.to_scalar::<f32>()?).abs();
        assert!(
            d <= 1e-4 * fast.to_scalar::<f32>()?.abs().max(1.0),
            "paths differ by {d}"
        );

        let grads = tracked.backward()?;
        let g = grads
            .get(curr.as_tensor())
            .expect("grad of curr")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let q_w = vm
            .data()
            .lock()
            .unwrap()
            .get("layers.0.self_attn.q_proj.weight")
            .unwrap()
            .clone();
        let gq = grads
            .get(q_w.as_tensor())
            .expect("grad of q_proj")
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(gq > 0.0, "no gradient reached the self-attention q projection");

        let base = curr.as_tensor().detach().flatten_all()?.to_vec1::<f32>()?;
        let eps = 1e-2f32;
        for &i in &[0usize, 17, 63] {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let lp = loss(&Tensor::from_vec(plus, (4, 1, 16), &dev)?)?.to_scalar::<f32>()?;
            let lm = loss(&Tensor::from_vec(minus, (4, 1, 16), &dev)?)?.to_scalar::<f32>()?;
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() <= 0.02 * fd.abs().max(1.0),
                "element {i}: fd {fd} vs grad {}",
                g[i]
            );
        }
        Ok(())
    }

    #[test]
    fn bad_memory_layouts_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let (m, _) = tiny();
        let curr = Tensor::randn(0f32, 1.0, (4, 1, 16), &dev)?;
        // 7 rotated keys are not a multiple of the 4-token grid.
        let mem = Tensor::randn(0f32, 1.0, (9, 1, 8), &dev)?;
        assert!(m.forward(&curr, &curr, &mem, &mem, 2).is_err());
        // Non-square query grid.
        let c3 = Tensor::randn(0f32, 1.0, (3, 1, 16), &dev)?;
        let mem = Tensor::randn(0f32, 1.0, (6, 1, 8), &dev)?;
        assert!(m.forward(&c3, &c3, &mem, &mem, 0).is_err());
        Ok(())
    }
}
