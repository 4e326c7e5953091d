// CPU kernel of atax::remove_span_: for every target ΔW [d_out, d_in] with an orthonormal basis U [d_in, r],
// ΔW <- ΔW - (ΔW U) Uᵀ in place; returns float64 [n, 2] = (‖ΔW‖² before, ‖ΔW U‖²) per target.
//
// Work is split into fixed blocks of rows of one target (the block size depends only on the shapes, never on
// the thread count). A block is small enough to stay in L2, so T = X U and X -= T Uᵀ read it from cache: ΔW
// streams from DRAM once and back once. OpenMP parallelism is over blocks; each block is computed by one
// thread: for r <= 128 on AVX-512 CPUs by the microkernels below, otherwise by two single-threaded MKL sgemm
// calls. Row-major fp32 targets are updated in place; column-major ones (a GPT-2 Conv1D weight's .t()) in
// place only on the sgemm path; everything else goes through an fp32 copy of the block (bf16/fp16 upcast
// there, rounded once on the way back). Per-block norms are float64 partials summed in block order: same
// bits on every run and every thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
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

// above this rank the op is matmul-bound: taller blocks keep the GEMMs efficient (U no longer fits L2 anyway);
// rows capped so that a block of fp32 rows stays <= 8 MB
constexpr int64_t kLargeRank = 256;
constexpr int64_t kLargeRows = 1024;
// fp32 basis copies (converted, padded, transposed) held at once; a single larger basis is still converted
constexpr int64_t kBasisBatchBytes = int64_t(64) << 20;

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
  at::Tensor t;       // the target as given (may be strided)
  const float* u;     // fp32 contiguous basis [d_in, r] (nullptr when r == 0)
  const float* up;    // microkernel path: U zero-padded to [d_in, 16 nc]
  const float* ut;    // microkernel path: Uᵀ [r, d_in]
  int64_t d_out, d_in, r;
  int64_t s0, s1;     // element strides of the target
  int layout;         // 0: rows unit-stride fp32, 1: columns unit-stride fp32, 2: through an fp32 copy
  bool col;           // layout 2: the copy is column-major (the target is unit-stride along rows)
  int nc;             // > 0: AVX-512 microkernels with 16 nc padded columns; 0: BLAS
};

struct BasisF32 {
  at::Tensor u, up, ut;
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
void to_float(const T* src, float* dst, int64_t len) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) cpu::bf16_to_float(src, dst, len);
  else if constexpr (std::is_same_v<T, c10::Half>) cpu::half_to_float(src, dst, len);
  else std::memcpy(dst, src, static_cast<size_t>(len) * sizeof(float));
}

template <typename T>
void from_float(const float* src, T* dst, int64_t len) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) cpu::float_to_bf16(src, dst, len);
  else if constexpr (std::is_same_v<T, c10::Half>) cpu::float_to_half(src, dst, len);
  else std::memcpy(dst, src, static_cast<size_t>(len) * sizeof(float));
}

// Copy a [rows, cols] block (strides s0, s1) to/from an fp32 buffer, row-major (ld cols) or column-major
// (ld rows), walking the target's unit-stride dimension contiguously.
// Column-major sources: block after block, each column is a short segment (rows elements) of a long storage
// row, so hardware prefetchers never see a stream; `ahead` elements past each segment (the next block's part of
// that storage row) are prefetched while this block is copied.
template <typename T>
void gather(const T* src, int64_t rows, int64_t cols, int64_t s0, int64_t s1, bool col, float* dst,
            int64_t ahead = 0) {
  const int64_t outer = col ? cols : rows, inner = col ? rows : cols;
  const int64_t os = col ? s1 : s0, is = col ? s0 : s1;
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t a = 0; a < outer; ++a) {
    const T* in = src + a * os;
    float* out = dst + a * inner;
    if (col && is == 1)
      for (int64_t b = 0; b < ahead; b += line) __builtin_prefetch(in + inner + b, 0, 2);
    if (is == 1) to_float(in, out, inner);
    else for (int64_t b = 0; b < inner; ++b) out[b] = static_cast<float>(in[b * is]);
  }
}

template <typename T>
void scatter(const float* src, int64_t rows, int64_t cols, int64_t s0, int64_t s1, bool col, T* dst) {
  const int64_t outer = col ? cols : rows, inner = col ? rows : cols;
  const int64_t os = col ? s1 : s0, is = col ? s0 : s1;
  for (int64_t a = 0; a < outer; ++a) {
    T* out = dst + a * os;
    const float* in = src + a * inner;
    if (is == 1) from_float(in, out, inner);
    else for (int64_t b = 0; b < inner; ++b) out[b * is] = static_cast<T>(in[b]);
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

#if ATAX_X86
// ---------------------------------------------------------------------------------------------------------------
// AVX-512 microkernels for r <= 128 (where MKL's small-block GEMMs lose to call overhead and packing). Explicit
// FMA intrinsics in a fixed order: the same bits on every run and thread count.
#define ATAX_AVX512 __attribute__((target("avx512f")))
constexpr int kMaxVecCols = 8;  // r <= 16 * 8

inline bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// T[m, :RP] = sum_k X[m, k] Up[k, :RP] for mr <= MR rows (RP = 16 NC; Up zero-padded [d_in, RP]).
// X element (m, k) at x[m xs0 + k xs1]: any layout (the element is broadcast). Rows past mr repeat row mr-1.
template <int NC, int MR>
ATAX_AVX512 void t_rows(const float* x, int64_t xs0, int64_t xs1, int64_t d_in, const float* up, float* t,
                        int mr) {
  constexpr int RP = 16 * NC;
  __m512 acc[MR][NC];
  const float* xr[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    xr[m] = x + static_cast<int64_t>(m < mr ? m : mr - 1) * xs0;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < d_in; ++k) {
    const float* uk = up + k * RP;
    __m512 u[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) u[c] = _mm512_loadu_ps(uk + 16 * c);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 b = _mm512_set1_ps(xr[m][k * xs1]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_fmadd_ps(b, u[c], acc[m][c]);
    }
  }
  for (int m = 0; m < mr; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(t + m * RP + 16 * c, acc[m][c]);
}

template <int NC, int MR>
ATAX_AVX512 void t_block_impl(const float* x, int64_t rows, int64_t xs0, int64_t xs1, int64_t d_in,
                              const float* up, float* t) {
  for (int64_t m0 = 0; m0 < rows; m0 += MR)
    t_rows<NC, MR>(x + m0 * xs0, xs0, xs1, d_in, up, t + m0 * 16 * NC, static_cast<int>(std::min<int64_t>(MR, rows - m0)));
}

void t_block(int nc, const float* x, int64_t rows, int64_t xs0, int64_t xs1, int64_t d_in, const float* up,
             float* t) {
  switch (nc) {
    case 1: return t_block_impl<1, 8>(x, rows, xs0, xs1, d_in, up, t);
    case 2: return t_block_impl<2, 8>(x, rows, xs0, xs1, d_in, up, t);
    case 3: return t_block_impl<3, 6>(x, rows, xs0, xs1, d_in, up, t);
    case 4: return t_block_impl<4, 6>(x, rows, xs0, xs1, d_in, up, t);
    case 5: return t_block_impl<5, 4>(x, rows, xs0, xs1, d_in, up, t);
    case 6: return t_block_impl<6, 4>(x, rows, xs0, xs1, d_in, up, t);
    case 7: return t_block_impl<7, 3>(x, rows, xs0, xs1, d_in, up, t);
    default: return t_block_impl<8, 2>(x, rows, xs0, xs1, d_in, up, t);
  }
}

// Row-major X (unit stride along d_in): X[m, k] -= sum_j T[m, j] Ut[j, k], MR rows share each Ut load.
constexpr int kSubRows = 8;
ATAX_AVX512 void sub_rowmajor(float* x, int64_t rows, int64_t xs0, int64_t d_in, const float* t, int64_t ldt,
                              const float* ut, int64_t r) {
  for (int64_t m0 = 0; m0 < rows; m0 += kSubRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kSubRows, rows - m0));
    float* xr[kSubRows];
    const float* tr[kSubRows];
#pragma GCC unroll 8
    for (int m = 0; m < kSubRows; ++m) {
      const int64_t mm = m0 + (m < mr ? m : mr - 1);  // repeated rows compute and store identical values
      xr[m] = x + mm * xs0;
      tr[m] = t + mm * ldt;
    }
    for (int64_t k = 0; k < d_in; k += 16) {
      const __mmask16 mk = tail_mask(d_in - k);
      __m512 xs[kSubRows];
#pragma GCC unroll 8
      for (int m = 0; m < kSubRows; ++m) xs[m] = _mm512_maskz_loadu_ps(mk, xr[m] + k);
      for (int64_t j = 0; j < r; ++j) {
        const __m512 u = _mm512_maskz_loadu_ps(mk, ut + j * d_in + k);
#pragma GCC unroll 8
        for (int m = 0; m < kSubRows; ++m) xs[m] = _mm512_fnmadd_ps(_mm512_set1_ps(tr[m][j]), u, xs[m]);
      }
#pragma GCC unroll 8
      for (int m = 0; m < kSubRows; ++m) _mm512_mask_storeu_ps(xr[m] + k, mk, xs[m]);
    }
  }
}

// Column-major X (unit stride along rows, column k at x + k ld): X[:, k] -= sum_j Tt[j, :] U[k, j], NK columns
// share each Tt load. Tt = Tᵀ [r, rows] with ld ldtt; U [d_in, r] row-major with ld ldu.
constexpr int kSubCols = 8;
ATAX_AVX512 void sub_colmajor(float* x, int64_t rows, int64_t ld, int64_t d_in, const float* tt, int64_t ldtt,
                              const float* u, int64_t ldu, int64_t r) {
  for (int64_t k0 = 0; k0 < d_in; k0 += kSubCols) {
    const int nk = static_cast<int>(std::min<int64_t>(kSubCols, d_in - k0));
    float* xc[kSubCols];
    const float* uc[kSubCols];
#pragma GCC unroll 8
    for (int n = 0; n < kSubCols; ++n) {
      const int64_t kk = k0 + (n < nk ? n : nk - 1);
      xc[n] = x + kk * ld;
      uc[n] = u + kk * ldu;
    }
    for (int64_t m = 0; m < rows; m += 16) {
      const __mmask16 mm = tail_mask(rows - m);
      __m512 xs[kSubCols];
#pragma GCC unroll 8
      for (int n = 0; n < kSubCols; ++n) xs[n] = _mm512_maskz_loadu_ps(mm, xc[n] + m);
      for (int64_t j = 0; j < r; ++j) {
        const __m512 tv = _mm512_maskz_loadu_ps(mm, tt + j * ldtt + m);
#pragma GCC unroll 8
        for (int n = 0; n < kSubCols; ++n) xs[n] = _mm512_fnmadd_ps(tv, _mm512_set1_ps(uc[n][j]), xs[n]);
      }
#pragma GCC unroll 8
      for (int n = 0; n < kSubCols; ++n) _mm512_mask_storeu_ps(xc[n] + m, mm, xs[n]);
    }
  }
}
#endif  // ATAX_X86

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

template <typename F>
void with_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    default: f(static_cast<c10::Half*>(nullptr)); break;
  }
}

at::Tensor remove_span_cpu(at::TensorList targets, const c10::List<std::optional<at::Tensor>>& bases) {
  check_args(targets, bases);
  const int64_t n = static_cast<int64_t>(targets.size());
  at::Tensor stats = at::zeros({n, 2}, at::TensorOptions().dtype(at::kDouble));
  if (n == 0) return stats;
#if ATAX_X86
  // ATAX_CPU_NO_AVX512=1 takes the BLAS path everywhere (lets tests cover what non-AVX-512 CPUs run)
  const char* no_micro = std::getenv("ATAX_CPU_NO_AVX512");
  const bool micro = has_avx512() && !(no_micro && no_micro[0] == '1');
#else
  const bool micro = false;
#endif

  // Targets grouped by basis tensor (q/k/v share one), in order of first appearance. A group's basis is
  // converted (fp32, padded, transposed) just before its blocks run and freed after, so the extra memory is
  // at most kBasisBatchBytes (or one basis's copies) plus the per-thread block scratch.
  std::vector<Plan> plans(static_cast<size_t>(n));
  std::vector<const void*> group_key;
  std::vector<std::vector<int64_t>> group_members;
  std::unordered_map<const void*, size_t> group_of;
  for (int64_t i = 0; i < n; ++i) {
    Plan& p = plans[i];
    p.t = targets[i];
    p.d_out = p.t.size(0);
    p.d_in = p.t.size(1);
    p.s0 = p.t.stride(0);
    p.s1 = p.t.stride(1);
    p.u = p.up = p.ut = nullptr;
    const std::optional<at::Tensor> ub = bases.get(i);
    const bool has = ub.has_value() && ub->defined() && ub->size(1) > 0;
    p.r = has ? ub->size(1) : 0;
    p.nc = (has && micro && p.r <= 16 * kMaxVecCols) ? static_cast<int>((p.r + 15) / 16) : 0;
    const bool fp32 = p.t.scalar_type() == at::kFloat;
    // Column-major fp32 (a Conv1D weight's .t()) runs in place only on the BLAS path: the microkernels are
    // faster on a compact copy (measured 41 vs 60 ms for GPT-2 small at r = 16): a block's columns lie
    // d_out floats apart in memory, so in place each block touches d_in short segments of d_in pages.
    if (fp32 && p.s1 == 1 && (p.s0 >= p.d_in || p.d_out == 1)) p.layout = 0;
    else if (fp32 && p.nc == 0 && p.s0 == 1 && (p.s1 >= p.d_out || p.d_in == 1)) p.layout = 1;
    else p.layout = 2;
    p.col = p.s0 == 1 && p.s1 != 1;
    if (p.t.numel() == 0) continue;
    const void* key = has ? static_cast<const void*>(ub->unsafeGetTensorImpl()) : nullptr;
    auto it = group_of.find(key);
    if (it == group_of.end()) {
      it = group_of.emplace(key, group_key.size()).first;
      group_key.push_back(key);
      group_members.emplace_back();
    }
    group_members[it->second].push_back(i);
  }

  double* sp = stats.data_ptr<double>();
  // Groups run in batches: bases converted until the batch holds kBasisBatchBytes of copies, then one parallel
  // region for all the batch's blocks (one barrier per batch, not per basis: a barrier costs a whole time
  // slice when the machine is oversubscribed).
  const size_t ngroups = group_key.size();
  for (size_t g0 = 0; g0 < ngroups;) {
    std::vector<BasisF32> held;
    std::vector<Job> jobs;
    int64_t max_x = 0, max_t = 0, held_bytes = 0;
    size_t g = g0;
    for (; g < ngroups && (g == g0 || held_bytes < kBasisBatchBytes); ++g) {
      const std::vector<int64_t>& members = group_members[g];
      BasisF32 b;
      if (group_key[g] != nullptr) {
        const int64_t i0 = members[0];
        const Plan& p0 = plans[i0];
        b.u = bases.get(i0)->to(at::kFloat).contiguous();
        held_bytes += b.u.numel() * 4;
        if (p0.nc > 0) {
          if (p0.r % 16 == 0) {
            b.up = b.u;  // already [d_in, 16 nc]
          } else {
            b.up = at::zeros({p0.d_in, 16 * p0.nc}, b.u.options());
            b.up.narrow(1, 0, p0.r).copy_(b.u);
            held_bytes += b.up.numel() * 4;
          }
          b.ut = b.u.t().contiguous();
          held_bytes += b.ut.numel() * 4;
        }
      }
      for (int64_t i : members) {
        Plan& p = plans[i];
        if (b.u.defined()) {
          p.u = b.u.data_ptr<float>();
          if (p.nc > 0) {
            p.up = b.up.data_ptr<float>();
            p.ut = b.ut.data_ptr<float>();
          }
        }
        int64_t rows = p.r > kLargeRank
                           ? std::min<int64_t>(kLargeRows, (8 << 20) / (4 * std::max<int64_t>(p.d_in, 1)))
                           : kBlockBytes / (4 * std::max<int64_t>(p.d_in, 1));
        rows = std::min(p.d_out, std::max<int64_t>(16, rows / 16 * 16));
        for (int64_t r0 = 0; r0 < p.d_out; r0 += rows) jobs.push_back(Job{i, r0, std::min(rows, p.d_out - r0)});
        if (p.layout == 2 || p.r == 0) max_x = std::max(max_x, rows * p.d_in);
        max_t = std::max(max_t, rows * std::max<int64_t>(p.r, 16 * p.nc));
      }
      held.push_back(std::move(b));
    }
    g0 = g;
    const int64_t nj = static_cast<int64_t>(jobs.size());
    std::vector<double> before(static_cast<size_t>(nj), 0.0), removed(static_cast<size_t>(nj), 0.0);
    at::parallel_for(0, nj, 1, [&](int64_t jb, int64_t je) {
      Buf xbuf = alloc_floats(max_x), tbuf = alloc_floats(max_t), ttbuf = alloc_floats(max_t);
      for (int64_t j = jb; j < je; ++j) {
        const Job& job = jobs[j];
        const Plan& p = plans[job.target];
        const int64_t rows = job.rows, off = job.row0 * p.s0;
        float* x;
        int64_t xs0, xs1;
        const bool copy = p.layout == 2 || p.r == 0;
        if (copy) {
          x = xbuf.get();
          xs0 = p.col ? 1 : p.d_in;
          xs1 = p.col ? rows : 1;
          with_dtype(p.t.scalar_type(), [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            const int64_t ahead = std::min(rows, p.d_out - job.row0 - rows);  // the next block's rows
            gather(static_cast<const T*>(p.t.data_ptr()) + off, rows, p.d_in, p.s0, p.s1, p.col, x, ahead);
          });
        } else {
          x = p.t.data_ptr<float>() + off;
          xs0 = p.s0;
          xs1 = p.s1;
        }
        before[j] = sq_sum(x, rows, p.d_in, xs0, xs1);
        if (p.r == 0) continue;  // nothing to remove: the target is never written
        float* t = tbuf.get();
        const bool colmajor = xs0 == 1 && !(xs1 == 1 && (xs0 >= p.d_in || rows == 1));
#if ATAX_X86
        if (p.nc > 0) {
          const int64_t rp = 16 * p.nc;
          t_block(p.nc, x, rows, xs0, xs1, p.d_in, p.up, t);
          removed[j] = sq_sum(t, rows, rp, rp, 1);  // padded columns are exact zeros
          if (colmajor) {
            float* tt = ttbuf.get();
            for (int64_t m = 0; m < rows; ++m)
              for (int64_t c = 0; c < p.r; ++c) tt[c * rows + m] = t[m * rp + c];
            sub_colmajor(x, rows, xs1, p.d_in, tt, rows, p.u, p.r, p.r);
          } else {
            sub_rowmajor(x, rows, xs0, p.d_in, t, rp, p.ut, p.r);
          }
        } else
#endif
        {
          project_block(x, rows, p.d_in, xs0, xs1, p.u, p.r, t);
          removed[j] = sq_sum(t, rows, p.r, p.r, 1);
        }
        if (copy) {
          with_dtype(p.t.scalar_type(), [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            scatter(x, rows, p.d_in, p.s0, p.s1, p.col, static_cast<T*>(p.t.data_ptr()) + off);
          });
        }
      }
    });
    for (int64_t j = 0; j < nj; ++j) {  // job order: independent of the thread count
      sp[2 * jobs[j].target] += before[j];
      sp[2 * jobs[j].target + 1] += removed[j];
    }
  }
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(ATAX_RS_LIB, CPU, m) {
  m.impl("remove_span_", &remove_span_cpu);
}

}  // namespace atax
