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

TORCH_LIBRARY(semanticgen, m) {
  m.def("build_info() -> str", &build_info);
  // Fused rectified-flow ops: schemas below, kernels in csrc/cpu/ and csrc/cuda/.
}

}  // namespace semanticgen
