"""Attention masks and the executors that consume them.

One mask interface serves every attention pattern (Sparsifiner's learned top-k, and later the fixed
patterns of ``sparsifiner_jax.patterns``). A pattern provider returns a :class:`AttentionMask`:

* ``indices`` ``[B|1, H|1, R, K] int32``: for each of the ``R = N - num_dense_rows`` *sparse* query rows,
  the ``K`` key columns it keeps (padded entries are marked invalid by ``valid``);
* ``valid`` ``[B|1, H|1, R, K] bool`` or ``None`` (all ``K`` entries are real);
* ``num_dense_rows`` (static int): the first query rows attend to every key. Sparsifiner keeps the
  CLS query dense, so this is 1 there.
* ``num_keys`` (static int): N, the number of key columns.
* ``key_valid`` ``[B, N] bool`` or ``None``: keys that exist for *every* row, the dense rows included
  (token pruning simulated on a full-length sequence: pruned tokens are removed from all rows).
* ``fill`` (static str): what a masked-out logit becomes. ``"neg_inf"`` (true sparse attention, the
  default) or ``"zero_logit"`` (the logit is set to 0 and keeps weight e^0 -- the official Fibottention
  code's multiply-by-mask semantics, BASELINES.md §1.2).
* ``keep`` ``[B|1, H|1, R, N] bool`` or ``None``: the same connectivity as ``indices``, already dense,
  when the provider has it for free (``topk_mask`` computes it with the CPU top-k kernel). Executors that
  want a dense mask use it and the ``indices`` are then never computed (XLA drops the unused TopK).

CLS handling lives here, in one place: the dense leading rows are never part of ``indices``.

Executors (``EXECUTORS``), all with the same signature ``(q, k, v, mask) -> out`` on ``[B, N, H, d]``
(products in q/v's dtype, logits, softmax and ``out`` in float32 -- ``mixed_einsum``):

* ``auto``   -- the default: the fastest measured per backend. On CPU the C++ sparse-row kernel
  (``kernels.sparse_attention``), elsewhere ``masked``; gradients are ``masked``'s.
* ``dense``  -- plain softmax attention; ignores the mask (the teacher).
* ``masked`` -- the reference: dense logits, ``-inf`` outside the mask, softmax, rows with no kept key
  return 0 (the official code's ``nan_to_num``).
* ``sigmoid`` -- sigmoid attention (weights ``sigmoid(logit - log N)``, not normalised), masked-dense.
* ``sparse`` -- computes only the kept entries: gathers the kept keys/values per row and reduces with
  segment ops (``jax.ops.segment_max``/``segment_sum``) over the flattened edge list, so the work is
  proportional to the number of kept entries, not to N^2.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from sparsifiner_jax import kernels

Array = jax.Array
FILLS = ("neg_inf", "zero_logit")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """Row-sparse attention connectivity; see the module docstring for the layout."""

  indices: Array
  valid: Array | None = None
  num_dense_rows: int = dataclasses.field(default=1, metadata=dict(static=True))
  num_keys: int = dataclasses.field(default=0, metadata=dict(static=True))
  key_valid: Array | None = None
  fill: str = dataclasses.field(default="neg_inf", metadata=dict(static=True))
  keep: Array | None = None

  def __post_init__(self):
    if self.fill not in FILLS:
      raise ValueError(f"unknown mask fill {self.fill!r}; allowed: {FILLS}")

  @property
  def keys_per_row(self) -> int:
    return self.indices.shape[-1]

  def to_dense(self) -> Array:
    """Boolean mask ``[B|1, H|1, N, N]``; dense rows are all True (up to ``key_valid``)."""
    *lead, rows, _ = self.indices.shape
    dense_rows = jnp.ones((*lead, self.num_dense_rows, self.num_keys), bool)
    keep = jnp.concatenate([dense_rows, self.sparse_rows()], axis=-2)
    if self.key_valid is not None:       # pruned tokens are neither keys nor (live) queries
      keep = keep & self.key_valid[:, None, None, :] & self.key_valid[:, None, :, None]
    return keep

  def sparse_rows(self) -> Array:
    """Boolean ``[B|1, H|1, R, N]`` of the sparse rows: ``keep`` when given, else scattered ``indices``."""
    if self.keep is not None:
      return self.keep
    return indices_to_dense(self.indices, self.num_keys, self.valid)

  @property
  def rows_nonempty(self) -> bool:
    """Static: every query row is guaranteed at least one key (no padding, no pruned tokens)."""
    return self.valid is None and self.key_valid is None and self.keys_per_row >= 1

  def logit_bias(self) -> Array:
    """Additive ``[B|1, H|1, N, N]`` float32 bias: 0 where kept, -inf elsewhere (``key_valid`` ignored).

    Same connectivity as ``to_dense``; XLA:CPU fuses a bias add into the softmax better than a select
    on a concatenated boolean mask (~1 ms a DeiT-S layer at batch 8, BENCHMARKS.md).
    """
    bias = jnp.where(self.sparse_rows(), 0.0, -jnp.inf).astype(jnp.float32)
    pad = [(0, 0)] * (bias.ndim - 2) + [(self.num_dense_rows, 0), (0, 0)]
    return jnp.pad(bias, pad)

  def nnz(self) -> Array:
    """Kept entries per (batch, head): ``[B|1, H|1]``."""
    if self.key_valid is not None:
      return jnp.sum(self.to_dense(), axis=(-1, -2))
    per_sparse = (jnp.sum(self.valid, axis=(-1, -2)) if self.valid is not None
                  else jnp.full(self.indices.shape[:-2], self.indices.shape[-2] * self.keys_per_row))
    return per_sparse + self.num_dense_rows * self.num_keys

  def live_tokens(self) -> Array:
    """Tokens taking part (N, or the unpruned ones under ``key_valid``): ``[B|1]``."""
    if self.key_valid is None:
      return jnp.full(self.indices.shape[:1], self.num_keys)
    return jnp.sum(self.key_valid, axis=-1)

  def density_per_example(self) -> Array:
    """Kept fraction of each example's live ``N_l x N_l`` attention matrix, head mean: ``[B|1]``."""
    return jnp.mean(self.nnz(), axis=-1) / jnp.square(self.live_tokens().astype(jnp.float32))

  def density(self) -> Array:
    """Mean fraction of the (live) attention matrix that is kept (scalar)."""
    return jnp.mean(self.density_per_example())


def indices_to_dense(indices: Array, n: int, valid: Array | None = None) -> Array:
  """Scatters ``indices [..., R, K]`` into a boolean ``[..., R, n]`` (exactly the listed columns)."""
  lead = indices.shape[:-1]
  flat_idx = indices.reshape(-1, indices.shape[-1])
  upd = (jnp.ones(flat_idx.shape, bool) if valid is None
         else jnp.broadcast_to(valid, indices.shape).reshape(flat_idx.shape))
  rows = jnp.arange(flat_idx.shape[0])[:, None]
  out = jnp.zeros((flat_idx.shape[0], n), bool).at[rows, flat_idx].max(upd)
  return out.reshape(*lead, n)


def topk_mask(scores: Array, k: int, num_dense_rows: int = 1) -> AttentionMask:
  """Keeps the ``k`` highest ``scores [B, H, R, N]`` per row (ties: lowest index first).

  ``R`` are the sparse query rows (the dense leading rows are not scored). The selection is
  ``kernels.topk_keep_mask`` (a radix select on CPU); the mask is built from it by ``keep_mask``.
  """
  n = scores.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"top-k budget k={k} must be in [1, {n}] (the number of keys)")
  return keep_mask(kernels.topk_keep_mask(scores, k), k, num_dense_rows)


def keep_mask(keep: Array, k: int, num_dense_rows: int = 1) -> AttentionMask:
  """The mask of boolean rows ``keep [B, H, R, N]`` with exactly ``k`` True each (a top-k selection).

  Its ``indices`` are the kept columns in increasing order, derived from ``keep`` (so both forms always
  agree); XLA computes them only if a consumer uses them (the gather executor, density counts, plots).
  Only the indices are taken from ``top_k``: slicing its *values* makes XLA rewrite TopK into a full
  sort (ENVIRONMENT.md §4b).
  """
  _, idx = jax.lax.top_k(keep.astype(jnp.float32), k)   # the k ones; ties -> lowest index first
  return AttentionMask(indices=idx.astype(jnp.int32), num_dense_rows=num_dense_rows,
                       num_keys=keep.shape[-1], keep=keep)


# --------------------------------------------------------------------------------------------------
# Executors. q, k, v: [B, N, H, d] (the layout of the fused qkv projection); out: [B, N, H, d] float32.


def mixed_einsum(spec: str, a: Array, b: Array, dtype) -> Array:
  """``jnp.einsum`` of ``a`` and ``b`` cast to ``dtype``, accumulated and returned in float32.

  The models' mixed-precision rule for every matmul (``matmul_kwargs``): inputs in the compute dtype,
  products in float32. On XLA:CPU only bf16 dots that *return* float32 take the AMX path (about 6x a
  float32 dot); bf16 -> bf16 dots are slower than float32 ones (BENCHMARKS.md). Below float32 the
  backward pass follows the same rule: the incoming float32 cotangent is rounded to ``dtype`` and both
  gradient products are ``dtype`` x ``dtype`` -> float32 (JAX's own rule would multiply the float32
  cotangent with the bf16 operand, i.e. upcast and run every backward matmul in float32). ``spec``: two
  operands, no repeated or operand-only-summed indices.
  """
  a, b = a.astype(dtype), b.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  return _low_precision_einsum(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec: str, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_precision_einsum_fwd(spec, a, b):
  return _low_precision_einsum(spec, a, b), (a, b)


def _low_precision_einsum_bwd(spec, res, ct):
  a, b = res
  operands, out = spec.replace(" ", "").split("->")
  sa, sb = operands.split(",")
  if not set(sa) <= set(out) | set(sb) or not set(sb) <= set(out) | set(sa):
    raise ValueError(f"mixed_einsum: {spec!r} sums an index within one operand; not supported")
  ct = ct.astype(a.dtype)
  da = jnp.einsum(f"{out},{sb}->{sa}", ct, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{out},{sa}->{sb}", ct, a, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def mixed_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None, out_sharding=None) -> Array:
  """``lax.dot_general`` as a :func:`mixed_einsum` in ``lhs.dtype`` (the ``dot_general`` of the models'
  ``nnx.Linear`` layers, so their backward products stay in the compute dtype too)."""
  del precision, preferred_element_type
  if out_sharding is not None:
    raise ValueError("mixed_dot_general: out_sharding is not supported")
  (lc, rc), (lb, rb) = dimension_numbers
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  sl, sr = [""] * lhs.ndim, [""] * rhs.ndim
  for i, j in (*zip(lb, rb), *zip(lc, rc)):
    sl[i] = sr[j] = next(letters)
  sl = [c or next(letters) for c in sl]
  sr = [c or next(letters) for c in sr]
  out = ([sl[i] for i in lb] + [c for i, c in enumerate(sl) if i not in (*lb, *lc)]
         + [c for j, c in enumerate(sr) if j not in (*rb, *rc)])
  return mixed_einsum(f"{''.join(sl)},{''.join(sr)}->{''.join(out)}", lhs, rhs, lhs.dtype)


def matmul_kwargs(dtype_name) -> dict:
  """``nnx.Linear``/``nnx.Conv`` precision arguments: float32 parameters, inputs cast to the compute dtype,
  products accumulated and returned in float32 -- in the backward pass too (``mixed_einsum``)."""
  return dict(dtype=jnp.dtype(dtype_name), param_dtype=jnp.float32,
              preferred_element_type=jnp.float32)


def linear_kwargs(dtype_name) -> dict:
  """``matmul_kwargs`` plus the ``dot_general`` that keeps a Linear's backward products in the compute dtype."""
  return dict(matmul_kwargs(dtype_name), dot_general=mixed_dot_general)


def heads_first(t: Array) -> Array:
  """``[B, N, H, d] -> [B, H, N, d]``: XLA:CPU runs the attention matmuls much faster in this layout."""
  return jnp.swapaxes(t, 1, 2)


def attention_logits(q: Array, k: Array) -> Array:
  """Scaled dot-product logits ``[B, H, N, N]`` float32 (scale d^-1/2; products in ``q.dtype``)."""
  scale = q.shape[-1] ** -0.5
  return mixed_einsum("bhqd,bhkd->bhqk", heads_first(q * scale), heads_first(k), q.dtype)


def attention_probs(q: Array, k: Array) -> Array:
  """Dense (unmasked) attention probabilities ``[B, H, N, N]`` in float32."""
  return jax.nn.softmax(attention_logits(q, k), axis=-1)


def weighted_values(probs: Array, v: Array) -> Array:
  """``probs [B, H, N, N] @ v``, with ``v`` and the result (float32) in the ``[B, N, H, d]`` layout."""
  return heads_first(mixed_einsum("bhqk,bhkd->bhqd", probs, heads_first(v), v.dtype))


def softmax_attention(q: Array, k: Array, v: Array, key_valid: Array | None = None) -> Array:
  """Dense softmax attention ``[B, N, H, d] -> [B, N, H, d]``, optionally over the ``key_valid [B, N]``
  keys only. Heads-first einsums: on XLA:CPU about 2x faster than ``jax.nn.dot_product_attention`` for
  DeiT-S shapes (BENCHMARKS.md); equal to it to float rounding."""
  logits = attention_logits(q, k)
  if key_valid is not None:
    logits = jnp.where(key_valid[:, None, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  return weighted_values(probs, v)


def dense_attention(q: Array, k: Array, v: Array, mask: AttentionMask | None = None) -> Array:
  del mask
  return softmax_attention(q, k, v)


def masked_attention(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> Array:
  if mask is None:
    return dense_attention(q, k, v)
  logits = attention_logits(q, k)
  if mask.fill == "neg_inf" and mask.rows_nonempty:      # fast path: no row can be empty
    probs = jax.nn.softmax(logits + mask.logit_bias(), axis=-1)
    return weighted_values(probs, v)
  keep = mask.to_dense()
  logits = jnp.where(keep, logits, -jnp.inf if mask.fill == "neg_inf" else 0.0)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  probs = jnp.where(denom > 0, p / jnp.where(denom > 0, denom, 1.0), 0.0)  # all-masked rows -> 0
  return weighted_values(probs, v)


def sparse_attention(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> Array:
  """Computes only the kept entries: per-row gathers, then segment softmax over the edge list."""
  if mask is None:
    return dense_attention(q, k, v)
  if mask.fill != "neg_inf":          # every key takes part: nothing to skip
    return masked_attention(q, k, v, mask)
  b, n, h, d = q.shape
  nd = mask.num_dense_rows
  out_dense = None
  if nd:
    key_mask = None if mask.key_valid is None else mask.key_valid[:, None, None, :]
    out_dense = jax.nn.dot_product_attention(q[:, :nd], k, v, mask=key_mask).astype(jnp.float32)

  idx = jnp.broadcast_to(mask.indices, (b, h, n - nd, mask.keys_per_row))
  kk = idx.shape[-1]
  qs = jnp.transpose(q[:, nd:], (0, 2, 1, 3))              # [B, H, R, d]
  kt = jnp.transpose(k, (0, 2, 1, 3))                      # [B, H, N, d]
  vt = jnp.transpose(v, (0, 2, 1, 3))
  gather = jax.vmap(jax.vmap(lambda t, i: t[i]))           # [N, d], [R, K] -> [R, K, d]
  k_sel, v_sel = gather(kt, idx), gather(vt, idx)          # [B, H, R, K, d]
  logits = mixed_einsum("bhrd,bhrkd->bhrk", qs * d ** -0.5, k_sel, q.dtype)
  valid = None if mask.valid is None else jnp.broadcast_to(mask.valid, logits.shape)
  if mask.key_valid is not None:
    kv = jax.vmap(lambda row, i: row[i])(mask.key_valid, idx.reshape(b, -1)).reshape(idx.shape)
    valid = kv if valid is None else valid & kv
  if valid is not None:
    logits = jnp.where(valid, logits, -jnp.inf)

  # Segment softmax over the flattened edge list: one segment per (b, h, row).
  num_seg = b * h * (n - nd)
  seg = jnp.repeat(jnp.arange(num_seg), kk)
  flat = logits.reshape(-1)
  seg_max = jax.ops.segment_max(flat, seg, num_segments=num_seg, indices_are_sorted=True)
  seg_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(seg_max), seg_max, 0.0))
  p = jnp.exp(flat - seg_max[seg])
  denom = jax.ops.segment_sum(p, seg, num_segments=num_seg, indices_are_sorted=True)
  w = p / jnp.where(denom > 0, denom, 1.0)[seg]
  weighted = w[:, None] * v_sel.reshape(-1, d).astype(jnp.float32)
  out = jax.ops.segment_sum(weighted, seg, num_segments=num_seg, indices_are_sorted=True)
  out = jnp.transpose(out.reshape(b, h, n - nd, d), (0, 2, 1, 3))
  return out if out_dense is None else jnp.concatenate([out_dense, out], axis=1)


def auto_attention(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> Array:
  """The fastest executor measured per backend (BENCHMARKS.md): on CPU the sparse-row kernel
  (``kernels.sparse_attention``: only kept entries, about 3x faster than dense attention at keep 0.25
  for DeiT-S) and its backward kernel over the same kept entries, elsewhere ``masked``.
  Masks with ``key_valid`` (simulated token pruning) or ``fill="zero_logit"`` take ``masked`` everywhere."""
  if mask is None:
    return dense_attention(q, k, v)
  if mask.fill != "neg_inf" or mask.key_valid is not None:
    return masked_attention(q, k, v, mask)
  nd = mask.num_dense_rows

  def reference(q, k, v, keep):
    return masked_attention(q, k, v, dataclasses.replace(mask, keep=keep))

  return kernels.sparse_attention(q, k, v, mask.sparse_rows(), num_dense_rows=nd,
                                  scale=q.shape[-1] ** -0.5, reference=reference)


Executor = Callable[[Array, Array, Array, AttentionMask | None], Array]
EXECUTORS: dict[str, Executor] = {
    "auto": auto_attention,
    "dense": dense_attention,
    "masked": masked_attention,
    "sparse": sparse_attention,
}


def get_executor(name: str) -> Executor:
  if name not in EXECUTORS:
    raise ValueError(f"unknown attention executor {name!r}; allowed: {sorted(EXECUTORS)}")
  return EXECUTORS[name]


# --------------------------------------------------------------------------------------------------
# Sigmoid attention (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid
# Self-Attention", arXiv 2409.04431): a drop-in replacement for the softmax.


def sigmoid_attention(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> Array:
  """Sigmoid attention: ``out = sum_j sigmoid(l_ij + b) v_j`` with ``b = -log(N)``.

  Each weight is an independent sigmoid of its scaled logit ``l_ij = q_i . k_j / sqrt(d)``; rows are not
  normalised. The bias ``b = -log(N)`` (N = number of keys) keeps the initial row sums near 1, as the
  paper recommends. Masked-out entries get weight 0 (``fill="neg_inf"``) or, with ``fill="zero_logit"``,
  the weight of a zero logit ``sigmoid(b) = 1 / (1 + N)``; ``mask=None`` is dense. Computed masked-dense
  (``[B, H, N, N]`` weights), in float32.

  Args:
    q, k, v: ``[B, N, H, d]``.
    mask: an :class:`AttentionMask` or None.

  Returns:
    ``[B, N, H, d]`` float32.
  """
  logits = attention_logits(q, k)
  if mask is not None:
    logits = jnp.where(mask.to_dense(), logits, -jnp.inf if mask.fill == "neg_inf" else 0.0)
  weights = jax.nn.sigmoid(logits - jnp.log(jnp.float32(k.shape[1])))
  return mixed_einsum("bhqk,bkhd->bqhd", weights, v, v.dtype)


EXECUTORS["sigmoid"] = sigmoid_attention
