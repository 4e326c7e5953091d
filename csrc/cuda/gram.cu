// atax::gram on CUDA: one launch over all chunks of all tensors, then a fixed-order reduction.
//
// Stage 1 (one block per chunk, kThreads threads): for every segment of the chunk, each thread
// accumulates the m*(m+1)/2 products (upper triangle) of its elements in fp32 (bf16/fp16 upcast on
// load), the block reduces them in fp64 in a fixed order, and writes one fp64 partial per segment.
//   - m <= 8: register path, 16-byte vector loads; a misaligned segment peels its head (at most 7
//     elements, scalar) when one element offset aligns every vector, then vector loads, scalar tail.
//   - 9 <= m <= 64: shared-memory tiles of kTile elements of all m vectors; the pairs are cut in 4x4
//     register blocks (8 shared loads per 16 FMAs), thread groups split a tile's elements, and the
//     groups' fp64 sums are added in group order at the end of the segment.
// Stage 2, two levels or more, fixed ranges and fixed order: per tensor (per_tensor) one block sums
// the tensor's segment partials; globally, blocks sum fixed ranges of kSpan partials, repeated until
// one block remains. No atomics anywhere: the same bits on every run.
// Bits depend on the shapes and, for a tensor that is not 16-byte aligned, on its alignment (the
// vector and scalar paths give elements to threads differently): see ops/CONTRACT.md.
#include <torch/library.h>

#include "multi_tensor.cuh"

namespace atax {
namespace cuda {
namespace {

constexpr int kMaxM = 64;
constexpr int kTile = 128;
constexpr int kRB = 4;        // register block of the m >= 9 path: kRB x kRB pairs per thread
constexpr int64_t kSpan = 256;  // partial rows per block of a global reduction level

// First element offset h < kVec at which every one of the M vectors is 16-byte aligned, or -1.
template <int M>
__device__ __forceinline__ int common_head(const void* const (&base)[M], const int8_t (&dt)[M], int64_t start) {
#pragma unroll 1
  for (int h = 0; h < kVec; ++h) {
    bool ok = true;
#pragma unroll
    for (int j = 0; j < M; ++j) ok = ok && aligned16(base[j], dt[j], start + h);
    if (ok) return h;
  }
  return -1;
}

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
#pragma unroll
    for (int j = 0; j < M; ++j) {
      base[j] = reinterpret_cast<const void*>(tv.ptrs[static_cast<int64_t>(j) * tv.n + t]);
      dt[j] = tv.dtypes[static_cast<int64_t>(j) * tv.n + t];
    }
    float acc[P];
#pragma unroll
    for (int p = 0; p < P; ++p) acc[p] = 0.f;

    auto scalar = [&](int64_t i) {
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
    };
    // [0, head): scalar peel; [head, vec_end): 128-bit loads; [vec_end, len): scalar tail
    const int h = common_head<M>(base, dt, start);
    const int64_t head = (h < 0 || h >= len) ? len : h;
    const int64_t vec_end = head + ((len - head) & ~static_cast<int64_t>(kVec - 1));
    for (int64_t i = head + static_cast<int64_t>(tid) * kVec; i < vec_end; i += static_cast<int64_t>(kThreads) * kVec) {
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
    // one scalar loop over the head and the tail: element q < head is q, the others vec_end + (q - head)
    for (int64_t q = tid; q < head + (len - vec_end); q += kThreads) scalar(q < head ? q : vec_end + (q - head));

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

// Register-blocked pairs: the upper triangle of the m x m Gram is cut in nb(nb+1)/2 blocks of kRB x kRB
// pairs (nb = ceil(m / kRB)); thread tid works on block tid % NB for the tile elements e = g, g + G, ...
// of its group g = tid / NB (G = kThreads / NB groups). Per element it reads 2 kRB floats from shared
// memory for kRB^2 FMAs. The groups' fp64 accumulators are summed in group order per segment.
__global__ void __launch_bounds__(kThreads) gram_generic_kernel(TableView tv, int m, double* __restrict__ partials) {
  constexpr int kStride = kTile + 1;
  __shared__ float tile[kMaxM * kStride];  // reused for the group reduction (kThreads * kRB^2 doubles fit)
  __shared__ const void* base[kMaxM];
  __shared__ int8_t dt[kMaxM];
  static_assert(kThreads * kRB * kRB * sizeof(double) <= sizeof(float) * kMaxM * kStride, "reduction room");
  const int tid = threadIdx.x;
  const int P = m * (m + 1) / 2;
  const int nb = (m + kRB - 1) / kRB;
  const int NB = nb * (nb + 1) / 2;
  const int G = kThreads / NB;
  const int rows = nb * kRB;  // tile rows, the last ones zero padding
  const int blk = tid % NB;
  const int g = tid / NB;
  const bool active = g < G;
  int A = 0, rem = blk;
  while (rem >= nb - A) { rem -= nb - A; ++A; }
  const int B = A + rem;
  double* red = reinterpret_cast<double*>(tile);
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
    double acc[kRB][kRB];
#pragma unroll
    for (int i = 0; i < kRB; ++i) {
#pragma unroll
      for (int j = 0; j < kRB; ++j) acc[i][j] = 0.0;
    }
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kTile), len - t0));
      for (int q = tid; q < rows * kTile; q += kThreads) {
        const int j = q / kTile;
        const int e = q - j * kTile;
        tile[j * kStride + e] = (j < m && e < cnt) ? load1(base[j], dt[j], start + t0 + e) : 0.f;
      }
      __syncthreads();
      if (active) {
        const float* xa = tile + A * kRB * kStride;
        const float* xb = tile + B * kRB * kStride;
        float d[kRB][kRB];
#pragma unroll
        for (int i = 0; i < kRB; ++i) {
#pragma unroll
          for (int j = 0; j < kRB; ++j) d[i][j] = 0.f;
        }
        for (int e = g; e < cnt; e += G) {
          float a[kRB], b[kRB];
#pragma unroll
          for (int i = 0; i < kRB; ++i) {
            a[i] = xa[i * kStride + e];
            b[i] = xb[i * kStride + e];
          }
#pragma unroll
          for (int i = 0; i < kRB; ++i) {
#pragma unroll
            for (int j = 0; j < kRB; ++j) d[i][j] = fmaf(a[i], b[j], d[i][j]);
          }
        }
#pragma unroll
        for (int i = 0; i < kRB; ++i) {
#pragma unroll
          for (int j = 0; j < kRB; ++j) acc[i][j] += static_cast<double>(d[i][j]);
        }
      }
      __syncthreads();
    }
    // the groups' sums, in group order (the tile is free now)
    if (active) {
#pragma unroll
      for (int i = 0; i < kRB; ++i) {
#pragma unroll
        for (int j = 0; j < kRB; ++j) red[(g * NB + blk) * (kRB * kRB) + i * kRB + j] = acc[i][j];
      }
    }
    __syncthreads();
    for (int q = tid; q < NB * kRB * kRB; q += kThreads) {
      const int qb = q / (kRB * kRB);
      const int ij = q - qb * (kRB * kRB);
      double v = 0.0;
      for (int gg = 0; gg < G; ++gg) v += red[(gg * NB + qb) * (kRB * kRB) + ij];
      int qa = 0, qr = qb;
      while (qr >= nb - qa) { qr -= nb - qa; ++qa; }
      const int a = qa * kRB + ij / kRB;
      const int b = (qa + qr) * kRB + ij % kRB;
      if (a < m && b < m && a <= b) {
        partials[static_cast<int64_t>(s) * P + a * m - a * (a - 1) / 2 + (b - a)] = v;
      }
    }
    __syncthreads();
  }
}

// Block b sums the rows [r0, r1) of in[*, P] for every pair p (thread p, p + kThreads, ...; rows in order):
// ranges[b]..ranges[b + 1] when ranges is given (per tensor), else [b * kSpan, (b + 1) * kSpan) cut at rows.
// square: write the sums as the symmetric m x m matrix b of out; else as row b of out[*, P].
__global__ void __launch_bounds__(kThreads) gram_reduce_kernel(const double* __restrict__ in, int m, int64_t rows,
                                                               const int32_t* __restrict__ ranges, bool square,
                                                               double* __restrict__ out) {
  const int P = m * (m + 1) / 2;
  const int64_t b = blockIdx.x;
  const int64_t r0 = ranges ? ranges[b] : b * kSpan;
  const int64_t r1 = ranges ? ranges[b + 1] : min(rows, r0 + kSpan);
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    double v = 0.0;
    for (int64_t r = r0; r < r1; ++r) v += in[r * P + p];
    if (square) {
      int a = 0, rem = p;
      while (rem >= m - a) { rem -= m - a; ++a; }
      const int c = a + rem;
      double* o = out + b * m * m;
      o[a * m + c] = v;
      o[c * m + a] = v;
    } else {
      out[b * P + p] = v;
    }
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
  if (per_tensor) {
    gram_reduce_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        pp, static_cast<int>(m), tv.num_segs, tv.tensor_seg, true, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // Levels of fixed kSpan-row ranges until one block can sum the rest: the number of levels and every
    // range depend on the segment count only.
    const double* cur = pp;
    int64_t rows = tv.num_segs;
    std::vector<at::Tensor> levels;
    while (rows > kSpan) {
      const int64_t blocks = (rows + kSpan - 1) / kSpan;
      levels.push_back(at::empty({blocks * P}, opts));
      gram_reduce_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          cur, static_cast<int>(m), rows, nullptr, false, levels.back().data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cur = levels.back().data_ptr<double>();
      rows = blocks;
    }
    gram_reduce_kernel<<<1, kThreads, 0, stream>>>(cur, static_cast<int>(m), rows, nullptr, true,
                                                   out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
