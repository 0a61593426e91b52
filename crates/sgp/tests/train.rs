//! Training on the reduced SAM2.1 fixture model (S = 64) and the bundled real demo scans:
//! the loss falls, resume is exact, the base Hiera weights stay byte-identical, and bad
//! setups fail before training with clear messages.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sgp::augment::{AugmentConfig, Rng};
use sgp::lora::LoraConfig;
use sgp::tensor_bytes;
use sgp::train::{RunOptions, TrainConfig, Trainer};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> (String, String) {
    let dir = repo().join("fixtures/parity/sam2.1_reduced/s64/image_encoder_b2");
    (
        dir.join("weights.safetensors").display().to_string(),
        dir.join("config.json").display().to_string(),
    )
}

/// A small, fast run: reduced model at S = 64, K = 2, LoRA rank 4.
fn config() -> TrainConfig {
    let (w, c) = fixture();
    let mut cfg = TrainConfig::new("demo", repo().join("datasets/demo"), Some(w));
    cfg.model_config = Some(c);
    cfg.image_size = 64;
    cfg.support_size = 2;
    cfg.steps = 6;
    cfg.accumulation = 1;
    cfg.warmup_steps = 0;
    cfg.optimizer.lr = 2e-3;
    cfg.val_every = 0;
    cfg.val_max_items = 3;
    cfg.checkpoint_every = 0;
    cfg.pool_size = 12;
    cfg.trainable.lora = Some(LoraConfig::new(4, 4.0));
    cfg
}

/// Mean loss over a fixed set of training queries (no augmentation, fixed supports).
fn fixed_loss(t: &Trainer, n: usize) -> f64 {
    let mut sum = 0.0;
    let present: Vec<(usize, u32)> = t
        .data
        .queries
        .iter()
        .copied()
        .filter(|&(i, c)| t.data.train[i].has(c))
        .collect();
    let step = (present.len() / n).max(1);
    let mut count = 0;
    for (k, &(i, c)) in present.iter().step_by(step).take(n).enumerate() {
        let p = &t.data.train[i];
        let sup = t.data.draw_supports(c, &p.patient, 2, &mut Rng::new(k as u64)).unwrap();
        sum += t.query_loss(&p.image, &p.labels, c, &sup).unwrap().breakdown.total;
        count += 1;
    }
    sum / count as f64
}

#[test]
fn loss_falls_on_real_demo_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.augment = AugmentConfig::none();
    cfg.steps = 12;
    let opts = RunOptions::default();
    let mut t = Trainer::new(cfg, dir.path(), &opts).unwrap();
    let before = fixed_loss(&t, 4);
    let start = std::time::Instant::now();
    let summary = t.run(&opts).unwrap();
    let after = fixed_loss(&t, 4);
    eprintln!(
        "loss on 4 fixed training queries: {before:.4} -> {after:.4} after {} updates ({:.1} s, {:.2} img/s, {} trainable)",
        summary.steps,
        start.elapsed().as_secs_f64(),
        summary.images_per_s,
        summary.trainable_params
    );
    assert_eq!(summary.steps, 12);
    assert!(after < before * 0.95, "the loss must fall: {before} -> {after}");
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 12);
    assert!(dir.path().join("config.json").is_file());
    assert!(dir.path().join("last.safetensors").is_file());

    // The Hiera trunk's base weights are untouched: byte-identical to the file.
    let (w, _) = fixture();
    let original = sgp::sam2::load_state_dict(std::path::Path::new(&w), &Device::Cpu).unwrap();
    let trunk: Vec<(&String, &Tensor)> = t
        .model
        .frozen()
        .iter()
        .filter(|(n, _)| n.starts_with("image_encoder.trunk."))
        .collect();
    assert!(trunk.len() > 20, "the trunk's weights must be frozen tensors");
    for (name, tensor) in &trunk {
        assert_eq!(
            tensor_bytes(tensor).unwrap(),
            tensor_bytes(&original[*name]).unwrap(),
            "{name} changed during training"
        );
    }
    let names: Vec<String> = t.model.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n.starts_with("sam2.image_encoder.")));
    assert!(names.iter().any(|n| n.starts_with("lora.image_encoder.trunk.")));
    // ...while the adapters did train (B starts at zero).
    let b_moved = t
        .model
        .trainable_vars()
        .into_iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .any(|(_, v)| {
            v.as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
    assert!(b_moved, "LoRA B must have moved");
}

fn params_of(
    path: &std::path::Path,
) -> (
    BTreeMap<String, Tensor>,
    BTreeMap<String, Tensor>,
    sgp::checkpoint::TrainState,
) {
    let ck = sgp::checkpoint::load(path, &Device::Cpu).unwrap();
    (ck.params, ck.optim, ck.state)
}

fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (k, x) in a {
        let d = (x - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d as f64);
    }
    worst
}

/// Tolerance of the resume test: the computation is deterministic on CPU, so the two
/// runs should agree exactly; 1e-6 absolute leaves room for nothing but rounding.
const RESUME_TOL: f64 = 1e-6;

#[test]
fn steps_then_resume_then_steps_equals_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config();
    cfg.steps = 4;
    // Pool embeddings from update 0 are restored on resume (at 2), then refreshed at 3.
    cfg.selection_refresh = 3;
    cfg.accumulation = 2; // the data position moves twice per update
                          // Augmentation stays on: the RNG state must be restored too.
    let killed = RunOptions {
        stop_after: Some(2),
        ..Default::default()
    };
    let s = sgp::train::train(cfg.clone(), a.path(), &killed).unwrap();
    assert_eq!(s.steps, 2);
    assert_eq!(params_of(&a.path().join("last.safetensors")).2.step, 2);
    // Resuming with other arguments is refused.
    let mut other = cfg.clone();
    other.optimizer.lr *= 2.0;
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    let err = sgp::train::train(other, a.path(), &resume).unwrap_err().to_string();
    assert!(err.contains("arguments differ"), "{err}");
    // A fresh run into a folder that holds one is refused too.
    let err = sgp::train::train(cfg.clone(), a.path(), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");

    let s = sgp::train::train(cfg.clone(), a.path(), &resume).unwrap();
    assert_eq!(s.steps, 4);
    let s = sgp::train::train(cfg, b.path(), &RunOptions::default()).unwrap();
    assert_eq!(s.steps, 4);
    let (pa, oa, sa) = params_of(&a.path().join("last.safetensors"));
    let (pb, ob, sb) = params_of(&b.path().join("last.safetensors"));
    let dp = max_diff(&pa, &pb);
    let dm = max_diff(&oa, &ob);
    eprintln!("2 + resume + 2 vs 4 updates: max |Δparam| = {dp:e}, max |Δmoment| = {dm:e}");
    assert!(
        dp <= RESUME_TOL && dm <= RESUME_TOL,
        "params differ by {dp}, moments by {dm}"
    );
    assert_eq!(sa, sb, "step, RNG, data position must agree");
    // metrics.jsonl of the resumed run has each step once.
    let steps: Vec<u64> = std::fs::read_to_string(a.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
}

fn setup_error(cfg: TrainConfig) -> String {
    let dir = tempfile::tempdir().unwrap();
    let err = Trainer::new(cfg, &dir.path().join("run"), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(!dir.path().join("run").join("last.safetensors").exists());
    err
}

#[test]
fn bad_setups_fail_before_training_with_clear_errors() {
    let mut c = config();
    c.root = PathBuf::from("/nonexistent/dataset");
    let e = setup_error(c);
    assert!(e.contains("does not exist"), "{e}");

    let mut c = config();
    c.image_size = 80;
    let e = setup_error(c);
    assert!(e.contains("not a multiple of 32"), "{e}");

    let mut c = config();
    c.support_size = 500;
    let e = setup_error(c);
    assert!(e.contains("larger than the support pool"), "{e}");

    let mut c = config();
    c.from_scratch = true;
    let e = setup_error(c);
    assert!(e.contains("not both"), "{e}");

    // A class with no pixel anywhere: a copy of the demo whose label list has one more.
    let tmp = tempfile::tempdir().unwrap();
    let demo = repo().join("datasets/demo");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        for e in std::fs::read_dir(demo.join(sub)).unwrap().flatten() {
            std::fs::copy(e.path(), tmp.path().join(sub).join(e.file_name())).unwrap();
        }
    }
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo.join("dataset.json")).unwrap()).unwrap();
    json["labels"]["ghost"] = serde_json::json!(2);
    std::fs::write(tmp.path().join("dataset.json"), json.to_string()).unwrap();
    let mut c = config();
    c.root = tmp.path().to_path_buf();
    let e = setup_error(c);
    assert!(e.contains("class 2 (ghost) has no pixel"), "{e}");
}

#[test]
fn a_checkpoint_is_refused_on_other_base_weights() {
    let (w, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("w.safetensors");
    // Train one update on a perturbed copy of the weights...
    let mut sd = sgp::sam2::load_state_dict(std::path::Path::new(&w), &Device::Cpu).unwrap();
    let key = "image_encoder.trunk.blocks.0.attn.qkv.weight".to_string();
    let t = (&sd[&key] * 1.01).unwrap();
    sd.insert(key, t);
    candle_core::safetensors::save(&sd, &weights).unwrap();
    let mut cfg = config();
    cfg.weights = Some(weights.display().to_string());
    cfg.steps = 2;
    let run = tmp.path().join("run");
    let killed = RunOptions {
        stop_after: Some(1),
        ..Default::default()
    };
    sgp::train::train(cfg.clone(), &run, &killed).unwrap();
    // ...then put the original weights at the same path and resume.
    std::fs::copy(&w, &weights).unwrap();
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    let e = sgp::train::train(cfg, &run, &resume).unwrap_err().to_string();
    assert!(e.contains("trained on base weights"), "{e}");
}

#[test]
fn similar_selection_ranks_by_embedding_and_leaves_the_patient_out() {
    let dir = tempfile::tempdir().unwrap();
    let t = Trainer::new(config(), dir.path(), &RunOptions::default()).unwrap();
    let d = &t.data;
    let (qi, c) = d.queries.iter().copied().find(|&(i, c)| d.train[i].has(c)).unwrap();
    let patient = d.train[qi].patient.clone();
    let dim = d.pool.len();
    // Pool plane j gets the j-th unit vector; the query is closest to the last ones.
    let emb: Vec<Vec<f32>> = (0..dim)
        .map(|j| (0..dim).map(|i| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    let query: Vec<f32> = (0..dim).map(|i| 1.0 + i as f32).collect();
    let picked = d.similar_supports(c, &patient, 2, &query, &emb).unwrap();
    let eligible: Vec<usize> = (0..dim)
        .filter(|&j| d.train[d.pool[j]].has(c) && d.train[d.pool[j]].patient != patient)
        .collect();
    let n = eligible.len();
    assert!(n >= 2);
    // The two highest-indexed eligible planes, least similar first.
    assert_eq!(picked, vec![d.pool[eligible[n - 2]], d.pool[eligible[n - 1]]]);
    assert!(picked
        .iter()
        .all(|&i| d.train[i].patient != patient && d.train[i].has(c)));
    assert!(d.similar_supports(c, &patient, 2, &query, &emb[1..]).is_err());
}

#[test]
fn chunk_training_on_real_volumes_runs_through_the_memory_bank() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.chunk_slices = 3;
    cfg.augment = AugmentConfig::none();
    cfg.steps = 8;
    let opts = RunOptions::default();
    let mut t = Trainer::new(cfg.clone(), dir.path(), &opts).unwrap();
    // Queries start chunks of consecutive slices of one case.
    let (start, _) = t.data.queries[0];
    let chunk = t.data.chunk(start, 3);
    assert_eq!(chunk.len(), 3, "the demo scans are volumes");
    for w in chunk.windows(2) {
        let (a, b) = (&t.data.train[w[0]], &t.data.train[w[1]]);
        assert_eq!((a.case.as_str(), a.index + 1), (b.case.as_str(), b.index));
    }
    // The bank conditions later slices: slice 1 of the chunk is not its 2D pass.
    let (_, c) = t.data.queries[0];
    let p0 = &t.data.train[chunk[0]];
    let sup = t.data.draw_supports(c, &p0.patient, 2, &mut Rng::new(3)).unwrap();
    let items: Vec<_> = sup
        .iter()
        .map(|&i| t.data.support_item(i, c, &Device::Cpu).unwrap())
        .collect();
    let xs: Vec<Tensor> = chunk
        .iter()
        .map(|&i| sgp::train::Plane::model_input(&t.data.train[i].image, &Device::Cpu).unwrap())
        .collect();
    t.model.set_train(false);
    let bank = sgp::memory::BankKind::Similarity;
    let a = t.model.forward_chunk(&xs[..2], None, c, &items, bank).unwrap();
    let other = [xs[2].clone(), xs[1].clone()];
    let b = t.model.forward_chunk(&other, None, c, &items, bank).unwrap();
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // Slice 1 sees slice 0's memory: another slice 0 changes it.
    let d1 = diff(&a[1].final_logits, &b[1].final_logits);
    assert!(d1 > 1e-3, "slice 1 must depend on the bank (max change {d1})");
    // The same chunk twice gives the same result (no hidden state between chunks).
    let again = t.model.forward_chunk(&xs[..2], None, c, &items, bank).unwrap();
    assert_eq!(diff(&a[1].final_logits, &again[1].final_logits), 0.0);
    t.model.set_train(true);
    let n_chunks = t.data.queries.len();
    let s = t.run(&opts).unwrap();
    assert_eq!(s.steps, 8);
    assert!(s.last_loss.total.is_finite());
    // Every update saw whole chunks: more images than micro-batches.
    assert!(
        t.state.images_seen > 8,
        "{} images in 8 single-query updates",
        t.state.images_seen
    );
    eprintln!(
        "chunk training: {n_chunks} chunk queries, {} images in 8 updates, loss {:.4}",
        t.state.images_seen, s.last_loss.total
    );
    // A bad bank policy is refused before training.
    let mut bad = cfg;
    bad.bank = "lifo".into();
    let err = setup_error(bad);
    assert!(err.contains("--bank"), "{err}");
}
