"""Block-level attention connectivity (block mode, ``ViTConfig.mask_block = b > 0``).

The sequence of ``N`` tokens is cut into ``nb = ceil(N / b)`` blocks of ``b`` consecutive tokens (the last
one ragged when ``b`` does not divide ``N``). Each head and query block keeps ``K`` key blocks, listed in

* ``table [B, H, nb, K] int32``: the kept key blocks of each query block, increasing, all distinct.
  Key block 0 (which holds the CLS key) is always among them.

The block kernels (``pallas.block_sparse``) run their grid over this table, so a skipped block is never
loaded; their backward runs over the transposed table (``transpose``). The dense CLS row is not part of
the table: the executors compute it apart (``AttentionMask.num_dense_rows``).

Everything here is plain XLA on small arrays (``[.., nb, nb]`` or ``[.., nb, K]``): the selection never
touches an ``N x N`` array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsifiner_jax.attention import mask as mask_lib

Array = jax.Array


def count(n: int, block: int) -> int:
  """Blocks of ``block`` tokens covering ``n`` tokens: ``ceil(n / block)``."""
  return -(-n // block)


def budget(keep_rate: float, n: int, block: int) -> int:
  """Key blocks kept per query block: ``mask.budget`` over the ``count(n, block)`` blocks (the CLS
  block included), so at least one."""
  return mask_lib.budget(keep_rate, count(n, block))


def block_sizes(n: int, block: int) -> Array:
  """Tokens in each block ``[nb]`` float32: ``block``, the last one ``n - (nb - 1) block``."""
  starts = jnp.arange(count(n, block)) * block
  return (jnp.minimum(starts + block, n) - starts).astype(jnp.float32)


def membership(n: int, block: int, dtype=jnp.float32) -> Array:
  """``[N, nb]``: 1 where token ``i`` lies in block ``j``, else 0."""
  return ((jnp.arange(n)[:, None] // block) == jnp.arange(count(n, block))[None, :]).astype(dtype)


def pool(x: Array, block: int, axis: int, *, mean: bool) -> Array:
  """Sums (or means, over the real tokens of a ragged last block) of ``x`` over blocks of ``block``
  entries along ``axis``: that axis goes from ``N`` to ``count(N, block)``. float32.

  One product with the ``[N, nb]`` ``membership`` matrix (full float32 precision; a mean divides the sums
  after): on a TPU it reads ``x`` once on the MXU, where a padded reshape and a reduction would copy it
  in float32 first."""
  n = x.shape[axis]
  pooled = jnp.tensordot(x.astype(jnp.float32), membership(n, block), axes=([axis], [0]),
                         precision=jax.lax.Precision.HIGHEST)
  if mean:
    pooled = pooled / block_sizes(n, block)
  return jnp.moveaxis(pooled, -1, axis)


def attention_mass(attn: Array, block: int) -> Array:
  """Block mass of an attention matrix ``attn [..., N, N]`` (rows sum to 1): ``[..., nb, nb]``, the mean
  over each query block's rows of the probability each key block receives (rows still sum to 1). The
  reconstruction target of block mode."""
  return pool(pool(attn, block, -1, mean=False), block, -2, mean=True)


def select(scores: Array, k: int) -> Array:
  """The kept-block table ``[B, H, nb, k] int32`` from block scores ``[B, H, nb, nb]``: per row the
  ``k`` highest-scoring key blocks (ties: lowest index), key block 0 always kept, increasing."""
  nb = scores.shape[-1]
  if not 1 <= k <= nb:
    raise ValueError(f"block budget k={k} must be in [1, {nb}] (the number of key blocks)")
  forced = jnp.where(jnp.arange(nb) == 0, jnp.inf, jax.lax.stop_gradient(scores).astype(jnp.float32))
  _, idx = jax.lax.top_k(forced, k)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def to_block_keep(table: Array, nb: int) -> Array:
  """``table [..., R, K]`` -> boolean ``[..., R, nb]``: which key blocks each query block keeps."""
  return jnp.any(table[..., :, :, None] == jnp.arange(nb), axis=-2)


def expand(table: Array, n: int, block: int) -> Array:
  """Token-level keep ``[..., N, N]`` bool of a kept-block ``table [..., nb, K]`` (rows of query block
  ``i`` keep every token of its key blocks; the ragged last block only its real tokens)."""
  nb = count(n, block)
  keep = to_block_keep(table, nb)                                        # [..., nb, nb]
  token_block = jnp.arange(n) // block
  return keep[..., token_block, :][..., token_block]


def transpose(table: Array, nb: int) -> tuple[Array, Array]:
  """The backward's table: for each key block, the query blocks that keep it.

  Returns ``(rows [..., nb, nb] int32, counts [..., nb] int32)``: ``rows[..., j, :counts[j]]`` are the
  query blocks keeping key block ``j``, increasing; the entries past the count repeat the last real one
  (a kernel stepping through them re-reads the same block, so nothing new is loaded), or 0 when no
  query block keeps it.
  """
  kept_by = jnp.swapaxes(to_block_keep(table, nb), -1, -2)               # [..., key block, query block]
  counts = jnp.sum(kept_by, axis=-1).astype(jnp.int32)
  order = jnp.argsort(~kept_by, axis=-1, stable=True).astype(jnp.int32)  # kept ones first, increasing
  last = jnp.maximum(counts - 1, 0)[..., None]
  step = jnp.minimum(jnp.arange(nb, dtype=jnp.int32), last)
  return jnp.take_along_axis(order, step, axis=-1), counts


def block_mask(table: Array, num_keys: int, block: int, num_dense_rows: int = 1) -> mask_lib.AttentionMask:
  """The ``AttentionMask`` of a kept-block ``table [B, H, nb, K]`` over ``num_keys`` tokens: the sparse
  rows (after the ``num_dense_rows`` dense ones) keep the tokens of their block's table row. ``keep``,
  ``indices`` (at most ``K * block`` per row, the rest marked invalid) are derived lazily, as
  ``mask.keep_mask`` derives them: XLA computes them only if a consumer uses them."""
  keep = expand(table, num_keys, block)[..., num_dense_rows:, :]
  width = min(table.shape[-1] * block, num_keys)
  _, idx = jax.lax.top_k(keep.astype(jnp.float32), width)       # kept columns first, increasing
  valid = jnp.take_along_axis(keep, idx, axis=-1)
  return mask_lib.AttentionMask(indices=idx.astype(jnp.int32), valid=valid, num_dense_rows=num_dense_rows,
                                num_keys=num_keys, keep=keep, table=table, block_size=block)
