//! Downloads from the Hugging Face hub into the standard cache.
//!
//! The cache is the one Python's `huggingface_hub` uses (`HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), so files fetched by either tool serve
//! both. hf-hub 1.0 does not read `HF_HUB_OFFLINE`; we map it to cache-only lookups here.
//! A failed transfer never leaves a partial file behind: hf-hub writes `*.incomplete`
//! files, which we remove when a download fails.

use std::path::{Path, PathBuf};

use hf_hub::{HFClient, HFClientBuilder, HFClientSync, HFError};

use crate::{Error, Result};

/// Where and how to reach the hub.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Hub base URL; `None` means `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Cache folder; `None` means the standard one.
    pub cache_dir: Option<PathBuf>,
    /// Only use cached files; never touch the network.
    pub offline: bool,
    /// Attempts per request (hf-hub's default when `None`).
    pub max_attempts: Option<usize>,
}

impl HubOptions {
    /// Options from the environment: `HF_HUB_OFFLINE=1` (or true/yes/on) turns on offline
    /// mode; endpoint and cache come from hf-hub's own variables.
    pub fn from_env() -> Self {
        Self {
            offline: env_flag("HF_HUB_OFFLINE"),
            ..Self::default()
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// A hub client bound to one set of options.
pub struct Hub {
    /// The async client holds the resolved endpoint and cache folder.
    info: HFClient,
    client: HFClientSync,
    options: HubOptions,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.info.endpoint())
            .field("cache_dir", &self.info.cache_dir())
            .field("offline", &self.options.offline)
            .finish()
    }
}

impl Hub {
    /// A client for `options` (resolves the endpoint and the cache folder).
    pub fn new(options: HubOptions) -> Result<Self> {
        let mut builder = HFClientBuilder::new();
        if let Some(e) = &options.endpoint {
            builder = builder.endpoint(e.clone());
        }
        if let Some(c) = &options.cache_dir {
            builder = builder.cache_dir(c.clone());
        }
        if let Some(n) = options.max_attempts {
            builder = builder.retry_max_attempts(n);
        }
        let info = builder
            .build()
            .map_err(|e| Error::Hub(format!("cannot create the hub client: {e}")))?;
        let client = HFClientSync::from_inner(info.clone())
            .map_err(|e| Error::Hub(format!("cannot start the hub client: {e}")))?;
        Ok(Self { info, client, options })
    }

    /// The hub base URL in use.
    pub fn endpoint(&self) -> &str {
        self.info.endpoint()
    }

    /// The cache folder in use.
    pub fn cache_dir(&self) -> &Path {
        self.info.cache_dir()
    }

    /// Downloads (or finds in the cache) `file` of `repo` at `revision` and returns its
    /// cached path. `Ok(None)` means the repo has no such file.
    pub fn fetch(&self, repo: &str, revision: Option<&str>, file: &str) -> Result<Option<PathBuf>> {
        let _span = tracing::info_span!("hub_fetch", repo, file).entered();
        let (owner, name) = split_repo(repo)?;
        let handle = self.client.model(owner, name);
        let result = handle
            .download_file()
            .filename(file.to_string())
            .local_files_only(self.options.offline)
            .maybe_revision(revision.map(str::to_string))
            .send();
        match result {
            Ok(path) => Ok(Some(path)),
            Err(err) => {
                self.remove_incomplete(repo);
                self.map_error(err, repo, file)
            }
        }
    }

    fn map_error(&self, err: HFError, repo: &str, file: &str) -> Result<Option<PathBuf>> {
        match err {
            HFError::EntryNotFound { .. } => Ok(None),
            HFError::LocalEntryNotFound { .. } => Err(Error::NotCached {
                repo: repo.into(),
                file: file.into(),
            }),
            HFError::Request { .. } | HFError::Io(_) => Err(Error::Unreachable {
                repo: repo.into(),
                file: file.into(),
                endpoint: self.endpoint().to_string(),
                detail: err.to_string(),
            }),
            HFError::RepoNotFound { .. } => Err(Error::Hub(format!(
                "repository `{repo}` not found on {} (private repos need HF_TOKEN)",
                self.endpoint()
            ))),
            other => Err(Error::Hub(format!("`{repo}`/`{file}`: {other}"))),
        }
    }

    /// The folder hf-hub keeps a model repo in.
    pub fn repo_cache_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir().join(format!("models--{}", repo.replace('/', "--")))
    }

    /// Removes partial downloads of `repo` left by a failed transfer.
    fn remove_incomplete(&self, repo: &str) {
        let blobs = self.repo_cache_dir(repo).join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "incomplete") {
                if let Err(err) = std::fs::remove_file(&p) {
                    tracing::warn!("cannot remove partial download {}: {err}", p.display());
                }
            }
        }
    }

    /// Drops a cached file that turned out unreadable (its snapshot link and blob), so the
    /// next attempt downloads it again instead of failing on the same bytes.
    pub fn evict(&self, cached: &Path) {
        let blob = std::fs::canonicalize(cached).ok();
        let _ = std::fs::remove_file(cached);
        if let Some(b) = blob {
            if b.starts_with(self.cache_dir().canonicalize().unwrap_or_default()) {
                let _ = std::fs::remove_file(b);
            }
        }
    }
}

/// `owner/name` → (`owner`, `name`).
pub fn split_repo(repo: &str) -> Result<(&str, &str)> {
    match repo.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => Ok((o, n)),
        _ => Err(Error::BadWeightsSpec(repo.to_string())),
    }
}
