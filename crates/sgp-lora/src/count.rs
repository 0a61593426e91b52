//! Trainable-parameter counts from the Hiera configs alone, without building a model.
//!
//! The counts go through the same target resolution as [`crate::Lora::attach`], over
//! the list of Hiera linear layers with their shapes, so they agree with what attaching
//! to a real model creates (a test checks this on a built model).

use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::target::resolve;

/// The shape-determining part of a Hiera trunk config (`sam2.modeling.backbones.hieradet.Hiera`).
#[derive(Debug, Clone, PartialEq)]
pub struct HieraDims {
    /// Width of the first stage.
    pub embed_dim: usize,
    /// Blocks per stage.
    pub stages: Vec<usize>,
    /// Width factor at each stage change (2.0 in every SAM2 config).
    pub dim_mul: f64,
    /// MLP hidden width over the block width (4.0 in every SAM2 config).
    pub mlp_ratio: f64,
}

impl HieraDims {
    /// `sam2.1_hiera_t.yaml`.
    pub fn tiny() -> Self {
        Self {
            embed_dim: 96,
            stages: vec![1, 2, 7, 2],
            dim_mul: 2.0,
            mlp_ratio: 4.0,
        }
    }

    /// `sam2.1_hiera_s.yaml`.
    pub fn small() -> Self {
        Self {
            embed_dim: 96,
            stages: vec![1, 2, 11, 2],
            dim_mul: 2.0,
            mlp_ratio: 4.0,
        }
    }

    /// `sam2.1_hiera_b+.yaml` (Hiera's default stages).
    pub fn base_plus() -> Self {
        Self {
            embed_dim: 112,
            stages: vec![2, 3, 16, 3],
            dim_mul: 2.0,
            mlp_ratio: 4.0,
        }
    }

    /// `sam2.1_hiera_l.yaml`.
    pub fn large() -> Self {
        Self {
            embed_dim: 144,
            stages: vec![2, 6, 36, 4],
            dim_mul: 2.0,
            mlp_ratio: 4.0,
        }
    }

    /// The four SAM2.1 sizes with their names.
    pub fn presets() -> [(&'static str, Self); 4] {
        [
            ("hiera_t", Self::tiny()),
            ("hiera_s", Self::small()),
            ("hiera_b+", Self::base_plus()),
            ("hiera_l", Self::large()),
        ]
    }

    /// `(dim, dim_out)` of every block. As in Hiera, the first block of each later stage
    /// changes the width (`qkv: dim -> 3·dim_out`) and the rest keep it.
    pub fn block_dims(&self) -> Vec<(usize, usize)> {
        let mut dims = Vec::new();
        let mut dim = self.embed_dim;
        for (stage, &blocks) in self.stages.iter().enumerate() {
            for b in 0..blocks {
                let dim_out = if stage > 0 && b == 0 {
                    (dim as f64 * self.dim_mul) as usize
                } else {
                    dim
                };
                dims.push((dim, dim_out));
                dim = dim_out;
            }
        }
        dims
    }

    /// Every linear layer of the trunk as `(path, in_dim, out_dim)`, under `prefix`
    /// (e.g. `image_encoder.trunk`).
    pub fn linears(&self, prefix: &str) -> Vec<(String, usize, usize)> {
        let mut out = Vec::new();
        for (i, (dim, dim_out)) in self.block_dims().into_iter().enumerate() {
            let p = format!("{prefix}.blocks.{i}");
            let hidden = (dim_out as f64 * self.mlp_ratio) as usize;
            out.push((format!("{p}.attn.qkv"), dim, 3 * dim_out));
            out.push((format!("{p}.attn.proj"), dim_out, dim_out));
            out.push((format!("{p}.mlp.layers.0"), dim_out, hidden));
            out.push((format!("{p}.mlp.layers.1"), hidden, dim_out));
            if dim != dim_out {
                out.push((format!("{p}.proj"), dim, dim_out));
            }
        }
        out
    }
}

impl From<&sgp_sam2::HieraConfig> for HieraDims {
    /// Hiera's MLP ratio is fixed at 4 (`MultiScaleBlock`'s default, used by every config).
    fn from(cfg: &sgp_sam2::HieraConfig) -> Self {
        Self {
            embed_dim: cfg.embed_dim,
            stages: cfg.stages.clone(),
            dim_mul: cfg.dim_mul,
            mlp_ratio: 4.0,
        }
    }
}

/// Trainable parameters LoRA with `config` adds to a Hiera trunk of shape `dims`
/// (at `image_encoder.trunk`, as in `Sam2Model`).
pub fn count_trainable(dims: &HieraDims, config: &LoraConfig) -> Result<usize> {
    config.validate()?;
    if dims.stages.is_empty() || dims.embed_dim == 0 {
        return Err(LoraError::InvalidConfig(
            "Hiera dims need an embed_dim and at least one stage".into(),
        ));
    }
    let linears = dims.linears("image_encoder.trunk");
    let resolved = resolve(linears.iter().map(|(p, i, o)| (p.as_str(), *i, *o)), &config.targets)?;
    Ok(resolved.iter().map(|l| l.num_params(config.rank)).sum())
}

/// The rank-4/8/16 × hiera t/s/b+/l table of trainable parameters for `targets`,
/// formatted as Markdown.
pub fn trainable_table(config: &LoraConfig) -> Result<String> {
    let ranks = [4usize, 8, 16];
    let mut s = String::from("| model | r = 4 | r = 8 | r = 16 |\n|---|---:|---:|---:|\n");
    for (name, dims) in HieraDims::presets() {
        s.push_str(&format!("| {name} |"));
        for r in ranks {
            let c = LoraConfig {
                rank: r,
                ..config.clone()
            };
            s.push_str(&format!(" {} |", thousands(count_trainable(&dims, &c)?)));
        }
        s.push('\n');
    }
    Ok(s)
}

/// `1234567` -> `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Target;

    #[test]
    fn hiera_s_rank16_qv_is_377856() {
        // Block dims of hiera_s: 96→96 | 96→192, 192 | 192→384, 10×384 | 384→768, 768.
        // Each block adds r·(dim + dim_out) for q and the same for v.
        let n = count_trainable(&HieraDims::small(), &LoraConfig::new(16, 16.0)).unwrap();
        assert_eq!(n, 377_856);
    }

    /// The table in the crate docs is the one this module computes.
    #[test]
    fn crate_doc_table_is_current() {
        let table = trainable_table(&LoraConfig::default()).unwrap();
        let docs = include_str!("lib.rs");
        for line in table.lines() {
            assert!(
                docs.contains(&format!("//! {line}\n")),
                "crate docs lack the row `{line}`"
            );
        }
        assert_eq!(thousands(1_718_784), "1,718,784");
        assert_eq!(thousands(999), "999");
    }

    /// The presets equal the trunks of sgp-sam2's official configs.
    #[test]
    fn presets_match_the_official_configs() {
        for (name, dims) in [
            ("t", HieraDims::tiny()),
            ("s", HieraDims::small()),
            ("b+", HieraDims::base_plus()),
            ("l", HieraDims::large()),
        ] {
            let cfg = sgp_sam2::Sam2Config::preset(&format!("sam2.1_hiera_{name}")).unwrap();
            assert_eq!(HieraDims::from(&cfg.image_encoder.trunk), dims, "hiera_{name}");
        }
    }

    #[test]
    fn block_dims_follow_hiera() {
        let d = HieraDims::small().block_dims();
        assert_eq!(d.len(), 16);
        assert_eq!(d[0], (96, 96));
        assert_eq!(d[1], (96, 192));
        assert_eq!(d[3], (192, 384));
        assert_eq!(d[14], (384, 768));
        assert_eq!(d[15], (768, 768));
    }

    #[test]
    fn counts_scale_with_rank_and_targets() {
        let qv = |r| count_trainable(&HieraDims::tiny(), &LoraConfig::new(r, 1.0)).unwrap();
        assert_eq!(qv(8), 2 * qv(4));
        // Adapting all of qkv as one layer: A [r, dim] + B [3·dim_out, r] per block.
        let whole = LoraConfig::new(4, 1.0).with_targets(vec![Target::hiera_qkv()]);
        let expected: usize = HieraDims::tiny()
            .block_dims()
            .iter()
            .map(|(d, o)| 4 * (d + 3 * o))
            .sum();
        assert_eq!(count_trainable(&HieraDims::tiny(), &whole).unwrap(), expected);
    }
}
