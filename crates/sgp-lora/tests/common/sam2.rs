//! A reduced SAM2.1 (tiny Hiera, 64 px input) with deterministic random weights.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sgp_sam2::Sam2Config;

/// Serves a seeded random tensor for every requested name: weights scaled by
/// 1/sqrt(fan_in), norm weights near 1, small biases and embeddings.
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let dims = s.dims().to_vec();
        let mut rng = super::Rng::new(name_seed(self.seed, name));
        let is_norm = name.contains("norm") && name.ends_with("weight");
        let (offset, scale) = if is_norm {
            (1.0, 0.1)
        } else if name.ends_with("bias") || dims.len() < 2 {
            (0.0, 0.1)
        } else {
            (0.0, 1.0 / (dims[1..].iter().product::<usize>() as f64).sqrt())
        };
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| offset + scale * rng.next()).collect();
        Tensor::from_vec(v, dims, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

pub fn random_vb(seed: u64, dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights::new(seed)), dtype, Device::Cpu)
}

/// SAM2.1 hiera_t's config with a tiny trunk (embed 8, stages [1, 2, 2, 1], with
/// windowed, global and q-pooling blocks) at 64 px.
pub fn tiny_sam2_config() -> Sam2Config {
    let mut cfg = Sam2Config::preset("sam2.1_hiera_t").expect("preset");
    let trunk = &mut cfg.image_encoder.trunk;
    trunk.embed_dim = 8;
    trunk.num_heads = 1;
    trunk.stages = vec![1, 2, 2, 1];
    trunk.global_att_blocks = vec![3];
    trunk.window_pos_embed_bkg_spatial_size = [4, 4];
    trunk.window_spec = vec![8, 4, 4, 2];
    cfg.image_encoder.neck.backbone_channel_list = vec![64, 32, 16, 8];
    cfg.with_image_size(64).expect("image size")
}
