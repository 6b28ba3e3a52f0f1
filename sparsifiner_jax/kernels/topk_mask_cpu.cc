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

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Monotone map float -> uint32: a > b (as floats, -inf lowest, NaN above +inf) iff key(a) > key(b).
inline uint32_t OrderKey(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// 32-bit counts (rows are < 2^31 long): the compiler keeps 16 of them per AVX-512 register, twice the lanes of int64.
inline int64_t CountAtLeast(const uint32_t* key, int64_t n, uint32_t c) {
  uint32_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += key[j] >= c;
  return count;
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

// Rows are handed out in chunks; the calling thread works too and waits only for chunks another thread
// has claimed, so a busy (or one-thread) pool cannot deadlock it.
struct Work {
  const float* x;
  bool* out;
  int64_t n, k, rows, chunk, num_chunks;
  std::atomic<int64_t> next{0}, done{0};

  void Drain() {
    std::vector<uint32_t> key(n);
    for (int64_t c; (c = next.fetch_add(1)) < num_chunks;) {
      const int64_t end = std::min(rows, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < end; ++i) SelectRow(x + i * n, n, k, key.data(), out + i * n);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error TopkMaskImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::PRED> out,
                        int64_t k) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("topk_mask: x must have rank >= 1");
  const int64_t n = dims.back();
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("topk_mask: k must be in [1, n]");
  if (n >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("topk_mask: rows must be < 2^31 long");
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->out = out->typed_data();
  work->n = n;
  work->k = k;
  work->rows = n == 0 ? 0 : static_cast<int64_t>(x.element_count()) / n;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->chunk = std::max<int64_t>(64, work->rows / (threads * 8) + 1);
  work->num_chunks = (work->rows + work->chunk - 1) / work->chunk;
  for (int64_t t = 1; t < std::min(threads, work->num_chunks); ++t) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) {
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
