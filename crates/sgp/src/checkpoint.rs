//! Training checkpoints: one safetensors file per checkpoint (`last.safetensors`,
//! `best.safetensors` in the run folder), written atomically.
//!
//! A checkpoint holds only what training changes: the trainable parameters (LoRA
//! adapters, the fine-tuned SAM2 modules, PMA and the decoder) under `param.{name}`, the
//! AdamW moments under `optim.{name}.m` / `.v`, and in the safetensors metadata:
//! * `sgp.format`: [`FORMAT`];
//! * `sgp.base_hash`: the hash of the base weights the run started from (see
//!   [`crate::model::SgpModel::base_hash`]): a checkpoint only makes sense on top of the
//!   same base, so [`Checkpoint::check_base`] refuses any other;
//! * `sgp.config`: the resolved run configuration (JSON);
//! * `sgp.state`: [`TrainState`] (step, RNG state, data-order position, best metric).
//!
//! The file is serialised in memory and written through `sgp_data::write_atomic` (temp
//! file in the same folder, fsync, rename), so a save killed at any moment leaves the
//! previous checkpoint as it was: `rename` either happened or not.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::train_error::{Result, TrainError};

/// Version tag of the checkpoint layout.
pub const FORMAT: &str = "sgp-train-checkpoint-v1";

/// Where training stands: everything besides tensors that a resumed run restores.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Completed optimiser steps.
    pub step: usize,
    /// State of the training RNG (augmentation, supports) after `step`.
    pub rng_state: u64,
    /// Epoch of the data order.
    pub epoch: usize,
    /// Position inside the epoch's (seeded) order: the next item to draw.
    pub position: usize,
    /// Best validation mean Dice so far, and its step.
    pub best: Option<(f64, usize)>,
    /// Images seen so far (for throughput and logs).
    pub images_seen: usize,
    /// The update at which the saved selection embeddings were computed.
    #[serde(default)]
    pub selection_step: Option<usize>,
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file it came from.
    pub path: PathBuf,
    /// `sgp.base_hash`.
    pub base_hash: String,
    /// `sgp.config` (the resolved run configuration).
    pub config: serde_json::Value,
    /// `sgp.state`.
    pub state: TrainState,
    /// Trainable parameters by name.
    pub params: BTreeMap<String, Tensor>,
    /// Optimiser state (`{name}.m`, `{name}.v`).
    pub optim: BTreeMap<String, Tensor>,
    /// Other run state as tensors (`state.{name}`: the support pool's selection
    /// embeddings).
    pub extra: BTreeMap<String, Tensor>,
}

/// What to write.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointRef<'a> {
    /// `sgp.base_hash`.
    pub base_hash: &'a str,
    /// `sgp.config`.
    pub config: &'a serde_json::Value,
    /// `sgp.state`.
    pub state: &'a TrainState,
    /// Trainable parameters by name.
    pub params: &'a [(String, Tensor)],
    /// Optimiser state.
    pub optim: &'a BTreeMap<String, Tensor>,
    /// Other run state (`state.{name}`).
    pub extra: &'a BTreeMap<String, Tensor>,
}

/// Serialises and writes a checkpoint atomically.
pub fn save(path: &Path, ck: &CheckpointRef<'_>) -> Result<()> {
    let _span = tracing::info_span!("save_checkpoint", path = %path.display(), step = ck.state.step).entered();
    let bytes = to_bytes(ck)?;
    sgp_data::write_atomic(path, &bytes)?;
    Ok(())
}

/// The checkpoint file's bytes.
pub fn to_bytes(ck: &CheckpointRef<'_>) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(ck.params.len() + ck.optim.len());
    for (n, t) in ck.params {
        tensors.push((format!("param.{n}"), t.contiguous()?));
    }
    for (n, t) in ck.optim {
        tensors.push((format!("optim.{n}"), t.contiguous()?));
    }
    for (n, t) in ck.extra {
        tensors.push((format!("state.{n}"), t.contiguous()?));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (n, _) in &tensors {
        if !seen.insert(n.as_str()) {
            return Err(TrainError::Config(format!("checkpoint tensor `{n}` appears twice")));
        }
    }
    let metadata: HashMap<String, String> = HashMap::from([
        ("sgp.format".to_string(), FORMAT.to_string()),
        ("sgp.base_hash".to_string(), ck.base_hash.to_string()),
        ("sgp.config".to_string(), json(ck.config)?),
        ("sgp.state".to_string(), json(ck.state)?),
    ]);
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| TrainError::Config(format!("cannot serialise the checkpoint: {e}")))
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| TrainError::Config(format!("cannot serialise: {e}")))
}

/// Reads a checkpoint; a truncated or foreign file is a clear error.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        bad(format!(
            "not a complete safetensors file ({e}); the save may have been cut short"
        ))
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |k: &str| -> Result<&String> {
        meta.get(k)
            .ok_or_else(|| bad(format!("not an SGP training checkpoint (no `{k}` in its metadata)")))
    };
    let format = field("sgp.format")?;
    if format != FORMAT {
        return Err(bad(format!("format `{format}`, this build reads `{FORMAT}`")));
    }
    let base_hash = field("sgp.base_hash")?.clone();
    let config: serde_json::Value =
        serde_json::from_str(field("sgp.config")?).map_err(|e| bad(format!("unreadable config: {e}")))?;
    let state: TrainState =
        serde_json::from_str(field("sgp.state")?).map_err(|e| bad(format!("unreadable training state: {e}")))?;
    let all = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| bad(format!("cannot read its tensors: {e}")))?;
    let mut params = BTreeMap::new();
    let mut optim = BTreeMap::new();
    let mut extra = BTreeMap::new();
    for (name, t) in all {
        if let Some(n) = name.strip_prefix("param.") {
            params.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("optim.") {
            optim.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("state.") {
            extra.insert(n.to_string(), t);
        } else {
            return Err(bad(format!("unexpected tensor `{name}`")));
        }
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        base_hash,
        config,
        state,
        params,
        optim,
        extra,
    })
}

impl Checkpoint {
    /// Refuses a checkpoint trained on other base weights.
    pub fn check_base(&self, base_hash: &str) -> Result<()> {
        if self.base_hash != base_hash {
            return Err(TrainError::Checkpoint {
                path: self.path.clone(),
                reason: format!(
                    "it was trained on base weights {} but the model was built from {}; load it onto \
                     the weights the run started from (see `weights` in its run's config.json)",
                    self.base_hash, base_hash
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: usize, n: usize) -> (Vec<(String, Tensor)>, BTreeMap<String, Tensor>, TrainState) {
        let dev = Device::Cpu;
        let p = Tensor::arange(0f32, n as f32, &dev).unwrap();
        let params = vec![
            ("lora.a".to_string(), (p.clone() + step as f64).unwrap()),
            (
                "head.w".to_string(),
                Tensor::ones((2, 3), candle_core::DType::F32, &dev).unwrap(),
            ),
        ];
        let optim = BTreeMap::from([("lora.a.m".to_string(), (p * 0.5).unwrap())]);
        let state = TrainState {
            step,
            rng_state: 42 + step as u64,
            epoch: 1,
            position: 3,
            best: Some((0.5, 2)),
            images_seen: 8 * step,
            selection_step: Some(step),
        };
        (params, optim, state)
    }

    #[test]
    fn round_trip_and_base_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        let (params, optim, state) = sample(5, 10);
        let config = serde_json::json!({"image_size": 64});
        save(
            &path,
            &CheckpointRef {
                base_hash: "sha256:abc",
                config: &config,
                state: &state,
                params: &params,
                optim: &optim,
                extra: &BTreeMap::new(),
            },
        )
        .unwrap();
        let ck = load(&path, &Device::Cpu).unwrap();
        assert_eq!(ck.state, state);
        assert_eq!(ck.config, config);
        assert_eq!(ck.params.len(), 2);
        let a: Vec<f32> = ck.params["lora.a"].to_vec1().unwrap();
        assert_eq!(a[3], 8.0);
        assert!(ck.optim.contains_key("lora.a.m"));
        ck.check_base("sha256:abc").unwrap();
        let err = ck.check_base("sha256:other").unwrap_err().to_string();
        assert!(
            err.contains("other base weights") || err.contains("trained on base weights"),
            "{err}"
        );

        // A truncated file is an error, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = load(&cut, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("cut.safetensors"), "{err}");
    }

    /// Run by [`a_killed_save_leaves_the_last_good_checkpoint`] in a child process: saves
    /// large checkpoints in a loop until killed.
    #[test]
    #[ignore = "helper process of a_killed_save_leaves_the_last_good_checkpoint"]
    fn child_saves_forever() {
        let Ok(path) = std::env::var("SGP_CHECKPOINT_KILL_PATH") else {
            return;
        };
        let config = serde_json::json!({});
        for step in 100.. {
            let (params, optim, state) = sample(step, 4 << 20);
            save(
                Path::new(&path),
                &CheckpointRef {
                    base_hash: "sha256:abc",
                    config: &config,
                    state: &state,
                    params: &params,
                    optim: &optim,
                    extra: &BTreeMap::new(),
                },
            )
            .unwrap();
        }
    }

    #[test]
    fn a_killed_save_leaves_the_last_good_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        let (params, optim, state) = sample(1, 10);
        let config = serde_json::json!({});
        save(
            &path,
            &CheckpointRef {
                base_hash: "sha256:abc",
                config: &config,
                state: &state,
                params: &params,
                optim: &optim,
                extra: &BTreeMap::new(),
            },
        )
        .unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "checkpoint::tests::child_saves_forever",
                "--ignored",
                "--nocapture",
            ])
            .env("SGP_CHECKPOINT_KILL_PATH", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill it while a temp file is being written (a save is in flight).
        let start = std::time::Instant::now();
        let mut caught = false;
        while start.elapsed() < std::time::Duration::from_secs(60) {
            let in_flight = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .any(|e| e.file_name() != "last.safetensors");
            if in_flight {
                caught = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(caught, "the child never started a save");
        // Whatever the moment, `last` is a complete checkpoint: the first one or a later
        // complete one, never a torn file.
        let ck = load(&path, &Device::Cpu).unwrap();
        assert!(ck.state.step == 1 || ck.state.step >= 100);
        let n = ck.params["lora.a"].elem_count();
        assert!(n == 10 || n == 4 << 20);
    }
}
