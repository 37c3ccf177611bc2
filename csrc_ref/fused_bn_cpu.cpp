// fusedres csrc_ref, CPU backend (OpenMP), and the definition of the op schemas.
//
// The ops live in the torch.library namespace `fusedres_csrc_ref`; this library defines
// them and registers the CPU kernels, fused_bn_cuda.cu (a separate library, loaded after
// this one) registers the CUDA kernels, and the dispatcher picks by the tensors' device.
// The arithmetic, the argument checks and the allocation are shared (fused_bn.h); this file
// only says how the CPU walks the data.
#include "fused_bn.h"

#include <algorithm>
#include <vector>

#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fusedres_ref {
namespace {

struct CpuDev {
  // channels_last reductions: one partial per chunk of this many lines (positions), each
  // accumulating C channels side by side. A fixed partition, independent of the thread
  // count, so the result is the same on every machine and every run.
  static constexpr int64_t kLinesPerChunk = 64;
  // Below this many elements a parallel region costs more than it saves (and, with another
  // process on the cores, an OpenMP barrier can wait out a scheduler quantum): run serially.
  static constexpr int64_t kMinParallelElements = int64_t(1) << 15;

  template <class Op>
  static void reduce(const Op& op, const Geometry& g, const Tensor& /*like*/) {
    using Acc = typename Op::Acc;
    const int64_t C = g.C, L = g.len(), rows = g.rows();
    const int64_t P = g.cl ? (rows + kLinesPerChunk - 1) / kLinesPerChunk : g.N;
    std::vector<Acc> part(static_cast<size_t>(C * P));  // [C, P]
    const bool big = rows * L >= kMinParallelElements;
    if (!g.cl) {
      // NCHW: a line is one (sample, channel) plane; its partial is (channel, sample).
#pragma omp parallel for schedule(static) if (big)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r / C, c = r % C;
        Acc a = Op::zero();
        for (int64_t j = 0; j < L; ++j) op.push(a, r, j, n, c);
        part[c * P + n] = a;
      }
    } else {
#pragma omp parallel if (big)
      {
        std::vector<Acc> acc(static_cast<size_t>(C));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; ++p) {
          std::fill(acc.begin(), acc.end(), Op::zero());
          const int64_t r_end = std::min(rows, (p + 1) * kLinesPerChunk);
          for (int64_t r = p * kLinesPerChunk; r < r_end; ++r) {
            const int64_t n = r / g.HW;
            for (int64_t c = 0; c < C; ++c) op.push(acc[c], r, c, n, c);
          }
          for (int64_t c = 0; c < C; ++c) part[c * P + p] = acc[c];
        }
      }
    }
    // Merge each channel's partials in index order.
#pragma omp parallel for schedule(static) if (big)
    for (int64_t c = 0; c < C; ++c) {
      Acc a = part[c * P];
      for (int64_t p = 1; p < P; ++p) a = Op::merge(a, part[c * P + p]);
      op.finalize(c, a);
    }
  }

  // Per (sample, channel), positions in order: one (n, c) per iteration, so the result does
  // not depend on the thread count.
  template <class Op>
  static void sample_reduce(const Op& op, const Geometry& g, const Tensor& /*like*/) {
    const int64_t NC = g.N * g.C;
#pragma omp parallel for schedule(static) if (NC * g.HW >= kMinParallelElements)
    for (int64_t i = 0; i < NC; ++i) reduce_sample_channel(op, g, i);
  }

  template <class View>
  static void groups(const View& v, const Geometry& g, const Tensor& /*like*/) {
    const int64_t rows = g.rows(), L8 = g.len8();
#pragma omp parallel for schedule(static) if (rows * L8 * 8 >= kMinParallelElements)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j8 = 0; j8 < L8; ++j8) v.group(r, j8);
  }
};

}  // namespace
}  // namespace fusedres_ref

TORCH_LIBRARY(fusedres_csrc_ref, m) {
  m.def(
      "bn_stats(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_fwd(Tensor z, Tensor scale, Tensor shift, Tensor? skip, Tensor? skip_scale, "
      "Tensor? skip_shift, Tensor? factor, bool relu, bool write_mask) -> (Tensor, Tensor)");
  m.def(
      "bn_act_bwd(Tensor dy, Tensor z, Tensor mean, Tensor rstd, Tensor scale, Tensor shift, "
      "Tensor? mask, int mask_mode, Tensor? factor, int skip_mode, Tensor? zd, Tensor? mean_d, "
      "Tensor? rstd_d, Tensor? scale_d, bool batch_stats, bool batch_stats_d, bool need_sums, "
      "Tensor? dz_add) -> (Tensor, Tensor, Tensor)");
  // The pieces of bn_stats and bn_act_bwd that synchronised batch norm runs around its
  // all-reduces of the moments and of the sums.
  m.def("bn_moments(Tensor x) -> Tensor");
  // A squeeze-excite / ECA gate's pooled input: bn_stats plus mean_hw x [N, C], and the
  // pooling alone (eval).
  m.def(
      "bn_stats_pool(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_pool(Tensor x) -> Tensor");
  m.def(
      "bn_stats_from_moments(Tensor moments, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "float? momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_bwd_reduce(Tensor dy, Tensor z, Tensor mean, Tensor rstd, Tensor scale, "
      "Tensor shift, Tensor? mask, int mask_mode, Tensor? factor, int skip_mode, Tensor? zd, "
      "Tensor? mean_d, Tensor? rstd_d, bool per_sample=False) -> Tensor");
  m.def(
      "bn_act_bwd_apply(Tensor dy, Tensor z, Tensor mean, Tensor rstd, Tensor scale, "
      "Tensor shift, Tensor? mask, int mask_mode, Tensor? factor, int skip_mode, Tensor? zd, "
      "Tensor? mean_d, Tensor? rstd_d, Tensor? scale_d, bool batch_stats, bool batch_stats_d, "
      "Tensor? dz_add, Tensor mean_sums, Tensor? du_add=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedres_csrc_ref, CPU, m) {
  using fusedres_ref::CpuDev;
  m.impl("bn_stats", TORCH_FN(fusedres_ref::bn_stats_host<CpuDev>));
  m.impl("bn_act_fwd", TORCH_FN(fusedres_ref::bn_act_fwd_host<CpuDev>));
  m.impl("bn_act_bwd", TORCH_FN(fusedres_ref::bn_act_bwd_host<CpuDev>));
  m.impl("bn_moments", TORCH_FN(fusedres_ref::bn_moments_host<CpuDev>));
  m.impl("bn_stats_pool", TORCH_FN(fusedres_ref::bn_stats_pool_host<CpuDev>));
  m.impl("bn_pool", TORCH_FN(fusedres_ref::bn_pool_host<CpuDev>));
  m.impl("bn_stats_from_moments", TORCH_FN(fusedres_ref::bn_stats_from_moments_host<CpuDev>));
  m.impl("bn_act_bwd_reduce", TORCH_FN(fusedres_ref::bn_act_bwd_reduce_host<CpuDev>));
  m.impl("bn_act_bwd_apply", TORCH_FN(fusedres_ref::bn_act_bwd_apply_host<CpuDev>));
}
