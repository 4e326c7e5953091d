// Shared helpers for the atax:: ops (CPU and CUDA). Plain C++ (includable from .cu files).
#pragma once

#include <ATen/ATen.h>
#include <cstdint>
#include <vector>

namespace atax {

// Fixed chunk size in elements: independent of thread / block count, so the set of per-chunk
// partials (and their fixed summation order) is the same on every run and every thread count.
constexpr int64_t kChunkElems = int64_t(1) << 16;

struct Chunk {
  int64_t tensor;  // tensor index i in [0, n)
  int64_t start;   // first element inside tensor i
  int64_t len;     // number of elements (1 .. kChunkElems)
};

// Chunk table over tensor sizes: tensor-major, each tensor split into kChunkElems pieces (last one
// shorter). Zero-size tensors contribute no chunk. If `skip` is given, tensors with skip[i] true are
// left out (used by combine_ for tensors whose coefficients are all zero).
inline std::vector<Chunk> build_chunks(const std::vector<int64_t>& numels,
                                       int64_t chunk = kChunkElems,
                                       const std::vector<bool>* skip = nullptr) {
  std::vector<Chunk> out;
  int64_t total = 0;
  for (int64_t ne : numels) total += (ne + chunk - 1) / chunk;
  out.reserve(static_cast<size_t>(total));
  for (size_t i = 0; i < numels.size(); ++i) {
    if (skip && (*skip)[i]) continue;
    const int64_t ne = numels[i];
    for (int64_t s = 0; s < ne; s += chunk) {
      out.push_back(Chunk{static_cast<int64_t>(i), s, std::min(chunk, ne - s)});
    }
  }
  return out;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Argument checks shared by every backend (defined in csrc/ops.cpp).
// gram: returns n (tensors per vector).
int64_t check_gram_args(at::TensorList vectors, int64_t m);
// combine_: returns k (number of vectors); n = target.size().
int64_t check_combine_args(at::TensorList target, at::TensorList vectors, const at::Tensor& coefs);

}  // namespace atax
