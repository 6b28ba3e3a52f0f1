"""The attention mask: one interface for every attention pattern.

A pattern provider (Sparsifiner's learned top-k in ``models.predictor``, the fixed patterns of
``attention.patterns``) returns an :class:`AttentionMask`:

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
  code's multiply-by-mask semantics).
* ``keep`` ``[B|1, H|1, R, N] bool`` or ``None``: the same connectivity as ``indices``, already dense,
  when the provider has it for free (``topk_mask`` computes it with the CPU top-k kernel). Executors that
  want a dense mask use it and the ``indices`` are then never computed (XLA drops the unused TopK).
* ``packed`` ``[B|1, H|1, ceil(N / 32), N] int32`` or ``None``: the same connectivity bit-packed over
  *every* query row, dense rows included (``bitmask``), when the provider made it (the accelerator mask
  kernel). The accelerator attention kernels read it; ``keep`` and ``indices`` are unpacked from it only
  if some consumer asks for them.
* ``table`` ``[B, H, nb, K] int32`` or ``None``, with ``block_size`` (static int, 0 without a table):
  block mode (``attention.blocks``): query block ``i`` keeps the tokens of key blocks ``table[..., i, :]``.
  ``keep`` (its sparse rows) is then the table expanded; the accelerator block kernels read the table.

CLS handling lives here, in one place: the dense leading rows are never part of ``indices``.

The keep budget of every top-k pattern is :func:`budget` (one rule for masks, patterns and FLOPs).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sparsifiner_jax.attention import bitmask, cpu

Array = jax.Array
FILLS = ("neg_inf", "zero_logit")


def budget(keep_rate: float, num_keys: int) -> int:
  """Keys kept per sparse query row: ``k = ceil(rho * N)`` in float64, capped to ``[1, N]``.

  The official code's rule, float rounding included: ``0.14 * 50 = 7.000000000000001`` keeps 8 keys.
  The predictor, the fixed patterns, the FLOPs count and the analytic density all call this function.
  """
  if not 0.0 < keep_rate <= 1.0:
    raise ValueError(f"keep rate {keep_rate} must be in (0, 1]")
  return min(max(math.ceil(keep_rate * num_keys), 1), num_keys)


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
  packed: Array | None = None
  table: Array | None = None
  block_size: int = dataclasses.field(default=0, metadata=dict(static=True))

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

  def packed_rows(self) -> Array:
    """Every query row bit-packed, ``[B|1, H|1, ceil(N / 32), N] int32`` (``bitmask``): ``packed`` when
    given, else ``to_dense()`` packed (so ``key_valid`` is applied as ``to_dense`` applies it)."""
    if self.packed is not None and self.key_valid is None:
      return self.packed
    return bitmask.pack(self.to_dense())

  @property
  def rows_nonempty(self) -> bool:
    """Static: every query row is guaranteed at least one key (no padding, no pruned tokens)."""
    return self.valid is None and self.key_valid is None and self.keys_per_row >= 1

  def logit_bias(self) -> Array:
    """Additive ``[B|1, H|1, N, N]`` float32 bias: 0 where kept, -inf elsewhere (``key_valid`` ignored).

    Same connectivity as ``to_dense``; XLA:CPU fuses a bias add into the softmax better than a select
    on a concatenated boolean mask (~1 ms a DeiT-S layer at batch 8 on a 2-core CPU).
    """
    bias = jnp.where(self.sparse_rows(), 0.0, -jnp.inf).astype(jnp.float32)
    pad = [(0, 0)] * (bias.ndim - 2) + [(self.num_dense_rows, 0), (0, 0)]
    return jnp.pad(bias, pad)

  def nnz(self) -> Array:
    """Kept entries per (batch, head): ``[B|1, H|1]``."""
    if self.key_valid is not None:
      return jnp.sum(self.to_dense(), axis=(-1, -2))
    if self.table is not None:          # from the table alone: no N x N array
      keys = _table_keys(self.table, self.num_keys, self.block_size, self.num_dense_rows)
      return jnp.sum(keys, axis=(-2, -1)) + self.num_dense_rows * self.num_keys
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
    n = self.num_keys
    if self.table is not None and self.key_valid is None:   # one reduction over the table (one XLA op)
      keys = _table_keys(self.table, n, self.block_size, self.num_dense_rows)
      heads = self.table.shape[-3]
      return (jnp.sum(keys, axis=(-3, -2, -1)) / heads + self.num_dense_rows * n) / jnp.float32(n * n)
    return jnp.mean(self.nnz(), axis=-1) / jnp.square(self.live_tokens().astype(jnp.float32))

  def density(self) -> Array:
    """Mean fraction of the (live) attention matrix that is kept (scalar)."""
    return jnp.mean(self.density_per_example())


def _table_keys(table: Array, n: int, block: int, num_dense_rows: int) -> Array:
  """A block mask's kept entries per table entry, ``[..., nb, K]`` int32 from its kept-block ``table [...,
  nb, K]``: the entry's block's tokens (the ragged last block's fewer) times its query block's sparse
  rows (the first block's less the ``num_dense_rows`` dense ones, which keep all ``n`` keys)."""
  nb = table.shape[-2]
  size = jnp.full(nb, block).at[-1].set(n - (nb - 1) * block)            # tokens per block
  return jnp.where(table == nb - 1, size[-1], block) * size.at[0].add(-num_dense_rows)[:, None]


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
  ``cpu.topk_keep_mask`` (a radix select on CPU); the mask is built from it by ``keep_mask``.
  """
  n = scores.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"top-k budget k={k} must be in [1, {n}] (the number of keys)")
  return keep_mask(cpu.topk_keep_mask(scores, k), k, num_dense_rows)


def keep_mask(keep: Array, k: int, num_dense_rows: int = 1) -> AttentionMask:
  """The mask of boolean rows ``keep [B, H, R, N]`` with exactly ``k`` True each (a top-k selection).

  Its ``indices`` are the kept columns in increasing order, derived from ``keep`` (so both forms always
  agree); XLA computes them only if a consumer uses them (the gather executor, density counts, plots).
  Only the indices are taken from ``top_k``: slicing its *values* makes XLA rewrite TopK into a full
  sort.
  """
  _, idx = jax.lax.top_k(keep.astype(jnp.float32), k)   # the k ones; ties -> lowest index first
  return AttentionMask(indices=idx.astype(jnp.int32), num_dense_rows=num_dense_rows,
                       num_keys=keep.shape[-1], keep=keep)



def packed_mask(packed: Array, k: int, num_dense_rows: int = 1) -> AttentionMask:
  """The mask of bit-packed rows ``packed [B, H, ceil(N / 32), N]`` (every query row; the
  ``num_dense_rows`` leading ones keep every key, each other row exactly ``k`` keys): the accelerator
  mask kernel's output. ``keep`` and ``indices`` are unpacked from it, lazily as ``keep_mask`` makes them."""
  n = packed.shape[-1]
  rows = bitmask.unpack(packed[..., num_dense_rows:], n)
  return dataclasses.replace(keep_mask(rows, k, num_dense_rows), packed=packed)
