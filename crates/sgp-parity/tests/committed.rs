//! The committed parity cases (`fixtures/parity/` and `fixtures/parity-transformers/` at
//! the repository root) must all pass, and the runner's pass rule must catch what it
//! promises to catch.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sgp_parity::{compare, run_dir_with, Registry};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity")
}

/// Runs every case under `dir`; returns (passed, failed) after printing the report.
fn run_committed(dir: &std::path::Path) -> (usize, usize, Vec<String>) {
    let mut lines = Vec::new();
    let summary = run_dir_with(dir, None, &Device::Cpu, &mut |l| {
        println!("{l}");
        lines.push(l.to_string());
    })
    .expect("parity run");
    let failures = lines.into_iter().filter(|l| l.starts_with("FAIL")).collect();
    (summary.passed, summary.failed, failures)
}

#[test]
fn committed_parity_cases_pass() {
    let (passed, failed, failures) = run_committed(&fixtures_dir());
    assert!(passed + failed > 0, "no parity case found");
    assert_eq!(failed, 0, "failed parity cases:\n{failures:#?}");
}

/// The transformers naming, checked against transformers' own forward.
#[test]
fn committed_transformers_cases_pass() {
    let (passed, failed, failures) = run_committed(&fixtures_dir().join("../parity-transformers"));
    assert!(passed >= 2, "expected the committed transformers cases");
    assert_eq!(failed, 0, "failed parity cases:\n{failures:#?}");
}

#[test]
fn kind_names_are_unique_and_the_sam2_kinds_are_registered() {
    let r = Registry::builtin();
    assert!(
        r.duplicates().is_empty(),
        "kinds registered twice: {:?}",
        r.duplicates()
    );
    for k in [
        "image_encoder",
        "sam_heads",
        "memory_encoder",
        "memory_attention",
        "track",
    ] {
        assert!(r.get(k).is_some(), "kind {k} missing");
    }
    assert_eq!(r.get("memory_attention").unwrap().item_dim("pix_feat_with_mem"), 1);
    assert_eq!(r.get("track").unwrap().item_dim("pred_masks"), 0);
}

#[test]
fn pass_rule_checks_shape_finiteness_and_every_batch_item() {
    let dev = Device::Cpu;
    // Item 0 is large and exact; item 1 is small and 10% off. The overall error is tiny,
    // the per-item bound must still fail.
    let reference = Tensor::new(&[[1000f32, 1000.0], [1.0, 1.0]], &dev).unwrap();
    let ours = Tensor::new(&[[1000f32, 1000.0], [1.1, 1.1]], &dev).unwrap();
    let r = compare("x", &ours, &reference, 1e-3, 0).unwrap();
    assert!(r.rel_err < 1e-3, "{}", r.rel_err);
    assert!(!r.passed);
    assert!((r.worst_item_err - 0.1).abs() < 1e-5);

    // The same data viewed along dim 1 (pix_feat_with_mem layout): each column mixes both.
    let ok = compare("x", &reference, &reference, 1e-6, 1).unwrap();
    assert!(ok.passed && ok.rel_err == 0.0);

    let bad_shape = compare("x", &reference.reshape(4).unwrap(), &reference, 1.0, 0).unwrap();
    assert!(!bad_shape.passed && bad_shape.note.unwrap().contains("shape"));

    let nan = Tensor::new(&[[f32::NAN, 1000.0], [1.0, 1.0]], &dev).unwrap();
    assert!(!compare("x", &nan, &reference, 1.0, 0).unwrap().passed);
}

#[test]
fn empty_dir_is_an_error_and_broken_case_is_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run_dir_with(dir.path(), None, &Device::Cpu, &mut |_| {}).is_err());

    let case = dir.path().join("nested/broken");
    std::fs::create_dir_all(&case).unwrap();
    std::fs::write(case.join("case.json"), r#"{"kind": "no_such_kind"}"#).unwrap();
    let mut lines = Vec::new();
    let s = run_dir_with(dir.path(), None, &Device::Cpu, &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!((s.passed, s.failed), (0, 1));
    assert_eq!(s.cases[0].name, "nested/broken");
    assert_eq!(lines.last().unwrap(), "0 passed, 1 failed");
}

#[test]
fn case_without_expected_outputs_runs_and_saves_all_outputs() {
    // Take the first committed image_encoder case and drop its expected outputs.
    let cases = sgp_parity::discover_cases(&fixtures_dir()).unwrap();
    let (_, src) = cases
        .iter()
        .find(|(_, p)| {
            std::fs::read_to_string(p.join("case.json"))
                .unwrap()
                .contains("\"image_encoder\"")
        })
        .expect("an image_encoder case");
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("cases/ie");
    std::fs::create_dir_all(&case).unwrap();
    for f in ["case.json", "config.json", "weights.safetensors"] {
        std::fs::copy(src.join(f), case.join(f)).unwrap();
    }
    let io = sgp_sam2::load_state_dict(&src.join("io.safetensors"), &Device::Cpu).unwrap();
    let inputs: std::collections::HashMap<String, Tensor> =
        io.into_iter().filter(|(k, _)| k.starts_with("in.")).collect();
    candle_core::safetensors::save(&inputs, case.join("io.safetensors")).unwrap();

    let out = dir.path().join("out");
    let s = run_dir_with(&dir.path().join("cases"), Some(&out), &Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!((s.passed, s.failed), (1, 0));
    let saved = sgp_sam2::load_state_dict(&out.join("ie/outputs.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "out.backbone_fpn.0",
            "out.backbone_fpn.1",
            "out.backbone_fpn.2",
            "out.vision_pos_enc.0",
            "out.vision_pos_enc.1",
            "out.vision_pos_enc.2"
        ]
    );
}
