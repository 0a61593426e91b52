//! `ImageEncoder`: Hiera trunk + FPN neck, dropping the `scalp` lowest-resolution levels.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::adapt::{AdaptableLinear, AdaptableModel};
use crate::config::ImageEncoderConfig;
use crate::hiera::Hiera;
use crate::neck::FpnNeck;

/// The official `backbone_out` dict.
#[derive(Debug, Clone)]
pub struct BackboneOutput {
    /// The lowest-resolution kept level (`backbone_fpn.last()`).
    pub vision_features: Tensor,
    /// Sine position encodings of each level, highest resolution first.
    pub vision_pos_enc: Vec<Tensor>,
    /// FPN features, highest resolution first.
    pub backbone_fpn: Vec<Tensor>,
}

/// `sam2.modeling.backbones.image_encoder.ImageEncoder`: the Hiera trunk and the FPN neck.
#[derive(Debug, Clone)]
pub struct ImageEncoder {
    /// The Hiera backbone (checkpoint `image_encoder.trunk`); its linears are LoRA targets.
    pub trunk: Hiera,
    /// The FPN neck (checkpoint `image_encoder.neck`).
    pub neck: FpnNeck,
    /// Number of lowest-resolution levels dropped from the output.
    pub scalp: usize,
}

impl ImageEncoder {
    /// `vb` at the checkpoint prefix `image_encoder`.
    pub fn new(cfg: &ImageEncoderConfig, vb: VarBuilder) -> crate::Result<Self> {
        let trunk = Hiera::new(&cfg.trunk, vb.pp("trunk"))?;
        let neck = FpnNeck::new(&cfg.neck, vb.pp("neck"))?;
        if trunk.channel_list() != neck.backbone_channel_list.as_slice() {
            return Err(crate::Error::Config(format!(
                "trunk channels {:?} do not match neck.backbone_channel_list {:?}",
                trunk.channel_list(),
                neck.backbone_channel_list
            )));
        }
        if cfg.scalp >= neck.backbone_channel_list.len() {
            return Err(crate::Error::Config("image_encoder.scalp removes every level".into()));
        }
        Ok(Self {
            trunk,
            neck,
            scalp: cfg.scalp,
        })
    }

    /// `x`: `[B, 3, S, S]` normalised images.
    pub fn forward(&self, x: &Tensor) -> Result<BackboneOutput> {
        let _span = tracing::debug_span!("image_encoder").entered();
        let (mut feats, mut pos) = self.neck.forward(&self.trunk.forward(x)?)?;
        let keep = feats.len() - self.scalp;
        feats.truncate(keep);
        pos.truncate(keep);
        let vision_features = feats[keep - 1].clone();
        Ok(BackboneOutput {
            vision_features,
            vision_pos_enc: pos,
            backbone_fpn: feats,
        })
    }
}

impl AdaptableModel for ImageEncoder {
    /// Full checkpoint paths (`image_encoder.trunk.blocks.3.attn.qkv`).
    fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        self.trunk
            .adaptable_linears_mut()
            .into_iter()
            .map(|(p, l)| (format!("image_encoder.trunk.{p}"), l))
            .collect()
    }
}
