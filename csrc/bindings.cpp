// The one registration point for fast_srt's C++ ops: torch.ops.fast_srt.*
// Load with torch.ops.load_library(<path to libfast_srt_native.so>) (kernels/native.py does it).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace fast_srt {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd(const at::Tensor& hidden,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& targets, double inv_temp,
                                                                        const at::Tensor& logits_out);
std::tuple<at::Tensor, at::Tensor> logprobs_bwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& targets, const at::Tensor& lse,
                                                const at::Tensor& mu, const at::Tensor& g_logp,
                                                const at::Tensor& g_ent, double inv_temp, const at::Tensor& logits);
}  // namespace fast_srt

TORCH_LIBRARY(fast_srt, m) {
  // logits_out: a contiguous fp32 [N, V] buffer the forward fills with the scaled logits (or an empty tensor:
  // none kept); the backward reads them when `logits` is that buffer and recomputes them when it is empty
  m.def("logprobs_fwd(Tensor hidden, Tensor weight, Tensor targets, float inv_temp, Tensor(a!) logits_out) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("logprobs_bwd(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor mu, Tensor g_logp, "
        "Tensor g_ent, float inv_temp, Tensor logits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fast_srt, CPU, m) {
  m.impl("logprobs_fwd", &fast_srt::logprobs_fwd);
  m.impl("logprobs_bwd", &fast_srt::logprobs_bwd);
}
