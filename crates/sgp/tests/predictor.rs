//! Prompt-free prediction end to end with the committed reduced SAM2.1 weights (random,
//! S = 64): the bundled demo (3D, supports from the other cases), a DICOM series, and a
//! small multi-class 2D folder. Random weights give arbitrary masks, so these tests check
//! what must hold whatever the weights: geometry, label values, leave-one-out, the cache.

use std::path::PathBuf;

mod common;

use common::{make_2d_folder, reduced, root};
use sgp::predictor::{CaseData, PredictorOptions, SgpPredictor};
use sgp::{predict_to_file, HeadChoice, PredictRequest};
use sgp_memory::SupportCache;

fn request(input: PathBuf, out: PathBuf, cache_dir: Option<PathBuf>) -> PredictRequest {
    PredictRequest {
        support: root().join("datasets/demo"),
        support_kind: None,
        input,
        out,
        modality: None,
        cache_dir,
        options: PredictorOptions {
            support_size: 2,
            support_slices: 2,
            ..PredictorOptions::default()
        },
    }
}

#[test]
fn demo_volume_from_the_other_cases_keeps_geometry_and_hits_the_cache() {
    let (loaded, id) = reduced();
    let tmp = tempfile::tempdir().unwrap();
    let input = root().join("datasets/demo/imagesTr/lung1_0000.nii.gz");
    let cache = tmp.path().join("cache");
    let out1 = tmp.path().join("a/lung1.nii.gz");
    let mut steps = Vec::new();
    let r1 = predict_to_file(
        &loaded.model,
        &id,
        &HeadChoice::TrainingFree,
        &request(input.clone(), out1.clone(), Some(cache.clone())),
        &mut |d, t| steps.push((d, t)),
    )
    .unwrap();
    // lung1 is the query: its own case is not a support.
    assert_eq!(r1.support_cases, 4);
    assert_eq!(r1.planes, 11);
    assert!(r1.support_encoder_calls > 0);
    assert_eq!(steps.last().map(|s| s.0), steps.last().map(|s| s.1));

    let img = sgp_data::read_image(&input).unwrap();
    let pred = sgp_data::read_labels(&out1).unwrap();
    assert_eq!(pred.shape(), img.shape());
    assert!(pred
        .geometry
        .as_ref()
        .unwrap()
        .same_grid(img.geometry.as_ref().unwrap(), 1e-6));
    assert!(pred.data.iter().all(|&v| v <= 1), "labels beyond the demo's classes");
    assert_eq!(r1.classes, vec![1]);

    // Second run over the same supports: every support from the disk cache, same output.
    let out2 = tmp.path().join("b/lung1.nii.gz");
    let r2 = predict_to_file(
        &loaded.model,
        &id,
        &HeadChoice::TrainingFree,
        &request(input, out2.clone(), Some(cache)),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(r2.support_encoder_calls, 0);
    assert_eq!(r2.support_items, r1.support_items);
    assert_eq!(sgp_data::read_labels(&out2).unwrap().data, pred.data);
}

#[test]
fn dicom_series_in_nifti_out_on_its_grid() {
    let (loaded, id) = reduced();
    let tmp = tempfile::tempdir().unwrap();
    let input = root().join("fixtures/dicom/oblique_ct");
    let out = tmp.path().join("series.nii.gz");
    let mut req = request(input.clone(), out.clone(), None);
    req.modality = Some("ct".into());
    let r = predict_to_file(&loaded.model, &id, &HeadChoice::TrainingFree, &req, &mut |_, _| {}).unwrap();
    assert_eq!(r.planes, 4);
    let dcm = sgp_data::dicom::read_series(&input).unwrap();
    let pred = sgp_data::read_labels(&out).unwrap();
    assert_eq!(pred.shape(), &[32, 24, 4]);
    let (a, b) = (pred.geometry.unwrap().affine(), dcm.geometry.unwrap().affine());
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn bad_requests_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let input = root().join("datasets/demo/imagesTr/lung1_0000.nii.gz");
    let png_for_volume = request(input.clone(), tmp.path().join("x.png"), None);
    assert!(png_for_volume.validate().unwrap_err().to_string().contains("NIfTI"));
    let missing = request(tmp.path().join("nope.nii.gz"), tmp.path().join("x.nii.gz"), None);
    assert!(missing.validate().unwrap_err().to_string().contains("not found"));
    let (loaded, id) = reduced();
    let mut no_support = request(input, tmp.path().join("x.nii.gz"), None);
    no_support.support = tmp.path().to_path_buf();
    let err = predict_to_file(
        &loaded.model,
        &id,
        &HeadChoice::TrainingFree,
        &no_support,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("no dataset layout fits"), "{err}");
}

#[test]
fn multi_class_2d_label_map_from_a_folder() {
    let (loaded, id) = reduced();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("folder");
    make_2d_folder(&data, 5);
    let out = tmp.path().join("pred.png");
    let mut req = request(data.join("images/img4.png"), out.clone(), None);
    req.support = data.clone();
    let r = predict_to_file(&loaded.model, &id, &HeadChoice::TrainingFree, &req, &mut |_, _| {}).unwrap();
    assert_eq!(r.classes, vec![1, 2]);
    assert_eq!(r.support_cases, 4, "the query image is left out of its own supports");
    let pred = sgp_data::read_labels(&out).unwrap();
    assert_eq!(pred.shape(), &[40, 48]);
    assert!(pred.data.iter().all(|&v| v <= 2));

    // The library call with the pseudo-mask only, one class: only that class can appear.
    let ds = sgp_data::load(sgp_data::DatasetKind::Folder, &data).unwrap();
    let options = PredictorOptions {
        support_size: 2,
        classes: Some(vec![2]),
        ..PredictorOptions::default()
    };
    let predictor = SgpPredictor::new(&loaded.model, None, options).unwrap();
    let mut pool = predictor.pool(SupportCache::in_memory(16), id);
    for case in &ds.cases[..4] {
        predictor
            .add_support_case(&mut pool, &CaseData::read(case, &ds.labels, 2).unwrap())
            .unwrap();
    }
    assert_eq!(pool.classes().into_iter().collect::<Vec<_>>(), vec![2]);
    let query = CaseData::read(&ds.cases[4], &ds.labels, 2).unwrap();
    let p = predictor.predict_image(&query, &mut pool).unwrap();
    assert_eq!(p.classes, vec![2]);
    assert!(p.labels.iter().all(|&v| v == 0 || v == 2));
}
