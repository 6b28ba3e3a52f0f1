"""The predictor's sparse mask in one Pallas pass: low-rank scores -> top-k keys -> bit-packed rows.

Per (batch b, head h, block of query rows) the kernel computes, for each query row r

1. the coefficient logits ``z = (q_r . w[:d] + w[d]) * scale`` ``[m]`` (product in the compute dtype,
   float32 accumulation);
2. ``coef = softmax(z)``, all but its ``coef_k`` largest entries (ranked by ``z``) zeroed, not renormalised;
3. the approximate attention row ``a = coef @ basis`` ``[N]`` (compute dtype, float32 accumulation);
4. the ``k`` largest entries of ``a`` (ties: lowest index, ``lax.top_k``'s order),

and writes only the packed row (``bitmask`` format): neither ``z`` nor ``a`` reaches HBM. This is
``MaskPredictor.combine`` followed by ``lax.top_k`` without the ``[B, H, N-1, N]`` float32 intermediate.

Top-k without a sort (:func:`_topk_keep`): a bisection over the order-preserving int32 image of the
float32 values (32 steps of ``count(key >= t)`` per row) finds the k-th largest key ``t``; every key ``> t``
is kept, and of the keys ``== t`` the first ``k - count(key > t)`` by index, found by a second bisection
over the index (``log2`` of the row length steps). On TPU each query row's scores are held as a
column (``approx.T [n_pad, rows]``, :func:`_kernel_columns`): every count of the bisections is then a sum
over sublanes, element-wise adds on the vector unit, where a sum along lanes takes the cross-lane unit
(the TPU compiler's schedule: 5,989 bundles per grid step for DeiT-S in bf16 against 12,214 along
lanes), and the words come out in the ``bitmask`` layout. Bits are packed per word by a sum of the 32
bits shifted into place (on the vector unit: a packing matmul would cost the MXU as much as the attention
itself at 448 px).

Two backends share the kernel body: ``"tpu"`` (Mosaic; key rows padded to the 128-lane width) and
``"gpu"`` (Triton; every block dimension padded to a power of two, at least 16).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sparsifiner_jax.attention import bitmask
from sparsifiner_jax.attention.pallas.common import next_pow2, round_up

Array = jax.Array

_INT_MIN = np.int32(np.iinfo(np.int32).min)
_LANES = 128            # TPU lane width: key rows are padded to a multiple of it
_TPU_MAX_ROWS = 512     # TPU: up to this many tokens, one block holds every query row of a head
_TPU_BLOCK_Q = 256      # TPU: query rows per block above it
_GPU_BLOCK_Q = 16       # GPU: query rows per program (Triton's smallest dot tile)
_GPU_MIN_DIM = 16       # GPU: tl.dot needs every dimension >= 16
_GPU_STAGED_BYTES = 96 * 1024   # GPU: the most shared memory a call may stage (every CUDA GPU since sm_80)


@dataclasses.dataclass(frozen=True)
class _Sizes:
  """Static sizes of one call. ``n``, ``m``: real keys and coefficients; ``n_pad``, ``m_pad``, ``d_pad``,
  ``w_pad``: their padded block widths; ``rows``: query rows per block, ``rows_pad`` the padded row count;
  ``words``: packed words per row (``bitmask.words(n)``)."""
  n: int
  m: int
  d: int
  n_pad: int
  m_pad: int
  d_pad: int
  w_pad: int
  rows: int
  rows_pad: int
  words: int


def _sizes(n: int, m: int, d: int, backend: str, block_q: int | None) -> _Sizes:
  """Block sizes for ``n`` tokens, ``m`` coefficients, head dim ``d`` on ``backend``."""
  words = bitmask.words(n)
  if backend == "tpu":
    rows = block_q or (n if n <= _TPU_MAX_ROWS else _TPU_BLOCK_Q)
    if rows != n and (rows % 16 or rows < n and rows % _LANES):
      raise ValueError(f"block_q={rows} must be N={n} or a multiple of 16 (bf16 sublane tiling), and of "
                       f"{_LANES} when it is less than N (the words' lane tiling)")
    return _Sizes(n, m, d, round_up(n, _LANES), m, d, round_up(words, _LANES), rows,
                  round_up(n, rows), words)
  if backend == "gpu":
    rows = block_q or _GPU_BLOCK_Q
    if rows < _GPU_MIN_DIM or rows != next_pow2(rows):
      raise ValueError(f"block_q={rows} must be a power of two >= {_GPU_MIN_DIM} on the GPU backend")
    big = lambda x: max(next_pow2(x), _GPU_MIN_DIM)   # noqa: E731
    return _Sizes(n, m, d, max(big(n), 2 * bitmask.BITS), big(m), big(d), big(words), rows,
                  round_up(n, rows), words)
  raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")


def fits(n: int, m: int, d: int, compute_dtype, backend: str) -> bool:
  """Whether the kernel compiles for ``n`` tokens, ``m`` coefficients and head dim ``d`` on ``backend``.

  GPU: the product ``coef @ basis`` stages the whole padded basis ``[m_pad, n_pad]`` in shared memory
  (DeiT-S at 224 px in bf16: 16 KiB; at 448 px, 785 tokens: 512 KiB, beyond an H100's 227 KiB), so
  long sequences take the XLA selection instead. TPU: every size (the basis block lives in VMEM).
  """
  if backend != "gpu":
    return True
  s = _sizes(n, m, d, backend, None)
  return s.m_pad * s.n_pad * jnp.dtype(compute_dtype).itemsize <= _GPU_STAGED_BYTES


# ----------------------------------------------------------------------------------------------------
# Kernel pieces (traced inside the kernel; plain jnp on values of one block).


def _order_key(x: Array) -> Array:
  """float32 ``[R, L]`` -> int32 keys with the floats' order (``-0.0`` counted as ``+0.0``)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)   # (x + 0.0 may be folded)
  return jnp.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)


def _count(mask: Array, axis: int) -> Array:
  """Count of a boolean ``[R, L]`` along ``axis`` as float32, kept as a size-1 axis (exact below 2^24)."""
  return jnp.sum(jnp.where(mask, 1.0, 0.0), axis=axis, keepdims=True)


def _loop(steps: int, body, init, unroll: bool):
  """``body(i, carry)`` for ``i < steps``: unrolled in Python (straight-line code) or a rolled loop."""
  if not unroll:
    return jax.lax.fori_loop(0, steps, body, init)
  carry = init
  for i in range(steps):
    carry = body(i, carry)
  return carry


def _topk_keep(x: Array, k: int, valid: Array, unroll: bool, axis: int = 1) -> Array:
  """Boolean ``[R, L]``: each row's ``k`` largest valid entries of float32 ``x [R, L]`` (ties: lowest
  index), ``valid [R|1, L]``; needs ``1 <= k <= count(valid)`` per row. ``unroll``: unroll the bisections
  or keep them loops (:func:`_unroll` decides). ``axis``: the axis the rows run along (1: rows are rows;
  0: rows are columns, ``valid [R, 1|L]``)."""
  key = jnp.where(valid, _order_key(x), _INT_MIN)
  reduced = (x.shape[0], 1) if axis == 1 else (1, x.shape[1])

  def value_step(i, t):
    # The k-th largest key t: bit by bit from the top in offset binary (u = key ^ INT_MIN), the largest t
    # with count(key >= t) >= k. Setting bit b of u toggles bit b of t (from t = INT_MIN on).
    cand = t ^ jnp.left_shift(jnp.int32(1), 31 - i)
    return jnp.where(_count(key >= cand, axis) >= k, cand, t)

  t = _loop(32, value_step, jnp.full(reduced, _INT_MIN, jnp.int32), unroll)
  above = key > t
  need = k - _count(above, axis)                               # >= 1 entries equal to t to keep
  tied = key == t
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  bits = max(x.shape[axis] - 1, 1).bit_length()

  def index_step(i, c):
    # The need-th tied index c: the largest c with count(tied & index < c) < need.
    cand = c | jnp.left_shift(jnp.int32(1), bits - 1 - i)
    return jnp.where(_count(tied & (index < cand), axis) < need, cand, c)

  c = _loop(bits, index_step, jnp.zeros(reduced, jnp.int32), unroll)
  return above | (tied & (index <= c))


def _pack(keep: Array, w_out: int) -> Array:
  """Boolean ``[R, L]`` (``L`` a multiple of 32) -> int32 ``[R, w_out]`` words, bit ``j`` of word ``w``
  = ``keep[:, 32 w + j]``; words past ``L / 32`` are 0. Per word, a lane sum of its 32 bits shifted into
  place (distinct powers of two: the sum is their OR, two's complement wrapping included)."""
  rows, length = keep.shape
  lane = jax.lax.broadcasted_iota(jnp.int32, keep.shape, 1)
  bits = jnp.where(keep, jnp.left_shift(jnp.int32(1), lane & (bitmask.BITS - 1)), 0)
  group = jnp.right_shift(lane, 5)
  column = jax.lax.broadcasted_iota(jnp.int32, (rows, w_out), 1)
  out = jnp.zeros((rows, w_out), jnp.int32)
  for w in range(min(length // bitmask.BITS, w_out)):
    word = jnp.sum(jnp.where(group == w, bits, 0), axis=-1, keepdims=True)
    out = jnp.where(column == w, word, out)
  return out


def _pack_columns(keep_t: Array, words: int) -> Array:
  """Boolean ``[L, R]`` (keys on sublanes, ``L`` a multiple of 32) -> int32 ``[words, R]``, bit ``j`` of
  word ``w`` = ``keep_t[32 w + j]``: per word, a sum over its 32 sublanes of the bits shifted into place
  (element-wise adds, no cross-lane work)."""
  key = jax.lax.broadcasted_iota(jnp.int32, keep_t.shape, 0)
  bits = jnp.where(keep_t, jnp.left_shift(jnp.int32(1), key & (bitmask.BITS - 1)), 0)
  return jnp.concatenate([jnp.sum(bits[bitmask.BITS * w:bitmask.BITS * (w + 1)], axis=0, keepdims=True)
                          for w in range(words)], axis=0)


def _kernel_rows(q_ref, wq_ref, bias_ref, basis_ref, out_ref, *, sizes: _Sizes, scale: float, coef_k: int,
                 k: int, num_dense_rows: int, unroll: bool):
  """GPU, one (b, h, row block): ``q_ref [rows, d_pad]``, ``wq_ref [d_pad, m_pad]`` (compute dtype),
  ``bias_ref [1, m_pad]`` float32, ``basis_ref [m_pad, n_pad]`` (compute dtype) -> ``out_ref [rows, w_pad]``
  int32 (transposed to the ``bitmask`` layout by the caller), each query row's scores along a row."""
  s = sizes
  z = jnp.dot(q_ref[...], wq_ref[...], preferred_element_type=jnp.float32)
  z = (z + bias_ref[...]) * scale                                            # [rows, m_pad]
  m_valid = jax.lax.broadcasted_iota(jnp.int32, (1, s.m_pad), 1) < s.m
  z = jnp.where(m_valid, z, -jnp.inf)
  e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
  coef = e / jnp.sum(e, axis=-1, keepdims=True)                           # jax.nn.softmax's steps
  if coef_k < s.m:
    coef = jnp.where(_topk_keep(z, coef_k, m_valid, unroll), coef, 0.0)
  basis = basis_ref[...]
  approx = jnp.dot(coef.astype(basis.dtype), basis, preferred_element_type=jnp.float32)   # [rows, n_pad]
  n_valid = jax.lax.broadcasted_iota(jnp.int32, approx.shape, 1) < s.n
  row = pl.program_id(2) * s.rows + jax.lax.broadcasted_iota(jnp.int32, approx.shape, 0)
  keep = n_valid
  if k < s.n:   # (bool operands: logical ops, not selects, which Mosaic widens to i8)
    keep = (row < num_dense_rows) & n_valid | _topk_keep(approx, k, n_valid, unroll)
  out_ref[...] = _pack(keep, s.w_pad)                                     # [rows, w_pad]


def _kernel_columns(q_ref, w_ref, basis_ref, out_ref, *, sizes: _Sizes, heads_per_block: int, scale: float,
                    coef_k: int, k: int, num_dense_rows: int, unroll: bool):
  """TPU, one (b, h, row block): ``q_ref [rows, 128]`` (compute dtype: the 128 lanes of the queries'
  ``[B, N, H d]`` layout that hold head ``h``, among ``heads_per_block`` heads; or ``[rows, d]`` of
  heads-first queries, ``heads_per_block = 1``, see :func:`_tpu_call`), ``w_ref [d + 1, m]``
  float32 (``query_weights``' layout), ``basis_ref [m_pad, n_pad]`` (compute dtype) -> ``out_ref [words,
  rows]``, the ``bitmask`` layout. With lane blocks no operand is transposed, padded or sliced in HBM.

  :func:`_kernel_rows`' steps with each query row's scores as a column (``z.T [m, rows]``,
  ``approx.T [n_pad, rows]``): the top-k's counts are sums over sublanes, element-wise adds on the vector
  unit, where along lanes they would each take the cross-lane unit; the words need no transpose."""
  s = sizes
  lanes = q_ref[...]
  slot = jax.lax.rem(pl.program_id(1), heads_per_block)
  q = lanes[:, :s.d]
  for j in range(1, heads_per_block):
    q = jnp.where(slot == j, lanes[:, j * s.d:(j + 1) * s.d], q)
  w = w_ref[...]                                                            # [d + 1, m]
  z = jnp.dot(q, w[:s.d].astype(q.dtype), preferred_element_type=jnp.float32)
  z = jnp.transpose((z + w[s.d:]) * scale)                                  # [m, rows]
  m_valid = jax.lax.broadcasted_iota(jnp.int32, (s.m_pad, 1), 0) < s.m
  z = jnp.where(m_valid, z, -jnp.inf)
  e = jnp.exp(z - jnp.max(z, axis=0, keepdims=True))
  coef = e / jnp.sum(e, axis=0, keepdims=True)
  if coef_k < s.m:
    coef = jnp.where(_topk_keep(z, coef_k, m_valid, unroll, axis=0), coef, 0.0)
  basis = basis_ref[...]
  approx = jax.lax.dot_general(basis, coef.astype(basis.dtype), (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)          # [n_pad, rows]
  n_valid = jax.lax.broadcasted_iota(jnp.int32, approx.shape, 0) < s.n
  row = pl.program_id(2) * s.rows + jax.lax.broadcasted_iota(jnp.int32, approx.shape, 1)
  keep = n_valid
  if k < s.n:
    keep = (row < num_dense_rows) & n_valid | _topk_keep(approx, k, n_valid, unroll, axis=0)
  out_ref[...] = _pack_columns(keep, out_ref.shape[0])                    # [words, rows]


# ----------------------------------------------------------------------------------------------------
# The call.


def _cost(b: int, h: int, s: _Sizes, coef_k: int, k: int, operands, out_bytes: int) -> pl.CostEstimate:
  """Per call: the two products (2 flops per multiply-add), the packing (a select and an add per key and
  word), one compare per element and bisection step of each top-k; ``exp`` per coefficient; operands +
  packed result bytes."""
  rows = b * h * s.rows_pad
  products = 2 * rows * (s.d * s.m + s.m * s.n)
  packing = 2 * rows * s.n_pad * s.words
  steps = lambda length: 32 + max(length - 1, 1).bit_length()   # noqa: E731
  select = rows * ((s.m_pad * steps(s.m_pad) if coef_k < s.m else 0)
                   + (s.n_pad * steps(s.n_pad) if k < s.n else 0))
  operand_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in operands)
  return pl.CostEstimate(flops=int(products + packing + select), transcendentals=int(rows * s.m),
                         bytes_accessed=int(operand_bytes + out_bytes))


def _pad(x: Array, widths) -> Array:
  """``x`` zero-padded at the end of its trailing ``len(widths)`` axes by ``widths``."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - len(widths)) + [(0, w) for w in widths])


def _heads_first_q(q: Array, s: _Sizes, dtype) -> Array:
  """q ``[B, N, H, d]`` -> ``[B, H, rows_pad, d_pad]`` (``dtype``), zeros in the padding."""
  return _pad(jnp.swapaxes(q, 1, 2).astype(dtype), [s.rows_pad - s.n, s.d_pad - s.d])


def _basis_operand(basis: Array, s: _Sizes, dtype) -> Array:
  """The basis ``[m, N]`` or ``[B, m, N]`` -> ``[1|B, m_pad, n_pad]`` (``dtype``), zeros in the padding."""
  basis = basis[None] if basis.ndim == 2 else basis
  return _pad(basis.astype(dtype), [s.m_pad - s.m, s.n_pad - s.n])


def _operands(q: Array, weights: Array, basis: Array, s: _Sizes, dtype):
  """GPU kernel operands: q ``[B, H, rows_pad, d_pad]``, w_q ``[B, H, d_pad, m_pad]`` (``dtype``),
  bias ``[B, H, 1, m_pad]`` float32, basis ``[1|B, m_pad, n_pad]`` (``dtype``), zeros in the padding."""
  wq = _pad(weights[:, :, :s.d].astype(dtype), [s.d_pad - s.d, s.m_pad - s.m])
  bias = _pad(weights[:, :, s.d:].astype(jnp.float32), [0, s.m_pad - s.m])
  return _heads_first_q(q, s, dtype), wq, bias, _basis_operand(basis, s, dtype)


def _check(q: Array, weights: Array, basis: Array, coef_k: int, k: int, num_dense_rows: int) -> None:
  b, n, h, d = q.shape
  m = weights.shape[-1]
  if weights.shape != (b, h, d + 1, m):
    raise ValueError(f"weights must be [B, H, d + 1, m] = {(b, h, d + 1, m)}, got {weights.shape}")
  if basis.shape not in ((m, n), (b, m, n)):
    raise ValueError(f"basis must be [m, N] = {(m, n)} or [B, m, N], got {basis.shape}")
  if not 1 <= k <= n:
    raise ValueError(f"top-k budget k={k} must be in [1, {n}] (the row length)")
  if coef_k < 1 or num_dense_rows < 0:
    raise ValueError(f"coef_k={coef_k} must be >= 1 and num_dense_rows={num_dense_rows} >= 0")


def lowrank_topk_packed(q: Array, weights: Array, basis: Array, *, scale: float, coef_k: int, k: int,
                        num_dense_rows: int = 1, compute_dtype=jnp.float32, backend: str = "tpu",
                        interpret: bool = False, block_q: int | None = None) -> Array:
  """The predictor's packed mask ``[B, H, ceil(N / 32), N] int32`` (``bitmask`` format) in one pass.

  Args:
    q: raw queries ``[B, N, H, d]``.
    weights: ``query_weights(...)`` ``[B, H, d + 1, m]`` float32 (the offset as the last row).
    basis: the thresholded basis ``[m, N]``, or ``[B, m, N]`` per example (token pruning).
    scale: the logits' scale. coef_k: coefficients kept per row (all when ``>= m``).
    k: keys kept per predicted row, ``1 <= k <= N``.
    num_dense_rows: leading query rows that keep every key (CLS); row ``r`` past them is predicted from
      ``q[:, r]`` (the predictor's row ``r - 1``).
    compute_dtype: the products' input dtype (float32 accumulation).
    backend: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton). interpret: run the kernel in Pallas' interpreter.
    block_q: query rows per grid step (TPU: N, or a multiple of 16, and of 128 below N; default N up to
      N = 512, then 256. GPU: a power of two >= 16, default 16).
  """
  _check(q, weights, basis, coef_k, k, num_dense_rows)
  b, n, h, d = q.shape
  m = weights.shape[-1]
  s = _sizes(n, m, d, backend, block_q)
  dtype = jnp.dtype(compute_dtype)
  kernel_args = dict(sizes=s, scale=float(scale), coef_k=min(coef_k, m), k=k, num_dense_rows=num_dense_rows,
                     unroll=_unroll(backend, interpret))
  call = _tpu_call if backend == "tpu" else _gpu_call
  operands, in_specs, out_shape, out_spec, kernel = call(q, weights, basis, s, dtype, kernel_args)
  packed = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b, h, s.rows_pad // s.rows), in_specs=in_specs, out_specs=out_spec,
      cost_estimate=_cost(b, h, s, coef_k, k, operands, int(np.prod(out_shape.shape)) * 4),
      name="lowrank_topk_mask", **_backend_kwargs(backend, interpret))(*operands)
  if backend == "tpu":
    return packed if s.rows_pad == n else packed[..., :n]
  return jnp.swapaxes(packed[:, :, :n, :s.words], -1, -2)


def _out_shape(shape, like: Array) -> jax.ShapeDtypeStruct:
  """int32 ``shape``; inside shard_map (check_vma) the mask varies over the mesh axes as ``like`` does."""
  return jax.ShapeDtypeStruct(shape, jnp.int32, manual_axis_type=getattr(jax.typeof(like), "mat", None))


def _basis_spec(basis: Array, block) -> pl.BlockSpec:
  """The basis block ``[m_pad, n_pad]``: one for all examples, or per example."""
  if basis.shape[0] > 1:
    return pl.BlockSpec(block, lambda bi, hi, ri: (bi, 0, 0))
  return pl.BlockSpec(block, lambda bi, hi, ri: (0, 0, 0))


def _tpu_call(q, weights, basis, s: _Sizes, dtype, kernel_args):
  """TPU operands as the predictor has them: q ``[B, N, H d]`` read 128 lanes (the block holding the
  head) at a time, where the head dim divides 128 and ``H d`` is a multiple of it; else q heads-first and
  padded as for the GPU (:func:`_operands`), one head per block."""
  b, n, h, d = q.shape
  lane_heads = _LANES // d if _LANES % d == 0 and (h * d) % _LANES == 0 else 0
  basis = _basis_operand(basis, s, dtype)
  if lane_heads:
    qf = q.astype(dtype).reshape(b, n, h * d)
    q_spec = pl.BlockSpec((None, s.rows, _LANES), lambda bi, hi, ri: (bi, ri, jax.lax.div(hi, lane_heads)))
  else:
    qf = _heads_first_q(q, s, dtype)
    q_spec = pl.BlockSpec((None, None, s.rows, d), lambda bi, hi, ri: (bi, hi, ri, 0))
  operands = (qf, weights.astype(jnp.float32), basis)
  in_specs = [q_spec, pl.BlockSpec((None, None, d + 1, s.m), lambda bi, hi, ri: (bi, hi, 0, 0)),
              _basis_spec(basis, (None, s.m_pad, s.n_pad))]
  out_shape = _out_shape((b, h, s.words, s.rows_pad), qf)
  out_spec = pl.BlockSpec((None, None, s.words, s.rows), lambda bi, hi, ri: (bi, hi, 0, ri))
  kernel = functools.partial(_kernel_columns, heads_per_block=max(lane_heads, 1), **kernel_args)
  return operands, in_specs, out_shape, out_spec, kernel


def _gpu_call(q, weights, basis, s: _Sizes, dtype, kernel_args):
  """GPU operands: heads-first, every dimension padded to a power of two (:func:`_operands`)."""
  b, n, h, _ = q.shape
  operands = _operands(q, weights, basis, s, dtype)
  in_specs = [pl.BlockSpec((None, None, s.rows, s.d_pad), lambda bi, hi, ri: (bi, hi, ri, 0)),
              pl.BlockSpec((None, None, s.d_pad, s.m_pad), lambda bi, hi, ri: (bi, hi, 0, 0)),
              pl.BlockSpec((None, None, 1, s.m_pad), lambda bi, hi, ri: (bi, hi, 0, 0)),
              _basis_spec(operands[3], (None, s.m_pad, s.n_pad))]
  out_shape = _out_shape((b, h, s.rows_pad, s.w_pad), operands[0])
  out_spec = pl.BlockSpec((None, None, s.rows, s.w_pad), lambda bi, hi, ri: (bi, hi, ri, 0))
  return operands, in_specs, out_shape, out_spec, functools.partial(_kernel_rows, **kernel_args)


def _unroll(backend: str, interpret: bool) -> bool:
  """Whether the bisection loops of :func:`_topk_keep` are unrolled.

  TPU: unrolled (Mosaic schedules the straight-line steps together). GPU: rolled loops, always, the
  form that is compiled also being the one the interpreted tests run. Pallas' Triton lowering rejects
  ``fori_loop(unroll=True)``; unrolled in Python both forms compile, and for DeiT-S (N = 197, bf16) the
  rolled kernel is 58 KB of PTX with 72 registers per thread against 289 KB and 80 registers unrolled
  (``ptxas -v`` for sm_90a: no spills and 17 KB of shared memory in both), and a loop step (a count
  over a whole row) is long enough that the loop's own overhead does not matter. In the interpreter
  loops also compile faster.
  """
  return backend == "tpu" and not interpret


def _backend_kwargs(backend: str, interpret: bool) -> dict:
  """``pallas_call`` arguments of ``backend``: compiler parameters and the interpreter switch."""
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu   # pylint: disable=g-import-not-at-top
    return dict(compiler_params=pltpu.CompilerParams(
                    dimension_semantics=("parallel", "parallel", "parallel")),
                interpret=pltpu.InterpretParams() if interpret else False)
  from jax.experimental.pallas import triton as pltriton   # pylint: disable=g-import-not-at-top
  return dict(compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1), interpret=interpret)
