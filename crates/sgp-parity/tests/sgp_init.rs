//! The committed `sgp_init` cases (official SAM2 + the spec's box step): an untrained
//! `sgp_pma::SgpHead` on sgp-memory's PMG reproduces them, with one query without
//! foreground (final = pseudo-mask) and one with a box.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sgp_parity::{run_case, Case};

fn sgp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/sgp")
}

fn sgp_init_cases() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![sgp_dir()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("fixtures dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("sgp_init"))
                {
                    found.push(p);
                } else {
                    stack.push(p);
                }
            }
        }
    }
    found.sort();
    found
}

#[test]
fn committed_sgp_init_cases_pass() {
    let cases = sgp_init_cases();
    assert!(
        !cases.is_empty(),
        "no committed sgp_init case under {}",
        sgp_dir().display()
    );
    let (mut with_box, mut without_box) = (0, 0);
    for dir in &cases {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let report = run_case(&name, dir, None, &Device::Cpu);
        for t in &report.tensors {
            println!(
                "{name} {} rel {:.2e} worst item {:.2e}",
                t.name, t.rel_err, t.worst_item_err
            );
        }
        assert!(report.passed, "{name}: {report:#?}");
        for wanted in ["box", "final_logits", "pred_masks_high_res", "pix_feat_with_mem"] {
            assert!(
                report.tensors.iter().any(|t| t.name == wanted),
                "{name}: no expected `{wanted}`"
            );
        }
        // Count the queries of each kind from the expected boxes.
        let case = Case::load(dir, name.clone(), &Device::Cpu).unwrap();
        let boxes: &Tensor = case.expected().get("box").unwrap();
        for b in boxes.to_vec2::<f32>().unwrap() {
            if b == [-1.0; 4] {
                without_box += 1;
            } else {
                with_box += 1;
            }
        }
    }
    assert!(
        with_box > 0 && without_box > 0,
        "need a query with and one without a box"
    );
}
