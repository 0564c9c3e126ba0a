// Fused CPU forward of the decayed linear recurrence shared by GLA, retention, SSD and RWKV-7.
//
// Per (batch item, head) a K x V float32 state S runs through the sequence:
//
//   u_t = a_t^T S_{t-1}                                   (only with the delta term, RWKV-7)
//   S_t = diag(alpha_t) S_{t-1} + b_t u_t^T + k_t (c_t v_t)^T   (b_t u_t^T only with the delta term)
//   o_t = scale * q_t^T S_t                               (every op reads the state after the update)
//
// Inputs are 4-D (B, T, Hx, D) float32 tensors read through their strides, so the callers pass time-major
// views without copies. Broadcasting is by convention, not by copies:
//   * any stride may be 0 (an expanded tensor: retention's per-head decay is (H,) expanded to (B, T, H, 1));
//   * the channel size of log_alpha is K (per key channel: GLA, RWKV-7) or 1 (scalar per head: SSD,
//     retention);
//   * Hx divides H and head h reads head h / (H / Hx) (SSD's grouped B and C serve H / G heads each).
// alpha_t = exp(log_alpha_t) is taken here, per step (vectorised), rather than in a separate pass over the
// whole tensor. c_t is an optional scalar per token and head (SSD's step size dt; 1 when v_scale is empty),
// so SSD passes x itself as v.
//
//     q, k, a, b (B, T, Hx, K)   log_alpha (B, T, Hx, K or 1)   v (B, T, Hx, V)   v_scale (B, T, Hx, 1) or empty
//     h0 (B, H, K, V) or empty   ->   o (B, T, H, V), state (B, H, K, V)
//
// Work is split over (batch, head): each task owns its state for the whole sequence; a thread's heads of one
// batch item step through time together (contiguous reads of the time-major inputs). States live in
// thread-local buffers with rows padded to whole SIMD vectors; every V column block is independent (u_t, the
// update and the read of a column block only touch that block), so a step runs column block by column block
// with the output accumulators in registers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"
#include "threads.h"

namespace {

using namespace vmamba_simd;

// A strided 4-D (B, T, Hx, D) view; `group` = H / Hx heads share one of its heads.
struct View {
  const float* data = nullptr;
  int64_t sb = 0, st = 0, sh = 0, sc = 0;
  int64_t group = 1;
  bool scalar_channel = false;  // channel size 1: the same value for every channel

  View() = default;
  View(const torch::Tensor& x, int64_t heads, const char* name) {
    TORCH_CHECK(x.dim() == 4, name, " must be 4-D (B, T, H, D), got ", x.dim(), " dims");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, name, " must be float32");
    TORCH_CHECK(x.size(2) > 0 && heads % x.size(2) == 0, name, ": its head count must divide H=", heads);
    data = x.data_ptr<float>();
    sb = x.stride(0);
    st = x.stride(1);
    sh = x.stride(2);
    scalar_channel = x.size(3) == 1;
    sc = scalar_channel ? 0 : x.stride(3);
    group = heads / x.size(2);
  }
  const float* at(int64_t b, int64_t t, int64_t h) const { return data + b * sb + t * st + (h / group) * sh; }
};

// Steps ahead to prefetch: a task reads one short row per input and step, strided by H rows in the
// time-major inputs. Calls whose inputs are no longer cache resident ran 2-3x slower than back-to-back calls
// (T=3136, H=4, K=V=32); the prefetch is meant to hide that latency (its gain could not be separated from
// the noise of the shared machine: provisional).
constexpr int64_t PREFETCH_STEPS = 12;

// Prefetches the cache lines of `count` channels at p (channel stride `stride`, 0 for a broadcast value).
inline void prefetch_row(const float* p, int64_t stride, int64_t count) {
  if (stride == 0 || p == nullptr) {
    if (p) __builtin_prefetch(p);
    return;
  }
  const int64_t span = (count - 1) * stride + 1;
  for (int64_t i = 0; i < span; i += 16) __builtin_prefetch(p + i);
  __builtin_prefetch(p + span - 1);
}

// One head's read positions in the inputs at the current step.
struct Cursor {
  const float *q, *k, *v, *al, *a, *b, *c;
};

// Gathers `count` strided channels into a contiguous row (the step's per-key scalars).
inline void gather(const float* p, int64_t stride, int64_t count, float* out) {
  if (stride == 1) {
    std::memcpy(out, p, count * sizeof(float));
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = p[i * stride];
  }
}

// One time step on NB column blocks of the state (NB * W columns): each row's per-key scalars are broadcast
// once for all NB blocks, and the read-out keeps two accumulators per block (rows alternate) so the add chain
// is half as long. Vector-times-scalar operands broadcast straight from memory.
struct Step {
  const float *alpha, *k, *q, *a, *b;
  int64_t dk, vp;
  float scale, vscale;

  template <int NB, bool DELTA>
  void run(float* col, const float* v, float* o) const {
    vf vj[NB], u[NB], acc0[NB], acc1[NB];
    for (int n = 0; n < NB; ++n) {
      vj[n] = loadv(v + n * W) * vscale;
      u[n] = acc0[n] = acc1[n] = vf{};
    }
    if (DELTA) {  // u = a^T S_{t-1}, before the update overwrites S
      vf u1[NB];
      for (int n = 0; n < NB; ++n) u1[n] = vf{};
      int64_t i = 0;
      for (; i + 1 < dk; i += 2) {
        for (int n = 0; n < NB; ++n) {
          u[n] += loadv(col + i * vp + n * W) * a[i];
          u1[n] += loadv(col + (i + 1) * vp + n * W) * a[i + 1];
        }
      }
      for (; i < dk; ++i)
        for (int n = 0; n < NB; ++n) u[n] += loadv(col + i * vp + n * W) * a[i];
      for (int n = 0; n < NB; ++n) u[n] += u1[n];
    }
    auto row = [&](int64_t i, vf* acc) {
      float* p = col + i * vp;
      for (int n = 0; n < NB; ++n) {
        vf s = loadv(p + n * W) * alpha[i] + vj[n] * k[i];
        if (DELTA) s += u[n] * b[i];
        storev(p + n * W, s);
        acc[n] += s * q[i];
      }
    };
    int64_t i = 0;
    for (; i + 1 < dk; i += 2) {
      row(i, acc0);
      row(i + 1, acc1);
    }
    if (i < dk) row(i, acc0);
    for (int n = 0; n < NB; ++n) storev(o + n * W, (acc0[n] + acc1[n]) * scale);
  }
};

std::vector<torch::Tensor> recurrence_forward(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& alpha,
    const torch::Tensor& v_scale, const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& h0,
    int64_t heads, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "the fused recurrence runs on CPU tensors only");
  TORCH_CHECK(v.dim() == 4 && k.dim() == 4 && q.dim() == 4, "q, k, v must be 4-D (B, T, H, D)");
  const int64_t batch = q.size(0), length = q.size(1), dk = q.size(3), dv = v.size(3);
  TORCH_CHECK(k.size(0) == batch && k.size(1) == length && k.size(3) == dk, "k must be (B, T, Hk, K) like q");
  TORCH_CHECK(v.size(0) == batch && v.size(1) == length, "v must be (B, T, Hv, V)");
  TORCH_CHECK(alpha.size(0) == batch && alpha.size(1) == length && (alpha.size(3) == dk || alpha.size(3) == 1),
              "log_alpha must be (B, T, Ha, K or 1)");
  const bool has_vscale = v_scale.numel() > 0;
  View Cs;
  if (has_vscale) {
    TORCH_CHECK(v_scale.dim() == 4 && v_scale.size(0) == batch && v_scale.size(1) == length && v_scale.size(3) == 1,
                "v_scale must be (B, T, Hc, 1)");
    Cs = View(v_scale, heads, "v_scale");
  }
  const bool delta = a.numel() > 0;
  const View Q(q, heads, "q"), Kt(k, heads, "k"), Vt(v, heads, "v"), Al(alpha, heads, "log_alpha");
  View Av, Bv;
  if (delta) {
    TORCH_CHECK(a.sizes() == q.sizes() && b.sizes() == q.sizes(), "a and b must match q");
    Av = View(a, heads, "a");
    Bv = View(b, heads, "b");
  }
  const bool has_h0 = h0.numel() > 0;
  torch::Tensor init;
  if (has_h0) {
    TORCH_CHECK(h0.dim() == 4 && h0.size(0) == batch && h0.size(1) == heads && h0.size(2) == dk &&
                    h0.size(3) == dv,
                "h0 must be (B, H, K, V)");
    init = h0.to(torch::kFloat32).contiguous();
  }
  auto out = torch::empty({batch, length, heads, dv}, q.options());
  auto state = torch::empty({batch, heads, dk, dv}, q.options());
  float* o_ptr = out.data_ptr<float>();
  float* s_ptr = state.data_ptr<float>();
  const float* h0_ptr = has_h0 ? init.data_ptr<float>() : nullptr;
  const int64_t blocks = (dv + W - 1) / W, vp = blocks * W;
  const float fscale = static_cast<float>(scale);
  const bool padded = vp != dv;

  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    // states (K x vp each): padded lanes stay zero since their v and h0 lanes are zero; per-step rows of scalars
    std::vector<float> vrow(vp, 0.f), orow(vp), qrow(dk), krow(dk), arow(dk), alrow(dk), brow(dk),
        logrow(dk);
    auto row_of = [dk](const float* p, int64_t stride, std::vector<float>& buf) -> const float* {
      if (stride == 1) return p;
      gather(p, stride, dk, buf.data());
      return buf.data();
    };
    // A thread's heads of one batch item advance through time together, so each step reads one contiguous
    // span of the time-major inputs (heads h_first..h_last) instead of one short strided row per head.
    std::vector<float> states;
    std::vector<Cursor> cursors;
    for (int64_t task = begin; task < end;) {
      const int64_t bi = task / heads, h_first = task % heads;
      const int64_t count = std::min(heads - h_first, end - task);
      states.assign(count * dk * vp, 0.f);
      cursors.clear();
      for (int64_t c = 0; c < count; ++c) {
        const int64_t h = h_first + c;
        if (h0_ptr) {
          for (int64_t i = 0; i < dk; ++i)
            std::memcpy(&states[(c * dk + i) * vp], h0_ptr + ((task + c) * dk + i) * dv, dv * sizeof(float));
        }
        // base pointers, advanced by the time strides (no index arithmetic per step)
        cursors.push_back({Q.at(bi, 0, h), Kt.at(bi, 0, h), Vt.at(bi, 0, h), Al.at(bi, 0, h),
                           delta ? Av.at(bi, 0, h) : nullptr, delta ? Bv.at(bi, 0, h) : nullptr,
                           has_vscale ? Cs.at(bi, 0, h) : nullptr});
      }
      for (int64_t t = 0; t < length; ++t) {
        for (int64_t c = 0; c < count; ++c) {
          Cursor& cur = cursors[c];
          const int64_t h = h_first + c;
          float* S = states.data() + c * dk * vp;
          if (t + PREFETCH_STEPS < length) {
            prefetch_row(cur.q + PREFETCH_STEPS * Q.st, Q.sc, dk);
            prefetch_row(cur.k + PREFETCH_STEPS * Kt.st, Kt.sc, dk);
            prefetch_row(cur.v + PREFETCH_STEPS * Vt.st, Vt.sc, dv);
            prefetch_row(cur.al + PREFETCH_STEPS * Al.st, Al.sc, Al.scalar_channel ? 1 : dk);
            if (delta) {
              prefetch_row(cur.a + PREFETCH_STEPS * Av.st, Av.sc, dk);
              prefetch_row(cur.b + PREFETCH_STEPS * Bv.st, Bv.sc, dk);
            }
            if (has_vscale) __builtin_prefetch(cur.c + PREFETCH_STEPS * Cs.st);
          }
          // rows whose channels are contiguous are read in place, strided ones are gathered
          const float* qr = row_of(cur.q, Q.sc, qrow);
          const float* kr = row_of(cur.k, Kt.sc, krow);
          // whole vectors of v and o are used in place; a padded tail goes through the zero-padded rows
          const float* vr = vrow.data();
          if (padded || Vt.sc != 1) {
            gather(cur.v, Vt.sc, dv, vrow.data());
          } else {
            vr = cur.v;
          }
          float* o_t = o_ptr + ((bi * length + t) * heads + h) * dv;
          float* orow_t = padded ? orow.data() : o_t;
          if (Al.scalar_channel) {
            std::fill(alrow.begin(), alrow.end(), std::exp(*cur.al));
          } else {
            const float* lr = row_of(cur.al, Al.sc, logrow);
            int64_t i = 0;
            for (; i + W <= dk; i += W) storev(&alrow[i], vexp(loadv(lr + i)));
            for (; i < dk; ++i) alrow[i] = std::exp(lr[i]);
          }
          const float vscale = has_vscale ? *cur.c : 1.f;
          const float* ar = delta ? row_of(cur.a, Av.sc, arow) : nullptr;
          const float* br = delta ? row_of(cur.b, Bv.sc, brow) : nullptr;
          const Step step{alrow.data(), kr, qr, ar, br, dk, vp, fscale, vscale};
          int64_t j = 0;
          for (; j + 2 * W <= vp; j += 2 * W) delta ? step.run<2, true>(S + j, vr + j, orow_t + j)
                                                    : step.run<2, false>(S + j, vr + j, orow_t + j);
          if (j < vp) delta ? step.run<1, true>(S + j, vr + j, orow_t + j)
                            : step.run<1, false>(S + j, vr + j, orow_t + j);
          if (padded) std::memcpy(o_t, orow.data(), dv * sizeof(float));
          cur.q += Q.st;
          cur.k += Kt.st;
          cur.v += Vt.st;
          cur.al += Al.st;
          if (delta) {
            cur.a += Av.st;
            cur.b += Bv.st;
          }
          if (has_vscale) cur.c += Cs.st;
        }
      }
      for (int64_t c = 0; c < count; ++c) {
        for (int64_t i = 0; i < dk; ++i)
          std::memcpy(s_ptr + ((task + c) * dk + i) * dv, &states[(c * dk + i) * vp], dv * sizeof(float));
      }
      task += count;
    }
  });
  return {out, state};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_workers", &vmamba_threads::parallel_workers, "threads that share an at::parallel_for");
  m.def("forward", &recurrence_forward, "fused decayed linear recurrence (GLA / retention / SSD / RWKV-7), forward");
}
