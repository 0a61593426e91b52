//! Shared test helpers: the committed reduced SAM2.1 model (hidden_dim 32, S = 64) and
//! deterministic inputs.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use sgp_pma::PmgParts;
use sgp_sam2::{Sam2Config, Sam2Model, StrictWeights};

/// The reduced SAM2.1 case whose config and weights the tests reuse.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/parity/sam2.1_reduced/s64/sam_heads_box_point_single")
}

/// The reduced SAM2.1 model (random weights from the official code, hidden_dim 32, S 64).
pub fn reduced_model() -> Sam2Model {
    let dir = fixture_dir();
    let cfg = Sam2Config::from_file(&dir.join("config.json")).expect("fixture config");
    let w = StrictWeights::from_file(&dir.join("weights.safetensors"), &Device::Cpu).expect("fixture weights");
    Sam2Model::from_weights(&cfg, &w, &Device::Cpu).expect("fixture model")
}

/// SplitMix64 normal-ish values (sum of uniforms), reproducible across platforms.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Roughly N(0, 1): the sum of 4 uniforms, rescaled.
    pub fn normal(&mut self) -> f64 {
        let s: f64 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * (3.0f64).sqrt()
    }
    pub fn tensor(&mut self, dims: &[usize], scale: f64, dtype: DType) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| scale * self.normal()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

/// Pseudo-mask logits `[B, 1, s, s]` of discs (positive inside, sharp edge): item i has
/// centre `centres[i]` and radius `radii[i]` in the s×s frame; radius 0 = no object.
pub fn disc_logits(s: usize, centres: &[(f64, f64)], radii: &[f64]) -> Tensor {
    let mut v = Vec::with_capacity(centres.len() * s * s);
    for (&(cx, cy), &r) in centres.iter().zip(radii) {
        for y in 0..s {
            for x in 0..s {
                let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt();
                v.push(if r > 0.0 { 6.0 * (r - d).clamp(-1.0, 1.0) } else { -8.0 });
            }
        }
    }
    Tensor::from_vec(v, (centres.len(), 1, s, s), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// PMG-shaped inputs for the head without running PMG: `F'` and the high-res levels from
/// the model's own image features (so gradients can reach the encoder), pseudo-masks from
/// [`disc_logits`] at S/4, upsampled bilinearly to S like SAM2 does. `radii` are in S/4
/// pixels; 0 gives an empty pseudo-mask (no box).
pub fn pmg_parts(model: &Sam2Model, image: &Tensor, radii: &[f64]) -> PmgParts {
    let s = model.config().image_size;
    let (emb, hr) = model.image_features(image).expect("features");
    let b = image.dim(0).unwrap();
    let q = s / 4;
    let centres: Vec<(f64, f64)> = (0..b)
        .map(|i| (q as f64 * (0.4 + 0.1 * i as f64), q as f64 * 0.55))
        .collect();
    let low = disc_logits(q, &centres, radii);
    let high = sgp_kernels::resize::bilinear(&low, s, s, false).unwrap();
    PmgParts {
        pix_feat_with_mem: emb,
        pred_masks: low,
        pred_masks_high_res: high,
        object_score_logits: Tensor::full(3f32, (b, 1), &Device::Cpu).unwrap(),
        high_res_feats: hr,
    }
}

/// A normalised-looking input image `[b, 3, S, S]`.
pub fn image(model: &Sam2Model, b: usize, seed: u64) -> Tensor {
    let s = model.config().image_size;
    Rng::new(seed).tensor(&[b, 3, s, s], 1.0, DType::F32)
}

/// Every variable of a var map, by name, sorted.
pub fn vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Replaces every randomly initialised variable of `varmap` by seeded values of the same
/// scale (`1/√fan_in` for weights, 0.1 for vectors); constant ones (norm weights, zeros)
/// stay. candle's own init draws from an unseeded generator, and a finite-difference
/// check on a fresh draw each run would be flaky wherever a picked gradient is tiny.
pub fn reseed(varmap: &VarMap, seed: u64) {
    for (i, (name, var)) in vars(varmap).into_iter().enumerate() {
        let v = values(var.as_tensor());
        if v.iter().all(|x| *x == v[0]) {
            continue;
        }
        let dims = var.dims().to_vec();
        let scale = if dims.len() >= 2 {
            (dims[0] as f64 / v.len() as f64).sqrt()
        } else {
            0.1
        };
        let t = Rng::new(seed.wrapping_add(1000 * i as u64)).tensor(&dims, scale, var.dtype());
        set_var(varmap, &name, &t);
    }
}

pub fn set_var(varmap: &VarMap, name: &str, t: &Tensor) {
    let data = varmap.data().lock().unwrap();
    let v = data.get(name).unwrap_or_else(|| panic!("no variable {name}"));
    v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
}

pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn norm(t: &Tensor) -> f64 {
    values(t).iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Central finite differences on `picks` entries of each var against the autograd
/// gradient of `loss()`. Returns the worst `|g − fd| / max(|g|, |fd|, floor)`.
pub fn fd_check(vars: &[(String, Var)], loss: &dyn Fn() -> Tensor, step: f64, picks: usize, floor: f64) -> f64 {
    let grads = loss().backward().unwrap();
    let mut worst = 0.0f64;
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"));
        assert!(norm(g) > 0.0, "the gradient of {name} is zero");
        let g = values(g);
        let original = var.as_tensor().copy().unwrap();
        let base = values(&original);
        let n = base.len();
        for p in 0..picks.min(n) {
            let idx = (p * 7919 + 13) % n;
            let at = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                let t = Tensor::from_vec(v, original.shape(), original.device())
                    .unwrap()
                    .to_dtype(original.dtype())
                    .unwrap();
                var.set(&t).unwrap();
                loss().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
            };
            let fd = (at(step) - at(-step)) / (2.0 * step);
            var.set(&original).unwrap();
            let err = (g[idx] - fd).abs() / g[idx].abs().max(fd.abs()).max(floor);
            assert!(err.is_finite(), "{name}[{idx}]: autograd {} vs fd {fd}", g[idx]);
            if err > worst {
                worst = err;
            }
            if err > 1e-2 {
                eprintln!(
                    "{name}[{idx}]: autograd {} vs finite difference {fd} (rel err {err:.2e})",
                    g[idx]
                );
            }
        }
    }
    worst
}

/// A directional finite-difference check over all `vars` at once: returns the autograd
/// directional derivative `g·v` and the central difference `(L(θ+hv) − L(θ−hv)) / 2h` for
/// a unit direction `v`: the gradient's own direction mixed with a random one (weight
/// `random` for the random part; 0 = along the gradient, where `g·v = |g|` stands far
/// above f32 rounding). Robust in f32 where per-entry differences drown in rounding.
pub fn fd_directional(
    vars: &[(String, Var)],
    loss: &dyn Fn() -> Tensor,
    step: f64,
    seed: u64,
    random: f64,
) -> (f64, f64) {
    let grads = loss().backward().unwrap();
    let mut rng = Rng::new(seed);
    let gnorm: f64 = vars
        .iter()
        .map(|(n, v)| {
            norm(
                grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient reaches {n}")),
            )
            .powi(2)
        })
        .sum::<f64>()
        .sqrt();
    let rcount: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let dirs: Vec<Vec<f64>> = vars
        .iter()
        .map(|(_, v)| {
            let g = values(grads.get(v.as_tensor()).unwrap());
            g.iter()
                .map(|x| x / gnorm + random * rng.normal() / (rcount as f64).sqrt())
                .collect()
        })
        .collect();
    let total: f64 = dirs.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
    let originals: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let mut gv = 0.0;
    for (((name, var), d), _) in vars.iter().zip(&dirs).zip(&originals) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"));
        assert!(norm(g) > 0.0, "the gradient of {name} is zero");
        gv += values(g).iter().zip(d).map(|(a, b)| a * b / total).sum::<f64>();
    }
    let at = |t: f64| {
        for (((_, var), d), o) in vars.iter().zip(&dirs).zip(&originals) {
            let v: Vec<f64> = values(o).iter().zip(d).map(|(a, b)| a + t * b / total).collect();
            var.set(
                &Tensor::from_vec(v, o.shape(), o.device())
                    .unwrap()
                    .to_dtype(o.dtype())
                    .unwrap(),
            )
            .unwrap();
        }
        loss().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    let fd = (at(step) - at(-step)) / (2.0 * step);
    for ((_, var), o) in vars.iter().zip(&originals) {
        var.set(o).unwrap();
    }
    (gv, fd)
}
