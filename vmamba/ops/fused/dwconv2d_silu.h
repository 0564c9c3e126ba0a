// Fused depthwise 2-D convolution + SiLU over a channels-last map, forward and backward (VMamba's SS2D front
// end: in_proj -> depthwise conv -> SiLU -> scan). Compiled into the scan extension (multi_scan.cpp binds
// dwconv2d_silu_forward / _backward): a VMamba model needs both, and one extension is one first-use build
// (this file alone took ~27 s to build as its own extension, almost all of it in the torch headers).
//
//     x     (B, H, Wd, C)   float32, contiguous (channels last)
//     taps  (kh, kw, C)     the conv weight (C, 1, kh, kw) with channels last;  bias (C) or empty
//     y     (B, H, Wd, C):  y = silu(pre),
//           pre[b, h, w, c] = bias[c] + sum_{i, j} taps[i, j, c] * x[b, h + i - kh / 2, w + j - kw / 2, c]
//     with x = 0 outside the map ("same" padding; odd kh, kw; stride 1).
//
// Backward, with pre recomputed from x (nothing but x is kept between the passes):
//     g = dy * silu'(pre) = dy * s * (1 + pre * (1 - s)),  s = sigmoid(pre)
//     dx[b, h, w, c]  = sum_{i, j} taps[i, j, c] * g[b, h - i + kh / 2, w - j + kw / 2, c]
//     dtaps[i, j, c]  = sum_{b, h, w} g[b, h, w, c] * x[b, h + i - kh / 2, w + j - kw / 2, c];  dbias = sum g
//
// Work is split over (batch item, band of at most BAND rows); lanes are channels, a task walks its channel
// blocks one at a time with that block's taps in registers (one zmm each for a 3 x 3 kernel). The backward
// computes g for its band plus kh / 2 halo rows on each side into a thread-local buffer (the halo is
// recomputed by the neighbouring band: no synchronisation), then dx from that buffer; dtaps and dbias are
// summed over the band's own rows in registers and returned per task (the caller sums them: deterministic,
// no atomics). Compared with oneDNN's depthwise conv followed by a SiLU pass, the map is read once and
// written once per pass, and the backward needs neither the conv's output nor a separate SiLU-gradient tensor.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace vmamba_dwconv2d {

using namespace vmamba_simd;

constexpr int64_t BAND = 8;      // at most this many output rows per task (bands of equal height)
constexpr int64_t MAX_TAPS = 81;  // kernels up to 9 x 9

// The first n lanes of p (n <= W), the rest zero; and the converse store. Full blocks use loadv / storev.
inline vf load_part(const float* p, int64_t n) {
  vf v = splat(0.0f);
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}
inline void store_part(float* p, vf v, int64_t n) { std::memcpy(p, &v, n * sizeof(float)); }

inline vf vsigmoid(vf v) { return vrecip(1.0f + vexp(-v)); }

struct Dims {
  int64_t B, H, Wd, C, kh, kw, ph, pw, bands, band;  // band: rows per task (the last may have fewer)
};

// One channel block (lanes c0 .. c0 + nch - 1) of one band. FULL: nch == W (plain vector loads / stores).
// KH, KW > 0: the kernel size at compile time (taps and tap sums in registers); 0: given at run time.
template <bool FULL, int KH, int KW>
struct Block {
  const Dims& s;
  int64_t c0, nch;
  int64_t kh() const { return KH ? KH : s.kh; }
  int64_t kw() const { return KW ? KW : s.kw; }
  vf load(const float* p) const { return FULL ? loadv(p) : load_part(p, nch); }
  void store(float* p, vf v) const {
    if (FULL) storev(p, v);
    else store_part(p, v, nch);
  }
  // Map element (h, w) of image `img` (B-major, channels last), this block's lanes.
  const float* at(const float* img, int64_t h, int64_t w) const { return img + (h * s.Wd + w) * s.C + c0; }
  float* at(float* img, int64_t h, int64_t w) const { return img + (h * s.Wd + w) * s.C + c0; }

  // pre-activation at (h, w): bias + the taps over the in-map part of the window. With `window`, the input
  // vectors are kept (zero outside the map) for the taps' gradient.
  vf pre(const float* img, const vf* taps, vf bias, int64_t h, int64_t w, vf* window) const {
    const int64_t KHv = kh(), KWv = kw();
    const bool interior = h >= s.ph && h + s.ph < s.H && w >= s.pw && w + s.pw < s.Wd;
    vf acc = bias;
    if (interior) {
      for (int64_t i = 0; i < KHv; ++i)
        for (int64_t j = 0; j < KWv; ++j) {
          const vf v = load(at(img, h + i - s.ph, w + j - s.pw));
          if (window) window[i * KWv + j] = v;
          acc += taps[i * KWv + j] * v;
        }
      return acc;
    }
    for (int64_t i = 0; i < KHv; ++i)
      for (int64_t j = 0; j < KWv; ++j) {
        const int64_t hh = h + i - s.ph, ww = w + j - s.pw;
        const bool inside = hh >= 0 && hh < s.H && ww >= 0 && ww < s.Wd;
        const vf v = inside ? load(at(img, hh, ww)) : splat(0.0f);
        if (window) window[i * KWv + j] = v;
        acc += taps[i * KWv + j] * v;
      }
    return acc;
  }

  void forward(const float* x, const float* taps_p, const float* bias_p, float* y, int64_t b, int64_t r0,
               int64_t r1) const {
    const int64_t n = kh() * kw();
    vf taps[KH && KW ? KH * KW : MAX_TAPS];
    for (int64_t t = 0; t < n; ++t) taps[t] = load(taps_p + t * s.C + c0);
    const vf bias = bias_p ? load(bias_p + c0) : splat(0.0f);
    const float* img = x + b * s.H * s.Wd * s.C;
    float* out = y + b * s.H * s.Wd * s.C;
    for (int64_t h = r0; h < r1; ++h)
      for (int64_t w = 0; w < s.Wd; ++w) {
        const vf p = pre(img, taps, bias, h, w, nullptr);
        store(at(out, h, w), p * vsigmoid(p));
      }
  }

  // gbuf: (rows + kh - 1, Wd + kw - 1, W) lane-major scratch: g of the map rows r0 - ph .. r1 + ph - 1 with
  // pw zero columns on each side and zero rows outside the map, so the later loops need no bounds checks.
  // Three sweeps, each with few live vectors (all in registers): g; the taps' and bias' gradients over the
  // band's own rows; dx. dtaps_out (n, C) and dbias_out (C): this task's sums.
  void backward(const float* x, const float* dy, const float* taps_p, const float* bias_p, float* dx,
                int64_t b, int64_t r0, int64_t r1, float* gbuf, float* dtaps_out, float* dbias_out) const {
    const int64_t KHv = kh(), KWv = kw(), n = KHv * KWv, pitch = (s.Wd + KWv - 1) * W;
    vf taps[KH && KW ? KH * KW : MAX_TAPS];
    for (int64_t t = 0; t < n; ++t) taps[t] = load(taps_p + t * s.C + c0);
    const vf bias = bias_p ? load(bias_p + c0) : splat(0.0f);
    const int64_t off = b * s.H * s.Wd * s.C;
    const float *img = x + off, *gy = dy + off;
    float* gx = dx + off;
    const int64_t top = r0 - s.ph;  // map row of gbuf row 0
    auto g_at = [&](int64_t h, int64_t w) { return gbuf + (h - top) * pitch + (w + s.pw) * W; };
    for (int64_t h = top; h < r1 + s.ph; ++h) {
      if (h < 0 || h >= s.H) {
        std::fill(g_at(h, 0), g_at(h, s.Wd), 0.0f);
        continue;
      }
      for (int64_t w = 0; w < s.Wd; ++w) {
        const vf p = pre(img, taps, bias, h, w, nullptr);
        const vf sg = vsigmoid(p);
        storev(g_at(h, w), load(at(gy, h, w)) * sg * (1.0f + p * (1.0f - sg)));
      }
    }
    // dtaps[i, j] = sum over the band's rows of g[h, w] x[h + i - ph, w + j - pw]; dbias = sum of g.
    {
      vf dtaps[KH && KW ? KH * KW : MAX_TAPS], window[KH && KW ? KH * KW : MAX_TAPS];
      for (int64_t t = 0; t < n; ++t) dtaps[t] = splat(0.0f);
      vf dbias = splat(0.0f);
      for (int64_t h = r0; h < r1; ++h)
        for (int64_t w = 0; w < s.Wd; ++w) {
          const vf g = loadv(g_at(h, w));
          pre(img, taps, bias, h, w, window);  // for the window (kept in registers; the sum goes unused)
          dbias += g;
          for (int64_t t = 0; t < n; ++t) dtaps[t] += g * window[t];
        }
      for (int64_t t = 0; t < n; ++t) store(dtaps_out + t * s.C + c0, dtaps[t]);
      store(dbias_out + c0, dbias);
    }
    // dx[h, w] = sum_{i, j} taps[i, j] g[h - i + ph, w - j + pw] (zero outside the map).
    for (int64_t h = r0; h < r1; ++h)
      for (int64_t w = 0; w < s.Wd; ++w) {
        const float* g = g_at(h + s.ph, w + s.pw);
        vf acc[2] = {splat(0.0f), splat(0.0f)};
        for (int64_t i = 0; i < KHv; ++i)
          for (int64_t j = 0; j < KWv; ++j) acc[(i * KWv + j) & 1] += taps[i * KWv + j] * loadv(g - i * pitch - j * W);
        store(at(gx, h, w), acc[0] + acc[1]);
      }
  }
};

inline Dims dims(const torch::Tensor& x, const torch::Tensor& taps, const torch::Tensor& bias) {
  TORCH_CHECK(x.dim() == 4 && taps.dim() == 3, "dwconv2d_silu: x must be (B, H, W, C) and taps (kh, kw, C)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && taps.scalar_type() == torch::kFloat && x.is_contiguous() &&
                  taps.is_contiguous(),
              "dwconv2d_silu: x and taps must be contiguous float32");
  Dims s;
  s.B = x.size(0);
  s.H = x.size(1);
  s.Wd = x.size(2);
  s.C = x.size(3);
  s.kh = taps.size(0);
  s.kw = taps.size(1);
  TORCH_CHECK(taps.size(2) == s.C, "dwconv2d_silu: taps have ", taps.size(2), " channels, x has ", s.C);
  TORCH_CHECK(s.kh % 2 == 1 && s.kw % 2 == 1 && s.kh * s.kw <= MAX_TAPS,
              "dwconv2d_silu: the kernel must have odd sides and at most ", MAX_TAPS, " taps, got ", s.kh, " x ", s.kw);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == s.C && bias.scalar_type() == torch::kFloat && bias.is_contiguous()),
              "dwconv2d_silu: bias must be empty or (C,) contiguous float32");
  s.ph = s.kh / 2;
  s.pw = s.kw / 2;
  s.bands = (s.H + BAND - 1) / BAND;
  s.band = (s.H + s.bands - 1) / s.bands;
  return s;
}

// Calls f(block) for each channel block of a task, with the block type matching its width and the kernel size.
template <class F>
inline void for_blocks(const Dims& s, F&& f) {
  const bool k3 = s.kh == 3 && s.kw == 3;
  for (int64_t c0 = 0; c0 < s.C; c0 += W) {
    const int64_t nch = std::min<int64_t>(W, s.C - c0);
    if (nch == W && k3) f(Block<true, 3, 3>{s, c0, nch});
    else if (nch == W) f(Block<true, 0, 0>{s, c0, nch});
    else if (k3) f(Block<false, 3, 3>{s, c0, nch});
    else f(Block<false, 0, 0>{s, c0, nch});
  }
}

inline torch::Tensor dwconv2d_silu_forward(torch::Tensor x, torch::Tensor taps, torch::Tensor bias) {
  const Dims s = dims(x, taps, bias);
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *tp = taps.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, s.B * s.bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.bands, r0 = (task % s.bands) * s.band, r1 = std::min(s.H, r0 + s.band);
      for_blocks(s, [&](const auto& blk) { blk.forward(xp, tp, bp, yp, b, r0, r1); });
    }
  });
  return y;
}

// Returns dx (B, H, W, C), and per task dtaps (tasks, kh, kw, C) and dbias (tasks, C): the caller sums them.
inline std::vector<torch::Tensor> dwconv2d_silu_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor taps,
                                                         torch::Tensor bias) {
  const Dims s = dims(x, taps, bias);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == torch::kFloat && dy.is_contiguous(),
              "dwconv2d_silu: the output gradient must be a contiguous float32 tensor shaped like x");
  const int64_t tasks = s.B * s.bands;
  auto dx = torch::empty_like(x);
  auto dtaps = torch::empty({tasks, s.kh, s.kw, s.C}, x.options());
  auto dbias = torch::empty({tasks, s.C}, x.options());
  const float *xp = x.data_ptr<float>(), *gp = dy.data_ptr<float>(), *tp = taps.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float *dxp = dx.data_ptr<float>(), *dtp = dtaps.data_ptr<float>(), *dbp = dbias.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gbuf((s.band + s.kh - 1) * (s.Wd + s.kw - 1) * W, 0.0f);  // pad columns stay zero
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.bands, r0 = (task % s.bands) * s.band, r1 = std::min(s.H, r0 + s.band);
      for_blocks(s, [&](const auto& blk) {
        blk.backward(xp, gp, tp, bp, dxp, b, r0, r1, gbuf.data(), dtp + task * s.kh * s.kw * s.C, dbp + task * s.C);
      });
    }
  });
  return {dx, dtaps, dbias};
}

}  // namespace vmamba_dwconv2d
