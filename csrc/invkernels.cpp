// The one place where the schemas of torch.ops.invkernels are defined, plus the pybind11 module
// invkernels._C that reports how the extension was built. Kernels live in csrc/cpu and csrc/cuda
// and register with TORCH_LIBRARY_IMPL only; tensor ops are never bound through pybind11.

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifndef INVK_CUDA_ARCHS
#define INVK_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(invkernels, m) {
  // Coupling layers: docs/ops/coupling.md. The first `passthrough` channels of x pass through and
  // the others are transformed; C // 2 pass through when it is None.
  m.def(
      "affine_coupling_fwd(Tensor x, Tensor h, str scale, float clamp, int? passthrough=None) -> "
      "(Tensor y, Tensor logdet)");
  m.def(
      "affine_coupling_inv(Tensor y, Tensor h, str scale, float clamp, int? passthrough=None) -> "
      "(Tensor x, Tensor logdet)");
  m.def(
      "affine_coupling_bwd(Tensor grad_out, Tensor grad_logdet, Tensor x, Tensor h, str scale, float clamp, "
      "bool reverse, int? passthrough=None) -> (Tensor grad_in, Tensor grad_h)");
  // Inverse and backward in one pass (memory-free backprop): x rebuilt from y, and the VJP of the
  // forward at x.
  m.def(
      "affine_coupling_inv_bwd(Tensor y, Tensor h, Tensor grad_y, Tensor grad_logdet, str scale, float clamp, "
      "int? passthrough=None) -> (Tensor x, Tensor grad_x, Tensor grad_h)");
  m.def("additive_coupling_fwd(Tensor x, Tensor h, int? passthrough=None) -> Tensor");
  m.def("additive_coupling_inv(Tensor y, Tensor h, int? passthrough=None) -> Tensor");
  // grad_h has the transformed channels and the batch and spatial sizes of grad_out.
  m.def(
      "additive_coupling_bwd(Tensor grad_out, bool reverse, int? passthrough=None) -> "
      "(Tensor grad_in, Tensor grad_h)");
  m.def(
      "additive_coupling_inv_bwd(Tensor y, Tensor h, Tensor grad_y, int? passthrough=None) -> "
      "(Tensor x, Tensor grad_x, Tensor grad_h)");

  // ActNorm: docs/ops/actnorm.md.
  m.def("actnorm_fwd(Tensor x, Tensor bias, Tensor log_scale) -> (Tensor y, Tensor logdet)");
  m.def("actnorm_inv(Tensor y, Tensor bias, Tensor log_scale) -> (Tensor x, Tensor logdet)");
  m.def(
      "actnorm_bwd(Tensor grad_out, Tensor grad_logdet, Tensor x, Tensor bias, Tensor log_scale, bool reverse) "
      "-> (Tensor grad_in, Tensor grad_bias, Tensor grad_log_scale)");

  // Rational-quadratic spline (neural spline flows), elementwise on x with per-element parameters
  // h; the first `passthrough` channels of x are copied through (a coupling's untouched half):
  // docs/ops/spline.md.
  m.def(
      "rq_spline_fwd(Tensor x, Tensor h, int bins, float tail_bound=3.0, float min_bin_width=0.001, "
      "float min_bin_height=0.001, float min_derivative=0.001, int passthrough=0) -> (Tensor y, Tensor logdet)");
  m.def(
      "rq_spline_inv(Tensor y, Tensor h, int bins, float tail_bound=3.0, float min_bin_width=0.001, "
      "float min_bin_height=0.001, float min_derivative=0.001, int passthrough=0) -> (Tensor x, Tensor logdet)");
  // The VJP of the forward at its input x (reverse false) or of the inverse at its output x
  // (reverse true).
  m.def(
      "rq_spline_bwd(Tensor grad_out, Tensor grad_logdet, Tensor x, Tensor h, int bins, float tail_bound, "
      "float min_bin_width, float min_bin_height, float min_derivative, bool reverse, int passthrough=0) -> "
      "(Tensor grad_in, Tensor grad_h)");
  // Inverse and backward in one pass (memory-free backprop): x rebuilt from y, and the VJP of the
  // forward at x.
  m.def(
      "rq_spline_inv_bwd(Tensor y, Tensor h, Tensor grad_y, Tensor grad_logdet, int bins, float tail_bound, "
      "float min_bin_width, float min_bin_height, float min_derivative, int passthrough=0) -> (Tensor x, "
      "Tensor grad_x, Tensor grad_h)");

  // LU-decomposed invertible 1x1 convolution, weight assembly: docs/ops/invconv.md.
  m.def("invconv_weight(Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s) -> Tensor");
  m.def(
      "invconv_weight_bwd(Tensor grad_w, Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s) "
      "-> (Tensor grad_lower, Tensor grad_upper, Tensor grad_log_s)");
  // Its per-position product, optionally with an ActNorm folded in (bias, log_scale).
  m.def("conv1x1(Tensor x, Tensor weight, Tensor? bias=None, Tensor? log_scale=None) -> Tensor");
  m.def(
      "conv1x1_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor? log_scale, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_log_scale)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "invkernels C++ extension: op schemas and build information";
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef INVK_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = std::string(INVK_CUDA_ARCHS);
    info["torch_version_built"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                                  "." + std::to_string(TORCH_VERSION_PATCH);
    return info;
  });
}
