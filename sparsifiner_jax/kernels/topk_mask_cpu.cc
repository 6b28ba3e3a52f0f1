// Top-k row masks for XLA:CPU, as an XLA FFI custom call.
//
// out[i, j] = true iff x[i, j] is one of the k largest entries of row i, ties broken towards the lower
// column index -- exactly the set jax.lax.top_k(x, k) returns, as a boolean mask.
//
// Why: XLA:CPU lowers TopK to a single-threaded std::partial_sort per row and then the indices must be
// scattered back into a dense mask; for Sparsifiner's [B, H, N-1, N] scores that costs ~15x a dense
// attention layer. Here each row finds its k-th largest value by building it bit by bit on an
// order-preserving uint32 image of the floats (a radix select: every step is one vectorised count over
// the row, and it stops as soon as exactly k entries are at or above the candidate), then writes the
// mask in one pass. Rows are split over XLA's intra-op thread pool.
//
// Shapes: x float32 [..., n] (any leading dims, treated as rows), out bool [..., n]; attribute k in [1, n].
//
// LowRankTopkMask fuses Sparsifiner's whole mask selection (models/predictor.py, sparse mode) so that
// neither the coefficient logits nor the [B, H, R, N] approximation is written out. Per query row
// (b, h, r): logits = (q[b, first_row + r, h] . w[b, h, :d] + w[b, h, d]) * scale over the m basis rows,
// coef = softmax(logits) cut to its coef_k largest entries (chosen on the logits, ties: lowest index; not
// renormalised), approx = coef @ basis, then the top-k mask of approx as above. q float32 [B, Nq, H, d]
// (rows before first_row are not predicted: the CLS row); w float32 [B, H, d + 1, m], the query weights
// and, as the last row, the offset ([W_q; b_q] K̂); basis float32 [Bb, m, N] with Bb in {1, B}
// (per-example bases under token dropping); out bool [B, H, R, N] with R = Nq - first_row.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Monotone map float -> uint32: a > b (as floats, -inf lowest, NaN above +inf) iff key(a) > key(b).
inline uint32_t OrderKey(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// How many of key[0..n) are >= c. AVX-512: 16 compares per instruction, counted by mask popcounts.
inline int64_t CountAtLeast(const uint32_t* key, int64_t n, uint32_t c) {
#if defined(__AVX512F__)
  const __m512i cv = _mm512_set1_epi32(static_cast<int32_t>(c));
  int64_t count = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + j), cv));
  }
  if (j < n) {
    const __mmask16 tail = sparsifiner_kernels::FirstLanes(n - j);
    count += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(tail, _mm512_maskz_loadu_epi32(tail, key + j), cv));
  }
  return count;
#else
  uint32_t count = 0;  // 32-bit counts (rows are < 2^31 long): twice the SIMD lanes of int64
  for (int64_t j = 0; j < n; ++j) count += key[j] >= c;
  return count;
#endif
}

void SelectRow(const float* x, int64_t n, int64_t k, uint32_t* key, bool* out) {
  uint32_t hi = 0, lo = ~0u;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = OrderKey(x[j]);
    key[j] = u;
    hi = std::max(hi, u);
    lo = std::min(lo, u);
  }
  // t := the k-th largest key, built from the highest bit where the row's keys differ downwards.
  uint32_t t = hi;
  if (hi != lo) {
    const int top = 31 - __builtin_clz(hi ^ lo);
    t = top == 31 ? 0u : (hi & ~((2u << top) - 1u));
    for (int b = top; b >= 0; --b) {
      const uint32_t candidate = t | (1u << b);
      const int64_t count = CountAtLeast(key, n, candidate);
      if (count >= k) {
        t = candidate;
        if (count == k) break;  // exactly k at or above: any threshold in between selects the same set
      }
    }
  }
  const int64_t at_least = CountAtLeast(key, n, t);
  if (at_least == k) {
    for (int64_t j = 0; j < n; ++j) out[j] = key[j] >= t;
    return;
  }
  // Ties at the threshold: keep the lowest-index ones, as many as the budget has left.
  int64_t ties = k - (t == ~0u ? 0 : CountAtLeast(key, n, t + 1));
  for (int64_t j = 0; j < n; ++j) {
    const bool equal = key[j] == t;
    out[j] = key[j] > t || (equal && ties > 0);
    ties -= equal;
  }
}

#if defined(__AVX512F__)
// out[i] = true iff fewer than k entries beat key[i] (are larger), for rows of at most 16 * Blocks keys
// held in registers (a template, so the blocks unroll instead of spilling). Returns false, writing
// nothing, when ties straddle the budget (more than k entries have fewer than k larger ones).
template <int Blocks>
bool RankSelect(const uint32_t* key, int64_t n, int64_t k, bool* out) {
  __m512i keys[Blocks], rank[Blocks];
  for (int c = 0; c < Blocks; ++c) {
    keys[c] = _mm512_maskz_loadu_epi32(sparsifiner_kernels::FirstLanes(n - 16 * c), key + 16 * c);
    rank[c] = _mm512_setzero_si512();
  }
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t j = 0; j < n; ++j) {
    const __m512i kj = _mm512_set1_epi32(static_cast<int32_t>(key[j]));
    for (int c = 0; c < Blocks; ++c) {
      rank[c] = _mm512_mask_add_epi32(rank[c], _mm512_cmpgt_epu32_mask(kj, keys[c]), rank[c], one);
    }
  }
  const __m512i kv = _mm512_set1_epi32(static_cast<int32_t>(k));
  __mmask16 masks[Blocks];
  int64_t kept = 0;
  for (int c = 0; c < Blocks; ++c) {
    masks[c] = _mm512_mask_cmplt_epi32_mask(sparsifiner_kernels::FirstLanes(n - 16 * c), rank[c], kv);
    kept += __builtin_popcount(masks[c]);
  }
  if (kept != k) return false;
  for (int c = 0; c < Blocks; ++c) {
    for (int64_t u = 0; u < 16 && 16 * c + u < n; ++u) out[16 * c + u] = (masks[c] >> u) & 1;
  }
  return true;
}
#endif

// The same selection for short rows (the predictor's m coefficients), by rank instead of a radix select:
// out[i] = true iff fewer than k entries beat x[i] (are larger, or equal at a lower index). O(n^2) but
// without the select's serial count steps, so faster for rows of a few dozen; longer rows (m = 130 at
// 448 px) take SelectRow.
void SelectShortRow(const float* x, int64_t n, int64_t k, uint32_t* key, bool* out) {
#if defined(__AVX512F__)
  constexpr int64_t kLongest = 64;
#else
  constexpr int64_t kLongest = 0;
#endif
  if (n > kLongest) return SelectRow(x, n, k, key, out);
  for (int64_t j = 0; j < n; ++j) key[j] = OrderKey(x[j]);
#if defined(__AVX512F__)
  // Strict ranks (how many entries are larger) decide the set unless ties straddle the budget; then the
  // exact loop below breaks the ties.
  const int64_t blocks = (n + 15) / 16;
  if (blocks == 1 ? RankSelect<1>(key, n, k, out) : blocks == 2 ? RankSelect<2>(key, n, k, out)
      : blocks == 3 ? RankSelect<3>(key, n, k, out) : RankSelect<4>(key, n, k, out)) {
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    int64_t rank = 0;
    for (int64_t j = 0; j < n; ++j) rank += key[j] > key[i] || (key[j] == key[i] && j < i);
    out[i] = rank < k;
  }
}

struct TopkRows {
  const float* x;
  bool* out;
  int64_t n, k;

  std::vector<uint32_t> Scratch() const { return std::vector<uint32_t>(n); }
  void Row(int64_t i, std::vector<uint32_t>& key) const { SelectRow(x + i * n, n, k, key.data(), out + i * n); }
};

ffi::Error TopkMaskImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::PRED> out,
                        int64_t k) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("topk_mask: x must have rank >= 1");
  const int64_t n = dims.back();
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("topk_mask: k must be in [1, n]");
  if (n >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("topk_mask: rows must be < 2^31 long");
  auto work = std::make_shared<const TopkRows>(TopkRows{x.typed_data(), out->typed_data(), n, k});
  sparsifiner_kernels::ParallelRows(pool, work, n == 0 ? 0 : static_cast<int64_t>(x.element_count()) / n, 64);
  return ffi::Error::Success();
}

struct LowRankRows {
  const float *q, *w, *basis;
  bool* out;
  int64_t heads, rows, q_tokens, first_row, d, m, n, basis_per_example, coef_k, k;
  float scale;

  struct Buffers {
    std::vector<float> logits, coef, approx;
    std::vector<uint32_t> key;
    std::vector<int32_t> used;
    std::unique_ptr<bool[]> coef_keep;
  };
  Buffers Scratch() const {
    return Buffers{std::vector<float>(m + 16), std::vector<float>(m + 16), std::vector<float>(n),
                   std::vector<uint32_t>(std::max(m, n)), std::vector<int32_t>(m),
                   std::make_unique<bool[]>(m)};
  }

  // logits[t] = (sum_c x[c] w[c, t] + w[d, t]) * scale for one query row x [d] against w [d + 1, m].
  void Logits(const float* x, const float* w, float* logits) const {
    const float* b = w + d * m;
#if defined(__AVX512F__)
    constexpr int64_t kChains = 4;   // independent partial sums over c hide the FMA latency
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < m; t += 16) {
      const __mmask16 lanes = sparsifiner_kernels::FirstLanes(m - t);
      __m512 acc[kChains];
      for (int64_t u = 0; u < kChains; ++u) acc[u] = _mm512_setzero_ps();
      const float* wc = w + t;
      int64_t c = 0;
      for (; c + kChains <= d; c += kChains, wc += kChains * m) {
        for (int64_t u = 0; u < kChains; ++u) {
          acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(x[c + u]), _mm512_maskz_loadu_ps(lanes, wc + u * m), acc[u]);
        }
      }
      for (; c < d; ++c, wc += m) acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(x[c]), _mm512_maskz_loadu_ps(lanes, wc), acc[0]);
      const __m512 dot = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
      _mm512_mask_storeu_ps(logits + t, lanes, _mm512_mul_ps(_mm512_add_ps(dot, _mm512_maskz_loadu_ps(lanes, b + t)), scale_v));
    }
#else
    for (int64_t t = 0; t < m; ++t) logits[t] = 0.0f;
    for (int64_t c = 0; c < d; ++c) {
      for (int64_t t = 0; t < m; ++t) logits[t] += x[c] * w[c * m + t];
    }
    for (int64_t t = 0; t < m; ++t) logits[t] = (logits[t] + b[t]) * scale;
#endif
  }

  void Row(int64_t i, Buffers& s) const {
    const int64_t bh = i / rows, r = i % rows, example = bh / heads, h = bh % heads;
    float* logits = s.logits.data();
    Logits(q + ((example * q_tokens + first_row + r) * heads + h) * d, w + bh * (d + 1) * m, logits);
    const bool cut = coef_k < m;   // chosen on the logits: the softmax's order, without its rounding
    if (cut) SelectShortRow(logits, m, coef_k, s.key.data(), s.coef_keep.get());
    float* coef = s.coef.data();
    std::copy(logits, logits + m, coef);
    const float total = sparsifiner_kernels::ExpMinusMaxInPlace(coef, m);
    for (int64_t t = 0; t < m; ++t) coef[t] /= total;          // softmax, divided as XLA does
    const float* base = basis + (basis_per_example ? example * m * n : 0);
    int64_t used = 0;                                            // kept coefficients, in order
    for (int64_t t = 0; t < m; ++t) {
      s.used[used] = static_cast<int32_t>(t);
      used += !cut || s.coef_keep[t];
    }
    float* approx = s.approx.data();
#if defined(__AVX512F__)
    constexpr int64_t kGroup = 8;   // 8 independent accumulators (128 columns) hide the FMA latency
    for (int64_t j0 = 0; j0 < n; j0 += 16 * kGroup) {
      __m512 acc[kGroup];
      for (int64_t g = 0; g < kGroup; ++g) acc[g] = _mm512_setzero_ps();
      for (int64_t u = 0; u < used; ++u) {
        const __m512 w = _mm512_set1_ps(coef[s.used[u]]);
        const float* row = base + s.used[u] * n + j0;
        for (int64_t g = 0; g < kGroup; ++g) {
          const int64_t j = j0 + 16 * g;
          if (j < n) {
            acc[g] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(sparsifiner_kernels::FirstLanes(n - j), row + 16 * g), acc[g]);
          }
        }
      }
      for (int64_t g = 0; g < kGroup && j0 + 16 * g < n; ++g) {
        _mm512_mask_storeu_ps(approx + j0 + 16 * g, sparsifiner_kernels::FirstLanes(n - j0 - 16 * g), acc[g]);
      }
    }
#else
    std::fill(approx, approx + n, 0.0f);
    for (int64_t u = 0; u < used; ++u) {
      const float w = coef[s.used[u]];
      const float* row = base + s.used[u] * n;
      for (int64_t j = 0; j < n; ++j) approx[j] += w * row[j];
    }
#endif
    SelectRow(approx, n, k, s.key.data(), out + i * n);
  }
};

ffi::Error LowRankTopkMaskImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> w,
                               ffi::Buffer<ffi::F32> basis,
                               ffi::ResultBuffer<ffi::PRED> out, int64_t first_row, float scale,
                               int64_t coef_k, int64_t k) {
  constexpr char kShapes[] =
      "lowrank_topk_mask: q [B, Nq, H, d], w [B, H, d + 1, m], basis [B|1, m, N], "
      "out [B, H, Nq - first_row, N]";
  const auto qd = q.dimensions(), wd = w.dimensions(), bd = basis.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || wd.size() != 4 || bd.size() != 3 || od.size() != 4) {
    return ffi::Error::InvalidArgument(kShapes);
  }
  const int64_t batch = qd[0], heads = qd[2], d = qd[3], m = wd[3], n = bd[2], rows = qd[1] - first_row;
  const bool shapes_agree = wd[0] == batch && wd[1] == heads && wd[2] == d + 1 && bd[1] == m &&
                            (bd[0] == 1 || bd[0] == batch) &&
                            od[0] == batch && od[1] == heads && od[2] == rows && od[3] == n;
  if (!shapes_agree || first_row < 0 || rows < 0) return ffi::Error::InvalidArgument(kShapes);
  if (k < 1 || k > n || coef_k < 1) {
    return ffi::Error::InvalidArgument("lowrank_topk_mask: k must be in [1, N] and coef_k >= 1");
  }
  if (n >= (int64_t{1} << 31) || m >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("lowrank_topk_mask: N and m must be < 2^31");
  }
  auto work = std::make_shared<const LowRankRows>(LowRankRows{
      q.typed_data(), w.typed_data(), basis.typed_data(), out->typed_data(), heads,
      rows, qd[1], first_row, d, m, n, bd[0] != 1, coef_k, k, scale});
  sparsifiner_kernels::ParallelRows(pool, work, batch * heads * rows, 64);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TopkMask, TopkMaskImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Attr<int64_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowRankTopkMask, LowRankTopkMaskImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Attr<int64_t>("first_row")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("coef_k")
                                  .Attr<int64_t>("k"));
