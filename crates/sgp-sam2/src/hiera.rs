//! Hiera, SAM2's hierarchical image trunk (`sam2.modeling.backbones.hieradet`).
//!
//! Tokens stay channels-last (`[B, H, W, C]`) as in the official code. Each stage change
//! halves the map by max-pooling the attention queries (and the shortcut); most blocks
//! attend within windows, a few (`global_att_blocks`) attend globally.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::adapt::AdaptableLinear;
use crate::config::HieraConfig;
use crate::ops::{scaled_dot_product_attention, LayerNorm};

#[derive(Debug, Clone)]
pub struct MultiScaleAttention {
    pub qkv: AdaptableLinear,
    pub proj: AdaptableLinear,
    num_heads: usize,
    dim_out: usize,
    q_stride: Option<[usize; 2]>,
}

impl MultiScaleAttention {
    fn new(dim: usize, dim_out: usize, num_heads: usize, q_stride: Option<[usize; 2]>, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: AdaptableLinear::load(dim, dim_out * 3, true, vb.pp("qkv"))?,
            proj: AdaptableLinear::load(dim_out, dim_out, true, vb.pp("proj"))?,
            num_heads,
            dim_out,
            q_stride,
        })
    }

    /// `x`: `[B, H, W, dim]` → `[B, H', W', dim_out]` (H' = H / q_stride when pooling).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.attend(&self.qkv.forward(x)?)?)
    }

    /// The attention of a qkv map `[B, H, W, 3·dim_out]` (channels (3, nh, hd)), before
    /// the output projection: `[B, H', W', dim_out]`.
    pub fn attend(&self, qkv_map: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = qkv_map.dims4()?;
        let nh = self.num_heads;
        let hd = self.dim_out / nh;
        let qkv = qkv_map.reshape((b, h * w, 3, nh, hd))?;
        let (pooled, h, w) = match self.q_stride {
            Some(s) => {
                // Pool the q channels of the qkv map in place (no reshape copy of the view).
                let q = max_pool_nhwc(&qkv_map.narrow(3, 0, nh * hd)?, s)?;
                let (_, h2, w2, _) = q.dims4()?;
                (Some(q.reshape((b, h2 * w2, nh, hd))?), h2, w2)
            }
            None => (None, h, w),
        };
        if crate::ops::cpu_f32(&[&qkv]) {
            // Attention straight on the packed qkv, result already [B, L, nh, hd]; in
            // training its backward writes one packed qkv gradient.
            let o = sgp_kernels::attention::attention_qkv(&qkv, pooled.as_ref())
                .map_err(crate::ops::kernel_err("hiera attention"))?;
            return o.reshape((b, h, w, self.dim_out));
        }
        let k = qkv.narrow(2, 1, 1)?.squeeze(2)?;
        let v = qkv.narrow(2, 2, 1)?.squeeze(2)?;
        let q = match pooled {
            Some(q) => q,
            None => qkv.narrow(2, 0, 1)?.squeeze(2)?,
        };
        // [B, nh, L, hd]
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let o = scaled_dot_product_attention(&q, &k, &v)?; // [B, nh, Lq, hd]
        o.transpose(1, 2)?.reshape((b, h, w, self.dim_out))
    }
}

/// `nn.MaxPool2d(kernel=stride=s, ceil_mode=False)` applied to a channels-last map.
fn max_pool_nhwc(x: &Tensor, s: [usize; 2]) -> Result<Tensor> {
    if crate::ops::cpu_f32(&[x]) {
        // The kernel's backward routes each gradient to its window's maximum.
        return sgp_kernels::pool::max_pool_nhwc(x, s).map_err(crate::ops::kernel_err("q pooling"));
    }
    if x.track_op() {
        // candle 0.11's max_pool2d backward scales the gradient by 1/k² (it multiplies by
        // the window mean of the argmax mask), so other devices pool by reshape + max,
        // whose backward routes the whole gradient to the maximum. Same forward values.
        let (b, h, w, c) = x.dims4()?;
        let (ho, wo) = (h / s[0], w / s[1]);
        let x = x.narrow(1, 0, ho * s[0])?.narrow(2, 0, wo * s[1])?;
        return x
            .reshape((b, ho, s[0], wo, s[1], c))?
            .max_keepdim(4)?
            .max_keepdim(2)?
            .reshape((b, ho, wo, c));
    }
    let y = x.permute((0, 3, 1, 2))?.contiguous()?;
    let y = y.max_pool2d_with_stride((s[0], s[1]), (s[0], s[1]))?;
    y.permute((0, 2, 3, 1))?.contiguous()
}

/// Splits `[B, H, W, C]` into `[B·nW, ws, ws, C]` windows, zero-padding H and W up to
/// multiples of `ws`. Returns the padded size too.
pub fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    if crate::ops::cpu_f32(&[x]) {
        // One copy each way (training too: the kernel's backward is the inverse copy).
        return sgp_kernels::window::window_partition(x, ws).map_err(crate::ops::kernel_err("window partition"));
    }
    let (b, h, w, c) = x.dims4()?;
    let ph = (ws - h % ws) % ws;
    let pw = (ws - w % ws) % ws;
    let mut x = x.clone();
    if ph > 0 {
        x = x.pad_with_zeros(1, 0, ph)?;
    }
    if pw > 0 {
        x = x.pad_with_zeros(2, 0, pw)?;
    }
    let (hp, wp) = (h + ph, w + pw);
    let x = x
        .reshape(vec![b, hp / ws, ws, wp / ws, ws, c])?
        .permute(vec![0, 1, 3, 2, 4, 5])?
        .contiguous()?
        .reshape((b * (hp / ws) * (wp / ws), ws, ws, c))?;
    Ok((x, (hp, wp)))
}

/// Inverse of [`window_partition`], cropping the padding away.
pub fn window_unpartition(windows: &Tensor, ws: usize, pad_hw: (usize, usize), hw: (usize, usize)) -> Result<Tensor> {
    let (hp, wp) = pad_hw;
    let (h, w) = hw;
    if crate::ops::cpu_f32(&[windows]) && (hp, wp) == (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws) {
        return sgp_kernels::window::window_unpartition(windows, ws, hw)
            .map_err(crate::ops::kernel_err("window unpartition"));
    }
    let (nwin, _, _, c) = windows.dims4()?;
    let b = nwin / ((hp / ws) * (wp / ws));
    let mut x = windows
        .reshape(vec![b, hp / ws, wp / ws, ws, ws, c])?
        .permute(vec![0, 1, 3, 2, 4, 5])?
        .contiguous()?
        .reshape((b, hp, wp, c))?;
    if hp > h || wp > w {
        x = x.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()?;
    }
    Ok(x)
}

/// `MLP(dim, hidden, dim, num_layers=2, activation=GELU)`.
#[derive(Debug, Clone)]
pub struct HieraMlp {
    pub layers: Vec<AdaptableLinear>,
}

impl HieraMlp {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        Ok(Self {
            layers: vec![
                AdaptableLinear::load(dim, hidden, true, vb.pp("0"))?,
                AdaptableLinear::load(hidden, dim, true, vb.pp("1"))?,
            ],
        })
    }

    /// `fc2(gelu(fc1(x)))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.layers[0].forward_activated(x, crate::adapt::Activation::Gelu)?;
        self.layers[1].forward(&h)
    }

    /// `residual + self.forward(x)`, the skip added as the second layer's output is made.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.layers[0].forward_activated(x, crate::adapt::Activation::Gelu)?;
        self.layers[1].forward_residual(&h, residual)
    }
}

#[derive(Debug, Clone)]
pub struct MultiScaleBlock {
    pub norm1: LayerNorm,
    pub attn: MultiScaleAttention,
    pub norm2: LayerNorm,
    pub mlp: HieraMlp,
    /// Shortcut projection at stage changes (`dim != dim_out`).
    pub proj: Option<AdaptableLinear>,
    pub dim: usize,
    pub dim_out: usize,
    pub window_size: usize,
    pub q_stride: Option<[usize; 2]>,
}

impl MultiScaleBlock {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dim: usize,
        dim_out: usize,
        num_heads: usize,
        mlp_ratio: f64,
        q_stride: Option<[usize; 2]>,
        window_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let proj = if dim != dim_out {
            Some(AdaptableLinear::load(dim, dim_out, true, vb.pp("proj"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-6, vb.pp("norm1"))?,
            attn: MultiScaleAttention::new(dim, dim_out, num_heads, q_stride, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim_out, 1e-6, vb.pp("norm2"))?,
            mlp: HieraMlp::new(dim_out, (dim_out as f64 * mlp_ratio) as usize, vb.pp("mlp"))?,
            proj,
            dim,
            dim_out,
            window_size,
            q_stride,
        })
    }

    /// [`Self::forward`] in inference (`None` when anything is tracked): the layers run on
    /// the map's own tokens only. Official Hiera zero-pads the map to whole windows before
    /// qkv, so each padding token's q, k and v are `qkv(0)`; here qkv runs on the unpadded
    /// map and the windows are padded with that row, which is the same (the padding still
    /// takes part in the attention, as in the official code). The projection, a per-token
    /// layer, runs after the windows are merged and cropped, with the skip connection
    /// fused (global blocks get the fused skip too). At 512 px this skips 42% of the rows
    /// of the windowed qkv and projections of stages 3 and 4 (a 32×32 map in 14×14 windows
    /// is 1764 tokens): 5 GFLOP, 9% of the encoder's 55. At 1024 px it skips 20% of them.
    fn forward_unpadded(&self, normed: &Tensor, shortcut: &Tensor) -> Result<Option<Tensor>> {
        let (_, h, w, _) = normed.dims4()?;
        if !crate::ops::untracked_cpu_f32(&[normed, shortcut]) {
            return Ok(None);
        }
        let qkv = &self.attn.qkv;
        let o = if self.window_size == 0 {
            self.attn.attend(&qkv.forward(normed)?)?
        } else {
            let ws = self.window_size;
            // The pooled windows' size, and the map after pooling.
            let (ws_out, hw_out) = match self.q_stride {
                Some(st) => {
                    let (_, sh, sw, _) = shortcut.dims4()?;
                    (ws / st[0], (sh, sw))
                }
                None => (ws, (h, w)),
            };
            let fill = qkv.forward_zero_row()?;
            if ws_out == 0 || fill.track_op() {
                return Ok(None); // trainable qkv parameters: the padding's gradient matters
            }
            let fill: Vec<f32> = fill.flatten_all()?.to_vec1()?;
            let (qkv_windows, _) = sgp_kernels::window::window_partition_filled(&qkv.forward(normed)?, ws, &fill)
                .map_err(crate::ops::kernel_err("window partition"))?;
            let o = self.attn.attend(&qkv_windows)?;
            let (ho, wo) = hw_out;
            let pad_hw = (ho.div_ceil(ws_out) * ws_out, wo.div_ceil(ws_out) * ws_out);
            window_unpartition(&o, ws_out, pad_hw, hw_out)?
        };
        let x = self.attn.proj.forward_residual(&o, shortcut)?;
        Ok(Some(self.mlp.forward_residual(&self.norm2.forward(&x)?, &x)?))
    }

    /// `[B, H, W, dim]` → `[B, H', W', dim_out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = self.norm1.forward(x)?;
        let shortcut = match &self.proj {
            Some(p) => {
                let s = p.forward(&normed)?;
                match self.q_stride {
                    Some(st) => max_pool_nhwc(&s, st)?,
                    None => s,
                }
            }
            None => x.clone(),
        };
        let (_, h, w, _) = normed.dims4()?;
        if let Some(x) = self.forward_unpadded(&normed, &shortcut)? {
            return Ok(x);
        }
        let mut ws = self.window_size;
        let (mut y, mut pad_hw) = if ws > 0 {
            window_partition(&normed, ws)?
        } else {
            (normed, (h, w))
        };
        y = self.attn.forward(&y)?;
        let (mut h, mut w) = (h, w);
        if let Some(st) = self.q_stride {
            // Query pooling shrank the windows and the map.
            ws = self.window_size / st[0];
            let (_, sh, sw, _) = shortcut.dims4()?;
            h = sh;
            w = sw;
            if ws > 0 {
                pad_hw = (h + (ws - h % ws) % ws, w + (ws - w % ws) % ws);
            }
        }
        if self.window_size > 0 {
            y = window_unpartition(&y, ws, pad_hw, (h, w))?;
        }
        let x = (shortcut + y)?;
        self.mlp.forward_residual(&self.norm2.forward(&x)?, &x)
    }
}

/// The Hiera trunk. Returns the stage outputs (`[B, C_i, H_i, W_i]`, highest resolution
/// first) at the ends of stages (all of them with `return_interm_layers`).
#[derive(Debug, Clone)]
pub struct Hiera {
    pub patch_embed: candle_nn::Conv2d,
    /// `[1, C, bh, bw]`, bicubic-resized to the patch grid at run time.
    pub pos_embed: Tensor,
    /// `[1, C, w0, w0]`, tiled over the patch grid.
    pub pos_embed_window: Tensor,
    pub blocks: Vec<MultiScaleBlock>,
    stage_ends: Vec<usize>,
    return_interm_layers: bool,
    channel_list: Vec<usize>,
    /// The last frozen position embedding, keyed by the two tensors' ids and the grid:
    /// the bicubic resize is the same for every image of a size (never used for Vars).
    pos_cache: std::sync::Arc<std::sync::Mutex<Option<PosCacheEntry>>>,
}

type PosCacheEntry = ((candle_core::TensorId, candle_core::TensorId, usize, usize), Tensor);

impl Hiera {
    pub fn new(cfg: &HieraConfig, vb: VarBuilder) -> Result<Self> {
        let embed0 = cfg.embed_dim;
        let conv_cfg = candle_nn::Conv2dConfig {
            padding: 3,
            stride: 4,
            ..Default::default()
        };
        let patch_embed = candle_nn::conv2d(3, embed0, 7, conv_cfg, vb.pp("patch_embed").pp("proj"))?;
        let [bh, bw] = cfg.window_pos_embed_bkg_spatial_size;
        let pos_embed = vb.get((1, embed0, bh, bw), "pos_embed")?;
        let w0 = cfg.window_spec[0];
        let pos_embed_window = vb.get((1, embed0, w0, w0), "pos_embed_window")?;

        let depth: usize = cfg.stages.iter().sum();
        let stage_ends: Vec<usize> = (1..=cfg.stages.len())
            .map(|i| cfg.stages[..i].iter().sum::<usize>() - 1)
            .collect();
        let q_pool_blocks: Vec<usize> = stage_ends[..stage_ends.len() - 1]
            .iter()
            .map(|x| x + 1)
            .take(cfg.q_pool)
            .collect();

        let mut embed_dim = embed0;
        let mut num_heads = cfg.num_heads;
        let mut cur_stage = 1;
        let mut blocks = Vec::with_capacity(depth);
        let vbb = vb.pp("blocks");
        for i in 0..depth {
            let mut dim_out = embed_dim;
            // The window size lags by a block: a stage's first block still uses the
            // previous stage's window.
            let mut window_size = cfg.window_spec[cur_stage - 1];
            if cfg.global_att_blocks.contains(&i) {
                window_size = 0;
            }
            if i > 0 && stage_ends.contains(&(i - 1)) {
                dim_out = (embed_dim as f64 * cfg.dim_mul) as usize;
                num_heads = (num_heads as f64 * cfg.head_mul) as usize;
                cur_stage += 1;
            }
            let q_stride = q_pool_blocks.contains(&i).then_some(cfg.q_stride);
            if !dim_out.is_multiple_of(num_heads) {
                candle_core::bail!("hiera block {i}: dim {dim_out} not divisible by {num_heads} heads");
            }
            blocks.push(MultiScaleBlock::new(
                embed_dim,
                dim_out,
                num_heads,
                4.0,
                q_stride,
                window_size,
                vbb.pp(i),
            )?);
            embed_dim = dim_out;
        }
        let channel_list = if cfg.return_interm_layers {
            stage_ends.iter().rev().map(|&i| blocks[i].dim_out).collect()
        } else {
            vec![blocks[depth - 1].dim_out]
        };
        Ok(Self {
            patch_embed,
            pos_embed,
            pos_embed_window,
            blocks,
            stage_ends,
            return_interm_layers: cfg.return_interm_layers,
            channel_list,
            pos_cache: Default::default(),
        })
    }

    /// Output channels, lowest resolution first (the neck's `backbone_channel_list`).
    pub fn channel_list(&self) -> &[usize] {
        &self.channel_list
    }

    /// The position embedding for an `h×w` patch grid, `[1, h, w, C]`.
    pub fn pos_embed_for(&self, h: usize, w: usize) -> Result<Tensor> {
        let frozen = !self.pos_embed.track_op() && !self.pos_embed_window.track_op();
        if !frozen {
            return self.compute_pos_embed(h, w);
        }
        let key = (self.pos_embed.id(), self.pos_embed_window.id(), h, w);
        let mut cache = self.pos_cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((k, t)) = cache.as_ref() {
            if *k == key {
                return Ok(t.clone());
            }
        }
        let t = self.compute_pos_embed(h, w)?.contiguous()?;
        *cache = Some((key, t.clone()));
        Ok(t)
    }

    fn compute_pos_embed(&self, h: usize, w: usize) -> Result<Tensor> {
        let pe = resize_bicubic(&self.pos_embed, h, w)?;
        let (_, _, wh, ww) = self.pos_embed_window.dims4()?;
        if !h.is_multiple_of(wh) || !w.is_multiple_of(ww) {
            candle_core::bail!("patch grid {h}x{w} is not a multiple of the window embedding {wh}x{ww}");
        }
        let win = self.pos_embed_window.repeat((1, 1, h / wh, w / ww))?;
        (pe + win)?.permute((0, 2, 3, 1))
    }

    /// `x`: `[B, 3, S, S]` normalised image.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let _span = tracing::debug_span!("hiera").entered();
        let x = crate::ops::contiguous(&crate::ops::conv2d(&self.patch_embed, x)?.permute((0, 2, 3, 1))?)?;
        let (_, h, w, _) = x.dims4()?;
        let mut x = x.broadcast_add(&self.pos_embed_for(h, w)?)?;
        let last = *self.stage_ends.last().unwrap_or(&0);
        let mut outputs = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x)?;
            if i == last || (self.return_interm_layers && self.stage_ends.contains(&i)) {
                outputs.push(crate::ops::contiguous(&x.permute((0, 3, 1, 2))?)?);
            }
        }
        Ok(outputs)
    }

    /// Every adaptable linear with its path relative to the trunk (`blocks.3.attn.qkv`).
    pub fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            out.push((format!("blocks.{i}.attn.qkv"), &mut b.attn.qkv));
            out.push((format!("blocks.{i}.attn.proj"), &mut b.attn.proj));
            for (j, l) in b.mlp.layers.iter_mut().enumerate() {
                out.push((format!("blocks.{i}.mlp.layers.{j}"), l));
            }
            if let Some(p) = b.proj.as_mut() {
                out.push((format!("blocks.{i}.proj"), p));
            }
        }
        out
    }
}

/// `F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)` on `[N, C, H, W]`.
fn resize_bicubic(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    sgp_kernels::resize::bicubic(x, h, w).map_err(|e| match e {
        sgp_kernels::Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cached_pos_embed_equals_a_fresh_one_and_follows_new_weights() -> Result<()> {
        let dev = Device::Cpu;
        let cfg =
            crate::config::Sam2Config::preset("sam2.1_hiera_t").map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev);
        let mut hiera = Hiera::new(&cfg.image_encoder.trunk, vb)?;
        // Frozen copies (plain tensors), as inference loads them.
        hiera.pos_embed = (Tensor::randn(0f32, 1.0, hiera.pos_embed.dims(), &dev)?).detach();
        hiera.pos_embed_window = Tensor::randn(0f32, 1.0, hiera.pos_embed_window.dims(), &dev)?.detach();
        let first = hiera.pos_embed_for(32, 32)?;
        let again = hiera.pos_embed_for(32, 32)?;
        let fresh = hiera.compute_pos_embed(32, 32)?;
        assert_eq!(sgp_kernels::testing::max_abs_diff(&first, &fresh).unwrap(), 0.0);
        assert_eq!(sgp_kernels::testing::max_abs_diff(&again, &fresh).unwrap(), 0.0);
        // New weights: the cache must not answer with the old ones.
        hiera.pos_embed = (&hiera.pos_embed * 2.0)?;
        let changed = hiera.pos_embed_for(32, 32)?;
        let fresh = hiera.compute_pos_embed(32, 32)?;
        assert_eq!(sgp_kernels::testing::max_abs_diff(&changed, &fresh).unwrap(), 0.0);
        assert!(sgp_kernels::testing::max_abs_diff(&changed, &first).unwrap() > 0.0);
        Ok(())
    }

    /// A block with random (non-zero) weights: `tracked` keeps them as Vars (the official
    /// order of ops), otherwise plain tensors (the inference path).
    fn random_block(
        q_stride: Option<[usize; 2]>,
        ws: usize,
        tracked: bool,
        seed_map: &candle_nn::VarMap,
    ) -> Result<MultiScaleBlock> {
        let dev = Device::Cpu;
        let vb = VarBuilder::from_varmap(seed_map, candle_core::DType::F32, &dev);
        let block = MultiScaleBlock::new(8, 16, 2, 2.0, q_stride, ws, vb)?;
        if tracked {
            return Ok(block);
        }
        let tensors: std::collections::HashMap<String, Tensor> = seed_map
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        MultiScaleBlock::new(
            8,
            16,
            2,
            2.0,
            q_stride,
            ws,
            VarBuilder::from_tensors(tensors, candle_core::DType::F32, &dev),
        )
    }

    #[test]
    fn unpadded_inference_equals_the_padded_official_order() -> Result<()> {
        // Maps that do not tile into windows (7x10 in 4x4: a third of the tokens are
        // padding), with and without query pooling, and a global block.
        for (q_stride, ws) in [(None, 4usize), (Some([2, 2]), 4), (None, 0)] {
            let varmap = candle_nn::VarMap::new();
            let official = random_block(q_stride, ws, true, &varmap)?;
            // Non-zero biases everywhere, so the padding's qkv is not zero.
            for var in varmap.all_vars() {
                var.set(&Tensor::randn(0f32, 0.5, var.dims(), &Device::Cpu)?)?;
            }
            let fast = random_block(q_stride, ws, false, &varmap)?;
            let x = Tensor::randn(0f32, 1.0, (2, 7, 10, 8), &Device::Cpu)?;
            let want = official.forward(&x)?;
            let got = fast.forward(&x)?;
            assert_eq!(got.dims(), want.dims());
            let d = sgp_kernels::testing::max_abs_diff(&got, &want.detach()).unwrap();
            assert!(d < 1e-4, "q_stride {q_stride:?} ws {ws}: {d}");
        }
        Ok(())
    }

    #[test]
    fn window_partition_pads_and_unpartition_restores() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, (2 * 10 * 7 * 3) as f32, &dev)
            .unwrap()
            .reshape((2, 10, 7, 3))
            .unwrap();
        let (w, pad) = window_partition(&x, 4).unwrap();
        assert_eq!(pad, (12, 8));
        assert_eq!(w.dims(), &[2 * 3 * 2, 4, 4, 3]);
        // Window (b=0, row 0, col 1) starts at pixel (0, 4).
        let v: Vec<f32> = w.get(1).unwrap().get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        let want: Vec<f32> = x.get(0).unwrap().get(0).unwrap().get(4).unwrap().to_vec1().unwrap();
        assert_eq!(v, want);
        // The last window of a row holds padding zeros beyond column 7.
        let pad_px: Vec<f32> = w.get(1).unwrap().get(0).unwrap().get(3).unwrap().to_vec1().unwrap();
        assert_eq!(pad_px, vec![0.0; 3]);
        let back = window_unpartition(&w, 4, pad, (10, 7)).unwrap();
        let diff = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn chunked_attention_equals_single_pass() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 7, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 7, 4), &dev).unwrap();
        let full = crate::ops::scaled_dot_product_attention(&q, &k, &v).unwrap();
        // 2 heads × 7 keys = 14 scores per query row: 20 allows one row per chunk.
        let chunked = crate::ops::attention_chunked(&q, &k, &v, 20).unwrap();
        // Reference: softmax(q kᵀ / 2) v written out directly.
        let s = (q.matmul(&k.t().unwrap()).unwrap() / 2.0).unwrap();
        let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap();
        let want = p.matmul(&v).unwrap();
        for got in [full, chunked] {
            let d = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "{d}");
        }
    }
}
