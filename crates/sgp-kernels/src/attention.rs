//! Plain softmax attention for inference on the CPU, reading `q`, `k`, `v` where they lie.
//!
//! Hiera's attention takes q, k and v from one `qkv` linear output `[B, L, 3, H, D]` and
//! hands its result to a projection that wants `[B, L, H·D]`. Going through candle's
//! batched matmul needs three `[B, H, L, D]` copies in, one copy out and a score tensor
//! per op; for the 16- and 64-token windows of Hiera's early stages those copies and the
//! per-op overheads cost several times the arithmetic. Here each (batch, head, query
//! block) task runs two `gemm` calls on strided views, softmaxes its score block in
//! place, and writes straight into the `[B, Lq, H, D]` output. Same function as
//! `softmax(q kᵀ/√d) v` up to float rounding; no backward (training keeps candle's ops).

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::math::exp_f32;
use crate::{Error, Result, SendPtr};

/// Score elements per task: a query block holds about this many (in L2 with its rows).
const SCORE_BLOCK_ELEMS: usize = 1 << 15;

/// A 4-d f32 view with unit stride on its last dim (`[B, L, H, D]` here, `[B, H, W, C]`
/// for pooling): its buffer, offset, the element strides of the first three dims, dims.
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub strides: [usize; 3],
    pub dims: [usize; 4],
}

pub(crate) fn view<'a>(name: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<View<'a>> {
    let CpuStorage::F32(data) = storage else {
        return Err(Error::Unsupported(format!("attention: {name} must be f32")));
    };
    let dims = layout.dims();
    let st = layout.stride();
    if dims.len() != 4 {
        return Err(Error::Shape(format!(
            "attention: {name} must be [B, L, H, D], got {dims:?}"
        )));
    }
    if st[3] != 1 && dims[3] > 1 {
        return Err(Error::Shape(format!(
            "attention: {name} needs unit stride on D, got {st:?}"
        )));
    }
    let v = View {
        data,
        offset: layout.start_offset(),
        strides: [st[0], st[1], st[2]],
        dims: [dims[0], dims[1], dims[2], dims[3]],
    };
    // The furthest element read must lie inside the buffer (the gemm calls below read raw).
    let last = v.offset + (0..3).map(|i| (v.dims[i].max(1) - 1) * v.strides[i]).sum::<usize>() + v.dims[3];
    if v.dims.contains(&0) || last > data.len() {
        return Err(Error::Shape(format!(
            "attention: {name} view {dims:?}/{st:?} is empty or out of its buffer"
        )));
    }
    Ok(v)
}

/// `softmax(q kᵀ / √D) v` for f32 CPU views `q` `[B, Lq, H, D]`, `k`, `v` `[B, Lk, H, D]`
/// (any strides with unit stride on D, e.g. `narrow`s of a `qkv` output). Returns
/// `[B, Lq, H, D]`, contiguous.
pub fn attention_blhd(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 || k.dtype() != DType::F32 || v.dtype() != DType::F32 {
        return Err(Error::Unsupported("attention: CPU f32 tensors only".into()));
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        return Err(Error::Unsupported("attention: CPU tensors only".into()));
    };
    let (qv, kv, vv) = (view("q", qs, ql)?, view("k", ks, kl)?, view("v", vs, vl)?);
    let [b, lq, h, d] = qv.dims;
    let lk = kv.dims[1];
    if kv.dims != [b, lk, h, d] || vv.dims != kv.dims {
        return Err(Error::Shape(format!(
            "attention: q {:?}, k {:?}, v {:?} do not match",
            qv.dims, kv.dims, vv.dims
        )));
    }
    let out = attention_views(&qv, &kv, &vv);
    Tensor::from_vec(out, (b, lq, h, d), q.device()).map_err(Error::from)
}

fn attention_views(q: &View, k: &View, v: &View) -> Vec<f32> {
    let [b, lq, h, d] = q.dims;
    let lk = k.dims[1];
    let nq_block = (SCORE_BLOCK_ELEMS / lk).clamp(32, 256).min(lq);
    let q_blocks = lq.div_ceil(nq_block);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out: Vec<f32> = vec![0f32; b * lq * h * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let tasks = b * h * q_blocks;
    (0..tasks).into_par_iter().with_min_len(4).for_each_init(
        || vec![0f32; nq_block * lk],
        |s, task| {
            let (bh, qb) = (task / q_blocks, task % q_blocks);
            let (bi, hi) = (bh / h, bh % h);
            let q0 = qb * nq_block;
            let nq = nq_block.min(lq - q0);
            let q_ptr = q.data[q.offset + bi * q.strides[0] + q0 * q.strides[1] + hi * q.strides[2]..].as_ptr();
            let k_ptr = k.data[k.offset + bi * k.strides[0] + hi * k.strides[2]..].as_ptr();
            let v_ptr = v.data[v.offset + bi * v.strides[0] + hi * v.strides[2]..].as_ptr();
            // SAFETY: `view` checked that every (l, d) element of each view lies in its
            // buffer; s holds nq×lk; the output block (rows q0.., columns hi·d..) is this
            // task's alone and lies inside `out`.
            unsafe {
                gemm::gemm(
                    nq,
                    lk,
                    d,
                    s.as_mut_ptr(),
                    1,
                    lk as isize,
                    false,
                    q_ptr,
                    1,
                    q.strides[1] as isize,
                    k_ptr,
                    k.strides[1] as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for row in s[..nq * lk].chunks_exact_mut(lk) {
                softmax_in_place(row);
            }
            let o_ptr = out_ptr.get().wrapping_add(((bi * lq + q0) * h + hi) * d);
            unsafe {
                gemm::gemm(
                    nq,
                    d,
                    lk,
                    o_ptr,
                    1,
                    (h * d) as isize,
                    false,
                    s.as_ptr(),
                    1,
                    lk as isize,
                    v_ptr,
                    1,
                    v.strides[1] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    out
}

/// `row ← softmax(row)`, vectorisable (16 lanes of max and sum).
#[inline]
fn softmax_in_place(row: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in mx.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b));
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = exp_f32(*x - m);
            *a += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - m);
        sum += *x;
    }
    let inv = 1.0 / (sum + acc.iter().sum::<f32>());
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        // [B, L, H, D] -> [B, H, L, D], plain composition in f64.
        let t = |x: &Tensor| x.transpose(1, 2)?.contiguous()?.to_dtype(DType::F64);
        let (q, k, v) = (t(q)?, t(k)?, t(v)?);
        let d = q.dim(3)? as f64;
        let s = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / d.sqrt())?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        p.matmul(&v)?.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)
    }

    #[test]
    fn strided_views_match_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, lq, lk, heads, d): windows, pooled queries, a long key set over blocks.
        for &(b, lq, lk, h, d) in &[
            (3, 16, 16, 2, 8),
            (2, 16, 64, 1, 12),
            (1, 300, 1100, 2, 16),
            (2, 40, 196, 2, 24),
            (1, 5, 7, 3, 1),
        ] {
            let qkv = Tensor::randn(0f32, 1.0, (b, lk, 3, h, d), &dev)?;
            let k = qkv.narrow(2, 1, 1)?.squeeze(2)?;
            let v = qkv.narrow(2, 2, 1)?.squeeze(2)?;
            let q = if lq == lk {
                qkv.narrow(2, 0, 1)?.squeeze(2)?
            } else {
                (Tensor::randn(0f32, 1.0, (b, lq, h, d), &dev)? * 3.0)?
            };
            let got = attention_blhd(&q, &k, &v)?;
            let want = reference(&q, &k, &v)?;
            let err = crate::testing::max_abs_diff(&got, &want)?;
            assert!(err < 1e-5, "({b},{lq},{lk},{h},{d}): max diff {err}");
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 4, 2, 4), DType::F32, &dev)?;
        assert!(attention_blhd(&q, &k, &k).is_err());
        assert!(attention_blhd(&q.to_dtype(DType::F64)?, &q, &q).is_err());
        assert!(attention_blhd(&q.reshape((4, 2, 8))?, &q, &q).is_err());
        Ok(())
    }
}
