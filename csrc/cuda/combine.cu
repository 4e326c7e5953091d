// atax::combine_ on CUDA: t <- t - sum_j coef_j * v_j, in place, one launch over all chunks.
//
// The coefficients (float64, [k] or [n, k]) are read from device memory inside the kernel: no host
// sync, CUDA-graph capturable (replays pick up new coefficient values written into the same tensor).
// Per segment, thread 0 compacts the non-zero coefficients into shared memory; a term whose
// coefficient is exactly 0.0 is never read, and a tensor whose coefficients are all zero is not
// written. Arithmetic in fp32, rounded once to the target dtype. 16-byte vector loads/stores from the
// first element offset (< 8, the peeled head, scalar) at which the target and every vector read are
// 16-byte aligned, scalar in the tail and for a segment where no such offset exists. combine_ is
// element-wise, so its bits do not depend on which path an element takes.
#include <torch/library.h>

#include "multi_tensor.cuh"

namespace atax {
namespace cuda {
namespace {

constexpr int kMaxK = 256;

__global__ void __launch_bounds__(kThreads) combine_kernel(TableView tv, const double* __restrict__ coefs,
                                                           int k, bool per_tensor) {
  __shared__ float cf[kMaxK];
  __shared__ int idx[kMaxK];
  __shared__ const void* vb[kMaxK];
  __shared__ int8_t vd[kMaxK];
  __shared__ int nnz;
  __shared__ int head_sh;
  const int tid = threadIdx.x;
  const int c = blockIdx.x;
  const int s_begin = tv.chunk_seg[c];
  const int s_end = tv.chunk_seg[c + 1];
  int prev_t = -1;
  for (int s = s_begin; s < s_end; ++s) {
    const int t = tv.seg_tensor[s];
    const int64_t start = tv.seg_start[s];
    const int64_t len = tv.seg_len[s];
    void* tgt = reinterpret_cast<void*>(tv.ptrs[t]);
    const int8_t tdt = tv.dtypes[t];
    if (tid == 0) {
      if (t != prev_t) {
        int q = 0;
        const double* row = coefs + (per_tensor ? static_cast<int64_t>(t) * k : 0);
        for (int j = 0; j < k; ++j) {
          const double cj = row[j];
          if (cj != 0.0) {
            cf[q] = static_cast<float>(cj);
            idx[q] = j;
            ++q;
          }
        }
        nnz = q;
      }
      for (int q = 0; q < nnz; ++q) {
        const int64_t li = static_cast<int64_t>(1 + idx[q]) * tv.n + t;
        vb[q] = reinterpret_cast<const void*>(tv.ptrs[li]);
        vd[q] = tv.dtypes[li];
      }
      int h = 0;
      for (; h < kVec; ++h) {  // first offset that aligns the target and every vector read
        bool al = aligned16(tgt, tdt, start + h);
        for (int q = 0; q < nnz && al; ++q) al = aligned16(vb[q], vd[q], start + h);
        if (al) break;
      }
      head_sh = h < kVec ? h : -1;
    }
    prev_t = t;
    __syncthreads();
    const int nz = nnz;
    if (nz > 0) {
      auto scalar = [&](int64_t i) {
        float acc = 0.f;
        for (int q = 0; q < nz; ++q) acc = fmaf(cf[q], load1(vb[q], vd[q], start + i), acc);
        store1(tgt, tdt, start + i, load1(tgt, tdt, start + i) - acc);
      };
      // [0, head): scalar peel; [head, vec_end): 128-bit loads/stores; [vec_end, len): scalar tail
      const int64_t head = (head_sh < 0 || head_sh >= len) ? len : head_sh;
      const int64_t vec_end = head + ((len - head) & ~static_cast<int64_t>(kVec - 1));
      {
        for (int64_t i = head + static_cast<int64_t>(tid) * kVec; i < vec_end; i += static_cast<int64_t>(kThreads) * kVec) {
          float acc[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
          for (int q = 0; q < nz; ++q) {
            float x[kVec];
            load8(vb[q], vd[q], start + i, x);
            const float cq = cf[q];
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[e] = fmaf(cq, x[e], acc[e]);
          }
          float y[kVec];
          load8(tgt, tdt, start + i, y);
#pragma unroll
          for (int e = 0; e < kVec; ++e) y[e] -= acc[e];
          store8(tgt, tdt, start + i, y);
        }
      }
      // one scalar loop over the head and the tail: element q < head is q, the others vec_end + (q - head)
      for (int64_t q = tid; q < head + (len - vec_end); q += kThreads) scalar(q < head ? q : vec_end + (q - head));
    }
    __syncthreads();
  }
}

void combine_cuda(at::TensorList target, at::TensorList vectors, const at::Tensor& coefs) {
  const int64_t n = static_cast<int64_t>(target.size());
  if (n == 0) return;
  TORCH_CHECK(vectors.size() % n == 0, "atax::combine_ (CUDA): len(vectors) must be a multiple of len(target)");
  const int64_t k = static_cast<int64_t>(vectors.size()) / n;
  const auto device = target[0].device();
  TORCH_CHECK(device.is_cuda(), "atax::combine_ (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(k <= kMaxK, "atax::combine_ (CUDA): at most ", kMaxK, " vectors, got ", k);
  TORCH_CHECK(coefs.scalar_type() == at::kDouble, "atax::combine_ (CUDA): coefs must be float64");
  TORCH_CHECK(coefs.device() == device, "atax::combine_ (CUDA): coefs must be on the tensors' device");
  const bool per_tensor = coefs.dim() == 2;
  if (per_tensor) {
    TORCH_CHECK(coefs.size(0) == n && coefs.size(1) == k, "atax::combine_ (CUDA): coefs must be [n, k]");
  } else {
    TORCH_CHECK(coefs.dim() == 1 && coefs.size(0) == k, "atax::combine_ (CUDA): coefs must be [k] or [n, k]");
  }
  if (k == 0) return;
  c10::cuda::CUDAGuard guard(device);

  std::vector<std::vector<at::Tensor>> lists(1 + k);
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (original, contiguous copy)
  lists[0].reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = target[i];
    TORCH_CHECK(t.device() == device, "atax::combine_ (CUDA): all tensors must be on one device");
    if (t.is_contiguous()) {
      lists[0].push_back(t);
    } else {
      auto tc = t.contiguous();
      writeback.emplace_back(t, tc);
      lists[0].push_back(tc);
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    lists[1 + j].reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& v = vectors[j * n + i];
      TORCH_CHECK(v.device() == device, "atax::combine_ (CUDA): all tensors must be on one device");
      TORCH_CHECK(v.numel() == target[i].numel(), "atax::combine_ (CUDA): numel mismatch for tensor ", i);
      lists[1 + j].push_back(as_contig(v));
    }
  }
  auto entry = get_table(lists);
  const TableView& tv = entry->view;
  if (tv.num_segs == 0) return;
  auto cf = coefs.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  combine_kernel<<<static_cast<unsigned>(tv.num_chunks), kThreads, 0, stream>>>(
      tv, cf.data_ptr<double>(), static_cast<int>(k), per_tensor);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (auto& wb : writeback) wb.first.copy_(wb.second);
}

}  // namespace
}  // namespace cuda
}  // namespace atax

TORCH_LIBRARY_IMPL(atax, CUDA, m) {
  m.impl("combine_", &atax::cuda::combine_cuda);
}
