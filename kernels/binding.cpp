// PyTorch binding of the CUDA row kernels (tide_kernels.h). Functions, arguments and results match
// the PyTorch twin in tide_ds/kernels/twin.py, so the tiled ops in tide_ds/kernels/ops.py call either.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "tide_kernels.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kTideF32;
    case at::kHalf: return kTideF16;
    case at::kBFloat16: return kTideBF16;
    default: TORCH_CHECK(false, "tide kernels: logits must be fp32, fp16 or bf16, got ", t.scalar_type());
  }
  return -1;
}

void check_block(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.is_cuda() && z.dim() == 2 && z.is_contiguous(), "tide kernels: ", name,
              " must be a contiguous CUDA [rows, vocab] tensor");
}

// A per-row vector as a contiguous fp32 (or int64) CUDA tensor of `rows` elements.
at::Tensor per_row(const at::Tensor& t, int64_t rows, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.numel() == rows, "tide kernels: ", name, " must be a CUDA tensor of ", rows,
              " elements");
  return t.reshape({rows}).to(type).contiguous();
}

// Targets outside [0, vocab) are refused before any launch, as the twin refuses them (one host
// sync per call).
void check_targets(const at::Tensor& y, int64_t vocab) {
  if (y.numel() == 0) return;
  const auto range = at::aminmax(y);
  const int64_t lo = std::get<0>(range).item<int64_t>(), hi = std::get<1>(range).item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < vocab, "tide kernels: targets must lie in [0, ", vocab, "), got values in [", lo,
                    ", ", hi, "]");
}

void check(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "tide kernels: ", cudaGetErrorString(e)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> lse_target(const at::Tensor& z, const at::Tensor& targets, double scale) {
  check_block(z, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0);
  const at::Tensor y = per_row(targets, rows, at::kLong, "targets");
  check_targets(y, z.size(1));
  at::Tensor lse = at::empty({rows}, z.options().dtype(at::kFloat));
  at::Tensor target_logit = at::empty_like(lse);
  check(tide_lse_target(z.data_ptr(), dtype_code(z), y.data_ptr<int64_t>(), rows, z.size(1), static_cast<float>(scale),
                        lse.data_ptr<float>(), target_logit.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {lse, target_logit};
}

at::Tensor logit_grad_(at::Tensor z, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& coef_target,
                       const at::Tensor& coef_prob, double scale) {
  check_block(z, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0);
  const at::Tensor y = per_row(targets, rows, at::kLong, "targets");
  check_targets(y, z.size(1));
  const at::Tensor l = per_row(lse, rows, at::kFloat, "lse");
  const at::Tensor ct = per_row(coef_target, rows, at::kFloat, "coef_target");
  const at::Tensor cp = per_row(coef_prob, rows, at::kFloat, "coef_prob");
  check(tide_logit_grad(z.data_ptr(), dtype_code(z), y.data_ptr<int64_t>(), rows, z.size(1), static_cast<float>(scale),
                        l.data_ptr<float>(), ct.data_ptr<float>(), cp.data_ptr<float>(),
                        c10::cuda::getCurrentCUDAStream()));
  return z;
}

at::Tensor kl_grad_(at::Tensor zs, const at::Tensor& zt, const at::Tensor& coef, double temperature,
                    const std::optional<at::Tensor>& lam, bool reverse, const std::optional<at::Tensor>& lse,
                    const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& coef_target) {
  check_block(zs, "zs");
  check_block(zt, "zt");
  TORCH_CHECK(zs.size(0) == zt.size(0) && zt.size(1) <= zs.size(1),
              "tide kernels: zt must have zs's rows and at most its width");
  TORCH_CHECK(!(reverse && lam.has_value()), "tide kernels: TIDAL (lam) is a forward KL");
  TORCH_CHECK(coef_target.has_value() == lse.has_value() && coef_target.has_value() == targets.has_value(),
              "tide kernels: lse, targets and coef_target go together");
  const c10::cuda::CUDAGuard guard(zs.device());
  const int64_t rows = zs.size(0);
  const at::Tensor c = per_row(coef, rows, at::kFloat, "coef");
  at::Tensor mix, l1, y, ct;
  if (lam.has_value()) mix = per_row(*lam, rows, at::kFloat, "lam");
  if (coef_target.has_value()) {
    l1 = per_row(*lse, rows, at::kFloat, "lse");
    y = per_row(*targets, rows, at::kLong, "targets");
    check_targets(y, zs.size(1));
    ct = per_row(*coef_target, rows, at::kFloat, "coef_target");
  }
  at::Tensor kl = at::empty({rows}, zs.options().dtype(at::kFloat));
  check(tide_kl_grad(zs.data_ptr(), dtype_code(zs), zs.size(1), zt.data_ptr(), dtype_code(zt), rows, zt.size(1),
                     static_cast<float>(1.0 / temperature), c.data_ptr<float>(),
                     mix.defined() ? mix.data_ptr<float>() : nullptr, reverse ? 1 : 0,
                     l1.defined() ? l1.data_ptr<float>() : nullptr, y.defined() ? y.data_ptr<int64_t>() : nullptr,
                     ct.defined() ? ct.data_ptr<float>() : nullptr, kl.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream()));
  return kl;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA row kernels of tide_ds.kernels (the PyTorch twin is tide_ds.kernels.twin)";
  m.def("lse_target", &lse_target, "(logsumexp(scale z), scale z[target]) per row", py::arg("z"), py::arg("targets"),
        py::arg("scale"));
  m.def("logit_grad_", &logit_grad_, "overwrites z with the logit gradient", py::arg("z"), py::arg("targets"),
        py::arg("lse"), py::arg("coef_target"), py::arg("coef_prob"), py::arg("scale"));
  m.def("kl_grad_", &kl_grad_, "per-row KL; overwrites zs with coef * dKL/dzs (+ a log-prob term's gradient)",
        py::arg("zs"), py::arg("zt"), py::arg("coef"), py::arg("temperature"), py::arg("lam"), py::arg("reverse"),
        py::arg("lse") = py::none(), py::arg("targets") = py::none(), py::arg("coef_target") = py::none());
}
