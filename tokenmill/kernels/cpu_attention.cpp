// Attention straight from the paged KV pool, for a whole step in one call: decode tokens and
// prefill chunks alike (vLLM's "varlen" layout: sequence s owns query rows
// [query_start[s], query_start[s+1]) and has context_lens[s] tokens of KV once this step's are
// written, so its last query row sits at position context_lens[s] - 1).
//
// Keys and values are read in place through the block table: no gathered copy and no mask tensor.
// The pool is (num_blocks, block_size, KVH, hd) float32, q is (T, H, hd), and query head h reads KV
// head h / (H / KVH). Query row at position p attends keys [p - window + 1, p] with a sliding
// window, else [0, p]; ALiBi adds slope[h] * key_position to each score.
//
// One work item is (sequence, KV head, tile of up to kQueryTile query rows): every query head of
// the KV head's group and every row of the tile reads a key block while it is in L1, so GQA and
// long prefills read the pool once per tile rather than once per query. Softmax is computed online
// (flash attention's running max and sum), one pool block at a time.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "cpu_simd.h"

namespace {

using namespace tokenmill;

constexpr int64_t kQueryTile = 16;
// Query vectors (rows x heads of a KV group) from which a tile takes the transposed-key path.
constexpr int64_t kWideTile = 8;

// e^x for 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' expf polynomial (about 1
// ulp), times 2^n built in the exponent bits. Lanes below -87.3 (and -inf: masked keys) give 0.
inline v16f exp16(v16f x) {
  const v16f lo = v16f{} - 87.33654f;
  const v16i dead = x < lo;
  x = dead ? lo : x;
  const v16f fx = x * 1.44269504088896341f + 0.5f;
  v16i n = __builtin_convertvector(fx, v16i);  // truncates toward zero: fix up to a floor
  n += __builtin_convertvector(n, v16f) > fx;   // a true comparison is -1
  const v16f fn = __builtin_convertvector(n, v16f);
  const v16f r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  v16f y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const v16i bits = (n + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return dead ? v16f{} : y * scale;
}

inline float dot(const float* a, const float* b, int64_t hd) {
  const int64_t hd16 = hd - hd % 16;
  v16f acc = {};
  int64_t e = 0;
  for (; e < hd16; e += 16) acc += load16(a + e) * load16(b + e);
  float s = hsum(acc);
  for (; e < hd; ++e) s += a[e] * b[e];
  return s;
}

inline void axpy(float* o, const float* v, float p, int64_t hd) {  // o += p * v
  const int64_t hd16 = hd - hd % 16;
  int64_t e = 0;
  for (; e < hd16; e += 16) { v16f ov = load16(o + e) + load16(v + e) * p; std::memcpy(o + e, &ov, 64); }
  for (; e < hd; ++e) o[e] += p * v[e];
}

// o += sum_j p[j] * v_j over n value rows, o held in registers (N16 vectors of 16 lanes).
template <int N16>
void pv_regs(float* o, const float* const* vrows, const float* p, int64_t n) {
  v16f a[N16];
  for (int c = 0; c < N16; ++c) a[c] = load16(o + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    for (int c = 0; c < N16; ++c) a[c] += p[j] * load16(vrows[j] + 16 * c);
  }
  for (int c = 0; c < N16; ++c) std::memcpy(o + 16 * c, &a[c], 64);
}

void pv(float* o, const float* const* vrows, const float* p, int64_t n, int64_t hd) {
  switch (hd) {
    case 16: return pv_regs<1>(o, vrows, p, n);
    case 32: return pv_regs<2>(o, vrows, p, n);
    case 64: return pv_regs<4>(o, vrows, p, n);
    case 80: return pv_regs<5>(o, vrows, p, n);
    case 96: return pv_regs<6>(o, vrows, p, n);
    case 128: return pv_regs<8>(o, vrows, p, n);
    default:
      for (int64_t j = 0; j < n; ++j)
        if (p[j] != 0.f) axpy(o, vrows[j], p[j], hd);
  }
}

inline float hmax(v16f v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

// Online-softmax state of one query vector: running max, running sum, unnormalised output.
struct Running { float max = -INFINITY, sum = 0.f; };

// Folds a chunk's scores (-inf where masked) into a query's running softmax and output.
inline void fold(Running& st, float* o, v16f sc, const float* const* vrows, int64_t nkeys, int64_t hd) {
  const float bmax = hmax(sc);
  if (bmax == -INFINITY) return;
  const float new_max = std::max(st.max, bmax);
  if (new_max > st.max && st.max != -INFINITY) {  // rescale what came before
    const float corr = std::exp(st.max - new_max);
    st.sum *= corr;
    for (int64_t e = 0; e < hd; ++e) o[e] *= corr;
  }
  st.max = new_max;
  v16f p = exp16(sc - new_max);
  st.sum += hsum(p);
  float pj[16];
  std::memcpy(pj, &p, sizeof pj);
  pv(o, vrows, pj, nkeys, hd);
}

// One work item: keys go 16 at a time. A tile with many query vectors (a prefill chunk) has the
// chunk's keys transposed into kt (hd x 16), so each query's 16 scores are hd broadcast FMAs with
// no horizontal sums, the transpose paid once for every query vector of the tile; a narrow tile
// (a decode) takes one dot product per key instead.
void tile(const float* qp, const float* kp, const float* vp, const int64_t* table, float* op,
          int64_t row0, int64_t rows, int64_t first_pos, int64_t kstart, int64_t kend, int64_t kvh,
          int64_t group, int64_t H, int64_t hd, int64_t bs, int64_t tok_stride, float scale,
          int64_t window, const float* slopes, std::vector<float>& acc, std::vector<Running>& state,
          std::vector<float>& kt) {
  const int64_t nq = rows * group;
  const bool wide = nq >= kWideTile;
  std::fill(acc.begin(), acc.begin() + nq * hd, 0.f);
  std::fill(state.begin(), state.begin() + nq, Running{});
  const float* vrows[16];
  const float* krows[16];
  v16f lane;
  for (int j = 0; j < 16; ++j) lane[j] = static_cast<float>(j);
  for (int64_t t0 = kstart; t0 < kend; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, kend - t0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = t0 + j, off = (table[t / bs] * bs + t % bs) * tok_stride + kvh * hd;
      krows[j] = kp + off;
      vrows[j] = vp + off;
      if (wide)
        for (int64_t d = 0; d < hd; ++d) kt[d * 16 + j] = krows[j][d];
    }
    if (wide)
      for (int64_t j = n; j < 16; ++j)
        for (int64_t d = 0; d < hd; ++d) kt[d * 16 + j] = 0.f;
    const v16f tpos = lane + static_cast<float>(t0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first_pos + r;
      if (t0 > pos || (window > 0 && t0 + n <= pos - window + 1)) continue;  // no key of the chunk counts
      const v16f fpos = v16f{} + static_cast<float>(pos);
      v16i masked = tpos > fpos;
      if (window > 0) masked |= tpos < fpos - static_cast<float>(window - 1);
      if (n < 16) masked |= tpos >= static_cast<float>(t0 + n);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g, qi = r * group + g;
        const float* qv = qp + ((row0 + r) * H + h) * hd;
        v16f sc = {};
        if (wide) {
          v16f s0 = {}, s1 = {};
          int64_t d = 0;
          for (; d + 1 < hd; d += 2) {
            s0 += qv[d] * load16(kt.data() + d * 16);
            s1 += qv[d + 1] * load16(kt.data() + (d + 1) * 16);
          }
          if (d < hd) s0 += qv[d] * load16(kt.data() + d * 16);
          sc = s0 + s1;
        } else {
          for (int64_t j = 0; j < n; ++j) sc[j] = dot(qv, krows[j], hd);
        }
        sc *= scale;
        if (slopes) sc += slopes[h] * tpos;
        sc = masked ? v16f{} - INFINITY : sc;
        fold(state[qi], acc.data() + qi * hd, sc, vrows, n, hd);
      }
    }
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    const float inv = 1.0f / state[qi].sum;
    float* dst = op + ((row0 + qi / group) * H + kvh * group + qi % group) * hd;
    for (int64_t e = 0; e < hd; ++e) dst[e] = acc[qi * hd + e] * inv;
  }
}

struct Item { int64_t seq, row0, row1, kvh; };

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_start,
                           const at::Tensor& context_lens, double scale, int64_t sliding_window,
                           const at::Tensor& alibi_slopes) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "paged attention: float32 only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "paged attention: ranks");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged attention: pool must be contiguous");
  at::Tensor qc = q.contiguous(), bt = block_tables.to(at::kLong).contiguous();
  at::Tensor qs = query_start.to(at::kLong).contiguous(), cl = context_lens.to(at::kLong).contiguous();
  const int64_t T = qc.size(0), H = qc.size(1), hd = qc.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), S = cl.numel(), width = bt.size(1);
  TORCH_CHECK(k_cache.size(3) == hd && H % KVH == 0, "paged attention: head shapes do not match the pool");
  TORCH_CHECK(qs.numel() == S + 1 && bt.size(0) == S, "paged attention: one block-table row and query range per sequence");
  const bool alibi = alibi_slopes.numel() > 0;
  at::Tensor slopes = alibi ? alibi_slopes.to(at::kFloat).contiguous() : alibi_slopes;
  TORCH_CHECK(!alibi || slopes.numel() == H, "paged attention: one ALiBi slope per head");
  const int64_t* qsp = qs.data_ptr<int64_t>();
  const int64_t* clp = cl.data_ptr<int64_t>();
  const int64_t* btp = bt.data_ptr<int64_t>();
  const int64_t num_blocks = k_cache.size(0);
  std::vector<Item> items;
  TORCH_CHECK(qsp[0] == 0 && qsp[S] == T, "paged attention: query ranges must cover the batch");
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = qsp[s + 1] - qsp[s];
    TORCH_CHECK(n >= 1 && clp[s] >= n && (clp[s] + bs - 1) / bs <= width,
                "paged attention: sequence ", s, " has ", n, " queries and ", clp[s], " tokens of context");
    for (int64_t b = 0; b < (clp[s] + bs - 1) / bs; ++b)
      TORCH_CHECK(btp[s * width + b] >= 0 && btp[s * width + b] < num_blocks, "paged attention: block id out of range");
    for (int64_t r = qsp[s]; r < qsp[s + 1]; r += kQueryTile)
      for (int64_t h = 0; h < KVH; ++h) items.push_back({s, r, std::min(r + kQueryTile, qsp[s + 1]), h});
  }
  at::Tensor out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const float* sl = alibi ? slopes.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t group = H / KVH, tok_stride = KVH * hd;
  const int64_t nitems = static_cast<int64_t>(items.size());
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nitems));
  // Items are dealt round-robin: a causal prefill's later tiles cost more than its first ones, so
  // contiguous ranges per thread would leave one thread with most of the work.
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    const int64_t nq = kQueryTile * group;
    std::vector<float> acc(nq * hd), kt(16 * hd);
    std::vector<Running> state(nq);
    for (int64_t tid = t0; tid < t1; ++tid) {
      for (int64_t it = tid; it < nitems; it += nthreads) {
        const Item& w = items[it];
        const int64_t qlen = qsp[w.seq + 1] - qsp[w.seq], L = clp[w.seq];
        const int64_t first_pos = L - qlen + (w.row0 - qsp[w.seq]), rows = w.row1 - w.row0;
        const int64_t kend = first_pos + rows;  // one past the tile's last query position
        const int64_t kstart = sliding_window > 0 ? std::max<int64_t>(0, first_pos - sliding_window + 1) : 0;
        tile(qp, kp, vp, btp + w.seq * width, op, w.row0, rows, first_pos, kstart, kend, w.kvh, group, H, hd,
             bs, tok_stride, static_cast<float>(scale), sliding_window, sl, acc, state, kt);
      }
    }
  });
  return out;
}

// The step's new K/V rows into their pool slots, one call per layer.
void write_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots) {
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "write_kv_: float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k.stride(-1) == 1 && v.stride(-1) == 1,
              "write_kv_: layouts");
  at::Tensor sl = slots.to(at::kLong).contiguous();
  const int64_t T = k.size(0), row = k_cache.size(2) * k_cache.size(3);
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(k.numel() == T * row && v.numel() == T * row && sl.numel() == T, "write_kv_: shapes");
  const int64_t* sp = sl.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "write_kv_: slot out of range");
    std::memcpy(kc + sp[t] * row, k.data_ptr<float>() + t * k.stride(0), row * sizeof(float));
    std::memcpy(vc + sp[t] * row, v.data_ptr<float>() + t * v.stride(0), row * sizeof(float));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_start, "
        "Tensor context_lens, float scale, int sliding_window, Tensor alibi_slopes) -> Tensor");
  m.def("write_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu, CPU, m) {
  m.impl("paged_attention", paged_attention);
  m.impl("write_kv_", write_kv_);
}
