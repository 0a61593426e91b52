//! `cargo xtask data verify` as a user runs it: the binary's exit status and its report.

use std::path::Path;
use std::process::Command;

use ndarray::{ArrayD, IxDyn};

/// A CAMUS patient folder (NIfTI release) with 2CH/4CH × ED/ES images and ground truths.
fn camus_patient(base: &Path, p: u32) {
    let dir = base.join(format!("patient{p:04}"));
    std::fs::create_dir_all(&dir).unwrap();
    let reference = sgp_data::Volume::<f32> {
        data: ArrayD::from_shape_fn(IxDyn(&[8, 10]), |ix| (ix[0] * 10 + ix[1]) as f32),
        spacing: vec![0.3, 0.3],
        geometry: None,
    };
    let labels = ArrayD::from_shape_fn(IxDyn(&[8, 10]), |ix| (ix[0] % 4) as u16);
    for view in ["2CH", "4CH"] {
        for phase in ["ED", "ES"] {
            let stem = dir.join(format!("patient{p:04}_{view}_{phase}"));
            sgp_data::write_float_like(&stem.with_extension("nii.gz"), &reference.data, &reference).unwrap();
            let gt = dir.join(format!("patient{p:04}_{view}_{phase}_gt.nii.gz"));
            sgp_data::write_labels_like(&gt, &labels, &reference).unwrap();
        }
    }
}

fn verify(root: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["data", "verify", "--dataset", "camus", "--root"])
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn camus_missing_label_file_exits_1() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("database_nifti");
    camus_patient(&base, 1);
    camus_patient(&base, 2);
    let (code, text) = verify(&base, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("result: OK"), "{text}");

    std::fs::remove_file(base.join("patient0002/patient0002_4CH_ES_gt.nii.gz")).unwrap();
    let (code, text) = verify(&base, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("ERROR") && text.contains("ground truth missing"),
        "{text}"
    );
    assert!(text.contains("unusable"), "{text}");

    // CAMUS labels every image: asking to accept unlabelled images is refused, not obeyed.
    let (code, text) = verify(&base, &["--allow-unlabelled"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("does not apply to camus"), "{text}");
}

#[test]
fn camus_empty_patient_folder_exits_1() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("database_nifti");
    camus_patient(&base, 1);
    std::fs::create_dir_all(base.join("patient0002")).unwrap();
    let (code, text) = verify(&base, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("patient0002") && text.contains("empty case folder"),
        "{text}"
    );
}
