// The GPU path's deformable layers as C++ autograd ops: harness::deform_layer (per-tap offsets) and
// harness::deform_sample (the shared layout's sampling step).
//
// The same computation as harness/ops/cuda.py's `sample_then_matmul` (grid_sample columns kept for
// backward, batched matmuls), written against ATen so that a forward and a backward each cost one
// call from Python instead of ~40 dispatches. On a GPU at small sizes a layer is bound by the host
// (the GPU waits for launches), so this is where its time goes. It uses no CUDA code of its own:
// every kernel is an ATen one, so it builds with a plain C++ compiler and runs on any device.
//
// Arguments (checked in Python, harness/ops/): input [N, C, H, W]; offset [N, 2*G*K, Ho, Wo] in
// torchvision's layout (dy, dx per tap), already in the sampling dtype; weight [O, C/groups, kh, kw];
// bias [O] or None; mask [N, G*K, Ho, Wo] or None; base [K, Ho, Wo, 2] and scale [2], the cached
// undeformed grid in grid_sample's frame on the power-of-two-padded source; gemm, the matmuls' dtype;
// split, how many slices each offset group's channels are sampled in (see sampling_grid).

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// harness.ops.SAMPLING_SCOPE: the profiler's share of a layer spent sampling (free when not profiling)
constexpr const char* kSamplingScope = "harness::deform_sampling";

int64_t next_power_of_two(int64_t size) {
  int64_t p = 1;
  while (p < size) p <<= 1;
  return p;
}

// `t` in `dtype`, without a dispatch when it already is one (a layer makes a dozen such casts, most no-ops)
Tensor cast(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// Zero-pad H and W up to powers of two: grid_sample's [-1, 1] mapping is then exact for whole pixels.
Tensor pad_to_power_of_two(const Tensor& t) {
  const int64_t h = t.size(-2), w = t.size(-1);
  const int64_t pad_h = next_power_of_two(h) - h, pad_w = next_power_of_two(w) - w;
  return (pad_h || pad_w) ? at::constant_pad_nd(t, {0, pad_w, 0, pad_h}) : t;
}

// grid_sample's grid [N*G*S, K*Ho, Wo, 2 (x, y)] from offsets [N, G*K*2 (dy, dx), Ho, Wo] and the cached
// undeformed grid `base` [K, Ho, Wo, 2] with its scale (x, y): one flip and one fused multiply-add.
// With S (split) > 1 each offset group's grid is written S times: grid_sample's CUDA kernels give a
// thread one sampling point and loop over its channels, so a layer with few output points and many
// channels fills the GPU only when its channels are cut into S slices, each a batch entry of its own.
Tensor sampling_grid(const Tensor& offset, const Tensor& base, const Tensor& scale, at::IntArrayRef n_g_k_h_w,
                     int64_t split) {
  const int64_t n = n_g_k_h_w[0], g = n_g_k_h_w[1], taps = n_g_k_h_w[2], h = n_g_k_h_w[3], w = n_g_k_h_w[4];
  Tensor delta = offset.reshape({n, g, 1, taps, 2, h, w}).permute({0, 1, 2, 3, 5, 6, 4}).flip({-1});
  if (split == 1) return at::addcmul(base, delta, scale).reshape({n * g, taps * h, w, 2});
  Tensor grid = at::empty({n, g, split, taps, h, w, 2}, delta.options());
  at::addcmul_out(grid, base, delta.expand({n, g, split, taps, h, w, 2}), scale);
  return grid.view({n * g * split, taps * h, w, 2});
}

// The offsets' gradient [N, G, K, 2 (dy, dx), Ho, Wo] from grid_sample's grid gradient [N*G*S, K*Ho, Wo, 2 (x, y)]
// and the grid's scale (x, y): the sum over the S slices when split, then one strided multiply per
// coordinate, written straight into the offset's layout (a multiply and a flip into that layout would be
// three kernels).
Tensor offset_gradient(const Tensor& grad_grid, const Tensor& scale, at::IntArrayRef n_g_k_h_w, int64_t split) {
  const int64_t n = n_g_k_h_w[0], g = n_g_k_h_w[1], taps = n_g_k_h_w[2], h = n_g_k_h_w[3], w = n_g_k_h_w[4];
  Tensor grid = split > 1 ? grad_grid.view({n, g, split, taps, h, w, 2}).sum(2)
                          : grad_grid.view({n, g, taps, h, w, 2});
  Tensor out = at::empty({n, g, taps, 2, h, w}, grad_grid.options());
  for (int64_t yx = 0; yx < 2; ++yx) {  // dy is grid coordinate 1 (y), dx is coordinate 0 (x)
    Tensor part = out.select(3, yx);
    at::mul_out(part, grid.select(-1, 1 - yx), scale.select(0, 1 - yx));
  }
  return out;
}

struct DeformLayer : public torch::autograd::Function<DeformLayer> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& offset, const Tensor& weight,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& mask, const Tensor& base,
                        const Tensor& scale, int64_t groups, int64_t offset_groups, int64_t out_h, int64_t out_w,
                        at::ScalarType gemm, int64_t split) {
    // every dtype below is explicit: autocast must not cast again
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
    const int64_t o = weight.size(0), per_group = weight.size(1), taps = weight.size(2) * weight.size(3);
    const int64_t g = offset_groups, length = out_h * out_w, depth = per_group * taps;
    const at::ScalarType sampling = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

    Tensor grid, source, raw, columns;
    {
      RECORD_FUNCTION(kSamplingScope, std::vector<c10::IValue>());
      grid = sampling_grid(offset, base, scale, {n, g, taps, out_h, out_w}, split);
      // contiguous NCHW: grid_sample reads one channel plane at a time; slice s of group g is batch
      // entry (n*G + g)*S + s, the same memory as [N*G, C/G, ...]
      source = pad_to_power_of_two(cast(input, sampling).reshape({n * g * split, c / (g * split), h, w}).contiguous());
      raw = at::grid_sampler_2d(source, grid, /*bilinear*/ 0, /*zeros*/ 0, /*align_corners*/ false);
      columns = raw;
      if (mask.has_value()) {
        columns = raw.view({n, g, c / g, taps, length}) * cast(*mask, sampling).reshape({n, g, 1, taps, length});
      }
    }
    columns = cast(columns.view({n, groups, depth, length}), gemm);
    Tensor w_gemm = cast(weight, gemm).reshape({groups, o / groups, depth});
    Tensor out;
    if (groups == 1) {
      Tensor w_batch = w_gemm.select(0, 0).expand({n, o, depth});
      Tensor c_batch = columns.view({n, depth, length});
      out = bias.has_value() ? at::baddbmm(cast(*bias, gemm).view({1, o, 1}), w_batch, c_batch)
                             : at::bmm(w_batch, c_batch);
    } else {
      out = at::matmul(w_gemm, columns).view({n, o, length});
      if (bias.has_value()) out = out + cast(*bias, gemm).view({1, o, 1});
    }

    ctx->save_for_backward({source, grid, columns, weight, mask.value_or(Tensor()),
                            mask.has_value() ? raw : Tensor(), scale});
    ctx->saved_data["input_size"] = input.sizes().vec();
    ctx->saved_data["input_dtype"] = input.scalar_type();
    ctx->saved_data["offset_dtype"] = offset.scalar_type();
    ctx->saved_data["bias_dtype"] = bias.has_value() ? bias->scalar_type() : at::kFloat;
    ctx->saved_data["config"] = std::vector<int64_t>{groups, g, out_h, out_w, bias.has_value(), mask.has_value(),
                                                     static_cast<int64_t>(gemm), split};
    return out.view({n, o, out_h, out_w});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &source = saved[0], &grid = saved[1], &columns = saved[2], &weight = saved[3];
    const Tensor &mask = saved[4], &raw = saved[5], &scale = saved[6];
    const auto size = ctx->saved_data["input_size"].toIntVector();
    const auto config = ctx->saved_data["config"].toIntVector();
    const int64_t groups = config[0], g = config[1], out_h = config[2], out_w = config[3];
    const bool has_bias = config[4], has_mask = config[5];
    const auto gemm = static_cast<at::ScalarType>(config[6]);
    const int64_t split = config[7];
    const int64_t n = size[0], c = size[1], h = size[2], w = size[3];
    const int64_t o = weight.size(0), per_group = weight.size(1), taps = weight.size(2) * weight.size(3);
    const int64_t length = out_h * out_w, depth = per_group * taps;
    const at::ScalarType sampling = source.scalar_type();
    // needs_input_grad counts the tensors given (bias and mask only when present)
    const bool need_input = ctx->needs_input_grad(0), need_offset = ctx->needs_input_grad(1);
    const bool need_weight = ctx->needs_input_grad(2), need_bias = has_bias && ctx->needs_input_grad(3);
    const bool need_mask = has_mask && ctx->needs_input_grad(3 + has_bias);

    const Tensor& grad_out = grads[0];
    Tensor go = cast(grad_out.reshape({n, groups, o / groups, length}), gemm);
    Tensor grad_input, grad_offset, grad_weight, grad_bias, grad_mask;
    if (need_bias) grad_bias = cast(grad_out.sum({0, 2, 3}), ctx->saved_data["bias_dtype"].toScalarType());
    if (need_weight) {
      grad_weight = groups == 1 ? at::bmm(go.view({n, o, length}), columns.view({n, depth, length}).transpose(1, 2)).sum(0)
                                : at::matmul(go, columns.transpose(-1, -2)).sum(0);
      grad_weight = cast(grad_weight.view(weight.sizes()), weight.scalar_type());
    }
    if (need_input || need_offset || need_mask) {
      Tensor w_gemm = cast(weight, gemm).reshape({groups, o / groups, depth});
      Tensor grad_columns =
          groups == 1 ? at::bmm(w_gemm.select(0, 0).t().expand({n, depth, o}), go.view({n, o, length}))
                      : at::matmul(w_gemm.transpose(-1, -2), go);
      grad_columns = cast(grad_columns, sampling);
      RECORD_FUNCTION(kSamplingScope, std::vector<c10::IValue>());
      if (has_mask) {
        grad_columns = grad_columns.view({n, g, c / g, taps, length});
        if (need_mask) {
          Tensor sums = (grad_columns * raw.view({n, g, c / g, taps, length})).sum(2);
          grad_mask = cast(sums.view(mask.sizes()), mask.scalar_type());
        }
        grad_columns = grad_columns * cast(mask, sampling).reshape({n, g, 1, taps, length});
      }
      if (need_input || need_offset) {
        auto [grad_source, grad_grid] = at::grid_sampler_2d_backward(
            grad_columns.view({n * g * split, c / (g * split), taps * out_h, out_w}), source, grid, 0, 0, false,
            {need_input, need_offset});
        if (need_input) {
          if (grad_source.size(2) != h || grad_source.size(3) != w) {  // the power-of-two padding
            grad_source = grad_source.slice(2, 0, h).slice(3, 0, w);
          }
          grad_input = cast(grad_source.reshape({n, c, h, w}), ctx->saved_data["input_dtype"].toScalarType());
        }
        if (need_offset) {
          grad_offset = cast(offset_gradient(grad_grid, scale, {n, g, taps, out_h, out_w}, split)
                                 .view({n, 2 * g * taps, out_h, out_w}),
                             ctx->saved_data["offset_dtype"].toScalarType());
        }
      }
    }
    return {grad_input, grad_offset, grad_weight, grad_bias, grad_mask,
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The shared-offset layout's sampling step (harness/ops/dispatch.py's `deform_conv2d_shared` after its
// convolution): one bilinear sample per output pixel of `full` [N, G*O, Hf, Wf], the conv's output,
// summed over the G offset groups, plus the bias. offset [N, 2*G, Ho, Wo]; base [1, Ho, Wo, 2].
struct DeformSample : public torch::autograd::Function<DeformSample> {
  static Tensor forward(AutogradContext* ctx, const Tensor& full, const Tensor& offset,
                        const std::optional<Tensor>& bias, const Tensor& base, const Tensor& scale,
                        int64_t offset_groups, int64_t out_h, int64_t out_w, int64_t split) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t n = full.size(0), g = offset_groups, o = full.size(1) / g;
    const int64_t full_h = full.size(2), full_w = full.size(3);
    const at::ScalarType sampling = full.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor grid, source, out;
    {
      RECORD_FUNCTION(kSamplingScope, std::vector<c10::IValue>());
      grid = sampling_grid(offset, base, scale, {n, g, 1, out_h, out_w}, split);
      source = cast(full, sampling).reshape({n * g * split, o / split, full_h, full_w}).contiguous();
      out = cast(at::grid_sampler_2d(source, grid, 0, 0, false), full.scalar_type());
    }
    out = out.view({n, g, o, out_h, out_w});
    out = g > 1 ? out.sum(1) : out.squeeze(1);
    if (bias.has_value()) out = out + cast(*bias, out.scalar_type()).view({1, o, 1, 1});
    ctx->save_for_backward({source, grid, scale});
    ctx->saved_data["full_dtype"] = full.scalar_type();
    ctx->saved_data["offset_dtype"] = offset.scalar_type();
    ctx->saved_data["bias_dtype"] = bias.has_value() ? bias->scalar_type() : at::kFloat;
    ctx->saved_data["config"] = std::vector<int64_t>{g, out_h, out_w, bias.has_value(), split};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &source = saved[0], &grid = saved[1], &scale = saved[2];
    const auto config = ctx->saved_data["config"].toIntVector();
    const int64_t g = config[0], out_h = config[1], out_w = config[2];
    const bool has_bias = config[3];
    const int64_t split = config[4];
    const int64_t n = source.size(0) / (g * split), o = source.size(1) * split;
    const bool need_full = ctx->needs_input_grad(0), need_offset = ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(2);
    const Tensor& grad_out = grads[0];
    Tensor grad_full, grad_offset, grad_bias;
    if (need_bias) grad_bias = cast(grad_out.sum({0, 2, 3}), ctx->saved_data["bias_dtype"].toScalarType());
    if (need_full || need_offset) {
      RECORD_FUNCTION(kSamplingScope, std::vector<c10::IValue>());
      // every offset group's sample received the same gradient (the sum over groups)
      Tensor grad_samples = cast(grad_out, source.scalar_type()).unsqueeze(1).expand({n, g, o, out_h, out_w})
                                .reshape({n * g * split, o / split, out_h, out_w});
      auto [grad_source, grad_grid] = at::grid_sampler_2d_backward(grad_samples, source, grid, 0, 0, false,
                                                                   {need_full, need_offset});
      if (need_full) {
        grad_full = cast(grad_source.view({n, g * o, source.size(2), source.size(3)}),
                         ctx->saved_data["full_dtype"].toScalarType());
      }
      if (need_offset) {
        grad_offset = cast(offset_gradient(grad_grid, scale, {n, g, 1, out_h, out_w}, split)
                               .view({n, 2 * g, out_h, out_w}),
                           ctx->saved_data["offset_dtype"].toScalarType());
      }
    }
    return {grad_full, grad_offset, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor deform_sample(const Tensor& full, const Tensor& offset, const std::optional<Tensor>& bias, const Tensor& base,
                     const Tensor& scale, int64_t offset_groups, int64_t out_h, int64_t out_w, int64_t split) {
  TORCH_CHECK(split >= 1 && full.size(1) % (offset_groups * split) == 0, "deform_sample: split ", split,
              " must divide the ", full.size(1) / offset_groups, " channels per offset group");
  return DeformSample::apply(full, offset, bias, base, scale, offset_groups, out_h, out_w, split);
}

Tensor deform_layer(const Tensor& input, const Tensor& offset, const Tensor& weight, const std::optional<Tensor>& bias,
                    const std::optional<Tensor>& mask, const Tensor& base, const Tensor& scale, int64_t groups,
                    int64_t offset_groups, int64_t out_h, int64_t out_w, at::ScalarType gemm, int64_t split) {
  TORCH_CHECK(split >= 1 && input.size(1) % (offset_groups * split) == 0, "deform_layer: split ", split,
              " must divide the ", input.size(1) / offset_groups, " channels per offset group");
  return DeformLayer::apply(input, offset, weight, bias, mask, base, scale, groups, offset_groups, out_h, out_w, gemm,
                            split);
}

}  // namespace

TORCH_LIBRARY(harness, m) {
  m.def("deform_layer(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, Tensor base, "
        "Tensor scale, int groups, int offset_groups, int out_h, int out_w, ScalarType gemm, int split=1) -> Tensor");
  m.impl("deform_layer", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(deform_layer));
  m.def("deform_sample(Tensor full, Tensor offset, Tensor? bias, Tensor base, Tensor scale, int offset_groups, "
        "int out_h, int out_w, int split=1) -> Tensor");
  m.impl("deform_sample", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(deform_sample));
}
