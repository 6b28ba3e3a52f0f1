// What the CPU kernels share: a vectorised exp for softmaxes and the parallel loop over rows.
#ifndef SPARSIFINER_JAX_KERNELS_CPU_COMMON_H_
#define SPARSIFINER_JAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>

namespace sparsifiner_kernels {

// exp(x) for x <= 0 (values minus their row max), about 1 ulp: Cody-Waite reduction by ln 2, a degree-6
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

inline __mmask16 FirstLanes(int64_t m) {
  return m >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << m) - 1u);
}

}  // namespace sparsifiner_kernels
#endif

namespace sparsifiner_kernels {

// x[i] = exp(x[i] - max(x)) for i < n; returns the sum of the results. x has room for n rounded up to 16.
inline float ExpMinusMaxInPlace(float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16) {
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), FirstLanes(n - t), x + t));
  }
  const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 lanes = FirstLanes(n - t);
    const __m512 e = _mm512_maskz_mov_ps(
        lanes, ExpNonPositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + t), row_max)));
    _mm512_mask_storeu_ps(x + t, lanes, e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
#else
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, x[t]);
  float total = 0.0f;
  for (int64_t t = 0; t < n; ++t) total += (x[t] = std::exp(x[t] - mx));
  return total;
#endif
}

// Runs work->Row(i, scratch) for i in [0, rows) on XLA's intra-op thread pool, in chunks of at least
// min_chunk rows; scratch = work->Scratch() is made once per thread. The calling thread works too and
// waits only for chunks another thread has claimed, so a busy (or one-thread) pool cannot deadlock it.
template <typename Rows>
void ParallelRows(xla::ffi::ThreadPool& pool, std::shared_ptr<const Rows> work, int64_t rows,
                  int64_t min_chunk) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(min_chunk, rows / (threads * 8) + 1);
  const int64_t num_chunks = (rows + chunk - 1) / chunk;
  struct Queue {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto queue = std::make_shared<Queue>();
  auto drain = [work, queue, rows, chunk, num_chunks] {
    auto scratch = work->Scratch();
    for (int64_t c; (c = queue->next.fetch_add(1)) < num_chunks;) {
      const int64_t end = std::min(rows, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < end; ++i) work->Row(i, scratch);
      queue->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, num_chunks); ++t) {
    auto task = drain;
    pool.Schedule(std::move(task));
  }
  drain();
  while (queue->done.load(std::memory_order_acquire) < num_chunks) {
  }
}

}  // namespace sparsifiner_kernels

#endif  // SPARSIFINER_JAX_KERNELS_CPU_COMMON_H_
