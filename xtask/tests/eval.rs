//! `cargo xtask eval` as a user runs it, with the committed reduced SAM2.1 weights (random,
//! S = 64) on a small 2D folder: the Dice table on stdout, resume on a second run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Four 40×48 pictures with a bright square (label 1) and a dark disc (label 2).
fn make_2d_folder(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for i in 0..4u32 {
        let mut img = image::RgbImage::new(48, 40);
        let mut mask = image::GrayImage::new(48, 40);
        for y in 0..40 {
            for x in 0..48 {
                let noise = ((x * 31 + y * 17 + i * 7) % 23) as u8;
                let (mut v, mut label) = (90 + noise, 0u8);
                if (4 + i * 3..16 + i * 3).contains(&x) && (5..15).contains(&y) {
                    (v, label) = (220 + noise / 2, 1);
                }
                if ((x as f32 - 32.0 + i as f32).powi(2) + (y as f32 - 26.0).powi(2)).sqrt() < 6.0 {
                    (v, label) = (20 + noise, 2);
                }
                img.put_pixel(x, y, image::Rgb([v, v / 2 + 40, 255 - v]));
                mask.put_pixel(x, y, image::Luma([label]));
            }
        }
        img.save(dir.join(format!("images/img{i}.png"))).unwrap();
        mask.save(dir.join(format!("masks/img{i}.png"))).unwrap();
    }
}

fn eval(data: &Path, out: &Path) -> (Option<i32>, String, String) {
    let case = root().join("fixtures/parity/sam2.1_reduced/s64/image_encoder_b2");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "eval",
            "--dataset",
            "folder",
            "--split",
            "all",
            "--support-size",
            "2",
            "--cache",
            "none",
        ])
        .args(["--device", "cpu", "--root"])
        .arg(data)
        .arg("--weights")
        .arg(case.join("weights.safetensors"))
        .arg("--config")
        .arg(case.join("config.json"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn eval_prints_the_dice_table_and_resumes() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("folder");
    make_2d_folder(&data);
    let out = t.path().join("eval");
    let (code, stdout, stderr) = eval(&data, &out);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("| method | "), "{stdout}");
    assert!(stdout.contains("| mean |"), "{stdout}");
    assert!(stdout.contains("SAM2-SGP (training-free, K=2, full)"), "{stdout}");
    assert!(
        stderr.contains("4 cases (4 segmented, 0 from earlier predictions"),
        "{stderr}"
    );
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(stdout.contains(&table), "{stdout}");

    std::fs::remove_file(out.join("predictions/img1.png")).unwrap();
    let (code, stdout2, stderr) = eval(&data, &out);
    assert_eq!(code, Some(0), "{stdout2}{stderr}");
    assert!(
        stderr.contains("4 cases (1 segmented, 3 from earlier predictions"),
        "{stderr}"
    );
    assert_eq!(stdout2, stdout);

    // Neither --run nor --weights: refused by the argument parser.
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["eval", "--dataset", "folder", "--root"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--weights"));
}

#[test]
fn eval_with_a_trained_run_uses_its_head_and_split() {
    let t = tempfile::tempdir().unwrap();
    let demo = root().join("datasets/demo");
    let run_dir = t.path().join("run");
    train_one_step(&run_dir, &[]);

    let out = t.path().join("eval");
    let o = eval_run(&run_dir, &out);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("SAM2-SGP (trained, K=2, full)"), "{stdout}");
    // The run's split (seed 0, 20 % test): one of the five demo patients.
    assert!(stderr.contains("1 cases (1 segmented"), "{stderr}");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(settings["split"], "Test");
    assert_eq!(settings["cases"].as_array().unwrap().len(), 1);

    // --run and --weights together are refused.
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["eval", "--dataset", "demo", "--weights", "x.pt", "--root"])
        .arg(&demo)
        .arg("--run")
        .arg(&run_dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// Trains the reduced model for one step on the demo into `run_dir` (`extra`: more flags).
fn train_one_step(run_dir: &Path, extra: &[&str]) {
    let case = root().join("fixtures/parity/sam2.1_reduced/s64/image_encoder_b2");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "train",
            "--dataset",
            "demo",
            "--image-size",
            "64",
            "--support-size",
            "2",
        ])
        .args(["--steps", "1", "--val-every", "1", "--device", "cpu", "--root"])
        .arg(root().join("datasets/demo"))
        .arg("--weights")
        .arg(case.join("weights.safetensors"))
        .arg("--config")
        .arg(case.join("config.json"))
        .arg("--out")
        .arg(run_dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_run_trained_as_an_ablation_is_evaluated_as_one() {
    let t = tempfile::tempdir().unwrap();
    let run_dir = t.path().join("run");
    train_one_step(&run_dir, &["--no-pma"]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["ablation"]["no_pma"], true, "{config}");
    let o = eval_run(&run_dir, &t.path().join("eval"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("SAM2-SGP (trained, K=2, no-pma)"), "{stdout}");
}

/// `xtask eval --run RUN_DIR` on the demo (K=2, no cache) into `out`.
fn eval_run(run_dir: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "eval",
            "--dataset",
            "demo",
            "--support-size",
            "2",
            "--cache",
            "none",
            "--device",
            "cpu",
        ])
        .arg("--root")
        .arg(root().join("datasets/demo"))
        .arg("--run")
        .arg(run_dir)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}
