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
// neither the predictor's intermediates, the coefficient logits nor the [B, H, R, N] approximation is
// written out, and XLA runs none of its small ops. First, per (batch b, head h), the query weights
//   w[b, h] = [W_q; b_q] K_hat  [d + 1, m],  K_hat = W_k^T (k[b, :, h]^T P) + b_k (1^T P)  [c, m]
// (P = proj_n: the keys' token down-projection), and per example the basis
//   basis[b] = T(W_up[b])^T  [m, N]:  entries with |x| > basis_threshold kept (|x|, or x if signed_basis),
// the rest 0. Then per query row (b, h, r):
// logits = (q[b, first_row + r, h] . w[b, h, :d] + w[b, h, d]) * scale over the m basis rows,
// coef = softmax(logits) cut to its coef_k largest entries (chosen on the logits, ties: lowest index; not
// renormalised), approx = coef @ basis, then the top-k mask of approx as above.
// Shapes: qkv float32 [B, N, S, H, d], S >= 2: the attention's fused projection, q = qkv[:, :, 0], keys =
// qkv[:, :, 1] (read in place: no copies of the slices); rows before first_row are not predicted (the CLS
// row). proj_n and proj_back_n (W_up) float32 [Bp, N, m] with Bp in {1, B} (per-example under token
// dropping); w_k float32 [d, c], b_k [c], w_q [d, c], b_q [c]; out bool [B, H, R, N] with R = N - first_row.
// round_bf16: the bfloat16 models' products (attention.mixed_einsum) take bf16-rounded inputs, so k^T P,
// K_hat and w[:, :, :d] are rounded to bf16 (nearest even) before the product that uses them; the caller
// passes the other operands rounded.

#include <algorithm>
#include <cmath>
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

#if defined(__AVX512BW__) && defined(__BMI2__)
// SelectRow for rows of at most 16 * Blocks entries (Blocks = ceil(n / 16)), with the keys held in
// registers: each counting step is Blocks compares and masked adds, no loads, and the mask is written 16
// bytes at a time.
template <int Blocks>
void SelectRowInRegisters(const float* x, int64_t n, int64_t k, bool* out) {
  const __mmask16 tail = sparsifiner_kernels::FirstLanes(n - 16 * (Blocks - 1));
  auto lanes = [tail](int c) { return c == Blocks - 1 ? tail : static_cast<__mmask16>(0xFFFF); };
  __m512i key[Blocks];
  __m512i hi_v = _mm512_setzero_si512(), lo_v = _mm512_set1_epi32(-1);
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  for (int c = 0; c < Blocks; ++c) {
    const __m512i u = _mm512_maskz_loadu_epi32(lanes(c), x + 16 * c);
    key[c] = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));   // OrderKey
    hi_v = _mm512_mask_max_epu32(hi_v, lanes(c), hi_v, key[c]);
    lo_v = _mm512_mask_min_epu32(lo_v, lanes(c), lo_v, key[c]);
  }
  const __m512i minus_one = _mm512_set1_epi32(-1);
  auto count_at_least = [&](uint32_t t) {
    const __m512i tv = _mm512_set1_epi32(static_cast<int32_t>(t));
    __m512i count = _mm512_setzero_si512();
    for (int c = 0; c < Blocks; ++c) {
      count = _mm512_mask_sub_epi32(count, _mm512_mask_cmpge_epu32_mask(lanes(c), key[c], tv), count, minus_one);
    }
    return static_cast<int64_t>(_mm512_reduce_add_epi32(count));
  };
  const uint32_t hi = _mm512_reduce_max_epu32(hi_v), lo = _mm512_reduce_min_epu32(lo_v);
  uint32_t t = hi;   // the k-th largest key, as in SelectRow
  if (hi != lo) {
    const int top = 31 - __builtin_clz(hi ^ lo);
    t = top == 31 ? 0u : (hi & ~((2u << top) - 1u));
    for (int b = top; b >= 0; --b) {
      const uint32_t candidate = t | (1u << b);
      const int64_t count = count_at_least(candidate);
      if (count >= k) {
        t = candidate;
        if (count == k) break;
      }
    }
  }
  const __m512i tv = _mm512_set1_epi32(static_cast<int32_t>(t));
  // Ties at the threshold: the lowest-index ones, as many as the budget has left.
  int64_t ties = k - (t == ~0u ? 0 : count_at_least(t + 1));
  for (int c = 0; c < Blocks; ++c) {
    __mmask16 keep = _mm512_mask_cmpgt_epu32_mask(lanes(c), key[c], tv);
    const uint32_t equal = _mm512_mask_cmpeq_epu32_mask(lanes(c), key[c], tv);
    const int64_t take = std::min<int64_t>(ties, __builtin_popcount(equal));
    keep |= static_cast<__mmask16>(_pdep_u32((1u << take) - 1u, equal));   // the lowest `take` ties
    ties -= take;
    _mm_mask_storeu_epi8(out + 16 * c, lanes(c), _mm_maskz_set1_epi8(keep, 1));
  }
}

// Dispatches rows of at most 16 * Blocks entries to SelectRowInRegisters<ceil(n / 16)>.
template <int Blocks>
void SelectShortRowInRegisters(const float* x, int64_t n, int64_t k, bool* out) {
  if constexpr (Blocks > 1) {
    if (n <= 16 * (Blocks - 1)) return SelectShortRowInRegisters<Blocks - 1>(x, n, k, out);
  }
  SelectRowInRegisters<Blocks>(x, n, k, out);
}
constexpr int64_t kRegisterRowMax = 16 * 16;
#endif

void SelectRow(const float* x, int64_t n, int64_t k, uint32_t* key, bool* out) {
#if defined(__AVX512BW__) && defined(__BMI2__)
  if (n >= 1 && n <= kRegisterRowMax) return SelectShortRowInRegisters<kRegisterRowMax / 16>(x, n, k, out);
#endif
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

#if defined(__AVX512F__)
// Rows [r0, r0 + R) of SmallMatTB, 32 columns [m0, m0 + 32) at a time: 2R accumulators in registers (R is
// a template argument so none spills), b's row loaded once per R rows.
template <int R>
void SmallMatTBTile(const float* a, int64_t t_stride, int64_t r_stride, const float* b, int64_t n, int64_t m,
                    float* out) {
  for (int64_t m0 = 0; m0 < m; m0 += 32) {
    const __mmask16 lo = sparsifiner_kernels::FirstLanes(m - m0);
    const __mmask16 hi = m - m0 > 16 ? sparsifiner_kernels::FirstLanes(m - m0 - 16) : 0;
    __m512 acc_lo[R], acc_hi[R];
    for (int i = 0; i < R; ++i) acc_lo[i] = acc_hi[i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const float* bt = b + t * m + m0;
      const __m512 b_lo = _mm512_maskz_loadu_ps(lo, bt), b_hi = _mm512_maskz_loadu_ps(hi, bt + 16);
      const float* at = a + t * t_stride;
      for (int i = 0; i < R; ++i) {
        const __m512 x = _mm512_set1_ps(at[i * r_stride]);
        acc_lo[i] = _mm512_fmadd_ps(x, b_lo, acc_lo[i]);
        acc_hi[i] = _mm512_fmadd_ps(x, b_hi, acc_hi[i]);
      }
    }
    for (int i = 0; i < R; ++i) {
      _mm512_mask_storeu_ps(out + i * m + m0, lo, acc_lo[i]);
      _mm512_mask_storeu_ps(out + i * m + m0 + 16, hi, acc_hi[i]);
    }
  }
}

// SmallMatTBTile<rows> for 1 <= rows <= R.
template <int R>
void SmallMatTBTail(int64_t rows, const float* a, int64_t t_stride, int64_t r_stride, const float* b, int64_t n,
                    int64_t m, float* out) {
  if constexpr (R > 1) {
    if (rows < R) return SmallMatTBTail<R - 1>(rows, a, t_stride, r_stride, b, n, m, out);
  }
  SmallMatTBTile<R>(a, t_stride, r_stride, b, n, m, out);
}
#endif

// out[r, :] = sum_{t < n} a[t * t_stride + r * r_stride] * b[t, :] for r < rows: a small A^T B with A read
// through strides (out [rows, m] and b [n, m] row-major; out is overwritten).
void SmallMatTB(const float* a, int64_t t_stride, int64_t r_stride, const float* b, int64_t n, int64_t rows,
                int64_t m, float* out) {
#if defined(__AVX512F__)
  constexpr int kRows = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    SmallMatTBTail<kRows>(std::min<int64_t>(kRows, rows - r0), a + r0 * r_stride, t_stride, r_stride, b, n, m,
                          out + r0 * m);
  }
#else
  std::fill(out, out + rows * m, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      const float x = a[t * t_stride + r * r_stride];
      for (int64_t j = 0; j < m; ++j) out[r * m + j] += x * b[t * m + j];
    }
  }
#endif
}

// x rounded to the nearest bfloat16 (ties to even), as float32; finite inputs.
inline float RoundToBf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &u, sizeof(u));
  return x;
}

inline void RoundToBf16(float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = RoundToBf16(x[i]);
}

// The basis of one example per Row(i): T(W_up[i])^T [m, N] (or the shared one, for i = 0).
struct ThresholdedBasis {
  const float* proj_back_n;
  float* basis;
  int64_t n, m;
  bool signed_basis;
  float basis_threshold;

  struct Buffers {};
  Buffers Scratch() const { return {}; }

  void Row(int64_t i, Buffers&) const {
    const float* up = proj_back_n + i * n * m;
    float* out = basis + i * m * n;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < m; ++j) {
        const float x = up[t * m + j], magnitude = std::fabs(x);
        out[j * n + t] = magnitude > basis_threshold ? (signed_basis ? x : magnitude) : 0.0f;
      }
    }
  }
};

// The pre-pass of one (batch, head) per Row(i), writing w[b, h] = [W_q; b_q] K_hat ([d + 1, m]); with a
// `basis`, each example's first head also writes that example's basis (or example 0 the shared one).
struct QueryWeights {
  const float *keys, *proj_n, *w_k, *b_k, *w_q, *b_q;
  float* w;
  int64_t heads, n, d, c, m, token_stride;
  bool proj_per_example, round_bf16;
  const ThresholdedBasis* basis;
  int64_t basis_examples;

  struct Buffers {
    std::vector<float> k_proj, k_hat, p_sum;
  };
  Buffers Scratch() const { return Buffers{std::vector<float>(d * m), std::vector<float>(c * m), std::vector<float>(m)}; }

  void Row(int64_t i, Buffers& s) const {
    const int64_t example = i / heads, h = i % heads;
    if (basis != nullptr && h == 0 && example < basis_examples) {
      ThresholdedBasis::Buffers none;
      basis->Row(example, none);
    }
    const float* p = proj_n + (proj_per_example ? example * n * m : 0);
    // k^T P [d, m]: keys of this head, read in place with the qkv token stride.
    SmallMatTB(keys + example * n * token_stride + h * d, token_stride, 1, p, n, d, m, s.k_proj.data());
    if (round_bf16) RoundToBf16(s.k_proj.data(), d * m);
    SmallMatTB(w_k, c, 1, s.k_proj.data(), d, c, m, s.k_hat.data());      // W_k^T (k^T P) [c, m]
    std::fill(s.p_sum.begin(), s.p_sum.end(), 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < m; ++j) s.p_sum[j] += p[t * m + j];
    }
    for (int64_t r = 0; r < c; ++r) {
      for (int64_t j = 0; j < m; ++j) s.k_hat[r * m + j] += b_k[r] * s.p_sum[j];
    }
    if (round_bf16) RoundToBf16(s.k_hat.data(), c * m);
    float* out = w + i * (d + 1) * m;
    SmallMatTB(w_q, 1, c, s.k_hat.data(), c, d, m, out);                   // W_q K_hat [d, m]
    SmallMatTB(b_q, 1, 0, s.k_hat.data(), c, 1, m, out + d * m);          // b_q K_hat [1, m]
    if (round_bf16) RoundToBf16(out, d * m);                                // not the offset row
  }
};

#if defined(__AVX512F__)
// approx[j0, j0 + 16 G) = sum_u weight[u] rows[u][j0, ...) for `used` rows; the last of the G vectors is
// masked by `last`. G independent accumulators hide the FMA latency.
template <int G>
void WeightedRows(const float* const* rows, const float* weight, int64_t used, int64_t j0, __mmask16 last,
                  float* approx) {
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t u = 0; u < used; ++u) {
    const __m512 w = _mm512_set1_ps(weight[u]);
    const float* row = rows[u] + j0;
    for (int g = 0; g < G; ++g) {
      const __mmask16 lanes = g == G - 1 ? last : static_cast<__mmask16>(0xFFFF);
      acc[g] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, row + 16 * g), acc[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm512_mask_storeu_ps(approx + j0 + 16 * g, g == G - 1 ? last : static_cast<__mmask16>(0xFFFF), acc[g]);
  }
}

// WeightedRows<vectors> for 1 <= vectors <= G.
template <int G>
void WeightedRowsTail(int64_t vectors, const float* const* rows, const float* weight, int64_t used,
                      int64_t j0, __mmask16 last, float* approx) {
  if constexpr (G > 1) {
    if (vectors < G) return WeightedRowsTail<G - 1>(vectors, rows, weight, used, j0, last, approx);
  }
  WeightedRows<G>(rows, weight, used, j0, last, approx);
}
#endif

// The row pass: one query row per Row(i), from the pre-pass's w.
struct LowRankRows {
  const float *q, *w, *basis;
  bool* out;
  int64_t heads, rows, token_stride, first_row, d, m, n, basis_per_example, coef_k, k;
  float scale;

  struct Buffers {
    std::vector<float> logits, coef, approx;
    std::vector<uint32_t> key;
    std::vector<float> weight;              // the kept coefficients and their basis rows
    std::vector<const float*> rows;
    std::unique_ptr<bool[]> coef_keep;
  };
  Buffers Scratch() const {
    return Buffers{std::vector<float>(m + 16), std::vector<float>(m + 16), std::vector<float>(n),
                   std::vector<uint32_t>(std::max(m, n)), std::vector<float>(m),
                   std::vector<const float*>(m), std::make_unique<bool[]>(m)};
  }

  // logits[t] = (sum_c x[c] w[c, t] + w[d, t]) * scale for one query row x [d] against w [d + 1, m].
  void Logits(const float* x, const float* w, float* logits) const {
    const float* b = w + d * m;
#if defined(__AVX512F__)
    // 32 columns per pass over c, four independent chains per 16 columns (hiding the FMA latency).
    constexpr int64_t kChains = 4;
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < m; t += 32) {
      const __mmask16 lo = sparsifiner_kernels::FirstLanes(m - t);
      const __mmask16 hi = m - t > 16 ? sparsifiner_kernels::FirstLanes(m - t - 16) : 0;
      __m512 acc_lo[kChains], acc_hi[kChains];
      for (int64_t u = 0; u < kChains; ++u) acc_lo[u] = acc_hi[u] = _mm512_setzero_ps();
      const float* wc = w + t;
      int64_t c = 0;
      for (; c + kChains <= d; c += kChains, wc += kChains * m) {
        for (int64_t u = 0; u < kChains; ++u) {
          const __m512 xu = _mm512_set1_ps(x[c + u]);
          acc_lo[u] = _mm512_fmadd_ps(xu, _mm512_maskz_loadu_ps(lo, wc + u * m), acc_lo[u]);
          acc_hi[u] = _mm512_fmadd_ps(xu, _mm512_maskz_loadu_ps(hi, wc + u * m + 16), acc_hi[u]);
        }
      }
      for (; c < d; ++c, wc += m) {
        const __m512 xc = _mm512_set1_ps(x[c]);
        acc_lo[0] = _mm512_fmadd_ps(xc, _mm512_maskz_loadu_ps(lo, wc), acc_lo[0]);
        acc_hi[0] = _mm512_fmadd_ps(xc, _mm512_maskz_loadu_ps(hi, wc + 16), acc_hi[0]);
      }
      const __m512 dot_lo = _mm512_add_ps(_mm512_add_ps(acc_lo[0], acc_lo[1]), _mm512_add_ps(acc_lo[2], acc_lo[3]));
      const __m512 dot_hi = _mm512_add_ps(_mm512_add_ps(acc_hi[0], acc_hi[1]), _mm512_add_ps(acc_hi[2], acc_hi[3]));
      _mm512_mask_storeu_ps(logits + t, lo, _mm512_mul_ps(_mm512_add_ps(dot_lo, _mm512_maskz_loadu_ps(lo, b + t)), scale_v));
      _mm512_mask_storeu_ps(logits + t + 16, hi,
                            _mm512_mul_ps(_mm512_add_ps(dot_hi, _mm512_maskz_loadu_ps(hi, b + t + 16)), scale_v));
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
    const float* x = q + (example * n + first_row + r) * token_stride + h * d;
#if defined(__AVX512F__)
    // The next row's query is a token stride (several KiB, often another page) away: fetch it now.
    for (int64_t c = 0; r + 1 < rows && c < d; c += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(x + token_stride + c), _MM_HINT_T0);
    }
#endif
    Logits(x, w + bh * (d + 1) * m, logits);
    const bool cut = coef_k < m;   // chosen on the logits: the softmax's order, without its rounding
    if (cut) SelectShortRow(logits, m, coef_k, s.key.data(), s.coef_keep.get());
    float* coef = s.coef.data();
    std::copy(logits, logits + m, coef);
    const float total = sparsifiner_kernels::ExpMinusMaxInPlace(coef, m);
#if defined(__AVX512F__)
    for (int64_t t = 0; t < m; t += 16) {                        // softmax, divided as XLA does
      const __mmask16 lanes = sparsifiner_kernels::FirstLanes(m - t);
      _mm512_mask_storeu_ps(coef + t, lanes, _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, coef + t), _mm512_set1_ps(total)));
    }
#else
    for (int64_t t = 0; t < m; ++t) coef[t] /= total;            // softmax, divided as XLA does
#endif
    const float* base = basis + (basis_per_example ? example * m * n : 0);
    int64_t used = 0;                                            // kept coefficients, in order
    for (int64_t t = 0; t < m; ++t) {
      s.weight[used] = coef[t];
      s.rows[used] = base + t * n;
      used += !cut || s.coef_keep[t];
    }
    float* approx = s.approx.data();
#if defined(__AVX512F__)
    int64_t j0 = 0;
    for (; j0 + 128 <= n; j0 += 128) WeightedRows<8>(s.rows.data(), s.weight.data(), used, j0, 0xFFFF, approx);
    if (j0 < n) {
      const int64_t vectors = (n - j0 + 15) / 16;
      WeightedRowsTail<8>(vectors, s.rows.data(), s.weight.data(), used, j0,
                          sparsifiner_kernels::FirstLanes(n - j0 - 16 * (vectors - 1)), approx);
    }
#else
    std::fill(approx, approx + n, 0.0f);
    for (int64_t u = 0; u < used; ++u) {
      for (int64_t j = 0; j < n; ++j) approx[j] += s.weight[u] * s.rows[u][j];
    }
#endif
    SelectRow(approx, n, k, s.key.data(), out + i * n);
  }
};

// One (batch, head) per Row(i): its query weights, then its query rows (w is used while it is in cache, and
// one parallel pass has one hand-off instead of two: -11 % at batch 8 on DeiT-S shapes).
struct HeadTasks {
  QueryWeights weights;
  LowRankRows query_rows;

  struct Buffers {
    QueryWeights::Buffers weights;
    LowRankRows::Buffers query_rows;
  };
  Buffers Scratch() const { return Buffers{weights.Scratch(), query_rows.Scratch()}; }

  void Row(int64_t i, Buffers& s) const {
    weights.Row(i, s.weights);
    const int64_t rows = query_rows.rows;
    for (int64_t r = 0; r < rows; ++r) query_rows.Row(i * rows + r, s.query_rows);
  }
};

ffi::Error LowRankTopkMaskImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> proj_n,
                               ffi::Buffer<ffi::F32> w_k, ffi::Buffer<ffi::F32> b_k, ffi::Buffer<ffi::F32> w_q,
                               ffi::Buffer<ffi::F32> b_q, ffi::Buffer<ffi::F32> proj_back_n,
                               ffi::ResultBuffer<ffi::PRED> out, int64_t first_row, float scale, int64_t coef_k,
                               int64_t k, bool round_bf16, float basis_threshold, bool signed_basis) {
  constexpr char kShapes[] =
      "lowrank_topk_mask: qkv [B, N, S >= 2, H, d], proj_n [B|1, N, m], w_k [d, c], b_k [c], w_q [d, c], "
      "b_q [c], proj_back_n [B|1, N, m], out [B, H, N - first_row, N]";
  const auto xd = qkv.dimensions(), pd = proj_n.dimensions(), wkd = w_k.dimensions(), bkd = b_k.dimensions(),
             wqd = w_q.dimensions(), bqd = b_q.dimensions(), ud = proj_back_n.dimensions(),
             od = out->dimensions();
  if (xd.size() != 5 || pd.size() != 3 || wkd.size() != 2 || bkd.size() != 1 || wqd.size() != 2 ||
      bqd.size() != 1 || ud.size() != 3 || od.size() != 4) {
    return ffi::Error::InvalidArgument(kShapes);
  }
  const int64_t batch = xd[0], n = xd[1], slots = xd[2], heads = xd[3], d = xd[4], m = pd[2], c = wkd[1];
  const int64_t rows = n - first_row;
  const bool shapes_agree = slots >= 2 && (pd[0] == 1 || pd[0] == batch) && pd[1] == n && wkd[0] == d &&
                            bkd[0] == c && wqd[0] == d && wqd[1] == c && bqd[0] == c &&
                            (ud[0] == 1 || ud[0] == batch) && ud[1] == n && ud[2] == m &&
                            od[0] == batch && od[1] == heads && od[2] == rows && od[3] == n;
  if (!shapes_agree || first_row < 0 || rows < 0) return ffi::Error::InvalidArgument(kShapes);
  if (k < 1 || k > n || coef_k < 1) {
    return ffi::Error::InvalidArgument("lowrank_topk_mask: k must be in [1, N] and coef_k >= 1");
  }
  if (n >= (int64_t{1} << 31) || m >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("lowrank_topk_mask: N and m must be < 2^31");
  }
  const int64_t token_stride = slots * heads * d;
  // ParallelRows returns once every row is done (as for XLA's own buffers), so w and basis may live on
  // this frame.
  std::vector<float> w(batch * heads * (d + 1) * m), basis(ud[0] * m * n);
  const ThresholdedBasis thresholded{proj_back_n.typed_data(), basis.data(), n, m, signed_basis, basis_threshold};
  QueryWeights weights{qkv.typed_data() + heads * d, proj_n.typed_data(), w_k.typed_data(), b_k.typed_data(),
                       w_q.typed_data(), b_q.typed_data(), w.data(), heads, n, d, c, m, token_stride,
                       pd[0] != 1, round_bf16, &thresholded, ud[0]};
  const LowRankRows query_rows{qkv.typed_data(), w.data(), basis.data(), out->typed_data(), heads, rows,
                               token_stride, first_row, d, m, n, ud[0] != 1, coef_k, k, scale};
  if (batch * heads >= 8 * std::max<int64_t>(1, pool.num_threads())) {
    // Enough (batch, head) tasks to balance the threads: the bases first (every head's rows read its
    // example's), then one pass.
    sparsifiner_kernels::ParallelRows(pool, std::make_shared<const ThresholdedBasis>(thresholded), ud[0], 1);
    weights.basis = nullptr;
    sparsifiner_kernels::ParallelRows(pool, std::make_shared<const HeadTasks>(HeadTasks{weights, query_rows}),
                                      batch * heads, 1);
  } else {
    // Few heads (batch 1): the pre-pass (with the bases), then the rows split finely (measured in the
    // model: 0.37 vs 0.40 ms a DeiT-S layer at batch 1).
    sparsifiner_kernels::ParallelRows(pool, std::make_shared<const QueryWeights>(weights), batch * heads, 1);
    sparsifiner_kernels::ParallelRows(pool, std::make_shared<const LowRankRows>(query_rows),
                                      batch * heads * rows, 64);
  }
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
                                  .Arg<ffi::Buffer<ffi::F32>>()    // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()    // proj_n
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w_k
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b_k
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w_q
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b_q
                                  .Arg<ffi::Buffer<ffi::F32>>()    // proj_back_n
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Attr<int64_t>("first_row")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("coef_k")
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("round_bf16")
                                  .Attr<float>("basis_threshold")
                                  .Attr<bool>("signed_basis"));
