// Host-side argument checks of the fused rectified-flow ops, shared by the CPU and CUDA files.
//
// The typed Python wrappers (semanticgen/ops/flow.py) raise ValueError/TypeError for bad input
// before anything reaches here; these TORCH_CHECKs are the second line, so that calling
// torch.ops.semanticgen.* directly with bad input raises a RuntimeError instead of crashing.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "flow_math.h"

namespace semanticgen::flow {

inline void check_float_dtype(const at::Tensor& x, const char* name) {
  auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "semanticgen flow ops: ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

// Every tensor operand: same shape, dtype and device as `ref`, and contiguous.
inline void check_like(const at::Tensor& ref, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.sizes() == ref.sizes(), "semanticgen flow ops: ", name, " has shape ", x.sizes(), ", expected ",
              ref.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "semanticgen flow ops: ", name, " has dtype ", x.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(x.device() == ref.device(), "semanticgen flow ops: ", name, " is on ", x.device(), ", expected ",
              ref.device());
  TORCH_CHECK(x.is_contiguous(), "semanticgen flow ops: ", name, " must be contiguous");
}

// Elements per batch entry: numel / size(0) (the whole tensor for 0-d input).
inline int64_t inner_size(const at::Tensor& ref) {
  if (ref.dim() == 0 || ref.size(0) == 0) return ref.numel();
  return ref.numel() / ref.size(0);
}

// A scalar operand: a Python float (`tensor` empty) or a float32 tensor with 1 or size(0) elements.
inline flow_math::FlowScalar make_scalar(const std::optional<at::Tensor>& tensor, double value, const at::Tensor& ref,
                                         const char* name) {
  flow_math::FlowScalar s;
  s.value = static_cast<float>(value);
  if (!tensor.has_value()) return s;
  const at::Tensor& t = *tensor;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "semanticgen flow ops: tensor ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "semanticgen flow ops: tensor ", name, " is on ", t.device(),
              ", expected ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "semanticgen flow ops: tensor ", name, " must be contiguous");
  const int64_t batch = ref.dim() == 0 ? 1 : ref.size(0);
  TORCH_CHECK(t.dim() <= 1 && (t.numel() == 1 || t.numel() == batch), "semanticgen flow ops: tensor ", name,
              " must have shape [] or [", batch, "] (one value per batch element), got ", t.sizes());
  s.ptr = t.data_ptr<float>();
  s.per_batch = t.dim() == 1 && t.numel() == batch && batch != 1;
  return s;
}

}  // namespace semanticgen::flow
