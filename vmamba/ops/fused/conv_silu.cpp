// Fused depthwise 1-D convolution + SiLU along the rows of a channels-last sequence, for inference.
//
//     x        (B, N, E)   float32, contiguous
//     taps     (K, w, E)   per-direction, per-channel taps;  bias (K, E) or empty
//     offsets  (K,) int64
//     out      (B, stop - start, K, E):
//              out[b, i, k, e] = silu(bias[k, e] + sum_j taps[k, j, e] * x[b, start + i + offsets[k] + j, e])
//     with x = 0 outside rows [0, N). K convolutions of one input share its reads and write one interleaved
//     output (the per-direction input layout of the multi-direction scan).
//
// offset = -(w - 1) is Mamba's causal conv; offset = 0 with the taps flipped is the same causal conv run in
// reversed order (Vim's backward direction) written in forward order. Rows [start, stop) let a caller
// convolve a chunk of a long sequence without padded copies. One pass over the input with the taps and the
// activation fused, instead of w multiply-adds over the whole chunk plus a SiLU pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"
#include "threads.h"

namespace {

using namespace vmamba_simd;

inline vf vsilu(vf v) { return v / (1.0f + vexp(-v)); }
inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

torch::Tensor conv_silu(torch::Tensor x, torch::Tensor taps, torch::Tensor bias, int64_t start, int64_t stop,
                        torch::Tensor offsets) {
  TORCH_CHECK(x.dim() == 3 && taps.dim() == 3, "conv_silu: x must be (B, N, E) and taps (K, w, E)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && taps.scalar_type() == torch::kFloat && x.is_contiguous() &&
                  taps.is_contiguous(),
              "conv_silu: x and taps must be contiguous float32");
  const int64_t B = x.size(0), N = x.size(1), E = x.size(2), K = taps.size(0), width = taps.size(1);
  TORCH_CHECK(taps.size(2) == E, "conv_silu: taps have ", taps.size(2), " channels, x has ", E);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == K * E && bias.scalar_type() == torch::kFloat && bias.is_contiguous()),
              "conv_silu: bias must be empty or (K, E) contiguous float32");
  TORCH_CHECK(offsets.scalar_type() == torch::kLong && offsets.is_contiguous() && offsets.numel() == K,
              "conv_silu: offsets must be (K,) int64");
  TORCH_CHECK(0 <= start && start <= stop && stop <= N, "conv_silu: rows [", start, ", ", stop, ") outside [0, ", N, ")");
  const int64_t rows = stop - start;
  auto out = torch::empty({B, rows, K, E}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp0 = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t* offs = offsets.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * rows * K, 8, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {  // (b, i, k) in out's order
      const int64_t k = task % K, bi = task / K, b = bi / rows, i = bi % rows;
      const int64_t first = start + i + offs[k];  // input row of tap 0
      const int64_t j0 = std::max<int64_t>(0, -first), j1 = std::min<int64_t>(width, N - first);
      const float* xb = xp + b * N * E;
      const float* tp = taps.data_ptr<float>() + k * width * E;
      const float* bp = bp0 ? bp0 + k * E : nullptr;
      float* o = op + task * E;
      int64_t e = 0;
      for (; e + W <= E; e += W) {
        vf acc = bp ? loadv(bp + e) : splat(0.0f);
        for (int64_t j = j0; j < j1; ++j) acc += loadv(tp + j * E + e) * loadv(xb + (first + j) * E + e);
        storev(o + e, vsilu(acc));
      }
      for (; e < E; ++e) {
        float acc = bp ? bp[e] : 0.0f;
        for (int64_t j = j0; j < j1; ++j) acc += tp[j * E + e] * xb[(first + j) * E + e];
        o[e] = silu(acc);
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_workers", &vmamba_threads::parallel_workers, "threads that share an at::parallel_for");
  m.def("forward", &conv_silu, "fused depthwise 1-D convolutions (K directions) + SiLU over rows of (B, N, E)");
}
