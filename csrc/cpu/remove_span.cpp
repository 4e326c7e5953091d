// CPU kernel of atax::remove_span_: for every target ΔW [d_out, d_in] with an orthonormal basis U [d_in, r],
// ΔW <- ΔW - (ΔW U) Uᵀ in place; returns float64 [n, 2] = (‖ΔW‖² before, ‖ΔW U‖²) per target.
//
// Work is split into fixed blocks of rows of one target (the block size depends only on the shapes, never on
// the thread count). A block is small enough to stay in L2, so T = X U and X -= T Uᵀ read it from cache: ΔW
// streams from DRAM once and back once. Each block runs two single-threaded BLAS calls (MKL/oneDNN through
// at::native::cpublas; OpenMP parallelism is over blocks), directly on the target's memory when its rows or its
// columns are unit-stride fp32 (a GPT-2 Conv1D weight's .t() is column-major: the GEMM takes it transposed),
// otherwise through an fp32 copy of the block (bf16/fp16 are upcast there and rounded once on the way back).
// Per-block norms are float64 partials summed in block order: same bits on every run and every thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <unordered_map>
#include <vector>

#include "../common.h"
#include "simd.h"

#ifndef ATAX_RS_LIB
#define ATAX_RS_LIB atax
#endif

namespace atax {
namespace {

// fp32 bytes of one block of rows: about a quarter of a Zen/Skylake-class L2, leaving room for U and T
constexpr int64_t kBlockBytes = 256 * 1024;
// above this rank the op is matmul-bound: bigger blocks keep the GEMMs efficient (U no longer fits L2 anyway)
constexpr int64_t kLargeRank = 256;
constexpr int64_t kLargeRows = 256;

// MKL's Fortran sgemm, exported by libtorch_cpu (LP64). Weak: a torch without it loads fine and takes the
// at::mm fallback below.
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

// Column-major C[m, n] = alpha op(A) op(B) + beta C (single-threaded inside an OpenMP region)
void gemm_cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    sgemm_(&ca, &cb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor av = ta ? at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts)
                     : at::from_blob(const_cast<float*>(a), {m, k}, {1, lda}, opts);
  at::Tensor bv = tb ? at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts)
                     : at::from_blob(const_cast<float*>(b), {k, n}, {1, ldb}, opts);
  at::Tensor cv = at::from_blob(c, {m, n}, {1, ldc}, opts);
  at::Tensor prod = at::mm(av, bv);
  if (beta == 0.0f) cv.copy_(prod.mul_(alpha));
  else cv.add_(prod, alpha);
}

struct Job {
  int64_t target;
  int64_t row0;
  int64_t rows;
};

struct Plan {
  at::Tensor t;      // the target as given (may be strided)
  const float* u;    // fp32 contiguous basis [d_in, r] (nullptr when r == 0)
  int64_t d_out, d_in, r;
  int64_t s0, s1;    // element strides of the target
  int layout;        // 0: rows unit-stride fp32, 1: columns unit-stride fp32, 2: through an fp32 copy
};

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buf = std::unique_ptr<float, FreeDeleter>;

Buf alloc_floats(int64_t n) {
  // 64-byte aligned, so every thread's scratch has the same alignment (BLAS paths may depend on it)
  const size_t bytes = static_cast<size_t>(((std::max<int64_t>(n, 1) * 4 + 63) / 64) * 64);
  return Buf(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

// sum of squares of a [rows, cols] fp32 matrix at p with strides (rs, cs), in 8 fixed float64 lanes
double sq_sum(const float* p, int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  // iterate the unit-stride dimension innermost
  const bool col_inner = cs == 1 || rs != 1;
  const int64_t outer = col_inner ? rows : cols, inner = col_inner ? cols : rows;
  const int64_t os = col_inner ? rs : cs, is = col_inner ? cs : rs;
  for (int64_t a = 0; a < outer; ++a) {
    const float* q = p + a * os;
    int64_t b = 0;
    if (is == 1) {
      for (; b + 8 <= inner; b += 8)
        for (int l = 0; l < 8; ++l) {
          const double x = q[b + l];
          lanes[l] += x * x;
        }
    }
    for (int l = 0; b < inner; ++b, l = (l + 1) & 7) {
      const double x = q[b * is];
      lanes[l] += x * x;
    }
  }
  double s = 0.0;
  for (int l = 0; l < 8; ++l) s += lanes[l];
  return s;
}

template <typename T>
void gather_rows(const T* src, int64_t rows, int64_t cols, int64_t s0, int64_t s1, float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = src + i * s0;
    float* out = dst + i * cols;
    if (s1 == 1) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        cpu::bf16_to_float(row, out, cols);
        continue;
      } else if constexpr (std::is_same_v<T, c10::Half>) {
        cpu::half_to_float(row, out, cols);
        continue;
      }
    }
    for (int64_t k = 0; k < cols; ++k) out[k] = static_cast<float>(row[k * s1]);
  }
}

template <typename T>
void scatter_rows(const float* src, int64_t rows, int64_t cols, int64_t s0, int64_t s1, T* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    T* row = dst + i * s0;
    const float* in = src + i * cols;
    if (s1 == 1) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        cpu::float_to_bf16(in, row, cols);
        continue;
      } else if constexpr (std::is_same_v<T, c10::Half>) {
        cpu::float_to_half(in, row, cols);
        continue;
      }
    }
    for (int64_t k = 0; k < cols; ++k) row[k * s1] = static_cast<T>(in[k]);
  }
}

// X [rows, d_in] fp32 with strides (xs0, xs1), one of them 1: T = X U (returned in t), X -= T Uᵀ.
// Column-major BLAS view: a row-major X is Xᵀ with ld = xs0; a column-major X is X with ld = xs1.
void project_block(float* x, int64_t rows, int64_t d_in, int64_t xs0, int64_t xs1, const float* u, int64_t r,
                   float* t) {
  constexpr bool N = false, Tr = true;
  if (xs1 == 1 && (xs0 >= d_in || rows == 1)) {
    const int64_t ld = std::max<int64_t>(xs0, std::max<int64_t>(d_in, 1));
    // Tᵀ[r, rows] = Uᵀ[r, d_in] · Xᵀ[d_in, rows]
    gemm_cm(N, N, r, rows, d_in, 1.0f, u, r, x, ld, 0.0f, t, r);
    // Xᵀ[d_in, rows] -= U[d_in, r] · Tᵀ[r, rows]
    gemm_cm(Tr, N, d_in, rows, r, -1.0f, u, r, t, r, 1.0f, x, ld);
  } else {
    const int64_t ld = std::max<int64_t>(xs1, std::max<int64_t>(rows, 1));
    // Tᵀ[r, rows] = Uᵀ[r, d_in] · (X[rows, d_in])ᵀ
    gemm_cm(N, Tr, r, rows, d_in, 1.0f, u, r, x, ld, 0.0f, t, r);
    // X[rows, d_in] -= T[rows, r] · Uᵀ[r, d_in]
    gemm_cm(Tr, N, rows, d_in, r, -1.0f, t, r, u, r, 1.0f, x, ld);
  }
}

void check_args(at::TensorList targets, const c10::List<std::optional<at::Tensor>>& bases) {
  const size_t n = targets.size();
  TORCH_CHECK(bases.size() == n, "atax::remove_span_: targets has ", n, " tensors but bases has ",
              bases.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = targets[i];
    TORCH_CHECK(t.defined(), "atax::remove_span_: targets[", i, "] is undefined");
    TORCH_CHECK(is_supported_float(t.scalar_type()), "atax::remove_span_: targets[", i, "] has dtype ",
                t.scalar_type(), "; expected float32, bfloat16 or float16");
    TORCH_CHECK(t.layout() == at::kStrided, "atax::remove_span_: targets[", i, "] must be dense (strided)");
    TORCH_CHECK(t.dim() == 2, "atax::remove_span_: targets[", i, "] has shape ", t.sizes(), "; expected 2-D");
    TORCH_CHECK(t.device().is_cpu(), "atax::remove_span_: targets[", i, "] is on ", t.device(), ", not CPU");
    const std::optional<at::Tensor> ub = bases.get(i);
    if (!ub.has_value() || !ub->defined()) continue;
    const at::Tensor& u = *ub;
    TORCH_CHECK(is_supported_float(u.scalar_type()), "atax::remove_span_: bases[", i, "] has dtype ",
                u.scalar_type(), "; expected float32, bfloat16 or float16");
    TORCH_CHECK(u.layout() == at::kStrided, "atax::remove_span_: bases[", i, "] must be dense (strided)");
    TORCH_CHECK(u.dim() == 2 && u.size(0) == t.size(1), "atax::remove_span_: bases[", i, "] has shape ",
                u.sizes(), " but targets[", i, "] has shape ", t.sizes(), " (need [d_in, r])");
    TORCH_CHECK(u.size(1) <= u.size(0), "atax::remove_span_: bases[", i, "] has shape ", u.sizes(),
                ": more columns than rows cannot be orthonormal");
    TORCH_CHECK(u.device().is_cpu(), "atax::remove_span_: bases[", i, "] is on ", u.device(), ", not CPU");
  }
}

at::Tensor remove_span_cpu(at::TensorList targets, const c10::List<std::optional<at::Tensor>>& bases) {
  check_args(targets, bases);
  const int64_t n = static_cast<int64_t>(targets.size());
  at::Tensor stats = at::zeros({n, 2}, at::TensorOptions().dtype(at::kDouble));
  if (n == 0) return stats;

  std::unordered_map<const void*, at::Tensor> converted;  // one fp32 copy per distinct basis tensor
  std::vector<Plan> plans(static_cast<size_t>(n));
  std::vector<Job> jobs;
  int64_t max_x = 0, max_t = 0;
  for (int64_t i = 0; i < n; ++i) {
    Plan& p = plans[i];
    p.t = targets[i];
    p.d_out = p.t.size(0);
    p.d_in = p.t.size(1);
    p.s0 = p.t.stride(0);
    p.s1 = p.t.stride(1);
    p.r = 0;
    p.u = nullptr;
    const std::optional<at::Tensor> ub = bases.get(i);
    if (ub.has_value() && ub->defined() && ub->size(1) > 0) {
      const at::Tensor& u = *ub;
      const void* key = u.unsafeGetTensorImpl();
      auto it = converted.find(key);
      if (it == converted.end()) it = converted.emplace(key, u.to(at::kFloat).contiguous()).first;
      p.u = it->second.data_ptr<float>();
      p.r = u.size(1);
    }
    if (p.t.numel() == 0) continue;
    const bool fp32 = p.t.scalar_type() == at::kFloat;
    if (fp32 && p.s1 == 1 && (p.s0 >= p.d_in || p.d_out == 1)) p.layout = 0;
    else if (fp32 && p.s0 == 1 && (p.s1 >= p.d_out || p.d_in == 1)) p.layout = 1;
    else p.layout = 2;
    int64_t rows = p.r > kLargeRank ? kLargeRows : kBlockBytes / (4 * p.d_in);
    rows = std::min(p.d_out, std::max<int64_t>(16, rows / 16 * 16));
    for (int64_t r0 = 0; r0 < p.d_out; r0 += rows) jobs.push_back(Job{i, r0, std::min(rows, p.d_out - r0)});
    if (p.layout == 2 || p.r == 0) max_x = std::max(max_x, rows * p.d_in);
    max_t = std::max(max_t, rows * p.r);
  }
  const int64_t nj = static_cast<int64_t>(jobs.size());
  std::vector<double> before(static_cast<size_t>(nj), 0.0), removed(static_cast<size_t>(nj), 0.0);

  at::parallel_for(0, nj, 1, [&](int64_t jb, int64_t je) {
    Buf xbuf = alloc_floats(max_x), tbuf = alloc_floats(max_t);
    for (int64_t j = jb; j < je; ++j) {
      const Job& job = jobs[j];
      const Plan& p = plans[job.target];
      float* x;
      int64_t xs0, xs1;
      if (p.layout == 2 || p.r == 0) {
        x = xbuf.get();
        xs0 = p.d_in;
        xs1 = 1;
        const int64_t off = job.row0 * p.s0;
        switch (p.t.scalar_type()) {
          case at::kFloat:
            gather_rows(p.t.data_ptr<float>() + off, job.rows, p.d_in, p.s0, p.s1, x);
            break;
          case at::kBFloat16:
            gather_rows(p.t.data_ptr<c10::BFloat16>() + off, job.rows, p.d_in, p.s0, p.s1, x);
            break;
          default:
            gather_rows(p.t.data_ptr<c10::Half>() + off, job.rows, p.d_in, p.s0, p.s1, x);
            break;
        }
      } else {
        x = p.t.data_ptr<float>() + job.row0 * p.s0;
        xs0 = p.s0;
        xs1 = p.s1;
      }
      before[j] = sq_sum(x, job.rows, p.d_in, xs0, xs1);
      if (p.r == 0) continue;  // nothing to remove: the target is never written
      float* t = tbuf.get();
      project_block(x, job.rows, p.d_in, xs0, xs1, p.u, p.r, t);
      removed[j] = sq_sum(t, job.rows, p.r, p.r, 1);
      if (p.layout == 2) {
        const int64_t off = job.row0 * p.s0;
        switch (p.t.scalar_type()) {
          case at::kFloat:
            scatter_rows(x, job.rows, p.d_in, p.s0, p.s1, p.t.data_ptr<float>() + off);
            break;
          case at::kBFloat16:
            scatter_rows(x, job.rows, p.d_in, p.s0, p.s1, p.t.data_ptr<c10::BFloat16>() + off);
            break;
          default:
            scatter_rows(x, job.rows, p.d_in, p.s0, p.s1, p.t.data_ptr<c10::Half>() + off);
            break;
        }
      }
    }
  });

  double* sp = stats.data_ptr<double>();
  for (int64_t j = 0; j < nj; ++j) {
    sp[2 * jobs[j].target] += before[j];
    sp[2 * jobs[j].target + 1] += removed[j];
  }
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(ATAX_RS_LIB, CPU, m) {
  m.impl("remove_span_", &remove_span_cpu);
}

}  // namespace atax
