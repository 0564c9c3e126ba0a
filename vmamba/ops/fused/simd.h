// SIMD helpers shared by the compiled kernels of this folder.
//
// Float lanes via GCC/Clang vector extensions: portable C++, compiled to AVX-512 / AVX / NEON as available.
// The loader keys its build cache on this file as well as on each kernel's source.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef VMAMBA_LANES
#if defined(__AVX512F__)
// One zmm register per block: the Vim-T scan (N=16) runs 1.5x faster than with 8 lanes (measured on AVX-512).
#define VMAMBA_LANES 16
#else
#define VMAMBA_LANES 8
#endif
#endif

namespace vmamba_simd {

constexpr int W = VMAMBA_LANES;
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf splat(float x) { return vf{} + x; }
inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// round(x) to the nearest integer (ties to even) and p * 2^k for integral k. AVX-512 has one instruction
// for each (vrndscaleps, vscalefps: 2^k over- / underflows to inf / 0 by itself); elsewhere the
// magic-number rounding and exponent-bit construction, valid for k in [-126, 127] (callers clamp).
#if defined(__AVX512F__) && VMAMBA_LANES == 16
inline vf round_nearest(vf x) {
  return reinterpret_cast<vf>(_mm512_roundscale_ps(reinterpret_cast<__m512>(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline vf times_pow2(vf p, vf k) {
  return reinterpret_cast<vf>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), reinterpret_cast<__m512>(k)));
}
#else
inline vf round_nearest(vf x) { return (x + 12582912.0f) - 12582912.0f; }
inline vf times_pow2(vf p, vf k) {
  const vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
#endif

// 1 / x: AVX-512's 14-bit reciprocal estimate refined by one Newton step (relative error about 2^-23, like a
// division, at a fraction of vdivps's cost: the division was the bottleneck of the SiLU in dwconv2d_silu.h);
// elsewhere a division.
#if defined(__AVX512F__) && VMAMBA_LANES == 16
inline vf vrecip(vf x) {
  const vf r = reinterpret_cast<vf>(_mm512_rcp14_ps(reinterpret_cast<__m512>(x)));
  return r * (2.0f - x * r);
}
#else
inline vf vrecip(vf x) { return 1.0f / x; }
#endif

constexpr float LOG2E = 1.44269504088896341f;

// exp(x): Cephes-style range reduction and polynomial (about 1 ulp), branch-free. Inputs are clamped to
// [-87.3, 88.3] so 2^k stays a normal float (e^-87.3 ~ 1e-38: a decay that leaves nothing of a state).
inline vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.3f));
  const vf k = round_nearest(x * LOG2E);
  vf r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return times_pow2(p, k);
}

// 2^y: round to the nearest integer k, a degree-6 fit of 2^f on [-1/2, 1/2] (relative error <= 1.1e-7 in
// float32), times 2^k. An exponential whose argument is a product can fold log2(e) into one factor (the
// scan's decays exp(dt * A) with A pre-scaled by log2(e); the GELU's exp(-v^2 / 2)), saving vexp's
// two-constant range reduction. y is clamped to [-126, 127] (2^-126 ~ 1e-38: a decay that leaves nothing of
// a state).
inline vf vexp2(vf y) {
  y = vmin(vmax(y, splat(-126.0f)), splat(127.0f));
  const vf k = round_nearest(y);
  const vf f = y - k;
  vf p = splat(1.5465312753804028e-4f);
  p = p * f + 1.3395280111581087e-3f;
  p = p * f + 9.618040174245834e-3f;
  p = p * f + 5.550340563058853e-2f;
  p = p * f + 2.4022650718688965e-1f;
  p = p * f + 6.931471824645996e-1f;
  p = p * f + 1.0f;
  return times_pow2(p, k);
}
}  // namespace vmamba_simd
