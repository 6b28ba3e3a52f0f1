// Row-sparse softmax attention for XLA:CPU, as an XLA FFI custom call.
//
// For every (batch b, head h, query row i), with K_i the key columns the row keeps:
//   out[b, i, h, :] = sum_{j in K_i} softmax_j(scale * q[b, i, h, :] . k[b, j, h, :]) v[b, j, h, :]
// The first num_dense_rows rows keep every key (Sparsifiner's CLS query); row i >= num_dense_rows keeps
// the columns where keep[b, h, i - num_dense_rows, :] is true. A row that keeps nothing gives 0.
//
// Why: XLA computes masked attention densely (all N^2 logits, exps and products, then the mask), so a
// mask can only add time. Here only the kept entries are touched: each row compresses its boolean mask
// into a list of columns, takes the dot products with those keys (K and V of one head stay in L2),
// a softmax over them and the weighted sum of their values. At Sparsifiner's keep 0.25 that is about a
// quarter of the exps and products of dense attention, with no [N, N] intermediates.
//
// Shapes: q, k, v float32 [B, N, H, d] (the fused qkv projection's layout; no transposes needed);
// keep bool [Bm, Hm, N - num_dense_rows, N] with Bm in {1, B}, Hm in {1, H} (broadcast);
// out float32 [B, N, H, d]. Attributes: num_dense_rows in [0, N], scale (the logit scale).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float *q, *k, *v;
  const bool* keep;
  float* out;
  int64_t b, n, h, d, dense_rows, mask_b, mask_h;
  float scale;

  int64_t TokenStride() const { return h * d; }
  const float* Row(const float* t, int64_t bi, int64_t tok, int64_t hi) const {
    return t + ((bi * n + tok) * h + hi) * d;
  }
};

// Columns kept by one row, in increasing order; returns how many.
int64_t KeptColumns(const bool* keep_row, int64_t n, int32_t* cols) {
  int64_t count = 0;
  int64_t j = 0;
#if defined(__AVX512BW__)
  const __m512i step = _mm512_set1_epi32(16);
  __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= n; j += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep_row + j));
    const __mmask16 m = _mm_test_epi8_mask(bytes, bytes);
    _mm512_mask_compressstoreu_epi32(cols + count, m, iota);
    count += __builtin_popcount(m);
    iota = _mm512_add_epi32(iota, step);
  }
#endif
  for (; j < n; ++j) {
    cols[count] = static_cast<int32_t>(j);
    count += keep_row[j];
  }
  return count;
}

#if defined(__AVX512F__)
// exp(x) for x <= 0 (logits minus their row max), about 1 ulp: Cody-Waite reduction by ln 2, a degree-6
// polynomial (Cephes expf), and scalef for the power of two. Inputs below -87.3 give ~1e-38, not 0.
inline __m512 ExpNonPositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// One query row with head dim d = 16 * C: logits, softmax and the weighted sum over `count` columns.
template <int C>
void AttendRow512(const Problem& p, int64_t bi, int64_t hi, const float* q_row, const int32_t* cols,
                  int64_t count, float* logits, float* out_row) {
  const int64_t stride = p.TokenStride();
  const float* k_base = p.Row(p.k, bi, 0, hi);
  const float* v_base = p.Row(p.v, bi, 0, hi);
  __m512 q[C];
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int c = 0; c < C; ++c) q[c] = _mm512_mul_ps(_mm512_loadu_ps(q_row + 16 * c), scale);
  __m512 row_max = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t < count; t += 16) {   // logits of 16 columns at a time, one lane each
    const int64_t m = std::min<int64_t>(16, count - t);
    alignas(64) float s[16];
    for (int64_t u = 0; u < m; ++u) {
      const float* kr = k_base + cols[t + u] * stride;
      __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(kr));
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(kr + 16 * c), acc);
      s[u] = _mm512_reduce_add_ps(acc);
    }
    const __mmask16 lanes = static_cast<__mmask16>((1u << m) - 1u);
    const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes, s);
    _mm512_storeu_ps(logits + t, sv);
    row_max = _mm512_max_ps(row_max, sv);
  }
  const float mx = _mm512_reduce_max_ps(row_max);
  __m512 total = _mm512_setzero_ps();
  const __m512 mxv = _mm512_set1_ps(mx);
  for (t = 0; t < count; t += 16) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, count - t)) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(lanes, ExpNonPositive(_mm512_sub_ps(_mm512_loadu_ps(logits + t), mxv)));
    _mm512_storeu_ps(logits + t, e);
    total = _mm512_add_ps(total, e);
  }
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (t = 0; t < count; ++t) {
    const __m512 w = _mm512_set1_ps(logits[t]);
    const float* vr = v_base + cols[t] * stride;
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 16 * c), acc[c]);
  }
  const float sum = _mm512_reduce_add_ps(total);
  const __m512 inv = _mm512_set1_ps(count > 0 ? 1.0f / sum : 0.0f);
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out_row + 16 * c, _mm512_mul_ps(acc[c], inv));
}
#endif

// Portable version of one row (any d).
void AttendRowScalar(const Problem& p, int64_t bi, int64_t hi, const float* q_row, const int32_t* cols,
                     int64_t count, float* logits, float* out_row) {
  const int64_t stride = p.TokenStride();
  const float* k_base = p.Row(p.k, bi, 0, hi);
  const float* v_base = p.Row(p.v, bi, 0, hi);
  float mx = -INFINITY;
  for (int64_t t = 0; t < count; ++t) {
    const float* kr = k_base + cols[t] * stride;
    float s = 0.0f;
    for (int64_t c = 0; c < p.d; ++c) s += q_row[c] * kr[c];
    logits[t] = s * p.scale;
    mx = std::max(mx, logits[t]);
  }
  float sum = 0.0f;
  for (int64_t t = 0; t < count; ++t) sum += (logits[t] = std::exp(logits[t] - mx));
  for (int64_t c = 0; c < p.d; ++c) out_row[c] = 0.0f;
  for (int64_t t = 0; t < count; ++t) {
    const float* vr = v_base + cols[t] * stride;
    for (int64_t c = 0; c < p.d; ++c) out_row[c] += logits[t] * vr[c];
  }
  const float inv = count > 0 ? 1.0f / sum : 0.0f;
  for (int64_t c = 0; c < p.d; ++c) out_row[c] *= inv;
}

using RowFn = void (*)(const Problem&, int64_t, int64_t, const float*, const int32_t*, int64_t, float*,
                       float*);

RowFn PickRowFn(int64_t d) {
#if defined(__AVX512F__)
  switch (d) {
    case 16: return AttendRow512<1>;
    case 32: return AttendRow512<2>;
    case 48: return AttendRow512<3>;
    case 64: return AttendRow512<4>;
    case 80: return AttendRow512<5>;
    case 96: return AttendRow512<6>;
    case 128: return AttendRow512<8>;
    default: break;
  }
#endif
  (void)d;
  return AttendRowScalar;
}

// Work items are (batch, head, block of rows), handed out dynamically; the calling thread works too and
// waits only for items another thread has claimed, so a busy (or one-thread) pool cannot deadlock it.
struct Work {
  Problem p;
  RowFn row_fn;
  int64_t rows_per_item, items_per_head, num_items;
  std::atomic<int64_t> next{0}, done{0};

  void Drain() {
    std::vector<int32_t> cols(p.n);
    std::vector<float> logits(p.n + 16);
    for (int64_t item; (item = next.fetch_add(1)) < num_items;) {
      const int64_t head_item = item / items_per_head;
      const int64_t bi = head_item / p.h, hi = head_item % p.h;
      const int64_t row0 = (item % items_per_head) * rows_per_item;
      const int64_t row1 = std::min(p.n, row0 + rows_per_item);
      const bool* keep_head = p.keep + ((p.mask_b == 1 ? 0 : bi) * p.mask_h + (p.mask_h == 1 ? 0 : hi)) *
                                           (p.n - p.dense_rows) * p.n;
      for (int64_t i = row0; i < row1; ++i) {
        int64_t count;
        if (i < p.dense_rows) {
          for (int64_t j = 0; j < p.n; ++j) cols[j] = static_cast<int32_t>(j);
          count = p.n;
        } else {
          count = KeptColumns(keep_head + (i - p.dense_rows) * p.n, p.n, cols.data());
        }
        row_fn(p, bi, hi, p.Row(p.q, bi, i, hi), cols.data(), count, logits.data(),
               p.out + ((bi * p.n + i) * p.h + hi) * p.d);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error SparseAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> keep,
                               ffi::ResultBuffer<ffi::F32> out, int64_t num_dense_rows, float scale) {
  const auto qd = q.dimensions(), md = keep.dimensions();
  if (qd.size() != 4 || md.size() != 4) {
    return ffi::Error::InvalidArgument("sparse_attention: q/k/v must be [B, N, H, d], keep [B, H, R, N]");
  }
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), keep.typed_data(), out->typed_data(),
            qd[0], qd[1], qd[2], qd[3], num_dense_rows, md[0], md[1], scale};
  const auto kd = k.dimensions(), vd = v.dimensions();
  if (kd.size() != 4 || vd.size() != 4 || !std::equal(qd.begin(), qd.end(), kd.begin()) ||
      !std::equal(qd.begin(), qd.end(), vd.begin())) {
    return ffi::Error::InvalidArgument("sparse_attention: q, k and v must have the same shape");
  }
  if (num_dense_rows < 0 || num_dense_rows > p.n || md[2] != p.n - num_dense_rows || md[3] != p.n ||
      (md[0] != 1 && md[0] != p.b) || (md[1] != 1 && md[1] != p.h)) {
    return ffi::Error::InvalidArgument("sparse_attention: keep must be [B|1, H|1, N - num_dense_rows, N]");
  }
  if (p.n >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("sparse_attention: N must be < 2^31");
  auto work = std::make_shared<Work>();
  work->p = p;
  work->row_fn = PickRowFn(p.d);
  work->rows_per_item = std::max<int64_t>(1, std::min<int64_t>(p.n, 64));
  work->items_per_head = (p.n + work->rows_per_item - 1) / work->rows_per_item;
  work->num_items = p.b * p.h * work->items_per_head;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, work->num_items); ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->num_items) {
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseAttention, SparseAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_dense_rows")
                                  .Attr<float>("scale"));
