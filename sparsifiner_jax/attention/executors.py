"""Attention executors (``EXECUTORS``): ways to compute ``(q, k, v, mask) -> out`` on ``[B, N, H, d]``
(products in q/v's dtype, logits, softmax and ``out`` in float32 -- ``precision.mixed_einsum``):

* ``auto``   -- the default: the fastest per backend. On CPU the C++ sparse-row kernel
  (``cpu.sparse_row_attention``) and its backward kernel over the same kept entries; on TPU and GPU the
  fused Pallas kernel (``pallas.attention``: flash-style, the mask applied on chip, forward and backward)
  run per batch shard; ``masked`` where neither applies.
* ``dense``  -- plain softmax attention in XLA; ignores the mask.
* ``fused``  -- the Pallas kernel, on TPU and GPU only: over the mask's packed rows, or dense (a model
  without a mask) with no mask read at all.
* ``gather`` -- computes only the kept entries, in XLA: gathers the kept keys/values per row and reduces
  with segment ops (``jax.ops.segment_max``/``segment_sum``) over the flattened edge list, so the work is
  proportional to the number of kept entries, not to N^2.
* ``masked`` -- the reference: dense logits, ``-inf`` outside the mask, softmax, rows with no kept key
  return 0 (the official code's ``nan_to_num``).
* ``sigmoid`` -- sigmoid attention (weights ``sigmoid(logit - log N)``, not normalised), masked-dense.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from sparsifiner_jax import sharding
from sparsifiner_jax.attention import backend, bitmask, cpu
from sparsifiner_jax.attention.mask import AttentionMask
from sparsifiner_jax.attention.pallas import attention as pallas_attention
from sparsifiner_jax.attention.pallas import block_sparse as pallas_block_sparse
from sparsifiner_jax.precision import mixed_einsum

Array = jax.Array

# Tokens from which the fused dense kernel runs a model without a mask (the dense model, the teacher)
# under ``auto``, per platform: where the clock says it beats XLA's attention (BENCHMARKS.md: on v5e,
# DeiT-S bf16 eval, 0.66x XLA's time at 197 tokens and 0.81x at 785; shorter sequences were not
# measured). GPU: no clock, so XLA's attention.
FUSED_DENSE_MIN_TOKENS = {"tpu": 197, "gpu": 10 ** 9}


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


def gather_attention(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> Array:
  """The ``gather`` executor: only the kept entries, in XLA: per-row gathers of k and v, then a segment
  softmax over the edge list. ``[B, N, H, d] -> [B, N, H, d]`` float32."""
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
  """The fastest executor per backend (``backend.target()``; BENCHMARKS.md):

  * TPU, GPU: the fused Pallas kernel over the mask's packed rows (``fill="neg_inf"`` masks; simulated
    token pruning is folded into the packed rows), per batch shard;
  * CPU: the sparse-row kernel (``cpu.sparse_row_attention``: only kept entries, about 3x faster than
    dense attention at keep 0.25 for DeiT-S) and its backward kernel over the same kept entries;
  * ``masked`` otherwise (``fill="zero_logit"``; ``key_valid`` on CPU; ``SPARSIFINER_JAX_PALLAS=0``).
  """
  if mask is None:
    return dense_attention(q, k, v)
  if mask.fill != "neg_inf":
    return masked_attention(q, k, v, mask)
  if backend.pallas_enabled():
    return fused_attention(q, k, v, mask)
  if mask.key_valid is not None:
    return masked_attention(q, k, v, mask)
  nd = mask.num_dense_rows

  def reference(q, k, v, keep):
    return masked_attention(q, k, v, dataclasses.replace(mask, keep=keep))

  return cpu.sparse_row_attention(q, k, v, mask.sparse_rows(), num_dense_rows=nd,
                                  scale=q.shape[-1] ** -0.5, reference=reference)


def fused_attention(q: Array, k: Array, v: Array, mask: AttentionMask) -> Array:
  """``masked_attention`` as one Pallas kernel for ``backend.target()``'s accelerator (interpreted when
  the target says so), run on each device's slice of the batch: ``[B, N, H, d]`` float32. A block-mode
  mask (``mask.table``) runs the block kernels, which load kept blocks only."""
  if mask.table is not None and mask.key_valid is None:
    return block_attention(q, k, v, mask)
  target = backend.target()
  packed = mask.packed_rows()

  def run(q, k, v, packed):
    return pallas_attention.flash_attention(q, k, v, packed, scale=q.shape[-1] ** -0.5,
                                             backend=target.platform, interpret=target.interpret)

  return sharding.per_batch_shard(run, (q, k, v, packed), (True, True, True, packed.shape[0] > 1))


def block_attention(q: Array, k: Array, v: Array, mask: AttentionMask) -> Array:
  """A block-mode mask (``mask.table``, ``attention.blocks``) on the Pallas block kernels, per batch
  shard, the dense leading rows (CLS) included. ``[B, N, H, d]`` float32."""
  target = backend.target()

  def run(q, k, v, table):
    return pallas_block_sparse.block_sparse_attention(
        q, k, v, table, block=mask.block_size, scale=q.shape[-1] ** -0.5,
        dense_rows=mask.num_dense_rows, first_zero=True, backend=target.platform, interpret=target.interpret)

  table = mask.table
  return sharding.per_batch_shard(run, (q, k, v, table), (True, True, True, table.shape[0] > 1))


def fused_dense_attention(q: Array, k: Array, v: Array, key_valid: Array | None = None) -> Array:
  """``softmax_attention`` as the Pallas kernel for ``backend.target()``'s accelerator, per batch shard:
  no mask read and no bits expanded; with ``key_valid [B, N]`` (token pruning) the kept keys travel as
  one packed row per example, broadcast over heads and queries. On TPU, without ``key_valid`` and where
  a head group's sequence fits in VMEM, the resident block kernels with every block kept (the faster by
  the clock: ``block_sparse.resident_dense_fits``); where only their forward fits, the flash kernel's
  gradient (recomputed), which beats the per-block grid's. ``[B, N, H, d]`` float32."""
  target = backend.target()

  def flash(q, k, v, *packed):
    return pallas_attention.flash_attention(q, k, v, packed[0] if packed else None,
                                             scale=q.shape[-1] ** -0.5, backend=target.platform,
                                             interpret=target.interpret)

  def per_shard(fn):
    return lambda q, k, v: sharding.per_batch_shard(fn, (q, k, v), (True, True, True))

  if (key_valid is None and target.platform == "tpu"
      and pallas_block_sparse.resident_dense_fits(q.shape, q.dtype)):
    table = pallas_block_sparse.dense_table(q.shape[1], q.shape[2])

    def resident(q, k, v):
      return pallas_block_sparse.block_sparse_attention(
          q, k, v, table, block=pallas_block_sparse.DENSE_BLOCK, scale=q.shape[-1] ** -0.5, backend="tpu",
          interpret=target.interpret)
    if pallas_block_sparse.resident_dense_fits(q.shape, q.dtype, backward=True):
      return per_shard(resident)(q, k, v)
    return _with_gradient_of(per_shard(resident), per_shard(flash))(q, k, v)

  if key_valid is None:
    return per_shard(flash)(q, k, v)
  row = bitmask.pack(key_valid[:, None, None, :])                         # [B, 1, W, 1]
  packed = jnp.broadcast_to(row, (*row.shape[:3], q.shape[1]))
  return sharding.per_batch_shard(flash, (q, k, v, packed), (True,) * 4)


def _with_gradient_of(forward, other):
  """``forward(q, k, v)``'s values with ``other``'s gradient (``other`` recomputed in the backward): two
  implementations of one function."""
  @jax.custom_vjp
  def fn(q, k, v):
    return forward(q, k, v)

  def fn_fwd(q, k, v):
    return forward(q, k, v), (q, k, v)

  def fn_bwd(residuals, cotangent):
    return jax.vjp(other, *residuals)[1](cotangent)

  fn.defvjp(fn_fwd, fn_bwd)
  return fn


def unmasked_attention(q: Array, k: Array, v: Array, key_valid: Array | None, executor: str) -> Array:
  """Attention of a layer without a mask (a dense model, the teacher) on ``executor``: the fused kernel
  under ``fused``, and under ``auto`` on an accelerator from ``FUSED_DENSE_MIN_TOKENS`` tokens; XLA's
  ``softmax_attention`` otherwise."""
  platform = backend.target().platform
  fused = backend.pallas_enabled() and (
      executor == "fused" or executor == "auto" and q.shape[1] >= FUSED_DENSE_MIN_TOKENS.get(platform, 0))
  return fused_dense_attention(q, k, v, key_valid) if fused else softmax_attention(q, k, v, key_valid)


def fused_masked_attention(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> Array:
  """The ``fused`` executor: the Pallas kernel (TPU, GPU), over the mask or without one."""
  if not backend.pallas_enabled():
    raise ValueError("the 'fused' executor runs the Pallas kernels, on TPU and GPU only; on "
                     f"{backend.target().platform} use 'auto'")
  if mask is None:
    return fused_dense_attention(q, k, v)
  if mask.fill != "neg_inf":
    raise ValueError(f"the 'fused' executor takes masks with fill='neg_inf', not {mask.fill!r}")
  return fused_attention(q, k, v, mask)


Executor = Callable[[Array, Array, Array, AttentionMask | None], Array]
EXECUTORS: dict[str, Executor] = {
    "auto": auto_attention,
    "dense": dense_attention,
    "fused": fused_masked_attention,
    "gather": gather_attention,
    "masked": masked_attention,
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
