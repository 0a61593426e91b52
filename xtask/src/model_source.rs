//! `--weights` / `--config` / `--image-size` / `--device` for every command that loads a
//! model: a hub repo id (`facebook/sam2.1-hiera-tiny`) or a local path (official `.pt`,
//! original-name `.safetensors`, or a transformers folder), on the chosen device.

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
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `--device` for every command that computes with a model.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N. Default: CUDA when this build has it (`--features cuda`) and a
    /// GPU is present, else the CPU.
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub device: Option<String>,
}

impl DeviceArgs {
    /// The device to run on (`sgp::select_device`: one rule for every command).
    pub fn resolve(&self) -> anyhow::Result<candle_core::Device> {
        let device = sgp::select_device(self.device.as_deref())?;
        tracing::info!(device = %sgp::device_name(&device), "device");
        Ok(device)
    }
}

impl ModelArgs {
    /// Loads the model for a user command (real-use settings on).
    pub fn load(&self) -> anyhow::Result<sgp::Pretrained> {
        let options = sgp::LoadOptions {
            config: self.config.clone(),
            image_size: self.image_size,
            device: self.device.resolve()?,
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
