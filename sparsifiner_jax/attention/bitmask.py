"""Bit-packed attention masks: the format the accelerator kernels exchange instead of ``[B, H, N, N]`` bools.

``packed [B|1, H|1, W, N_q] int32`` with ``W = ceil(N_k / 32)``, word-major: bit ``j`` of word ``w`` of
query ``i`` (``packed[..., w, i]``) is set when query ``i`` keeps key ``32 w + j``. Queries are the minor
axis so that the array is compact in TPU memory, whose tiles are 8 x 128 (a query-major ``[N_q, W]``
array would pad its few words to 128 lanes). Every query is covered, the dense leading rows (CLS)
included, so a kernel never needs to know which rows are dense. Bits past ``N_k`` are 0. For DeiT-S
(N = 197) a head's mask is 7 x 197 words (5.5 KB) instead of 197 x 197 bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
BITS = 32


def words(num_keys: int) -> int:
  """Words per query: ``ceil(num_keys / 32)``."""
  return -(-num_keys // BITS)


def pack(keep: Array) -> Array:
  """``keep [..., N_q, N_k] bool`` -> ``[..., ceil(N_k / 32), N_q] int32``."""
  n = keep.shape[-1]
  w = words(n)
  padded = jnp.pad(keep, [(0, 0)] * (keep.ndim - 1) + [(0, w * BITS - n)])
  bits = padded.reshape(*keep.shape[:-1], w, BITS).astype(jnp.uint32)
  shifts = jnp.arange(BITS, dtype=jnp.uint32)
  rows = jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32).astype(jnp.int32)   # [..., N_q, W]
  return jnp.swapaxes(rows, -1, -2)


def unpack(packed: Array, num_keys: int) -> Array:
  """Inverse of :func:`pack`: ``[..., W, N_q] int32`` -> ``[..., N_q, num_keys] bool``."""
  shifts = jnp.arange(BITS, dtype=jnp.uint32)
  rows = jnp.swapaxes(packed, -1, -2).astype(jnp.uint32)
  bits = (rows[..., None] >> shifts) & 1
  return bits.reshape(*rows.shape[:-1], -1)[..., :num_keys].astype(bool)


def pack_rows(sparse_rows: Array, num_dense_rows: int) -> Array:
  """The packed mask of every query from the sparse rows ``[B|1, H|1, R, N]`` of an ``AttentionMask``
  (``mask.sparse_rows()``): the ``num_dense_rows`` leading queries keep every key."""
  *lead, _, n = sparse_rows.shape
  dense = jnp.ones((*lead, num_dense_rows, n), bool)
  return pack(jnp.concatenate([dense, sparse_rows.astype(bool)], axis=-2))
