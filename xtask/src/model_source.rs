//! `--weights` / `--config` / `--image-size` for every command that loads a model: a hub
//! repo id (`facebook/sam2.1-hiera-tiny`) or a local path (official `.pt`, original-name
//! `.safetensors`, or a transformers folder).

use anyhow::Context;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Weights: a hub repo id (facebook/sam2.1-hiera-tiny) or a local path (official .pt,
    /// original-name .safetensors, or a transformers folder). HF_HUB_OFFLINE=1 uses the
    /// cache only.
    #[arg(long)]
    pub weights: String,
    /// Preset name (e.g. sam2.1_hiera_t) or a yaml/JSON config file. Default: implied by
    /// the repo or file name (e.g. sam2.1_hiera_tiny.pt), or the transformers config.json.
    #[arg(long)]
    pub config: Option<String>,
    /// Model input size S (multiple of 32); default: the config's (1024 for the presets).
    #[arg(long)]
    pub image_size: Option<usize>,
}

impl ModelArgs {
    /// Loads the model for a user command (real-use settings on).
    pub fn load(&self) -> anyhow::Result<sgp::Pretrained> {
        let options = sgp::LoadOptions {
            config: self.config.clone(),
            image_size: self.image_size,
            ..sgp::LoadOptions::default()
        };
        let loaded = sgp::load_pretrained(&self.weights, &options)
            .with_context(|| format!("cannot load the model from `{}`", self.weights))?;
        tracing::info!(
            format = ?loaded.format,
            path = %loaded.weights_path.display(),
            "model loaded"
        );
        Ok(loaded)
    }
}
