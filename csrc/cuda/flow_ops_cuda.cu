// CUDA kernels of the fused rectified-flow ops (schemas in csrc/semanticgen.cpp).
//
// Elementwise ops: grid-stride loops over 16-byte packs (4 fp32 or 8 bf16/fp16 elements per load
// and store) when every pointer is 16-byte aligned, one element at a time otherwise and for the
// tail. bf16/fp16 are widened to fp32 in registers and rounded once at the store. Scalar operands
// (dt, guidance, t) are read from device memory when they are tensors, so a sampling loop never
// synchronises with the host and can be captured in a CUDA graph. The per-element maths is in
// csrc/include/flow_math.h, shared with (and tested through) the CPU kernels.
//
// The loss reduces deterministically: a grid whose size depends only on numel writes one fp64
// partial per block, and a single block adds the partials in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: that one includes the cuBLAS and
// cuSPARSE headers, which a plain CUDA toolkit install need not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "flow_args.h"
#include "flow_math.h"

namespace semanticgen::flow {
namespace {

namespace fm = semanticgen::flow_math;

constexpr int kThreads = 256;
constexpr int kPackBytes = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, int NIN, int NOUT>
struct Pointers {
  const scalar_t* in[NIN];
  scalar_t* out[NOUT];
};

// ----------------------------------------------------------------------------- per-element ops

struct EulerOp {
  static constexpr int kIn = 2, kOut = 1;
  __device__ __forceinline__ static void apply(const float (&x)[kIn], float dt, float, float (&y)[kOut]) {
    y[0] = fm::euler_step(x[0], x[1], dt);
  }
};

struct CfgEulerOp {
  static constexpr int kIn = 3, kOut = 1;
  __device__ __forceinline__ static void apply(const float (&x)[kIn], float guidance, float dt, float (&y)[kOut]) {
    y[0] = fm::cfg_euler_step(x[0], x[1], x[2], guidance, dt);
  }
};

struct NoisingOp {
  static constexpr int kIn = 2, kOut = 2;
  __device__ __forceinline__ static void apply(const float (&x)[kIn], float t, float, float (&y)[kOut]) {
    y[0] = fm::noised(x[0], x[1], t, 1.0f);
    y[1] = fm::velocity_target(x[0], x[1]);
  }
};

struct LossGradOp {
  static constexpr int kIn = 3, kOut = 1;
  __device__ __forceinline__ static void apply(const float (&x)[kIn], float grad, float two_over_n,
                                               float (&y)[kOut]) {
    y[0] = fm::loss_grad(x[0], x[1], x[2], grad * two_over_n);
  }
};

// ----------------------------------------------------------------------------- elementwise kernel

// Element j of a pack: widen to fp32, apply the op, round once into the output packs.
template <typename Op, typename PackT, int NIN, int NOUT>
__device__ __forceinline__ void apply_element(const PackT (&in)[NIN], PackT (&out)[NOUT], int j, float a, float b) {
  using scalar_t = std::remove_cv_t<std::remove_reference_t<decltype(in[0].v[0])>>;
  float x[NIN], y[NOUT];
#pragma unroll
  for (int k = 0; k < NIN; ++k) x[k] = static_cast<float>(in[k].v[j]);
  Op::apply(x, a, b, y);
#pragma unroll
  for (int k = 0; k < NOUT; ++k) out[k].v[j] = static_cast<scalar_t>(y[k]);
}

template <typename scalar_t, typename Op, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    map_kernel(Pointers<scalar_t, Op::kIn, Op::kOut> p, int64_t n, int64_t inner, fm::FlowScalar s0,
               fm::FlowScalar s1) {
  constexpr int kVec = kPacked ? kPackBytes / sizeof(scalar_t) : 1;
  using P = Pack<scalar_t, kVec>;
  const bool per_batch = s0.per_batch || s1.per_batch;
  // Operands that are one value for the whole tensor are loaded once per thread.
  const float a0 = s0.at_batch(0), b0 = s1.at_batch(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packs = n / kVec;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < packs; q += stride) {
    P in[Op::kIn];
#pragma unroll
    for (int k = 0; k < Op::kIn; ++k) in[k] = reinterpret_cast<const P*>(p.in[k])[q];
    // One 64-bit division per pack (the cursor), none per element: a pack lies inside one batch entry
    // unless it straddles a boundary (possible only when inner % kVec != 0), and then the cursor steps
    // through it element by element, as for a 1-D tensor with one scalar per element (inner == 1).
    float sa[kVec], sb[kVec];
    if (!per_batch) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sa[j] = a0;
        sb[j] = b0;
      }
    } else {
      fm::BatchCursor cur(q * kVec, inner);
      const bool straddles = !cur.fits(kVec);
      const float pa = s0.at_batch(cur.batch), pb = s1.at_batch(cur.batch);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sa[j] = straddles ? s0.at_batch(cur.batch) : pa;
        sb[j] = straddles ? s1.at_batch(cur.batch) : pb;
        if (straddles) cur.skip(1);
      }
    }
    P out[Op::kOut];
#pragma unroll
    for (int j = 0; j < kVec; ++j) apply_element<Op>(in, out, j, sa[j], sb[j]);
#pragma unroll
    for (int k = 0; k < Op::kOut; ++k) reinterpret_cast<P*>(p.out[k])[q] = out[k];
  }
  // Tail: the last n % kVec elements, one per thread of the first block.
  if (blockIdx.x == 0) {
    const int64_t i = packs * kVec + threadIdx.x;
    if (i < n) {
      const int64_t batch = per_batch ? i / inner : 0;
      float x[Op::kIn], y[Op::kOut];
#pragma unroll
      for (int k = 0; k < Op::kIn; ++k) x[k] = static_cast<float>(p.in[k][i]);
      Op::apply(x, s0.at_batch(batch), s1.at_batch(batch), y);
#pragma unroll
      for (int k = 0; k < Op::kOut; ++k) p.out[k][i] = static_cast<scalar_t>(y[k]);
    }
  }
}

// Enough blocks to fill every SM; more only adds scheduling work to a grid-stride loop.
int max_resident_blocks() {
  int device = 0, sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return std::max(1, sms * std::max(1, threads_per_sm / kThreads));
}

template <typename scalar_t, typename Op>
void launch_map(const Pointers<scalar_t, Op::kIn, Op::kOut>& p, int64_t n, int64_t inner, fm::FlowScalar s0,
                fm::FlowScalar s1) {
  if (n == 0) return;
  bool aligned = true;
  for (int k = 0; k < Op::kIn; ++k) aligned &= reinterpret_cast<uintptr_t>(p.in[k]) % kPackBytes == 0;
  for (int k = 0; k < Op::kOut; ++k) aligned &= reinterpret_cast<uintptr_t>(p.out[k]) % kPackBytes == 0;
  const int64_t vec = aligned ? kPackBytes / sizeof(scalar_t) : 1;
  const int64_t work = std::max<int64_t>(n / vec, 1);
  const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, max_resident_blocks());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (aligned) {
    map_kernel<scalar_t, Op, true><<<blocks, kThreads, 0, stream>>>(p, n, inner, s0, s1);
  } else {
    map_kernel<scalar_t, Op, false><<<blocks, kThreads, 0, stream>>>(p, n, inner, s0, s1);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// float32, bfloat16, float16 only: fp64 would lose precision in the fp32 maths.
#define SG_DISPATCH_FLOW_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// ----------------------------------------------------------------------------- ops

void euler_step_into(const at::Tensor& z, const at::Tensor& v, const std::optional<at::Tensor>& dt, double dt_value,
                     const at::Tensor& out) {
  check_float_dtype(z, "z");
  check_like(z, z, "z");
  check_like(z, v, "v");
  check_like(z, out, "out");
  const auto s_dt = make_scalar(dt, dt_value, z, "dt");
  const c10::cuda::CUDAGuard guard(z.device());
  SG_DISPATCH_FLOW_TYPES(z.scalar_type(), "euler_step_cuda", [&] {
    Pointers<scalar_t, 2, 1> p{{z.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>()},
                               {out.mutable_data_ptr<scalar_t>()}};
    launch_map<scalar_t, EulerOp>(p, z.numel(), inner_size(z), s_dt, fm::FlowScalar{});
  });
}

at::Tensor euler_step(const at::Tensor& z, const at::Tensor& v, const std::optional<at::Tensor>& dt, double dt_value) {
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  euler_step_into(z, v, dt, dt_value, out);
  return out;
}

void euler_step_out(const at::Tensor& z, const at::Tensor& v, const std::optional<at::Tensor>& dt, double dt_value,
                    at::Tensor out) {
  euler_step_into(z, v, dt, dt_value, out);
}

void euler_step_inplace(at::Tensor z, const at::Tensor& v, const std::optional<at::Tensor>& dt, double dt_value) {
  euler_step_into(z, v, dt, dt_value, z);
}

void cfg_euler_step_into(const at::Tensor& z, const at::Tensor& v_cond, const at::Tensor& v_uncond,
                         const std::optional<at::Tensor>& guidance, double guidance_value,
                         const std::optional<at::Tensor>& dt, double dt_value, const at::Tensor& out) {
  check_float_dtype(z, "z");
  check_like(z, z, "z");
  check_like(z, v_cond, "v_cond");
  check_like(z, v_uncond, "v_uncond");
  check_like(z, out, "out");
  const auto s_g = make_scalar(guidance, guidance_value, z, "guidance");
  const auto s_dt = make_scalar(dt, dt_value, z, "dt");
  const c10::cuda::CUDAGuard guard(z.device());
  SG_DISPATCH_FLOW_TYPES(z.scalar_type(), "cfg_euler_step_cuda", [&] {
    Pointers<scalar_t, 3, 1> p{
        {z.const_data_ptr<scalar_t>(), v_cond.const_data_ptr<scalar_t>(), v_uncond.const_data_ptr<scalar_t>()},
        {out.mutable_data_ptr<scalar_t>()}};
    launch_map<scalar_t, CfgEulerOp>(p, z.numel(), inner_size(z), s_g, s_dt);
  });
}

at::Tensor cfg_euler_step(const at::Tensor& z, const at::Tensor& v_cond, const at::Tensor& v_uncond,
                          const std::optional<at::Tensor>& guidance, double guidance_value,
                          const std::optional<at::Tensor>& dt, double dt_value) {
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  cfg_euler_step_into(z, v_cond, v_uncond, guidance, guidance_value, dt, dt_value, out);
  return out;
}

void cfg_euler_step_out(const at::Tensor& z, const at::Tensor& v_cond, const at::Tensor& v_uncond,
                        const std::optional<at::Tensor>& guidance, double guidance_value,
                        const std::optional<at::Tensor>& dt, double dt_value, at::Tensor out) {
  cfg_euler_step_into(z, v_cond, v_uncond, guidance, guidance_value, dt, dt_value, out);
}

void cfg_euler_step_inplace(at::Tensor z, const at::Tensor& v_cond, const at::Tensor& v_uncond,
                            const std::optional<at::Tensor>& guidance, double guidance_value,
                            const std::optional<at::Tensor>& dt, double dt_value) {
  cfg_euler_step_into(z, v_cond, v_uncond, guidance, guidance_value, dt, dt_value, z);
}

void flow_noising_into(const at::Tensor& z0, const at::Tensor& eps, const std::optional<at::Tensor>& t,
                       double t_value, const at::Tensor& z_t, const at::Tensor& u) {
  check_float_dtype(z0, "z0");
  check_like(z0, z0, "z0");
  check_like(z0, eps, "eps");
  const auto s_t = make_scalar(t, t_value, z0, "t");
  check_like(z0, z_t, "z_t");
  check_like(z0, u, "u");
  const c10::cuda::CUDAGuard guard(z0.device());
  SG_DISPATCH_FLOW_TYPES(z0.scalar_type(), "flow_noising_cuda", [&] {
    Pointers<scalar_t, 2, 2> p{{z0.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>()},
                               {z_t.mutable_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>()}};
    launch_map<scalar_t, NoisingOp>(p, z0.numel(), inner_size(z0), s_t, fm::FlowScalar{});
  });
}

std::tuple<at::Tensor, at::Tensor> flow_noising(const at::Tensor& z0, const at::Tensor& eps,
                                                const std::optional<at::Tensor>& t, double t_value) {
  at::Tensor z_t = at::empty_like(z0, at::MemoryFormat::Contiguous);
  at::Tensor u = at::empty_like(z0, at::MemoryFormat::Contiguous);
  flow_noising_into(z0, eps, t, t_value, z_t, u);
  return {z_t, u};
}

void flow_noising_out(const at::Tensor& z0, const at::Tensor& eps, const std::optional<at::Tensor>& t, double t_value,
                      at::Tensor z_t, at::Tensor u) {
  flow_noising_into(z0, eps, t, t_value, z_t, u);
}

// ----------------------------------------------------------------------------- loss

constexpr int kLossMaxBlocks = 1024;
constexpr int kLossItemsPerThread = 16;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// One fp64 partial sum of squared residuals per block; each thread accumulates in fp32 over at most
// a few hundred elements (the grid covers numel / (kThreads * kLossItemsPerThread) blocks, capped).
template <typename scalar_t, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    loss_partial_kernel(const scalar_t* v, const scalar_t* z0, const scalar_t* eps, int64_t n, double* partial) {
  constexpr int kVec = kPacked ? kPackBytes / sizeof(scalar_t) : 1;
  using P = Pack<scalar_t, kVec>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packs = n / kVec;
  float acc = 0.0f;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < packs; q += stride) {
    const P pv = reinterpret_cast<const P*>(v)[q];
    const P pz = reinterpret_cast<const P*>(z0)[q];
    const P pe = reinterpret_cast<const P*>(eps)[q];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float r =
          fm::loss_residual(static_cast<float>(pv.v[j]), static_cast<float>(pz.v[j]), static_cast<float>(pe.v[j]));
      acc = fm::madd(r, r, acc);
    }
  }
  if (blockIdx.x == 0) {
    const int64_t i = packs * kVec + threadIdx.x;
    if (i < n) {
      const float r = fm::loss_residual(static_cast<float>(v[i]), static_cast<float>(z0[i]), static_cast<float>(eps[i]));
      acc = fm::madd(r, r, acc);
    }
  }
  __shared__ double warp_sums[kThreads / 32];
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    partial[blockIdx.x] = total;
  }
}

// Adds the block partials in a fixed order (strided per thread, then a fixed tree) and divides by n.
__global__ void __launch_bounds__(kThreads)
    loss_finalize_kernel(const double* partial, int blocks, int64_t n, float* out) {
  __shared__ double sums[kThreads];
  double s = 0.0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) s += partial[b];
  sums[threadIdx.x] = s;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(sums[0] / static_cast<double>(n));
}

at::Tensor flow_matching_loss(const at::Tensor& v_pred, const at::Tensor& z0, const at::Tensor& eps) {
  check_float_dtype(v_pred, "v_pred");
  check_like(v_pred, v_pred, "v_pred");
  check_like(v_pred, z0, "z0");
  check_like(v_pred, eps, "eps");
  const int64_t n = v_pred.numel();
  TORCH_CHECK(n > 0, "semanticgen flow ops: flow_matching_loss of an empty tensor is undefined");
  const c10::cuda::CUDAGuard guard(v_pred.device());
  // Grid size from numel alone (never from the device), so the summation order is reproducible.
  const int64_t per_block = static_cast<int64_t>(kThreads) * kLossItemsPerThread;
  const int blocks = static_cast<int>(std::min<int64_t>((n + per_block - 1) / per_block, kLossMaxBlocks));
  at::Tensor partial = at::empty({blocks}, v_pred.options().dtype(at::kDouble));
  at::Tensor out = at::empty({}, v_pred.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  SG_DISPATCH_FLOW_TYPES(v_pred.scalar_type(), "flow_matching_loss_cuda", [&] {
    const scalar_t* v = v_pred.const_data_ptr<scalar_t>();
    const scalar_t* a = z0.const_data_ptr<scalar_t>();
    const scalar_t* e = eps.const_data_ptr<scalar_t>();
    const bool aligned = (reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(a) |
                          reinterpret_cast<uintptr_t>(e)) % kPackBytes == 0;
    if (aligned) {
      loss_partial_kernel<scalar_t, true>
          <<<blocks, kThreads, 0, stream>>>(v, a, e, n, partial.mutable_data_ptr<double>());
    } else {
      loss_partial_kernel<scalar_t, false>
          <<<blocks, kThreads, 0, stream>>>(v, a, e, n, partial.mutable_data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  loss_finalize_kernel<<<1, kThreads, 0, stream>>>(partial.const_data_ptr<double>(), blocks, n,
                                                    out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor flow_matching_loss_backward(const at::Tensor& grad, const at::Tensor& v_pred, const at::Tensor& z0,
                                       const at::Tensor& eps) {
  check_float_dtype(v_pred, "v_pred");
  check_like(v_pred, v_pred, "v_pred");
  check_like(v_pred, z0, "z0");
  check_like(v_pred, eps, "eps");
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.numel() == 1 && grad.device() == v_pred.device(),
              "semanticgen flow ops: flow_matching_loss_backward: grad must be one float32 value on ", v_pred.device(),
              ", got ", grad.scalar_type(), grad.sizes(), " on ", grad.device());
  const at::Tensor grad_c = grad.reshape({}).contiguous();
  at::Tensor grad_v = at::empty_like(v_pred, at::MemoryFormat::Contiguous);
  const int64_t n = v_pred.numel();
  // The incoming gradient stays on the device: no host read of the loss scale.
  fm::FlowScalar s_grad{grad_c.const_data_ptr<float>(), 0.0f, false};
  fm::FlowScalar s_two_over_n{nullptr, n > 0 ? static_cast<float>(2.0 / static_cast<double>(n)) : 0.0f, false};
  const c10::cuda::CUDAGuard guard(v_pred.device());
  SG_DISPATCH_FLOW_TYPES(v_pred.scalar_type(), "flow_matching_loss_backward_cuda", [&] {
    Pointers<scalar_t, 3, 1> p{
        {v_pred.const_data_ptr<scalar_t>(), z0.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>()},
        {grad_v.mutable_data_ptr<scalar_t>()}};
    launch_map<scalar_t, LossGradOp>(p, n, n, s_grad, s_two_over_n);
  });
  return grad_v;
}

}  // namespace

TORCH_LIBRARY_IMPL(semanticgen, CUDA, m) {
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

}  // namespace semanticgen::flow
