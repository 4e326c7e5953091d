// Schemas of the atax:: custom ops and the argument checks shared by the CPU and CUDA kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

namespace atax {

namespace {
void check_float_tensor(const at::Tensor& t, const char* what, size_t idx) {
  TORCH_CHECK(t.defined(), "atax: ", what, "[", idx, "] is undefined");
  TORCH_CHECK(is_supported_float(t.scalar_type()), "atax: ", what, "[", idx,
              "] has dtype ", t.scalar_type(), "; expected float32, bfloat16 or float16");
  TORCH_CHECK(t.layout() == at::kStrided, "atax: ", what, "[", idx, "] must be a dense (strided) tensor");
}
}  // namespace

int64_t check_gram_args(at::TensorList vectors, int64_t m) {
  TORCH_CHECK(m >= 1, "atax::gram: m must be >= 1, got ", m);
  const int64_t total = static_cast<int64_t>(vectors.size());
  TORCH_CHECK(total >= m && total % m == 0, "atax::gram: the flat list has ", total,
              " tensors, which is not a positive multiple of m = ", m);
  const int64_t n = total / m;
  const auto dev = vectors[0].device();
  for (int64_t f = 0; f < total; ++f) {
    const auto& t = vectors[f];
    check_float_tensor(t, "vectors", f);
    TORCH_CHECK(t.device() == dev, "atax::gram: vectors[", f, "] is on ", t.device(),
                " but vectors[0] is on ", dev);
    const auto& ref = vectors[f % n];
    TORCH_CHECK(t.sizes().equals(ref.sizes()), "atax::gram: vectors[", f, "] (list ", f / n,
                ", tensor ", f % n, ") has shape ", t.sizes(), " but list 0 tensor ", f % n,
                " has shape ", ref.sizes());
  }
  return n;
}

int64_t check_combine_args(at::TensorList target, at::TensorList vectors, const at::Tensor& coefs) {
  const int64_t n = static_cast<int64_t>(target.size());
  TORCH_CHECK(n >= 1, "atax::combine_: target must hold at least one tensor");
  const int64_t total = static_cast<int64_t>(vectors.size());
  TORCH_CHECK(total % n == 0, "atax::combine_: the flat vectors list has ", total,
              " tensors, which is not a multiple of len(target) = ", n);
  const int64_t k = total / n;
  const auto dev = target[0].device();
  for (int64_t i = 0; i < n; ++i) {
    check_float_tensor(target[i], "target", i);
    TORCH_CHECK(target[i].device() == dev, "atax::combine_: target[", i, "] is on ",
                target[i].device(), " but target[0] is on ", dev);
  }
  for (int64_t f = 0; f < total; ++f) {
    const auto& t = vectors[f];
    check_float_tensor(t, "vectors", f);
    TORCH_CHECK(t.device() == dev, "atax::combine_: vectors[", f, "] is on ", t.device(),
                " but target[0] is on ", dev);
    TORCH_CHECK(t.sizes().equals(target[f % n].sizes()), "atax::combine_: vectors[", f,
                "] (list ", f / n, ", tensor ", f % n, ") has shape ", t.sizes(), " but target[",
                f % n, "] has shape ", target[f % n].sizes());
  }
  TORCH_CHECK(coefs.defined(), "atax::combine_: coefs is undefined");
  TORCH_CHECK(coefs.scalar_type() == at::kDouble, "atax::combine_: coefs must be float64, got ",
              coefs.scalar_type());
  TORCH_CHECK(coefs.device() == dev, "atax::combine_: coefs is on ", coefs.device(),
              " but the tensors are on ", dev);
  const bool ok_global = coefs.dim() == 1 && coefs.size(0) == k;
  const bool ok_per = coefs.dim() == 2 && coefs.size(0) == n && coefs.size(1) == k;
  TORCH_CHECK(ok_global || ok_per, "atax::combine_: coefs must have shape [k] = [", k,
              "] or [n, k] = [", n, ", ", k, "], got ", coefs.sizes());
  return k;
}

}  // namespace atax

TORCH_LIBRARY(atax, m) {
  m.def("gram(Tensor[] vectors, int m, bool per_tensor) -> Tensor");
  m.def("combine_(Tensor(a!)[] target, Tensor[] vectors, Tensor coefs) -> ()");
  m.def("remove_span_(Tensor(a!)[] targets, Tensor?[] bases) -> Tensor");
}

// Empty Python module: importing it registers the ops with the dispatcher.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "atax_kernels C++ extension (ops live in torch.ops.atax)";
}
