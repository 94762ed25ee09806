// CPU kernels of the fused rectified-flow ops (schemas in csrc/semanticgen.cpp), written once and
// compiled once per CPU capability: the including file defines SG_CPU_VARIANT (the namespace, avx2
// or avx512) and ATen's CPU_CAPABILITY / CPU_CAPABILITY_<ISA> macros, which select the width of
// at::vec::Vectorized<float> and put it in a namespace of its own, so the two copies never share a
// symbol. The registrations are in flow_ops_cpu.cpp.
//
// Elementwise ops stream their operands once with at::vec::Vectorized<float> (bf16/fp16 are
// widened to fp32 in registers and rounded once at the store) and split the flat index range
// across threads with at::parallel_for. A per-batch scalar (dt, guidance, t) is constant inside a
// batch entry: a vector inside one entry broadcasts it, a vector across entries reads it per lane
// (ScalarLanes). The maths itself is in csrc/include/flow_math.h, shared with the CUDA kernels.
#pragma once

#if !defined(SG_CPU_VARIANT) || !defined(CPU_CAPABILITY)
#error "include flow_kernels_cpu_impl.h from flow_kernels_<isa>.cpp, which defines SG_CPU_VARIANT and CPU_CAPABILITY"
#endif
#define SEMANTICGEN_FLOW_MATH_CPU_VEC

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <optional>
#include <vector>

#include "flow_args.h"
#include "flow_kernels_cpu.h"
#include "flow_math.h"

namespace semanticgen::flow::SG_CPU_VARIANT {
namespace {

namespace fm = semanticgen::flow_math;
using Vec = at::vec::Vectorized<float>;

// Elements per at::parallel_for task: large enough that thread start-up is amortised, small enough
// that 2^20-element tensors still use every core.
constexpr int64_t kGrain = 32768;

// The two scalar operands of the next vector's lanes. A scalar that is one value for the whole
// tensor is one broadcast; a per-batch one is broadcast while a vector lies inside one batch entry,
// loaded as a vector when every element is its own entry (inner == 1), and blended from the entries'
// values where one or more entries end inside the vector.
class ScalarLanes {
 public:
  ScalarLanes(fm::FlowScalar s0, fm::FlowScalar s1, int64_t begin, int64_t inner)
      : s0_(s0), s1_(s1), per_batch_(s0.per_batch || s1.per_batch), cur_(begin, inner) {}

  // Scalars of the `len` elements (one vector's worth or fewer) from the current position.
  template <int64_t len>
  void next(Vec& a, Vec& b) {
    static_assert(len <= Vec::size());
    if (!per_batch_) {
      // The cursor is not moved: nothing depends on the batch entry.
      a = Vec(s0_.at_batch(0));
      b = Vec(s1_.at_batch(0));
    } else if (cur_.fits(len)) {
      a = Vec(s0_.at_batch(cur_.batch));
      b = Vec(s1_.at_batch(cur_.batch));
      cur_.skip(len);
    } else if (cur_.inner == 1 && len == Vec::size()) {
      // One batch entry per element (a 1-D tensor with one scalar per element): the scalars are a vector.
      a = s0_.per_batch ? Vec::loadu(s0_.ptr + cur_.batch) : Vec(s0_.at_batch(0));
      b = s1_.per_batch ? Vec::loadu(s1_.ptr + cur_.batch) : Vec(s1_.at_batch(0));
      cur_.batch += len;
    } else {
      // The lanes span entries batch, batch + 1, ...: start from the first entry's value and blend each
      // later entry into the lanes from its first one on (Vec::set takes its first `count` lanes from
      // the second argument). A handful of blends per vector, no per-lane loads or stores.
      int64_t batch = cur_.batch;
      a = Vec(s0_.at_batch(batch));
      b = Vec(s1_.at_batch(batch));
      int64_t first = cur_.inner - cur_.offset;  // first lane of entry batch + 1
      while (first < len) {
        ++batch;
        a = Vec::set(Vec(s0_.at_batch(batch)), a, first);
        b = Vec::set(Vec(s1_.at_batch(batch)), b, first);
        first += cur_.inner;
      }
      // Entry `batch` began at lane first - inner; the vector ends inside it, or exactly at its end.
      cur_.batch = batch;
      cur_.offset = len - (first - cur_.inner);
      if (cur_.offset == cur_.inner) {
        cur_.offset = 0;
        ++cur_.batch;
      }
    }
  }

  // Scalars of the next single element.
  void next(float& a, float& b) {
    a = s0_.at_batch(cur_.batch);
    b = s1_.at_batch(cur_.batch);
    if (per_batch_) cur_.skip(1);
  }

 private:
  fm::FlowScalar s0_, s1_;
  bool per_batch_;
  fm::BatchCursor cur_;
};

// Applies `fn(inputs, s0, s1) -> outputs` (a generic lambda over float and Vec) to every element.
// `out` may alias `in[0]` (in-place Euler steps): each element is read before it is written.
// The loops run over the thread's whole index range whatever the batch layout: only the scalars
// depend on it (ScalarLanes), so a 1-D tensor or one of many short batch entries streams at the
// speed of one long row (it used to cut the range at every batch entry, and a 1-D tensor, whose
// entries are single elements, ran every element through the scalar tail).
template <typename scalar_t, size_t NIN, size_t NOUT, typename Fn>
void map_elements(int64_t n, int64_t inner, const std::array<const scalar_t*, NIN>& in,
                  const std::array<scalar_t*, NOUT>& out, fm::FlowScalar s0, fm::FlowScalar s1, const Fn& fn) {
  if (n == 0) return;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    ScalarLanes scalars(s0, s1, begin, inner > 0 ? inner : 1);
    int64_t i = begin;
    Vec a0, b0, a1, b1;
    if constexpr (std::is_same_v<scalar_t, float>) {
      // Two vectors per iteration, as the 16-bit path does: all loads of both issue before the first store.
      for (; i + 2 * W <= end; i += 2 * W) {
        std::array<Vec, NIN> x0, x1;
        for (size_t k = 0; k < NIN; ++k) {
          x0[k] = Vec::loadu(in[k] + i);
          x1[k] = Vec::loadu(in[k] + i + W);
        }
        scalars.next<W>(a0, b0);
        scalars.next<W>(a1, b1);
        const std::array<Vec, NOUT> y0 = fn(x0, a0, b0);
        const std::array<Vec, NOUT> y1 = fn(x1, a1, b1);
        for (size_t k = 0; k < NOUT; ++k) {
          y0[k].store(out[k] + i);
          y1[k].store(out[k] + i + W);
        }
      }
      for (; i + W <= end; i += W) {
        std::array<Vec, NIN> x;
        for (size_t k = 0; k < NIN; ++k) x[k] = Vec::loadu(in[k] + i);
        scalars.next<W>(a0, b0);
        const std::array<Vec, NOUT> y = fn(x, a0, b0);
        for (size_t k = 0; k < NOUT; ++k) y[k].store(out[k] + i);
      }
    } else {
      using RVec = at::vec::Vectorized<scalar_t>;
      static_assert(RVec::size() == 2 * W);
      for (; i + RVec::size() <= end; i += RVec::size()) {
        std::array<Vec, NIN> lo, hi;
        for (size_t k = 0; k < NIN; ++k) {
          auto [l, h] = at::vec::convert_to_float<scalar_t>(RVec::loadu(in[k] + i));
          lo[k] = l;
          hi[k] = h;
        }
        scalars.next<W>(a0, b0);
        scalars.next<W>(a1, b1);
        const std::array<Vec, NOUT> ylo = fn(lo, a0, b0);
        const std::array<Vec, NOUT> yhi = fn(hi, a1, b1);
        for (size_t k = 0; k < NOUT; ++k) at::vec::convert_from_float<scalar_t>(ylo[k], yhi[k]).store(out[k] + i);
      }
    }
    // Tail (fewer than one vector): the same maths instantiated for float, as on the GPU.
    for (; i < end; ++i) {
      float a, b;
      scalars.next(a, b);
      std::array<float, NIN> x;
      for (size_t k = 0; k < NIN; ++k) x[k] = static_cast<float>(in[k][i]);
      const std::array<float, NOUT> y = fn(x, a, b);
      for (size_t k = 0; k < NOUT; ++k) out[k][i] = static_cast<scalar_t>(y[k]);
    }
  });
}

// float32, bfloat16, float16 only: fp64 would lose precision in the fp32 maths.
#define SG_DISPATCH_FLOW_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

void euler_step_into(const at::Tensor& z, const at::Tensor& v, const std::optional<at::Tensor>& dt, double dt_value,
                     const at::Tensor& out) {
  check_float_dtype(z, "z");
  check_like(z, z, "z");
  check_like(z, v, "v");
  check_like(z, out, "out");
  const auto s_dt = make_scalar(dt, dt_value, z, "dt");
  SG_DISPATCH_FLOW_TYPES(z.scalar_type(), "euler_step_cpu", [&] {
    map_elements<scalar_t, 2, 1>(
        z.numel(), inner_size(z), {z.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>()},
        {out.mutable_data_ptr<scalar_t>()}, s_dt, fm::FlowScalar{},
        [](const auto& x, auto s_dt, auto) { return std::array{fm::euler_step(x[0], x[1], s_dt)}; });
  });
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
  SG_DISPATCH_FLOW_TYPES(z.scalar_type(), "cfg_euler_step_cpu", [&] {
    map_elements<scalar_t, 3, 1>(
        z.numel(), inner_size(z),
        {z.const_data_ptr<scalar_t>(), v_cond.const_data_ptr<scalar_t>(), v_uncond.const_data_ptr<scalar_t>()},
        {out.mutable_data_ptr<scalar_t>()}, s_g, s_dt, [](const auto& x, auto s_g, auto s_dt) {
          return std::array{fm::cfg_euler_step(x[0], x[1], x[2], s_g, s_dt)};
        });
  });
}

void flow_noising_into(const at::Tensor& z0, const at::Tensor& eps, const std::optional<at::Tensor>& t,
                       double t_value, const at::Tensor& z_t, const at::Tensor& u) {
  check_float_dtype(z0, "z0");
  check_like(z0, z0, "z0");
  check_like(z0, eps, "eps");
  const auto s_t = make_scalar(t, t_value, z0, "t");
  check_like(z0, z_t, "z_t");
  check_like(z0, u, "u");
  SG_DISPATCH_FLOW_TYPES(z0.scalar_type(), "flow_noising_cpu", [&] {
    map_elements<scalar_t, 2, 2>(
        z0.numel(), inner_size(z0), {z0.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>()},
        {z_t.mutable_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>()}, s_t, fm::FlowScalar{nullptr, 1.0f, false},
        [](const auto& x, auto s_t, auto one) {
          return std::array{fm::noised(x[0], x[1], s_t, one), fm::velocity_target(x[0], x[1])};
        });
  });
}


// Deterministic sum of squared residuals: the index range is cut into fixed blocks of kLossBlock
// elements (independent of the thread count); each block accumulates in fp32 vector lanes over
// kLossSubBlock elements at a time and in fp64 across sub-blocks, and the block sums are added in
// block order in fp64. The result is bit-identical for any number of threads.
//
// It is also bit-identical between the AVX2 and AVX-512 builds: the lanes walk kLossStep elements
// per step whatever the vector width (element j of a step goes to lane j), and the 32 lanes are
// folded to 16 (lane k + lane k + 16) before the fp64 sum, so every lane sees the same elements in
// the same order.
constexpr int64_t kLossBlock = 32768;
constexpr int64_t kLossSubBlock = 1024;
constexpr int64_t kLossStep = 32;
constexpr int64_t kLossAcc = kLossStep / Vec::size();  // 4 vectors with AVX2, 2 with AVX-512
static_assert(kLossStep % (2 * Vec::size()) == 0 && kLossSubBlock % kLossStep == 0);

template <typename scalar_t>
double residual_sq_sum(int64_t begin, int64_t end, const scalar_t* v, const scalar_t* z0, const scalar_t* eps) {
  constexpr int64_t W = Vec::size();
  double total = 0.0;
  for (int64_t sb = begin; sb < end; sb += kLossSubBlock) {
    const int64_t sb_end = std::min(end, sb + kLossSubBlock);
    std::array<Vec, kLossAcc> acc;
    acc.fill(Vec(0.0f));
    int64_t i = sb;
    for (; i + kLossStep <= sb_end; i += kLossStep) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        for (int64_t a = 0; a < kLossAcc; ++a) {
          const int64_t j = i + a * W;
          const Vec r = fm::loss_residual(Vec::loadu(v + j), Vec::loadu(z0 + j), Vec::loadu(eps + j));
          acc[a] = fm::madd(r, r, acc[a]);
        }
      } else {
        // One 16-bit vector holds 2 * W elements: its low half goes to acc[a], its high half to acc[a + 1].
        using RVec = at::vec::Vectorized<scalar_t>;
        for (int64_t a = 0; a < kLossAcc; a += 2) {
          const int64_t j = i + a * W;
          auto [v0, v1] = at::vec::convert_to_float<scalar_t>(RVec::loadu(v + j));
          auto [z00, z01] = at::vec::convert_to_float<scalar_t>(RVec::loadu(z0 + j));
          auto [e0, e1] = at::vec::convert_to_float<scalar_t>(RVec::loadu(eps + j));
          const Vec r0 = fm::loss_residual(v0, z00, e0);
          const Vec r1 = fm::loss_residual(v1, z01, e1);
          acc[a] = fm::madd(r0, r0, acc[a]);
          acc[a + 1] = fm::madd(r1, r1, acc[a + 1]);
        }
      }
    }
    float tail = 0.0f;
    for (; i < sb_end; ++i) {
      const float r =
          fm::loss_residual(static_cast<float>(v[i]), static_cast<float>(z0[i]), static_cast<float>(eps[i]));
      tail = fm::madd(r, r, tail);
    }
    alignas(64) float lanes[kLossStep / 2];
    for (int64_t a = 0; a < kLossAcc / 2; ++a) (acc[a] + acc[a + kLossAcc / 2]).store(lanes + a * W);
    double sub = tail;
    for (int64_t k = 0; k < kLossStep / 2; ++k) sub += lanes[k];
    total += sub;
  }
  return total;
}

at::Tensor flow_matching_loss(const at::Tensor& v_pred, const at::Tensor& z0, const at::Tensor& eps) {
  check_float_dtype(v_pred, "v_pred");
  check_like(v_pred, v_pred, "v_pred");
  check_like(v_pred, z0, "z0");
  check_like(v_pred, eps, "eps");
  const int64_t n = v_pred.numel();
  TORCH_CHECK(n > 0, "semanticgen flow ops: flow_matching_loss of an empty tensor is undefined");
  const int64_t blocks = (n + kLossBlock - 1) / kLossBlock;
  std::vector<double> partial(blocks, 0.0);
  SG_DISPATCH_FLOW_TYPES(v_pred.scalar_type(), "flow_matching_loss_cpu", [&] {
    const scalar_t* v = v_pred.const_data_ptr<scalar_t>();
    const scalar_t* a = z0.const_data_ptr<scalar_t>();
    const scalar_t* e = eps.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        partial[b] = residual_sq_sum<scalar_t>(b * kLossBlock, std::min(n, (b + 1) * kLossBlock), v, a, e);
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::full({}, total / static_cast<double>(n), v_pred.options().dtype(at::kFloat));
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
  fm::FlowScalar s_grad{grad_c.const_data_ptr<float>(), 0.0f, false};
  fm::FlowScalar s_two_over_n{nullptr, n > 0 ? static_cast<float>(2.0 / static_cast<double>(n)) : 0.0f, false};
  SG_DISPATCH_FLOW_TYPES(v_pred.scalar_type(), "flow_matching_loss_backward_cpu", [&] {
    map_elements<scalar_t, 3, 1>(
        n, n, {v_pred.const_data_ptr<scalar_t>(), z0.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>()},
        {grad_v.mutable_data_ptr<scalar_t>()}, s_grad, s_two_over_n, [](const auto& x, auto g, auto two_over_n) {
          return std::array{fm::loss_grad(x[0], x[1], x[2], g * two_over_n)};
        });
  });
  return grad_v;
}

}  // namespace

const FlowCpuKernels& kernels() {
  static const FlowCpuKernels table{SG_CPU_VARIANT_NAME, &euler_step_into,    &cfg_euler_step_into,
                                    &flow_noising_into,  &flow_matching_loss, &flow_matching_loss_backward};
  return table;
}

}  // namespace semanticgen::flow::SG_CPU_VARIANT
