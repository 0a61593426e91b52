//! A small stand-in for Hiera made of `AdaptableLinear`s, with Hiera's layer paths
//! and width changes, to test the LoRA machinery independently of `sgp-sam2`'s model.
#![allow(dead_code)]

pub mod demo;
pub mod gradcheck;
pub mod sam2;

use candle_core::{DType, Device, Module, Result, Tensor};
use sgp_kernels::testing::max_abs_diff;
use sgp_sam2::{AdaptableLinear, AdaptableModel};

/// Deterministic pseudo-random numbers in [-1, 1) (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    pub fn tensor(&mut self, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.next() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

pub struct ToyBlock {
    pub dim: usize,
    pub dim_out: usize,
    pub qkv: AdaptableLinear,
    pub proj: AdaptableLinear,
    pub mlp0: AdaptableLinear,
    pub mlp1: AdaptableLinear,
}

/// Blocks `i` with widths `(dim, dim_out)` under `toy.trunk.blocks.{i}`:
/// `h = proj(tanh(q)·sigmoid(k) + v) + x (if same width)`, `y = h + mlp(h)`.
pub struct ToyModel {
    pub blocks: Vec<ToyBlock>,
}

fn linear(rng: &mut Rng, i: usize, o: usize, dtype: DType) -> AdaptableLinear {
    let s = 1.0 / (i as f64).sqrt();
    AdaptableLinear::new(rng.tensor(&[o, i], s, dtype), Some(rng.tensor(&[o], 0.1, dtype)))
}

impl ToyModel {
    pub fn new(block_dims: &[(usize, usize)], seed: u64, dtype: DType) -> Self {
        let mut rng = Rng::new(seed);
        let blocks = block_dims
            .iter()
            .map(|&(dim, dim_out)| ToyBlock {
                dim,
                dim_out,
                qkv: linear(&mut rng, dim, 3 * dim_out, dtype),
                proj: linear(&mut rng, dim_out, dim_out, dtype),
                mlp0: linear(&mut rng, dim_out, 2 * dim_out, dtype),
                mlp1: linear(&mut rng, 2 * dim_out, dim_out, dtype),
            })
            .collect();
        Self { blocks }
    }

    /// `x`: `[batch, tokens, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for b in &self.blocks {
            let qkv = b.qkv.forward(&x)?;
            let q = qkv.narrow(2, 0, b.dim_out)?;
            let k = qkv.narrow(2, b.dim_out, b.dim_out)?;
            let v = qkv.narrow(2, 2 * b.dim_out, b.dim_out)?;
            let h = ((q.tanh()? * candle_nn::ops::sigmoid(&k)?)? + v)?;
            let mut h = b.proj.forward(&h)?;
            if b.dim == b.dim_out {
                h = (h + &x)?;
            }
            let m = b.mlp1.forward(&b.mlp0.forward(&h)?.gelu_erf()?)?;
            x = (h + m)?;
        }
        Ok(x)
    }

    pub fn weights(&self) -> Vec<Tensor> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.qkv, &b.proj, &b.mlp0, &b.mlp1])
            .flat_map(|l| [Some(l.weight().clone()), l.bias().cloned()])
            .flatten()
            .collect()
    }
}

impl AdaptableModel for ToyModel {
    fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("toy.trunk.blocks.{i}");
            out.push((format!("{p}.attn.qkv"), &mut b.qkv));
            out.push((format!("{p}.attn.proj"), &mut b.proj));
            out.push((format!("{p}.mlp.layers.0"), &mut b.mlp0));
            out.push((format!("{p}.mlp.layers.1"), &mut b.mlp1));
        }
        out
    }
}

/// Raw bytes-equal comparison of f32/f64 tensors (as f64 values, which is exact).
pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Exact equality (as values; +0 and -0 compare equal), with a short failure message.
pub fn assert_bit_identical(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (va, vb) = (values(a), values(b));
    let differing = va.iter().zip(&vb).filter(|(x, y)| x != y).count();
    assert!(
        differing == 0,
        "{what}: {differing} of {} values differ (max abs diff {:e})",
        va.len(),
        max_abs_diff(a, b).unwrap()
    );
}

/// Byte-level snapshot of tensors, to check that training leaves them untouched.
pub fn snapshot(ts: &[Tensor]) -> Vec<Vec<u8>> {
    ts.iter()
        .map(|t| {
            let t = t.flatten_all().unwrap();
            match t.dtype() {
                DType::F64 => t
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                _ => t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            }
        })
        .collect()
}
