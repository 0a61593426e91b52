//! [`SgpHead`]: PMA + the hierarchical decoder on top of a SAM2 model, with its own
//! weights file (design steps 5–7).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use sgp_sam2::PointInputs;
use sgp_sam2::Sam2Model;

use crate::attention::{PmaConfig, PseudoMaskAttention};
use crate::boxes::box_from_pseudo_mask;
use crate::decoder::{DecoderConfig, HeadDims, HierarchicalDecoder, Stage2Inputs};
use crate::layers::{take_recorded, Recorder, SeededInit};
use crate::{PmaError, Result};

/// The `format` value in a head file's metadata.
pub const FILE_FORMAT: &str = "sgp-head/1";

/// Configuration of the whole head.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SgpHeadConfig {
    /// The masked-attention block.
    pub pma: PmaConfig,
    /// The stage-2 pixel decoder.
    pub decoder: DecoderConfig,
}

/// The PMG tensors the head needs (a plain struct, so that this crate does not depend on
/// `sgp-memory`; `PmgOutput` converts into it).
#[derive(Debug, Clone)]
pub struct PmgParts {
    /// Memory-conditioned features `F'`, `[B, C, E, E]`.
    pub pix_feat_with_mem: Tensor,
    /// Pseudo-mask logits at S/4, `[B, 1, S/4, S/4]`.
    pub pred_masks: Tensor,
    /// Pseudo-mask logits at S, `[B, 1, S, S]`.
    pub pred_masks_high_res: Tensor,
    /// PMG's object score logits `[B, 1]` (the output's score where there is no box).
    pub object_score_logits: Tensor,
    /// The query's projected high-res backbone levels `[B, C/8, S/4, S/4]`,
    /// `[B, C/4, S/8, S/8]`, when the model uses them.
    pub high_res_feats: Option<(Tensor, Tensor)>,
}

/// What [`SgpHead::forward`] returns. Items without a box (an empty pseudo-mask) carry the
/// PMG outputs unchanged.
#[derive(Debug, Clone)]
pub struct SgpOutput {
    /// The box prompt per item, `[x0, y0, x1, y1]` inclusive S-frame pixels.
    pub boxes: Vec<Option<[f32; 4]>>,
    /// `ŷ = upsample(stage 1) + R`, `[B, 1, S, S]` (the pseudo-mask where there is no box).
    pub final_logits: Tensor,
    /// Stage-1 logits `[B, 1, S/4, S/4]` (the S/4 pseudo-mask where there is no box).
    pub stage1_low_res: Tensor,
    /// Stage-1 logits upsampled to `[B, 1, S, S]` (bilinear, as SAM2's `high_res_masks`).
    pub stage1_high_res: Tensor,
    /// Stage-1 object score logits `[B, 1]` (PMG's where there is no box).
    pub object_score_logits: Tensor,
}

/// PMA + hierarchical decoder (parameters `pma.*` and `decoder.*`).
#[derive(Debug, Clone)]
pub struct SgpHead {
    cfg: SgpHeadConfig,
    dims: HeadDims,
    pma: PseudoMaskAttention,
    decoder: HierarchicalDecoder,
    /// Every parameter by its full name, in creation order (they share storage with the
    /// caller's variables, so saving after training writes the trained values).
    params: Vec<(String, Tensor)>,
}

impl SgpHead {
    /// Builds the head from `vb` (at the root; parameters `pma.*`, `decoder.*`). With a
    /// `VarMap`-backed builder, fresh parameters follow PyTorch's default init, γ and R's
    /// last layer start at zero.
    pub fn new(cfg: &SgpHeadConfig, dims: HeadDims, vb: VarBuilder) -> Result<Self> {
        let (vb, made) = Recorder::wrap(vb);
        let pma = PseudoMaskAttention::new(&cfg.pma, dims.hidden_dim, vb.pp("pma"))?;
        let decoder = HierarchicalDecoder::new(&cfg.decoder, dims, vb.pp("decoder"))?;
        let params = take_recorded(&made)?;
        Ok(Self {
            cfg: cfg.clone(),
            dims,
            pma,
            decoder,
            params,
        })
    }

    /// A freshly initialised, trainable head: deterministic for a given `seed`, its
    /// parameters in the returned `VarMap` (hand `varmap.all_vars()` to the optimiser).
    pub fn init(cfg: &SgpHeadConfig, dims: HeadDims, device: &Device, seed: u64) -> Result<(Self, VarMap)> {
        let seeded = VarBuilder::from_backend(Box::new(SeededInit::new(seed)), DType::F32, device.clone());
        let (vb, made) = Recorder::wrap(seeded);
        PseudoMaskAttention::new(&cfg.pma, dims.hidden_dim, vb.pp("pma"))?;
        HierarchicalDecoder::new(&cfg.decoder, dims, vb.pp("decoder"))?;
        let values = take_recorded(&made)?;
        let varmap = varmap_from(values)?;
        let head = Self::new(cfg, dims, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((head, varmap))
    }

    /// A copy of the head whose parameters are plain (detached) tensors, for inference:
    /// nothing is recorded for autograd, and SAM2's heads keep their fast softmax and
    /// layer-norm kernels (which round differently from the differentiable ones, ~1e-7).
    pub fn detached(&self) -> Result<Self> {
        let map: HashMap<String, Tensor> = self.params.iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        let (dtype, device) = match self.params.first() {
            Some((_, t)) => (t.dtype(), t.device().clone()),
            None => (DType::F32, Device::Cpu),
        };
        Self::new(&self.cfg, self.dims, VarBuilder::from_tensors(map, dtype, &device))
    }

    /// The names and shapes of every parameter a head of this configuration has.
    pub fn expected_parameters(cfg: &SgpHeadConfig, dims: HeadDims) -> Result<Vec<(String, Vec<usize>)>> {
        let zeros = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let head = Self::new(cfg, dims, zeros)?;
        Ok(head
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect())
    }

    /// The configuration.
    pub fn config(&self) -> &SgpHeadConfig {
        &self.cfg
    }

    /// The SAM2 dimensions the head was built for.
    pub fn dims(&self) -> HeadDims {
        self.dims
    }

    /// The masked-attention block.
    pub fn pma(&self) -> &PseudoMaskAttention {
        &self.pma
    }

    /// The stage-2 decoder.
    pub fn decoder(&self) -> &HierarchicalDecoder {
        &self.decoder
    }

    /// Every parameter by full name.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Parameter count: (PMA, decoder).
    pub fn num_parameters(&self) -> (usize, usize) {
        let count = |prefix: &str| {
            self.params
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(_, t)| t.elem_count())
                .sum()
        };
        (count("pma."), count("decoder."))
    }

    /// Box → PMA → stage 1 (SAM2's prompt encoder + mask decoder with the box) → stage 2.
    ///
    /// `image` is the normalised model input `[B, 3, S, S]` the PMG features came from.
    /// Differentiable end to end w.r.t. the PMG tensors, the SAM2 heads and the head's own
    /// parameters (the box is discrete). Items whose pseudo-mask is empty skip PMA and the
    /// decoder: their outputs are the pseudo-mask's (the `sgp_init` semantics).
    pub fn forward(&self, model: &Sam2Model, pmg: &PmgParts, image: &Tensor) -> Result<SgpOutput> {
        let _span = tracing::debug_span!("sgp_head").entered();
        let found = HeadDims::of(model);
        if found != self.dims {
            return Err(PmaError::ModelMismatch {
                expected: format!("{:?}", self.dims),
                found: format!("{found:?}"),
            });
        }
        let heads = model.sam_heads();
        let s = heads.cfg.image_size;
        let e = heads.cfg.image_embedding_size();
        let c = self.dims.hidden_dim;
        let b = pmg.pix_feat_with_mem.dim(0).unwrap_or(0);
        let check = |name: &str, t: &Tensor, want: &[usize]| -> Result<()> {
            if t.dims() != want {
                return Err(PmaError::Input(format!("{name} must be {want:?}, got {:?}", t.dims())));
            }
            Ok(())
        };
        check("pix_feat_with_mem", &pmg.pix_feat_with_mem, &[b, c, e, e])?;
        check("pred_masks", &pmg.pred_masks, &[b, 1, s / 4, s / 4])?;
        check("pred_masks_high_res", &pmg.pred_masks_high_res, &[b, 1, s, s])?;
        check("object_score_logits", &pmg.object_score_logits, &[b, 1])?;
        check("image", image, &[b, 3, s, s])?;
        if b == 0 {
            return Err(PmaError::Input("empty batch".into()));
        }
        if pmg.high_res_feats.is_some() != self.dims.use_high_res_features {
            return Err(PmaError::Input(format!(
                "the model {} high-res features but PMG {} them",
                if self.dims.use_high_res_features {
                    "uses"
                } else {
                    "does not use"
                },
                if pmg.high_res_feats.is_some() {
                    "gave"
                } else {
                    "did not give"
                }
            )));
        }

        let boxes = box_from_pseudo_mask(&pmg.pred_masks_high_res)?;
        let with_box: Vec<u32> = (0..b as u32).filter(|&i| boxes[i as usize].is_some()).collect();
        if with_box.is_empty() {
            return Ok(SgpOutput {
                boxes,
                final_logits: pmg.pred_masks_high_res.clone(),
                stage1_low_res: pmg.pred_masks.clone(),
                stage1_high_res: pmg.pred_masks_high_res.clone(),
                object_score_logits: pmg.object_score_logits.clone(),
            });
        }
        let all = with_box.len() == b;
        let dev = pmg.pix_feat_with_mem.device();
        let idx = Tensor::new(with_box.as_slice(), dev)?;
        let pick = |t: &Tensor| -> Result<Tensor> {
            if all {
                Ok(t.clone())
            } else {
                Ok(t.index_select(&idx, 0)?)
            }
        };
        let feats = pick(&pmg.pix_feat_with_mem)?;
        let pm = pick(&pmg.pred_masks)?;
        let img = pick(image)?;
        let hr = match &pmg.high_res_feats {
            Some((a, bb)) => Some((pick(a)?, pick(bb)?)),
            None => None,
        };
        let hr_ref = hr.as_ref().map(|(a, bb)| (a, bb));

        // PMA.
        let pma = self.pma.forward(&feats, &pm)?;

        // Stage 1: the box as two points with labels 2 and 3 (the prompt encoder adds
        // the padding point), single-mask output as in the `sgp_init` reference.
        let n = with_box.len();
        let mut coords = Vec::with_capacity(4 * n);
        for &i in &with_box {
            if let Some([x0, y0, x1, y1]) = boxes[i as usize] {
                coords.extend([x0, y0, x1, y1]);
            }
        }
        let points = PointInputs {
            coords: Tensor::from_vec(coords, (n, 2, 2), dev)?,
            labels: Tensor::from_vec([2f32, 3.0].repeat(n), (n, 2), dev)?,
        };
        let (stage1, inter) =
            heads.forward_with_intermediates(&pma.features, Some(&points), None, hr_ref, heads.multimask(false))?;

        // Stage 2.
        let r = self.decoder.forward(&Stage2Inputs {
            mask_tokens: &inter.mask_tokens_out,
            upscaled_embedding: &inter.upscaled_embedding,
            stage1_logits: &stage1.low_res_masks,
            high_res_features: hr_ref,
            image: &img,
        })?;
        let final_sub = (&stage1.high_res_masks + r.to_dtype(stage1.high_res_masks.dtype())?)?;

        if all {
            return Ok(SgpOutput {
                boxes,
                final_logits: final_sub,
                stage1_low_res: stage1.low_res_masks,
                stage1_high_res: stage1.high_res_masks,
                object_score_logits: stage1.object_score_logits,
            });
        }
        // Reassemble the batch in order: refined items from the sub-batch, the others
        // from PMG.
        let merge = |sub: &Tensor, pmg_t: &Tensor| -> Result<Tensor> {
            let mut parts = Vec::with_capacity(b);
            let mut j = 0;
            for (i, bx) in boxes.iter().enumerate() {
                if bx.is_some() {
                    parts.push(sub.narrow(0, j, 1)?);
                    j += 1;
                } else {
                    parts.push(pmg_t.narrow(0, i, 1)?.to_dtype(sub.dtype())?);
                }
            }
            Ok(Tensor::cat(&parts, 0)?)
        };
        Ok(SgpOutput {
            final_logits: merge(&final_sub, &pmg.pred_masks_high_res)?,
            stage1_low_res: merge(&stage1.low_res_masks, &pmg.pred_masks)?,
            stage1_high_res: merge(&stage1.high_res_masks, &pmg.pred_masks_high_res)?,
            object_score_logits: merge(&stage1.object_score_logits, &pmg.object_score_logits)?,
            boxes,
        })
    }

    /// Writes the head's parameters (f32) and its configuration to a safetensors file,
    /// atomically (a temp file beside it, then a rename). SAM2's weights are not included.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let _span = tracing::info_span!("sgp_head_save", path = %path.display()).entered();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FILE_FORMAT.to_string());
        meta.insert("config".to_string(), to_json(&self.cfg, path)?);
        meta.insert("dims".to_string(), to_json(&self.dims, path)?);
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(self.params.len());
        for (n, t) in &self.params {
            tensors.push((
                n.clone(),
                t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?,
            ));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))?;
        write_atomically(path, &bytes)
    }

    /// Loads a head saved by [`SgpHead::save`] for a model with `dims`; its configuration
    /// comes from the file. The parameters are returned as trainable variables.
    pub fn load(path: impl AsRef<Path>, dims: HeadDims, device: &Device) -> Result<(Self, VarMap)> {
        let path = path.as_ref();
        let bytes = read(path)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let bad = |reason: String| PmaError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        match meta.get("format") {
            Some(f) if f == FILE_FORMAT => {}
            Some(f) => return Err(bad(format!("format `{f}`, expected `{FILE_FORMAT}`"))),
            None => return Err(bad("no `format` in the metadata".into())),
        }
        let cfg: SgpHeadConfig = from_json(meta.get("config"), "config").map_err(bad)?;
        let file_dims: HeadDims = from_json(meta.get("dims"), "dims").map_err(bad)?;
        if file_dims != dims {
            return Err(PmaError::ModelMismatch {
                expected: format!("{file_dims:?} (the file's)"),
                found: format!("{dims:?}"),
            });
        }
        Self::from_bytes(&bytes, path, &cfg, dims, device)
    }

    /// Loads parameters from a safetensors file for an explicit configuration (the
    /// file's metadata is not consulted). Missing, mis-shaped, non-float and unexpected
    /// tensors are reported together in one [`PmaError::WeightsMismatch`].
    pub fn load_with_config(
        path: impl AsRef<Path>,
        cfg: &SgpHeadConfig,
        dims: HeadDims,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        let path = path.as_ref();
        let bytes = read(path)?;
        Self::from_bytes(&bytes, path, cfg, dims, device)
    }

    fn from_bytes(
        bytes: &[u8],
        path: &Path,
        cfg: &SgpHeadConfig,
        dims: HeadDims,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        let _span = tracing::info_span!("sgp_head_load", path = %path.display()).entered();
        let file = safetensors::SafeTensors::deserialize(bytes)?;
        let expected: BTreeMap<String, Vec<usize>> = Self::expected_parameters(cfg, dims)?.into_iter().collect();
        let mut problems = Vec::new();
        let mut values = Vec::with_capacity(expected.len());
        for (name, shape) in &expected {
            match file.tensor(name) {
                Err(_) => problems.push(format!("missing `{name}` {shape:?}")),
                Ok(view) if view.shape() != shape.as_slice() => {
                    problems.push(format!("`{name}` has shape {:?}, expected {shape:?}", view.shape()))
                }
                Ok(view)
                    if !matches!(
                        view.dtype(),
                        safetensors::Dtype::F32
                            | safetensors::Dtype::F64
                            | safetensors::Dtype::F16
                            | safetensors::Dtype::BF16
                    ) =>
                {
                    problems.push(format!("`{name}` has dtype {:?}, expected a float", view.dtype()))
                }
                Ok(view) => {
                    let t = candle_core::safetensors::Load::load(&view, device)?.to_dtype(DType::F32)?;
                    values.push((name.clone(), t));
                }
            }
        }
        let mut unexpected: Vec<&str> = file
            .names()
            .into_iter()
            .filter(|n| !expected.contains_key(*n))
            .collect();
        unexpected.sort_unstable();
        problems.extend(unexpected.into_iter().map(|n| format!("unexpected `{n}`")));
        if !problems.is_empty() {
            return Err(PmaError::WeightsMismatch {
                path: path.to_path_buf(),
                problems,
            });
        }
        let varmap = varmap_from(values)?;
        let head = Self::new(cfg, dims, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((head, varmap))
    }
}

fn varmap_from(values: Vec<(String, Tensor)>) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| PmaError::Config("variable map poisoned".into()))?;
        for (name, t) in values {
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| PmaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn to_json<T: Serialize>(v: &T, path: &Path) -> Result<String> {
    serde_json::to_string(v).map_err(|e| PmaError::BadFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn from_json<T: for<'de> Deserialize<'de>>(v: Option<&String>, key: &str) -> std::result::Result<T, String> {
    let s = v.ok_or_else(|| format!("no `{key}` in the metadata"))?;
    serde_json::from_str(s).map_err(|e| format!("bad `{key}` metadata: {e}"))
}

/// [`sgp_sam2::write_atomic`], with the error in this crate's enum.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    sgp_sam2::write_atomic(path, bytes).map_err(|source| PmaError::Io {
        path: path.to_path_buf(),
        source,
    })
}
