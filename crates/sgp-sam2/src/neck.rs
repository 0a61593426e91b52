//! `FpnNeck`: projects each trunk stage to `d_model` channels and adds top-down features
//! on the levels listed in `fpn_top_down_levels` (the official configs: only the two
//! lowest resolutions; the high-resolution levels keep their lateral features alone).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{FpnInterp as Interp, FpnNeckConfig, FuseType};
use crate::position_encoding::PositionEmbeddingSine;

#[derive(Debug, Clone)]
pub struct FpnNeck {
    pub position_encoding: PositionEmbeddingSine,
    /// `convs.{j}.conv`; `convs[0]` projects the LOWEST-resolution stage.
    pub convs: Vec<candle_nn::Conv2d>,
    pub d_model: usize,
    pub backbone_channel_list: Vec<usize>,
    top_down_levels: Vec<usize>,
    interp: Interp,
    average: bool,
}

impl FpnNeck {
    pub fn new(cfg: &FpnNeckConfig, vb: VarBuilder) -> crate::Result<Self> {
        let position_encoding = PositionEmbeddingSine::new(&cfg.position_encoding)?;
        let conv_cfg = candle_nn::Conv2dConfig {
            padding: cfg.padding,
            stride: cfg.stride,
            ..Default::default()
        };
        let convs = cfg
            .backbone_channel_list
            .iter()
            .enumerate()
            .map(|(j, &c)| {
                candle_nn::conv2d(
                    c,
                    cfg.d_model,
                    cfg.kernel_size,
                    conv_cfg,
                    vb.pp("convs").pp(j).pp("conv"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let interp = cfg.fpn_interp_model;
        let average = cfg.fuse_type == FuseType::Avg;
        let top_down_levels = cfg
            .fpn_top_down_levels
            .clone()
            .unwrap_or_else(|| (0..cfg.backbone_channel_list.len()).collect());
        Ok(Self {
            position_encoding,
            convs,
            d_model: cfg.d_model,
            backbone_channel_list: cfg.backbone_channel_list.clone(),
            top_down_levels,
            interp,
            average,
        })
    }

    /// `xs`: trunk outputs, highest resolution first. Returns (features, position
    /// encodings), both highest resolution first.
    pub fn forward(&self, xs: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        if xs.len() != self.convs.len() {
            candle_core::bail!("FpnNeck: {} trunk levels for {} convs", xs.len(), self.convs.len());
        }
        let n = self.convs.len() - 1;
        let mut out: Vec<Option<Tensor>> = vec![None; n + 1];
        let mut pos: Vec<Option<Tensor>> = vec![None; n + 1];
        let mut prev: Option<Tensor> = None;
        for i in (0..=n).rev() {
            let lateral = crate::ops::conv2d(&self.convs[n - i], &xs[i])?;
            let feat = match (&prev, self.top_down_levels.contains(&i)) {
                (Some(p), true) => {
                    let (_, _, h, w) = p.dims4()?;
                    let top_down = match self.interp {
                        Interp::Nearest => p.upsample_nearest2d(2 * h, 2 * w)?,
                        Interp::Bilinear => p.upsample_bilinear2d(2 * h, 2 * w, false)?,
                    };
                    let s = (lateral + top_down)?;
                    if self.average {
                        (s / 2.0)?
                    } else {
                        s
                    }
                }
                _ => lateral,
            };
            pos[i] = Some(self.position_encoding.forward(&feat)?);
            out[i] = Some(feat.clone());
            prev = Some(feat);
        }
        let out = out.into_iter().flatten().collect();
        let pos = pos.into_iter().flatten().collect();
        Ok((out, pos))
    }
}
