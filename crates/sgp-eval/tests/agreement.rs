//! Agreement with reference values computed by `tools/eval/gen_metric_fixtures.py` (a float64
//! SciPy implementation of MONAI's conventions, itself checked against MONAI 1.6).
//! Dice and IoU must match to 1e-6, HD95 and NSD to 1e-4.

use ndarray::{ArrayD, IxDyn};
use serde::Deserialize;
use sgp_eval::{evaluate_labels, LabelMetrics, MetricOptions};

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    shape: Vec<usize>,
    spacing: Vec<f64>,
    nsd_tolerance: f64,
    labels: Vec<u16>,
    gt_rle: Vec<(u16, usize)>,
    pred_rle: Vec<(u16, usize)>,
    expected: Vec<Expected>,
}

#[derive(Deserialize)]
struct Expected {
    label: u16,
    dice: Option<f64>,
    iou: Option<f64>,
    hd95: Option<f64>,
    nsd: Option<f64>,
}

fn decode(rle: &[(u16, usize)], shape: &[usize]) -> ArrayD<u16> {
    let mut flat = Vec::with_capacity(shape.iter().product());
    for &(value, count) in rle {
        flat.extend(std::iter::repeat_n(value, count));
    }
    ArrayD::from_shape_vec(IxDyn(shape), flat).expect("fixture RLE length matches its shape")
}

fn load() -> Fixtures {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metric_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture file")).expect("fixture JSON")
}

fn check(case: &str, what: &str, got: Option<f64>, want: Option<f64>, tol: f64) {
    match (got, want) {
        (None, None) => {}
        (Some(g), Some(w)) => assert!((g - w).abs() <= tol, "{case} {what}: ours {g}, reference {w}"),
        _ => panic!("{case} {what}: ours {got:?}, reference {want:?}"),
    }
}

fn compare(case: &Case, got: &[LabelMetrics], variant: &str) {
    assert_eq!(got.len(), case.expected.len());
    for (g, e) in got.iter().zip(&case.expected) {
        let ctx = format!("{} ({variant}) label {}", case.name, e.label);
        assert_eq!(g.label, e.label);
        check(&ctx, "dice", g.dice, e.dice, 1e-6);
        check(&ctx, "iou", g.iou, e.iou, 1e-6);
        check(&ctx, "hd95", g.hd95, e.hd95, 1e-4);
        check(&ctx, "nsd", g.nsd, e.nsd, 1e-4);
    }
}

#[test]
fn fixtures_cover_what_the_issue_asks() {
    let f = load();
    assert!(f.cases.iter().any(|c| c.shape.len() == 2));
    assert!(f.cases.iter().any(|c| c.shape.len() == 3));
    assert!(
        f.cases.iter().any(|c| c.spacing.windows(2).any(|w| w[0] != w[1])),
        "anisotropic spacing"
    );
    assert!(f
        .cases
        .iter()
        .flat_map(|c| &c.expected)
        .any(|e| e.dice.is_none() && e.nsd.is_none()));
    assert!(f
        .cases
        .iter()
        .flat_map(|c| &c.expected)
        .any(|e| e.dice == Some(0.0) && e.hd95.is_none()));
    assert!(f
        .cases
        .iter()
        .flat_map(|c| &c.expected)
        .any(|e| e.dice.is_none() && e.nsd == Some(0.0)));
    // Some ground-truth mask touches the array border.
    let touches_border = f.cases.iter().any(|c| {
        let gt = decode(&c.gt_rle, &c.shape);
        gt.indexed_iter()
            .any(|(idx, &v)| v != 0 && (0..c.shape.len()).any(|k| idx[k] == 0 || idx[k] + 1 == c.shape[k]))
    });
    assert!(touches_border);
}

#[test]
fn metrics_agree_with_reference_values() {
    for case in load().cases {
        let gt = decode(&case.gt_rle, &case.shape);
        let pred = decode(&case.pred_rle, &case.shape);
        let options = MetricOptions {
            nsd_tolerance_mm: case.nsd_tolerance,
        };
        let got = evaluate_labels(pred.view(), gt.view(), &case.spacing, &case.labels, &options).unwrap();
        compare(&case, &got, "C order");
    }
}

#[test]
fn metrics_agree_with_reference_values_in_fortran_order() {
    // NIfTI volumes arrive as Fortran-ordered (x, y, z) arrays: same voxels, other layout.
    for case in load().cases {
        let to_fortran = |a: ArrayD<u16>| {
            let rev: Vec<usize> = a.shape().iter().rev().copied().collect();
            let mut t = ArrayD::<u16>::zeros(IxDyn(&rev));
            t.assign(&a.view().reversed_axes());
            t.reversed_axes()
        };
        let gt = to_fortran(decode(&case.gt_rle, &case.shape));
        let pred = to_fortran(decode(&case.pred_rle, &case.shape));
        assert_eq!(gt.shape(), &case.shape[..]);
        let options = MetricOptions {
            nsd_tolerance_mm: case.nsd_tolerance,
        };
        let got = evaluate_labels(pred.view(), gt.view(), &case.spacing, &case.labels, &options).unwrap();
        compare(&case, &got, "Fortran order");
    }
}
