//! `--weights` for every command: a hub repo id (`facebook/sam2.1-hiera-tiny`) or a local
//! path (official `.pt`, original-name `.safetensors`, or a transformers folder).

use anyhow::Context;

/// Loads a model for a user command (real-use settings on, `HF_HUB_OFFLINE` honoured).
pub fn load_model(
    weights: &str,
    config: Option<&str>,
    image_size: Option<usize>,
) -> anyhow::Result<sgp::Pretrained> {
    let options = sgp::LoadOptions {
        config: config.map(str::to_string),
        image_size,
        ..sgp::LoadOptions::default()
    };
    let loaded = sgp::load_pretrained(weights, &options)
        .with_context(|| format!("cannot load the model from `{weights}`"))?;
    tracing::info!(
        format = ?loaded.format,
        path = %loaded.weights_path.display(),
        "model loaded"
    );
    Ok(loaded)
}
