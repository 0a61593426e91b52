//! `evaluate_folder` on label maps written here: NIfTI volumes (with images for the overlays)
//! and PNG masks, with unmatched files on both sides.

use std::path::Path;

use ndarray::{s, Array2, Array3, ArrayD};
use sgp_data::{read_labels, write_float_like, write_labels_like, NiftiGeometry, Volume};
use sgp_eval::{evaluate_folder, evaluate_labels, FolderOptions, MetricOptions, Report};

fn nifti_ref(shape: &[usize], spacing: &[f64]) -> Volume<u16> {
    Volume {
        data: ArrayD::zeros(shape),
        spacing: spacing.to_vec(),
        geometry: Some(NiftiGeometry::from_spacing(spacing)),
    }
}

fn write_labels(path: &Path, data: ArrayD<u16>, reference: &Volume<u16>) {
    write_labels_like(path, &data, reference).unwrap();
}

/// A 3D pair: two boxes in the ground truth, a shifted box and (optionally) the second label.
fn volume_pair(shift: usize, with_label_2: bool) -> (ArrayD<u16>, ArrayD<u16>) {
    let mut gt = Array3::<u16>::zeros((24, 20, 9));
    gt.slice_mut(s![4..14, 5..15, 2..7]).fill(1);
    gt.slice_mut(s![16..22, 2..8, 0..4]).fill(2);
    let mut pred = Array3::<u16>::zeros((24, 20, 9));
    pred.slice_mut(s![4 + shift..14 + shift, 5..15, 2..8]).fill(1);
    if with_label_2 {
        pred.slice_mut(s![16..23, 2..8, 0..3]).fill(2);
    }
    (gt.into_dyn(), pred.into_dyn())
}

fn read_csv(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn nifti_folder_with_images_and_unmatched_files() {
    let root = tempfile::tempdir().unwrap();
    let (gt_dir, pred_dir, img_dir, out) = (
        root.path().join("labelsTr"),
        root.path().join("pred"),
        root.path().join("imagesTr"),
        root.path().join("out"),
    );
    for d in [&gt_dir, &pred_dir, &img_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let spacing = [0.8, 0.8, 2.5];
    let reference = nifti_ref(&[24, 20, 9], &spacing);
    let (gt_a, pred_a) = volume_pair(1, true);
    let (gt_b, pred_b) = volume_pair(3, false);
    write_labels(&gt_dir.join("case_a.nii.gz"), gt_a.clone(), &reference);
    write_labels(&pred_dir.join("case_a.nii.gz"), pred_a.clone(), &reference);
    write_labels(&gt_dir.join("case_b.nii"), gt_b.clone(), &reference);
    write_labels(&pred_dir.join("case_b.nii.gz"), pred_b.clone(), &reference);
    write_labels(&gt_dir.join("only_gt.nii.gz"), gt_a.clone(), &reference);
    write_labels(&pred_dir.join("only_pred.nii.gz"), pred_a.clone(), &reference);
    std::fs::write(gt_dir.join("dataset.json"), "{}").unwrap();
    let image = gt_a.mapv(|v| v as f32 * 100.0 + 7.0);
    write_float_like(&img_dir.join("case_a_0000.nii.gz"), &image, &reference).unwrap();

    let options = FolderOptions {
        metrics: MetricOptions { nsd_tolerance_mm: 1.5 },
        bar_chart: true,
        ..Default::default()
    };
    let outcome = evaluate_folder(&pred_dir, &gt_dir, &out, &options, None).unwrap();
    assert_eq!(outcome.image_dir.as_deref(), Some(img_dir.as_path()));
    let report = &outcome.report;
    assert_eq!(report.labels, vec![1, 2]);
    assert_eq!(report.unmatched.pred_only, vec!["only_pred".to_string()]);
    assert_eq!(report.unmatched.gt_only, vec!["only_gt".to_string()]);
    assert_eq!(
        report.cases.iter().map(|c| c.case.as_str()).collect::<Vec<_>>(),
        ["case_a", "case_b"]
    );

    // The CSV holds exactly what the metric core computes on the same arrays and spacing.
    let read_spacing = read_labels(&gt_dir.join("case_a.nii.gz")).unwrap().spacing;
    let opts = MetricOptions { nsd_tolerance_mm: 1.5 };
    let want_a = evaluate_labels(pred_a.view(), gt_a.view(), &read_spacing, &[1, 2], &opts).unwrap();
    let want_b = evaluate_labels(pred_b.view(), gt_b.view(), &read_spacing, &[1, 2], &opts).unwrap();
    let rows = read_csv(&out.join("metrics.csv"));
    assert_eq!(rows[0], ["case", "label", "dice", "iou", "hd95", "nsd"]);
    assert_eq!(rows.len(), 5);
    let parse = |s: &str| {
        if s.is_empty() {
            None
        } else {
            Some(s.parse::<f64>().unwrap())
        }
    };
    for (row, (case, want)) in rows[1..].iter().zip([
        ("case_a", &want_a[0]),
        ("case_a", &want_a[1]),
        ("case_b", &want_b[0]),
        ("case_b", &want_b[1]),
    ]) {
        assert_eq!(row[0], case);
        assert_eq!(row[1].parse::<u16>().unwrap(), want.label);
        assert_eq!(parse(&row[2]), want.dice);
        assert_eq!(parse(&row[3]), want.iou);
        assert_eq!(parse(&row[4]), want.hd95);
        assert_eq!(parse(&row[5]), want.nsd);
    }
    // Label 2 missing from case_b's prediction: Dice 0, HD95 empty, NSD 0.
    assert_eq!(&rows[4][2..], ["0", "0", "", "0"]);
    // The prediction reaches one slice further along z: HD95 is that slice, 2.5 mm.
    assert!((want_a[0].hd95.unwrap() - 2.5).abs() < 1e-5, "{:?}", want_a[0]);

    let summary: Report = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(&summary, report);
    assert_eq!(summary.per_class[1].hd95.n, 1);
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.starts_with("| label | cases | Dice | IoU | HD95 (mm) | NSD@1.5mm |"),
        "{md}"
    );
    for f in ["overlays/case_a.png", "overlays/case_b.png", "dice_per_case.png"] {
        let img = image::open(out.join(f)).unwrap();
        assert!(img.width() >= 20 && img.height() >= 24, "{f}");
    }
    assert!(outcome.written.iter().all(|p| p.starts_with(&out) && p.exists()));
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 5);
}

#[test]
fn png_folder_with_explicit_labels_and_image() {
    let root = tempfile::tempdir().unwrap();
    let (gt_dir, pred_dir, out) = (
        root.path().join("gt"),
        root.path().join("pred"),
        root.path().join("out"),
    );
    std::fs::create_dir_all(&gt_dir).unwrap();
    std::fs::create_dir_all(&pred_dir).unwrap();
    let reference = Volume {
        data: ArrayD::<u16>::zeros(vec![30, 40]),
        spacing: vec![1.0, 1.0],
        geometry: None,
    };
    let mut gt = Array2::<u16>::zeros((30, 40));
    gt.slice_mut(s![0..12, 5..25]).fill(1); // touches the top border
    gt.slice_mut(s![18..28, 20..38]).fill(2);
    let mut pred = Array2::<u16>::zeros((30, 40));
    pred.slice_mut(s![0..14, 6..25]).fill(1);
    pred.slice_mut(s![17..28, 22..39]).fill(2);
    pred.slice_mut(s![1..3, 30..33]).fill(3);
    write_labels(&gt_dir.join("img1.png"), gt.clone().into_dyn(), &reference);
    write_labels(&pred_dir.join("img1.png"), pred.clone().into_dyn(), &reference);

    let options = FolderOptions {
        labels: Some(vec![1, 2, 3, 4]),
        overlays: false,
        ..Default::default()
    };
    let outcome = evaluate_folder(&pred_dir, &gt_dir, &out, &options, None).unwrap();
    assert!(!out.join("overlays").exists());
    let want = evaluate_labels(
        pred.view().into_dyn(),
        gt.view().into_dyn(),
        &[1.0, 1.0],
        &[1, 2, 3, 4],
        &MetricOptions::default(),
    )
    .unwrap();
    assert_eq!(outcome.report.cases[0].metrics, want);
    let rows = read_csv(&out.join("metrics.csv"));
    assert_eq!(rows.len(), 5);
    // Label 3 only in the prediction, label 4 nowhere.
    assert_eq!(&rows[3][2..], ["", "", "", "0"]);
    assert_eq!(&rows[4][2..], ["", "", "", ""]);
}

#[test]
fn folder_errors_are_clear() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let out = root.path().join("out");
    let opts = FolderOptions::default();
    // Missing folder, no matched cases, duplicate case names, mismatched shapes, garbage files.
    assert!(evaluate_folder(&root.path().join("nope"), &b, &out, &opts, None).is_err());
    assert!(matches!(
        evaluate_folder(&a, &b, &out, &opts, None),
        Err(sgp_eval::EvalError::NoMatchedCases { .. })
    ));
    let r2 = Volume {
        data: ArrayD::<u16>::zeros(vec![4, 4]),
        spacing: vec![1.0, 1.0],
        geometry: None,
    };
    let r3 = Volume {
        data: ArrayD::<u16>::zeros(vec![4, 5]),
        spacing: vec![1.0, 1.0],
        geometry: None,
    };
    write_labels(&a.join("x.png"), ArrayD::zeros(vec![4, 4]), &r2);
    write_labels(&b.join("x.png"), ArrayD::zeros(vec![4, 5]), &r3);
    let err = evaluate_folder(&a, &b, &out, &opts, None).unwrap_err().to_string();
    assert!(err.contains("case `x`") && err.contains("shape"), "{err}");
    write_labels(&b.join("x.png"), ArrayD::zeros(vec![4, 4]), &r2);
    std::fs::write(b.join("x.nii.gz"), b"not a nifti").unwrap();
    assert!(matches!(
        evaluate_folder(&a, &b, &out, &opts, None),
        Err(sgp_eval::EvalError::DuplicateCase { .. })
    ));
    std::fs::remove_file(b.join("x.png")).unwrap();
    let err = evaluate_folder(&a, &b, &out, &opts, None).unwrap_err().to_string();
    assert!(err.contains("x.nii.gz"), "{err}");
}
