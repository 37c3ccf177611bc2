// fusedres csrc_ref, CUDA backend: registers CUDA kernels for the ops that
// fused_bn_cpu.cpp defines (load that library first).
//
// Everything but the traversal is shared with the CPU (fused_bn.h). Reductions are two
// kernels and no atomics, so every run gives the same bits:
//   channel_partials_kernel: NCHW, one warp per (plane, segment of kSegment positions),
//     lanes strided along the contiguous positions (coalesced); channels_last, a block of
//     32 channel lanes x 8 warps over a chunk of kLinesPerChunk positions. One partial per
//     warp or block and channel, merged inside the warp by a fixed shuffle tree.
//   channel_finalize_kernel: one warp per channel merges its partials (lane-strided, then
//     the same shuffle tree) and runs the op's per-channel epilogue, which for bn_stats (and
//     bn_stats_from_moments) also updates the running statistics (num_batches_tracked is
//     read here, no host sync).
// Elementwise passes: one thread per 8-element group (one mask byte), 16-byte vector loads
// when the line length is a multiple of 8.
#include "fused_bn.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fusedres_ref {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int64_t kSegment = 2048;        // NCHW: positions per warp partial
constexpr int64_t kLinesPerChunk = 256;   // channels_last: positions per block partial

// Field-wise shuffles of the two accumulators (a memcpy through an int array would go
// through local memory).
template <class A>
__device__ __forceinline__ Welford<A> shfl_down(const Welford<A>& v, int delta) {
  return {static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(v.n), delta)),
          __shfl_down_sync(0xffffffffu, v.mean, delta), __shfl_down_sync(0xffffffffu, v.m2, delta)};
}

template <class A>
__device__ __forceinline__ Sums<A> shfl_down(const Sums<A>& v, int delta) {
  Sums<A> out;
#pragma unroll
  for (int i = 0; i < 4; ++i) out.s[i] = __shfl_down_sync(0xffffffffu, v.s[i], delta);
  return out;
}

// Lane 0 ends with the merge of all 32 lanes, always in the same tree order.
template <class Op>
__device__ __forceinline__ typename Op::Acc warp_merge(typename Op::Acc a) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) a = Op::merge(a, shfl_down(a, d));
  return a;
}

template <class Op>
__global__ void __launch_bounds__(kThreads)
channel_partials_kernel(const Op op, const Geometry g, const int64_t segs,
                        typename Op::Acc* __restrict__ part,  // [C, P]
                        const int64_t P) {
  using Acc = typename Op::Acc;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (!g.cl) {
    const int64_t w = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
    if (w >= g.rows() * segs) return;  // whole warps leave together
    const int64_t r = w / segs, sg = w % segs, n = r / g.C, c = r % g.C;
    const int64_t j_end = min(g.len(), (sg + 1) * kSegment);
    Acc a = Op::zero();
    for (int64_t j = sg * kSegment + lane; j < j_end; j += kWarp) op.push(a, r, j, n, c);
    a = warp_merge<Op>(a);
    if (lane == 0) part[c * P + n * segs + sg] = a;
  } else {
    __shared__ Acc tile[kWarpsPerBlock][kWarp];
    const int64_t c = int64_t(blockIdx.y) * kWarp + lane, p = blockIdx.x;
    const int64_t r_end = min(g.rows(), (p + 1) * kLinesPerChunk);
    Acc a = Op::zero();
    if (c < g.C)
      for (int64_t r = p * kLinesPerChunk + warp; r < r_end; r += kWarpsPerBlock)
        op.push(a, r, c, r / g.HW, c);
    tile[warp][lane] = a;
    __syncthreads();
    if (warp == 0 && c < g.C) {
      for (int i = 1; i < kWarpsPerBlock; ++i) a = Op::merge(a, tile[i][lane]);
      part[c * P + p] = a;
    }
  }
}

template <class Op>
__global__ void __launch_bounds__(kThreads)
channel_finalize_kernel(const Op op, const typename Op::Acc* __restrict__ part,
                        const int64_t P, const int64_t C) {
  using Acc = typename Op::Acc;
  const int lane = threadIdx.x % kWarp;
  const int64_t c = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (c >= C) return;
  Acc a = Op::zero();
  for (int64_t p = lane; p < P; p += kWarp) a = Op::merge(a, part[c * P + p]);
  a = warp_merge<Op>(a);
  if (lane == 0) op.finalize(c, a);
}

// One thread per (sample, channel), positions in order (consecutive threads are
// consecutive channels: coalesced in channels_last, strided in NCHW; a plain baseline).
template <class Op>
__global__ void __launch_bounds__(kThreads)
sample_reduce_kernel(const Op op, const Geometry g) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < g.N * g.C) reduce_sample_channel(op, g, i);
}

template <class View>
__global__ void __launch_bounds__(kThreads)
groups_kernel(const View v, const int64_t L8, const int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x)
    v.group(i / L8, i % L8);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct CudaDev {
  template <class Op>
  static void reduce(const Op& op, const Geometry& g, const Tensor& like) {
    using Acc = typename Op::Acc;
    const c10::cuda::CUDAGuard guard(like.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t segs = g.cl ? 1 : ceil_div(g.len(), kSegment);
    const int64_t P = g.cl ? ceil_div(g.rows(), kLinesPerChunk) : g.N * segs;
    const Tensor buf = at::empty({g.C * P * int64_t(sizeof(Acc))}, like.options().dtype(at::kByte));
    Acc* part = reinterpret_cast<Acc*>(buf.data_ptr<uint8_t>());
    if (!g.cl) {
      const dim3 grid(unsigned(ceil_div(g.rows() * segs, kWarpsPerBlock)));
      channel_partials_kernel<Op><<<grid, kThreads, 0, stream>>>(op, g, segs, part, P);
    } else {
      const dim3 grid(unsigned(P), unsigned(ceil_div(g.C, kWarp)));
      channel_partials_kernel<Op><<<grid, kThreads, 0, stream>>>(op, g, segs, part, P);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_finalize_kernel<Op><<<unsigned(ceil_div(g.C, kWarpsPerBlock)), kThreads, 0, stream>>>(
        op, part, P, g.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <class Op>
  static void sample_reduce(const Op& op, const Geometry& g, const Tensor& like) {
    const c10::cuda::CUDAGuard guard(like.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t blocks = ceil_div(g.N * g.C, kThreads);
    sample_reduce_kernel<Op><<<unsigned(blocks), kThreads, 0, stream>>>(op, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <class View>
  static void groups(const View& v, const Geometry& g, const Tensor& like) {
    const c10::cuda::CUDAGuard guard(like.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t L8 = g.len8(), total = g.rows() * L8;
    // grid-stride loop: cap the grid, the loop covers the rest
    const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), int64_t(1) << 20);
    groups_kernel<View><<<unsigned(blocks), kThreads, 0, stream>>>(v, L8, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace fusedres_ref

TORCH_LIBRARY_IMPL(fusedres_csrc_ref, CUDA, m) {
  using fusedres_ref::CudaDev;
  m.impl("bn_stats", TORCH_FN(fusedres_ref::bn_stats_host<CudaDev>));
  m.impl("bn_act_fwd", TORCH_FN(fusedres_ref::bn_act_fwd_host<CudaDev>));
  m.impl("bn_act_bwd", TORCH_FN(fusedres_ref::bn_act_bwd_host<CudaDev>));
  m.impl("bn_moments", TORCH_FN(fusedres_ref::bn_moments_host<CudaDev>));
  m.impl("bn_stats_pool", TORCH_FN(fusedres_ref::bn_stats_pool_host<CudaDev>));
  m.impl("bn_pool", TORCH_FN(fusedres_ref::bn_pool_host<CudaDev>));
  m.impl("bn_stats_from_moments", TORCH_FN(fusedres_ref::bn_stats_from_moments_host<CudaDev>));
  m.impl("bn_act_bwd_reduce", TORCH_FN(fusedres_ref::bn_act_bwd_reduce_host<CudaDev>));
  m.impl("bn_act_bwd_apply", TORCH_FN(fusedres_ref::bn_act_bwd_apply_host<CudaDev>));
}
