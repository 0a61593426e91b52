//! CUDA launches for `kernels/masked_attention.cu` (feature `cuda`; PTX built by build.rs).
//!
//! Same buffers and semantics as the CPU kernels (see `cpu.rs`); the forward keeps the
//! log-sum-exp column for the backward. Only head sizes in [`SUPPORTED_D`] have kernels;
//! [`super::masked_attention`] sends other sizes to the naive composition.
//!
//! NOTE: written without a GPU or nvcc at hand; `tools/kernels/cuda_check.sh` is the check.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDevice;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Layout, Result, Shape, Storage, Tensor};

use super::{Dims, FusedMaskedAttention, MaskMode};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/masked_attention.ptx"));
const MODULE: &str = "sgp_masked_attention";
const WARPS: usize = 4;
const THREADS: u32 = 32 * WARPS as u32;
/// Keys (or queries) per streamed tile, one per lane.
const KT: usize = 32;

/// Head sizes with compiled kernels.
pub(crate) const SUPPORTED_D: [usize; 4] = [32, 64, 128, 256];

/// Rows per warp of the `D`-instantiation (must match `MA_INSTANTIATE` in the .cu file).
fn rows_per_warp(d: usize) -> usize {
    if d > 128 {
        4
    } else {
        8
    }
}

fn cuda_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Cuda(format!("masked_attention: {e}").into())
}

/// Kernels with more than 48 KiB of dynamic shared memory must opt in.
fn raise_smem_limit(func: &CudaFunction, smem_bytes: usize) -> Result<()> {
    if smem_bytes > 48 * 1024 {
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem_bytes as i32,
        )
        .map_err(cuda_err)?;
    }
    Ok(())
}

fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    if !l.is_contiguous() {
        candle_core::bail!("masked_attention: {what} must be contiguous");
    }
    let slice = s.as_cuda_slice::<f32>()?;
    Ok(slice.slice(l.start_offset()..l.start_offset() + l.shape().elem_count()))
}

fn check_d(d: usize) -> Result<()> {
    if !SUPPORTED_D.contains(&d) {
        candle_core::bail!("masked_attention: no CUDA kernel for head size {d} (have {SUPPORTED_D:?})");
    }
    Ok(())
}

/// The bias buffer (`[B,Lk]` or `[B,Lq,Lk]`) from the probability map.
fn prepare_bias(dev: &CudaDevice, p: &CudaView<f32>, rows: usize, lk: usize, mode: MaskMode) -> Result<CudaSlice<f32>> {
    let bias = unsafe { dev.alloc::<f32>((rows * lk).max(1))? };
    if rows == 0 {
        return Ok(bias);
    }
    let (mode_i, eps) = match mode {
        MaskMode::Soft { eps } => (0i32, eps),
        MaskMode::Hard => (1i32, 0.5f32),
    };
    let func = dev.get_or_load_custom_func("ma_prepare_bias", MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let lk_i = lk as i32;
    let mut b = func.builder();
    b.arg(p);
    b.arg(&bias);
    b.arg(&lk_i);
    b.arg(&mode_i);
    b.arg(&eps);
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(bias)
}

fn bias_rows(dims: &Dims) -> usize {
    if dims.p_per_query {
        dims.b * dims.lq
    } else {
        dims.b
    }
}

pub(crate) fn forward(
    op: &FusedMaskedAttention,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<CudaStorage> {
    let Dims {
        b,
        h,
        lq,
        lk,
        d,
        p_per_query,
    } = op.dims;
    check_d(d)?;
    let dev = s1.device().clone();
    let (q, kv, p) = (view(s1, l1, "q")?, view(s2, l2, "kv")?, view(s3, l3, "p")?);
    let bias = prepare_bias(&dev, &p, bias_rows(&op.dims), lk, op.mode)?;
    let w = d + usize::from(op.with_lse);
    let out = unsafe { dev.alloc::<f32>(b * h * lq * w)? };
    if lq == 0 || b * h == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev));
    }
    let r = rows_per_warp(d);
    let bm = WARPS * r;
    let smem = (bm * d + KT * (d + 4) + KT * d) * 4;
    let func = dev.get_or_load_custom_func(&format!("ma_fwd_d{d}"), MODULE, PTX)?;
    raise_smem_limit(&func, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (lq.div_ceil(bm) as u32, (b * h) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (h_i, lq_i, lk_i, bpq, w_i) = (h as i32, lq as i32, lk as i32, i32::from(p_per_query), w as i32);
    let mut bld = func.builder();
    bld.arg(&q);
    bld.arg(&kv);
    bld.arg(&bias);
    bld.arg(&out);
    bld.arg(&h_i);
    bld.arg(&lq_i);
    bld.arg(&lk_i);
    bld.arg(&bpq);
    bld.arg(&op.scale);
    bld.arg(&w_i);
    unsafe { bld.launch(cfg) }.map_err(cuda_err)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

fn tensor(slice: CudaSlice<f32>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// Gradients `(dq, dkv, dbias)`; `dbias` (summed over heads, shaped like `p`) only when
/// `want_dbias`. All inputs are contiguous f32 CUDA tensors.
pub(crate) fn backward(
    op: &FusedMaskedAttention,
    q: &Tensor,
    kv: &Tensor,
    p: &Tensor,
    res: &Tensor,
    dout: &Tensor,
    want_dbias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let Dims {
        b,
        h,
        lq,
        lk,
        d,
        p_per_query,
    } = op.dims;
    check_d(d)?;
    let (qs, ql) = q.storage_and_layout();
    let (kvs, kvl) = kv.storage_and_layout();
    let (ps, pl) = p.storage_and_layout();
    let (rs, rl) = res.storage_and_layout();
    let (gs, gl) = dout.storage_and_layout();
    let (Storage::Cuda(qs), Storage::Cuda(kvs), Storage::Cuda(ps), Storage::Cuda(rs), Storage::Cuda(gs)) =
        (&*qs, &*kvs, &*ps, &*rs, &*gs)
    else {
        candle_core::bail!("masked_attention: backward inputs must all be on the same CUDA device");
    };
    let dev = qs.device().clone();
    let (qv, kvv, pv, rv, gv) = (
        view(qs, ql, "q")?,
        view(kvs, kvl, "kv")?,
        view(ps, pl, "p")?,
        view(rs, rl, "res")?,
        view(gs, gl, "grad")?,
    );
    let bias = prepare_bias(&dev, &pv, bias_rows(&op.dims), lk, op.mode)?;
    let rows = b * h * lq;
    let delta = unsafe { dev.alloc::<f32>(rows.max(1))? };
    let lse = unsafe { dev.alloc::<f32>(rows.max(1))? };
    let dq = dev.alloc_zeros::<f32>(rows * d)?;
    let dkv = dev.alloc_zeros::<f32>(b * h * lk * 2 * d)?;
    let key_dbias = want_dbias && !p_per_query;
    let query_dbias = want_dbias && p_per_query;
    let dbias_heads = if key_dbias {
        Some(dev.alloc_zeros::<f32>(b * h * lk)?)
    } else {
        None
    };
    let dbias_rows = if query_dbias {
        Some(dev.alloc_zeros::<f32>(b * lq * lk)?)
    } else {
        None
    };
    let (h_i, lq_i, lk_i, bpq, d_i) = (h as i32, lq as i32, lk as i32, i32::from(p_per_query), d as i32);
    let null = 0usize;

    if rows > 0 {
        let func = dev.get_or_load_custom_func("ma_bwd_delta", MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let rows_i = rows as i64;
        let mut bld = func.builder();
        bld.arg(&rv);
        bld.arg(&gv);
        bld.arg(&delta);
        bld.arg(&lse);
        bld.arg(&rows_i);
        bld.arg(&d_i);
        unsafe { bld.launch(cfg) }.map_err(cuda_err)?;

        let r = rows_per_warp(d);
        let blk = WARPS * r;
        // dK, dV
        let smem = (2 * blk * d + 2 * KT * (d + 4)) * 4;
        let func = dev.get_or_load_custom_func(&format!("ma_bwd_dkv_d{d}"), MODULE, PTX)?;
        raise_smem_limit(&func, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (lk.div_ceil(blk) as u32, (b * h) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut bld = func.builder();
        bld.arg(&qv);
        bld.arg(&kvv);
        bld.arg(&bias);
        bld.arg(&gv);
        bld.arg(&delta);
        bld.arg(&lse);
        bld.arg(&dkv);
        match &dbias_heads {
            Some(s) => bld.arg(s),
            None => bld.arg(&null),
        };
        bld.arg(&h_i);
        bld.arg(&lq_i);
        bld.arg(&lk_i);
        bld.arg(&bpq);
        bld.arg(&op.scale);
        unsafe { bld.launch(cfg) }.map_err(cuda_err)?;

        // dQ
        let smem = (2 * blk * d + 2 * KT * (d + 4)) * 4;
        let func = dev.get_or_load_custom_func(&format!("ma_bwd_dq_d{d}"), MODULE, PTX)?;
        raise_smem_limit(&func, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (lq.div_ceil(blk) as u32, (b * h) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut bld = func.builder();
        bld.arg(&qv);
        bld.arg(&kvv);
        bld.arg(&bias);
        bld.arg(&gv);
        bld.arg(&delta);
        bld.arg(&lse);
        bld.arg(&dq);
        match &dbias_rows {
            Some(s) => bld.arg(s),
            None => bld.arg(&null),
        };
        bld.arg(&h_i);
        bld.arg(&lq_i);
        bld.arg(&lk_i);
        bld.arg(&bpq);
        bld.arg(&op.scale);
        unsafe { bld.launch(cfg) }.map_err(cuda_err)?;
    }

    let dq = tensor(dq, &dev, (b, h, lq, d));
    let dkv = tensor(dkv, &dev, (b, h, lk, 2 * d));
    let dbias = match (dbias_heads, dbias_rows) {
        (Some(s), _) => Some(tensor(s, &dev, (b, h, lk)).sum(1)?),
        (None, Some(s)) => Some(tensor(s, &dev, (b, lq, lk))),
        (None, None) => None,
    };
    Ok((dq, dkv, dbias))
}
