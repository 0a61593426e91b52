//! AdamW with linear warmup and cosine decay, gradient clipping by global norm and
//! gradient accumulation, over named candle [`Var`]s.
//!
//! candle-nn has an `AdamW`, but its moments are private, so a resumed run could not
//! restore them; this one computes the same update (PyTorch's `AdamW`: decoupled weight
//! decay `θ ← θ·(1 − lr·wd)`, bias-corrected moments, `ε` outside the square root) and
//! exposes its state ([`AdamW::state`], [`AdamW::load_state`]) for checkpoints.
//! The update runs on the parameters' own device and dtype, so it also runs on CUDA.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::train_error::{Result, TrainError};

/// AdamW hyper-parameters (PyTorch's defaults except the weight decay).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate (reached at the end of warmup).
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε, added to `√v̂`.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Linear warmup from 0 to the peak, then cosine decay to `min_ratio · peak` at
/// `total_steps`; constant after that.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Optimiser steps of linear warmup.
    pub warmup_steps: usize,
    /// Step at which the cosine reaches its floor.
    pub total_steps: usize,
    /// Floor of the cosine as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    /// Learning-rate factor for optimiser step `step` (0-based: the first update uses
    /// `factor(0)`).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps);
        if span == 0 {
            return 1.0;
        }
        let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments {
    /// First moment.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
}

/// AdamW over named variables, with accumulation and clipping.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    schedule: Schedule,
    /// Clip the global gradient norm to this (`None`: no clipping).
    max_grad_norm: Option<f64>,
    /// Micro-batches summed into one update.
    accumulation: usize,
    vars: Vec<(String, Var)>,
    moments: Vec<Moments>,
    /// Summed gradients of the micro-batches since the last update.
    pending: Vec<Option<Tensor>>,
    pending_count: usize,
    /// Completed updates.
    step: usize,
}

/// What one [`AdamW::accumulate`] call did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Whether an update was applied (the last micro-batch of an accumulation group).
    pub updated: bool,
    /// Global gradient norm before clipping (of the averaged gradient; only on update).
    pub grad_norm: Option<f64>,
    /// Learning rate the update used (only on update).
    pub lr: Option<f64>,
}

impl AdamW {
    /// An optimiser over `vars`; names must be unique (they key the saved state).
    pub fn new(
        vars: Vec<(String, Var)>,
        config: AdamWConfig,
        schedule: Schedule,
        max_grad_norm: Option<f64>,
        accumulation: usize,
    ) -> Result<Self> {
        if accumulation == 0 {
            return Err(TrainError::Config("gradient accumulation must be at least 1".into()));
        }
        if !(config.lr.is_finite() && config.lr > 0.0) {
            return Err(TrainError::Config(format!(
                "learning rate {} must be positive",
                config.lr
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (n, _) in &vars {
            if !seen.insert(n.as_str()) {
                return Err(TrainError::Config(format!("parameter `{n}` is listed twice")));
            }
        }
        let moments = vars
            .iter()
            .map(|(_, v)| {
                Ok(Moments {
                    m: v.as_tensor().zeros_like()?,
                    v: v.as_tensor().zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pending = vec![None; vars.len()];
        Ok(Self {
            config,
            schedule,
            max_grad_norm,
            accumulation,
            vars,
            moments,
            pending,
            pending_count: 0,
            step: 0,
        })
    }

    /// Completed updates.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The learning rate of the next update.
    pub fn current_lr(&self) -> f64 {
        self.config.lr * self.schedule.factor(self.step)
    }

    /// The optimised variables.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Adds one micro-batch's gradients; every `accumulation`-th call averages them,
    /// clips by global norm and applies an AdamW update. A variable the loss does not
    /// reach counts as a zero gradient.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<StepInfo> {
        for (slot, (_, var)) in self.pending.iter_mut().zip(&self.vars) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        self.pending_count += 1;
        if self.pending_count < self.accumulation {
            return Ok(StepInfo {
                updated: false,
                grad_norm: None,
                lr: None,
            });
        }
        let scale = 1.0 / self.pending_count as f64;
        let mut grads: Vec<Option<Tensor>> = Vec::with_capacity(self.vars.len());
        for slot in self.pending.iter_mut() {
            grads.push(match slot.take() {
                Some(g) if scale != 1.0 => Some((g * scale)?),
                other => other,
            });
        }
        self.pending_count = 0;
        let norm = global_norm(grads.iter().flatten())?;
        let clip = match self.max_grad_norm {
            Some(max) if norm > max && norm.is_finite() => max / (norm + 1e-6),
            _ => 1.0,
        };
        if !norm.is_finite() {
            return Err(TrainError::Config(format!(
                "the gradient norm is {norm} at step {}; lower the learning rate",
                self.step
            )));
        }
        let lr = self.current_lr();
        let c = self.config;
        let t = (self.step + 1) as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for ((g, (_, var)), mom) in grads.iter().zip(&self.vars).zip(self.moments.iter_mut()) {
            let theta = var.as_tensor();
            if let Some(g) = g {
                // f32 on the CPU: one pass, the parameter updated in place.
                let step = sgp_kernels::optim::AdamWStep {
                    beta1: c.beta1,
                    beta2: c.beta2,
                    grad_scale: clip,
                    lr,
                    weight_decay: c.weight_decay,
                    bias_correction1: bc1,
                    bias_correction2: bc2,
                    eps: c.eps,
                };
                let fused = sgp_kernels::optim::adamw_step(theta, &mom.m, &mom.v, g, &step)
                    .map_err(|e| candle_core::Error::Msg(format!("optimiser update: {e}")))?;
                if let Some((m, v)) = fused {
                    mom.m = m;
                    mom.v = v;
                    continue;
                }
            }
            let g = match g {
                Some(g) if clip != 1.0 => (g * clip)?,
                Some(g) => g.clone(),
                None => theta.zeros_like()?,
            };
            let m = ((&mom.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&mom.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let decayed = (theta * (1.0 - lr * c.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
            mom.m = m;
            mom.v = v;
        }
        self.step += 1;
        Ok(StepInfo {
            updated: true,
            grad_norm: Some(norm),
            lr: Some(lr),
        })
    }

    /// The state to checkpoint: `{name}.m`, `{name}.v` per variable, and the step.
    /// Gradients of an unfinished accumulation group are not part of it (checkpoints are
    /// taken after an update).
    pub fn state(&self) -> (BTreeMap<String, Tensor>, usize) {
        let mut out = BTreeMap::new();
        for ((name, _), mom) in self.vars.iter().zip(&self.moments) {
            out.insert(format!("{name}.m"), mom.m.clone());
            out.insert(format!("{name}.v"), mom.v.clone());
        }
        (out, self.step)
    }

    /// Restores [`AdamW::state`]; every variable's moments must be there with its shape.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: usize) -> Result<()> {
        let mut loaded = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| TrainError::Config(format!("optimiser state lacks `{key}`")))?;
                if t.dims() != var.dims() {
                    return Err(TrainError::Config(format!(
                        "optimiser state `{key}` is {:?}, the parameter is {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                Ok(t.to_dtype(var.dtype())?.to_device(var.device())?)
            };
            loaded.push(Moments {
                m: get("m")?,
                v: get("v")?,
            });
        }
        self.moments = loaded;
        self.step = step;
        self.pending = vec![None; self.vars.len()];
        self.pending_count = 0;
        Ok(())
    }
}

/// `√(Σ‖g‖²)` over the tensors.
pub fn global_norm<'a>(grads: impl Iterator<Item = &'a Tensor>) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads {
        let fused =
            sgp_kernels::optim::sum_squares(g).map_err(|e| candle_core::Error::Msg(format!("gradient norm: {e}")))?;
        sum += match fused {
            Some(s) => s,
            None => g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?,
        };
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f64]) -> Var {
        Var::from_tensor(&Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()).unwrap()
    }

    fn values(v: &Var) -> Vec<f64> {
        v.as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule {
            warmup_steps: 4,
            total_steps: 14,
            min_ratio: 0.1,
        };
        assert_eq!(s.factor(0), 0.25);
        assert_eq!(s.factor(3), 1.0);
        assert!((s.factor(4) - 1.0).abs() < 1e-12);
        assert!(
            (s.factor(9) - 0.55).abs() < 1e-12,
            "half-way is the mean of peak and floor"
        );
        assert!((s.factor(14) - 0.1).abs() < 1e-12);
        assert!((s.factor(100) - 0.1).abs() < 1e-12);
        let mut prev = f64::MAX;
        for k in 4..15 {
            assert!(s.factor(k) <= prev);
            prev = s.factor(k);
        }
    }

    /// The PyTorch AdamW update, written out by hand for one scalar.
    #[test]
    fn update_matches_the_adamw_formula() {
        let x = var(&[1.0, -2.0]);
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let flat = Schedule {
            warmup_steps: 0,
            total_steps: 0,
            min_ratio: 1.0,
        };
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], cfg, flat, None, 1).unwrap();
        // loss = Σ x³ → g = 3x²
        let (mut th, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for t in 1..=3 {
            let loss = x.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
            opt.accumulate(&loss.backward().unwrap()).unwrap();
            for i in 0..2 {
                let g = 3.0 * th[i] * th[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                th[i] = th[i] * (1.0 - 0.1 * 0.5) - 0.1 * mh / (vh.sqrt() + 1e-8);
            }
            let got = values(&x);
            for i in 0..2 {
                assert!((got[i] - th[i]).abs() < 1e-12, "step {t}: {got:?} vs {th:?}");
            }
        }
        assert_eq!(opt.step(), 3);
    }

    /// f32 parameters on the CPU take the fused update: the same steps as the f64 ones
    /// (which take the tensor ops), clipping included, to f32 precision.
    #[test]
    fn fused_f32_update_follows_the_tensor_op_update() {
        let cfg = AdamWConfig {
            lr: 0.05,
            weight_decay: 0.1,
            ..Default::default()
        };
        let flat = Schedule {
            warmup_steps: 0,
            total_steps: 0,
            min_ratio: 1.0,
        };
        let start = [0.5f64, -1.5, 2.0, 0.25];
        let x64 = var(&start);
        let x32 = Var::from_tensor(&x64.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let mut o64 = AdamW::new(vec![("x".into(), x64.clone())], cfg, flat, Some(3.0), 1).unwrap();
        let mut o32 = AdamW::new(vec![("x".into(), x32.clone())], cfg, flat, Some(3.0), 1).unwrap();
        for step in 0..5 {
            let l64 = x64.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
            let l32 = x32.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
            let n64 = o64.accumulate(&l64.backward().unwrap()).unwrap().grad_norm.unwrap();
            let n32 = o32.accumulate(&l32.backward().unwrap()).unwrap().grad_norm.unwrap();
            assert!((n64 - n32).abs() <= 1e-4 * n64, "step {step}: norms {n64} / {n32}");
            let (a, b) = (values(&x64), x32.as_tensor().to_vec1::<f32>().unwrap());
            for (a, b) in a.iter().zip(&b) {
                assert!((a - f64::from(*b)).abs() < 1e-5, "step {step}: {a} vs {b}");
            }
        }
        // The moments it keeps are the tensor-op ones too.
        let (s64, _) = o64.state();
        let (s32, _) = o32.state();
        for key in ["x.m", "x.v"] {
            let a: Vec<f64> = s64[key].to_vec1().unwrap();
            let b: Vec<f32> = s32[key].to_vec1().unwrap();
            for (a, b) in a.iter().zip(&b) {
                assert!(
                    (a - f64::from(*b)).abs() <= 1e-5 * a.abs().max(1.0),
                    "{key}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn accumulation_equals_the_averaged_gradient_and_clipping_bounds_the_norm() {
        let flat = Schedule {
            warmup_steps: 0,
            total_steps: 0,
            min_ratio: 1.0,
        };
        let cfg = AdamWConfig {
            lr: 0.01,
            weight_decay: 0.0,
            ..Default::default()
        };
        // Two micro-batches with loss a·Σx and b·Σx == one batch with (a+b)/2·Σx.
        let x1 = var(&[0.5, 0.25]);
        let x2 = var(&[0.5, 0.25]);
        let mut acc = AdamW::new(vec![("x".into(), x1.clone())], cfg, flat, None, 2).unwrap();
        let mut one = AdamW::new(vec![("x".into(), x2.clone())], cfg, flat, None, 1).unwrap();
        for a in [1.0, 3.0] {
            let l = (x1.as_tensor().sqr().unwrap().sum_all().unwrap() * a).unwrap();
            let info = acc.accumulate(&l.backward().unwrap()).unwrap();
            assert_eq!(info.updated, a == 3.0);
        }
        let l = (x2.as_tensor().sqr().unwrap().sum_all().unwrap() * 2.0).unwrap();
        one.accumulate(&l.backward().unwrap()).unwrap();
        assert_eq!(values(&x1), values(&x2));

        // Clipping: the gradient [30, 40] (norm 50) clipped to 1 gives the same Adam
        // step direction but first moments scaled by 1/50.
        let y = var(&[0.0, 0.0]);
        let mut clipped = AdamW::new(vec![("y".into(), y.clone())], cfg, flat, Some(1.0), 1).unwrap();
        let w = Tensor::new(&[30.0f64, 40.0], &Device::Cpu).unwrap();
        let l = (y.as_tensor() * &w).unwrap().sum_all().unwrap();
        let info = clipped.accumulate(&l.backward().unwrap()).unwrap();
        assert!((info.grad_norm.unwrap() - 50.0).abs() < 1e-9);
        let (state, step) = clipped.state();
        assert_eq!(step, 1);
        let m: Vec<f64> = state["y.m"].to_vec1().unwrap();
        assert!((m[0] - 0.1 * 30.0 / 50.0).abs() < 1e-6 && (m[1] - 0.1 * 40.0 / 50.0).abs() < 1e-6);
    }

    #[test]
    fn state_round_trips_and_is_checked() {
        let flat = Schedule {
            warmup_steps: 2,
            total_steps: 10,
            min_ratio: 0.0,
        };
        let x = var(&[1.0, 2.0]);
        let mut a = AdamW::new(vec![("x".into(), x.clone())], AdamWConfig::default(), flat, None, 1).unwrap();
        let l = x.as_tensor().sqr().unwrap().sum_all().unwrap();
        a.accumulate(&l.backward().unwrap()).unwrap();
        let (state, step) = a.state();
        let y = var(&[1.0, 2.0]);
        let mut b = AdamW::new(vec![("x".into(), y)], AdamWConfig::default(), flat, None, 1).unwrap();
        b.load_state(&state, step).unwrap();
        assert_eq!(b.step(), 1);
        assert_eq!(b.current_lr(), a.current_lr());
        let mut bad = state.clone();
        bad.remove("x.v");
        assert!(b.load_state(&bad, 1).is_err());
        assert!(AdamW::new(vec![], AdamWConfig::default(), flat, None, 0).is_err());
    }
}
