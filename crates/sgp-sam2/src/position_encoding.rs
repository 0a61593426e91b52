//! `PositionEmbeddingSine`: the fixed 2D sine/cosine encoding of the FPN levels and of
//! the memory encoder. It has no weights; its output depends only on the map size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor};

use crate::config::PositionEmbeddingSineConfig;

/// (H, W, device) of a cached encoding.
type EncodingKey = (usize, usize, String);

/// The 2D sine/cosine position encoding (DETR style), as in `sam2`.
#[derive(Debug, Clone)]
pub struct PositionEmbeddingSine {
    /// Features per axis (half of the configured `num_pos_feats`).
    num_pos_feats: usize,
    temperature: f64,
    normalize: bool,
    scale: f64,
    /// Encodings already computed, by (H, W, device): the FPN asks for the same four
    /// sizes on every image, and the sines cost as much as a 1×1 conv of the level.
    cache: Arc<Mutex<HashMap<EncodingKey, Tensor>>>,
}

impl PositionEmbeddingSine {
    /// Checks the config (an even, positive `num_pos_feats`).
    pub fn new(cfg: &PositionEmbeddingSineConfig) -> std::result::Result<Self, crate::Error> {
        if !cfg.num_pos_feats.is_multiple_of(2) || cfg.num_pos_feats == 0 {
            return Err(crate::Error::Config(
                "PositionEmbeddingSine needs an even, non-zero num_pos_feats".into(),
            ));
        }
        if cfg.scale.is_some() && !cfg.normalize {
            return Err(crate::Error::Config(
                "PositionEmbeddingSine: scale needs normalize=true".into(),
            ));
        }
        Ok(Self {
            num_pos_feats: cfg.num_pos_feats / 2,
            temperature: cfg.temperature,
            normalize: cfg.normalize,
            scale: cfg.scale.unwrap_or(2.0 * std::f64::consts::PI),
            cache: Arc::default(),
        })
    }

    /// Channels of the output (`num_pos_feats` as configured).
    pub fn channels(&self) -> usize {
        2 * self.num_pos_feats
    }

    /// The encoding `[C, H, W]` of an H×W map: y features first, then x features, each
    /// interleaving sin (even index) and cos (odd index) as the official `stack/flatten`.
    ///
    /// Computed in f32 with the official operation order so it matches to rounding.
    pub fn encode(&self, h: usize, w: usize, device: &Device) -> Result<Tensor> {
        let n = self.num_pos_feats;
        // dim_t = temperature ** (2 * (i // 2) / n), computed in f32 as torch does.
        let dim_t: Vec<f32> = (0..n)
            .map(|i| {
                let e = (2 * (i / 2)) as f32 / n as f32;
                (self.temperature as f32).powf(e)
            })
            .collect();
        let axis = |len: usize| -> Vec<f32> {
            (1..=len)
                .map(|v| {
                    let v = v as f32;
                    if self.normalize {
                        v / (len as f32 + 1e-6) * self.scale as f32
                    } else {
                        v
                    }
                })
                .collect()
        };
        let ys = axis(h);
        let xs = axis(w);
        let c = 2 * n;
        let mut out = vec![0f32; c * h * w];
        // Per-axis value for channel k of an embedding e: sin for even k, cos for odd k.
        let feat = |e: f32, k: usize| -> f32 {
            let v = e / dim_t[k];
            if k.is_multiple_of(2) {
                v.sin()
            } else {
                v.cos()
            }
        };
        for k in 0..n {
            for (yi, &y) in ys.iter().enumerate() {
                let fy = feat(y, k);
                for xi in 0..w {
                    out[(k * h + yi) * w + xi] = fy;
                }
            }
            for yi in 0..h {
                for (xi, &x) in xs.iter().enumerate() {
                    out[((n + k) * h + yi) * w + xi] = feat(x, k);
                }
            }
        }
        Tensor::from_vec(out, (c, h, w), device)
    }

    /// The official `forward(x)`: the encoding for `x`'s spatial size, repeated over the
    /// batch, `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _c, h, w) = x.dims4()?;
        let key = (h, w, format!("{:?}", x.device().location()));
        let cached = self.cache.lock().ok().and_then(|c| c.get(&key).cloned());
        let pe = match cached {
            Some(pe) => pe,
            None => {
                let pe = self.encode(h, w, x.device())?;
                if let Ok(mut c) = self.cache.lock() {
                    c.insert(key, pe.clone());
                }
                pe
            }
        };
        let pe = pe.to_dtype(x.dtype())?.unsqueeze(0)?;
        if b == 1 {
            Ok(pe)
        } else {
            pe.repeat((b, 1, 1, 1))
        }
    }
}
