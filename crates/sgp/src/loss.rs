//! The SGP training loss (design step 8):
//! `λ1·Dice(ŷ, y) + λ2·BCE(ŷ, y) + λ3·KL(sg(σ(ŷ)) ‖ σ(y0)) + λ4·BCE(s, [y ≠ ∅])`.
//!
//! * `ŷ` are the final full-resolution logits, `y` the 0/1 target, `y0` the pseudo-mask
//!   logits of PMG (same size as `ŷ`), `s` an object-score logit.
//! * **Dice** is the soft Dice of `σ(ŷ)` with SAM2's +1 smoothing,
//!   `1 − (2·Σσ(ŷ)y + 1) / (Σσ(ŷ) + Σy + 1)`, per sample. With an empty target it is
//!   `Σσ(ŷ) / (Σσ(ŷ) + 1)`, which only an empty prediction brings to 0: a query whose
//!   target class is absent trains toward an empty mask.
//! * **BCE** is the mean per-pixel binary cross-entropy on logits (the stable
//!   `max(x,0) − x·y + log(1 + e^−|x|)`).
//! * **KL** is the mean per-pixel Bernoulli KL from the final prediction (stop-gradient,
//!   so it is a fixed target) to the pseudo-mask: `p·log(p/q) + (1−p)·log((1−p)/(1−q))`
//!   with `p = sg(σ(ŷ))`, `q = σ(y0)`. Only `y0` (PMG and what feeds it) receives its
//!   gradient. It is 0 where the two agree.
//! * **Object score**: SAM2 replaces a mask by −1024 when its object-score logit is ≤ 0
//!   (`NO_OBJ_SCORE`), which cuts every gradient to that mask. As in SAM2's own training
//!   (`loss_class` of `MultiStepMultiMasksAndIous`), the object-score head is trained on
//!   object presence: BCE of each score logit against "the target class is present in
//!   the query". Once the head says "present", the masks receive gradients again. The
//!   mask terms are meant to be given the *pre-masking* logits when the model exposes
//!   them (see [`LossInputs`]); when only the masked logits exist, they are clamped to
//!   ±[`LOGIT_CLAMP`] first, so a blocked mask reports a bounded loss (its gradient is 0
//!   either way).
//!
//! Defaults ([`LossWeights::default`]): λ1 = 1 (Dice), λ2 = 1 (BCE), λ3 = 0.5 (KL: it
//! only shapes the pseudo-mask, so it weighs less than the terms on the output), λ4 = 1
//! (object score, SAM2's `loss_class` weight). Every term is returned separately, each
//! averaged over the batch, and per class in [`LossBreakdown::per_class`].

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};

use crate::train_error::{Result, TrainError};

/// Logits are clamped to this range before the losses (SAM2 clamps mask logits to ±32
/// where it feeds them back); it keeps a −1024 "no object" mask's loss finite and small.
pub const LOGIT_CLAMP: f64 = 32.0;

/// The λ of each term.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossWeights {
    /// λ1, soft Dice on the final prediction.
    pub dice: f64,
    /// λ2, pixel-wise BCE on the final prediction.
    pub bce: f64,
    /// λ3, Bernoulli KL from the (stop-gradient) final prediction to the pseudo-mask.
    pub kl: f64,
    /// λ4, BCE of the object-score logits against object presence.
    pub object: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            dice: 1.0,
            bce: 1.0,
            kl: 0.5,
            object: 1.0,
        }
    }
}

/// What the loss sees of one forward pass; every tensor has batch size B (one entry per
/// query and class).
#[derive(Debug, Clone)]
pub struct LossInputs<'a> {
    /// `[B, 1, H, W]` final logits ŷ (pre-masking when the model exposes them).
    pub logits: &'a Tensor,
    /// `[B, 1, H, W]` targets in {0, 1}.
    pub target: &'a Tensor,
    /// `[B, 1, H, W]` pseudo-mask logits y0; `None` (no PMG) drops the KL term.
    pub pseudo_logits: Option<&'a Tensor>,
    /// Object-score logits, each `[B, 1]` (PMG's and the final decoder's); each gets the
    /// presence BCE, averaged over the list.
    pub object_scores: Vec<&'a Tensor>,
    /// The class of each batch entry (for the per-class breakdown).
    pub classes: &'a [u32],
}

/// The loss and each of its terms.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The weighted sum, a scalar tensor to call `backward` on.
    pub total: Tensor,
    /// The unweighted terms and the total as numbers.
    pub breakdown: LossBreakdown,
}

/// Unweighted loss terms (batch means) and the weighted total.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossBreakdown {
    /// Weighted total.
    pub total: f64,
    /// Soft Dice loss.
    pub dice: f64,
    /// Pixel-wise BCE.
    pub bce: f64,
    /// Bernoulli KL (0 without PMG).
    pub kl: f64,
    /// Object-presence BCE (0 without object scores).
    pub object: f64,
    /// Per class: (Dice, BCE) means over that class's entries.
    pub per_class: BTreeMap<u32, (f64, f64)>,
}

/// `log(1 + e^x)`, stable for any x.
pub fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    // max(x, 0) + log(1 + e^−|x|)
    let pos = x.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    pos + tail
}

/// Per-sample soft Dice loss `[B]` of logits `[B, ...]` against 0/1 targets.
pub fn dice_per_sample(logits: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let p = candle_nn::ops::sigmoid(&logits.flatten_from(1)?)?;
    let y = target.flatten_from(1)?;
    let inter = (&p * &y)?.sum(D::Minus1)?;
    let denom = (p.sum(D::Minus1)? + y.sum(D::Minus1)?)?;
    let ratio = ((inter * 2.0)? + 1.0)?.div(&(denom + 1.0)?)?;
    ratio.neg()? + 1.0
}

/// Per-sample mean pixel BCE `[B]` of logits against 0/1 targets.
pub fn bce_per_sample(logits: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let x = logits.flatten_from(1)?;
    let y = target.flatten_from(1)?;
    // max(x,0) − x·y + log(1 + e^−|x|) = softplus(x) − x·y
    (softplus(&x)? - (&x * &y)?)?.mean(D::Minus1)
}

/// Per-sample mean Bernoulli KL `[B]` from `sg(σ(final))` to `σ(pseudo)`.
pub fn kl_per_sample(final_logits: &Tensor, pseudo_logits: &Tensor) -> candle_core::Result<Tensor> {
    let p = candle_nn::ops::sigmoid(&final_logits.flatten_from(1)?.detach())?;
    let q = pseudo_logits.flatten_from(1)?;
    // log q = −softplus(−y0), log(1−q) = −softplus(y0).
    let log_q = softplus(&q.neg()?)?.neg()?;
    let log_1mq = softplus(&q)?.neg()?;
    // p·log p and (1−p)·log(1−p) are constants; with the 0·log 0 = 0 convention.
    let eps = 1e-12;
    let one_m_p = (p.neg()? + 1.0)?;
    let p_log_p = (&p * p.clamp(eps, 1.0)?.log()?)?;
    let q_log_q = (&one_m_p * one_m_p.clamp(eps, 1.0)?.log()?)?;
    let cross = ((&p * log_q)? + (&one_m_p * log_1mq)?)?;
    ((p_log_p + q_log_q)? - cross)?.mean(D::Minus1)
}

/// Per-sample BCE `[B]` of object-score logits `[B, 1]` against presence `[B]` (0/1).
pub fn object_bce_per_sample(score_logits: &Tensor, present: &Tensor) -> candle_core::Result<Tensor> {
    let s = score_logits.flatten_all()?;
    softplus(&s)? - (&s * present)?
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The weighted loss with each term; see the module docs.
pub fn sgp_loss(inputs: &LossInputs<'_>, w: &LossWeights) -> Result<LossOutput> {
    let logits = inputs.logits;
    let dims = logits.dims().to_vec();
    if dims.len() != 4 || dims[1] != 1 {
        return Err(TrainError::Shape(format!(
            "loss: logits must be [B,1,H,W], got {dims:?}"
        )));
    }
    if inputs.target.dims() != dims.as_slice() {
        return Err(TrainError::Shape(format!(
            "loss: target {:?} does not match logits {dims:?}",
            inputs.target.dims()
        )));
    }
    let b = dims[0];
    if inputs.classes.len() != b {
        return Err(TrainError::Shape(format!(
            "loss: {} classes for a batch of {b}",
            inputs.classes.len()
        )));
    }
    let logits = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)?;
    let target = inputs.target.to_dtype(logits.dtype())?;
    let dice = dice_per_sample(&logits, &target)?;
    let bce = bce_per_sample(&logits, &target)?;
    let dice_m = dice.mean_all()?;
    let bce_m = bce.mean_all()?;
    let mut total = ((&dice_m * w.dice)? + (&bce_m * w.bce)?)?;

    let mut kl_v = 0.0;
    if let Some(pseudo) = inputs.pseudo_logits {
        if pseudo.dims() != dims.as_slice() {
            return Err(TrainError::Shape(format!(
                "loss: pseudo-mask logits {:?} do not match logits {dims:?}",
                pseudo.dims()
            )));
        }
        let pseudo = pseudo.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)?;
        let kl = kl_per_sample(&logits, &pseudo)?.mean_all()?;
        kl_v = scalar(&kl)?;
        total = (total + (kl * w.kl)?)?;
    }

    let mut obj_v = 0.0;
    if !inputs.object_scores.is_empty() {
        let present = target
            .flatten_from(1)?
            .max(D::Minus1)?
            .gt(0.5)?
            .to_dtype(logits.dtype())?;
        let mut terms = Vec::with_capacity(inputs.object_scores.len());
        for s in &inputs.object_scores {
            if s.elem_count() != b {
                return Err(TrainError::Shape(format!(
                    "loss: object scores {:?} for a batch of {b}",
                    s.dims()
                )));
            }
            terms.push(object_bce_per_sample(&s.to_dtype(logits.dtype())?, &present)?.mean_all()?);
        }
        let n = terms.len() as f64;
        let obj = (Tensor::stack(&terms, 0)?.sum_all()? / n)?;
        obj_v = scalar(&obj)?;
        total = (total + (obj * w.object)?)?;
    }

    let dice_v: Vec<f64> = dice.to_dtype(DType::F64)?.to_vec1()?;
    let bce_v: Vec<f64> = bce.to_dtype(DType::F64)?.to_vec1()?;
    let mut sums: BTreeMap<u32, (f64, f64, usize)> = BTreeMap::new();
    for (i, &c) in inputs.classes.iter().enumerate() {
        let e = sums.entry(c).or_default();
        e.0 += dice_v[i];
        e.1 += bce_v[i];
        e.2 += 1;
    }
    let per_class = sums
        .into_iter()
        .map(|(c, (d, x, n))| (c, (d / n as f64, x / n as f64)))
        .collect();
    let breakdown = LossBreakdown {
        total: scalar(&total)?,
        dice: scalar(&dice_m)?,
        bce: scalar(&bce_m)?,
        kl: kl_v,
        object: obj_v,
        per_class,
    };
    Ok(LossOutput { total, breakdown })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn terms_match_hand_computed_values() {
        // One 2×2 sample: logits [0, 2, -1, 3], target [0, 1, 0, 1], pseudo [1, 1, -2, 0].
        let x = [0.0, 2.0, -1.0, 3.0];
        let y = [0.0, 1.0, 0.0, 1.0];
        let z = [1.0, 1.0, -2.0, 0.0];
        let logits = t(&x, &[1, 1, 2, 2]);
        let target = t(&y, &[1, 1, 2, 2]);
        let pseudo = t(&z, &[1, 1, 2, 2]);
        let score = t(&[-0.5], &[1, 1]);
        let out = sgp_loss(
            &LossInputs {
                logits: &logits,
                target: &target,
                pseudo_logits: Some(&pseudo),
                object_scores: vec![&score],
                classes: &[3],
            },
            &LossWeights::default(),
        )
        .unwrap();
        let p: Vec<f64> = x.iter().map(|&v| sig(v)).collect();
        let inter: f64 = p.iter().zip(&y).map(|(a, b)| a * b).sum();
        let dice = 1.0 - (2.0 * inter + 1.0) / (p.iter().sum::<f64>() + 2.0 + 1.0);
        let bce: f64 = p
            .iter()
            .zip(&y)
            .map(|(&pi, &yi)| -(yi * pi.ln() + (1.0 - yi) * (1.0 - pi).ln()))
            .sum::<f64>()
            / 4.0;
        let kl: f64 = p
            .iter()
            .zip(&z)
            .map(|(&pi, &zi)| {
                let q = sig(zi);
                pi * (pi / q).ln() + (1.0 - pi) * ((1.0 - pi) / (1.0 - q)).ln()
            })
            .sum::<f64>()
            / 4.0;
        let obj = -(sig(-0.5)).ln(); // present (target not empty), logit -0.5
        let b = &out.breakdown;
        for (name, got, want) in [
            ("dice", b.dice, dice),
            ("bce", b.bce, bce),
            ("kl", b.kl, kl),
            ("object", b.object, obj),
            ("total", b.total, dice + bce + 0.5 * kl + obj),
        ] {
            assert!((got - want).abs() < 1e-12, "{name}: {got} vs {want}");
        }
        assert_eq!(b.per_class.len(), 1);
        assert!((b.per_class[&3].0 - dice).abs() < 1e-12);
    }

    #[test]
    fn absent_target_trains_toward_empty_and_blocked_masks_stay_bounded() {
        // Empty target: Dice = Σp / (Σp + 1); the object term wants a negative score.
        let logits = t(&[0.0, 0.0, 0.0, 0.0], &[1, 1, 2, 2]);
        let empty = t(&[0.0; 4], &[1, 1, 2, 2]);
        let score = t(&[0.0], &[1, 1]);
        let v = Var::from_tensor(&logits).unwrap();
        let sv = Var::from_tensor(&score).unwrap();
        let out = sgp_loss(
            &LossInputs {
                logits: v.as_tensor(),
                target: &empty,
                pseudo_logits: None,
                object_scores: vec![sv.as_tensor()],
                classes: &[1],
            },
            &LossWeights::default(),
        )
        .unwrap();
        assert!((out.breakdown.dice - 2.0 / 3.0).abs() < 1e-12);
        assert!((out.breakdown.object - 2f64.ln()).abs() < 1e-12);
        let g = out.total.backward().unwrap();
        let gl: Vec<f64> = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(gl.iter().all(|&x| x > 0.0), "every logit must be pushed down: {gl:?}");
        let gs = g
            .get(sv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        assert!(gs > 0.0, "the object score must be pushed down");
        // A −1024 "no object" mask against a present target: finite, bounded loss.
        let blocked = t(&[-1024.0; 4], &[1, 1, 2, 2]);
        let full = t(&[1.0; 4], &[1, 1, 2, 2]);
        let out = sgp_loss(
            &LossInputs {
                logits: &blocked,
                target: &full,
                pseudo_logits: Some(&blocked),
                object_scores: vec![],
                classes: &[1],
            },
            &LossWeights::default(),
        )
        .unwrap();
        assert!(out.breakdown.bce <= LOGIT_CLAMP + 1e-9 && out.breakdown.bce > 31.0);
        assert!(out.breakdown.kl.abs() < 1e-9, "KL of two identical masks is 0");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // Batch of 2 (one present, one absent), 3×3, all four terms on.
        let xs: Vec<f64> = (0..18).map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.4).collect();
        let zs: Vec<f64> = (0..18).map(|i| ((i * 53 % 13) as f64 - 6.0) * 0.3).collect();
        let mut ys = vec![0.0; 18];
        for i in [1, 2, 4, 5, 7] {
            ys[i] = 1.0;
        }
        let target = t(&ys, &[2, 1, 3, 3]);
        let x = Var::from_tensor(&t(&xs, &[2, 1, 3, 3])).unwrap();
        let z = Var::from_tensor(&t(&zs, &[2, 1, 3, 3])).unwrap();
        let s = Var::from_tensor(&t(&[0.3, 0.7], &[2, 1])).unwrap();
        let w = LossWeights {
            dice: 1.0,
            bce: 0.7,
            kl: 0.9,
            object: 1.3,
        };
        let loss = |x: &Tensor, z: &Tensor, s: &Tensor| {
            sgp_loss(
                &LossInputs {
                    logits: x,
                    target: &target,
                    pseudo_logits: Some(z),
                    object_scores: vec![s],
                    classes: &[1, 2],
                },
                &w,
            )
            .unwrap()
        };
        let out = loss(x.as_tensor(), z.as_tensor(), s.as_tensor());
        let grads = out.total.backward().unwrap();
        let eps = 1e-6;
        for (which, var) in [("logits", &x), ("pseudo", &z), ("score", &s)] {
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for i in 0..base.len() {
                let at = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    let p = t(&v, var.dims());
                    let (xx, zz, ss) = match which {
                        "logits" => (p, z.as_tensor().clone(), s.as_tensor().clone()),
                        "pseudo" => (x.as_tensor().clone(), p, s.as_tensor().clone()),
                        _ => (x.as_tensor().clone(), z.as_tensor().clone(), p),
                    };
                    // For the KL term the final prediction is a stop-gradient target: the
                    // finite difference on the logits must hold it fixed too.
                    let mut o = loss(&xx, &zz, &ss).breakdown;
                    if which == "logits" {
                        let fixed = sgp_loss(
                            &LossInputs {
                                logits: x.as_tensor(),
                                target: &target,
                                pseudo_logits: Some(&zz),
                                object_scores: vec![],
                                classes: &[1, 2],
                            },
                            &LossWeights {
                                dice: 0.0,
                                bce: 0.0,
                                kl: 1.0,
                                object: 0.0,
                            },
                        )
                        .unwrap()
                        .breakdown;
                        o.total = o.total - w.kl * o.kl + w.kl * fixed.kl;
                    }
                    o.total
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                let err = (g[i] - fd).abs() / g[i].abs().max(fd.abs()).max(1e-6);
                assert!(err < 1e-5, "{which}[{i}]: autograd {} vs finite difference {fd}", g[i]);
            }
        }
    }
}
