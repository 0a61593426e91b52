//! `cargo xtask eval` as a library call, end to end with the committed reduced SAM2.1
//! weights (random, S = 64): the bundled 3D demo and a small 2D folder, leave-one-patient-out.
//! Random weights give arbitrary masks, so these tests check what must hold whatever the
//! weights: one prediction per case on the input's grid, one metrics row per case, the
//! summary equal to `eval-folder`'s on the written files, resume, and the ablation table.

use std::path::{Path, PathBuf};

mod common;

use common::{make_2d_folder, reduced, root};
use sgp::evaluate::{evaluate_ablation, evaluate_dataset, EvalOutcome, EvalRequest, EvalSplit, SplitSettings};
use sgp::predictor::PredictorOptions;
use sgp::HeadChoice;
use sgp_data::DatasetKind;
use sgp_eval::{FolderOptions, MetricOptions, Report};
use sgp_memory::WeightsId;

fn request(dataset: DatasetKind, data: PathBuf, out: PathBuf, max_cases: Option<usize>) -> EvalRequest {
    EvalRequest {
        dataset,
        root: data,
        split: EvalSplit::All,
        split_settings: SplitSettings::default(),
        out,
        options: PredictorOptions {
            support_size: 2,
            support_slices: 2,
            ..PredictorOptions::default()
        },
        metrics: MetricOptions::default(),
        overlays: 1,
        cache_dir: None,
        max_support_cases: None,
        max_cases,
        allow_unlabelled: false,
    }
}

fn run(model: &(sgp::Pretrained, WeightsId), req: &EvalRequest) -> EvalOutcome {
    let mut last = None;
    let outcome = evaluate_dataset(&model.0.model, &model.1, &HeadChoice::TrainingFree, req, &mut |p| {
        last = Some(p)
    })
    .unwrap();
    let n = outcome.cases.len();
    assert_eq!(last, Some(sgp::evaluate::EvalProgress::Cases(n, n)));
    outcome
}

/// `eval-folder` on the prediction and label files `eval` wrote.
fn folder_report(out: &Path, labels: &[u16]) -> Report {
    let options = FolderOptions {
        labels: Some(labels.to_vec()),
        overlays: false,
        ..FolderOptions::default()
    };
    sgp_eval::evaluate_folder(
        &out.join("predictions"),
        &out.join("labels"),
        &out.join("folder_eval"),
        &options,
        None,
    )
    .unwrap()
    .report
}

fn close(a: Option<f64>, b: Option<f64>, what: &str) {
    match (a, b) {
        (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-9 * (1.0 + x.abs()), "{what}: {x} vs {y}"),
        (x, y) => assert_eq!(x, y, "{what}"),
    }
}

fn assert_same_summary(a: &Report, b: &Report) {
    assert_eq!(a.labels, b.labels);
    assert_eq!(a.n_cases, b.n_cases);
    assert_eq!(
        a.cases.iter().map(|c| &c.case).collect::<Vec<_>>(),
        b.cases.iter().map(|c| &c.case).collect::<Vec<_>>()
    );
    for (x, y) in a.per_class.iter().zip(&b.per_class) {
        assert_eq!(x.label, y.label);
        assert_eq!(x.cases_with_label, y.cases_with_label);
        for (s, t, what) in [
            (x.dice, y.dice, "dice"),
            (x.iou, y.iou, "iou"),
            (x.hd95, y.hd95, "hd95"),
            (x.nsd, y.nsd, "nsd"),
        ] {
            close(s.mean, t.mean, what);
            close(s.std, t.std, what);
            assert_eq!(s.n, t.n, "{what}");
        }
    }
    close(a.mean_over_classes.dice, b.mean_over_classes.dice, "mean dice");
    close(a.mean_over_classes.hd95, b.mean_over_classes.hd95, "mean hd95");
}

#[test]
fn demo_volumes_get_predictions_on_their_grid_and_the_folder_summary() {
    let model = reduced();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("eval");
    let req = request(DatasetKind::Demo, root().join("datasets/demo"), out.clone(), None);
    let r = run(&model, &req);
    assert_eq!(r.cases, vec!["brain1", "brain2", "breast1", "lung1", "lung2"]);
    assert_eq!((r.predicted, r.resumed), (5, 0));
    assert_eq!(r.report.labels, vec![1]);
    assert_eq!(r.report.cases.len(), 5);
    // Leave-one-patient-out: every case of the dataset is a support of the others.
    assert_eq!(r.support_items, 5 * 2);
    for id in &r.cases {
        let img = sgp_data::read_image(&root().join(format!("datasets/demo/imagesTr/{id}_0000.nii.gz"))).unwrap();
        let pred = sgp_data::read_labels(&out.join(format!("predictions/{id}.nii.gz"))).unwrap();
        assert_eq!(pred.shape(), img.shape(), "{id}");
        assert!(
            pred.geometry
                .as_ref()
                .unwrap()
                .same_grid(img.geometry.as_ref().unwrap(), 1e-6),
            "{id}: the prediction's affine differs from the image's"
        );
        assert!(pred.data.iter().all(|&v| v <= 1));
        assert!(out.join(format!("cases/{id}.json")).is_file());
    }
    assert!(out.join("overlays/brain1.png").is_file());
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    for id in &r.cases {
        assert!(csv.lines().any(|l| l.starts_with(id.as_str())), "{csv}");
    }
    for f in ["summary.json", "summary.md", "table.md", "eval.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert_same_summary(&r.report, &folder_report(&out, &[1]));
    // The paper's table shape: one row, the class names, then the mean.
    assert!(r.table.starts_with("| method | lesion | mean |\n"), "{}", r.table);
    assert_eq!(r.table.lines().count(), 3, "{}", r.table);
}

#[test]
fn folder_2d_end_to_end_then_resume_recomputes_only_the_missing_case() {
    let model = reduced();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("folder");
    make_2d_folder(&data, 4);
    let out = tmp.path().join("eval");
    let req = request(DatasetKind::Folder, data.clone(), out.clone(), None);
    let first = run(&model, &req);
    assert_eq!(first.cases.len(), 4);
    assert_eq!((first.predicted, first.resumed), (4, 0));
    assert_eq!(first.report.labels, vec![1, 2]);
    for id in &first.cases {
        let pred = sgp_data::read_labels(&out.join(format!("predictions/{id}.png"))).unwrap();
        assert_eq!(pred.shape(), &[40, 48], "{id}");
        assert!(pred.data.iter().all(|&v| v <= 2));
        assert!(out.join(format!("cases/{id}.json")).is_file());
    }
    assert_same_summary(&first.report, &folder_report(&out, &[1, 2]));
    assert!(first.table.starts_with("| method | "), "{}", first.table);
    assert!(
        first.table.lines().next().unwrap().ends_with("| mean |"),
        "{}",
        first.table
    );

    // Delete one prediction: only that case is segmented again, with the same result.
    let victim = out.join("predictions/img2.png");
    let before = sgp_data::read_labels(&victim).unwrap().data;
    std::fs::remove_file(&victim).unwrap();
    let second = run(&model, &req);
    assert_eq!((second.predicted, second.resumed), (1, 3));
    assert_eq!(sgp_data::read_labels(&victim).unwrap().data, before);
    assert_eq!(second.report, first.report);
    assert_eq!(second.table, first.table);

    // Nothing missing: no support is even encoded.
    let third = run(&model, &req);
    assert_eq!((third.predicted, third.resumed, third.support_items), (0, 4, 0));
    assert_eq!(third.report, first.report);

    // Other settings in the same folder are refused rather than mixed.
    let mut other = req.clone();
    other.options.support_size = 3;
    let err = evaluate_dataset(&model.0.model, &model.1, &HeadChoice::TrainingFree, &other, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");
}

#[test]
fn ablation_writes_one_table_with_the_table_v_variants_and_the_k_sweep() {
    let model = reduced();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ablation");
    let mut req = request(DatasetKind::Demo, root().join("datasets/demo"), out.clone(), Some(1));
    req.options.support_slices = 1;
    let mut seen = std::collections::BTreeSet::new();
    let table = evaluate_ablation(
        &model.0.model,
        &model.1,
        &HeadChoice::TrainingFree,
        &req,
        &[1, 2],
        &mut |name, _| {
            seen.insert(name.to_string());
        },
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(out.join("ablation.md")).unwrap(), table);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows[0], "| method | lesion | mean |", "{table}");
    let names: Vec<&str> = rows[2..]
        .iter()
        .map(|r| r.trim_start_matches("| ").split(" |").next().unwrap())
        .collect();
    assert_eq!(names, ["full", "no-pmg", "no-pma", "no-3dm", "K=1", "K=2"], "{table}");
    assert_eq!(seen.len(), 6);
    // K=2 is the base setting: the same numbers as `full`, from the same folder.
    let cells = |r: &str| r.split(" | ").skip(1).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(cells(rows[2]), cells(rows[7]), "{table}");
    assert!(!out.join("ablation/K2").exists());
    for v in ["full", "no-pmg", "no-pma", "no-3dm", "K1"] {
        assert!(
            out.join(format!("ablation/{v}/predictions/brain1.nii.gz")).is_file(),
            "{v}"
        );
    }
}

#[test]
fn acdc_dice_table_has_the_shape_of_table_iv() {
    let ds = sgp_data::Dataset {
        kind: DatasetKind::Acdc,
        root: PathBuf::from("ACDC"),
        name: "ACDC".into(),
        labels: sgp_data::layouts::acdc::labels(),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    let row = |label: u16, dice: Option<f64>| sgp_eval::LabelMetrics {
        dice,
        ..sgp_eval::LabelMetrics::absent(label)
    };
    let cases = vec![
        sgp_eval::CaseMetrics {
            case: "patient001_ED".into(),
            metrics: vec![row(1, Some(0.8)), row(2, Some(0.7)), row(3, Some(0.9))],
        },
        sgp_eval::CaseMetrics {
            case: "patient001_ES".into(),
            metrics: vec![row(1, Some(0.6)), row(2, Some(0.5)), row(3, None)],
        },
    ];
    let report = Report::new(cases, &[1, 2, 3], 1.0, Default::default());
    let table = sgp::evaluate::dice_table(&ds, &[1, 2, 3], &[("SAM2-SGP".into(), &report)]);
    assert_eq!(
        table,
        "| method | RV | MYO | LV | mean |\n|---|---|---|---|---|\n| SAM2-SGP | 70.00 | 60.00 | 90.00 | 73.33 |\n"
    );
}

/// 2D NIfTI images (a slice exported from a scan) are images, not volumes: the ablation
/// has no `no-3dm` row for them (it used to, from the file kind alone, and ran a variant
/// identical to `full`), and predictions keep the 2D grid and its spacing.
#[test]
fn ablation_of_2d_nifti_images_has_no_3dm_row() {
    use ndarray::Array2;
    let model = reduced();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("nifti2d");
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::create_dir_all(data.join("masks")).unwrap();
    let (h, w) = (36usize, 44usize);
    for i in 0..3usize {
        let img = Array2::from_shape_fn((h, w), |(y, x)| {
            let inside = (6 + i..18 + i).contains(&y) && (8..20 + i).contains(&x);
            if inside {
                200.0
            } else {
                ((x * 7 + y * 3) % 17) as f32
            }
        });
        let lab = img.mapv(|v| u16::from(v > 100.0));
        let reference = sgp_data::Volume {
            data: img.into_dyn(),
            spacing: vec![0.7, 0.7],
            geometry: None,
        };
        sgp_data::write_float_like(&data.join(format!("images/s{i}.nii.gz")), &reference.data, &reference).unwrap();
        sgp_data::write_labels_like(&data.join(format!("masks/s{i}.nii.gz")), &lab.into_dyn(), &reference).unwrap();
    }
    let out = tmp.path().join("ablation");
    let req = request(DatasetKind::Folder, data, out.clone(), Some(1));
    let table = evaluate_ablation(
        &model.0.model,
        &model.1,
        &HeadChoice::TrainingFree,
        &req,
        &[1],
        &mut |_, _| {},
    )
    .unwrap();
    let names: Vec<&str> = table
        .lines()
        .skip(2)
        .map(|r| r.trim_start_matches("| ").split(" |").next().unwrap())
        .collect();
    assert_eq!(names, ["full", "no-pmg", "no-pma", "K=1"], "{table}");
    assert!(!out.join("ablation/no-3dm").exists());
    let pred = sgp_data::read_labels(&out.join("ablation/full/predictions/s0.nii.gz")).unwrap();
    assert_eq!(pred.data.shape(), &[h, w][..]);
    assert_eq!(pred.spacing, [0.7f64, 0.7][..]);
}
