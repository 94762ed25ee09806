// Per-element maths of the fused rectified-flow ops, shared by the CPU and the CUDA kernels.
//
// Convention (rectified flow): z_t = (1 - t) * z0 + t * eps, velocity target u = eps - z0,
// sampling runs from t = 1 to t = 0 with Euler steps z <- z + (t_next - t) * v (dt < 0).
//
// Every function is a template over the value type `V`: the CUDA kernels and the CPU tail loops
// instantiate it with `float`, the CPU main loops with `at::vec::Vectorized<float>`. Both see the
// same expression tree, so the CPU tests check the arithmetic the GPU runs. All arithmetic is fp32;
// the kernels round once, when they store the result in the tensor's dtype.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SG_HOST_DEVICE inline
#endif

#include <cmath>
#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#if !defined(__CUDACC__) && defined(SEMANTICGEN_FLOW_MATH_CPU_VEC)
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#endif

namespace semanticgen::flow_math {

// a * b + c with one rounding where the hardware has FMA (CUDA always, CPU with -mfma).
SG_HOST_DEVICE float madd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

#if !defined(__CUDACC__) && defined(SEMANTICGEN_FLOW_MATH_CPU_VEC)
inline at::vec::Vectorized<float> madd(const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b,
                                       const at::vec::Vectorized<float>& c) {
  return at::vec::fmadd(a, b, c);
}
#endif

// z + dt * v
template <typename V>
SG_HOST_DEVICE V euler_step(V z, V v, V dt) {
  return madd(dt, v, z);
}

// Classifier-free guidance mix: v_uncond + guidance * (v_cond - v_uncond).
template <typename V>
SG_HOST_DEVICE V cfg_velocity(V v_cond, V v_uncond, V guidance) {
  return madd(guidance, v_cond - v_uncond, v_uncond);
}

// z + dt * (v_uncond + guidance * (v_cond - v_uncond))
template <typename V>
SG_HOST_DEVICE V cfg_euler_step(V z, V v_cond, V v_uncond, V guidance, V dt) {
  return madd(dt, cfg_velocity(v_cond, v_uncond, guidance), z);
}

// z_t = (1 - t) * z0 + t * eps, written so that t = 0 gives z0 and t = 1 gives eps exactly
// (z0 + t * (eps - z0) would not: eps - z0 is rounded before it is scaled).
template <typename V>
SG_HOST_DEVICE V noised(V z0, V eps, V t, V one) {
  return madd(one - t, z0, t * eps);
}

// u = eps - z0, the velocity the model learns.
template <typename V>
SG_HOST_DEVICE V velocity_target(V z0, V eps) {
  return eps - z0;
}

// v_pred - (eps - z0): the residual whose mean square is the flow-matching loss.
template <typename V>
SG_HOST_DEVICE V loss_residual(V v_pred, V z0, V eps) {
  return v_pred - (eps - z0);
}

// d(mean((v - u)^2)) / dv = 2 * grad / n * (v - u); `scale` is 2 * grad / n.
template <typename V>
SG_HOST_DEVICE V loss_grad(V v_pred, V z0, V eps, V scale) {
  return scale * loss_residual(v_pred, z0, eps);
}

// A scalar operand (dt, guidance, t) that is one value for the whole tensor or one per batch
// element. It is either a Python float (`ptr == nullptr`, `value` holds it) or a float32 tensor on
// the op's device with one element (`per_batch == false`) or `batch` elements, where element `i` of
// the flattened operand belongs to batch `i / inner`. Reading it on the device keeps the sampling
// loop free of host synchronisation (and capturable in a CUDA graph).
struct FlowScalar {
  const float* ptr = nullptr;
  float value = 0.0f;
  bool per_batch = false;

  SG_HOST_DEVICE float at_batch(int64_t b) const {
    if (ptr == nullptr) return value;
    return per_batch ? ptr[b] : ptr[0];
  }
};

// Where flat element `i` sits in a tensor whose batch entries are `inner` elements long. Made with one
// division, then moved without any: the kernels walk elements in order, and a 64-bit division per
// element (what a tensor of many short batch entries, a 1-D one above all, used to cost) is slower
// than the arithmetic it feeds.
struct BatchCursor {
  int64_t batch;
  int64_t offset;  // in [0, inner)
  int64_t inner;

  SG_HOST_DEVICE BatchCursor(int64_t i, int64_t inner_) : batch(i / inner_), offset(0), inner(inner_) {
    offset = i - batch * inner;
  }

  // Whether the next `len` elements all belong to batch entry `batch`.
  SG_HOST_DEVICE bool fits(int64_t len) const { return offset + len <= inner; }

  // Moves past `len` elements; `fits(len)` must hold.
  SG_HOST_DEVICE void skip(int64_t len) {
    offset += len;
    if (offset == inner) {
      offset = 0;
      ++batch;
    }
  }
};

}  // namespace semanticgen::flow_math
