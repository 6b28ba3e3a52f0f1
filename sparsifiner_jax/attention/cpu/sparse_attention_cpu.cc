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
// Shapes: qkv float32 [B, N, 3, H, d] (the fused qkv projection's output as it is: q, k, v = qkv[:, :, i]);
// keep bool [Bm, Hm, N - num_dense_rows, N] with Bm in {1, B}, Hm in {1, H} (broadcast);
// out float32 [B, N, H, d]. Attributes: num_dense_rows in [0, N], scale (the logit scale).
//
// SparseAttentionBackward is its gradient, over the same kept entries only: from qkv, keep, the forward's
// out and its cotangent dout [B, N, H, d] it writes dq, dk, dv [B, N, H, d]. Per row it recomputes the
// kept probabilities p (the forward's logits and softmax), then with D = dout_i . out_i:
//   ds_t = p_t (dout_i . v_t - D),  dq_i = scale sum_t ds_t k_t,  dk_t += scale ds_t q_i,  dv_t += p_t dout_i.
// One (batch, head) is one work item (its dk, dv rows accumulate over all its query rows).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* qkv;
  const bool* keep;
  float* out;
  int64_t b, n, h, d, dense_rows, mask_b, mask_h;
  float scale;

  int64_t TokenStride() const { return 3 * h * d; }
  // Row `tok` of head `hi` of q (which = 0), k (1) or v (2).
  const float* Row(int which, int64_t bi, int64_t tok, int64_t hi) const {
    return qkv + (((bi * n + tok) * 3 + which) * h + hi) * d;
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
// The horizontal sums of 16 vectors, as one vector (lane u = the sum of a[u]'s lanes): a transpose-and-add
// tree, ~3 instructions per sum instead of a full reduction each.
inline __m512 SumEach16(const __m512* a) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i) {   // lanes (per 128 bits): a[2i] at 0 and 2, a[2i+1] at 1 and 3
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {   // per 128 bits: a[4i .. 4i + 3]'s partial sums, in order
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 2; ++i) {   // the four 128-bit partials of each group of four, pairwise
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}
#endif

// d-wide vector helpers: C = d / 16 AVX-512 registers, or C = 0 (portable) for any d.
template <int C>
struct Lanes {
  static float Dot(const float* a, const float* b, int64_t d) {
#if defined(__AVX512F__)
    if constexpr (C > 0) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16 * c), _mm512_loadu_ps(b + 16 * c), acc);
      return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
    for (int64_t c = 0; c < d; ++c) s += a[c] * b[c];
    return s;
  }
  // out[t] = x . base[cols[t] * stride, ... + d) for t < count: the dot products with a row's kept columns,
  // 16 at a time under AVX-512 (their sums reduced together).
  static void Dots(const float* x, const float* base, const int32_t* cols, int64_t count, int64_t stride,
                   int64_t d, float* out) {
    int64_t t = 0;
#if defined(__AVX512F__)
    if constexpr (C > 0) {
      __m512 xv[C];
      for (int c = 0; c < C; ++c) xv[c] = _mm512_loadu_ps(x + 16 * c);
      for (; t + 16 <= count; t += 16) {
        __m512 acc[16];
        for (int u = 0; u < 16; ++u) {
          const float* row = base + cols[t + u] * stride;
          acc[u] = _mm512_mul_ps(xv[0], _mm512_loadu_ps(row));
          for (int c = 1; c < C; ++c) acc[u] = _mm512_fmadd_ps(xv[c], _mm512_loadu_ps(row + 16 * c), acc[u]);
        }
        _mm512_storeu_ps(out + t, SumEach16(acc));
      }
    }
#endif
    for (; t < count; ++t) out[t] = Dot(x, base + cols[t] * stride, d);
  }
  // y += alpha x
  static void Axpy(float alpha, const float* x, float* y, int64_t d) {
#if defined(__AVX512F__)
    if constexpr (C > 0) {
      const __m512 w = _mm512_set1_ps(alpha);
      for (int c = 0; c < C; ++c) {
        _mm512_storeu_ps(y + 16 * c, _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16 * c), _mm512_loadu_ps(y + 16 * c)));
      }
      return;
    }
#endif
    for (int64_t c = 0; c < d; ++c) y[c] += alpha * x[c];
  }
};

#if defined(__AVX512F__)
// One query row with head dim d = 16 * C: logits, softmax and the weighted sum over `count` columns.
template <int C>
void AttendRow512(const Problem& p, int64_t bi, int64_t hi, const float* q_row, const int32_t* cols,
                  int64_t count, float* logits, float* out_row) {
  const int64_t stride = p.TokenStride();
  const float* k_base = p.Row(1, bi, 0, hi);
  const float* v_base = p.Row(2, bi, 0, hi);
  alignas(64) float q_scaled[16 * C];
  for (int c = 0; c < C; ++c) {
    _mm512_store_ps(q_scaled + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(q_row + 16 * c), _mm512_set1_ps(p.scale)));
  }
  Lanes<C>::Dots(q_scaled, k_base, cols, count, stride, 16 * C, logits);
  const float sum = sparsifiner_kernels::ExpMinusMaxInPlace(logits, count);
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < count; ++t) {
    const __m512 w = _mm512_set1_ps(logits[t]);
    const float* vr = v_base + cols[t] * stride;
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 16 * c), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(count > 0 ? 1.0f / sum : 0.0f);
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out_row + 16 * c, _mm512_mul_ps(acc[c], inv));
}
#endif

// Portable version of one row (any d).
void AttendRowScalar(const Problem& p, int64_t bi, int64_t hi, const float* q_row, const int32_t* cols,
                     int64_t count, float* logits, float* out_row) {
  const int64_t stride = p.TokenStride();
  const float* k_base = p.Row(1, bi, 0, hi);
  const float* v_base = p.Row(2, bi, 0, hi);
  for (int64_t t = 0; t < count; ++t) {
    const float* kr = k_base + cols[t] * stride;
    float s = 0.0f;
    for (int64_t c = 0; c < p.d; ++c) s += (q_row[c] * p.scale) * kr[c];   // as the backward recomputes it
    logits[t] = s;
  }
  const float sum = sparsifiner_kernels::ExpMinusMaxInPlace(logits, count);
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

// make(std::integral_constant<int, C>{}) with C = d / 16 for the head dims that have an AVX-512 path,
// C = 0 (portable) for any other d: the one list of those dims, for the forward and backward kernels.
template <typename Make>
auto ForHeadDim(int64_t d, Make make) {
#if defined(__AVX512F__)
  switch (d) {
    case 16: return make(std::integral_constant<int, 1>{});
    case 32: return make(std::integral_constant<int, 2>{});
    case 48: return make(std::integral_constant<int, 3>{});
    case 64: return make(std::integral_constant<int, 4>{});
    case 80: return make(std::integral_constant<int, 5>{});
    case 96: return make(std::integral_constant<int, 6>{});
    case 128: return make(std::integral_constant<int, 8>{});
    default: break;
  }
#endif
  (void)d;
  return make(std::integral_constant<int, 0>{});
}

RowFn PickRowFn(int64_t d) {
  return ForHeadDim(d, [](auto lanes) -> RowFn {
#if defined(__AVX512F__)
    if constexpr (lanes.value > 0) return AttendRow512<lanes.value>;
#endif
    return AttendRowScalar;
  });
}

// One query row per Row(i) (i = (b * H + h) * N + token): rows of one (batch, head) are adjacent, so a
// thread's chunk reuses that head's K and V from cache.
struct AttentionRows {
  Problem p;
  RowFn row_fn;

  struct Buffers {
    std::vector<int32_t> cols;
    std::vector<float> logits;
  };
  Buffers Scratch() const { return Buffers{std::vector<int32_t>(p.n), std::vector<float>(p.n + 16)}; }

  void Row(int64_t item, Buffers& s) const {
    const int64_t i = item % p.n, head_item = item / p.n;
    const int64_t bi = head_item / p.h, hi = head_item % p.h;
    int64_t count;
    if (i < p.dense_rows) {
      for (int64_t j = 0; j < p.n; ++j) s.cols[j] = static_cast<int32_t>(j);
      count = p.n;
    } else {
      const bool* keep_head = p.keep + ((p.mask_b == 1 ? 0 : bi) * p.mask_h + (p.mask_h == 1 ? 0 : hi)) *
                                           (p.n - p.dense_rows) * p.n;
      count = KeptColumns(keep_head + (i - p.dense_rows) * p.n, p.n, s.cols.data());
    }
    row_fn(p, bi, hi, p.Row(0, bi, i, hi), s.cols.data(), count, s.logits.data(),
           p.out + ((bi * p.n + i) * p.h + hi) * p.d);
  }
};

struct BackwardHeads {
  Problem p;
  const float *out, *dout;
  float *dq, *dk, *dv;

  struct Buffers {
    std::vector<int32_t> cols;
    std::vector<float> probs, dots, q_scaled;   // per kept column: p_t and dout_i . v_t; scale q_i
  };
  void (*head_fn)(const BackwardHeads&, int64_t, int64_t, Buffers&);

  Buffers Scratch() const {
    return Buffers{std::vector<int32_t>(p.n), std::vector<float>(p.n + 16), std::vector<float>(p.n + 16),
                   std::vector<float>(p.d)};
  }
  int64_t Index(int64_t bi, int64_t tok, int64_t hi) const { return ((bi * p.n + tok) * p.h + hi) * p.d; }
  void Row(int64_t item, Buffers& s) const { head_fn(*this, item / p.h, item % p.h, s); }
};

template <int C>
void BackwardHead(const BackwardHeads& w, int64_t bi, int64_t hi, BackwardHeads::Buffers& s) {
  using V = Lanes<C>;
  const Problem& p = w.p;
  const int64_t d = p.d, stride = p.TokenStride();
  const float* k_base = p.Row(1, bi, 0, hi);
  const float* v_base = p.Row(2, bi, 0, hi);
  int32_t* cols = s.cols.data();
  float *probs = s.probs.data(), *dots = s.dots.data(), *q_scaled = s.q_scaled.data();
  for (int64_t tok = 0; tok < p.n; ++tok) {
    std::fill_n(w.dk + w.Index(bi, tok, hi), d, 0.0f);
    std::fill_n(w.dv + w.Index(bi, tok, hi), d, 0.0f);
  }
  const bool* keep_head = p.keep + ((p.mask_b == 1 ? 0 : bi) * p.mask_h + (p.mask_h == 1 ? 0 : hi)) *
                                       (p.n - p.dense_rows) * p.n;
  for (int64_t i = 0; i < p.n; ++i) {
    float* dq_row = w.dq + w.Index(bi, i, hi);
    std::fill_n(dq_row, d, 0.0f);
    int64_t count;
    if (i < p.dense_rows) {
      for (int64_t j = 0; j < p.n; ++j) cols[j] = static_cast<int32_t>(j);
      count = p.n;
    } else {
      count = KeptColumns(keep_head + (i - p.dense_rows) * p.n, p.n, cols);
    }
    if (count == 0) continue;   // an empty row's output is the constant 0: no gradient
    const float* q_row = p.Row(0, bi, i, hi);
    const float* do_row = w.dout + w.Index(bi, i, hi);
    for (int64_t c = 0; c < d; ++c) q_scaled[c] = q_row[c] * p.scale;     // the forward's logits exactly
    V::Dots(q_scaled, k_base, cols, count, stride, d, probs);
    const float inv = 1.0f / sparsifiner_kernels::ExpMinusMaxInPlace(probs, count);
    V::Dots(do_row, v_base, cols, count, stride, d, dots);
    const float total = V::Dot(do_row, w.out + w.Index(bi, i, hi), d);
    for (int64_t t = 0; t < count; ++t) {
      const float prob = probs[t] * inv;
      const float* k_row = k_base + cols[t] * stride;
      const float ds = p.scale * prob * (dots[t] - total);
      V::Axpy(prob, do_row, w.dv + w.Index(bi, cols[t], hi), d);
      V::Axpy(ds, k_row, dq_row, d);
      V::Axpy(ds, q_row, w.dk + w.Index(bi, cols[t], hi), d);
    }
  }
}

decltype(BackwardHeads::head_fn) PickHeadFn(int64_t d) {
  return ForHeadDim(d, [](auto lanes) -> decltype(BackwardHeads::head_fn) { return BackwardHead<lanes.value>; });
}

// The checks both entry points share; fills `p` on success.
ffi::Error MakeProblem(ffi::Buffer<ffi::F32>& qkv, ffi::Buffer<ffi::PRED>& keep, float* out,
                       int64_t num_dense_rows, float scale, Problem& p) {
  const auto qd = qkv.dimensions(), md = keep.dimensions();
  if (qd.size() != 5 || qd[2] != 3 || md.size() != 4) {
    return ffi::Error::InvalidArgument("sparse_attention: qkv must be [B, N, 3, H, d], keep [B, H, R, N]");
  }
  p = Problem{qkv.typed_data(), keep.typed_data(), out, qd[0], qd[1], qd[3], qd[4],
              num_dense_rows, md[0], md[1], scale};
  if (num_dense_rows < 0 || num_dense_rows > p.n || md[2] != p.n - num_dense_rows || md[3] != p.n ||
      (md[0] != 1 && md[0] != p.b) || (md[1] != 1 && md[1] != p.h)) {
    return ffi::Error::InvalidArgument("sparse_attention: keep must be [B|1, H|1, N - num_dense_rows, N]");
  }
  if (p.n >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("sparse_attention: N must be < 2^31");
  return ffi::Error::Success();
}

ffi::Error SparseAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::PRED> keep,
                               ffi::ResultBuffer<ffi::F32> out, int64_t num_dense_rows, float scale) {
  Problem p;
  if (ffi::Error e = MakeProblem(qkv, keep, out->typed_data(), num_dense_rows, scale, p); e.failure()) return e;
  auto work = std::make_shared<const AttentionRows>(AttentionRows{p, PickRowFn(p.d)});
  sparsifiner_kernels::ParallelRows(pool, work, p.b * p.h * p.n, 16);
  return ffi::Error::Success();
}

ffi::Error SparseAttentionBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                       ffi::Buffer<ffi::PRED> keep, ffi::Buffer<ffi::F32> out,
                                       ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                                       ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                                       int64_t num_dense_rows, float scale) {
  Problem p;
  if (ffi::Error e = MakeProblem(qkv, keep, nullptr, num_dense_rows, scale, p); e.failure()) return e;
  const int64_t size = p.b * p.n * p.h * p.d;
  if (out.element_count() != size || dout.element_count() != size || dq->element_count() != size ||
      dk->element_count() != size || dv->element_count() != size) {
    return ffi::Error::InvalidArgument("sparse_attention backward: out, dout, dq, dk, dv must be [B, N, H, d]");
  }
  auto work = std::make_shared<const BackwardHeads>(BackwardHeads{
      p, out.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(),
      PickHeadFn(p.d)});
  sparsifiner_kernels::ParallelRows(pool, work, p.b * p.h, 1);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseAttention, SparseAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_dense_rows")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseAttentionBackward, SparseAttentionBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_dense_rows")
                                  .Attr<float>("scale"));
