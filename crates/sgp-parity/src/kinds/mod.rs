//! The kind registry: which function computes the outputs of each `case.json` `"kind"`.
//!
//! Each kind module has a `register(&mut Registry)` that adds its kinds. To add kinds,
//! write a module here and add one line to [`Registry::builtin`]:
//! - `sam2.rs`: the SAM2 kinds (`image_encoder`, `sam_heads`, `memory_encoder`,
//!   `memory_attention`, `track`);
//! - `support.rs` (MEM, issue 12): `support_pseudo_mask`, `support_track`;
//! - `sgp_init.rs` (PMA, issue 13): `sgp_init`.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::{Case, Result};

mod sam2;
mod sgp_init;
mod support;

/// Computes every output a kind defines, named as in `out.<name>` (without the prefix).
pub type KindFn = fn(&Case, &Device) -> Result<Vec<(String, Tensor)>>;

/// One registered kind.
#[derive(Debug, Clone, Copy)]
pub struct KindSpec {
    /// The `case.json` `"kind"`.
    pub name: &'static str,
    /// Computes the outputs.
    pub compute: KindFn,
    /// Outputs whose batch/frame dimension (for the per-item bound) is not dim 0.
    pub item_dims: &'static [(&'static str, usize)],
}

impl KindSpec {
    /// The batch/frame dimension of output `name` for the per-item bound.
    pub fn item_dim(&self, name: &str) -> usize {
        self.item_dims
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| *d)
            .unwrap_or(0)
    }
}

/// Every kind the runner knows, by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, KindSpec>,
    duplicates: Vec<&'static str>,
}

impl Registry {
    /// The registry with every built-in kind.
    pub fn builtin() -> Self {
        let mut r = Self::default();
        sam2::register(&mut r);
        support::register(&mut r);
        sgp_init::register(&mut r);
        r
    }

    /// Adds a kind. Two kinds of one name are a programming error that the crate's test
    /// `kind_names_are_unique` catches through [`Self::duplicates`]; the later one wins.
    pub fn add(&mut self, spec: KindSpec) {
        if self.kinds.insert(spec.name, spec).is_some() {
            self.duplicates.push(spec.name);
        }
    }

    /// Names that were registered more than once.
    pub fn duplicates(&self) -> &[&'static str] {
        &self.duplicates
    }

    /// The kind of that name.
    pub fn get(&self, name: &str) -> Option<&KindSpec> {
        self.kinds.get(name)
    }

    /// The names of all kinds, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
}

/// Builds an output list from `(name, tensor)` pairs.
pub(crate) fn named<I, S>(items: I) -> Vec<(String, Tensor)>
where
    I: IntoIterator<Item = (S, Tensor)>,
    S: Into<String>,
{
    items.into_iter().map(|(n, t)| (n.into(), t)).collect()
}

/// The outputs of the tracking kinds (`track`, `support_track`): the frame outputs
/// stacked along dim 0 (`pred_masks`, `obj_ptr`, `object_score_logits`,
/// `maskmem_features`).
pub(crate) fn stack_track_outputs(frames: &[sgp_sam2::TrackStepOutput]) -> Result<Vec<(String, Tensor)>> {
    let cat = |f: &dyn Fn(&sgp_sam2::TrackStepOutput) -> Option<Tensor>| -> Result<Tensor> {
        let v: Vec<Tensor> = frames
            .iter()
            .map(f)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| crate::Error::Output("a frame has no memory features".into()))?;
        Ok(Tensor::cat(&v, 0)?)
    };
    Ok(named([
        ("pred_masks", cat(&|f| Some(f.frame.pred_masks.clone()))?),
        ("obj_ptr", cat(&|f| Some(f.frame.obj_ptr.clone()))?),
        (
            "object_score_logits",
            cat(&|f| Some(f.frame.object_score_logits.clone()))?,
        ),
        ("maskmem_features", cat(&|f| f.frame.maskmem_features.clone())?),
    ]))
}
