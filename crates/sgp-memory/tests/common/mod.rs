//! Shared test helpers: the reduced SAM2.1 of the committed parity fixtures (S = 64,
//! random non-trivial weights) and deterministic synthetic images and masks.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sgp_memory::SupportItem;
use sgp_sam2::Sam2Config;
use sgp_sam2::Sam2Model;
use sgp_sam2::StrictWeights;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/sam2.1_reduced/s64/track_mask_t4")
}

/// The reduced SAM2.1 at S = 64 (hidden 32, mem_dim 8, 7 memories).
pub fn reduced_model() -> Sam2Model {
    let dir = fixture_dir();
    let cfg = Sam2Config::from_file(&dir.join("config.json")).expect("config");
    let w = StrictWeights::from_file(&dir.join("weights.safetensors"), &Device::Cpu).expect("weights");
    Sam2Model::from_weights(&cfg, &w, &Device::Cpu).expect("model")
}

/// A deterministic pseudo-random image `[3, s, s]` (normalised-input-like values).
pub fn image(seed: u64, s: usize) -> Tensor {
    let v: Vec<f32> = (0..3 * s * s)
        .map(|i| {
            let x = ((i as u64)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503))
                % 10_007) as f32;
            let smooth = (((i % s) as f32) * 0.11 + seed as f32).sin() + (((i / s) as f32) * 0.07).cos();
            (x / 10_007.0 - 0.5) + 0.8 * smooth
        })
        .collect();
    Tensor::from_vec(v, (3, s, s), &Device::Cpu).unwrap()
}

/// A disc mask `[s, s]` centred at (cx, cy) with radius r.
pub fn disc(s: usize, cx: f32, cy: f32, r: f32) -> Tensor {
    let v: Vec<f32> = (0..s * s)
        .map(|i| {
            let (y, x) = ((i / s) as f32, (i % s) as f32);
            f32::from((x - cx).powi(2) + (y - cy).powi(2) <= r * r)
        })
        .collect();
    Tensor::from_vec(v, (s, s), &Device::Cpu).unwrap()
}

/// Support item `seed` with class 1 (a disc) and, when `two_classes`, class 2 (another).
pub fn item(seed: u64, s: usize, case: &str, two_classes: bool) -> SupportItem {
    let f = seed as f32;
    let mut masks = BTreeMap::from([(1u32, disc(s, 20.0 + 3.0 * f, 24.0 + 2.0 * f, 9.0 + f))]);
    if two_classes {
        masks.insert(2, disc(s, 44.0 - 2.0 * f, 40.0, 7.0));
    }
    SupportItem {
        image: image(seed, s),
        masks,
        case_id: case.to_string(),
    }
}

/// Largest relative error `‖a−b‖/‖b‖`.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    d / n.max(1e-12)
}

/// Bitwise equality of two tensors.
pub fn bit_equal(a: &Tensor, b: &Tensor) -> bool {
    let a: Vec<u32> = a
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let b: Vec<u32> = b
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    a == b
}
