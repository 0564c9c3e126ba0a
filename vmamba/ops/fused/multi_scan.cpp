// Fused CPU selective scans: one recurrence core, two memory layouts.
//
// Work is split over (batch item, block of W channels); a task owns its channels for the whole sequence
// (every direction), so nothing needs atomics. A task walks the sequence in tiles of TILE steps: it stages
// a tile's inputs into small thread-local buffers (lanes = channels, cache resident), computes the step
// sizes of the whole tile at once (independent work, so it pipelines), runs the sequential recurrence on
// the buffers, and writes the tile's results back. Only staging differs between the layouts:
//
// * MapLayout (`multi_forward` / `multi_backward`): K directions of one map, merged in place.
//     u      (B, L, Ku, D)      input; Ku = 1 (shared by every direction) or K (one per direction)
//     delta  (B, L, K, D)       raw dt per direction (bias / softplus applied here); any strides with unit
//                               channel stride (the dt projection's einsum gives (K, B, L, D) memory order,
//                               and a contiguous copy of it cost more than the scan at 56 x 56); d delta is
//                               returned with the same strides
//       or (B, L, K, R) rows    with `dt_weight` (K, R, D): the low-rank form delta[b, l, k] = rows[b, l, k] @
//                               dt_weight[k], computed tile by tile here (R FMAs per step), so neither delta
//                               nor d delta is ever materialised; any strides with unit rank stride (a slice
//                               of the x_proj output). The backward returns d rows (B, L, K, R) and d dt_weight
//                               per batch item (B, K, R, D).
//     A      (K, N, D)          negative decay rates
//     Bm, Cm (B, L, K, G, N)    group g serves channels g*D/G..(g+1)*D/G-1
//     bias   (K, D)             dt bias (may be empty);  h0, hT (B, K, N, D)
//     index  (K, L) int64       direction k visits map row index[k][t] at step t
//     Dskip  (K, D)             optional D skip per direction (may be empty)
//     y      (B, L, D)          sum over k of <C, h> + D_k u_k (no gate: the caller applies it)
//     marks  (B * D / W, K, tiles, N, W)  state before every tile (forward on request, read by the backward)
//   Channels per group must be a multiple of W (the caller zero-pads).
//
// * SeqLayout (`selective_forward` / `selective_backward`): mamba-ssm's selective_scan_fn layout, read and
//   written in place (no transposed or padded copies; each tile is transposed through the stage buffers),
//   with the D skip and the silu(z) gate (and their gradients) fused.
//     u, delta, z, y (B, D, L);  A (D, N);  Bm, Cm (B, G, N, L);  D, bias (D);  h0, hT (B, D, N)
//   Any channel count: a group's last block has idle lanes that are staged as zeros and never written.
//
// Backward: the state before every tile comes from the forward (both layouts keep them on request) or from a
// forward sweep; tiles are then processed from the end: recompute the tile's states and decays into an
// L2-resident buffer, run the adjoint backwards, and reduce the per-lane B / C gradient products 16 steps
// at a time. dB / dC are summed per thread (no atomics), then over threads by the caller.
//
// exp / log1p are branch-free polynomials so the lane loops vectorise; with AVX-512 the (B, D, L) staging
// and the lane sums use 16 x 16 register transposes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bias_gelu.h"
#include "dwconv2d_silu.h"
#include "simd.h"
#include "threads.h"

namespace {

using namespace vmamba_simd;

constexpr int MAX_N = 64;
constexpr int MAX_R = 256;  // dt rank of the low-rank delta (VMamba: ceil(dim / 16))
// Steps per tile: the backward keeps a tile's states ((TILE + 1) * N vectors) in L2 instead of the whole
// sequence's, and the staged inputs of a tile stay in L1.
constexpr int TILE = 64;

#if defined(__AVX512F__) && VMAMBA_LANES == 16
#define VMAMBA_AVX512 1
#endif

// Lane-wise sums of `count` (<= W) vectors p[j * stride]: out[j] = sum over lanes of p[j * stride].
// With AVX-512, 16 sums share one shuffle tree (about 3 ops per sum instead of 15 dependent adds each).
inline void lane_sums(const float* p, int64_t stride, int count, float* out) {
#ifdef VMAMBA_AVX512
  __m512 v[16];
  for (int j = 0; j < 16; ++j) v[j] = j < count ? _mm512_loadu_ps(p + j * stride) : _mm512_setzero_ps();
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // 128-bit blocks 0, 1: partials of v[2i]; 2, 3: of v[2i+1]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // block m: 4 partials of v[4i + m]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  const __m512 c0 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
  const __m512 c1 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
  const __m512 d = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c0), _mm512_castps_pd(c1))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c0), _mm512_castps_pd(c1))));
  // d's lane 4m + q holds the sum of v[4q + m].
  const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  alignas(64) float r[16];
  _mm512_store_ps(r, _mm512_permutexvar_ps(perm, d));
  for (int j = 0; j < count; ++j) out[j] = r[j];
#else
  for (int j = 0; j < count; ++j) {
    float acc = 0.0f;
    for (int l = 0; l < W; ++l) acc += p[j * stride + l];
    out[j] = acc;
  }
#endif
}

// Asks for the cache line holding p, into L2 (prefetcht2), not L1: along a column-major direction the rows of
// a tile are a multiple of 4 KiB apart (e.g. 56 rows x 1536 bytes), so all 64 of them fall into the same
// L1 set (8 ways) and evict each other before they are read; with L1 prefetches the loads of delta rows
// were ~30% of the map-layout forward in perf. Into L2: forward 0.7x, backward 0.7x its time (vmamba_t
// stage 1, batch 8). An asm statement on x86: GCC's vectoriser drops __builtin_prefetch from loops it
// vectorises (here, loops over a tile's row indices).
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht2 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 1);
#endif
}

// Copies a W x W block: out[j * os + i] = in[i * is + j] (rows of `in` become columns of `out`).
inline void transpose_block(const float* in, int64_t is, float* out, int64_t os) {
#ifdef VMAMBA_AVX512
  __m512 r[16], t[16], u[16], v[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * is);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + q], 128-bit block k: column 4k + q of rows 4g .. 4g + 3.
  for (int g = 0; g < 4; ++g) {
    const __m512d t0 = _mm512_castps_pd(t[4 * g]), t1 = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * g + 2]), t3 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  // v[2q + 8h + e]: blocks (k = e, e + 2) of column-group q for row groups 2h, 2h + 1.
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 4; ++q) {
      v[2 * q + 8 * h] = _mm512_shuffle_f32x4(u[8 * h + q], u[8 * h + 4 + q], 0x88);
      v[2 * q + 8 * h + 1] = _mm512_shuffle_f32x4(u[8 * h + q], u[8 * h + 4 + q], 0xDD);
    }
  for (int q = 0; q < 4; ++q)
    for (int e = 0; e < 2; ++e) {
      const __m512 lo = v[2 * q + e], hi = v[2 * q + e + 8];
      _mm512_storeu_ps(out + (4 * e + q) * os, _mm512_shuffle_f32x4(lo, hi, 0x88));
      _mm512_storeu_ps(out + (4 * (e + 2) + q) * os, _mm512_shuffle_f32x4(lo, hi, 0xDD));
    }
#else
  for (int i = 0; i < W; ++i)
    for (int j = 0; j < W; ++j) out[j * os + i] = in[i * is + j];
#endif
}

// log1p(e) for e in [0, 1] as e * P(e), P a degree-8 least-squares fit of log1p(e) / e (relative error
// <= 2.5e-7 in float32, measured on a 2e5-point grid): no division, no range reduction, and accurate
// relative to e however small e is.
inline vf vlog1p_0_1(vf e) {
  vf p = splat(0.0051860036f);
  p = p * e - 0.029210268f;
  p = p * e + 0.07754038f;
  p = p * e - 0.13583942f;
  p = p * e + 0.19055955f;
  p = p * e - 0.24825649f;
  p = p * e + 0.3331601f;
  p = p * e - 0.49999255f;
  p = p * e + 0.99999994f;
  return p * e;
}

// d softplus(x) / dx = sigmoid(x), from e = exp(-|x|) without cancellation.
inline vf vsigmoid_from(vf x, vf e) {
  const vf r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}
inline vf vsigmoid(vf x) { return vsigmoid_from(x, vexp(-vmax(x, -x))); }

// Per-thread staging buffers for one tile (lane-major: element (t, lane) at t * W + lane).
struct Stage {
  alignas(64) float x[TILE * W];      // u
  alignas(64) float dt[TILE * W];     // raw delta, then the step size
  alignas(64) float sig[TILE * W];    // d dt / d delta
  alignas(64) float y[TILE * W];      // <C, h>, then the layout's output
  alignas(64) float gy[TILE * W];     // d loss / d <C, h>
  alignas(64) float du[TILE * W];     // d loss / d u (scan part)
  alignas(64) float ddt[TILE * W];    // d loss / d delta
  std::vector<float> Bt, Ct;          // (TILE, N)
  std::vector<float> PB, PC;          // (TILE, N, W) per-lane products whose lane sums are the B, C grads
  std::vector<float> dBt, dCt;        // (N, TILE)
  std::vector<vf> hs;                 // (TILE + 1, N) states of the tile (backward)
  std::vector<vf> decay;              // (TILE, N) exp(dt * A) of the tile (backward)
  std::vector<float> marks;           // (tiles, N, W) state before each tile (backward)
  const float* rowp[TILE];            // the tile's low-rank delta rows (R floats each), read in place: 0.85x /
                                      // 0.94x the time of staged copies, forward / backward (vmamba_t, batch 8)
  std::vector<vf> dW;                 // (R) d dt_weight of one direction, summed over its steps
  alignas(64) float ddtT[W * W];      // W steps of ddt, transposed (lane-major -> step-major)
  void reserve(int64_t N, int64_t L, int64_t R = 0) {
    dW.resize(R);
    Bt.resize(TILE * N);
    Ct.resize(TILE * N);
    PB.resize(TILE * N * W);
    PC.resize(TILE * N * W);
    dBt.resize(TILE * N);
    dCt.resize(TILE * N);
    hs.resize((TILE + 1) * N);
    decay.resize(TILE * N);
    marks.resize(((L + TILE - 1) / TILE) * N * W);
  }
};

// dt = softplus(delta + bias) (or delta + bias) for a whole tile, and its derivative when asked;
// softplus(x) = max(x, 0) + log1p(e) and sigmoid(x) both from e = exp(-|x|).
inline void step_sizes(Stage& st, int T, vf bias, bool softplus, bool derivative) {
  for (int t = 0; t < T; ++t) {
    const vf x = loadv(st.dt + t * W) + bias;
    if (softplus) {
      const vf e = vexp(-vmax(x, -x));  // shared by softplus and its derivative
      storev(st.dt + t * W, vmax(x, splat(0.0f)) + vlog1p_0_1(e));
      if (derivative) storev(st.sig + t * W, vsigmoid_from(x, e));
    } else {
      storev(st.dt + t * W, x);
      if (derivative) storev(st.sig + t * W, splat(1.0f));
    }
  }
}

// The recurrence over one staged tile, with A2 = A * log2(e). States h (N vectors) are carried in and out; with `y` the output
// <C, h_t> of every step is stored, with `hs` every state (hs[0] = the incoming one) and with `decay` every
// exp(dt * A), which the reverse sweep reuses.
template <int NN>
inline void recur_tile(int n_dyn, int T, const vf* A2, vf* h_io, const Stage& st, float* y, vf* hs, vf* decay) {
  const int N = NN ? NN : n_dyn;
  // With a compile-time N the states are carried in a local array the compiler keeps in registers: through
  // h_io, which may alias the hs / decay stores, the step-to-step chain went through memory (a store and
  // a forwarded load every step, ~9% of the map-layout backward in perf).
  vf local[NN ? NN : 1];
  vf* h = NN ? local : h_io;
  if (NN)
    for (int n = 0; n < N; ++n) local[n] = h_io[n];
  if (hs)
    for (int n = 0; n < N; ++n) hs[n] = h[n];
  for (int t = 0; t < T; ++t) {
    const vf dt = loadv(st.dt + t * W);
    const vf dtu = dt * loadv(st.x + t * W);
    const float* Bv = st.Bt.data() + t * N;
    const float* Cv = st.Ct.data() + t * N;
    vf acc = splat(0.0f);
    for (int n = 0; n < N; ++n) {
      const vf a = vexp2(dt * A2[n]);  // exp(dt * A), A2 = A log2(e)
      if (decay) decay[t * N + n] = a;
      h[n] = a * h[n] + dtu * Bv[n];
      acc += h[n] * Cv[n];
    }
    if (y) storev(y + t * W, acc);
    if (hs)
      for (int n = 0; n < N; ++n) hs[(t + 1) * N + n] = h[n];
  }
  if (NN)
    for (int n = 0; n < N; ++n) h_io[n] = local[n];
}

// Reverse sweep over one tile: dh (N vectors, d loss / d h after the tile) is carried backwards; st.du and
// st.ddt get the scan part of d loss / d u and d loss / d delta; st.dBt / st.dCt (N, TILE) the per-step B,
// C grads. Their lane sums are taken after the sweep, 16 at a time (see lane_sums), off the dependency chain.
template <int NN>
inline void reverse_tile(int n_dyn, int T, const vf* Av, const vf* hs, const vf* decay, vf* dh_io, vf* dA_io,
                         Stage& st) {
  const int N = NN ? NN : n_dyn;
  // Register-resident carries with a compile-time N, as in recur_tile (the stage stores may alias dh_io).
  vf dh_local[NN ? NN : 1], dA_local[NN ? NN : 1];
  vf* dh = NN ? dh_local : dh_io;
  vf* dAacc = NN ? dA_local : dA_io;
  if (NN)
    for (int n = 0; n < N; ++n) {
      dh_local[n] = dh_io[n];
      dA_local[n] = dA_io[n];
    }
  for (int t = T - 1; t >= 0; --t) {
    const vf uu = loadv(st.x + t * W);
    const vf gy = loadv(st.gy + t * W);
    const vf dt = loadv(st.dt + t * W);
    const vf dtu = dt * uu;
    const float* Bv = st.Bt.data() + t * N;
    const float* Cv = st.Ct.data() + t * N;
    float* PBt = st.PB.data() + t * N * W;
    float* PCt = st.PC.data() + t * N * W;
    const vf* ht = hs + (t + 1) * N;
    const vf* hp = hs + t * N;
    vf ddt = splat(0.0f), ddtu = splat(0.0f);
    for (int n = 0; n < N; ++n) {
      const vf An = Av[n];
      storev(PCt + n * W, gy * ht[n]);
      const vf dhn = dh[n] + gy * Cv[n];
      const vf a = decay[t * N + n];
      storev(PBt + n * W, dhn * dtu);
      ddtu += dhn * Bv[n];
      const vf da = dhn * hp[n] * a;  // d loss / d (dt * A)
      ddt += da * An;
      dAacc[n] += da * dt;
      dh[n] = dhn * a;
    }
    storev(st.du + t * W, ddtu * dt);
    storev(st.ddt + t * W, (ddt + ddtu * uu) * loadv(st.sig + t * W));
  }
  if (NN)
    for (int n = 0; n < N; ++n) {
      dh_io[n] = dh_local[n];
      dA_io[n] = dA_local[n];
    }
  for (int n = 0; n < N; ++n)
    for (int t = 0; t < T; t += 16) {
      const int count = std::min(16, T - t);
      lane_sums(st.PB.data() + (t * N + n) * W, N * W, count, st.dBt.data() + n * TILE + t);
      lane_sums(st.PC.data() + (t * N + n) * W, N * W, count, st.dCt.data() + n * TILE + t);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Layouts: where a task's tile inputs come from and where its results go.
// ---------------------------------------------------------------------------------------------------------

struct MapDims {
  int64_t B, L, K, Ku, D, G, N, blocks;
  int64_t delta_b, delta_l, delta_k;  // delta's (and d delta's) strides, or the low-rank rows'; unit last stride
  int64_t R;                          // rank of the low-rank delta (rows @ dt_weight); 0: delta given in full
};

// One (batch item, block, direction) of the multi-direction map layout.
struct MapLayout {
  const MapDims& s;
  int64_t b, blk, k, d0, g;
  const float *u, *delta, *A, *Bm, *Cm, *bias, *h0, *Dskip;  // Dskip (K, D) or null
  const int64_t* idx;
  const float* Wt;  // dt_weight (K, R, D) with the low-rank delta (s.R > 0), else null

  int64_t length() const { return s.L; }
  vf load_D() const { return Dskip ? loadv(Dskip + k * s.D + d0) : splat(0.0f); }
  // A task runs its directions in order, so direction 0 (or every direction, with one u per direction) is
  // the first to write a y / du row: it stores, the others add. The outputs need no zero-fill beforehand (a
  // single-threaded memset plus page faults, ~2.5 ms for vmamba_t's first stage at batch 8).
  bool first_writer() const { return k == 0 || s.Ku != 1; }
  int64_t row(int64_t t) const { return b * s.L + idx[t]; }
  int64_t u_at(int64_t r) const { return (r * s.Ku + (s.Ku == 1 ? 0 : k)) * s.D + d0; }
  int64_t bc_at(int64_t r) const { return ((r * s.K + k) * s.G + g) * s.N; }
  int64_t delta_row(int64_t t) const { return b * s.delta_b + idx[t] * s.delta_l + k * s.delta_k; }  // step t
  int64_t delta_at(int64_t t) const { return delta_row(t) + d0; }  // full delta: this task's channels
  const float* weight_row(int64_t r) const { return Wt + (k * s.R + r) * s.D + d0; }  // dt_weight[k, r, block]
  int64_t state_at(int64_t n) const { return ((b * s.K + k) * s.N + n) * s.D + d0; }

  void load_A(vf* Av) const {
    for (int64_t n = 0; n < s.N; ++n) Av[n] = loadv(A + (k * s.N + n) * s.D + d0);
  }
  vf load_bias() const { return bias ? loadv(bias + k * s.D + d0) : splat(0.0f); }
  void load_h0(vf* h) const {
    for (int64_t n = 0; n < s.N; ++n) h[n] = h0 ? loadv(h0 + state_at(n)) : splat(0.0f);
  }
  // Rows of one direction are a row stride (or, column-major, a whole map column) apart, so the hardware
  // prefetchers, which stop at page boundaries, miss most of them: the next tile's rows are requested
  // while the current tile computes.
  void prefetch_inputs(int64_t t0, int T) const {
    for (int t = 0; t < T; ++t) {
      const int64_t r = row(t0 + t);
      prefetch_line(u + u_at(r));
      if (s.R) {
        prefetch_line(delta + delta_row(t0 + t));
        if (s.R > 16) prefetch_line(delta + delta_row(t0 + t) + s.R - 1);
      } else {
        prefetch_line(delta + delta_at(t0 + t));
      }
      prefetch_line(Bm + bc_at(r));
      prefetch_line(Cm + bc_at(r));
    }
  }
  void load_tile(Stage& st, int64_t t0, int T) const {
    const int64_t N = s.N;
    for (int t = 0; t < T; ++t) {
      const int64_t r = row(t0 + t);
      storev(st.x + t * W, loadv(u + u_at(r)));
      if (s.R) {
        st.rowp[t] = delta + delta_row(t0 + t);
      } else {
        storev(st.dt + t * W, loadv(delta + delta_at(t0 + t)));
      }
      if (N == 1) {  // d_state 1 (VMamba v2): a scalar copy, not a library memcpy call per step
        st.Bt[t] = Bm[bc_at(r)];
        st.Ct[t] = Cm[bc_at(r)];
      } else if (N % W == 0) {  // d_state 16 (Mamba / Vim): whole vectors, not a memcpy call per step
        for (int64_t n = 0; n < N; n += W) {
          storev(st.Bt.data() + t * N + n, loadv(Bm + bc_at(r) + n));
          storev(st.Ct.data() + t * N + n, loadv(Cm + bc_at(r) + n));
        }
      } else {
        std::memcpy(st.Bt.data() + t * N, Bm + bc_at(r), N * sizeof(float));
        std::memcpy(st.Ct.data() + t * N, Cm + bc_at(r), N * sizeof(float));
      }
    }
    if (s.R) expand_rows(st, T);
  }
  // Low-rank delta: st.dt[t] = sum_r rows[t, r] * dt_weight[k, r, block], 8 steps sharing each weight load.
  void expand_rows(Stage& st, int T) const {
    const int64_t R = s.R;
    const float* const* rows = st.rowp;
    int t = 0;
    for (; t + 8 <= T; t += 8) {
      vf acc[8] = {};
      for (int64_t r = 0; r < R; ++r) {
        const vf w = loadv(weight_row(r));
        for (int i = 0; i < 8; ++i) acc[i] += rows[t + i][r] * w;
      }
      for (int i = 0; i < 8; ++i) storev(st.dt + (t + i) * W, acc[i]);
    }
    for (; t < T; ++t) {
      vf acc = splat(0.0f);
      for (int64_t r = 0; r < R; ++r) acc += rows[t][r] * loadv(weight_row(r));
      storev(st.dt + t * W, acc);
    }
  }
};

struct MapForward : MapLayout {
  float *y, *hT;
  void prefetch(int64_t t0, int T) const {
    prefetch_inputs(t0, T);
    for (int t = 0; t < T; ++t) prefetch_line(y + row(t0 + t) * s.D + d0);
  }
  void store_tile(Stage& st, int64_t t0, int T) const {
    const vf Dk = load_D();
    for (int t = 0; t < T; ++t) {
      float* yo = y + row(t0 + t) * s.D + d0;
      vf out = loadv(st.y + t * W);
      if (Dskip) out += Dk * loadv(st.x + t * W);  // this direction's D skip
      storev(yo, k == 0 ? out : loadv(yo) + out);
    }
  }
  void store_last(const vf* h) const {
    for (int64_t n = 0; n < s.N; ++n) storev(hT + state_at(n), h[n]);
  }
};

struct MapBackward : MapLayout {
  const float *dy, *dhT;
  float *du, *ddelta, *dA, *dB, *dC, *dbias, *dh0, *dD;  // dB, dC: this thread's (B, L, K, G, N) partial sums
  mutable vf dDacc;  // sum over steps of dy * u (the D skip's gradient), with Dskip
  // Low-rank delta (ddelta unused): d rows goes to this thread's step-ordered partial (B, K, R, L) `drows`,
  // d dt_weight is summed over the steps in `dWacc` (R vectors, zeroed by the caller) and stored to dW
  // (B, K, R, D).
  float *drows, *dW;
  vf* dWacc;
  static constexpr bool needs_y = false;
  void prefetch(int64_t t0, int T) const {
    prefetch_inputs(t0, T);
    for (int t = 0; t < T; ++t) {
      const int64_t r = row(t0 + t);
      prefetch_line(dy + r * s.D + d0);
      prefetch_line(du + u_at(r));
      if (!s.R) prefetch_line(ddelta + delta_at(t0 + t));
    }
  }
  void load_dh(vf* dh) const {
    for (int64_t n = 0; n < s.N; ++n) dh[n] = dhT ? loadv(dhT + state_at(n)) : splat(0.0f);
  }
  void load_grad(Stage& st, int64_t t0, int T) const {
    for (int t = 0; t < T; ++t) {
      const vf g = loadv(dy + row(t0 + t) * s.D + d0);
      storev(st.gy + t * W, g);
      if (Dskip) dDacc += g * loadv(st.x + t * W);
    }
  }
  void store_grads(Stage& st, int64_t t0, int T) const {
    const int64_t N = s.N;
    const vf Dk = load_D();
    for (int t = 0; t < T; ++t) {
      const int64_t r = row(t0 + t);
      float* duo = du + u_at(r);
      vf dut = loadv(st.du + t * W);
      if (Dskip) dut += Dk * loadv(st.gy + t * W);
      storev(duo, first_writer() ? dut : loadv(duo) + dut);
      if (!s.R) storev(ddelta + delta_at(t0 + t), loadv(st.ddt + t * W));
      float *dBo = dB + bc_at(r), *dCo = dC + bc_at(r);
      for (int64_t n = 0; n < N; ++n) {
        dBo[n] += st.dBt[n * TILE + t];
        dCo[n] += st.dCt[n * TILE + t];
      }
    }
    if (s.R) low_rank_grads(st, t0, T);
  }
  // Through delta[t] = sum_r rows[t, r] * weight_r: d weight_r += ddt[t] * rows[t, r] (lanes = channels), and
  // d rows[t, r] = sum over lanes of ddt[t] * weight_r, taken W steps at a time from the transposed ddt (W
  // FMAs per rank and W steps, no lane reductions) and added to this thread's partial at steps t0 + t.
  void low_rank_grads(Stage& st, int64_t t0, int T) const {
    const int64_t R = s.R;
    const float* const* rows = st.rowp;
    int t = 0;
    for (; t + 8 <= T; t += 8) {
      vf g[8];
      for (int i = 0; i < 8; ++i) g[i] = loadv(st.ddt + (t + i) * W);
      for (int64_t r = 0; r < R; ++r) {
        vf a = g[0] * rows[t][r];
        for (int i = 1; i < 8; ++i) a += g[i] * rows[t + i][r];
        dWacc[r] += a;
      }
    }
    for (; t < T; ++t) {
      const vf g = loadv(st.ddt + t * W);
      for (int64_t r = 0; r < R; ++r) dWacc[r] += g * rows[t][r];
    }
    float* part = drows + (b * s.K + k) * R * s.L + t0;
    for (int tb = 0; tb < T; tb += W) {
      const int count = std::min(W, T - tb);
      transpose_block(st.ddt + tb * W, W, st.ddtT, W);  // ddtT[lane * W + i] = ddt of step tb + i
      for (int64_t r = 0; r < R; ++r) {
        const float* w = weight_row(r);
        vf acc[4] = {};
        for (int j = 0; j < W; ++j) acc[j % 4] += loadv(st.ddtT + j * W) * w[j];
        const vf sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        float* o = part + r * s.L + tb;
        if (count == W) {
          storev(o, loadv(o) + sum);
        } else {
          for (int i = 0; i < count; ++i) o[i] += sum[i];
        }
      }
    }
  }
  void store_end(const vf* dh, const vf* dAacc, vf dbias_acc) const {
    for (int64_t n = 0; n < s.N; ++n) {
      if (dh0) storev(dh0 + state_at(n), dh[n]);
      storev(dA + state_at(n), dAacc[n]);
    }
    storev(dbias + (b * s.K + k) * s.D + d0, dbias_acc);
    if (Dskip) storev(dD + (b * s.K + k) * s.D + d0, dDacc);
    for (int64_t r = 0; r < s.R; ++r) storev(dW + (b * s.K + k) * s.R * s.D + r * s.D + d0, dWacc[r]);
  }
};

struct SeqDims {
  int64_t B, D, L, G, N, per_group, blocks_per_group;
};

// One (batch item, block of up to W channels of one group) of the (B, D, L) layout.
struct SeqLayout {
  const SeqDims& s;
  int64_t b, g, c0, nch;  // channels c0 .. c0 + nch - 1, nch <= W
  const float *u, *delta, *A, *Bm, *Cm, *Dskip, *z, *bias, *h0;

  int64_t length() const { return s.L; }
  // Each channel is read and written along L, which the hardware prefetchers follow on their own.
  void prefetch_inputs(int64_t, int) const {}
  void prefetch(int64_t, int) const {}
  const float* chan(const float* p) const { return p + (b * s.D + c0) * s.L; }
  int64_t state_at(int64_t c, int64_t n) const { return (b * s.D + c0 + c) * s.N + n; }

  // (nch, L) rows of a (B, D, L) tensor -> lane-major tile, idle lanes zero.
  // Whole W x W blocks go through transpose_block; the rest (a short tile's end, idle lanes) element-wise.
  void gather(const float* p, float* out, int64_t t0, int T) const {
    const float* src = chan(p) + t0;
    int done = 0;
    if (nch == W)
      for (; done + W <= T; done += W) transpose_block(src + done, s.L, out + done * W, W);
    for (int64_t c = 0; c < nch; ++c)
      for (int t = done; t < T; ++t) out[t * W + c] = src[c * s.L + t];
    for (int64_t c = nch; c < W; ++c)
      for (int t = done; t < T; ++t) out[t * W + c] = 0.0f;
  }
  void scatter(const float* in, float* p, int64_t t0, int T) const {
    float* dst = const_cast<float*>(chan(p)) + t0;
    int done = 0;
    if (nch == W)
      for (; done + W <= T; done += W) transpose_block(in + done * W, W, dst + done, s.L);
    for (int64_t c = 0; c < nch; ++c)
      for (int t = done; t < T; ++t) dst[c * s.L + t] = in[t * W + c];
  }
  vf per_channel(const float* p) const {  // a (D,) vector's lanes, idle lanes zero
    vf v = splat(0.0f);
    if (p)
      for (int64_t c = 0; c < nch; ++c) v[c] = p[c0 + c];
    return v;
  }
  void load_A(vf* Av) const {
    for (int64_t n = 0; n < s.N; ++n) {
      Av[n] = splat(0.0f);
      for (int64_t c = 0; c < nch; ++c) Av[n][c] = A[(c0 + c) * s.N + n];
    }
  }
  vf load_bias() const { return per_channel(bias); }
  void load_states(const float* p, vf* h) const {
    for (int64_t n = 0; n < s.N; ++n) {
      h[n] = splat(0.0f);
      if (p)
        for (int64_t c = 0; c < nch; ++c) h[n][c] = p[state_at(c, n)];
    }
  }
  void store_states(float* p, const vf* h) const {
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < nch; ++c) p[state_at(c, n)] = h[n][c];
  }
  void load_h0(vf* h) const { load_states(h0, h); }
  void load_tile(Stage& st, int64_t t0, int T) const {
    gather(u, st.x, t0, T);
    gather(delta, st.dt, t0, T);
    const int64_t N = s.N;
    const float* Bg = Bm + (b * s.G + g) * N * s.L + t0;
    const float* Cg = Cm + (b * s.G + g) * N * s.L + t0;
    int done = 0;
    if (N % W == 0)
      for (; done + W <= T; done += W)
        for (int64_t n0 = 0; n0 < N; n0 += W) {
          transpose_block(Bg + n0 * s.L + done, s.L, st.Bt.data() + done * N + n0, N);
          transpose_block(Cg + n0 * s.L + done, s.L, st.Ct.data() + done * N + n0, N);
        }
    for (int64_t n = 0; n < N; ++n)
      for (int t = done; t < T; ++t) {
        st.Bt[t * N + n] = Bg[n * s.L + t];
        st.Ct[t * N + n] = Cg[n * s.L + t];
      }
  }
};

struct SeqForward : SeqLayout {
  float *y, *hT;
  void store_tile(Stage& st, int64_t t0, int T) const {
    const vf Dv = per_channel(Dskip);
    if (z) gather(z, st.gy, t0, T);  // gy is free in the forward
    for (int t = 0; t < T; ++t) {
      vf out = loadv(st.y + t * W);
      if (Dskip) out += Dv * loadv(st.x + t * W);
      if (z) {
        const vf zz = loadv(st.gy + t * W);
        out *= zz * vsigmoid(zz);
      }
      storev(st.y + t * W, out);
    }
    scatter(st.y, y, t0, T);
  }
  void store_last(const vf* h) const { store_states(hT, h); }
};

struct SeqBackward : SeqLayout {
  const float *dy, *dhT;
  float *du, *ddelta, *dA, *dB, *dC, *dD, *dz, *dbias, *dh0;  // dB, dC: this thread's (B, G, N, L) partials
  mutable vf dDacc;
  static constexpr bool needs_y = true;
  void load_dh(vf* dh) const { load_states(dhT, dh); }
  // From d loss / d out to d loss / d <C, h> through out = (<C, h> + D u) * silu(z); writes dz.
  void load_grad(Stage& st, int64_t t0, int T) const {
    gather(dy, st.gy, t0, T);
    if (!z && !Dskip) return;
    const vf Dv = per_channel(Dskip);
    if (z) gather(z, st.du, t0, T);  // du is free until the reverse sweep
    for (int t = 0; t < T; ++t) {
      vf g = loadv(st.gy + t * W);
      const vf uu = loadv(st.x + t * W);
      if (z) {
        const vf zz = loadv(st.du + t * W);
        const vf sg = vsigmoid(zz);
        const vf full = loadv(st.y + t * W) + Dv * uu;
        storev(st.du + t * W, g * full * sg * (1.0f + zz * (1.0f - sg)));
        g = g * zz * sg;
      }
      dDacc += g * uu;
      storev(st.gy + t * W, g);
    }
    if (z) scatter(st.du, dz, t0, T);
  }
  void store_grads(Stage& st, int64_t t0, int T) const {
    if (Dskip) {
      const vf Dv = per_channel(Dskip);
      for (int t = 0; t < T; ++t) storev(st.du + t * W, loadv(st.du + t * W) + Dv * loadv(st.gy + t * W));
    }
    scatter(st.du, du, t0, T);
    scatter(st.ddt, ddelta, t0, T);
    const int64_t N = s.N;
    float* dBg = dB + (b * s.G + g) * N * s.L + t0;
    float* dCg = dC + (b * s.G + g) * N * s.L + t0;
    for (int64_t n = 0; n < N; ++n)
      for (int t = 0; t < T; ++t) {
        dBg[n * s.L + t] += st.dBt[n * TILE + t];
        dCg[n * s.L + t] += st.dCt[n * TILE + t];
      }
  }
  void store_end(const vf* dh, const vf* dAacc, vf dbias_acc) const {
    if (dh0) store_states(dh0, dh);
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < nch; ++c) dA[(b * s.D + c0 + c) * s.N + n] = dAacc[n][c];
    for (int64_t c = 0; c < nch; ++c) {
      dD[b * s.D + c0 + c] = dDacc[c];
      dbias[b * s.D + c0 + c] = dbias_acc[c];
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// The two passes, written once for any layout.
// ---------------------------------------------------------------------------------------------------------

// With `marks` (tiles, N, W), the state before each tile is kept for the backward (which then skips its
// own forward sweep).
template <int NN, class Fwd>
void forward_pass(const Fwd& lay, int n_dyn, bool softplus, Stage& st, float* marks) {
  const int N = NN ? NN : n_dyn;
  vf Av[MAX_N], A2[MAX_N], h[MAX_N];
  lay.load_A(Av);
  for (int n = 0; n < N; ++n) A2[n] = Av[n] * LOG2E;
  lay.load_h0(h);
  const vf bias = lay.load_bias();
  for (int64_t t0 = 0, i = 0; t0 < lay.length(); t0 += TILE, ++i) {
    const int T = static_cast<int>(std::min<int64_t>(TILE, lay.length() - t0));
    if (marks)
      for (int n = 0; n < N; ++n) storev(marks + (i * N + n) * W, h[n]);
    lay.load_tile(st, t0, T);
    if (t0 + T < lay.length()) lay.prefetch(t0 + T, static_cast<int>(std::min<int64_t>(TILE, lay.length() - t0 - T)));
    step_sizes(st, T, bias, softplus, false);
    recur_tile<NN>(n_dyn, T, A2, h, st, st.y, nullptr, nullptr);
    lay.store_tile(st, t0, T);
  }
  lay.store_last(h);
}

// Reverse-mode pass: the state before each tile comes from the forward (`marks`) or, without it, from a
// forward sweep here; then, tile by tile from the end, the tile's states are recomputed into a
// cache-resident buffer and the adjoint runs backwards.
template <int NN, class Bwd>
void backward_pass(const Bwd& lay, int n_dyn, bool softplus, Stage& st, const float* marks) {
  const int N = NN ? NN : n_dyn;
  const int64_t L = lay.length();
  vf Av[MAX_N], A2[MAX_N], h[MAX_N], dh[MAX_N], dAacc[MAX_N];
  lay.load_A(Av);
  for (int n = 0; n < N; ++n) A2[n] = Av[n] * LOG2E;
  const vf bias = lay.load_bias();
  if (!marks) {
    lay.load_h0(h);
    for (int64_t t0 = 0, i = 0; t0 < L; t0 += TILE, ++i) {
      const int T = static_cast<int>(std::min<int64_t>(TILE, L - t0));
      for (int n = 0; n < N; ++n) storev(st.marks.data() + (i * N + n) * W, h[n]);
      if (t0 + T == L) break;  // the last tile's end state is not needed
      lay.load_tile(st, t0, T);
      if (t0 + T < L) lay.prefetch_inputs(t0 + T, static_cast<int>(std::min<int64_t>(TILE, L - t0 - T)));
      step_sizes(st, T, bias, softplus, false);
      recur_tile<NN>(n_dyn, T, A2, h, st, nullptr, nullptr, nullptr);
    }
    marks = st.marks.data();
  }
  lay.load_dh(dh);
  for (int n = 0; n < N; ++n) dAacc[n] = splat(0.0f);
  vf dbias = splat(0.0f);
  const int64_t last = (L - 1) / TILE;
  for (int64_t i = last; i >= 0; --i) {
    const int64_t t0 = i * TILE;
    const int T = static_cast<int>(std::min<int64_t>(TILE, L - t0));
    lay.load_tile(st, t0, T);
    if (i > 0) lay.prefetch(t0 - TILE, TILE);
    step_sizes(st, T, bias, softplus, true);
    for (int n = 0; n < N; ++n) h[n] = loadv(marks + (i * N + n) * W);
    recur_tile<NN>(n_dyn, T, A2, h, st, Bwd::needs_y ? st.y : nullptr, st.hs.data(), st.decay.data());
    lay.load_grad(st, t0, T);
    reverse_tile<NN>(n_dyn, T, Av, st.hs.data(), st.decay.data(), dh, dAacc, st);
    for (int t = 0; t < T; ++t) dbias += loadv(st.ddt + t * W);
    lay.store_grads(st, t0, T);
  }
  lay.store_end(dh, dAacc, dbias);
}

// d_state 1 (VMamba v2) and 16 (Mamba / Vim) get loops the compiler fully unrolls; others a runtime N.
template <class Lay>
void forward_any(const Lay& lay, int64_t N, bool softplus, Stage& st, float* marks = nullptr) {
  if (N == 1) forward_pass<1>(lay, 1, softplus, st, marks);
  else if (N == 16) forward_pass<16>(lay, 16, softplus, st, marks);
  else forward_pass<0>(lay, static_cast<int>(N), softplus, st, marks);
}
template <class Lay>
void backward_any(const Lay& lay, int64_t N, bool softplus, Stage& st, const float* marks = nullptr) {
  if (N == 1) backward_pass<1>(lay, 1, softplus, st, marks);
  else if (N == 16) backward_pass<16>(lay, 16, softplus, st, marks);
  else backward_pass<0>(lay, static_cast<int>(N), softplus, st, marks);
}

int64_t tiles(int64_t L) { return (L + TILE - 1) / TILE; }

const float* opt(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

void check_f32(std::initializer_list<const torch::Tensor*> ts) {
  for (const torch::Tensor* t : ts)
    if (t->numel()) TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous(), "fused scan: inputs must be contiguous float32");
}

// Per-thread partial sums of dB / dC (tasks of one thread add into the same slice): (threads, ...), with
// `threads` = at::get_num_threads() taken before the parallel region (inside it OpenMP may report 1).
int64_t thread_slot(int64_t threads) {
  const int64_t tid = at::get_thread_num();
  TORCH_CHECK(tid >= 0 && tid < threads, "fused scan: unexpected thread id");
  return tid;
}

// ---------------------------------------------------------------------------------------------------------
// Map layout entry points
// ---------------------------------------------------------------------------------------------------------

// The per-thread, step-ordered d rows (threads, B, K, R, L) of the low-rank backward, summed over threads
// and put in map-row order: (B, L, K, R), out[b, index[k, t], k, r] = sum over threads of part[., b, k, r, t].
torch::Tensor rows_in_map_order(const torch::Tensor& parts, const torch::Tensor& index, const MapDims& s) {
  auto out = torch::empty({s.B, s.L, s.K, s.R}, parts.options());
  const int64_t threads = parts.size(0), part = s.B * s.K * s.R * s.L;
  const float* p = parts.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, s.B * s.K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / s.K, k = bk % s.K;
      for (int64_t r = 0; r < s.R; ++r) {
        const float* src = p + (bk * s.R + r) * s.L;
        for (int64_t t = 0; t < s.L; ++t) {
          float v = src[t];
          for (int64_t th = 1; th < threads; ++th) v += src[th * part + t];
          o[((b * s.L + idx[k * s.L + t]) * s.K + k) * s.R + r] = v;
        }
      }
    }
  });
  return out;
}

MapDims map_dims(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bm,
                 const torch::Tensor& index, const torch::Tensor& dt_weight) {
  TORCH_CHECK(u.dim() == 4 && delta.dim() == 4 && A.dim() == 3 && Bm.dim() == 5 && index.dim() == 2,
              "multi_scan: bad ranks");
  MapDims s;
  s.B = u.size(0);
  s.L = u.size(1);
  s.Ku = u.size(2);
  s.D = u.size(3);
  s.K = delta.size(2);
  s.N = A.size(1);
  s.G = Bm.size(3);
  TORCH_CHECK(s.Ku == 1 || s.Ku == s.K, "multi_scan: u must have 1 or K directions");
  s.R = dt_weight.numel() ? dt_weight.size(1) : 0;
  if (s.R) {
    TORCH_CHECK(dt_weight.dim() == 3 && dt_weight.size(0) == s.K && dt_weight.size(2) == s.D &&
                    dt_weight.scalar_type() == torch::kFloat && dt_weight.is_contiguous(),
                "multi_scan: dt_weight must be contiguous float32 (K, R, D)");
    TORCH_CHECK(s.R <= MAX_R, "multi_scan: dt rank must be <= ", MAX_R);
    TORCH_CHECK(delta.size(0) == s.B && delta.size(1) == s.L && delta.size(3) == s.R,
                "multi_scan: low-rank delta rows must be (B, L, K, R)");
    TORCH_CHECK(delta.scalar_type() == torch::kFloat && (delta.stride(3) == 1 || s.R == 1),
                "multi_scan: low-rank delta rows must be float32 with unit rank stride");
  } else {
    TORCH_CHECK(delta.size(0) == s.B && delta.size(1) == s.L && delta.size(3) == s.D, "multi_scan: bad delta shape");
    TORCH_CHECK(delta.scalar_type() == torch::kFloat && (delta.stride(3) == 1 || s.D == 1) &&
                    delta.is_non_overlapping_and_dense(),
                "multi_scan: delta must be float32, dense, with unit channel stride");
  }
  s.delta_b = delta.stride(0);
  s.delta_l = delta.stride(1);
  s.delta_k = delta.stride(2);
  TORCH_CHECK(s.N <= MAX_N, "multi_scan: d_state must be <= 64");
  TORCH_CHECK(s.D % s.G == 0, "multi_scan: groups must divide channels");
  TORCH_CHECK((s.D / s.G) % W == 0, "multi_scan: channels per group must be a multiple of the SIMD width");
  TORCH_CHECK(index.scalar_type() == torch::kLong && index.is_contiguous() && index.size(0) == s.K &&
                  index.size(1) == s.L, "multi_scan: bad index");
  // Every direction visits every row once: the kernel indexes with it unchecked, and direction 0 stores
  // the rows of y / du that the others add to.
  std::vector<char> seen(s.L);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t k = 0; k < s.K; ++k) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t t = 0; t < s.L; ++t) {
      const int64_t r = idx[k * s.L + t];
      TORCH_CHECK(r >= 0 && r < s.L && !seen[r], "multi_scan: each index row must be a permutation of the map rows");
      seen[r] = 1;
    }
  }
  s.blocks = s.D / W;
  return s;
}

MapLayout map_task(const MapDims& s, int64_t b, int64_t blk, int64_t k, const torch::Tensor& u,
                   const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bm,
                   const torch::Tensor& Cm, const torch::Tensor& bias, const torch::Tensor& h0,
                   const torch::Tensor& Dskip, const torch::Tensor& index, const torch::Tensor& dt_weight) {
  const int64_t d0 = blk * W;
  return MapLayout{s, b, blk, k, d0, d0 / (s.D / s.G), u.data_ptr<float>(), delta.data_ptr<float>(),
                   A.data_ptr<float>(), Bm.data_ptr<float>(), Cm.data_ptr<float>(), opt(bias), opt(h0),
                   opt(Dskip), index.data_ptr<int64_t>() + k * s.L, opt(dt_weight)};
}

// Returns y, hT and, with `keep_marks`, the state before every tile (tasks, K, tiles, N, W) for the backward.
std::vector<torch::Tensor> multi_forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                         torch::Tensor Cm, torch::Tensor bias, torch::Tensor h0, torch::Tensor index,
                                         bool softplus, bool keep_marks, torch::Tensor Dskip, torch::Tensor dt_weight) {
  const MapDims s = map_dims(u, delta, A, Bm, index, dt_weight);
  check_f32({&u, &A, &Bm, &Cm, &bias, &h0, &Dskip});  // delta: see map_dims
  TORCH_CHECK(Dskip.numel() == 0 || Dskip.numel() == s.K * s.D, "multi_scan: D must be (K, D)");
  const int64_t tasks = s.B * s.blocks, mark_size = tiles(s.L) * s.N * W;
  auto y = torch::empty({s.B, s.L, s.D}, u.options());  // direction 0 stores (see first_writer)
  auto hT = torch::empty({s.B, s.K, s.N, s.D}, u.options());
  auto marks = keep_marks ? torch::empty({tasks, s.K, tiles(s.L), s.N, W}, u.options()) : torch::empty({0}, u.options());
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Stage st;
    st.reserve(s.N, s.L, s.R);
    for (int64_t task = begin; task < end; ++task)
      for (int64_t k = 0; k < s.K; ++k) {
        MapForward lay{map_task(s, task / s.blocks, task % s.blocks, k, u, delta, A, Bm, Cm, bias, h0, Dskip, index,
                                dt_weight),
                       y.data_ptr<float>(), hT.data_ptr<float>()};
        forward_any(lay, s.N, softplus, st, keep_marks ? marks.data_ptr<float>() + (task * s.K + k) * mark_size : nullptr);
      }
  });
  return {y, hT, marks};
}

// Returns du, ddelta (with dt_weight: d rows (B, L, K, R)), dA per batch item (B, K, N, D), dB and dC
// (B, L, K, G, N), dbias per batch item (B, K, D), dh0, with D dD per batch item (B, K, D), and with
// dt_weight d dt_weight per batch item (B, K, R, D). `marks` from the forward (or empty: a forward sweep
// recomputes them).
std::vector<torch::Tensor> multi_backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                          torch::Tensor Cm, torch::Tensor bias, torch::Tensor h0, torch::Tensor index,
                                          bool softplus, torch::Tensor dy, torch::Tensor dhT, torch::Tensor marks,
                                          torch::Tensor Dskip, torch::Tensor dt_weight) {
  const MapDims s = map_dims(u, delta, A, Bm, index, dt_weight);
  check_f32({&u, &A, &Bm, &Cm, &bias, &h0, &dy, &dhT, &marks, &Dskip});  // delta: see map_dims
  TORCH_CHECK(Dskip.numel() == 0 || Dskip.numel() == s.K * s.D, "multi_scan: D must be (K, D)");
  const int64_t mark_size = tiles(s.L) * s.N * W;
  TORCH_CHECK(marks.numel() == 0 || marks.numel() == s.B * s.blocks * s.K * mark_size,
              "multi_scan: checkpoints do not match the inputs");
  const int64_t threads = at::get_num_threads();
  auto du = torch::empty_like(u);  // see first_writer
  // Full delta: d delta with delta's strides (a dense permutation: empty_like keeps them). Low-rank: each
  // thread's step-ordered d rows (threads, B, K, R, L), put in map-row order after the parallel region.
  auto ddelta = s.R ? torch::empty({0}, u.options()) : torch::empty_like(delta);
  auto drows = s.R ? torch::zeros({threads, s.B, s.K, s.R, s.L}, u.options()) : torch::empty({0}, u.options());
  auto dW = s.R ? torch::empty({s.B, s.K, s.R, s.D}, u.options()) : torch::empty({0}, u.options());
  auto dA = torch::empty({s.B, s.K, s.N, s.D}, u.options());
  auto dB = torch::zeros({threads, s.B, s.L, s.K, s.G, s.N}, u.options());
  auto dC = torch::zeros({threads, s.B, s.L, s.K, s.G, s.N}, u.options());
  auto dbias = torch::empty({s.B, s.K, s.D}, u.options());
  auto dD = Dskip.numel() ? torch::empty({s.B, s.K, s.D}, u.options()) : torch::empty({0}, u.options());
  auto dh0 = h0.numel() ? torch::empty_like(h0) : torch::Tensor();
  const int64_t part = s.B * s.L * s.K * s.G * s.N, rows_part = s.B * s.K * s.R * s.L;
  at::parallel_for(0, s.B * s.blocks, 1, [&](int64_t begin, int64_t end) {
    Stage st;
    st.reserve(s.N, s.L, s.R);
    const int64_t slot = thread_slot(threads);
    for (int64_t task = begin; task < end; ++task)
      for (int64_t k = 0; k < s.K; ++k) {
        std::fill(st.dW.begin(), st.dW.end(), splat(0.0f));
        MapBackward lay{map_task(s, task / s.blocks, task % s.blocks, k, u, delta, A, Bm, Cm, bias, h0, Dskip, index,
                                 dt_weight),
                        dy.data_ptr<float>(), opt(dhT), du.data_ptr<float>(),
                        s.R ? nullptr : ddelta.data_ptr<float>(), dA.data_ptr<float>(),
                        dB.data_ptr<float>() + slot * part, dC.data_ptr<float>() + slot * part,
                        dbias.data_ptr<float>(), h0.numel() ? dh0.data_ptr<float>() : nullptr,
                        Dskip.numel() ? dD.data_ptr<float>() : nullptr, splat(0.0f),
                        s.R ? drows.data_ptr<float>() + slot * rows_part : nullptr, s.R ? dW.data_ptr<float>() : nullptr,
                        st.dW.data()};
        backward_any(lay, s.N, softplus, st,
                     marks.numel() ? marks.data_ptr<float>() + (task * s.K + k) * mark_size : nullptr);
      }
  });
  if (s.R) ddelta = rows_in_map_order(drows, index, s);
  return {du, ddelta, dA, threads == 1 ? dB[0] : dB.sum(0), threads == 1 ? dC[0] : dC.sum(0), dbias, dh0, dD, dW};
}

// ---------------------------------------------------------------------------------------------------------
// (B, D, L) layout entry points
// ---------------------------------------------------------------------------------------------------------

SeqDims seq_dims(const torch::Tensor& u, const torch::Tensor& A, const torch::Tensor& Bm) {
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2 && Bm.dim() == 4, "selective_scan: bad ranks");
  SeqDims s;
  s.B = u.size(0);
  s.D = u.size(1);
  s.L = u.size(2);
  s.N = A.size(1);
  s.G = Bm.size(1);
  TORCH_CHECK(s.N <= MAX_N, "selective_scan: d_state must be <= 64");
  TORCH_CHECK(s.G > 0 && s.D % s.G == 0, "selective_scan: groups must divide channels");
  s.per_group = s.D / s.G;
  s.blocks_per_group = (s.per_group + W - 1) / W;
  return s;
}

SeqLayout seq_task(const SeqDims& s, int64_t task, const torch::Tensor& u, const torch::Tensor& delta,
                   const torch::Tensor& A, const torch::Tensor& Bm, const torch::Tensor& Cm, const torch::Tensor& Dskip,
                   const torch::Tensor& z, const torch::Tensor& bias, const torch::Tensor& h0) {
  const int64_t per_batch = s.G * s.blocks_per_group;
  const int64_t b = task / per_batch, g = (task % per_batch) / s.blocks_per_group, j = task % s.blocks_per_group;
  const int64_t c0 = g * s.per_group + j * W;
  return SeqLayout{s, b, g, c0, std::min<int64_t>(W, s.per_group - j * W), u.data_ptr<float>(),
                   delta.data_ptr<float>(), A.data_ptr<float>(), Bm.data_ptr<float>(), Cm.data_ptr<float>(),
                   opt(Dskip), opt(z), opt(bias), opt(h0)};
}

// Returns y, hT and, with `keep_marks`, the state before every tile (tasks, tiles, N, W) for the backward.
std::vector<torch::Tensor> selective_forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                             torch::Tensor Cm, torch::Tensor Dskip, torch::Tensor z, torch::Tensor bias,
                                             torch::Tensor h0, bool softplus, bool keep_marks) {
  const SeqDims s = seq_dims(u, A, Bm);
  check_f32({&u, &delta, &A, &Bm, &Cm, &Dskip, &z, &bias, &h0});
  const int64_t tasks = s.B * s.G * s.blocks_per_group, mark_size = tiles(s.L) * s.N * W;
  auto y = torch::empty_like(u);
  auto hT = torch::empty({s.B, s.D, s.N}, u.options());
  auto marks = keep_marks ? torch::empty({tasks, tiles(s.L), s.N, W}, u.options()) : torch::empty({0}, u.options());
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Stage st;
    st.reserve(s.N, s.L);
    for (int64_t task = begin; task < end; ++task) {
      SeqForward lay{seq_task(s, task, u, delta, A, Bm, Cm, Dskip, z, bias, h0), y.data_ptr<float>(),
                     hT.data_ptr<float>()};
      forward_any(lay, s.N, softplus, st, keep_marks ? marks.data_ptr<float>() + task * mark_size : nullptr);
    }
  });
  return {y, hT, marks};
}

// Returns du, ddelta, dA (B, D, N), dB, dC (B, G, N, L), dD (B, D), dz, dbias (B, D), dh0: per batch item
// where the parameter is shared, for the caller to sum.
std::vector<torch::Tensor> selective_backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A,
                                              torch::Tensor Bm, torch::Tensor Cm, torch::Tensor Dskip,
                                              torch::Tensor z, torch::Tensor bias, torch::Tensor h0, bool softplus,
                                              torch::Tensor dy, torch::Tensor dhT, torch::Tensor marks) {
  const SeqDims s = seq_dims(u, A, Bm);
  check_f32({&u, &delta, &A, &Bm, &Cm, &Dskip, &z, &bias, &h0, &dy, &dhT, &marks});
  const int64_t mark_size = tiles(s.L) * s.N * W;
  TORCH_CHECK(marks.numel() == 0 || marks.numel() == s.B * s.G * s.blocks_per_group * mark_size,
              "selective_scan: checkpoints do not match the inputs");
  const int64_t threads = at::get_num_threads();
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(u);
  auto dz = z.numel() ? torch::empty_like(u) : torch::Tensor();
  auto dA = torch::empty({s.B, s.D, s.N}, u.options());
  auto dB = torch::zeros({threads, s.B, s.G, s.N, s.L}, u.options());
  auto dC = torch::zeros({threads, s.B, s.G, s.N, s.L}, u.options());
  auto dD = torch::empty({s.B, s.D}, u.options());
  auto dbias = torch::empty({s.B, s.D}, u.options());
  auto dh0 = h0.numel() ? torch::empty_like(h0) : torch::Tensor();
  const int64_t part = s.B * s.G * s.N * s.L;
  at::parallel_for(0, s.B * s.G * s.blocks_per_group, 1, [&](int64_t begin, int64_t end) {
    Stage st;
    st.reserve(s.N, s.L);
    const int64_t slot = thread_slot(threads);
    for (int64_t task = begin; task < end; ++task) {
      SeqBackward lay{seq_task(s, task, u, delta, A, Bm, Cm, Dskip, z, bias, h0), dy.data_ptr<float>(), opt(dhT),
                      du.data_ptr<float>(), ddelta.data_ptr<float>(), dA.data_ptr<float>(),
                      dB.data_ptr<float>() + slot * part, dC.data_ptr<float>() + slot * part, dD.data_ptr<float>(),
                      z.numel() ? dz.data_ptr<float>() : nullptr, dbias.data_ptr<float>(),
                      h0.numel() ? dh0.data_ptr<float>() : nullptr, splat(0.0f)};
      backward_any(lay, s.N, softplus, st, marks.numel() ? marks.data_ptr<float>() + task * mark_size : nullptr);
    }
  });
  return {du, ddelta, dA, threads == 1 ? dB[0] : dB.sum(0), threads == 1 ? dC[0] : dC.sum(0), dD, dz, dbias, dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_workers", &vmamba_threads::parallel_workers, "threads that share an at::parallel_for");
  // The checkpoint arguments are optional so callers without them keep working (the map layout's old signature).
  m.def("forward", &multi_forward, "fused multi-direction selective scan, map layout (forward)", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("Bm"), py::arg("Cm"), py::arg("bias"), py::arg("h0"), py::arg("index"),
        py::arg("softplus"), py::arg("keep_marks") = false, py::arg("D") = torch::empty({0}),
        py::arg("dt_weight") = torch::empty({0}));
  m.def("backward", &multi_backward, "fused multi-direction selective scan, map layout (backward)", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("Bm"), py::arg("Cm"), py::arg("bias"), py::arg("h0"), py::arg("index"),
        py::arg("softplus"), py::arg("dy"), py::arg("dhT"), py::arg("marks") = torch::empty({0}),
        py::arg("D") = torch::empty({0}), py::arg("dt_weight") = torch::empty({0}));
  m.def("selective_forward", &selective_forward, "fused selective scan, (B, D, L) layout (forward)");
  m.def("selective_backward", &selective_backward, "fused selective scan, (B, D, L) layout (backward)");
  m.def("dwconv2d_silu_forward", &vmamba_dwconv2d::dwconv2d_silu_forward,
        "fused depthwise 2-D conv ('same' padding, odd kernel) + SiLU over a channels-last map");
  m.def("dwconv2d_silu_backward", &vmamba_dwconv2d::dwconv2d_silu_backward,
        "gradients of dwconv2d_silu_forward: dx, and per-task dtaps and dbias");
  m.def("bias_gelu_forward", &vmamba_bias_gelu::bias_gelu_forward,
        "gelu(pre + bias) (exact GELU) over the rows of a contiguous float32 matrix");
  m.def("bias_gelu_backward", &vmamba_bias_gelu::bias_gelu_backward,
        "gradients of bias_gelu_forward: dpre and dbias");
  m.attr("dwconv2d_max_taps") = vmamba_dwconv2d::MAX_TAPS;
  m.attr("lanes") = W;
  m.attr("max_rank") = MAX_R;
  m.attr("tile") = TILE;
}
