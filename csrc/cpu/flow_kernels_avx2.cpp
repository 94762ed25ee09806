// The CPU flow kernels with 256-bit at::vec::Vectorized<float> (setup.py compiles every C++ file
// with -mavx2 -mfma -mf16c). Runs on any x86-64 CPU with AVX2.
#if !defined(__AVX2__) || !defined(__FMA__)
#error "flow_kernels_avx2.cpp needs -mavx2 -mfma (set by setup.py)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SG_CPU_VARIANT avx2
#define SG_CPU_VARIANT_NAME "avx2"

#include "flow_kernels_cpu_impl.h"
