// Registers the CPU kernels of the fused rectified-flow ops (schemas in csrc/semanticgen.cpp).
//
// The kernels are compiled once per CPU capability (flow_kernels_avx2.cpp, flow_kernels_avx512.cpp,
// both from flow_kernels_cpu_impl.h). The variant is chosen once, at the first call: AVX-512 when
// it was built and the CPU has AVX512F/BW/VL/DQ, AVX2 otherwise; SEMANTICGEN_CPU_CAPABILITY=avx2 or
// avx512 forces one (an error, raised from every call, when the forced one cannot run here).
// Why two: these ops are memory-bound, yet on an AVX-512 CPU with 2 threads the AVX2 build of the
// in-place Euler step ran about 20% slower than ATen's own (AVX-512) add_; 512-bit loads and
// stores close that gap (semanticgen.benchmarks.flow_ops, SEMANTICGEN_CPU_CAPABILITY=avx2 vs unset).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "flow_kernels_cpu.h"

namespace semanticgen::flow {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const FlowCpuKernels& choose_kernels() {
  const char* env = std::getenv("SEMANTICGEN_CPU_CAPABILITY");
  const std::string requested = env == nullptr ? "" : env;
  TORCH_CHECK(requested.empty() || requested == "avx2" || requested == "avx512",
              "semanticgen flow ops: SEMANTICGEN_CPU_CAPABILITY must be 'avx2' or 'avx512' (or unset), got '",
              requested, "'");
#ifdef SEMANTICGEN_WITH_AVX512_KERNELS
  const bool built_avx512 = true;
#else
  const bool built_avx512 = false;
#endif
  if (requested == "avx512") {
    TORCH_CHECK(built_avx512, "semanticgen flow ops: SEMANTICGEN_CPU_CAPABILITY=avx512, but semanticgen._C was built "
                "without the AVX-512 kernels");
    TORCH_CHECK(cpu_has_avx512(), "semanticgen flow ops: SEMANTICGEN_CPU_CAPABILITY=avx512, but this CPU lacks one of "
                "AVX512F/BW/VL/DQ");
  }
#ifdef SEMANTICGEN_WITH_AVX512_KERNELS
  if (requested != "avx2" && cpu_has_avx512()) return avx512::kernels();
#endif
  return avx2::kernels();
}

// Chosen once; a failed choice (bad environment variable) is retried, and raises, on every call.
const FlowCpuKernels& active() {
  static const FlowCpuKernels& table = choose_kernels();
  return table;
}

at::Tensor euler_step(const at::Tensor& z, const at::Tensor& v, const std::optional<at::Tensor>& dt, double dt_value) {
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  active().euler_step_into(z, v, dt, dt_value, out);
  return out;
}

void euler_step_out(const at::Tensor& z, const at::Tensor& v, const std::optional<at::Tensor>& dt, double dt_value,
                    at::Tensor out) {
  active().euler_step_into(z, v, dt, dt_value, out);
}

void euler_step_inplace(at::Tensor z, const at::Tensor& v, const std::optional<at::Tensor>& dt, double dt_value) {
  active().euler_step_into(z, v, dt, dt_value, z);
}

at::Tensor cfg_euler_step(const at::Tensor& z, const at::Tensor& v_cond, const at::Tensor& v_uncond,
                          const std::optional<at::Tensor>& guidance, double guidance_value,
                          const std::optional<at::Tensor>& dt, double dt_value) {
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  active().cfg_euler_step_into(z, v_cond, v_uncond, guidance, guidance_value, dt, dt_value, out);
  return out;
}

void cfg_euler_step_out(const at::Tensor& z, const at::Tensor& v_cond, const at::Tensor& v_uncond,
                        const std::optional<at::Tensor>& guidance, double guidance_value,
                        const std::optional<at::Tensor>& dt, double dt_value, at::Tensor out) {
  active().cfg_euler_step_into(z, v_cond, v_uncond, guidance, guidance_value, dt, dt_value, out);
}

void cfg_euler_step_inplace(at::Tensor z, const at::Tensor& v_cond, const at::Tensor& v_uncond,
                            const std::optional<at::Tensor>& guidance, double guidance_value,
                            const std::optional<at::Tensor>& dt, double dt_value) {
  active().cfg_euler_step_into(z, v_cond, v_uncond, guidance, guidance_value, dt, dt_value, z);
}

std::tuple<at::Tensor, at::Tensor> flow_noising(const at::Tensor& z0, const at::Tensor& eps,
                                                const std::optional<at::Tensor>& t, double t_value) {
  at::Tensor z_t = at::empty_like(z0, at::MemoryFormat::Contiguous);
  at::Tensor u = at::empty_like(z0, at::MemoryFormat::Contiguous);
  active().flow_noising_into(z0, eps, t, t_value, z_t, u);
  return {z_t, u};
}

void flow_noising_out(const at::Tensor& z0, const at::Tensor& eps, const std::optional<at::Tensor>& t, double t_value,
                      at::Tensor z_t, at::Tensor u) {
  active().flow_noising_into(z0, eps, t, t_value, z_t, u);
}

at::Tensor flow_matching_loss(const at::Tensor& v_pred, const at::Tensor& z0, const at::Tensor& eps) {
  return active().flow_matching_loss(v_pred, z0, eps);
}

at::Tensor flow_matching_loss_backward(const at::Tensor& grad, const at::Tensor& v_pred, const at::Tensor& z0,
                                       const at::Tensor& eps) {
  return active().flow_matching_loss_backward(grad, v_pred, z0, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(semanticgen, CPU, m) {
  m.impl("euler_step", &euler_step);
  m.impl("euler_step_out", &euler_step_out);
  m.impl("euler_step_", &euler_step_inplace);
  m.impl("cfg_euler_step", &cfg_euler_step);
  m.impl("cfg_euler_step_out", &cfg_euler_step_out);
  m.impl("cfg_euler_step_", &cfg_euler_step_inplace);
  m.impl("flow_noising", &flow_noising);
  m.impl("flow_noising_out", &flow_noising_out);
  m.impl("flow_matching_loss", &flow_matching_loss);
  m.impl("flow_matching_loss_backward", &flow_matching_loss_backward);
}

// Declared, as a catch-all kernel (it has no tensor argument), in csrc/semanticgen.cpp.
std::string cpu_capability() { return active().name; }

}  // namespace semanticgen::flow
