//! Volume propagation on a real scan of `datasets/demo` with a reduced SAM2.1 (random
//! weights, 128 px): bounded memory must not change any prediction, and the written label
//! volume keeps the scan's geometry.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result as CResult, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sgp_sam2::Sam2Config;
use sgp_sam2::Sam2Model;
use sgp_sam2::{Direction, MemoryBankPolicy, PolicyContext, SlicePrompt, SliceSource, VolumePropagator, VolumeSlices};
use sgp_sam2::{MemoryBank, MemorySelection};

fn demo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/demo")
        .join(rel)
}

/// SAM2.1 hiera-t at 128 px with a short memory (3 frames, 4 pointers) so that a
/// 11-slice scan exercises eviction; every parameter random and non-trivial.
fn reduced_model() -> CResult<Sam2Model> {
    let mut cfg = Sam2Config::preset("sam2.1_hiera_t")
        .unwrap()
        .with_image_size(128)
        .unwrap()
        .with_real_use_settings();
    cfg.num_maskmem = 3;
    cfg.max_obj_ptrs_in_encoder = 4;
    let dev = Device::Cpu;
    // The VarMap only lists every parameter; the model is built from plain tensors so
    // that inference is untracked (fast kernels, no autograd graph), as with real weights.
    let varmap = VarMap::new();
    Sam2Model::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let mut vars: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors = std::collections::HashMap::new();
    for (i, (name, t)) in vars.iter().enumerate() {
        // Deterministic pseudo-random values per tensor (seeded by position).
        let n = t.elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|j| {
                let x = ((i * 7919 + j * 104_729) as f64 * 0.618_033_988_75).fract() as f32;
                let r = (x - 0.5) * 0.2;
                if name.contains("norm") && name.ends_with("weight") {
                    1.0 + r
                } else {
                    r
                }
            })
            .collect();
        tensors.insert(name.clone(), Tensor::from_vec(vals, t.shape(), &dev)?);
    }
    Ok(Sam2Model::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev)).unwrap())
}

/// The scan as [0, 1] slices along z, and its ground-truth label.
fn lung1() -> (sgp_data::Volume<f32>, VolumeSlices, sgp_data::Volume<u16>) {
    let img = sgp_data::read_image(&demo("imagesTr/lung1_0000.nii.gz")).unwrap();
    let lab = sgp_data::read_labels(&demo("labelsTr/lung1.nii.gz")).unwrap();
    let shape: [usize; 3] = img.shape().try_into().unwrap();
    let (lo, hi) = img
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let vals: Vec<f32> = img.data.iter().map(|&v| (v - lo) / (hi - lo).max(1e-6)).collect();
    let slices = VolumeSlices::new(vals, shape, 2).unwrap();
    (img, slices, lab)
}

/// Box of the ground-truth label on slice `z` in slice pixels (x → columns, y → rows).
fn label_box(lab: &sgp_data::Volume<u16>, z: usize) -> [f32; 4] {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for ((x, y, zz), &v) in lab
        .data
        .view()
        .into_dimensionality::<ndarray::Ix3>()
        .unwrap()
        .indexed_iter()
    {
        if zz == z && v > 0 {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    assert!(x0 <= x1, "slice {z} has no label");
    [x0 as f32, y0 as f32, x1 as f32 + 1.0, y1 as f32 + 1.0]
}

/// SAM2's selection without ever forgetting: the unbounded reference.
struct KeepAll;
impl MemoryBankPolicy for KeepAll {
    fn select<'b>(
        &mut self,
        m: &Sam2Model,
        c: &PolicyContext,
        b: &'b MemoryBank,
    ) -> sgp_sam2::Result<MemorySelection<'b>> {
        m.select_memories(c.frame_idx, b, c.num_frames, c.reverse)
    }
    fn evict(&mut self, _: &Sam2Model, _: &PolicyContext, _: &mut MemoryBank, _: &[(usize, bool)]) {}
}

#[test]
fn bounded_memory_predicts_like_the_full_bank_both_ways() {
    let model = reduced_model().unwrap();
    let (_, slices, lab) = lung1();
    let n = 11;
    assert_eq!(slices.num_slices(), n);
    let z = 5;
    let prompts = vec![(z, SlicePrompt::Box(label_box(&lab, z)))];

    let mut bounded = VolumePropagator::new(&model);
    let a = bounded
        .propagate_collect(&slices, &prompts, Direction::BothWays)
        .unwrap();
    let mut full = VolumePropagator::with_policy(&model, KeepAll);
    let b = full.propagate_collect(&slices, &prompts, Direction::BothWays).unwrap();

    assert!(
        bounded.peak_bank_len < full.peak_bank_len,
        "{} vs {}",
        bounded.peak_bank_len,
        full.peak_bank_len
    );
    assert_eq!(full.peak_bank_len, n, "the reference keeps every slice");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let (x, y) = (
            x.as_ref().expect("every slice predicted"),
            y.as_ref().expect("every slice predicted"),
        );
        assert_eq!(x.prompted, i == z);
        assert_eq!(x.low_res_logits.dims(), [32, 32]);
        let d = (&x.low_res_logits - &y.low_res_logits)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "slice {i} differs by {d}");
        assert_eq!(x.object_score, y.object_score);
    }
}

#[test]
fn forward_and_backward_cover_their_side_only() {
    let model = reduced_model().unwrap();
    let (_, slices, lab) = lung1();
    let z = 4;
    let prompts = vec![(z, SlicePrompt::Box(label_box(&lab, z)))];
    let mut p = VolumePropagator::new(&model);
    let fwd = p.propagate_collect(&slices, &prompts, Direction::Forward).unwrap();
    let bwd = p.propagate_collect(&slices, &prompts, Direction::Backward).unwrap();
    for i in 0..11 {
        assert_eq!(fwd[i].is_some(), i >= z, "forward slice {i}");
        assert_eq!(bwd[i].is_some(), i <= z, "backward slice {i}");
    }
    // The prompted slice does not depend on the direction.
    assert_eq!(
        fwd[z].as_ref().unwrap().object_score,
        bwd[z].as_ref().unwrap().object_score
    );
}

#[test]
fn label_volume_round_trips_with_the_scan_geometry() {
    let model = reduced_model().unwrap();
    let (img, slices, lab) = lung1();
    let z = 5;
    // A mask prompt from the ground truth of slice z (rows y, columns x).
    let (h, w) = slices.slice_hw();
    let l3 = lab.data.view().into_dimensionality::<ndarray::Ix3>().unwrap();
    let m: Vec<f32> = (0..h)
        .flat_map(|r| (0..w).map(move |c| (r, c)))
        .map(|(r, c)| f32::from(l3[[c, r, z]] > 0))
        .collect();
    let mask = Tensor::from_vec(m, (h, w), &Device::Cpu).unwrap();
    let mut p = VolumePropagator::new(&model);
    let mut progress = Vec::new();
    let labels = p
        .segment_volume(
            &slices,
            &[(z, SlicePrompt::Mask(mask))],
            Direction::BothWays,
            &mut |d, t| progress.push((d, t)),
        )
        .unwrap();
    assert_eq!(progress.last(), Some(&(11, 11)));
    let shape = img.shape().to_vec();
    let arr =
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), labels.iter().map(|&v| v as u16).collect()).unwrap();
    // The prompted slice reproduces the prompt: mask-as-output gives ±10 logits.
    // (Up to the S/4 = 32 px resolution of the logits.)
    let gt = l3.index_axis(ndarray::Axis(2), z);
    let ours = arr.index_axis(ndarray::Axis(2), z);
    let inter = gt.iter().zip(ours.iter()).filter(|(&g, &o)| g > 0 && o > 0).count();
    let union = gt.iter().zip(ours.iter()).filter(|(&g, &o)| g > 0 || o > 0).count();
    assert!(union > 0 && inter as f64 / union as f64 > 0.75, "IoU {inter}/{union}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pred.nii.gz");
    sgp_data::write_labels_like(&out, &arr, &img).unwrap();
    let back = sgp_data::read_labels(&out).unwrap();
    assert_eq!(back.shape(), img.shape());
    assert_eq!(back.data, arr);
    let (g0, g1) = (img.geometry.as_ref().unwrap(), back.geometry.as_ref().unwrap());
    assert!(g0.same_grid(g1, 1e-6), "geometry changed");
    assert_eq!(g0.affine(), g1.affine());
}
