//! Multi-class output: the label map rule on constructed probabilities, and one run for
//! two classes on the bundled demo scans (random reduced weights): classes batched give
//! the same probabilities as one class at a time, image features are computed once per
//! slice, and the label map follows the argmax / 0.5 rule.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use sgp_memory::support::image_features;
use sgp_memory::{
    label_map, segment_query, ClassSupports, PmgOutput, PropagationOptions, Selection, SupportCache, SupportItem,
    SupportPool, SupportPropagator, WeightsId,
};
use sgp_sam2::{Direction, Preprocess};

#[test]
fn label_map_is_argmax_with_background_below_one_half() {
    // 2 classes × 4 pixels.
    let p = Tensor::new(&[[0.9f32, 0.2, 0.49, 0.6], [0.3, 0.7, 0.1, 0.6]], &Device::Cpu)
        .unwrap()
        .reshape((2, 1, 2, 2))
        .unwrap();
    assert_eq!(
        label_map(&p, &[3, 5]).unwrap(),
        vec![3, 5, 0, 3],
        "tie → the earlier class"
    );
    assert!(label_map(&p, &[3]).is_err());
    assert!(label_map(&p, &[0, 1]).is_err(), "0 is the background");
}

fn demo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/demo")
        .join(rel)
}

/// A CT case as per-slice model inputs and two classes per slice: 1 = the lesion,
/// 2 = body tissue (HU > -400) outside the lesion.
struct Case {
    inputs: Vec<Tensor>,
    masks: Vec<BTreeMap<u32, Tensor>>,
    lesion_area: Vec<usize>,
}

fn read_case(name: &str, s: usize) -> Case {
    let img = sgp_data::read_image(&demo(&format!("imagesTr/{name}_0000.nii.gz"))).unwrap();
    let lab = sgp_data::read_labels(&demo(&format!("labelsTr/{name}.nii.gz"))).unwrap();
    let shape = img.shape().to_vec();
    let (nx, ny, nz) = (shape[0], shape[1], shape[2]);
    let pre = Preprocess::new(s).unwrap();
    let dev = Device::Cpu;
    let mut case = Case {
        inputs: Vec::new(),
        masks: Vec::new(),
        lesion_area: Vec::new(),
    };
    for z in 0..nz {
        let mut grey = Vec::with_capacity(nx * ny);
        let mut lesion = Vec::with_capacity(nx * ny);
        let mut body = Vec::with_capacity(nx * ny);
        for y in 0..ny {
            for x in 0..nx {
                let hu = img.data[[x, y, z]];
                let l = lab.data[[x, y, z]] > 0;
                grey.push(((hu + 1000.0) / 2000.0).clamp(0.0, 1.0));
                lesion.push(f32::from(l));
                body.push(f32::from(!l && hu > -400.0));
            }
        }
        let g = Tensor::from_vec(grey, (1, ny, nx), &dev).unwrap();
        let rgb = Tensor::cat(&[&g, &g, &g], 0).unwrap();
        case.inputs.push(pre.image(&rgb, &dev).unwrap().squeeze(0).unwrap());
        let to_s = |v: Vec<f32>| {
            let m = Tensor::from_vec(v, (ny, nx), &dev).unwrap();
            pre.mask(&m, &dev).unwrap().reshape((s, s)).unwrap()
        };
        case.lesion_area.push(lesion.iter().filter(|&&v| v > 0.0).count());
        case.masks
            .push(BTreeMap::from([(1u32, to_s(lesion)), (2u32, to_s(body))]));
    }
    case
}

#[test]
fn two_classes_in_one_run_on_the_demo_scans() {
    let model = reduced_model();
    let s = model.config().image_size;
    let lung1 = read_case("lung1", s);
    let lung2 = read_case("lung2", s);

    // Supports: lung1's lesion slices, plus one lung2 slice that leave-one-out must skip.
    let mut pool = SupportPool::new(
        &model,
        WeightsId::new("reduced"),
        "ct[-1000,1000]",
        SupportCache::in_memory(16),
    );
    let mut lesion_slices: Vec<usize> = (0..lung1.inputs.len()).filter(|&z| lung1.lesion_area[z] > 0).collect();
    lesion_slices.truncate(4);
    assert!(lesion_slices.len() >= 3, "the demo scan has lesion slices");
    for &z in &lesion_slices {
        let masks: BTreeMap<u32, Tensor> = lung1.masks[z]
            .iter()
            .filter(|(_, m)| m.sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
            .map(|(c, m)| (*c, m.clone()))
            .collect();
        pool.push(SupportItem {
            image: lung1.inputs[z].clone(),
            masks,
            case_id: "lung1".into(),
        })
        .unwrap();
    }
    let qz = (0..lung2.inputs.len()).max_by_key(|&z| lung2.lesion_area[z]).unwrap();
    let own = pool
        .push(SupportItem {
            image: lung2.inputs[qz].clone(),
            masks: lung2.masks[qz].clone(),
            case_id: "lung2".into(),
        })
        .unwrap();

    let query = &lung2.inputs[qz];
    let pooled =
        sgp_memory::support::pooled_of(&image_features(&model, &query.unsqueeze(0).unwrap()).unwrap()).unwrap();
    let k = 3;
    let both = pool
        .class_supports(&pooled, Some("lung2"), &[1, 2], k, Selection::TopK)
        .unwrap();
    for c in [1, 2] {
        let idx = pool.select(&pooled, Some("lung2"), c, k, Selection::TopK).unwrap();
        assert!(!idx.contains(&own), "leave-one-out");
    }
    assert_eq!(both.classes(), &[1, 2]);
    let mut ident = |p: &PmgOutput| Ok(p.pred_masks_high_res.clone());
    let pred = segment_query(&model, query, &both, &mut ident).unwrap();
    assert_eq!(pred.probabilities.dims(), [2, 1, s, s]);
    assert_eq!(pred.labels.len(), s * s);

    // Batched classes = one class at a time.
    for (i, c) in [1u32, 2].iter().enumerate() {
        let one = pool
            .class_supports(&pooled, Some("lung2"), &[*c], k, Selection::TopK)
            .unwrap();
        let single = segment_query(&model, query, &one, &mut ident).unwrap();
        let e = rel_err(&pred.probabilities.narrow(0, i, 1).unwrap(), &single.probabilities);
        assert!(e < 1e-5, "class {c}: batched differs from single by {e}");
    }

    // The label map by hand.
    let p: Vec<f32> = pred.probabilities.flatten_all().unwrap().to_vec1().unwrap();
    let hw = s * s;
    for px in 0..hw {
        let (a, b) = (p[px], p[hw + px]);
        let want = if a.max(b) < 0.5 {
            0
        } else if a >= b {
            1
        } else {
            2
        };
        assert_eq!(pred.labels[px], want, "pixel {px}");
    }

    // A few slices of the volume: features once per slice for both classes.
    let slices: Vec<Tensor> = lung2.inputs[qz.saturating_sub(1)..(qz + 2).min(lung2.inputs.len())].to_vec();
    let opts = PropagationOptions {
        direction: Direction::Forward,
        ..Default::default()
    };
    let mut prop = SupportPropagator::new(&model, opts);
    let preds = prop
        .run_collect(&slices, &both, &mut sgp_memory::identity_refine)
        .unwrap();
    assert_eq!(prop.encoder_calls(), slices.len());
    for pr in &preds {
        let labels = label_map(&pr.probabilities, both.classes()).unwrap();
        assert!(labels.iter().all(|l| [0, 1, 2].contains(l)));
    }
    // Unequal support counts are cut to the smallest, so classes still batch.
    let mut one_mem = |c: u32| pool.memories(&[0], c).unwrap();
    let uneven = ClassSupports::new(BTreeMap::from([
        (1, [one_mem(1), one_mem(1)].concat()),
        (2, one_mem(2)),
    ]))
    .unwrap();
    assert_eq!(uneven.k(), 1);
}
