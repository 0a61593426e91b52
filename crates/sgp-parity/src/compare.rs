//! The pass rule (`docs/parity-format.md`): exact shape, all finite,
//! relative L2 error within rtol overall and for each item of the batch/frame dimension.

use candle_core::{DType, Tensor};

use crate::Result;

/// The comparison of one output with its reference.
#[derive(Debug, Clone)]
pub struct TensorReport {
    /// The output's name (without `out.`).
    pub name: String,
    /// Overall relative L2 error (NaN when not computable).
    pub rel_err: f64,
    /// The worst relative error over the items of the batch/frame dimension.
    pub worst_item_err: f64,
    /// The largest absolute elementwise difference (NaN when not computable); reported
    /// only, the pass rule does not use it.
    pub max_abs_err: f64,
    /// The largest absolute value of the reference, to read `max_abs_err` against.
    pub ref_max_abs: f64,
    /// Whether the output meets the pass rule.
    pub passed: bool,
    /// Why it failed, when not (only) the error bound.
    pub note: Option<String>,
}

impl TensorReport {
    /// A failed report that has no error value (missing output, wrong shape, NaN).
    pub fn failed(name: &str, note: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            rel_err: f64::NAN,
            worst_item_err: f64::NAN,
            max_abs_err: f64::NAN,
            ref_max_abs: f64::NAN,
            passed: false,
            note: Some(note.into()),
        }
    }
}

fn rel_l2(ours: &[f64], reference: &[f64]) -> f64 {
    let mut num = 0f64;
    let mut den = 0f64;
    for (a, b) in ours.iter().zip(reference) {
        num += (a - b) * (a - b);
        den += b * b;
    }
    num.sqrt() / den.sqrt().max(1e-12)
}

/// Applies the pass rule: exact shape, all finite, relative L2 ≤ rtol overall and for
/// each index of `item_dim` (so that one large item cannot hide an error in another).
pub fn compare(name: &str, ours: &Tensor, reference: &Tensor, rtol: f64, item_dim: usize) -> Result<TensorReport> {
    if ours.dims() != reference.dims() {
        return Ok(TensorReport::failed(
            name,
            format!("shape {:?}, expected {:?}", ours.dims(), reference.dims()),
        ));
    }
    let a: Vec<f64> = ours.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = reference.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    if a.iter().any(|v| !v.is_finite()) {
        return Ok(TensorReport::failed(name, "output has NaN/Inf"));
    }
    let rel_err = rel_l2(&a, &b);
    let max_abs_err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
    let ref_max_abs = b.iter().map(|y| y.abs()).fold(0f64, f64::max);
    let dims = ours.dims();
    let mut worst = rel_err;
    if item_dim < dims.len() && !a.is_empty() {
        let outer: usize = dims[..item_dim].iter().product();
        let n = dims[item_dim];
        let inner: usize = dims[item_dim + 1..].iter().product();
        worst = 0.0;
        for i in 0..n {
            let mut xa = Vec::with_capacity(outer * inner);
            let mut xb = Vec::with_capacity(outer * inner);
            for o in 0..outer {
                let start = (o * n + i) * inner;
                xa.extend_from_slice(&a[start..start + inner]);
                xb.extend_from_slice(&b[start..start + inner]);
            }
            worst = worst.max(rel_l2(&xa, &xb));
        }
    }
    let passed = rel_err <= rtol && worst <= rtol;
    Ok(TensorReport {
        name: name.to_string(),
        rel_err,
        worst_item_err: worst,
        max_abs_err,
        ref_max_abs,
        passed,
        note: None,
    })
}
