// CPU kernel of atax::gram: one pass over the m vectors (no flattening copy), fixed-size chunks in
// parallel, a float64 partial per chunk, partials summed in fixed chunk order (deterministic for any
// thread count). Inside a chunk: sub-blocks of kSub elements, products accumulated in fp32 lanes,
// each sub-block's lane sums added into float64 accumulators.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "simd.h"

namespace atax {
namespace {

constexpr int64_t kSub = 2048;   // sub-block (elements); m buffers of kSub floats stay in L1/L2

at::Tensor gram_cpu(at::TensorList vectors, int64_t m, bool per_tensor) {
  const int64_t n = check_gram_args(vectors, m);
  const int64_t total = m * n;

  // Contiguous views (a copy only for non-contiguous inputs); raw pointers + dtypes.
  std::vector<at::Tensor> keep(static_cast<size_t>(total));
  std::vector<const void*> ptr(static_cast<size_t>(total), nullptr);
  std::vector<at::ScalarType> dt(static_cast<size_t>(total));
  for (int64_t f = 0; f < total; ++f) {
    const at::Tensor& t = vectors[f];
    keep[f] = t.is_contiguous() ? t : t.contiguous();
    ptr[f] = keep[f].numel() > 0 ? keep[f].data_ptr() : nullptr;
    dt[f] = t.scalar_type();
  }
  std::vector<int64_t> numels(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) numels[i] = vectors[i].numel();
  std::vector<char> all_bf16(static_cast<size_t>(n), 1);
  for (int64_t f = 0; f < total; ++f)
    if (dt[f] != at::kBFloat16) all_bf16[f % n] = 0;
  std::vector<char> all_half(static_cast<size_t>(n), 1);
  for (int64_t f = 0; f < total; ++f)
    if (dt[f] != at::kHalf) all_half[f % n] = 0;
  const std::vector<Chunk> chunks = build_chunks(numels);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const int64_t P = m * (m + 1) / 2;  // upper triangle, row-major
  std::vector<double> partial(static_cast<size_t>(nchunks * P), 0.0);

  at::parallel_for(0, nchunks, 1, [&](int64_t cbeg, int64_t cend) {
    std::vector<float> buf(static_cast<size_t>(m * kSub));
    std::vector<const float*> src(static_cast<size_t>(m));
    for (int64_t c = cbeg; c < cend; ++c) {
      const Chunk& ch = chunks[c];
      double* acc = partial.data() + c * P;
      for (int64_t s = 0; s < ch.len; s += kSub) {
        const int64_t L = std::min(kSub, ch.len - s);
        const int64_t off = ch.start + s;
        if (m <= 8 && all_bf16[ch.tensor]) {  // bf16 converted in registers, no buffer
          const c10::BFloat16* bp[8];
          for (int64_t j = 0; j < m; ++j)
            bp[j] = static_cast<const c10::BFloat16*>(ptr[j * n + ch.tensor]) + off;
          cpu::gram_fused_bf16(m)(bp, L, acc);
          continue;
        }
#if ATAX_X86
        if (m <= 8 && all_half[ch.tensor] && cpu::has_avx2_f16c()) {
          const c10::Half* hp[8];
          for (int64_t j = 0; j < m; ++j)
            hp[j] = static_cast<const c10::Half*>(ptr[j * n + ch.tensor]) + off;
          cpu::gram_fused_half(m)(hp, L, acc);
          continue;
        }
#endif
        for (int64_t j = 0; j < m; ++j) {
          const int64_t f = j * n + ch.tensor;
          float* b = buf.data() + j * kSub;
          switch (dt[f]) {
            case at::kFloat:
              src[j] = static_cast<const float*>(ptr[f]) + off;
              break;
            case at::kBFloat16:
              cpu::bf16_to_float(static_cast<const c10::BFloat16*>(ptr[f]) + off, b, L);
              src[j] = b;
              break;
            default:  // kHalf (checked)
              cpu::half_to_float(static_cast<const c10::Half*>(ptr[f]) + off, b, L);
              src[j] = b;
              break;
          }
        }
        if (m <= 8) { cpu::gram_fused_f32(m)(src.data(), L, acc); continue; }
        int64_t p = 0;
        for (int64_t a = 0; a < m; ++a) {
          acc[p++] += cpu::dot_block(src[a], src[a], L);
          for (int64_t bb = a + 1; bb < m; ++bb) acc[p++] += cpu::dot_block(src[a], src[bb], L);
        }
      }
    }
  });

  at::Tensor out = per_tensor ? at::zeros({n, m, m}, at::TensorOptions().dtype(at::kDouble))
                              : at::zeros({m, m}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  std::vector<double> sum(static_cast<size_t>(per_tensor ? n * P : P), 0.0);
  for (int64_t c = 0; c < nchunks; ++c) {  // fixed order
    double* dst = sum.data() + (per_tensor ? chunks[c].tensor * P : 0);
    const double* src = partial.data() + c * P;
    for (int64_t p = 0; p < P; ++p) dst[p] += src[p];
  }
  const int64_t nout = per_tensor ? n : 1;
  for (int64_t i = 0; i < nout; ++i) {
    const double* su = sum.data() + i * P;
    double* oi = o + i * m * m;
    int64_t p = 0;
    for (int64_t a = 0; a < m; ++a) {
      for (int64_t b = a; b < m; ++b, ++p) {
        oi[a * m + b] = su[p];
        oi[b * m + a] = su[p];
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(atax, CPU, m) {
  m.impl("gram", &gram_cpu);
}

}  // namespace atax
