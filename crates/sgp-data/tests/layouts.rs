//! Every layout loader on small folders built here, in the exact distributed layout, plus
//! verify's findings on broken copies.

#![allow(clippy::field_reassign_with_default, clippy::excessive_precision)]

use std::fs;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use sgp_data::verify::Severity;
use sgp_data::{load, verify, DataError, DatasetKind, Modality};

fn nii_u8(path: &Path, shape: &[usize], f: impl Fn(&[usize]) -> u8) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let data = ArrayD::from_shape_fn(IxDyn(shape), |ix| f(ndarray::Dimension::slice(&ix)));
    let mut h = nifti::NiftiHeader::default();
    h.pixdim = [1.0, 1.5, 1.5, 5.0, 1.0, 1.0, 1.0, 1.0];
    h.srow_x = [1.5, 0.0, 0.0, -10.0];
    h.srow_y = [0.0, 1.5, 0.0, 4.0];
    h.srow_z = [0.0, 0.0, 5.0, 0.0];
    nifti::writer::WriterOptions::new(path)
        .reference_header(&h)
        .write_nifti(&data)
        .unwrap();
}

fn nii_image(path: &Path, shape: &[usize]) {
    nii_u8(path, shape, |ix| (ix.iter().sum::<usize>() * 7 % 200) as u8);
}

/// Labels with a blob of each class 1..=n_classes.
fn nii_labels(path: &Path, shape: &[usize], n_classes: u8) {
    nii_u8(path, shape, |ix| {
        if ix[0] < n_classes as usize && ix[1] == 1 {
            ix[0] as u8 + 1
        } else {
            0
        }
    });
}

fn png_grey(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]));
    img.save(path).unwrap();
}

fn rgb(path: &Path, w: u32, h: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9) as u8, (y * 5) as u8, 77]));
    img.save(path).unwrap();
}

fn errors_of(ds: &sgp_data::Dataset) -> Vec<String> {
    verify(ds, &|_| {})
        .findings
        .into_iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| format!("{}: {}", f.subject, f.message))
        .collect()
}

fn acdc_patient(base: &Path, n: u32, ed: u32, es: u32) {
    let dir = base.join(format!("patient{n:03}"));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("Info.cfg"),
        format!("ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\nNbFrame: 30\nWeight: 70.0\n"),
    )
    .unwrap();
    for f in [ed, es] {
        nii_image(&dir.join(format!("patient{n:03}_frame{f:02}.nii.gz")), &[6, 5, 3]);
        nii_labels(&dir.join(format!("patient{n:03}_frame{f:02}_gt.nii.gz")), &[6, 5, 3], 3);
    }
    nii_image(&dir.join(format!("patient{n:03}_4d.nii.gz")), &[6, 5, 3, 2]);
}

#[test]
fn acdc_from_database_training_or_patient_parent() {
    let t = tempfile::tempdir().unwrap();
    let db = t.path().join("database");
    acdc_patient(&db.join("training"), 1, 1, 12);
    acdc_patient(&db.join("training"), 2, 1, 9);
    acdc_patient(&db.join("testing"), 101, 1, 14);
    for root in [t.path().to_path_buf(), db.clone()] {
        let ds = load(DatasetKind::Acdc, &root).unwrap();
        let ids: Vec<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "patient001_ED",
                "patient001_ES",
                "patient002_ED",
                "patient002_ES",
                "patient101_ED",
                "patient101_ES"
            ]
        );
        assert_eq!(ds.cases[3].images[0].file_name().unwrap(), "patient002_frame09.nii.gz");
        assert_eq!(ds.cases[0].patient, "patient001");
        assert_eq!(ds.cases[0].modality, Modality::Mr);
        assert_eq!(ds.labels.name(2), "MYO");
        assert!(errors_of(&ds).is_empty(), "{:?}", errors_of(&ds));
    }
    let training = load(DatasetKind::Acdc, &db.join("training")).unwrap();
    assert_eq!(training.cases.len(), 4);
    let labels = training.cases[0].read_labels(&training.labels).unwrap();
    assert_eq!(labels.data[[2, 1, 0]], 3);

    // A missing ES ground truth and a broken Info.cfg are reported.
    fs::remove_file(db.join("training/patient002/patient002_frame09_gt.nii.gz")).unwrap();
    fs::write(db.join("training/patient001/Info.cfg"), "ED: one\n").unwrap();
    let ds = load(DatasetKind::Acdc, &db).unwrap();
    let errs = errors_of(&ds);
    assert!(errs.iter().any(|e| e.contains("ES ground truth missing")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("no integer ED frame")), "{errs:?}");
}

#[test]
fn camus_nifti_release() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("CAMUS_public/database_nifti");
    for p in 1..=2 {
        let dir = base.join(format!("patient{p:04}"));
        for view in ["2CH", "4CH"] {
            for phase in ["ED", "ES"] {
                nii_image(&dir.join(format!("patient{p:04}_{view}_{phase}.nii.gz")), &[8, 10]);
                nii_labels(
                    &dir.join(format!("patient{p:04}_{view}_{phase}_gt.nii.gz")),
                    &[8, 10],
                    3,
                );
            }
            nii_image(
                &dir.join(format!("patient{p:04}_{view}_half_sequence.nii.gz")),
                &[8, 10, 4],
            );
        }
        fs::write(dir.join("Info_2CH.cfg"), "ED: 1\nES: 4\n").unwrap();
    }
    fs::create_dir_all(t.path().join("CAMUS_public/database_split")).unwrap();
    for root in [t.path().join("CAMUS_public"), base.clone()] {
        let ds = load(DatasetKind::Camus, &root).unwrap();
        assert_eq!(ds.cases.len(), 8);
        assert_eq!(ds.cases[0].id, "patient0001_2CH_ED");
        assert_eq!(ds.cases[0].meta["view"], "2CH");
        assert_eq!(ds.cases[0].modality, Modality::Us);
        assert_eq!(ds.labels.name(3), "LA");
        assert!(errors_of(&ds).is_empty(), "{:?}", errors_of(&ds));
    }
    // A ground truth with a label value outside 0..=3.
    nii_u8(&base.join("patient0002/patient0002_4CH_ES_gt.nii.gz"), &[8, 10], |ix| {
        if ix[0] == 0 {
            7
        } else {
            1
        }
    });
    let errs = errors_of(&load(DatasetKind::Camus, &base).unwrap());
    assert!(
        errs.iter()
            .any(|e| e.contains("patient0002_4CH_ES") && e.contains("[7]")),
        "{errs:?}"
    );
    // The old .mhd release is refused clearly.
    let old = t.path().join("old/training/patient0001");
    fs::create_dir_all(&old).unwrap();
    fs::write(old.join("patient0001_2CH_ED.mhd"), "ObjectType = Image\n").unwrap();
    let err = load(DatasetKind::Camus, &t.path().join("old")).unwrap_err();
    assert!(err.to_string().contains(".mhd"), "{err}");
}

#[test]
fn busi_merges_extra_masks_and_accepts_parent_folder() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("Dataset_BUSI_with_GT");
    png_grey(&base.join("benign/benign (1).png"), 12, 10, |x, _| x as u8 * 10);
    png_grey(&base.join("benign/benign (1)_mask.png"), 12, 10, |x, y| {
        if x < 3 && y < 3 {
            255
        } else {
            0
        }
    });
    png_grey(&base.join("benign/benign (1)_mask_1.png"), 12, 10, |x, y| {
        if x > 8 && y > 6 {
            255
        } else {
            0
        }
    });
    png_grey(&base.join("benign/benign (10).png"), 12, 10, |_, _| 50);
    png_grey(&base.join("benign/benign (10)_mask.png"), 12, 10, |x, _| {
        if x == 5 {
            255
        } else {
            0
        }
    });
    png_grey(&base.join("malignant/malignant (2).png"), 12, 10, |_, y| y as u8);
    png_grey(&base.join("malignant/malignant (2)_mask.png"), 12, 10, |x, y| {
        if x == y {
            255
        } else {
            0
        }
    });
    png_grey(&base.join("normal/normal (1).png"), 12, 10, |_, _| 9);
    png_grey(&base.join("normal/normal (1)_mask.png"), 12, 10, |_, _| 0);
    for root in [t.path().to_path_buf(), base.clone()] {
        let ds = load(DatasetKind::Busi, &root).unwrap();
        let ids: Vec<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["benign (1)", "benign (10)", "malignant (2)", "normal (1)"]);
        let first = &ds.cases[0];
        assert_eq!(first.labels.len(), 2);
        let l = first.read_labels(&ds.labels).unwrap();
        assert_eq!(l.shape(), &[10, 12]);
        assert_eq!(l.data.iter().filter(|&&v| v == 1).count(), 9 + 9);
        assert_eq!(ds.cases[3].meta["class"], "normal");
        let report = verify(&ds, &|_| {});
        assert!(report.is_usable(), "{report}");
        assert_eq!(report.warnings(), 1, "{report}"); // the normal image's empty mask
    }
    // A mask of the wrong size is an error; an image without a mask is a missing pair.
    png_grey(&base.join("malignant/malignant (2)_mask.png"), 11, 10, |_, _| 255);
    png_grey(&base.join("malignant/malignant (3).png"), 12, 10, |_, _| 1);
    let errs = errors_of(&load(DatasetKind::Busi, &base).unwrap());
    assert!(
        errs.iter()
            .any(|e| e.contains("malignant (2)") && e.contains("label shape [10, 11]")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("malignant (3).png") && e.contains("without a mask")),
        "{errs:?}"
    );
}

#[test]
fn refuge_grey_levels_map_to_rim_and_cup() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    // Training400 layout with class folders, and the validation layout.
    rgb(&r.join("Training400/Glaucoma/g0001.jpg"), 16, 12);
    rgb(&r.join("Training400/Non-Glaucoma/n0001.jpg"), 16, 12);
    let mask = |x: u32, y: u32| {
        let d = (x as i32 - 8).abs().max((y as i32 - 6).abs());
        if d <= 1 {
            0
        } else if d <= 3 {
            128
        } else {
            255
        }
    };
    let bmp = |p: &Path| {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::GrayImage::from_fn(16, 12, |x, y| image::Luma([mask(x, y)]))
            .save(p)
            .unwrap();
    };
    bmp(&r.join("Annotation-Training400/Disc_Cup_Masks/Glaucoma/g0001.bmp"));
    bmp(&r.join("Annotation-Training400/Disc_Cup_Masks/Non-Glaucoma/n0001.bmp"));
    rgb(&r.join("REFUGE-Validation400/V0001.jpg"), 16, 12);
    bmp(&r.join("REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp"));
    let ds = load(DatasetKind::Refuge, r).unwrap();
    let ids: Vec<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["V0001", "g0001", "n0001"]);
    let g = ds.case("g0001").unwrap();
    assert_eq!(g.meta["class"], "Glaucoma");
    assert_eq!(g.modality, Modality::Photo);
    let l = g.read_labels(&ds.labels).unwrap();
    assert_eq!(l.data[[6, 8]], 2, "cup");
    assert_eq!(l.data[[6, 11]], 1, "rim");
    assert_eq!(l.data[[0, 0]], 0, "background");
    assert!(errors_of(&ds).is_empty(), "{:?}", errors_of(&ds));
    // A grey level that is none of 0/128/255 is rejected.
    png_grey(
        &r.join("REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp"),
        16,
        12,
        |_, _| 64,
    );
    let errs = errors_of(&load(DatasetKind::Refuge, r).unwrap());
    assert!(
        errs.iter().any(|e| e.contains("V0001") && e.contains("grey level 64")),
        "{errs:?}"
    );
}

#[test]
fn wbc_two_subsets() {
    let t = tempfile::tempdir().unwrap();
    for (set, n) in [("Dataset 1", 2), ("Dataset 2", 1)] {
        for i in 1..=n {
            let dir = t.path().join(set);
            rgb(&dir.join(format!("{i:03}.bmp")), 10, 10);
            png_grey(&dir.join(format!("{i:03}.png")), 10, 10, |x, y| {
                let d = (x as i32 - 5).abs() + (y as i32 - 5).abs();
                if d < 2 {
                    255
                } else if d < 4 {
                    128
                } else {
                    0
                }
            });
        }
    }
    let ds = load(DatasetKind::Wbc, t.path()).unwrap();
    let ids: Vec<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["d1_001", "d1_002", "d2_001"]);
    let l = ds.cases[0].read_labels(&ds.labels).unwrap();
    assert_eq!((l.data[[5, 5]], l.data[[5, 7]], l.data[[0, 0]]), (2, 1, 0));
    assert!(errors_of(&ds).is_empty());
    // One subset folder as the root works too.
    assert_eq!(
        load(DatasetKind::Wbc, &t.path().join("Dataset 2")).unwrap().cases.len(),
        1
    );
    // An image without its mask.
    rgb(&t.path().join("Dataset 2/002.bmp"), 10, 10);
    let errs = errors_of(&load(DatasetKind::Wbc, t.path()).unwrap());
    assert!(errs.iter().any(|e| e.contains("002.bmp")), "{errs:?}");
}

#[test]
fn nnunet_raw_with_two_channels() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("Dataset042_Toy");
    fs::create_dir_all(&base).unwrap();
    fs::write(
        base.join("dataset.json"),
        r#"{"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
            "numTraining": 2, "file_ending": ".nii.gz"}"#,
    )
    .unwrap();
    for case in ["toy_001", "toy_002"] {
        nii_image(&base.join(format!("imagesTr/{case}_0000.nii.gz")), &[5, 4, 3]);
        nii_image(&base.join(format!("imagesTr/{case}_0001.nii.gz")), &[5, 4, 3]);
        nii_labels(&base.join(format!("labelsTr/{case}.nii.gz")), &[5, 4, 3], 2);
    }
    nii_image(&base.join("imagesTs/toy_101_0000.nii.gz"), &[5, 4, 3]);
    nii_image(&base.join("imagesTs/toy_101_0001.nii.gz"), &[5, 4, 3]);
    // nnUNet_raw/ with a single dataset inside is accepted.
    for root in [t.path().to_path_buf(), base.clone()] {
        let ds = load(DatasetKind::Nnunet, &root).unwrap();
        assert_eq!(ds.cases.len(), 3);
        assert_eq!(ds.cases[0].images.len(), 2);
        assert_eq!(ds.cases[0].modality, Modality::Mr);
        assert_eq!(ds.labels.name(2), "TZ");
        assert_eq!(ds.cases[2].meta["split"], "test");
        assert!(ds.cases[2].labels.is_empty());
        let report = verify(&ds, &|_| {});
        assert!(report.is_usable(), "{report}");
    }
    // Geometry mismatch between image and label.
    let lab = base.join("labelsTr/toy_002.nii.gz");
    let data = ArrayD::<u8>::zeros(IxDyn(&[5, 4, 3]));
    let mut h = nifti::NiftiHeader::default();
    h.pixdim = [1.0, 1.5, 1.5, 2.0, 1.0, 1.0, 1.0, 1.0];
    h.srow_x = [1.5, 0.0, 0.0, -10.0];
    h.srow_y = [0.0, 1.5, 0.0, 4.0];
    h.srow_z = [0.0, 0.0, 2.0, 0.0];
    nifti::writer::WriterOptions::new(&lab)
        .reference_header(&h)
        .write_nifti(&data)
        .unwrap();
    // A missing channel.
    fs::remove_file(base.join("imagesTr/toy_001_0001.nii.gz")).unwrap();
    let errs = errors_of(&load(DatasetKind::Nnunet, &base).unwrap());
    assert!(
        errs.iter()
            .any(|e| e.contains("toy_002") && e.contains("geometry differ")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("toy_001_0001") && e.contains("channel missing")),
        "{errs:?}"
    );
    // Unparsable dataset.json.
    fs::write(base.join("dataset.json"), "{not json").unwrap();
    assert!(matches!(load(DatasetKind::Nnunet, &base), Err(DataError::Parse { .. })));
}

#[test]
fn biomedparse_targets_become_classes() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("CAMUS");
    for split in ["train", "test"] {
        for i in 0..2 {
            let stem = format!("patient{i}_{split}_ultrasound_heart");
            rgb(&r.join(format!("{split}/{stem}.png")), 8, 6);
            png_grey(
                &r.join(format!("{split}_mask/{stem}_left+heart+ventricle.png")),
                8,
                6,
                |x, _| if x < 2 { 255 } else { 0 },
            );
            png_grey(&r.join(format!("{split}_mask/{stem}_myocardium.png")), 8, 6, |x, _| {
                if x == 7 {
                    255
                } else {
                    0
                }
            });
        }
    }
    fs::write(r.join("train.json"), "[]").unwrap();
    let ds = load(DatasetKind::Biomedparse, &r).unwrap();
    assert_eq!(ds.cases.len(), 4);
    assert_eq!(ds.labels.name(1), "left heart ventricle");
    assert_eq!(ds.labels.name(2), "myocardium");
    assert_eq!(ds.cases[0].modality, Modality::Us);
    let l = ds.cases[0].read_labels(&ds.labels).unwrap();
    assert_eq!((l.data[[0, 0]], l.data[[0, 7]], l.data[[0, 4]]), (1, 2, 0));
    assert!(errors_of(&ds).is_empty(), "{:?}", errors_of(&ds));
    // A mask that belongs to no image.
    png_grey(&r.join("train_mask/stranger_lesion.png"), 8, 6, |_, _| 0);
    let errs = errors_of(&load(DatasetKind::Biomedparse, &r).unwrap());
    assert!(errs.iter().any(|e| e.contains("stranger_lesion")), "{errs:?}");
}

#[test]
fn generic_folder_pairs_by_stem_and_suffix() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    png_grey(&r.join("images/a.png"), 6, 4, |x, _| x as u8);
    png_grey(&r.join("masks/a_mask.png"), 6, 4, |x, _| if x > 2 { 255 } else { 0 });
    nii_image(&r.join("images/b.nii.gz"), &[4, 4, 2]);
    nii_labels(&r.join("masks/b.nii.gz"), &[4, 4, 2], 2);
    let ds = load(DatasetKind::Folder, r).unwrap();
    assert_eq!(ds.cases.len(), 2);
    let a = ds.cases[0].read_labels(&ds.labels).unwrap();
    assert_eq!(a.data.iter().filter(|&&v| v == 1).count(), 12);
    assert!(errors_of(&ds).is_empty(), "{:?}", errors_of(&ds));
    // A NIfTI in a generic folder has no declared modality; `data verify` names it so
    // (it printed "modalities: : 1", an empty name).
    assert_eq!(ds.cases[1].modality, Modality::Other(String::new()));
    let report = verify(&ds, &|_| {});
    assert!(
        report.to_string().contains("modalities: photo: 1, unspecified: 1"),
        "{report}"
    );
    png_grey(&r.join("masks/orphan.png"), 6, 4, |_, _| 0);
    let errs = errors_of(&load(DatasetKind::Folder, r).unwrap());
    assert!(errs.iter().any(|e| e.contains("orphan")), "{errs:?}");
}

#[test]
fn empty_and_missing_folders_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    for kind in DatasetKind::ALL {
        let missing = t.path().join("does-not-exist");
        let err = load(kind, &missing).unwrap_err();
        assert!(matches!(err, DataError::NotFound { .. }), "{kind}: {err}");
        let empty = t.path().join(format!("empty-{kind}"));
        fs::create_dir_all(&empty).unwrap();
        let err = load(kind, &empty).unwrap_err();
        assert!(matches!(err, DataError::Layout { .. }), "{kind}: {err}");
    }
}

#[test]
fn truncated_file_is_reported_not_panicked() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    nii_image(&r.join("images/c.nii.gz"), &[20, 20, 8]);
    nii_labels(&r.join("masks/c.nii.gz"), &[20, 20, 8], 1);
    let bytes = fs::read(r.join("images/c.nii.gz")).unwrap();
    fs::write(r.join("images/c.nii.gz"), &bytes[..bytes.len() / 3]).unwrap();
    let report = verify(&load(DatasetKind::Folder, r).unwrap(), &|_| {});
    assert!(!report.is_usable());
    assert!(report.to_string().contains("unreadable image"), "{report}");
}

#[test]
fn bundled_demo_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/demo");
    let ds = load(DatasetKind::Demo, &root).unwrap();
    assert_eq!(ds.cases.len(), 5);
    assert!(ds.cases.iter().any(|c| c.modality == Modality::Ct));
    let report = verify(&ds, &|_| {});
    assert!(report.is_usable(), "{report}");
    assert_eq!(report.label_cases.get(&1), Some(&5));
    // Spacing as the build script computed it from the NRRD geometry (dataset.json).
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root.join("dataset.json")).unwrap()).unwrap();
    for entry in json["cases"].as_array().unwrap() {
        let case = ds.case(entry["id"].as_str().unwrap()).unwrap();
        let image = case.read_image().unwrap();
        let want: Vec<f64> = entry["spacing"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(
            image.spacing.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
            "{:?} vs {want:?}",
            image.spacing
        );
        let g = image.geometry.unwrap();
        assert_eq!((g.header.sform_code, g.header.qform_code), (1, 1));
        let (s, q) = (g.sform().unwrap(), g.qform().unwrap());
        assert!(
            s.iter()
                .flatten()
                .zip(q.iter().flatten())
                .all(|(a, b)| (a - b).abs() < 1e-3),
            "{s:?} vs {q:?}"
        );
    }
    // It is also a valid nnU-Net raw folder.
    assert_eq!(load(DatasetKind::Nnunet, &root).unwrap().cases.len(), 5);
}

/// Findings that are warnings, as "subject: message".
fn warnings_of(ds: &sgp_data::Dataset) -> Vec<String> {
    verify(ds, &|_| {})
        .findings
        .into_iter()
        .filter(|f| f.severity == Severity::Warning)
        .map(|f| format!("{}: {}", f.subject, f.message))
        .collect()
}

#[test]
fn missing_label_files_and_empty_case_folders_are_errors_in_every_labelled_layout() {
    let t = tempfile::tempdir().unwrap();
    let allow = sgp_data::ScanOptions { allow_unlabelled: true };

    // CAMUS: a missing _gt and an empty patient folder; the release labels everything.
    let camus = t.path().join("camus");
    for view in ["2CH", "4CH"] {
        for phase in ["ED", "ES"] {
            nii_image(
                &camus.join(format!("patient0001/patient0001_{view}_{phase}.nii.gz")),
                &[8, 10],
            );
            if (view, phase) != ("4CH", "ES") {
                nii_labels(
                    &camus.join(format!("patient0001/patient0001_{view}_{phase}_gt.nii.gz")),
                    &[8, 10],
                    3,
                );
            }
        }
    }
    fs::create_dir_all(camus.join("patient0002")).unwrap();
    let errs = errors_of(&load(DatasetKind::Camus, &camus).unwrap());
    assert!(
        errs.iter()
            .any(|e| e.contains("4CH_ES_gt") && e.contains("ground truth missing")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("patient0002") && e.contains("empty case folder")),
        "{errs:?}"
    );
    let err = sgp_data::load_with(DatasetKind::Camus, &camus, &allow).unwrap_err();
    assert!(err.to_string().contains("does not apply to camus"), "{err}");

    // ACDC: an empty patient folder is an error; testing/ without ground truth is an error
    // that names the option, and with the option a warning and an unlabelled case.
    let acdc = t.path().join("acdc/database");
    acdc_patient(&acdc.join("training"), 1, 1, 12);
    acdc_patient(&acdc.join("testing"), 101, 1, 14);
    fs::remove_file(acdc.join("testing/patient101/patient101_frame14_gt.nii.gz")).unwrap();
    fs::create_dir_all(acdc.join("training/patient002")).unwrap();
    let ds = load(DatasetKind::Acdc, &acdc).unwrap();
    let errs = errors_of(&ds);
    assert!(
        errs.iter()
            .any(|e| e.contains("patient002") && e.contains("empty case folder")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("ES ground truth missing") && e.contains("--allow-unlabelled")),
        "{errs:?}"
    );
    fs::remove_dir(acdc.join("training/patient002")).unwrap();
    let ds = sgp_data::load_with(DatasetKind::Acdc, &acdc, &allow).unwrap();
    assert!(errors_of(&ds).is_empty(), "{:?}", errors_of(&ds));
    assert!(warnings_of(&ds).iter().any(|w| w.contains("ES ground truth missing")));
    assert!(ds.case("patient101_ES").unwrap().labels.is_empty());
    // Training ground truth is never optional.
    fs::remove_file(acdc.join("training/patient001/patient001_frame12_gt.nii.gz")).unwrap();
    let errs = errors_of(&sgp_data::load_with(DatasetKind::Acdc, &acdc, &allow).unwrap());
    assert!(errs.iter().any(|e| e.contains("patient001_frame12_gt")), "{errs:?}");

    // REFUGE: an image without a mask is an error unless the option is given.
    let refuge = t.path().join("refuge");
    rgb(&refuge.join("Train/Images/g0001.jpg"), 16, 12);
    png_grey(&refuge.join("Train/Masks/g0001.bmp"), 16, 12, |x, _| {
        if x < 8 {
            255
        } else {
            128
        }
    });
    rgb(&refuge.join("Test400/T0001.jpg"), 16, 12);
    let errs = errors_of(&load(DatasetKind::Refuge, &refuge).unwrap());
    assert!(
        errs.iter()
            .any(|e| e.contains("T0001") && e.contains("without a disc/cup mask")),
        "{errs:?}"
    );
    let ds = sgp_data::load_with(DatasetKind::Refuge, &refuge, &allow).unwrap();
    assert!(errors_of(&ds).is_empty(), "{:?}", errors_of(&ds));

    // BUSI and WBC: an empty class / subset folder.
    let busi = t.path().join("busi");
    png_grey(&busi.join("benign/benign (1).png"), 8, 8, |x, _| x as u8 * 20);
    png_grey(&busi.join("benign/benign (1)_mask.png"), 8, 8, |x, _| {
        if x > 3 {
            255
        } else {
            0
        }
    });
    fs::create_dir_all(busi.join("malignant")).unwrap();
    let errs = errors_of(&load(DatasetKind::Busi, &busi).unwrap());
    assert!(
        errs.iter()
            .any(|e| e.contains("malignant") && e.contains("empty case folder")),
        "{errs:?}"
    );
    let wbc = t.path().join("wbc");
    rgb(&wbc.join("Dataset 1/001.bmp"), 8, 8);
    png_grey(&wbc.join("Dataset 1/001.png"), 8, 8, |_, _| 0);
    fs::create_dir_all(wbc.join("Dataset 2")).unwrap();
    let errs = errors_of(&load(DatasetKind::Wbc, &wbc).unwrap());
    assert!(
        errs.iter()
            .any(|e| e.contains("Dataset 2") && e.contains("empty case folder")),
        "{errs:?}"
    );
}
