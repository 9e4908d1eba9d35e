// Weight-streaming matmuls for small batches on CPU: out[M, N] = x[M, K] @ W^T.
//
// At decode batch sizes a linear layer is bound by how fast its weights stream from memory, not
// by arithmetic. These kernels read every weight exactly once per call (each weight row, or each
// packed strip, serves all M rows of x while it is in L1) and split the output columns over
// ATen's own thread pool, so they never fight torch's OpenMP workers for the cores (a second
// BLAS with its own spinning threads does: measured 5x slower attention right after each call).
//
// Written with GCC vector extensions, so -march=native turns them into AVX-512 where the CPU has
// it and into AVX2 pairs where it does not. Summation order differs from a BLAS: results agree
// within float rounding, not bit for bit.
#include <torch/library.h>
#include "cpu_simd.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <cstdint>
#include <cmath>
#include <vector>
#include <algorithm>

namespace {

using namespace tokenmill;

constexpr int kMaxRows = 8;  // x rows accumulated per pass over the weights (registers)
constexpr int kPrefetchTiles = 4;  // how far ahead the dense kernel prefetches, in row tiles

// Dense weights (N, K) row-major, float32 or bfloat16; x is float32 (M, K). MM rows of x and R
// rows of W at a time (compile-time counts, so the MM * R accumulators live in registers): each x
// vector load serves R weight rows, and R independent streams keep the memory system busy.
template <int MM, typename W>
void dense_rows(const float* x, const W* w, float* out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = MM <= 4 ? 4 : 2;
  const int64_t K16 = K - K % 16;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    v16f acc[MM][R] = {};
    for (int64_t k = 0; k < K16; k += 16) {
      v16f wv[R];
      for (int r = 0; r < R; ++r) {
        const W* p = w + (n + r) * K + k;
        // Ask for the same line of the rows 4 tiles ahead: the tile interleaves R rows, which
        // the hardware prefetchers follow poorly (measured: 2 KB ahead along the row was slower
        // than no prefetch, 26 vs 28 GB/s; 4 tiles ahead 29-30 GB/s).
        __builtin_prefetch(p + kPrefetchTiles * R * K);
        wv[r] = load16(p);
      }
      for (int m = 0; m < MM; ++m) {
        v16f xv = load16(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] += wv[r] * xv;
      }
    }
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[m][r]);
        for (int64_t kk = K16; kk < K; ++kk) s += to_f(w[(n + r) * K + kk]) * x[m * K + kk];
        out[m * N + n + r] = s;
      }
  }
  for (; n < n1; ++n)  // the last rows of this thread's range
    for (int m = 0; m < MM; ++m) {
      float s = 0;
      for (int64_t k = 0; k < K; ++k) s += to_f(w[n * K + k]) * x[m * K + k];
      out[m * N + n] = s;
    }
}

template <typename W>
void dense_block(const float* x, const W* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const float* xm = x + m0 * K;
    float* om = out + m0 * N;
    switch (std::min<int64_t>(kMaxRows, M - m0)) {
      case 1: dense_rows<1>(xm, w, om, K, N, n0, n1); break;
      case 2: dense_rows<2>(xm, w, om, K, N, n0, n1); break;
      case 3: dense_rows<3>(xm, w, om, K, N, n0, n1); break;
      case 4: dense_rows<4>(xm, w, om, K, N, n0, n1); break;
      case 5: dense_rows<5>(xm, w, om, K, N, n0, n1); break;
      case 6: dense_rows<6>(xm, w, om, K, N, n0, n1); break;
      case 7: dense_rows<7>(xm, w, om, K, N, n0, n1); break;
      default: dense_rows<8>(xm, w, om, K, N, n0, n1); break;
    }
  }
}

at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "dense_gemv: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "dense_gemv: x must be float32");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "dense_gemv: w must be f32/bf16");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Grain: enough columns per task that each thread streams a long run of rows.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (wc.scalar_type() == at::kFloat)
      dense_block(xp, wc.data_ptr<float>(), op, M, K, N, n0, n1);
    else
      dense_block(xp, wc.data_ptr<c10::BFloat16>(), op, M, K, N, n0, n1);
  });
  return out;
}

// GPTQ-packed weights, rows sorted by group: qweight (K / per_word, N) int32, `bits` in {2, 4, 8};
// scales (G, N) and zeros (G, N), float32; groups of `group_size` rows. Per group:
// acc[n] = sum_k x[k] * (q[k, n] - zero[g, n]), then out[n] += scale[g, n] * acc[n]: a shift, a
// mask, a convert, a subtract and one FMA per weight. (Folding the zero out as scale * zero *
// sum(x) saves the subtract but cancels digits at 8 bits: errors 2x the reference's rounding.)
constexpr int kStrip = 4;  // int32 vectors of output columns per strip (64 columns)
constexpr int kQRows = 4;  // x rows per pass (kStrip * kQRows accumulators stay in registers)

// One strip of W 16-column vectors for MM rows of x; BITS, MM and W are compile-time so the
// unpacking unrolls and the MM * W accumulators live in registers.
template <int BITS, int MM, int W>
void gptq_strip(const float* x, const int32_t* qw, const float* scales, const float* zeros, float* out,
                int64_t K, int64_t N, int64_t G, int64_t group_size, int64_t n) {
  constexpr int per_word = 32 / BITS;
  constexpr int32_t mask = (1 << BITS) - 1;
  const int64_t rows_per_group = group_size / per_word;
  v16f total[MM][W] = {};
  for (int64_t g = 0; g < G; ++g) {
    v16f acc[MM][W] = {};
    v16f zero[W];
    for (int s = 0; s < W; ++s) zero[s] = load16(zeros + g * N + n + 16 * s);
    for (int64_t r = 0; r < rows_per_group; ++r) {
      const int64_t kp = g * rows_per_group + r;
      v16i q[W];
      for (int s = 0; s < W; ++s) std::memcpy(&q[s], qw + kp * N + n + 16 * s, 64);
      for (int j = 0; j < per_word; ++j) {
        const int64_t k = kp * per_word + j;
        v16f wf[W];
        for (int s = 0; s < W; ++s) wf[s] = __builtin_convertvector((q[s] >> (j * BITS)) & mask, v16f) - zero[s];
        for (int m = 0; m < MM; ++m) {
          const float xv = x[m * K + k];
          for (int s = 0; s < W; ++s) acc[m][s] += wf[s] * xv;
        }
      }
    }
    for (int s = 0; s < W; ++s) {
      v16f sc = load16(scales + g * N + n + 16 * s);
      for (int m = 0; m < MM; ++m) total[m][s] += acc[m][s] * sc;
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int s = 0; s < W; ++s) std::memcpy(out + m * N + n + 16 * s, &total[m][s], 64);
}

template <int BITS, int MM>
void gptq_columns(const float* x, const int32_t* qw, const float* scales, const float* zeros, float* out,
                  int64_t K, int64_t N, int64_t G, int64_t group_size, int64_t n, int64_t width) {
  if (width == kStrip) {
    gptq_strip<BITS, MM, kStrip>(x, qw, scales, zeros, out, K, N, G, group_size, n);
  } else {  // the last, narrower strip: one 16-column vector at a time
    for (int64_t s = 0; s < width; ++s)
      gptq_strip<BITS, MM, 1>(x, qw, scales, zeros, out, K, N, G, group_size, n + 16 * s);
  }
}

template <int BITS>
void gptq_rows(const float* x, const int32_t* qw, const float* scales, const float* zeros, float* out, int64_t M,
               int64_t K, int64_t N, int64_t G, int64_t group_size, int64_t n, int64_t width) {
  for (int64_t m0 = 0; m0 < M; m0 += kQRows) {
    const float* xm = x + m0 * K;
    float* om = out + m0 * N;
    switch (std::min<int64_t>(kQRows, M - m0)) {
      case 1: gptq_columns<BITS, 1>(xm, qw, scales, zeros, om, K, N, G, group_size, n, width); break;
      case 2: gptq_columns<BITS, 2>(xm, qw, scales, zeros, om, K, N, G, group_size, n, width); break;
      case 3: gptq_columns<BITS, 3>(xm, qw, scales, zeros, om, K, N, G, group_size, n, width); break;
      default: gptq_columns<BITS, 4>(xm, qw, scales, zeros, om, K, N, G, group_size, n, width); break;
    }
  }
}

at::Tensor gptq_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "gptq_gemv: bits must be 2, 4 or 8");
  TORCH_CHECK(x.scalar_type() == at::kFloat && qweight.scalar_type() == at::kInt, "gptq_gemv: dtypes");
  at::Tensor xc = x.contiguous(), qc = qweight.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = qc.size(1), G = sc.size(0);
  TORCH_CHECK(N % 16 == 0, "gptq_gemv: N must be a multiple of 16");
  TORCH_CHECK(qc.size(0) * (32 / bits) == K && G * group_size == K, "gptq_gemv: shapes do not match");
  at::Tensor out = at::empty({M, N}, xc.options());
  const int64_t strips = (N + 16 * kStrip - 1) / (16 * kStrip);
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n = s * 16 * kStrip;
      const int64_t width = std::min<int64_t>(kStrip, (N - n) / 16);
      const float* xp = xc.data_ptr<float>();
      const int32_t* qp = qc.data_ptr<int32_t>();
      const float *sp = sc.data_ptr<float>(), *zp = zc.data_ptr<float>();
      float* op = out.data_ptr<float>();
      if (bits == 4) gptq_rows<4>(xp, qp, sp, zp, op, M, K, N, G, group_size, n, width);
      else if (bits == 8) gptq_rows<8>(xp, qp, sp, zp, op, M, K, N, G, group_size, n, width);
      else gptq_rows<2>(xp, qp, sp, zp, op, M, K, N, G, group_size, n, width);
    }
  });
  return out;
}

// The small per-layer steps of a decoder, each one call instead of several ATen ops (at decode
// batch sizes each ATen call costs more than its arithmetic). float32, rows of a flat batch.

// RMSNorm as transformers computes it: x * rsqrt(mean(x^2) + eps) * weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 only");
  at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t H = xc.size(-1), T = xc.numel() / H;
  TORCH_CHECK(wc.numel() == H, "rms_norm: weight size");
  at::Tensor out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* r = xp + t * H;
      double ss = 0;
      for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(r[i]) * r[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + static_cast<float>(eps));
      for (int64_t i = 0; i < H; ++i) op[t * H + i] = wp[i] * (r[i] * inv);
    }
  });
  return out;
}

// silu(gate) * up for gate_up = [gate | up] along the last dimension.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat, "silu_mul: float32 only");
  at::Tensor gc = gate_up.contiguous();
  const int64_t W = gc.size(-1), I = W / 2, T = gc.numel() / W;
  std::vector<int64_t> shape(gc.sizes().begin(), gc.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, gc.options());
  const float* gp = gc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T * I, 16384, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) {
      const int64_t t = j / I, i = j % I;
      const float g = gp[t * W + i];
      op[j] = g / (1.0f + std::exp(-g)) * gp[t * W + I + i];
    }
  });
  return out;
}

// Rotary embedding, rotate-half layout, in place on the first `heads` heads of each row of x
// (T, row) with head size hd: x = x * cos[pos] + roll(x, hd / 2) * sin_signed[pos], where
// sin_signed carries rotate_half's sign (rotary.py). Queries and keys of a fused qkv in one call.
void rope_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin_signed,
           int64_t heads, int64_t hd) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.stride(-1) == 1 && x.dim() == 2, "rope_: float32 rows");
  TORCH_CHECK(cos.is_contiguous() && sin_signed.is_contiguous() && cos.size(1) == hd, "rope_: tables");
  at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t T = x.size(0), stride = x.stride(0), half = hd / 2;
  TORCH_CHECK(heads * hd <= x.size(1) && hd <= 1024 && hd % 2 == 0, "rope_: heads exceed the row");
  TORCH_CHECK(pos.numel() == x.size(0) && sin_signed.sizes() == cos.sizes(), "rope_: positions or tables");
  for (int64_t t = 0; t < pos.numel(); ++t) {
    const int64_t p = pos.data_ptr<int64_t>()[t];
    TORCH_CHECK(p >= 0 && p < cos.size(0), "rope_: position ", p, " beyond the rotary table");
  }
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin_signed.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  at::parallel_for(0, T * heads, 64, [&](int64_t a, int64_t b) {
    float tmp[1024];
    for (int64_t j = a; j < b; ++j) {
      const int64_t t = j / heads, h = j % heads;
      float* v = xp + t * stride + h * hd;
      const float* c = cp + pp[t] * hd;
      const float* sn = sp + pp[t] * hd;
      for (int64_t i = 0; i < hd; ++i) tmp[i] = v[i];
      for (int64_t i = 0; i < hd; ++i) {
        const float a1 = tmp[i] * c[i], a2 = tmp[(i + half) % hd] * sn[i];
        v[i] = a1 + a2;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(tokenmill_cpu, m) {
  m.def("dense_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin_signed, int heads, int hd) -> ()");
  m.def("gptq_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu, CPU, m) {
  m.impl("dense_gemv", dense_gemv);
  m.impl("gptq_gemv", gptq_gemv);
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rope_", rope_);
}
