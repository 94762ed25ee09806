// semanticgen._C: the one place where every compiled op's schema is declared.
//
// Devices register their kernels separately with TORCH_LIBRARY_IMPL (csrc/cpu/, csrc/cuda/);
// fake (meta) kernels and autograd are registered in Python next to the typed wrappers
// (semanticgen/ops/).
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef SEMANTICGEN_CUDA_ARCHS
#define SEMANTICGEN_CUDA_ARCHS ""
#endif

extern "C" {
// Importing `semanticgen._C` runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Compiled kernels of semanticgen (ops live under torch.ops.semanticgen)",
      -1,       // size of per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace semanticgen {

// "cuda=<archs>" when the CUDA sources were compiled in, "cuda=" otherwise.
std::string build_info() {
#ifdef SEMANTICGEN_WITH_CUDA
  return std::string("cuda=") + SEMANTICGEN_CUDA_ARCHS;
#else
  return std::string("cuda=");
#endif
}

namespace flow {
// "avx2" or "avx512": the variant of the CPU flow kernels in use (csrc/cpu/flow_ops_cpu.cpp).
std::string cpu_capability();
}  // namespace flow

TORCH_LIBRARY(semanticgen, m) {
  m.def("build_info() -> str", &build_info);
  m.def("cpu_capability() -> str", &flow::cpu_capability);
  // Fused rectified-flow ops: kernels in csrc/cpu/flow_ops_cpu.cpp and csrc/cuda/flow_ops_cuda.cu,
  // typed wrappers, fake kernels and autograd in semanticgen/ops/flow.py.
  // A scalar operand (dt, guidance, t) is `Tensor? x, float x_value`: a float32 tensor of shape []
  // or [B] on the op's device (read on the device: no host sync) or, when it is None, the float.
  // `*_out` writes into preallocated outputs (which must not alias an input); `*_` updates z in place.
  m.def("euler_step(Tensor z, Tensor v, Tensor? dt, float dt_value) -> Tensor");
  m.def("euler_step_out(Tensor z, Tensor v, Tensor? dt, float dt_value, Tensor(a!) out) -> ()");
  m.def("euler_step_(Tensor(a!) z, Tensor v, Tensor? dt, float dt_value) -> ()");
  m.def(
      "cfg_euler_step(Tensor z, Tensor v_cond, Tensor v_uncond, Tensor? guidance, float guidance_value, "
      "Tensor? dt, float dt_value) -> Tensor");
  m.def(
      "cfg_euler_step_out(Tensor z, Tensor v_cond, Tensor v_uncond, Tensor? guidance, float guidance_value, "
      "Tensor? dt, float dt_value, Tensor(a!) out) -> ()");
  m.def(
      "cfg_euler_step_(Tensor(a!) z, Tensor v_cond, Tensor v_uncond, Tensor? guidance, float guidance_value, "
      "Tensor? dt, float dt_value) -> ()");
  m.def("flow_noising(Tensor z0, Tensor eps, Tensor? t, float t_value) -> (Tensor, Tensor)");
  m.def(
      "flow_noising_out(Tensor z0, Tensor eps, Tensor? t, float t_value, Tensor(a!) z_t, Tensor(b!) u) -> ()");
  m.def("flow_matching_loss(Tensor v_pred, Tensor z0, Tensor eps) -> Tensor");
  m.def("flow_matching_loss_backward(Tensor grad, Tensor v_pred, Tensor z0, Tensor eps) -> Tensor");
}

}  // namespace semanticgen
