//! Preprocessing (intensity, resize, slices, orientation) and patient-level splits.

#![allow(clippy::field_reassign_with_default, clippy::excessive_precision)]

use std::collections::{BTreeMap, BTreeSet};

use ndarray::{array, Array2, ArrayD, IxDyn};
use sgp_data::preprocess::*;
use sgp_data::{split_by_patient, Case, DataError, Modality, SplitConfig};

fn ramp_3x4() -> Array2<f32> {
    // x = arange(12).reshape(3, 4) ** 1.5, the input of the torch reference values below.
    Array2::from_shape_fn((3, 4), |(r, c)| ((r * 4 + c) as f32).powf(1.5))
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

#[test]
fn resize_matches_torch_interpolate() {
    // References: torch 2.5.1 F.interpolate(x, size, mode="bilinear", align_corners=False,
    // antialias=True/False) and mode="nearest", on the same input.
    let x = ramp_3x4();
    let aa = resize_bilinear(x.view(), 2, 3, true).unwrap();
    assert!(
        close(
            aa.as_slice().unwrap(),
            &[3.545288, 6.048373, 9.318622, 18.319782, 23.171608, 28.405502],
            1e-5
        ),
        "{aa}"
    );
    let plain = resize_bilinear(x.view(), 2, 3, false).unwrap();
    assert!(
        close(
            plain.as_slice().unwrap(),
            &[2.257514, 4.670320, 8.071909, 19.649651, 25.218201, 31.225403],
            1e-5
        ),
        "{plain}"
    );
    let up = resize_bilinear(x.view(), 5, 7, true).unwrap();
    assert!(
        close(
            &up.as_slice().unwrap()[..8],
            &[0.0, 0.357143, 0.928571, 1.914214, 2.997551, 4.350536, 5.196152, 3.2],
            1e-5
        ),
        "{up}"
    );
    let labels = x.mapv(|v| v as u16);
    let near = resize_nearest(labels.view(), 5, 7).unwrap();
    assert_eq!(&near.as_slice().unwrap()[..8], &[0, 0, 1, 1, 2, 2, 5, 0]);
    assert!(resize_bilinear(x.view(), 0, 3, false).is_err());
}

#[test]
fn intensity_methods() {
    let v: Vec<f32> = (1..=10).map(|x| x as f32).collect();
    assert_eq!(percentile(&v, 50.0), Some(5.5));
    assert!((percentile(&v, 0.5).unwrap() - 1.045).abs() < 1e-6);
    assert_eq!(percentile(&[], 50.0), None);
    let ct = ArrayD::from_shape_vec(IxDyn(&[3]), vec![-1000.0f32, 40.0, 1000.0]).unwrap();
    let w = normalize_intensity(&ct, IntensityMethod::CT_SOFT_TISSUE, None).unwrap();
    assert_eq!(w.as_slice().unwrap(), &[0.0, 0.5, 1.0]);
    let mm = normalize_intensity(&ct, IntensityMethod::MinMax, None).unwrap();
    assert!((mm[[1]] - 0.52).abs() < 1e-6);
    // Percentiles of a foreground only: the outlier outside it is clipped.
    let data = ArrayD::from_shape_vec(IxDyn(&[5]), vec![0.0f32, 10.0, 20.0, 30.0, 1e6]).unwrap();
    let fg = data.mapv(|v| v > 5.0 && v < 1e5);
    let p = normalize_intensity(&data, IntensityMethod::Percentile { low: 0.0, high: 100.0 }, Some(&fg)).unwrap();
    assert_eq!(p.as_slice().unwrap(), &[0.0, 0.0, 0.5, 1.0, 1.0]);
    // Constant and non-finite inputs do not divide by zero.
    let flat = ArrayD::from_elem(IxDyn(&[4]), 7.0f32);
    assert!(normalize_intensity(&flat, IntensityMethod::MinMax, None)
        .unwrap()
        .iter()
        .all(|&v| v == 0.0));
    let nan = ArrayD::from_shape_vec(IxDyn(&[2]), vec![f32::NAN, 1.0]).unwrap();
    assert!(
        normalize_intensity(&nan, IntensityMethod::default_for(&Modality::Ct), None)
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    );
    assert!(normalize_intensity(&flat, IntensityMethod::Window { level: 0.0, width: 0.0 }, None).is_err());
    assert_eq!(IntensityMethod::default_for(&Modality::Us), IntensityMethod::MinMax);
}

#[test]
fn slices_follow_the_documented_convention_and_round_trip() {
    let data = ArrayD::from_shape_fn(IxDyn(&[4, 3, 2]), |ix| (ix[0] * 100 + ix[1] * 10 + ix[2]) as u16);
    let s = slice_2d(&data, 2, 1).unwrap();
    assert_eq!(s.dim(), (3, 4)); // rows = y, cols = x
    assert_eq!(s[[2, 3]], data[[3, 2, 1]]);
    let s0 = slice_2d(&data, 0, 2).unwrap();
    assert_eq!(s0.dim(), (2, 3));
    assert_eq!(s0[[1, 2]], data[[2, 2, 1]]);
    let mut out = ArrayD::<u16>::zeros(IxDyn(&[4, 3, 2]));
    for axis in 0..3 {
        out.fill(0);
        for k in 0..data.shape()[axis] {
            set_slice_2d(&mut out, axis, k, slice_2d(&data, axis, k).unwrap().view()).unwrap();
        }
        assert_eq!(out, data);
    }
    assert!(slice_2d(&data, 2, 2).is_err());
    assert!(slice_2d(&data, 3, 0).is_err());
    assert!(set_slice_2d(&mut out, 2, 0, array![[1u16, 2]].view()).is_err());
}

#[test]
fn reorientation_to_ras_and_back() {
    // Voxel axis 0 runs towards -A, axis 1 towards +R, axis 2 towards -S.
    let affine = [
        [0.0, 0.8, 0.0, 0.0],
        [-0.5, 0.0, 0.0, 0.0],
        [0.0, 0.0, -2.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let r = Reorientation::from_affine(&affine);
    assert_eq!(r.perm, [1, 0, 2]);
    assert_eq!(r.flip, [false, true, true]);
    let data = ArrayD::from_shape_fn(IxDyn(&[4, 3, 2]), |ix| (ix[0] * 100 + ix[1] * 10 + ix[2]) as i32);
    let c = r.to_canonical(&data).unwrap();
    assert_eq!(c.shape(), &[3, 4, 2]);
    // Canonical (R, A, S) = stored (i1, 3 - i0, 1 - i2).
    assert_eq!(c[[2, 0, 0]], data[[3, 2, 1]]);
    assert_eq!(r.from_canonical(&c).unwrap(), data);
    let identity = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert!(Reorientation::from_affine(&identity).is_identity());
}

fn cases(n_patients: usize, per_patient: usize) -> Vec<Case> {
    (0..n_patients)
        .flat_map(|p| {
            (0..per_patient).map(move |k| Case {
                id: format!("p{p:03}_{k}"),
                patient: format!("p{p:03}"),
                images: vec![],
                labels: vec![],
                modality: Modality::Mr,
                meta: BTreeMap::new(),
            })
        })
        .collect()
}

#[test]
fn patient_splits_are_disjoint_complete_and_deterministic() {
    let cs = cases(50, 2);
    let cfg = SplitConfig {
        seed: 7,
        support_patients: 5,
        val_fraction: 0.1,
        test_fraction: 0.2,
    };
    let s = split_by_patient(&cs, &cfg).unwrap();
    assert_eq!(
        (s.support.len(), s.val.len(), s.test.len(), s.train.len()),
        (10, 10, 20, 60)
    );
    let patient_of = |id: &str| id.split('_').next().unwrap().to_string();
    let mut side_of_patient: BTreeMap<String, &str> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (side, ids) in s.sides() {
        for id in ids {
            assert!(seen.insert(id.clone()), "{id} twice");
            let prev = side_of_patient.insert(patient_of(id), side);
            assert!(
                prev.is_none() || prev == Some(side),
                "patient of {id} on {prev:?} and {side}"
            );
        }
    }
    assert_eq!(seen.len(), cs.len());
    assert_eq!(split_by_patient(&cs, &cfg).unwrap(), s);
    let other = split_by_patient(&cs, &SplitConfig { seed: 8, ..cfg }).unwrap();
    assert_ne!(other.test, s.test);
    // Order of the input cases does not matter.
    let mut rev = cs.clone();
    rev.reverse();
    let r = split_by_patient(&rev, &cfg).unwrap();
    let set = |v: &Vec<String>| v.iter().cloned().collect::<BTreeSet<_>>();
    assert_eq!(set(&r.test), set(&s.test));
}

#[test]
fn impossible_splits_are_errors() {
    assert!(matches!(
        split_by_patient(&[], &SplitConfig::default()),
        Err(DataError::InvalidArgument(_))
    ));
    let cs = cases(3, 1);
    let cfg = SplitConfig {
        seed: 0,
        support_patients: 3,
        val_fraction: 0.4,
        test_fraction: 0.0,
    };
    assert!(split_by_patient(&cs, &cfg).is_err());
    assert!(split_by_patient(
        &cs,
        &SplitConfig {
            val_fraction: 1.5,
            ..SplitConfig::default()
        }
    )
    .is_err());
}
