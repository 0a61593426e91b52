//! Numerical comparison helpers shared by the workspace's tests and checks, so that each
//! test states its bound instead of re-deriving the comparison.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// `max |a − b|` over all elements, in f64 (any dtype, any device). Shapes must match
/// exactly; NaN anywhere gives NaN, so that a bound check on it fails.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::Shape(format!("{:?} vs {:?}", a.dims(), b.dims())));
    }
    if a.elem_count() == 0 {
        return Ok(0.0);
    }
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let d: Vec<f64> = (a - b)?.abs()?.to_vec1()?;
    Ok(d.iter()
        .fold(0.0, |m, &x| if x.is_nan() || m.is_nan() { f64::NAN } else { m.max(x) }))
}

/// Panics with `what` and the difference unless `max |a − b| ≤ tol` (for tests).
#[track_caller]
pub fn assert_max_abs_diff(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    match max_abs_diff(a, b) {
        Ok(d) if d <= tol => {}
        Ok(d) => panic!("{what}: max abs diff {d:e} exceeds {tol:e}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn max_abs_diff_catches_shape_nan_and_value() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1f32, 2.0, 3.0], &dev).unwrap();
        let b = Tensor::new(&[1f32, 2.5, 3.0], &dev).unwrap();
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.5);
        assert!(max_abs_diff(&a, &a.reshape((3, 1)).unwrap()).is_err());
        let n = Tensor::new(&[f32::NAN, 2.0, 3.0], &dev).unwrap();
        assert!(max_abs_diff(&n, &a).unwrap().is_nan());
        assert_max_abs_diff("same", &a, &a, 0.0);
        assert!(
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_max_abs_diff("off", &a, &b, 0.1))).is_err()
        );
    }
}
