// Interface between the per-capability CPU kernels of the fused rectified-flow ops and the one
// file that registers them (flow_ops_cpu.cpp).
//
// flow_kernels_cpu_impl.h is compiled twice: flow_kernels_avx2.cpp (256-bit Vectorized<float>) and
// flow_kernels_avx512.cpp (512-bit, built with AVX-512 flags by setup.py). Each copy lives in its
// own namespace and hands out a table of its entry points; the registering file picks one table
// once, at the first call, from what the CPU supports (or SEMANTICGEN_CPU_CAPABILITY).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace semanticgen::flow {

struct FlowCpuKernels {
  const char* name;  // "avx2" or "avx512", as reported by torch.ops.semanticgen.cpu_capability()
  void (*euler_step_into)(const at::Tensor& z, const at::Tensor& v, const std::optional<at::Tensor>& dt,
                          double dt_value, const at::Tensor& out);
  void (*cfg_euler_step_into)(const at::Tensor& z, const at::Tensor& v_cond, const at::Tensor& v_uncond,
                              const std::optional<at::Tensor>& guidance, double guidance_value,
                              const std::optional<at::Tensor>& dt, double dt_value, const at::Tensor& out);
  void (*flow_noising_into)(const at::Tensor& z0, const at::Tensor& eps, const std::optional<at::Tensor>& t,
                            double t_value, const at::Tensor& z_t, const at::Tensor& u);
  at::Tensor (*flow_matching_loss)(const at::Tensor& v_pred, const at::Tensor& z0, const at::Tensor& eps);
  at::Tensor (*flow_matching_loss_backward)(const at::Tensor& grad, const at::Tensor& v_pred, const at::Tensor& z0,
                                            const at::Tensor& eps);
};

namespace avx2 {
const FlowCpuKernels& kernels();
}

#ifdef SEMANTICGEN_WITH_AVX512_KERNELS
namespace avx512 {
const FlowCpuKernels& kernels();
}
#endif

}  // namespace semanticgen::flow
