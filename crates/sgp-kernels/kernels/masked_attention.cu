// Masked attention for PMA: FlashAttention-2-style f32 kernels (forward, backward).
//
// Layouts (all contiguous f32, row-major), matching src/masked_attention/cpu.rs:
//   q    [B,H,Lq,D]
//   kv   [B,H,Lk,2D]   K in columns 0..D, V in columns D..2D
//   bias [B,Lk] (key map, bias_per_query = 0) or [B,Lq,Lk] (bias_per_query = 1)
//   out  [B,H,Lq,W]    W = D (inference) or D+1 (last column = row log-sum-exp)
//
// Work split: a block of 4 warps; in the forward and dQ kernels each warp owns R query
// rows and the lanes of a warp walk a tile of 32 keys (lane j <-> key j) for the scores,
// then switch to lane <-> feature (d = lane + 32 t) for the P·V style products, fetching
// the probabilities with warp shuffles. The dK/dV kernel mirrors this with keys as rows
// and lanes over queries. Scores live in registers only: memory is O(L·D).
//
// D must be 32, 64, 128 or 256 (lane <-> feature split); other sizes fall back to the
// naive composition on the Rust side. Shared memory exceeds 48 KiB for large D, so the
// launcher raises the dynamic shared-memory limit.
//
// This file is compiled to PTX by build.rs only with the `cuda` feature. Without a GPU:
// tools/kernels/nvrtc_check.py compiles it (NVRTC + nvJitLink) and
// tools/kernels/cuda_emulate.py replays each kernel lane by lane in numpy; keep the
// emulation in step with any change here.

// NVRTC (tools/kernels/nvrtc_check.py) has no host headers; nvcc gets the usual ones.
#ifndef __CUDACC_RTC__
#include <math.h>
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define WARPS 4
#define THREADS (WARPS * 32)
#define KT 32  // keys (or queries, in dK/dV) per streamed tile = one per lane
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

// Dot product of a smem row `a` (broadcast to all lanes) with a smem row `b` (per lane),
// both 16-byte aligned, length D.
template <int D>
__device__ __forceinline__ float dot_smem(const float* a, const float* b) {
  const float4* a4 = reinterpret_cast<const float4*>(a);
  const float4* b4 = reinterpret_cast<const float4*>(b);
  float acc = 0.f;
#pragma unroll 8
  for (int c = 0; c < D / 4; ++c) {
    float4 x = a4[c];
    float4 y = b4[c];
    acc = fmaf(x.x, y.x, acc);
    acc = fmaf(x.y, y.y, acc);
    acc = fmaf(x.z, y.z, acc);
    acc = fmaf(x.w, y.w, acc);
  }
  return acc;
}

// Copies `rows` rows of D floats (global row stride `src_stride`) into smem rows of
// stride `dst_stride`; rows beyond `valid` are zero-filled. All threads of the block.
template <int D>
__device__ __forceinline__ void load_rows(float* dst, int dst_stride, const float* src, long src_stride,
                                          int rows, int valid) {
  for (int idx = threadIdx.x; idx < rows * D; idx += THREADS) {
    int r = idx / D, c = idx % D;
    dst[r * dst_stride + c] = r < valid ? src[(long)r * src_stride + c] : 0.f;
  }
}

// ---------------------------------------------------------------------------------------
// Bias from the probability map. One block per bias row (length lk).
// mode 0 = soft: ln(max(p, eps)); mode 1 = hard: 0 if p >= 0.5 else -inf, and a row with
// no kept key becomes all zeros (plain attention).
extern "C" __global__ void ma_prepare_bias(const float* __restrict__ p, float* __restrict__ bias, int lk,
                                           int mode, float eps) {
  const float* prow = p + (long)blockIdx.x * lk;
  float* brow = bias + (long)blockIdx.x * lk;
  if (mode == 0) {
    for (int j = threadIdx.x; j < lk; j += blockDim.x) brow[j] = logf(fmaxf(prow[j], eps));
    return;
  }
  __shared__ int any_kept;
  if (threadIdx.x == 0) any_kept = 0;
  __syncthreads();
  int mine = 0;
  for (int j = threadIdx.x; j < lk; j += blockDim.x) mine |= prow[j] >= 0.5f;
  if (mine) atomicOr(&any_kept, 1);
  __syncthreads();
  const int keep_all = !any_kept;
  for (int j = threadIdx.x; j < lk; j += blockDim.x)
    brow[j] = (keep_all || prow[j] >= 0.5f) ? 0.f : -INFINITY;
}

// ---------------------------------------------------------------------------------------
// Forward. grid = (ceil(Lq / (WARPS*R)), B*H), block = THREADS.
// smem: Qs [WARPS*R][D], Ks [KT][D+4], Vs [KT][D].
template <int D, int R>
__device__ void fwd_kernel(const float* __restrict__ q, const float* __restrict__ kv,
                           const float* __restrict__ bias, float* __restrict__ out, int H, int Lq, int Lk,
                           int bias_per_query, float scale, int W) {
  constexpr int BM = WARPS * R;
  constexpr int KS = D + 4;  // padded K row: conflict-free float4 reads across lanes
  constexpr int T = D / 32;  // features per lane
  extern __shared__ float4 smem4[];
  float* Qs = reinterpret_cast<float*>(smem4);
  float* Ks = Qs + BM * D;
  float* Vs = Ks + KT * KS;

  const int bh = blockIdx.y, b = bh / H;
  const int q0 = blockIdx.x * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* qb = q + ((long)bh * Lq + q0) * D;
  const float* kvb = kv + (long)bh * Lk * 2 * D;

  load_rows<D>(Qs, D, qb, D, BM, min(BM, Lq - q0));

  float m[R], l[R], o[R][T];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int t = 0; t < T; ++t) o[r][t] = 0.f;
  }

  for (int k0 = 0; k0 < Lk; k0 += KT) {
    const int nk = min(KT, Lk - k0);
    __syncthreads();  // previous tile fully consumed (and Qs loaded on the first pass)
    load_rows<D>(Ks, KS, kvb + (long)k0 * 2 * D, 2 * D, KT, nk);
    load_rows<D>(Vs, D, kvb + (long)k0 * 2 * D + D, 2 * D, KT, nk);
    __syncthreads();
    const bool key_ok = lane < nk;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = warp * R + r;
      const int qi = min(q0 + row, Lq - 1);  // rows past Lq compute garbage-free copies, never stored
      float s = -INFINITY;
      if (key_ok) {
        const float* brow = bias + (bias_per_query ? ((long)b * Lq + qi) * Lk : (long)b * Lk);
        s = dot_smem<D>(Qs + row * D, Ks + lane * KS) * scale + brow[k0 + lane];
      }
      const float m_new = fmaxf(m[r], warp_max(s));
      float pj = 0.f, corr = 1.f;
      if (m_new != -INFINITY) {
        corr = expf(m[r] - m_new);  // m = -inf -> 0
        pj = expf(s - m_new);       // s = -inf -> 0
      }
      m[r] = m_new;
      l[r] = l[r] * corr + pj;  // per-lane partial sum; reduced once at the end
#pragma unroll
      for (int t = 0; t < T; ++t) o[r][t] *= corr;
      for (int j = 0; j < nk; ++j) {
        const float pr = __shfl_sync(FULL_MASK, pj, j);
#pragma unroll
        for (int t = 0; t < T; ++t) o[r][t] = fmaf(pr, Vs[j * D + lane + 32 * t], o[r][t]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int qi = q0 + warp * R + r;
    const float lsum = warp_sum(l[r]);
    if (qi >= Lq) continue;
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    float* orow = out + ((long)bh * Lq + qi) * W;
#pragma unroll
    for (int t = 0; t < T; ++t) orow[lane + 32 * t] = o[r][t] * inv;
    if (W > D && lane == 0) orow[D] = m[r] + logf(lsum);
  }
}

// ---------------------------------------------------------------------------------------
// Backward step 1: delta_i = rowsum(dO_i * O_i), lse_i = saved column. One warp per row.
extern "C" __global__ void ma_bwd_delta(const float* __restrict__ out_lse, const float* __restrict__ dout,
                                        float* __restrict__ delta, float* __restrict__ lse, long rows, int D) {
  const long row = (long)blockIdx.x * WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* o = out_lse + row * (D + 1);
  const float* g = dout + row * D;
  float acc = 0.f;
  for (int c = lane; c < D; c += 32) acc = fmaf(o[c], g[c], acc);
  acc = warp_sum(acc);
  if (lane == 0) {
    delta[row] = acc;
    lse[row] = o[D];
  }
}

// ---------------------------------------------------------------------------------------
// Backward step 2: dK, dV (and the key-map bias gradient per head). grid =
// (ceil(Lk / (WARPS*R)), B*H). Each warp owns R keys; lanes walk 32-query tiles.
// smem: Ks [BK][D], Vs [BK][D], Qs [KT][D+4], dOs [KT][D+4].
template <int D, int R>
__device__ void bwd_dkv_kernel(const float* __restrict__ q, const float* __restrict__ kv,
                               const float* __restrict__ bias, const float* __restrict__ dout,
                               const float* __restrict__ delta, const float* __restrict__ lse,
                               float* __restrict__ dkv, float* __restrict__ dbias_heads, int H, int Lq, int Lk,
                               int bias_per_query, float scale) {
  constexpr int BK = WARPS * R;
  constexpr int QS = D + 4;
  constexpr int T = D / 32;
  extern __shared__ float4 smem4[];
  float* Ks = reinterpret_cast<float*>(smem4);
  float* Vs = Ks + BK * D;
  float* Qs = Vs + BK * D;
  float* dOs = Qs + KT * QS;

  const int bh = blockIdx.y, b = bh / H;
  const int k0 = blockIdx.x * BK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* kvb = kv + (long)bh * Lk * 2 * D;
  const int nk_blk = min(BK, Lk - k0);
  load_rows<D>(Ks, D, kvb + (long)k0 * 2 * D, 2 * D, BK, nk_blk);
  load_rows<D>(Vs, D, kvb + (long)k0 * 2 * D + D, 2 * D, BK, nk_blk);

  float dk[R][T], dv[R][T], dbias_acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    dbias_acc[r] = 0.f;
#pragma unroll
    for (int t = 0; t < T; ++t) dk[r][t] = dv[r][t] = 0.f;
  }

  for (int i0 = 0; i0 < Lq; i0 += KT) {
    const int nq = min(KT, Lq - i0);
    __syncthreads();
    load_rows<D>(Qs, QS, q + ((long)bh * Lq + i0) * D, D, KT, nq);
    load_rows<D>(dOs, QS, dout + ((long)bh * Lq + i0) * D, D, KT, nq);
    __syncthreads();
    const bool q_ok = lane < nq;
    const int qi = i0 + (q_ok ? lane : 0);
    const float lse_i = q_ok ? lse[(long)bh * Lq + qi] : 0.f;
    const float delta_i = q_ok ? delta[(long)bh * Lq + qi] : 0.f;
    const float* brow = bias + (bias_per_query ? ((long)b * Lq + qi) * Lk : (long)b * Lk);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int kr = warp * R + r;
      const int kj = k0 + kr;
      float pij = 0.f, dsij = 0.f;
      if (q_ok && kj < Lk) {
        const float s = dot_smem<D>(Ks + kr * D, Qs + lane * QS) * scale + brow[kj];
        pij = expf(s - lse_i);  // bias = -inf -> 0
        const float dp = dot_smem<D>(Vs + kr * D, dOs + lane * QS);
        dsij = pij * (dp - delta_i);
      }
      dbias_acc[r] += dsij;
      for (int i = 0; i < nq; ++i) {
        const float pi = __shfl_sync(FULL_MASK, pij, i);
        const float dsi = __shfl_sync(FULL_MASK, dsij, i);
#pragma unroll
        for (int t = 0; t < T; ++t) {
          dv[r][t] = fmaf(pi, dOs[i * QS + lane + 32 * t], dv[r][t]);
          dk[r][t] = fmaf(dsi, Qs[i * QS + lane + 32 * t], dk[r][t]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int kj = k0 + warp * R + r;
    const float db = warp_sum(dbias_acc[r]);
    if (kj >= Lk) continue;
    float* row = dkv + ((long)bh * Lk + kj) * 2 * D;
#pragma unroll
    for (int t = 0; t < T; ++t) {
      row[lane + 32 * t] = dk[r][t] * scale;
      row[D + lane + 32 * t] = dv[r][t];
    }
    if (dbias_heads != nullptr && !bias_per_query && lane == 0) dbias_heads[(long)bh * Lk + kj] = db;
  }
}

// ---------------------------------------------------------------------------------------
// Backward step 3: dQ (and the per-query bias gradient, summed over heads with atomics).
// grid = (ceil(Lq / (WARPS*R)), B*H). Layout as the forward.
// smem: Qs [BM][D], dOs [BM][D], Ks [KT][D+4], Vs [KT][D+4].
template <int D, int R>
__device__ void bwd_dq_kernel(const float* __restrict__ q, const float* __restrict__ kv,
                              const float* __restrict__ bias, const float* __restrict__ dout,
                              const float* __restrict__ delta, const float* __restrict__ lse,
                              float* __restrict__ dq, float* __restrict__ dbias_rows, int H, int Lq, int Lk,
                              int bias_per_query, float scale) {
  constexpr int BM = WARPS * R;
  constexpr int KS = D + 4;
  constexpr int T = D / 32;
  extern __shared__ float4 smem4[];
  float* Qs = reinterpret_cast<float*>(smem4);
  float* dOs = Qs + BM * D;
  float* Ks = dOs + BM * D;
  float* Vs = Ks + KT * KS;

  const int bh = blockIdx.y, b = bh / H;
  const int q0 = blockIdx.x * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* kvb = kv + (long)bh * Lk * 2 * D;
  const int nq_blk = min(BM, Lq - q0);
  load_rows<D>(Qs, D, q + ((long)bh * Lq + q0) * D, D, BM, nq_blk);
  load_rows<D>(dOs, D, dout + ((long)bh * Lq + q0) * D, D, BM, nq_blk);

  float acc[R][T], lse_r[R], delta_r[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int qi = min(q0 + warp * R + r, Lq - 1);
    lse_r[r] = lse[(long)bh * Lq + qi];
    delta_r[r] = delta[(long)bh * Lq + qi];
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
  }

  for (int k0 = 0; k0 < Lk; k0 += KT) {
    const int nk = min(KT, Lk - k0);
    __syncthreads();
    load_rows<D>(Ks, KS, kvb + (long)k0 * 2 * D, 2 * D, KT, nk);
    load_rows<D>(Vs, KS, kvb + (long)k0 * 2 * D + D, 2 * D, KT, nk);
    __syncthreads();
    const bool key_ok = lane < nk;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = warp * R + r;
      const int qi = q0 + row;
      float dsij = 0.f;
      if (key_ok && qi < Lq) {
        const float* brow = bias + (bias_per_query ? ((long)b * Lq + qi) * Lk : (long)b * Lk);
        const float s = dot_smem<D>(Qs + row * D, Ks + lane * KS) * scale + brow[k0 + lane];
        const float pij = expf(s - lse_r[r]);
        const float dp = dot_smem<D>(dOs + row * D, Vs + lane * KS);
        dsij = pij * (dp - delta_r[r]);
        if (dbias_rows != nullptr && bias_per_query)
          atomicAdd(dbias_rows + ((long)b * Lq + qi) * Lk + k0 + lane, dsij);
      }
      for (int j = 0; j < nk; ++j) {
        const float dsj = __shfl_sync(FULL_MASK, dsij, j);
#pragma unroll
        for (int t = 0; t < T; ++t) acc[r][t] = fmaf(dsj, Ks[j * KS + lane + 32 * t], acc[r][t]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int qi = q0 + warp * R + r;
    if (qi >= Lq) continue;
    float* row = dq + ((long)bh * Lq + qi) * D;
#pragma unroll
    for (int t = 0; t < T; ++t) row[lane + 32 * t] = acc[r][t] * scale;
  }
}

// ---------------------------------------------------------------------------------------
// Entry points, one per head size. R (rows per warp) trades registers for reuse.
#define MA_INSTANTIATE(D, R)                                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS)                                               \
      ma_fwd_d##D(const float* q, const float* kv, const float* bias, float* out, int H, int Lq, int Lk, \
                  int bias_per_query, float scale, int W) {                                           \
    fwd_kernel<D, R>(q, kv, bias, out, H, Lq, Lk, bias_per_query, scale, W);                         \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(THREADS)                                               \
      ma_bwd_dkv_d##D(const float* q, const float* kv, const float* bias, const float* dout,          \
                      const float* delta, const float* lse, float* dkv, float* dbias_heads, int H,    \
                      int Lq, int Lk, int bias_per_query, float scale) {                              \
    bwd_dkv_kernel<D, R>(q, kv, bias, dout, delta, lse, dkv, dbias_heads, H, Lq, Lk, bias_per_query, \
                         scale);                                                                      \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(THREADS)                                               \
      ma_bwd_dq_d##D(const float* q, const float* kv, const float* bias, const float* dout,           \
                     const float* delta, const float* lse, float* dq, float* dbias_rows, int H, int Lq, \
                     int Lk, int bias_per_query, float scale) {                                       \
    bwd_dq_kernel<D, R>(q, kv, bias, dout, delta, lse, dq, dbias_rows, H, Lq, Lk, bias_per_query,    \
                        scale);                                                                       \
  }

MA_INSTANTIATE(32, 8)
MA_INSTANTIATE(64, 8)
MA_INSTANTIATE(128, 8)
MA_INSTANTIATE(256, 4)
