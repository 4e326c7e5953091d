// CPU kernel of atax::combine_: target[i] -= sum_j c_j * vectors[j][i], one pass, in place.
// fp32 arithmetic, one rounding to target dtype. Terms with coefficient exactly 0.0 are skipped (the
// vector is never read); tensors whose coefficients are all zero are not touched. Parallel over
// fixed-size chunks (element-wise, so the result does not depend on the thread count anyway).
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

constexpr int64_t kSub = 1024;

// acc[e] -= c * v[e] with v of any supported dtype (non-fp32: converted through an L1 buffer).
inline void apply_term(float* __restrict acc, const void* v, at::ScalarType dt, int64_t off,
                       float c, int64_t len, float* __restrict tmp) {
  switch (dt) {
    case at::kFloat:
      cpu::sub_scaled_f32(acc, static_cast<const float*>(v) + off, c, len);
      break;
    case at::kBFloat16:
      cpu::bf16_to_float(static_cast<const c10::BFloat16*>(v) + off, tmp, len);
      cpu::sub_scaled_f32(acc, tmp, c, len);
      break;
    default:
      cpu::half_to_float(static_cast<const c10::Half*>(v) + off, tmp, len);
      cpu::sub_scaled_f32(acc, tmp, c, len);
      break;
  }
}

struct Term {
  const void* ptr;
  at::ScalarType dt;
  float coef;
};

void combine_cpu(at::TensorList target, at::TensorList vectors, const at::Tensor& coefs) {
  const int64_t k = check_combine_args(target, vectors, coefs);
  const int64_t n = static_cast<int64_t>(target.size());
  if (k == 0) return;
  const at::Tensor cf = coefs.contiguous();
  const double* cp = cf.data_ptr<double>();
  const bool per = coefs.dim() == 2;

  // Active terms per tensor (coefficient != 0.0); tensors with none are skipped entirely.
  std::vector<std::vector<Term>> terms(static_cast<size_t>(n));
  std::vector<bool> skip(static_cast<size_t>(n), true);
  std::vector<at::Tensor> keep;
  std::vector<at::Tensor> work(static_cast<size_t>(n));  // contiguous target (or a copy)
  std::vector<int64_t> numels(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    numels[i] = target[i].numel();
    if (numels[i] == 0) continue;
    for (int64_t j = 0; j < k; ++j) {
      const double c = per ? cp[i * k + j] : cp[j];
      if (c == 0.0) continue;
      const at::Tensor& v = vectors[j * n + i];
      at::Tensor vc = v.is_contiguous() ? v : v.contiguous();
      terms[i].push_back(Term{vc.data_ptr(), vc.scalar_type(), static_cast<float>(c)});
      keep.push_back(std::move(vc));
    }
    if (terms[i].empty()) continue;
    skip[i] = false;
    work[i] = target[i].is_contiguous() ? target[i] : target[i].contiguous();
  }
  std::vector<void*> tptr(static_cast<size_t>(n), nullptr);
  for (int64_t i = 0; i < n; ++i)
    if (!skip[i]) tptr[i] = work[i].data_ptr();

  const std::vector<Chunk> chunks = build_chunks(numels, kChunkElems, &skip);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());

  at::parallel_for(0, nchunks, 1, [&](int64_t cbeg, int64_t cend) {
    alignas(64) float buf[kSub];
    alignas(64) float tmp[kSub];
    for (int64_t c = cbeg; c < cend; ++c) {
      const Chunk& ch = chunks[c];
      const auto& tl = terms[ch.tensor];
      const at::ScalarType tdt = work[ch.tensor].scalar_type();
      void* tp = tptr[ch.tensor];
#if ATAX_X86
      if (cpu::has_avx2_f16c() && tl.size() <= 8 && (tdt == at::kFloat || tdt == at::kBFloat16)) {
        bool same = true;
        for (const Term& term : tl) same = same && term.dt == tdt;
        if (same) {
          const float* fp[8];
          const c10::BFloat16* bp[8];
          float cs[8];
          for (size_t j = 0; j < tl.size(); ++j) {
            cs[j] = tl[j].coef;
            fp[j] = static_cast<const float*>(tl[j].ptr) + ch.start;
            bp[j] = static_cast<const c10::BFloat16*>(tl[j].ptr) + ch.start;
          }
          if (tdt == at::kFloat)
            cpu::combine_fused_f32(tl.size())(static_cast<float*>(tp) + ch.start, fp, cs, ch.len);
          else
            cpu::combine_fused_bf16(tl.size())(static_cast<c10::BFloat16*>(tp) + ch.start, bp, cs, ch.len);
          continue;
        }
      }
#endif
      if (tdt == at::kFloat) {
        float* t = static_cast<float*>(tp) + ch.start;
        if (tl.size() == 1 && tl[0].dt == at::kFloat) {  // hot path: fp32 axpy
          cpu::sub_scaled_f32(t, static_cast<const float*>(tl[0].ptr) + ch.start, tl[0].coef, ch.len);
        } else {
          for (int64_t s = 0; s < ch.len; s += kSub) {
            const int64_t L = std::min(kSub, ch.len - s);
            for (const Term& term : tl) apply_term(t + s, term.ptr, term.dt, ch.start + s, term.coef, L, tmp);
          }
        }
      } else if (tdt == at::kBFloat16 && tl.size() == 1 && tl[0].dt == at::kBFloat16) {
#if ATAX_X86
        if (cpu::has_avx2_f16c()) {
          cpu::sub_scaled_bf16_avx2(static_cast<c10::BFloat16*>(tp) + ch.start,
                                    static_cast<const c10::BFloat16*>(tl[0].ptr) + ch.start, tl[0].coef,
                                    ch.len);
          continue;
        }
#endif
        cpu::sub_scaled_bf16(static_cast<c10::BFloat16*>(tp) + ch.start,
                             static_cast<const c10::BFloat16*>(tl[0].ptr) + ch.start, tl[0].coef, ch.len);
#if ATAX_X86
      } else if (tdt == at::kHalf && tl.size() == 1 && tl[0].dt == at::kHalf && cpu::has_avx2_f16c()) {
        cpu::sub_scaled_half(static_cast<c10::Half*>(tp) + ch.start,
                             static_cast<const c10::Half*>(tl[0].ptr) + ch.start, tl[0].coef, ch.len);
#endif
      } else {
        for (int64_t s = 0; s < ch.len; s += kSub) {
          const int64_t L = std::min(kSub, ch.len - s);
          const int64_t off = ch.start + s;
          if (tdt == at::kBFloat16) cpu::bf16_to_float(static_cast<const c10::BFloat16*>(tp) + off, buf, L);
          else cpu::half_to_float(static_cast<const c10::Half*>(tp) + off, buf, L);
          for (const Term& term : tl) apply_term(buf, term.ptr, term.dt, off, term.coef, L, tmp);
          if (tdt == at::kBFloat16) cpu::float_to_bf16(buf, static_cast<c10::BFloat16*>(tp) + off, L);
          else cpu::float_to_half(buf, static_cast<c10::Half*>(tp) + off, L);
        }
      }
    }
  });

  for (int64_t i = 0; i < n; ++i) {
    if (!skip[i] && !target[i].is_contiguous()) target[i].copy_(work[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(atax, CPU, m) {
  m.impl("combine_", &combine_cpu);
}

}  // namespace atax
