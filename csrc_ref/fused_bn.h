// fusedres csrc_ref: the fused batch-norm primitives hand-written in C++ (CPU) and CUDA.
//
// A second, independent implementation of fusedres.reference's bn_stats / bn_act_fwd /
// bn_act_bwd and of the pieces synchronised batch norm runs around its all-reduces
// (bn_moments, bn_stats_from_moments, bn_act_bwd_reduce, bn_act_bwd_apply), with the same
// arguments and results, used as an oracle for the Triton kernels and as the hand-written
// baseline in the benchmarks. This header holds everything the CPU and the CUDA builds
// share: the arithmetic (host+device functions), the per-element "views" and per-channel
// reduction "ops" that both backends drive, and the host code that checks arguments and
// allocates results. A backend (`Dev`) only supplies two traversals:
//
//   Dev::reduce(op, geometry, like): per-channel reduction with op.push/merge, then
//       op.finalize(c, acc) once per channel; deterministic (fixed partition, fixed order,
//       no atomics).
//   Dev::groups(view, geometry, like): view.group(line, j8) for every 8-element group.
//   Dev::sample_reduce(op, geometry, like): per-(sample, channel) reduction over the H*W
//       positions in position order with op.push, then op.finalize_nc(n, c, acc): a
//       squeeze-excite / ECA gate's pooling and per-sample backward sums.
//
// Layout. A 4-D activation [N, C, H, W] is read as `lines` of `len` contiguous elements:
// NCHW has N*C lines of H*W positions, channels_last has N*H*W lines of C channels. The
// packed ReLU mask has one row of ceil(len/8) bytes per line (fusedres.layout.mask_shape),
// so one 8-element group of a line owns exactly one mask byte.
//
// Numerics. Storage dtype outside, `A` = at::opmath_type inside (fp32 for fp16/bf16/fp32,
// fp64 for fp64); statistics and BN parameters are passed to the kernels in A.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__CUDACC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline
#endif

namespace fusedres_ref {

// ---------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------

struct Geometry {
  int64_t N, C, HW;
  bool cl;  // channels_last: lines are positions, channels contiguous

  FR_HD int64_t lines_per_sample() const { return cl ? HW : C; }
  FR_HD int64_t rows() const { return N * lines_per_sample(); }
  FR_HD int64_t len() const { return cl ? C : HW; }
  FR_HD int64_t len8() const { return (len() + 7) / 8; }
  FR_HD int64_t sample(int64_t r) const { return r / lines_per_sample(); }
};

// ---------------------------------------------------------------------------------------
// Arithmetic shared by both backends
// ---------------------------------------------------------------------------------------

template <class A>
FR_HD A fr_sqrt(A v) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<A, float>) return sqrtf(v);  // IEEE-rounded (no fast math)
  else return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// Counts are int64 so that n_a * n_b cannot overflow; they enter the arithmetic as ratios.
template <class A>
struct Welford {
  int64_t n;
  A mean;
  A m2;  // sum of squared deviations from mean
};

template <class A>
FR_HD void welford_push(Welford<A>& a, A x) {
  a.n += 1;
  const A d = x - a.mean;
  a.mean += d / A(a.n);
  a.m2 += d * (x - a.mean);
}

// Chan et al.: merge two (count, mean, M2) summaries without ever forming E[x^2]-E[x]^2,
// which loses every digit when |mean| >> std.
template <class A>
FR_HD Welford<A> chan_combine(const Welford<A>& a, const Welford<A>& b) {
  const int64_t n = a.n + b.n;
  if (n == 0) return a;
  const A delta = b.mean - a.mean;
  const A frac_b = A(b.n) / A(n);
  return {n, a.mean + delta * frac_b, a.m2 + b.m2 + delta * delta * (A(a.n) * frac_b)};
}

// ReLU as where(v < 0, 0, v) so that NaN propagates like torch.relu; a gradient passes
// where NOT (v <= 0), as torch.relu's backward (NaN passes).
template <class A>
FR_HD A relu(A v) { return v < A(0) ? A(0) : v; }
template <class A>
FR_HD bool relu_keep(A v) { return !(v <= A(0)); }
// where(keep, dy, 0), not dy * keep: an inf gradient times 0 would be NaN.
template <class A>
FR_HD A relu_grad(A dy, bool keep) { return keep ? dy : A(0); }

// Separately rounded multiply and add, as PyTorch computes z*scale + shift: nvcc would
// contract them into one fma, and the sign of a value near zero (the ReLU mask) could then
// differ from the reference's.
template <class A>
FR_HD A mul_rn(A a, A b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<A, float>) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
template <class A>
FR_HD A add_rn(A a, A b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<A, float>) return __fadd_rn(a, b);
  else return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

template <class A>
FR_HD A bn_apply(A z, A scale, A shift) { return add_rn(mul_rn(z, scale), shift); }

// dL/dz of y = gamma*xhat + beta given g = dL/dy. Batch statistics:
// scale*(g - mean(g) - xhat*mean(g*xhat)); running statistics: a constant affine map.
template <class A>
FR_HD A bn_input_grad(A scale, A g, A xhat, A mean_g, A mean_gx, bool batch_stats) {
  return batch_stats ? scale * (g - mean_g - xhat * mean_gx) : scale * g;
}

// One 8-element group of a line. `vec`: the line length is a multiple of 8 and every
// pointer 16-byte aligned, so the GPU moves the group in 16-byte vector accesses.
#if defined(__CUDACC__)
template <class T>
union Pack8 {  // 8 elements as 16-byte words, for the vector accesses
  uint4 words[8 * sizeof(T) / 16];
  T v[8];
};
#endif

template <class T>
FR_HD void load8(const T* p, int cnt, bool vec, T (&v)[8]) {
#if defined(__CUDA_ARCH__)
  if (vec) {
    Pack8<T> pk;
#pragma unroll
    for (int i = 0; i < int(8 * sizeof(T) / 16); ++i)
      pk.words[i] = reinterpret_cast<const uint4*>(p)[i];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = pk.v[k];
    return;
  }
#endif
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = k < cnt ? p[k] : T(0.0f);
}

template <class T>
FR_HD void store8(T* p, int cnt, bool vec, const T (&v)[8]) {
#if defined(__CUDA_ARCH__)
  if (vec) {
    Pack8<T> pk;
#pragma unroll
    for (int k = 0; k < 8; ++k) pk.v[k] = v[k];
#pragma unroll
    for (int i = 0; i < int(8 * sizeof(T) / 16); ++i)
      reinterpret_cast<uint4*>(p)[i] = pk.words[i];
    return;
  }
#endif
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (k < cnt) p[k] = v[k];
}

// ---------------------------------------------------------------------------------------
// Statistics: Welford per element, Chan across partials, then the per-channel epilogue
// ---------------------------------------------------------------------------------------

// The per-channel epilogue of bn_stats and bn_stats_from_moments: from a channel's merged
// (count, mean, M2) to mean, rstd, scale, shift and the running-statistics update.
template <class A>
struct StatsEpilogue {
  const A* weight;         // [C] or null
  const A* bias;           // [C] or null
  A* running_mean;         // [C] updated in place (update), already in A
  A* running_var;          // [C]
  const int64_t* nbt;      // num_batches_tracked, already incremented (cumulative)
  A momentum, eps;
  bool update, cumulative;
  A* mean;                 // [C] outputs
  A* rstd;
  A* scale;
  A* shift;

  FR_HD void operator()(int64_t c, const Welford<A>& s) const {
    if (s.n == 0) {  // every merged batch empty: as bn_stats on an empty batch
      mean[c] = A(0);
      rstd[c] = A(1);
      scale[c] = A(0);
      shift[c] = A(0);
      return;
    }
    const A var = s.m2 / A(s.n);
    const A r = A(1) / fr_sqrt(var + eps);
    const A sc = weight ? r * weight[c] : r;
    A sh = -s.mean * sc;
    if (bias) sh = sh + bias[c];
    mean[c] = s.mean;
    rstd[c] = r;
    scale[c] = sc;
    shift[c] = sh;
    if (update) {
      // momentum=None: cumulative average, 1/num_batches_tracked read here on the device
      // (PyTorch's module calls float() on it, a host sync that breaks CUDA graphs).
      const A f = cumulative ? A(1) / A(*nbt) : momentum;
      const A unbiased = s.m2 / A(s.n - 1);
      running_mean[c] = (A(1) - f) * running_mean[c] + f * s.mean;
      running_var[c] = (A(1) - f) * running_var[c] + f * unbiased;
    }
  }
};

// bn_moments' epilogue: the channel's (count, mean, M2) as column c of a [3, C] tensor.
template <class A>
struct MomentsOut {
  A* moments;
  int64_t C;

  FR_HD void operator()(int64_t c, const Welford<A>& s) const {
    moments[c] = A(s.n);
    moments[C + c] = s.mean;
    moments[2 * C + c] = s.m2;
  }
};

// Welford over x, then `epi(c, (count, mean, M2))` per channel.
template <class T, class A, class Epi>
struct StatsOp {
  using Acc = Welford<A>;
  Geometry g;
  const T* x;
  Epi epi;

  // Every summary of channel c is of x - pivot(c), one of the channel's own values: the
  // shifted values are of the order of the std, so no running or partial mean is rounded at
  // the scale of |mean| (in fp32, mean 1e3 with std 1e-2 would otherwise lose ~1e-3 of the
  // variance in Welford's updates and in Chan's deltas). The shift leaves M2 unchanged.
  FR_HD A pivot(int64_t c) const { return A(x[g.cl ? c : c * g.HW]); }

  FR_HD static Acc zero() { return {0, A(0), A(0)}; }
  FR_HD static Acc merge(const Acc& a, const Acc& b) { return chan_combine(a, b); }
  FR_HD void push(Acc& a, int64_t r, int64_t j, int64_t /*n*/, int64_t c) const {
    welford_push(a, A(x[r * g.len() + j]) - pivot(c));
  }
  FR_HD void finalize(int64_t c, const Acc& a) const { epi(c, {a.n, pivot(c) + a.mean, a.m2}); }
};

// bn_stats_from_moments: Chan's merge of an [R, 3, C] stack of bn_moments, walked as R
// samples of C one-element planes (Geometry{R, C, 1, NCHW}) so that both backends' reduce
// serves unchanged; each element pushes one rank's whole (count, mean, M2).
template <class A>
struct MomentsMergeOp {
  using Acc = Welford<A>;
  const A* moments;        // [R, 3, C]
  int64_t C;
  StatsEpilogue<A> epi;

  FR_HD static Acc zero() { return {0, A(0), A(0)}; }
  FR_HD static Acc merge(const Acc& a, const Acc& b) { return chan_combine(a, b); }
  FR_HD void push(Acc& a, int64_t /*r*/, int64_t /*j*/, int64_t n, int64_t c) const {
    const A* m = moments + n * 3 * C + c;
    // Counts are whole numbers stored in A. A row with count 0 is skipped outright: its
    // mean may be anything, and delta * 0 is NaN for an infinite delta.
    const int64_t cnt = static_cast<int64_t>(m[0]);
    if (cnt > 0) a = chan_combine(a, Acc{cnt, m[C], m[2 * C]});
  }
  FR_HD void finalize(int64_t c, const Acc& a) const { epi(c, a); }
};

// What Dev::sample_reduce does for the i-th (sample, channel), i = n*C + c: every position
// in order, then the op's per-(n, c) epilogue. Both backends call this per (n, c).
template <class Op>
FR_HD void reduce_sample_channel(const Op& op, const Geometry& g, int64_t i) {
  const int64_t n = i / g.C, c = i % g.C;
  typename Op::Acc a = Op::zero();
  for (int64_t s = 0; s < g.HW; ++s) {
    if (g.cl) op.push(a, n * g.HW + s, c, n, c);
    else op.push(a, i, s, n, c);  // NCHW: line n*C + c
  }
  op.finalize_nc(n, c, a);
}

// bn_stats_pool / bn_pool: pooled[n, c] = mean over H*W of x (Dev::sample_reduce).
template <class T, class A>
struct PoolOp {
  using Acc = A;
  Geometry g;
  const T* x;
  A* pooled;               // [N, C] out

  FR_HD static Acc zero() { return A(0); }
  FR_HD void push(Acc& a, int64_t r, int64_t j, int64_t /*n*/, int64_t /*c*/) const {
    a += A(x[r * g.len() + j]);
  }
  FR_HD void finalize_nc(int64_t n, int64_t c, const Acc& a) const {
    pooled[n * g.C + c] = a / A(g.HW);
  }
};

// ---------------------------------------------------------------------------------------
// Forward epilogue: y = act(f*(z*scale + shift) + skip), skip = r | zd*scale_d + shift_d,
// f = f_n ([N] factor: stochastic depth) or f_nc ([N, C]: a squeeze-excite / ECA gate)
// ---------------------------------------------------------------------------------------

// The branch factor of element (n, c): factor[n], factor[n, c] (nc), or 1 without one
// (x*1 is exact: no branch needed where it multiplies).
template <class A>
FR_HD A branch_factor(const A* factor, bool nc, int64_t n, int64_t c, int64_t C) {
  return factor ? factor[nc ? n * C + c : n] : A(1);
}

template <class T, class A>
struct FwdView {
  Geometry g;
  const T* z;
  T* y;
  const A* scale;
  const A* shift;
  int skip_mode;           // 0 none, 1 tensor, 2 normalised tensor (projection BN)
  const T* skip;
  const A* skip_scale;
  const A* skip_shift;
  const A* factor;         // [N] per-sample branch factor (stochastic depth), [N, C], or null
  bool factor_nc;          // factor is [N, C]
  bool relu_on;
  uint8_t* mask;           // packed ReLU bits or null
  bool vec;

  FR_HD void group(int64_t r, int64_t j8) const {
    const int64_t L = g.len(), j0 = j8 * 8, off = r * L + j0;
    const int cnt = L - j0 < 8 ? int(L - j0) : 8;
    const int64_t c_line = g.cl ? 0 : r % g.C, n = g.sample(r);
    T zv[8], sv[8], yv[8];
    load8(z + off, cnt, vec, zv);
    if (skip_mode) load8(skip + off, cnt, vec, sv);
    uint8_t bits = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (k >= cnt) continue;
      const int64_t c = g.cl ? j0 + k : c_line;
      A v = mul_rn(bn_apply(A(zv[k]), scale[c], shift[c]),
                   branch_factor(factor, factor_nc, n, c, g.C));
      if (skip_mode == 1) v = add_rn(v, A(sv[k]));
      if (skip_mode == 2) v = add_rn(v, bn_apply(A(sv[k]), skip_scale[c], skip_shift[c]));
      yv[k] = T(relu_on ? relu(v) : v);
      bits |= uint8_t(relu_keep(v)) << k;  // padding bits past the line stay zero
    }
    store8(y + off, cnt, vec, yv);
    if (mask) mask[r * g.len8() + j8] = bits;
  }
};

// ---------------------------------------------------------------------------------------
// Backward: with g = relu_grad(dy), g_b = f*g (f_n or f_nc) and xhat = (z - mean)*rstd,
//   sums = (sum g_b, sum g_b*xhat[, sum g, sum g*xhat_d])      (one reduction pass)
//   dz = bn_input_grad(scale, du, xhat, sums/M) [+ dz_add]     (one elementwise pass)
//   du = g_b [+ du_add[n, c]]                                  (a gate's pooling gradient)
//   dskip = g (identity) | bn_input_grad(scale_d, g, xhat_d, ...) (projection BN)
// The ReLU mask is recomputed from z (mask_mode 1) or read from the packed bits (2).
// ---------------------------------------------------------------------------------------

template <class A>
struct Sums {
  A s[4];
};

template <class T, class A>
struct BwdView {
  Geometry g;
  const T* dy;
  const T* z;
  const A* mean;
  const A* rstd;
  const A* scale;
  const A* shift;
  int mask_mode;           // 0 no ReLU, 1 recompute from z*scale + shift, 2 packed bits
  const uint8_t* mask;
  const A* factor;         // [N], [N, C] (factor_nc) or null
  bool factor_nc;
  int skip_mode;           // 0 none, 1 identity (dskip = g), 2 projection BN (dskip = dzd)
  const T* zd;
  const A* mean_d;
  const A* rstd_d;
  const A* scale_d;
  // elementwise pass only
  const A* coef;           // [4, C] sums / M
  bool batch_stats, batch_stats_d;
  const T* dz_add;         // or null
  const A* du_add;         // [N, C] or null
  T* dz;
  T* dskip;
  bool vec;

  // g = dL/d(pre-activation) for one element, z already loaded; `byte` its mask byte.
  FR_HD A grad(A dyv, A zv, int64_t c, uint8_t byte, int k) const {
    if (mask_mode == 1) return relu_grad(dyv, relu_keep(bn_apply(zv, scale[c], shift[c])));
    if (mask_mode == 2) return relu_grad(dyv, ((byte >> k) & 1) != 0);
    return dyv;
  }

  FR_HD void group(int64_t r, int64_t j8) const {
    const int64_t L = g.len(), j0 = j8 * 8, off = r * L + j0;
    const int cnt = L - j0 < 8 ? int(L - j0) : 8;
    const int64_t c_line = g.cl ? 0 : r % g.C, n = g.sample(r);
    const uint8_t byte = mask_mode == 2 ? mask[r * g.len8() + j8] : uint8_t(0);
    T dyv[8], zv[8], zdv[8], addv[8], dzv[8], dsv[8];
    load8(dy + off, cnt, vec, dyv);
    load8(z + off, cnt, vec, zv);
    if (skip_mode == 2) load8(zd + off, cnt, vec, zdv);
    if (dz_add) load8(dz_add + off, cnt, vec, addv);
    const int64_t C = g.C;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (k >= cnt) continue;
      const int64_t c = g.cl ? j0 + k : c_line;
      const A zz = A(zv[k]);
      const A gg = grad(A(dyv[k]), zz, c, byte, k);
      const A xhat = (zz - mean[c]) * rstd[c];
      A du = gg * branch_factor(factor, factor_nc, n, c, C);
      if (du_add) du += du_add[n * C + c];
      A d = batch_stats ? bn_input_grad(scale[c], du, xhat, coef[c], coef[C + c], true)
                        : bn_input_grad(scale[c], du, xhat, A(0), A(0), false);
      if (dz_add) d += A(addv[k]);
      dzv[k] = T(d);
      if (skip_mode == 1) dsv[k] = T(gg);
      if (skip_mode == 2) {
        const A xd = (A(zdv[k]) - mean_d[c]) * rstd_d[c];
        dsv[k] = T(batch_stats_d
                       ? bn_input_grad(scale_d[c], gg, xd, coef[2 * C + c], coef[3 * C + c], true)
                       : bn_input_grad(scale_d[c], gg, xd, A(0), A(0), false));
      }
    }
    store8(dz + off, cnt, vec, dzv);
    if (skip_mode) store8(dskip + off, cnt, vec, dsv);
  }
};

template <class T, class A>
struct GradSumOp {
  using Acc = Sums<A>;
  BwdView<T, A> v;
  int K;                   // 2, or 4 with the projection BN
  int64_t count;           // M = N*H*W
  A* sums;                 // [K, C] out; [K, N, C] (Dev::sample_reduce: per sample)
  A* coef;                 // [4, C] out: sums / M for the elementwise pass, or null

  FR_HD static Acc zero() { return {{A(0), A(0), A(0), A(0)}}; }
  FR_HD static Acc merge(const Acc& a, const Acc& b) {
    return {{a.s[0] + b.s[0], a.s[1] + b.s[1], a.s[2] + b.s[2], a.s[3] + b.s[3]}};
  }
  FR_HD void push(Acc& a, int64_t r, int64_t j, int64_t n, int64_t c) const {
    const int64_t off = r * v.g.len() + j;
    const uint8_t byte = v.mask_mode == 2 ? v.mask[r * v.g.len8() + (j >> 3)] : uint8_t(0);
    const A zz = A(v.z[off]);
    const A gg = v.grad(A(v.dy[off]), zz, c, byte, int(j & 7));
    const A gb = v.factor ? gg * branch_factor(v.factor, v.factor_nc, n, c, v.g.C) : gg;
    a.s[0] += gb;
    a.s[1] += gb * ((zz - v.mean[c]) * v.rstd[c]);
    if (v.skip_mode == 2) {
      a.s[2] += gg;
      a.s[3] += gg * ((A(v.zd[off]) - v.mean_d[c]) * v.rstd_d[c]);
    }
  }
  FR_HD void finalize(int64_t c, const Acc& a) const {
    const int64_t C = v.g.C;
    for (int k = 0; k < 4; ++k) {
      if (k < K) sums[k * C + c] = a.s[k];
      if (coef) coef[k * C + c] = a.s[k] / A(count);
    }
  }
  FR_HD void finalize_nc(int64_t n, int64_t c, const Acc& a) const {
    const int64_t NC = v.g.N * v.g.C;
    for (int k = 0; k < 4; ++k)
      if (k < K) sums[k * NC + n * v.g.C + c] = a.s[k];
  }
};

// ---------------------------------------------------------------------------------------
// Host side: argument checks, layouts, allocation; shared by both backends
// ---------------------------------------------------------------------------------------

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// fusedres.layout.is_channels_last: a tensor contiguous both ways counts as NCHW.
inline bool is_channels_last(const Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat format_of(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::ScalarType stats_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Error messages are built from strings only: streaming a number (an int64, an
// IntArrayRef) into TORCH_CHECK's message crashed the process (SIGSEGV in the ostream's
// locale) with torch 2.11's wheel and an extension built by the system's GCC 13.
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string dtype_str(const Tensor& t) { return c10::toString(t.scalar_type()); }
inline std::string device_str(const Tensor& t) { return t.device().str(); }

// "[2, 8, 3]"
inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline void check_activation(const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D [N, C, H, W], got shape ", shape_str(t));
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   name, " must be float16, bfloat16, float32 or float64, got ", dtype_str(t));
}

inline Geometry geometry(const Tensor& t) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), is_channels_last(t)};
}

// `t` in the given layout; copies only a tensor in neither layout (a strided view).
inline Tensor in_layout(const Tensor& t, bool cl) { return t.contiguous(format_of(cl)); }

// A second activation tensor of the op: same shape, dtype and device as `like`, read in its layout.
inline Tensor same_as(const char* name, const Tensor& t, const Tensor& like, bool cl) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have shape ", shape_str(like),
                    ", got ", shape_str(t));
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have dtype ",
                   dtype_str(like), ", got ", dtype_str(t));
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", device_str(like), ", got ",
                    device_str(t));
  return in_layout(t, cl);
}

// A per-channel [C] (or per-sample [N], or [N, C]) vector in the arithmetic dtype.
inline Tensor vec_in(const char* name, const Tensor& t, int64_t size, at::ScalarType acc,
                     const Tensor& like) {
  TORCH_CHECK_VALUE(t.numel() == size, name, " must have ", num(size), " elements, got shape ",
                    shape_str(t));
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", device_str(like), ", got ",
                    device_str(t));
  return t.reshape({size}).to(acc).contiguous();
}

inline Tensor opt_vec(const char* name, const OptTensor& t, int64_t size, at::ScalarType acc,
                      const Tensor& like) {
  return has(t) ? vec_in(name, *t, size, acc, like) : Tensor();
}

// The branch factor: [N] (stochastic depth) or [N, C] (a gate; nc set), or undefined.
inline Tensor factor_in(const OptTensor& t, const Geometry& g, at::ScalarType acc,
                        const Tensor& like, bool& nc) {
  nc = has(t) && t->dim() == 2;
  if (nc)
    TORCH_CHECK_VALUE(t->size(0) == g.N && t->size(1) == g.C, "factor must have shape [",
                      num(g.N), "] or [", num(g.N), ", ", num(g.C), "], got ", shape_str(*t));
  return opt_vec("factor", t, nc ? g.N * g.C : g.N, acc, like);
}

template <class P>
inline const P* cptr(const Tensor& t) { return t.defined() ? t.const_data_ptr<P>() : nullptr; }
template <class P>
inline P* mptr(const Tensor& t) { return t.defined() ? t.data_ptr<P>() : nullptr; }

inline bool aligned16(const Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

#define FR_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// bn_stats and bn_stats_from_moments around their reductions: the argument checks, the
// batch count, the outputs, the running statistics in A (a copy when stored in another
// dtype) and their write-back.
struct StatsHost {
  bool update, cumulative;
  OptTensor running_mean, running_var, nbt;
  double momentum, eps;
  Tensor mean, rstd, scale, shift;  // [C] outputs in the statistics dtype
  Tensor w, b, rm, rv;              // [C] in the statistics dtype, or undefined

  // Checks everything before it counts the batch: a bad argument changes nothing.
  StatsHost(const char* op, const Tensor& like, int64_t C, at::ScalarType sdt,
            const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean_,
            const OptTensor& running_var_, const OptTensor& nbt_,
            std::optional<double> momentum_, double eps_)
      : update(has(running_mean_)), cumulative(update && !momentum_.has_value()),
        running_mean(running_mean_), running_var(running_var_), nbt(nbt_),
        momentum(momentum_.value_or(0.0)), eps(eps_) {
    TORCH_CHECK_VALUE(!update || has(running_var), op,
                      ": running_var must be given together with running_mean");
    TORCH_CHECK_VALUE(!cumulative || has(nbt), op,
                      ": momentum=None (cumulative average) needs num_batches_tracked");
    if (cumulative) {
      TORCH_CHECK_TYPE(nbt->scalar_type() == at::kLong, "num_batches_tracked must be int64, got ",
                       dtype_str(*nbt));
      TORCH_CHECK_VALUE(nbt->device() == like.device(), "num_batches_tracked must be on ",
                        device_str(like));
    }
    w = opt_vec("weight", weight, C, sdt, like);
    b = opt_vec("bias", bias, C, sdt, like);
    if (update) {
      rm = vec_in("running_mean", *running_mean, C, sdt, like);
      rv = vec_in("running_var", *running_var, C, sdt, like);
    }
    const auto opts = like.options().dtype(sdt).memory_format(at::MemoryFormat::Contiguous);
    mean = at::empty({C}, opts);
    rstd = at::empty({C}, opts);
    scale = at::empty({C}, opts);
    shift = at::empty({C}, opts);
    if (update && has(nbt)) nbt->add_(1);
  }

  template <class A>
  StatsEpilogue<A> epilogue() const {
    return {cptr<A>(w), cptr<A>(b), mptr<A>(rm), mptr<A>(rv),
            cumulative ? nbt->const_data_ptr<int64_t>() : nullptr, A(momentum), A(eps), update,
            cumulative, mptr<A>(mean), mptr<A>(rstd), mptr<A>(scale), mptr<A>(shift)};
  }

  // As PyTorch on an empty batch: statistics untouched, the batch still counted.
  std::tuple<Tensor, Tensor, Tensor, Tensor> empty_batch() const {
    mean.zero_();
    rstd.fill_(1.0);
    scale.zero_();
    shift.zero_();
    return {mean, rstd, scale, shift};
  }

  std::tuple<Tensor, Tensor, Tensor, Tensor> finish() const {
    if (update) {
      if (!rm.is_same(*running_mean)) running_mean->copy_(rm.view(running_mean->sizes()));
      if (!rv.is_same(*running_var)) running_var->copy_(rv.view(running_var->sizes()));
    }
    return {mean, rstd, scale, shift};
  }
};

template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_stats_host(
    const Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps) {
  check_activation("x", x_in);
  const Geometry g = geometry(x_in);
  const Tensor x = in_layout(x_in, g.cl);
  const StatsHost s("bn_stats", x, g.C, stats_dtype(x), weight, bias, running_mean, running_var,
                    num_batches_tracked, momentum, eps);
  if (x.numel() == 0) return s.empty_batch();
  FR_DISPATCH(x.scalar_type(), "fusedres_csrc_ref::bn_stats", [&] {
    using A = at::opmath_type<scalar_t>;
    StatsOp<scalar_t, A, StatsEpilogue<A>> op{g, x.const_data_ptr<scalar_t>(),
                                              s.epilogue<A>()};
    Dev::reduce(op, g, x);
  });
  return s.finish();
}

// bn_pool: mean over H*W per (sample, channel), [N, C] in the statistics dtype (zeros
// where H*W is 0).
template <class Dev>
Tensor bn_pool_host(const Tensor& x_in) {
  check_activation("x", x_in);
  const Geometry g = geometry(x_in);
  const Tensor x = in_layout(x_in, g.cl);
  Tensor pooled = at::empty({g.N, g.C}, x.options().dtype(stats_dtype(x)).memory_format(
                                            at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return pooled.zero_();
  FR_DISPATCH(x.scalar_type(), "fusedres_csrc_ref::bn_pool", [&] {
    using A = at::opmath_type<scalar_t>;
    Dev::sample_reduce(PoolOp<scalar_t, A>{g, x.const_data_ptr<scalar_t>(), mptr<A>(pooled)}, g,
                       x);
  });
  return pooled;
}

// bn_stats_pool: bn_stats, then bn_pool (two passes over x here: csrc_ref is the plain
// baseline; the Triton kernel does both in one).
template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_stats_pool_host(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps) {
  auto [mean, rstd, scale, shift] = bn_stats_host<Dev>(x, weight, bias, running_mean,
                                                       running_var, num_batches_tracked,
                                                       momentum, eps);
  return {mean, rstd, scale, shift, bn_pool_host<Dev>(x)};
}

template <class Dev>
Tensor bn_moments_host(const Tensor& x_in) {
  check_activation("x", x_in);
  const Geometry g = geometry(x_in);
  const Tensor x = in_layout(x_in, g.cl);
  Tensor moments = at::empty({3, g.C}, x.options().dtype(stats_dtype(x)).memory_format(
                                           at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return moments.zero_();
  FR_DISPATCH(x.scalar_type(), "fusedres_csrc_ref::bn_moments", [&] {
    using A = at::opmath_type<scalar_t>;
    StatsOp<scalar_t, A, MomentsOut<A>> op{g, x.const_data_ptr<scalar_t>(),
                                           {mptr<A>(moments), g.C}};
    Dev::reduce(op, g, x);
  });
  return moments;
}

template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_stats_from_moments_host(
    const Tensor& moments_in, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps) {
  TORCH_CHECK_VALUE(moments_in.dim() == 3 && moments_in.size(1) == 3,
                    "moments must have shape [R, 3, C], got ", shape_str(moments_in));
  const auto sdt = moments_in.scalar_type();
  TORCH_CHECK_TYPE(sdt == at::kFloat || sdt == at::kDouble,
                   "moments must be float32 or float64, got ", dtype_str(moments_in));
  const Tensor moments = moments_in.contiguous();
  // Geometry{N = R, C, HW = 1}: see MomentsMergeOp.
  const Geometry g{moments.size(0), moments.size(2), 1, false};
  const StatsHost s("bn_stats_from_moments", moments, g.C, sdt, weight, bias, running_mean,
                    running_var, num_batches_tracked, momentum, eps);
  if (moments.numel() == 0) return s.empty_batch();  // R = 0: no batch at all
  AT_DISPATCH_FLOATING_TYPES(sdt, "fusedres_csrc_ref::bn_stats_from_moments", [&] {
    using A = scalar_t;
    MomentsMergeOp<A> op{moments.const_data_ptr<A>(), g.C, s.epilogue<A>()};
    Dev::reduce(op, g, moments);
  });
  return s.finish();
}

template <class Dev>
std::tuple<Tensor, Tensor> bn_act_fwd_host(
    const Tensor& z_in, const Tensor& scale, const Tensor& shift, const OptTensor& skip,
    const OptTensor& skip_scale, const OptTensor& skip_shift, const OptTensor& factor,
    bool relu_on, bool write_mask) {
  check_activation("z", z_in);
  const Geometry g = geometry(z_in);
  const Tensor z = in_layout(z_in, g.cl);
  const auto sdt = stats_dtype(z);
  Tensor y = at::empty(z.sizes(), z.options().memory_format(format_of(g.cl)));
  Tensor mask = write_mask
      ? at::empty({g.N, g.lines_per_sample(), g.len8()}, z.options().dtype(at::kByte))
      : at::empty({0}, z.options().dtype(at::kByte));
  const int skip_mode = !has(skip) ? 0 : (has(skip_scale) ? 2 : 1);
  TORCH_CHECK_VALUE(skip_mode == 2 || !has(skip_shift),
                    "bn_act_fwd: skip_shift needs skip and skip_scale");
  TORCH_CHECK_VALUE(skip_mode != 2 || has(skip_shift),
                    "bn_act_fwd: skip_scale needs skip_shift");
  if (z.numel() == 0) return {y, mask};
  const Tensor sk = skip_mode ? same_as("skip", *skip, z, g.cl) : Tensor();
  const Tensor sc = vec_in("scale", scale, g.C, sdt, z), sh = vec_in("shift", shift, g.C, sdt, z);
  const Tensor ssc = skip_mode == 2 ? vec_in("skip_scale", *skip_scale, g.C, sdt, z) : Tensor();
  const Tensor ssh = skip_mode == 2 ? vec_in("skip_shift", *skip_shift, g.C, sdt, z) : Tensor();
  bool f_nc = false;
  const Tensor f = factor_in(factor, g, sdt, z, f_nc);
  const bool vec = g.len() % 8 == 0 && aligned16(z) && aligned16(y) && aligned16(sk);
  FR_DISPATCH(z.scalar_type(), "fusedres_csrc_ref::bn_act_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    FwdView<scalar_t, A> v{g, z.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                           cptr<A>(sc), cptr<A>(sh), skip_mode,
                           sk.defined() ? sk.const_data_ptr<scalar_t>() : nullptr,
                           cptr<A>(ssc), cptr<A>(ssh), cptr<A>(f), f_nc, relu_on,
                           write_mask ? mask.data_ptr<uint8_t>() : nullptr, vec};
    Dev::groups(v, g, z);
  });
  return {y, mask};
}


// The inputs that bn_act_bwd, bn_act_bwd_reduce and bn_act_bwd_apply share, checked and in
// z's layout (nothing past z and dy when z is empty: nothing is read then).
struct BwdArgs {
  Geometry g;
  int mask_mode, skip_mode;
  bool factor_nc = false;
  at::ScalarType sdt;
  Tensor z, dy, zd, mask;
  Tensor mean, rstd, scale, shift, factor, mean_d, rstd_d, scale_d;  // in sdt

  // scale_d: null for bn_act_bwd_reduce, which takes none.
  BwdArgs(const char* op, const Tensor& dy_in, const Tensor& z_in, const Tensor& mean_in,
          const Tensor& rstd_in, const Tensor& scale_in, const Tensor& shift_in,
          const OptTensor& mask_in, int64_t mask_mode_, const OptTensor& factor_in,
          int64_t skip_mode_, const OptTensor& zd_in, const OptTensor& mean_d_in,
          const OptTensor& rstd_d_in, const OptTensor* scale_d_in) {
    check_activation("z", z_in);
    TORCH_CHECK_VALUE(mask_mode_ >= 0 && mask_mode_ <= 2, "mask_mode must be 0, 1 or 2, got ",
                      num(mask_mode_));
    TORCH_CHECK_VALUE(skip_mode_ >= 0 && skip_mode_ <= 2, "skip_mode must be 0, 1 or 2, got ",
                      num(skip_mode_));
    mask_mode = int(mask_mode_);
    skip_mode = int(skip_mode_);
    g = geometry(z_in);
    z = in_layout(z_in, g.cl);
    dy = same_as("dy", dy_in, z, g.cl);
    sdt = stats_dtype(z);
    const bool skip_bn = skip_mode == 2;
    if (skip_bn) {
      TORCH_CHECK_VALUE(has(zd_in) && has(mean_d_in) && has(rstd_d_in) &&
                            (!scale_d_in || has(*scale_d_in)),
                        op, ": skip_mode 2 needs ",
                        scale_d_in ? "zd, mean_d, rstd_d and scale_d" : "zd, mean_d and rstd_d");
    }
    if (z.numel() == 0) return;
    if (skip_bn) zd = same_as("zd", *zd_in, z, g.cl);
    if (mask_mode == 2) {
      TORCH_CHECK_VALUE(has(mask_in), op, ": mask_mode 2 needs the packed mask");
      TORCH_CHECK_TYPE(mask_in->scalar_type() == at::kByte, "mask must be uint8, got ",
                       dtype_str(*mask_in));
      TORCH_CHECK_VALUE(mask_in->numel() == g.rows() * g.len8(), "mask must have shape [",
                        num(g.N), ", ", num(g.lines_per_sample()), ", ", num(g.len8()),
                        "], got ", shape_str(*mask_in));
      TORCH_CHECK_VALUE(mask_in->device() == z.device(), "mask must be on ", device_str(z));
      mask = mask_in->contiguous();
    }
    const int64_t C = g.C;
    mean = vec_in("mean", mean_in, C, sdt, z);
    rstd = vec_in("rstd", rstd_in, C, sdt, z);
    scale = vec_in("scale", scale_in, C, sdt, z);
    shift = vec_in("shift", shift_in, C, sdt, z);
    factor = fusedres_ref::factor_in(factor_in, g, sdt, z, factor_nc);
    if (skip_bn) {
      mean_d = vec_in("mean_d", *mean_d_in, C, sdt, z);
      rstd_d = vec_in("rstd_d", *rstd_d_in, C, sdt, z);
      if (scale_d_in) scale_d = vec_in("scale_d", **scale_d_in, C, sdt, z);
    }
  }

  bool empty() const { return z.numel() == 0; }
  int K() const { return skip_mode == 2 ? 4 : 2; }  // rows of the sums
  Tensor new_sums(int64_t rows) const { return at::empty({rows, g.C}, z.options().dtype(sdt)); }
  Tensor new_activation() const {
    return at::empty(z.sizes(), z.options().memory_format(format_of(g.cl)));
  }
  Tensor new_dskip() const { return skip_mode ? new_activation() : at::empty({0}, z.options()); }

  // coef: [4, C] sums / M (null without batch statistics); dz, dskip: null for the
  // reduction, which writes neither; du_add: [N, C] in sdt, or undefined.
  template <class T, class A>
  BwdView<T, A> view(const Tensor& coef, bool batch_stats, bool batch_stats_d,
                     const Tensor& dz_add, const Tensor& dz, const Tensor& dskip,
                     const Tensor& du_add = Tensor()) const {
    const bool vec = g.len() % 8 == 0 && aligned16(dy) && aligned16(z) && aligned16(zd) &&
                     aligned16(dz_add) && aligned16(dz) && aligned16(dskip);
    return {g, dy.const_data_ptr<T>(), z.const_data_ptr<T>(), cptr<A>(mean), cptr<A>(rstd),
            cptr<A>(scale), cptr<A>(shift), mask_mode, cptr<uint8_t>(mask), cptr<A>(factor),
            factor_nc, skip_mode, cptr<T>(zd), cptr<A>(mean_d), cptr<A>(rstd_d),
            cptr<A>(scale_d), cptr<A>(coef), batch_stats, skip_mode == 2 && batch_stats_d,
            cptr<T>(dz_add), cptr<A>(du_add), mptr<T>(dz), skip_mode ? mptr<T>(dskip) : nullptr,
            vec};
  }

  // The per-channel sums into `sums` [K, C] and, when coef is defined, sums / M into it;
  // per_sample: the sums over H*W only into `sums` [K, N, C].
  template <class Dev, class T, class A>
  void reduce(const BwdView<T, A>& v, const Tensor& sums, const Tensor& coef,
              bool per_sample = false) const {
    GradSumOp<T, A> op{v, K(), g.rows() * g.len() / g.C, mptr<A>(sums), mptr<A>(coef)};
    if (per_sample) Dev::sample_reduce(op, g, z);
    else Dev::reduce(op, g, z);
  }
};

template <class Dev>
std::tuple<Tensor, Tensor, Tensor> bn_act_bwd_host(
    const Tensor& dy, const Tensor& z, const Tensor& mean, const Tensor& rstd,
    const Tensor& scale, const Tensor& shift, const OptTensor& mask, int64_t mask_mode,
    const OptTensor& factor, int64_t skip_mode, const OptTensor& zd, const OptTensor& mean_d,
    const OptTensor& rstd_d, const OptTensor& scale_d, bool batch_stats, bool batch_stats_d,
    bool need_sums, const OptTensor& dz_add_in) {
  const BwdArgs a("bn_act_bwd", dy, z, mean, rstd, scale, shift, mask, mask_mode, factor,
                  skip_mode, zd, mean_d, rstd_d, &scale_d);
  const bool reduce = batch_stats || need_sums || (a.skip_mode == 2 && batch_stats_d);
  Tensor dz = a.new_activation(), dskip = a.new_dskip();
  Tensor sums = reduce ? a.new_sums(a.K()) : at::empty({0}, a.z.options().dtype(a.sdt));
  if (a.empty()) return {dz, dskip, sums.zero_()};
  const Tensor dz_add = has(dz_add_in) ? same_as("dz_add", *dz_add_in, a.z, a.g.cl) : Tensor();
  const Tensor coef = reduce ? a.new_sums(4) : Tensor();
  FR_DISPATCH(a.z.scalar_type(), "fusedres_csrc_ref::bn_act_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto v = a.view<scalar_t, A>(coef, batch_stats, batch_stats_d, dz_add, dz, dskip);
    if (reduce) a.reduce<Dev>(v, sums, coef);
    Dev::groups(v, a.g, a.z);
  });
  return {dz, dskip, sums};
}

template <class Dev>
Tensor bn_act_bwd_reduce_host(
    const Tensor& dy, const Tensor& z, const Tensor& mean, const Tensor& rstd,
    const Tensor& scale, const Tensor& shift, const OptTensor& mask, int64_t mask_mode,
    const OptTensor& factor, int64_t skip_mode, const OptTensor& zd, const OptTensor& mean_d,
    const OptTensor& rstd_d, bool per_sample) {
  const BwdArgs a("bn_act_bwd_reduce", dy, z, mean, rstd, scale, shift, mask, mask_mode, factor,
                  skip_mode, zd, mean_d, rstd_d, nullptr);
  Tensor sums = per_sample ? at::empty({a.K(), a.g.N, a.g.C}, a.z.options().dtype(a.sdt))
                           : a.new_sums(a.K());
  if (a.empty()) return sums.zero_();
  FR_DISPATCH(a.z.scalar_type(), "fusedres_csrc_ref::bn_act_bwd_reduce", [&] {
    using A = at::opmath_type<scalar_t>;
    a.reduce<Dev>(a.view<scalar_t, A>(Tensor(), false, false, Tensor(), Tensor(), Tensor()),
                  sums, Tensor(), per_sample);
  });
  return sums;
}

template <class Dev>
std::tuple<Tensor, Tensor> bn_act_bwd_apply_host(
    const Tensor& dy, const Tensor& z, const Tensor& mean, const Tensor& rstd,
    const Tensor& scale, const Tensor& shift, const OptTensor& mask, int64_t mask_mode,
    const OptTensor& factor, int64_t skip_mode, const OptTensor& zd, const OptTensor& mean_d,
    const OptTensor& rstd_d, const OptTensor& scale_d, bool batch_stats, bool batch_stats_d,
    const OptTensor& dz_add_in, const Tensor& mean_sums, const OptTensor& du_add_in) {
  const BwdArgs a("bn_act_bwd_apply", dy, z, mean, rstd, scale, shift, mask, mask_mode, factor,
                  skip_mode, zd, mean_d, rstd_d, &scale_d);
  Tensor dz = a.new_activation(), dskip = a.new_dskip();
  if (a.empty()) return {dz, dskip};
  const Tensor dz_add = has(dz_add_in) ? same_as("dz_add", *dz_add_in, a.z, a.g.cl) : Tensor();
  if (has(du_add_in))
    TORCH_CHECK_VALUE(du_add_in->dim() == 2 && du_add_in->size(0) == a.g.N &&
                          du_add_in->size(1) == a.g.C,
                      "du_add must have shape [", num(a.g.N), ", ", num(a.g.C), "], got ",
                      shape_str(*du_add_in));
  const Tensor du_add = opt_vec("du_add", du_add_in, a.g.N * a.g.C, a.sdt, a.z);
  // Rows 0-1 are read with batch_stats, rows 2-3 with the projection's batch_stats_d.
  const int64_t rows = a.skip_mode == 2 && batch_stats_d ? 4 : batch_stats ? 2 : 0;
  Tensor coef;
  if (rows) {
    TORCH_CHECK_VALUE(mean_sums.dim() == 2 && mean_sums.size(0) >= rows &&
                          mean_sums.size(1) == a.g.C,
                      "mean_sums must have shape [", num(rows), ", ", num(a.g.C), "], got ",
                      shape_str(mean_sums));
    TORCH_CHECK_TYPE(mean_sums.is_floating_point(), "mean_sums must be floating point, got ",
                     dtype_str(mean_sums));
    TORCH_CHECK_VALUE(mean_sums.device() == a.z.device(), "mean_sums must be on ",
                      device_str(a.z), ", got ", device_str(mean_sums));
    coef = mean_sums.to(a.sdt).contiguous();
  }
  FR_DISPATCH(a.z.scalar_type(), "fusedres_csrc_ref::bn_act_bwd_apply", [&] {
    using A = at::opmath_type<scalar_t>;
    Dev::groups(a.view<scalar_t, A>(coef, batch_stats, batch_stats_d, dz_add, dz, dskip, du_add),
                a.g, a.z);
  });
  return {dz, dskip};
}

}  // namespace fusedres_ref
