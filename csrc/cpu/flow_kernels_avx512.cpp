// The CPU flow kernels with 512-bit at::vec::Vectorized<float>. setup.py compiles this file (and
// only this one) with -mavx512f -mavx512bw -mavx512vl -mavx512dq; flow_ops_cpu.cpp calls into it
// only when the CPU reports those features.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__)
#error "flow_kernels_avx512.cpp needs -mavx512f -mavx512bw -mavx512vl -mavx512dq (set by setup.py)"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define SG_CPU_VARIANT avx512
#define SG_CPU_VARIANT_NAME "avx512"

#include "flow_kernels_cpu_impl.h"
