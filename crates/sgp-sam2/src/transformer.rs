//! SAM's two-way transformer (`sam2.modeling.sam.transformer`): prompt tokens and image
//! tokens attend to each other, so masks are predicted from prompt-aware image features.
//!
//! Every linear layer is an [`AdaptableLinear`], so adapters can target the decoder.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::adapt::AdaptableLinear;
use crate::ops::{softmax_last_dim, LayerNorm};

/// Activation between MLP layers.
pub use crate::adapt::Activation;

/// `sam2_utils.MLP`: `num_layers` linear layers (`layers.{i}`), activation between them,
/// optional sigmoid at the end.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub layers: Vec<AdaptableLinear>,
    pub activation: Activation,
    pub sigmoid_output: bool,
}

impl Mlp {
    pub fn new(
        input_dim: usize,
        hidden_dim: usize,
        output_dim: usize,
        num_layers: usize,
        activation: Activation,
        sigmoid_output: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let n_in = if i == 0 { input_dim } else { hidden_dim };
            let n_out = if i + 1 == num_layers { output_dim } else { hidden_dim };
            layers.push(AdaptableLinear::load(n_in, n_out, true, vb.pp(format!("layers.{i}")))?);
        }
        Ok(Self {
            layers,
            activation,
            sigmoid_output,
        })
    }

    /// Adaptable layers with their paths relative to this MLP.
    pub fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut AdaptableLinear)> {
        self.layers
            .iter_mut()
            .enumerate()
            .map(|(i, l)| (format!("{prefix}.layers.{i}"), l))
            .collect()
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            x = if i + 1 < n {
                layer.forward_activated(&x, self.activation)?
            } else {
                layer.forward(&x)?
            };
        }
        if self.sigmoid_output {
            x = candle_nn::ops::sigmoid(&x)?;
        }
        Ok(x)
    }
}

/// Multi-head attention whose inner width is `embedding_dim / downsample_rate`.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: AdaptableLinear,
    pub k_proj: AdaptableLinear,
    pub v_proj: AdaptableLinear,
    pub out_proj: AdaptableLinear,
    pub num_heads: usize,
    pub internal_dim: usize,
}

impl Attention {
    pub fn new(
        embedding_dim: usize,
        num_heads: usize,
        downsample_rate: usize,
        kv_in_dim: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let internal_dim = embedding_dim / downsample_rate.max(1);
        if num_heads == 0 || !internal_dim.is_multiple_of(num_heads) {
            candle_core::bail!("attention: num_heads ({num_heads}) must divide {internal_dim}");
        }
        let kv = kv_in_dim.unwrap_or(embedding_dim);
        Ok(Self {
            q_proj: AdaptableLinear::load(embedding_dim, internal_dim, true, vb.pp("q_proj"))?,
            k_proj: AdaptableLinear::load(kv, internal_dim, true, vb.pp("k_proj"))?,
            v_proj: AdaptableLinear::load(kv, internal_dim, true, vb.pp("v_proj"))?,
            out_proj: AdaptableLinear::load(internal_dim, embedding_dim, true, vb.pp("out_proj"))?,
            num_heads,
            internal_dim,
        })
    }

    fn separate_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.num_heads, c / self.num_heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `q` `[B, Nq, C]`, `k`/`v` `[B, Nk, Ckv]` -> `[B, Nq, C]`.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (
            self.q_proj.forward(q)?,
            self.k_proj.forward(k)?,
            self.v_proj.forward(v)?,
        );
        if crate::ops::cpu_f32(&[&q, &k, &v]) {
            // Heads as [B, N, H, d] views of the projections, no transposes (in training
            // too: the kernel has its own backward).
            let heads = |x: &Tensor| -> Result<Tensor> {
                let (b, n, c) = x.dims3()?;
                x.reshape((b, n, self.num_heads, c / self.num_heads))
            };
            let (b, nq, _) = q.dims3()?;
            let out = sgp_kernels::attention::attention_blhd(&heads(&q)?, &heads(&k)?, &heads(&v)?)
                .map_err(crate::ops::kernel_err("attention"))?;
            return self.out_proj.forward(&out.reshape((b, nq, self.internal_dim))?);
        }
        let q = self.separate_heads(&q)?;
        let k = self.separate_heads(&k)?;
        let v = self.separate_heads(&v)?;
        let (b, h, nq, d) = q.dims4()?;
        let scale = 1.0 / (d as f64).sqrt();
        let attn = (q.matmul(&k.t()?)? * scale)?;
        let attn = softmax_last_dim(&attn)?;
        let out = attn.matmul(&v)?; // [B, H, Nq, d]
        let out = out.transpose(1, 2)?.reshape((b, nq, h * d))?;
        self.out_proj.forward(&out)
    }

    pub fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut AdaptableLinear)> {
        vec![
            (format!("{prefix}.q_proj"), &mut self.q_proj),
            (format!("{prefix}.k_proj"), &mut self.k_proj),
            (format!("{prefix}.v_proj"), &mut self.v_proj),
            (format!("{prefix}.out_proj"), &mut self.out_proj),
        ]
    }
}

/// Self-attention of tokens, tokens→image, MLP on tokens, image→tokens.
#[derive(Debug, Clone)]
pub struct TwoWayAttentionBlock {
    pub self_attn: Attention,
    pub norm1: LayerNorm,
    pub cross_attn_token_to_image: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub norm3: LayerNorm,
    pub norm4: LayerNorm,
    pub cross_attn_image_to_token: Attention,
    pub skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    pub fn new(
        embedding_dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        attention_downsample_rate: usize,
        skip_first_layer_pe: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(embedding_dim, num_heads, 1, None, vb.pp("self_attn"))?,
            norm1: LayerNorm::new(embedding_dim, 1e-5, vb.pp("norm1"))?,
            cross_attn_token_to_image: Attention::new(
                embedding_dim,
                num_heads,
                attention_downsample_rate,
                None,
                vb.pp("cross_attn_token_to_image"),
            )?,
            norm2: LayerNorm::new(embedding_dim, 1e-5, vb.pp("norm2"))?,
            mlp: Mlp::new(
                embedding_dim,
                mlp_dim,
                embedding_dim,
                2,
                Activation::Relu,
                false,
                vb.pp("mlp"),
            )?,
            norm3: LayerNorm::new(embedding_dim, 1e-5, vb.pp("norm3"))?,
            norm4: LayerNorm::new(embedding_dim, 1e-5, vb.pp("norm4"))?,
            cross_attn_image_to_token: Attention::new(
                embedding_dim,
                num_heads,
                attention_downsample_rate,
                None,
                vb.pp("cross_attn_image_to_token"),
            )?,
            skip_first_layer_pe,
        })
    }

    /// Returns the updated (queries, keys).
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)?
        } else {
            let q = (queries + query_pe)?;
            (queries + self.self_attn.forward(&q, &q, queries)?)?
        };
        let queries = self.norm1.forward(&queries)?;

        let q = (&queries + query_pe)?;
        let k = (keys + key_pe)?;
        let queries = (&queries + self.cross_attn_token_to_image.forward(&q, &k, keys)?)?;
        let queries = self.norm2.forward(&queries)?;

        let queries = (&queries + self.mlp.forward(&queries)?)?;
        let queries = self.norm3.forward(&queries)?;

        let q = (&queries + query_pe)?;
        let attn_out = self.cross_attn_image_to_token.forward(&k, &q, &queries)?;
        let keys = self.norm4.forward(&(keys + attn_out)?)?;
        Ok((queries, keys))
    }

    pub fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut AdaptableLinear)> {
        let mut v = self.self_attn.linears_mut(&format!("{prefix}.self_attn"));
        v.extend(
            self.cross_attn_token_to_image
                .linears_mut(&format!("{prefix}.cross_attn_token_to_image")),
        );
        v.extend(self.mlp.linears_mut(&format!("{prefix}.mlp")));
        v.extend(
            self.cross_attn_image_to_token
                .linears_mut(&format!("{prefix}.cross_attn_image_to_token")),
        );
        v
    }
}

/// `TwoWayTransformer` (depth 2, 8 heads, MLP 2048 in SAM2).
#[derive(Debug, Clone)]
pub struct TwoWayTransformer {
    pub layers: Vec<TwoWayAttentionBlock>,
    pub final_attn_token_to_image: Attention,
    pub norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(
        depth: usize,
        embedding_dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        attention_downsample_rate: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layers = (0..depth)
            .map(|i| {
                TwoWayAttentionBlock::new(
                    embedding_dim,
                    num_heads,
                    mlp_dim,
                    attention_downsample_rate,
                    i == 0,
                    vb.pp(format!("layers.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            final_attn_token_to_image: Attention::new(
                embedding_dim,
                num_heads,
                attention_downsample_rate,
                None,
                vb.pp("final_attn_token_to_image"),
            )?,
            norm_final_attn: LayerNorm::new(embedding_dim, 1e-5, vb.pp("norm_final_attn"))?,
        })
    }

    /// `image_embedding`/`image_pe` `[B, C, h, w]`, `point_embedding` `[B, N, C]`.
    /// Returns (tokens `[B, N, C]`, image tokens `[B, h*w, C]`).
    pub fn forward(
        &self,
        image_embedding: &Tensor,
        image_pe: &Tensor,
        point_embedding: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let tokens = |x: &Tensor| crate::ops::contiguous(&x.flatten_from(2)?.transpose(1, 2)?);
        let image_embedding = tokens(image_embedding)?;
        let image_pe = tokens(image_pe)?;
        let mut queries = point_embedding.clone();
        let mut keys = image_embedding;
        for layer in &self.layers {
            let (q, k) = layer.forward(&queries, &keys, point_embedding, &image_pe)?;
            queries = q;
            keys = k;
        }
        let q = (&queries + point_embedding)?;
        let k = (&keys + &image_pe)?;
        let attn_out = self.final_attn_token_to_image.forward(&q, &k, &keys)?;
        let queries = self.norm_final_attn.forward(&(queries + attn_out)?)?;
        Ok((queries, keys))
    }

    pub fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut AdaptableLinear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            v.extend(l.linears_mut(&format!("{prefix}.layers.{i}")));
        }
        v.extend(
            self.final_attn_token_to_image
                .linears_mut(&format!("{prefix}.final_attn_token_to_image")),
        );
        v
    }
}
