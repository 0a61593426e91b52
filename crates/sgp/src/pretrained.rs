//! Loading SAM2/SAM2.1 weights from a hub repo id or a local path, in every format users
//! meet:
//!
//! 1. the official `.pt` checkpoints (`{"model": state_dict}`);
//! 2. safetensors with the official key names (community conversions);
//! 3. the transformers format (`model.safetensors` + `config.json`, `Sam2Model` or
//!    `Sam2VideoModel` naming), which the official hub repos now carry too.
//!
//! The format is detected from the files' contents, not their names. Formats 1 and 2 need
//! a model config: a preset name (`sam2.1_hiera_t`, ...), a yaml/JSON file, or — for the
//! official repos and file names — the one the name implies.

use std::path::{Path, PathBuf};

use candle_core::Device;
use sgp_sam2::Sam2Config;
use sgp_sam2::Sam2Model;
use sgp_sam2::{detect_format, WeightsFileFormat};
use sgp_sam2::{load_transformers, looks_like_transformers, TransformersModel};

use crate::{Error, Result};

/// The official repos: (repo id, checkpoint file, config preset).
pub const OFFICIAL_REPOS: [(&str, &str, &str); 8] = [
    ("facebook/sam2-hiera-tiny", "sam2_hiera_tiny.pt", "sam2_hiera_t"),
    ("facebook/sam2-hiera-small", "sam2_hiera_small.pt", "sam2_hiera_s"),
    (
        "facebook/sam2-hiera-base-plus",
        "sam2_hiera_base_plus.pt",
        "sam2_hiera_b+",
    ),
    ("facebook/sam2-hiera-large", "sam2_hiera_large.pt", "sam2_hiera_l"),
    ("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", "sam2.1_hiera_t"),
    ("facebook/sam2.1-hiera-small", "sam2.1_hiera_small.pt", "sam2.1_hiera_s"),
    (
        "facebook/sam2.1-hiera-base-plus",
        "sam2.1_hiera_base_plus.pt",
        "sam2.1_hiera_b+",
    ),
    ("facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt", "sam2.1_hiera_l"),
];

/// Where weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSpec {
    /// A file or a folder on disk.
    Local(PathBuf),
    /// A hub model repo, optionally at a revision (`owner/name@rev`).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit; `None`: the default branch.
        revision: Option<String>,
    },
}

impl WeightsSpec {
    /// An existing path wins; otherwise `owner/name[@revision]` is a repo id.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            Some(_) => return Err(Error::BadWeightsSpec(spec.into())),
            None => (spec, None),
        };
        let valid_part = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match repo.split_once('/') {
            Some((owner, name)) if valid_part(owner) && valid_part(name) => Ok(Self::Hub {
                repo: repo.to_string(),
                revision,
            }),
            _ => Err(Error::BadWeightsSpec(spec.into())),
        }
    }
}

/// The on-disk format a model was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// Official `.pt` checkpoint.
    OriginalPt,
    /// safetensors with the official key names.
    OriginalSafetensors,
    /// transformers `Sam2Model` / `Sam2VideoModel`.
    Transformers,
}

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A preset name or a yaml/JSON config file, for the original formats. `None`: implied
    /// by the repo or file name, or read from `config.json` for the transformers format.
    pub config: Option<String>,
    /// Apply `build_sam2`'s post-processing settings (what users of the official package
    /// get). Parity checks turn this off.
    pub real_use_settings: bool,
    /// Model input size S (a multiple of 32) instead of the config's; the position
    /// embeddings are interpolated as the official code does.
    pub image_size: Option<usize>,
    /// Where the parameters go.
    pub device: Device,
    /// How to reach the hub (repo ids only).
    #[cfg(feature = "hub")]
    pub hub: crate::hub::HubOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            config: None,
            real_use_settings: true,
            image_size: None,
            device: Device::Cpu,
            #[cfg(feature = "hub")]
            hub: crate::hub::HubOptions::from_env(),
        }
    }
}

/// A loaded model and where it came from.
#[derive(Debug)]
pub struct Pretrained {
    /// The model, in f32.
    pub model: Sam2Model,
    /// The resolved config (preset or file, image size, real-use settings applied).
    pub config: Sam2Config,
    /// The format the weights were read in.
    pub format: WeightsFormat,
    /// The weights file that was read (inside the hub cache for repo ids).
    pub weights_path: PathBuf,
    /// False for image-only checkpoints (transformers `Sam2Model`): tracking and
    /// propagation need the memory path and must refuse such a model.
    pub has_memory_path: bool,
}

/// `Sam2Model::from_pretrained("facebook/sam2.1-hiera-tiny")`.
pub trait FromPretrained: Sized {
    /// Loads with [`LoadOptions::default`] (CPU, real-use settings, `HF_HUB_OFFLINE` honoured).
    fn from_pretrained(spec: &str) -> Result<Self> {
        Self::from_pretrained_with(spec, &LoadOptions::default())
    }
    /// Loads a repo id or path (see [`load_pretrained`]) with explicit options.
    fn from_pretrained_with(spec: &str, options: &LoadOptions) -> Result<Self>;
}

impl FromPretrained for Sam2Model {
    fn from_pretrained_with(spec: &str, options: &LoadOptions) -> Result<Self> {
        Ok(load_pretrained(spec, options)?.model)
    }
}

/// Files that make up a model, before loading.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once per load; boxing buys nothing
enum Located {
    Original { weights: PathBuf, config: Sam2Config },
    Transformers { weights: PathBuf, config_json: PathBuf },
}

/// Loads from a repo id or a path; see the module docs.
pub fn load_pretrained(spec: &str, options: &LoadOptions) -> Result<Pretrained> {
    let _span = tracing::info_span!("load_pretrained", spec).entered();
    match WeightsSpec::parse(spec)? {
        WeightsSpec::Local(path) => {
            let located = locate_local(&path, options)?;
            load_located(located, options)
        }
        WeightsSpec::Hub { repo, revision } => load_from_hub(&repo, revision.as_deref(), options),
    }
}

#[cfg(not(feature = "hub"))]
fn load_from_hub(repo: &str, _revision: Option<&str>, _options: &LoadOptions) -> Result<Pretrained> {
    Err(Error::HubDisabled(repo.to_string()))
}

#[cfg(feature = "hub")]
fn load_from_hub(repo: &str, revision: Option<&str>, options: &LoadOptions) -> Result<Pretrained> {
    let hub = crate::hub::Hub::new(options.hub.clone())?;
    let located = locate_on_hub(&hub, repo, revision, options)?;
    let cached = match &located {
        Located::Original { weights, .. } | Located::Transformers { weights, .. } => weights.clone(),
    };
    match load_located(located, options) {
        // A cached file that cannot be read would fail the same way forever: drop it so
        // the next attempt downloads it again.
        Err(e @ Error::Sam2(sgp_sam2::Error::WeightsFormat { .. })) => {
            hub.evict(&cached);
            Err(e)
        }
        other => other,
    }
}

#[cfg(feature = "hub")]
fn locate_on_hub(hub: &crate::hub::Hub, repo: &str, revision: Option<&str>, options: &LoadOptions) -> Result<Located> {
    let official = OFFICIAL_REPOS.iter().find(|(id, _, _)| *id == repo);
    let mut first_error = None;
    if let Some((_, file, preset)) = official {
        match hub.fetch(repo, revision, file) {
            Ok(Some(weights)) => {
                let config = config_for(options, Some(preset), &weights)?;
                return Ok(Located::Original { weights, config });
            }
            Ok(None) => {}
            // Offline with only the transformers files cached: fall through to them.
            Err(e @ Error::NotCached { .. }) => first_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    let transformers = hub.fetch(repo, revision, "config.json").and_then(|cfg| match cfg {
        Some(cfg) => Ok(hub.fetch(repo, revision, "model.safetensors")?.map(|w| (cfg, w))),
        None => Ok(None),
    });
    match transformers {
        Ok(Some((config_json, weights))) => {
            if let Some(cfg) = &options.config {
                tracing::warn!("--config {cfg} ignored: {repo} carries its own config.json");
            }
            return Ok(Located::Transformers { weights, config_json });
        }
        Ok(None) => {}
        Err(e) => return Err(first_error.unwrap_or(e)),
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // A community repo with original-name safetensors needs the user's config.
    if options.config.is_some() {
        if let Some(weights) = hub.fetch(repo, revision, "model.safetensors")? {
            let config = config_for(options, None, &weights)?;
            return Ok(Located::Original { weights, config });
        }
    }
    Err(Error::NeedConfig(format!(
        "`{repo}` is not an official SAM2 repo and has neither a transformers `config.json` + \
         `model.safetensors` nor (with --config) a `model.safetensors`; download the files and \
         pass a local path"
    )))
}

fn locate_local(path: &Path, options: &LoadOptions) -> Result<Located> {
    if path.is_dir() {
        let config_json = path.join("config.json");
        let weights = path.join("model.safetensors");
        if config_json.is_file() && weights.is_file() && is_transformers_config(&config_json) {
            return Ok(Located::Transformers { weights, config_json });
        }
        let candidates: Vec<PathBuf> = read_dir_sorted(path)?
            .into_iter()
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "pt" || e == "pth" || e == "safetensors")
            })
            .collect();
        return match candidates.as_slice() {
            [one] => locate_local(one, options),
            [] => Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                reason: "the folder holds no .pt/.safetensors checkpoint and no transformers \
                         config.json + model.safetensors"
                    .into(),
            }),
            many => Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                reason: format!(
                    "the folder holds several checkpoints ({}); pass one file",
                    many.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        };
    }
    let format = detect_format(path).map_err(|e| match e {
        sgp_sam2::Error::WeightsFormat { path, reason } => Error::UnknownFormat { path, reason },
        other => Error::Sam2(other),
    })?;
    if format == WeightsFileFormat::Safetensors && safetensors_has_transformers_names(path)? {
        let config_json = path.with_file_name("config.json");
        if !config_json.is_file() {
            return Err(Error::NeedConfig(format!(
                "{} uses the transformers naming but has no config.json beside it",
                path.display()
            )));
        }
        return Ok(Located::Transformers {
            weights: path.to_path_buf(),
            config_json,
        });
    }
    let config = config_for(options, None, path)?;
    Ok(Located::Original {
        weights: path.to_path_buf(),
        config,
    })
}

fn load_located(located: Located, options: &LoadOptions) -> Result<Pretrained> {
    match located {
        Located::Original { weights, config } => {
            let mut config = if options.real_use_settings {
                config.with_real_use_settings()
            } else {
                config
            };
            if let Some(s) = options.image_size {
                config = config.with_image_size(s)?;
            }
            let format = match detect_format(&weights)? {
                WeightsFileFormat::TorchZip => WeightsFormat::OriginalPt,
                WeightsFileFormat::Safetensors => WeightsFormat::OriginalSafetensors,
            };
            let model = Sam2Model::load(&config, &weights, &options.device)?;
            Ok(Pretrained {
                model,
                config,
                format,
                weights_path: weights,
                has_memory_path: true,
            })
        }
        Located::Transformers { weights, config_json } => {
            let loaded = load_transformers(&config_json, &weights, options.image_size, &options.device)?;
            Ok(Pretrained {
                model: loaded.model,
                config: loaded.config,
                format: WeightsFormat::Transformers,
                weights_path: weights,
                has_memory_path: loaded.kind == TransformersModel::Video,
            })
        }
    }
}

/// The config for an original-format checkpoint: the user's choice, else the preset the
/// repo implies, else the one the file name implies.
fn config_for(options: &LoadOptions, implied: Option<&str>, weights: &Path) -> Result<Sam2Config> {
    if let Some(c) = &options.config {
        let p = Path::new(c);
        return Ok(if p.is_file() {
            Sam2Config::from_file(p)?
        } else {
            Sam2Config::preset(c)?
        });
    }
    if let Some(preset) = implied.or_else(|| preset_from_file_name(weights)) {
        return Ok(Sam2Config::preset(preset)?);
    }
    Err(Error::NeedConfig(format!(
        "cannot tell the model config of {}; pass --config with a preset ({}) or a yaml file",
        weights.display(),
        sgp_sam2::PRESET_NAMES.join(", ")
    )))
}

/// `sam2.1_hiera_tiny.pt` → `sam2.1_hiera_t`, and so on for the official file names.
pub fn preset_from_file_name(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let v21 = name.contains("sam2.1") || name.contains("sam2_1");
    if !v21 && !name.contains("sam2") {
        return None;
    }
    let size = if name.contains("tiny") || name.contains("hiera_t.") || name.contains("hiera_t_") {
        "t"
    } else if name.contains("small") || name.contains("hiera_s.") || name.contains("hiera_s_") {
        "s"
    } else if name.contains("base_plus") || name.contains("base-plus") || name.contains("b+") {
        "b+"
    } else if name.contains("large") || name.contains("hiera_l.") || name.contains("hiera_l_") {
        "l"
    } else {
        return None;
    };
    sgp_sam2::PRESET_NAMES
        .iter()
        .copied()
        .find(|p| p.starts_with(if v21 { "sam2.1_" } else { "sam2_" }) && p.ends_with(&format!("_{size}")))
}

fn is_transformers_config(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("model_type")
                .and_then(|m| m.as_str())
                .map(|m| m.starts_with("sam2"))
        })
        .unwrap_or(false)
}

/// Reads only the safetensors header (the first 8 + N bytes) to see the key names.
fn safetensors_has_transformers_names(path: &Path) -> Result<bool> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(io)?.len();
    if n == 0 || n > 100_000_000 || n + 8 > file_len {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            reason: format!("safetensors header length {n} does not fit a {file_len}-byte file"),
        });
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| Error::UnknownFormat {
        path: path.to_path_buf(),
        reason: format!("safetensors header is not JSON: {e}"),
    })?;
    let keys = v.as_object().map(|o| o.keys().map(String::as_str).collect::<Vec<_>>());
    Ok(keys.is_some_and(|k| looks_like_transformers(k.into_iter())))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut v: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            WeightsSpec::parse("facebook/sam2.1-hiera-tiny").unwrap(),
            WeightsSpec::Hub {
                repo: "facebook/sam2.1-hiera-tiny".into(),
                revision: None
            }
        );
        assert_eq!(
            WeightsSpec::parse("a/b@v1").unwrap(),
            WeightsSpec::Hub {
                repo: "a/b".into(),
                revision: Some("v1".into())
            }
        );
        assert!(matches!(
            WeightsSpec::parse("no-such-file.pt"),
            Err(Error::BadWeightsSpec(_))
        ));
        assert!(matches!(WeightsSpec::parse("a/b/c"), Err(Error::BadWeightsSpec(_))));
        assert!(matches!(WeightsSpec::parse("a/b@"), Err(Error::BadWeightsSpec(_))));
    }

    #[test]
    fn presets_from_official_file_names() {
        for (_, file, preset) in OFFICIAL_REPOS {
            assert_eq!(preset_from_file_name(Path::new(file)), Some(preset), "{file}");
        }
        assert_eq!(preset_from_file_name(Path::new("weights.pt")), None);
    }
}
