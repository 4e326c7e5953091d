// atax::gram on CUDA: one launch over all chunks of all tensors, then a fixed-order reduction.
//
// Stage 1 (one block per chunk, kThreads threads): for every segment of the chunk, each thread
// accumulates the m*(m+1)/2 products (upper triangle) of its elements in fp32 (bf16/fp16 upcast on
// load), the block reduces them in fp64 in a fixed order, and writes one fp64 partial per segment.
//   - m <= 8: register path, 16-byte vector loads on the aligned path, scalar tail.
//   - 9 <= m <= 64: shared-memory tiles of kTile elements of all m vectors; thread p owns pairs
//     p, p + kThreads, ... and keeps an fp64 accumulator for each (fp32 dot per tile).
// Stage 2: per tensor (per_tensor) or over all segments, one thread per pair sums the partials of the
// segments in index order. No atomics anywhere: the same bits on every run.
#include <torch/library.h>

#include "multi_tensor.cuh"

namespace atax {
namespace cuda {
namespace {

constexpr int kMaxM = 64;
constexpr int kTile = 128;

template <int M>
__global__ void __launch_bounds__(kThreads) gram_small_kernel(TableView tv, double* __restrict__ partials) {
  constexpr int P = M * (M + 1) / 2;
  constexpr int kWarps = kThreads / 32;
  __shared__ double red[kWarps][P];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int c = blockIdx.x;
  const int s_begin = tv.chunk_seg[c];
  const int s_end = tv.chunk_seg[c + 1];
  for (int s = s_begin; s < s_end; ++s) {
    const int t = tv.seg_tensor[s];
    const int64_t start = tv.seg_start[s];
    const int64_t len = tv.seg_len[s];
    const void* base[M];
    int8_t dt[M];
    bool aligned = true;
#pragma unroll
    for (int j = 0; j < M; ++j) {
      base[j] = reinterpret_cast<const void*>(tv.ptrs[static_cast<int64_t>(j) * tv.n + t]);
      dt[j] = tv.dtypes[static_cast<int64_t>(j) * tv.n + t];
      aligned = aligned && aligned16(base[j], dt[j], start);
    }
    float acc[P];
#pragma unroll
    for (int p = 0; p < P; ++p) acc[p] = 0.f;

    int64_t scalar_from = 0;
    if (aligned) {
      const int64_t len8 = len & ~static_cast<int64_t>(kVec - 1);
      for (int64_t i = static_cast<int64_t>(tid) * kVec; i < len8; i += static_cast<int64_t>(kThreads) * kVec) {
        float x[M][kVec];
#pragma unroll
        for (int j = 0; j < M; ++j) load8(base[j], dt[j], start + i, x[j]);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          int p = 0;
#pragma unroll
          for (int a = 0; a < M; ++a) {
#pragma unroll
            for (int b = a; b < M; ++b) {
              acc[p] = fmaf(x[a][e], x[b][e], acc[p]);
              ++p;
            }
          }
        }
      }
      scalar_from = len8;
    }
    for (int64_t i = scalar_from + tid; i < len; i += kThreads) {
      float x[M];
#pragma unroll
      for (int j = 0; j < M; ++j) x[j] = load1(base[j], dt[j], start + i);
      int p = 0;
#pragma unroll
      for (int a = 0; a < M; ++a) {
#pragma unroll
        for (int b = a; b < M; ++b) {
          acc[p] = fmaf(x[a], x[b], acc[p]);
          ++p;
        }
      }
    }

    // Block reduction in fp64, fixed order: warp tree, then warps in index order.
#pragma unroll
    for (int p = 0; p < P; ++p) {
      double v = static_cast<double>(acc[p]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
      if (lane == 0) red[warp][p] = v;
    }
    __syncthreads();
    for (int p = tid; p < P; p += kThreads) {
      double v = 0.0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += red[w][p];
      partials[static_cast<int64_t>(s) * P + p] = v;
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) gram_generic_kernel(TableView tv, int m, double* __restrict__ partials) {
  constexpr int kMaxPairsPerThread = (kMaxM * (kMaxM + 1) / 2 + kThreads - 1) / kThreads;
  __shared__ float tile[kMaxM * (kTile + 1)];
  __shared__ uint8_t pa[kMaxM * (kMaxM + 1) / 2];
  __shared__ uint8_t pb[kMaxM * (kMaxM + 1) / 2];
  __shared__ const void* base[kMaxM];
  __shared__ int8_t dt[kMaxM];
  const int tid = threadIdx.x;
  const int P = m * (m + 1) / 2;
  for (int p = tid; p < P; p += kThreads) {
    int a = 0, rem = p;
    while (rem >= m - a) { rem -= m - a; ++a; }
    pa[p] = static_cast<uint8_t>(a);
    pb[p] = static_cast<uint8_t>(a + rem);
  }
  const int c = blockIdx.x;
  const int s_begin = tv.chunk_seg[c];
  const int s_end = tv.chunk_seg[c + 1];
  for (int s = s_begin; s < s_end; ++s) {
    const int t = tv.seg_tensor[s];
    const int64_t start = tv.seg_start[s];
    const int64_t len = tv.seg_len[s];
    if (tid < m) {
      base[tid] = reinterpret_cast<const void*>(tv.ptrs[static_cast<int64_t>(tid) * tv.n + t]);
      dt[tid] = tv.dtypes[static_cast<int64_t>(tid) * tv.n + t];
    }
    __syncthreads();
    double acc[kMaxPairsPerThread];
#pragma unroll
    for (int r = 0; r < kMaxPairsPerThread; ++r) acc[r] = 0.0;
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kTile), len - t0));
      for (int q = tid; q < m * kTile; q += kThreads) {
        const int j = q / kTile;
        const int e = q - j * kTile;
        tile[j * (kTile + 1) + e] = e < cnt ? load1(base[j], dt[j], start + t0 + e) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kMaxPairsPerThread; ++r) {
        const int p = tid + r * kThreads;
        if (p < P) {
          const float* xa = tile + pa[p] * (kTile + 1);
          const float* xb = tile + pb[p] * (kTile + 1);
          float d = 0.f;
#pragma unroll 8
          for (int e = 0; e < kTile; ++e) d = fmaf(xa[e], xb[e], d);
          acc[r] += static_cast<double>(d);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kMaxPairsPerThread; ++r) {
      const int p = tid + r * kThreads;
      if (p < P) partials[static_cast<int64_t>(s) * P + p] = acc[r];
    }
  }
}

// grid: n blocks (per_tensor) or 1 block. Thread p sums partials[seg][p] over the segments in order.
__global__ void __launch_bounds__(kThreads) gram_reduce_kernel(TableView tv, int m, bool per_tensor,
                                                               const double* __restrict__ partials,
                                                               double* __restrict__ out) {
  const int P = m * (m + 1) / 2;
  const int i = blockIdx.x;
  const int s0 = per_tensor ? tv.tensor_seg[i] : 0;
  const int s1 = per_tensor ? tv.tensor_seg[i + 1] : tv.num_segs;
  double* o = out + (per_tensor ? static_cast<int64_t>(i) * m * m : 0);
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    double v = 0.0;
    for (int s = s0; s < s1; ++s) v += partials[static_cast<int64_t>(s) * P + p];
    int a = 0, rem = p;
    while (rem >= m - a) { rem -= m - a; ++a; }
    const int b = a + rem;
    o[a * m + b] = v;
    o[b * m + a] = v;
  }
}

at::Tensor gram_cuda(at::TensorList vectors, int64_t m, bool per_tensor) {
  TORCH_CHECK(m >= 1 && m <= kMaxM, "atax::gram (CUDA): m must be in [1, ", kMaxM, "], got ", m);
  TORCH_CHECK(!vectors.empty() && vectors.size() % m == 0,
              "atax::gram (CUDA): len(vectors) must be a positive multiple of m");
  const int64_t n = static_cast<int64_t>(vectors.size()) / m;
  const auto device = vectors[0].device();
  TORCH_CHECK(device.is_cuda(), "atax::gram (CUDA): tensors must be on a CUDA device");
  c10::cuda::CUDAGuard guard(device);

  std::vector<std::vector<at::Tensor>> lists(m);
  for (int64_t j = 0; j < m; ++j) {
    lists[j].reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& v = vectors[j * n + i];
      TORCH_CHECK(v.device() == device, "atax::gram (CUDA): all tensors must be on one device");
      TORCH_CHECK(v.numel() == vectors[i].numel(), "atax::gram (CUDA): numel mismatch for tensor ", i);
      lists[j].push_back(as_contig(v));
    }
  }
  auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  auto out = per_tensor ? at::empty({n, m, m}, opts) : at::empty({m, m}, opts);
  auto entry = get_table(lists);
  const TableView& tv = entry->view;
  if (tv.num_segs == 0) {
    out.zero_();
    return out;
  }
  const int64_t P = m * (m + 1) / 2;
  auto partials = at::empty({static_cast<int64_t>(tv.num_segs) * P}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(tv.num_chunks));
  double* pp = partials.data_ptr<double>();
  switch (m) {
#define ATAX_GRAM_CASE(M)                                                   \
  case M:                                                                   \
    gram_small_kernel<M><<<grid, kThreads, 0, stream>>>(tv, pp);            \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                         \
    break;
    ATAX_GRAM_CASE(1)
    ATAX_GRAM_CASE(2)
    ATAX_GRAM_CASE(3)
    ATAX_GRAM_CASE(4)
    ATAX_GRAM_CASE(5)
    ATAX_GRAM_CASE(6)
    ATAX_GRAM_CASE(7)
    ATAX_GRAM_CASE(8)
#undef ATAX_GRAM_CASE
    default:
      gram_generic_kernel<<<grid, kThreads, 0, stream>>>(tv, static_cast<int>(m), pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  gram_reduce_kernel<<<per_tensor ? static_cast<unsigned>(n) : 1u, kThreads, 0, stream>>>(
      tv, static_cast<int>(m), per_tensor, pp, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Keep the inputs (contiguous copies) alive until the kernels ran: the caching allocator is
  // stream-ordered, so freeing them after the launch on the same stream is safe.
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace atax

TORCH_LIBRARY_IMPL(atax, CUDA, m) {
  m.impl("gram", &atax::cuda::gram_cuda);
}
