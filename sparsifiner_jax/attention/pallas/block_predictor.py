"""Block mode's predictor projections, on TPU in one kernel that reads q and k where the qkv projection
wrote them.

The block-mode predictor (``models.predictor``, docs/attention.md) scores (query block, key block) pairs
from two small projections per example and head:

* ``K̂ᵀ = (Pᵀ k) W_k + (1ᵀ P)ᵀ b_k`` ``[m, c]``: the keys down-projected over tokens by ``P [N, m]`` (the
  learned ``proj_n``), then over features by ``W_k [d, c]``;
* ``q_r = q̄ W_q + b_q`` ``[nb, c]``: each query block's mean q, projected by ``W_q [d, c]``.

Both contract the token axis of q and k. As XLA products they made XLA on TPU copy the whole qkv output
with the token axis minor, and their small ``m``/``c`` minor axes cost layout copies of their own. Here
one grid step per example reads its q and k ``[N, H d]`` in place; the keys' token product is a plain
MXU product with the constant ``Pᵀ [m, N]``, the block means of q sums on the vector unit, and the per-head
feature projections one product each with a block-diagonal ``[H d, H c]`` copy of ``W_k`` or ``W_q``, so
every result keeps the heads on the lanes.

In sparse mode ``table(...)`` goes on in the same pass to the kept-block table (``attention.blocks``):
logits ``q_r K̂``, their softmax cut to the top ``coef_k``, block scores against the pooled basis, the top
``keep`` key blocks per query block (block 0 forced). In XLA those steps are some 15 small ops per layer,
each a microsecond or two (DeiT-S on v5e by the clock: 0.31 ms of the forward at 224 px, against the
0.07 ms the table adds to the kernel). Where the logits outgrow the vector registers (3,137 tokens) the
kernel's picks cost more than XLA's selection, which then stays (``table_applies``).

``projections(qkv, proj_n, w_k, b_k, w_q, b_q, block=b, dtype=...)`` -> ``(q_r [B, nb, H, c],
k_hat [B, m, H, c])`` in ``dtype`` (their consumer, the logits' product in ``dtype``, would round them
anyway); products in ``dtype`` (operands rounded to it, float32 accumulation, biases added in float32),
the pooling in float32. ``reference`` is the same in XLA (any backend; per-example ``P`` for token
sparsity), and its gradient is the kernel's (only the reconstruction phase, which trains the predictor,
takes one).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsifiner_jax import sharding
from sparsifiner_jax.attention import backend, blocks
from sparsifiner_jax.attention.pallas.common import (F32, NT, lane_masks, nbytes, next_pow2, out_struct,
                                                     round_up, same_vma, whole_in_vmem)
from sparsifiner_jax.precision import mixed_einsum

Array = jax.Array


def applies(qkv: Array, proj_n: Array) -> bool:
  """Whether the kernel runs for ``qkv [B, N, 3, H, d]`` and ``proj_n [1|B, N, m]`` here: Pallas on TPU,
  one ``P`` for the batch (no token sparsity), and ``H d`` whole 128-lane tiles (DeiT-S: 384)."""
  *_, nh, d = qkv.shape
  return (backend.pallas_enabled() and backend.target().platform == "tpu" and proj_n.shape[0] == 1
          and nh * d % 128 == 0)


# The table kernel's logits ``zᵀ [m, H nbp]`` of one example, in float32 vregs (8 x 128 values), up to
# which it beats XLA's selection: DeiT-S by the clock (v5e), per layer, 0.006 ms more kernel against
# 0.026 ms of XLA ops at 197 tokens (m = 32: 4 vregs); 0.007 against 0.017 at 785 (m = 130: 17 vregs);
# at 3,137 tokens (m = 522, 25 blocks: 132 vregs) the kernel's picks over every row took 0.021 ms more
# and the forward got slower (9.77 -> 9.92 ms).
_TABLE_MAX_VREGS = 32


def table_applies(qkv: Array, proj_n: Array, block: int) -> bool:
  """Whether ``table`` runs (``applies`` holds and the logits are small enough to beat XLA's selection)."""
  *_, n, _, nh, _ = qkv.shape
  m, nbp = proj_n.shape[-1], round_up(blocks.count(n, block), 8)
  return applies(qkv, proj_n) and round_up(m, 8) * round_up(nh * nbp, 128) <= _TABLE_MAX_VREGS * 1024


def reference(q: Array, k: Array, proj_n: Array, w_k: Array, b_k: Array, w_q: Array, b_q: Array, *,
              block: int, dtype) -> tuple[Array, Array]:
  """The projections in XLA, from ``q, k [B, N, H, d]``, ``proj_n [1|B, N, m]``, ``w_k, w_q [d, c]``,
  ``b_k, b_q [c]``."""
  mm = lambda spec, a, b: mixed_einsum(spec, a, b, dtype)   # noqa: E731
  pk = mm("nm,bnhd->bmhd", proj_n[0], k) if proj_n.shape[0] == 1 else mm("bnm,bnhd->bmhd", proj_n, k)
  k_hat = mm("bmhd,dc->bmhc", pk, w_k) + jnp.sum(proj_n, axis=1)[:, :, None, None] * b_k
  q_r = mm("bnhd,dc->bnhc", blocks.pool(q, block, axis=1, mean=True), w_q) + b_q
  return q_r.astype(dtype), k_hat.astype(dtype)


def _project(pt_ref, size_ref, wk_ref, kb_ref, wq_ref, qb_ref, q_ref, k_ref, *, block: int):
  """One example's projections, float32: ``(q_r [rows of size_ref, H c], k_hat [rows of pt_ref, H c])``.
  ``pt_ref [m, N]`` (Pᵀ, compute dtype), ``size_ref [nbp, 1]`` (tokens per block, float32; rows past the
  real ``nb`` 1), ``wk_ref, wq_ref [H d, H c]`` (block-diagonal, compute dtype), ``kb_ref [m, H c]`` and
  ``qb_ref [1, H c]`` (the biases' terms, float32), ``q_ref, k_ref [N, H d]``. Block rows past the real
  ``nb`` give ``b_q``."""
  dtype = pt_ref.dtype
  pk = jnp.dot(pt_ref[...], k_ref[...].astype(dtype), preferred_element_type=F32)            # [m, H d]
  k_hat = jnp.dot(pk.astype(dtype), wk_ref[...], preferred_element_type=F32) + kb_ref[...]
  # Block sums on the vector unit, float32 (a product with the block membership pushed all of q to the
  # MXU for a few rows: 0.0025 against 0.0012 ms a layer at 197 tokens); then means.
  (n, width), rows = q_ref.shape, size_ref.shape[0]
  sums = [jnp.sum(q_ref[i:min(i + block, n), :].astype(F32), axis=0, keepdims=True)
          for i in range(0, n, block)]
  if rows > len(sums):
    sums.append(jnp.zeros((rows - len(sums), width), F32))
  q_pool = jnp.concatenate(sums) / size_ref[...]
  q_r = jnp.dot(q_pool.astype(dtype), wq_ref[...], preferred_element_type=F32) + qb_ref[...]
  return q_r, k_hat


def _sections(q_ref, k_ref, ex: int, examples: int | None, whole: bool):
  """Example ``ex`` of the grid step's: its q and k refs ``[N, H d]``, views of the step's windows
  (``[examples, N, H d]``, or ``[N, H d]`` for ``examples`` None) or, with ``whole``, of all of
  ``qkv [B, 1, N, 3 H d]`` (in VMEM: ``common.whole_in_vmem``)."""
  if not whole:
    return (q_ref, k_ref) if examples is None else (q_ref.at[ex], k_ref.at[ex])
  width = q_ref.shape[-1] // 3
  index = pl.program_id(0) * (examples or 1) + ex
  return q_ref.at[index, 0, :, pl.ds(0, width)], k_ref.at[index, 0, :, pl.ds(width, width)]


def _kernel(*refs, block: int, whole: bool):
  """``_project``'s refs -> ``qr_ref [nb, H c]``, ``kh_ref [m, H c]`` (compute dtype)."""
  *fixed, q_ref, k_ref, qr_ref, kh_ref = refs
  q_r, k_hat = _project(*fixed, *_sections(q_ref, k_ref, 0, None, whole), block=block)
  qr_ref[...] = q_r.astype(qr_ref.dtype)
  kh_ref[...] = k_hat.astype(kh_ref.dtype)


def _block_diagonal(w: Array, heads: int) -> Array:
  """``[d, c]`` -> ``[H d, H c]`` with ``w`` on the diagonal."""
  return jnp.kron(jnp.eye(heads, dtype=w.dtype), w)


class Constants(NamedTuple):
  """The kernels' operands that depend on the predictor's parameters alone (``constants``): fixed while
  the weights are, so evaluation computes them once (``MaskPredictor.prepared``) instead of in every
  forward, where they are some ten small XLA ops a layer (DeiT-S on v5e by the clock: 0.1 ms of the
  forward at 224 px, 0.135 ms at 448)."""
  pt: Array                  # Pᵀ [m, N], compute dtype
  wk: Array                  # W_k block-diagonal [H d, H c], compute dtype
  kb: Array                  # (1ᵀ P)ᵀ b_k, per head [m, H c] float32: the key bias through P
  wq: Array                  # W_q block-diagonal [H d, H c], compute dtype
  qb: Array                  # b_q per head [1, H c] float32
  basis: Array | None = None  # the block-pooled basis transposed [nb, m], compute dtype (``table``'s)


def constants(proj_n: Array, w_k: Array, b_k: Array, w_q: Array, b_q: Array, *, heads: int, dtype,
              pooled: Array | None = None) -> Constants:
  """``Constants`` from ``reference``'s parameters (``proj_n [1, N, m]``) and, for ``table``, the
  block-pooled basis ``pooled [m, nb]``."""
  return Constants(
      pt=proj_n[0].T.astype(dtype), wk=_block_diagonal(w_k.astype(dtype), heads),
      kb=jnp.tile(jnp.sum(proj_n[0], axis=0)[:, None] * b_k, (1, heads)).astype(F32),
      wq=_block_diagonal(w_q.astype(dtype), heads), qb=jnp.tile(b_q, heads)[None].astype(F32),
      basis=None if pooled is None else pooled.T.astype(dtype))


def _call(kernel, name: str, qkv, consts: Constants, extra, out_shape, out_specs, *, block: int,
          query_rows: int, interpret: bool, examples: int | None = None, flops: int = 0,
          transcendentals: int = 0):
  """One grid step per example (``examples`` None: q and k ``[N, H d]``) or per ``examples`` examples (q
  and k ``[examples, N, H d]``) over ``qkv [B, N, 3, H d]``'s q and k sections, with ``_project``'s
  constants (the block sizes padded with ones to ``query_rows``), q, k, then ``extra`` (whole arrays).
  Where ``qkv`` is small enough to lie in VMEM (``whole_in_vmem``) q and k are all of it, read in place
  (``_sections``; ``kernel`` gets ``whole=True``): 21.5 -> 15.6 us a layer for the table kernel at 64
  images of 197 tokens (v5e, by the clock), whose windows were copied by vector loads and stores."""
  bsz, n, _, nh, d = qkv.shape
  m, nb = consts.pt.shape[0], blocks.count(n, block)
  width, out_width = nh * d, consts.wk.shape[-1]
  pad = query_rows - nb
  fixed = (consts.pt,
           jnp.pad(blocks.block_sizes(n, block)[:, None], ((0, pad), (0, 0)), constant_values=1.0),
           consts.wk, consts.kb, consts.wq, consts.qb)
  flat = qkv.reshape(bsz, 1, n, 3 * width)
  flat, *operands = same_vma(flat, *fixed, *extra)
  fixed, extra = operands[:len(fixed)], operands[len(fixed):]
  section = lambda s: pl.BlockSpec((examples, None, n, width), lambda b: (b, 0, 0, s))    # noqa: E731
  full = lambda x: pl.BlockSpec(x.shape, lambda b: (0, 0))                                # noqa: E731
  in_vmem = whole_in_vmem(flat)
  sections = [pl.BlockSpec(memory_space=pltpu.VMEM)] * 2 if in_vmem else [section(0), section(1)]
  out_bytes = sum(nbytes(x) for x in (out_shape if isinstance(out_shape, tuple) else (out_shape,)))
  cost = pl.CostEstimate(
      flops=bsz * (2 * n * width * m + n * width + 2 * (m + query_rows) * width * out_width) + flops,
      transcendentals=transcendentals,
      bytes_accessed=2 * flat.size // 3 * flat.dtype.itemsize + out_bytes)
  return pl.pallas_call(
      functools.partial(kernel, whole=in_vmem), out_shape=out_shape, grid=(bsz // (examples or 1),),
      in_specs=[full(x) for x in fixed] + sections + [full(x) for x in extra],
      out_specs=out_specs,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=cost, interpret=pltpu.InterpretParams() if interpret else False, name=name,
  )(*fixed, flat, flat, *extra)


def _forward(qkv, consts: Constants, block, interpret):
  bsz, n, _, nh, _ = qkv.shape
  (m, width), nb = consts.kb.shape, blocks.count(n, block)
  per_example = lambda rows: pl.BlockSpec((None, rows, width), lambda b: (b, 0, 0))   # noqa: E731
  dtype = consts.pt.dtype
  out_shape = (out_struct((bsz, nb, width), qkv, dtype), out_struct((bsz, m, width), qkv, dtype))
  kernel = functools.partial(_kernel, block=block)
  q_r, k_hat = _call(kernel, "block_predictor_projections", qkv, consts, (), out_shape,
                     [per_example(nb), per_example(m)], block=block, query_rows=nb, interpret=interpret)
  return q_r.reshape(bsz, nb, nh, width // nh), k_hat.reshape(bsz, m, nh, width // nh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _projections(qkv, proj_n, w_k, b_k, w_q, b_q, block, dtype, interpret):
  consts = constants(proj_n, w_k, b_k, w_q, b_q, heads=qkv.shape[3], dtype=dtype)
  return _forward(qkv, consts, block, interpret)


def _projections_fwd(qkv, proj_n, w_k, b_k, w_q, b_q, block, dtype, interpret):
  residuals = (qkv, proj_n, w_k, b_k, w_q, b_q)
  return _projections(*residuals, block, dtype, interpret), residuals


def _projections_bwd(block, dtype, interpret, res, cotangents):
  def xla(qkv, *params):
    return reference(qkv[:, :, 0], qkv[:, :, 1], *params, block=block, dtype=dtype)
  _, vjp = jax.vjp(xla, *res)
  return vjp(cotangents)


_projections.defvjp(_projections_fwd, _projections_bwd)


def projections(qkv: Array, proj_n: Array, w_k: Array, b_k: Array, w_q: Array, b_q: Array, *, block: int,
                dtype) -> tuple[Array, Array]:
  """``(q_r [B, nb, H, c], k_hat [B, m, H, c])`` in ``dtype`` for ``qkv [B, N, 3, H, d]`` (q and k in slots 0
  and 1) and the predictor's parameters (``reference``'s), per batch shard (``applies`` must hold)."""
  interpret = backend.target().interpret
  def run(qkv, *params):
    return _projections(qkv, *params, block, jnp.dtype(dtype), interpret)
  return sharding.per_batch_shard(run, (qkv, proj_n, w_k, b_k, w_q, b_q), (True,) + (False,) * 5)


def prepared_projections(qkv: Array, consts: Constants, *, block: int) -> tuple[Array, Array]:
  """``projections`` from the parameters' ``constants`` computed ahead (evaluation), in their compute
  dtype; no gradient."""
  interpret = backend.target().interpret
  def run(qkv, consts):
    return _forward(qkv, consts, block, interpret)
  return sharding.per_batch_shard(run, jax.lax.stop_gradient((qkv, consts)), (True, False))


# ----------------------------------------------------------------------------------------------------
# Sparse mode: the kept-block table in the same pass.


@dataclasses.dataclass(frozen=True)
class Selection:
  """Sparse mode's choice (``MaskPredictor.block_mask``): each head and query block keeps ``keep`` key
  blocks (key block 0 always), ranked by the block scores of the ``coef_k`` largest coefficients of each
  row, whose logits are ``q_r K̂`` times ``scale``."""
  keep: int
  coef_k: int
  scale: float


def _least_row(mask: Array, position: Array) -> Array:
  """``[1, C]``: the least row index where each column of ``mask [L, C]`` is True (``L`` where none);
  ``position`` is the row index as float32 (``L`` is exact)."""
  return jnp.min(jnp.where(mask, position, float(mask.shape[0])), axis=0, keepdims=True)


def _top_down_columns(x: Array, k: int) -> Array:
  """Boolean ``[L, C]``: each column's ``k`` largest entries of float32 ``x [L, C]`` (ties: lowest index;
  ``-0.0`` equal to ``+0.0``, as ``topk_mask._topk_keep`` counts them), taken one at a time: per pick a
  maximum and a least index over sublanes. For the few picks here (``k <= 8``) a shorter chain of
  dependent steps than ``_topk_keep``'s 32-step bisection. Needs ``k <= L``; entries may be ``-inf``."""
  position = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0).astype(F32)
  kept = jnp.zeros(x.shape, bool)
  for _ in range(k):
    left = jnp.where(kept, -jnp.inf, x)
    top = jnp.max(left, axis=0, keepdims=True)
    kept = kept | (position == _least_row((left == top) & ~kept, position))
  return kept


def _ranked_top(x: Array, k: int) -> Array:
  """``_top_down_columns`` by ranks: an entry is kept where fewer than ``k`` entries of its column beat it
  (a larger value, or an equal one at a lower row), counted against each row in turn: ``L`` independent
  steps of element-wise compares, where the picks chain ``k`` maxima and least indices over sublanes."""
  row = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
  rank = jnp.zeros(x.shape, jnp.int32)
  for r in range(x.shape[0]):
    xr = x[r:r + 1, :]
    rank = rank + ((xr > x) | ((xr == x) & (row > r))).astype(jnp.int32)
  return rank < k


def _top_of_columns(x: Array, k: int) -> Array:
  """Each column's ``k`` largest entries of ``x [L, C]`` (ties: lowest index): by ranks for short columns
  (``L <= 4 k``), else by picks. DeiT-S by the clock (v5e), the table kernel a layer: ranks for both
  selections 0.0233 -> 0.0215 ms at 197 tokens (the coefficients' 32 rows, top 8); picks for the 130 rows
  at 785 tokens (ranks there: 0.0232 -> 0.034)."""
  return _ranked_top(x, k) if x.shape[0] <= 4 * k else _top_down_columns(x, k)


def _table_kernel(*refs, block: int, heads: int, examples: int, sel: Selection, whole: bool):
  """``examples`` examples: ``_project``'s refs (block rows padded to ``nbp``, a multiple of 8; q and k
  ``[examples, N, H d]``, or all of qkv: ``_sections``) and ``basis_ref [nb, m]`` (the block-pooled basis
  transposed, compute dtype) ->
  ``tab_ref [keep, examples * R]`` int32 (``R >= H nbp``): column ``e R + h nbp + i`` lists the key
  blocks query block ``i < nb`` of head ``h`` of example ``e`` keeps, increasing.

  Every head of every example at once, each row's values down a column: each example's ``q_r`` rows,
  stacked per head with the other heads' lanes zeroed, in its own ``R`` of the columns (zeros elsewhere),
  make one product with its ``K̂`` whose sum over the examples is every logit ``zᵀ [m, examples * R]``;
  the softmax, the coefficients' top-k and the blocks' top-k then reduce over sublanes
  (:func:`_top_of_columns`), once for all the examples. The values are those of the XLA path: ``q_r``
  and ``K̂`` rounded to the compute dtype, products accumulated in float32 (the other examples' columns
  add exact zeros), ``jax.nn.softmax``'s steps."""
  *fixed, q_ref, k_ref, basis_ref, tab_ref = refs
  dtype = basis_ref.dtype
  width = tab_ref.shape[-1]
  columns = width // examples
  own = lane_masks(heads, fixed[-1].shape[1] // heads)     # qb_ref [1, H c]: each head's c lanes
  z = 0.0
  for ex in range(examples):
    q_r, k_hat = _project(*fixed, *_sections(q_ref, k_ref, ex, examples, whole), block=block)
    q_r = q_r.astype(dtype).astype(F32)
    stacked = [jnp.where(lanes, q_r, 0.0) for lanes in own]
    pad = lambda rows: [jnp.zeros((rows, q_r.shape[1]), F32)] if rows else []   # noqa: E731
    stacked = pad(ex * columns) + stacked + pad(width - ex * columns - heads * q_r.shape[0])
    z = z + jax.lax.dot_general(k_hat.astype(dtype), jnp.concatenate(stacked).astype(dtype), NT,
                                preferred_element_type=F32)                  # [m, examples R]
  z = z * sel.scale
  e = jnp.exp(z - jnp.max(z, axis=0, keepdims=True))
  coef = e / jnp.sum(e, axis=0, keepdims=True)
  m = z.shape[0]
  if sel.coef_k < m:
    coef = jnp.where(_top_of_columns(z, sel.coef_k), coef, 0.0)
  scores = jnp.dot(basis_ref[...], coef.astype(dtype), preferred_element_type=F32)   # [nb, examples R]
  index = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
  scores = jnp.where(index == 0, jnp.inf, scores)                          # the CLS key's block
  kept = _top_of_columns(scores, sel.keep)
  position = index.astype(F32)
  rows = []
  for _ in range(sel.keep):                                                # increasing: the least left
    rows.append(_least_row(kept, position))
    kept = kept & (position != rows[-1])
  tab_ref[...] = jnp.concatenate(rows).astype(jnp.int32)


def _examples_per_step(bsz: int, columns: int) -> tuple[int, int]:
  """``(examples, R)``: examples per grid step and the columns each takes (``R >= columns``), so that a
  step's columns fill one 128-lane tile where ``columns`` leaves room (the selection's steps cost per
  tile, not per column); ``examples`` divides ``bsz``."""
  if columns >= 128:
    return 1, columns
  width = next_pow2(columns)
  examples = 128 // width
  while bsz % examples:
    examples //= 2
  return examples, width if examples > 1 else columns


def _table(qkv, consts: Constants, block, sel, interpret):
  bsz, n, _, nh, _ = qkv.shape
  (m, c), nb = consts.kb.shape, blocks.count(n, block)
  nbp = round_up(nb, 8)
  examples, columns = _examples_per_step(bsz, nh * nbp)
  kernel = functools.partial(_table_kernel, block=block, heads=nh, examples=examples, sel=sel)
  width = examples * columns
  # Per column: the logits' and scores' products, and some six vector operations per element a pick scans
  # (the coefficients' picks over m rows, the blocks' picks and their ordering over nbp).
  picks = (sel.coef_k if sel.coef_k < m else 0) * m + 2 * sel.keep * nbp
  flops = bsz // examples * width * (2 * examples * m * c + 2 * m * nbp + 6 * picks)
  out = _call(kernel, "block_predictor_table", qkv, consts, (consts.basis,),
              out_struct((bsz // examples, sel.keep, width), qkv, jnp.int32),
              pl.BlockSpec((None, sel.keep, width), lambda b: (b, 0, 0)), block=block, query_rows=nbp,
              interpret=interpret, examples=examples, flops=flops,
              transcendentals=bsz // examples * width * m)
  # [steps, keep, examples R] -> [B, R, keep] -> the real columns [B, H, nbp, keep] -> the real blocks.
  out = jnp.moveaxis(out.reshape(bsz // examples, sel.keep, examples, columns), 1, -1)
  return out.reshape(bsz, columns, sel.keep)[:, :nh * nbp].reshape(bsz, nh, nbp, sel.keep)[:, :, :nb]


def table(qkv: Array, consts: Constants, *, block: int, selection: Selection) -> Array:
  """The kept-block table ``[B, H, nb, keep]`` int32 (``attention.blocks``' format) in one pass from
  ``qkv`` and the predictor's ``constants`` (with the pooled basis): the table ``blocks.select`` takes
  from the scores ``MaskPredictor.block_mask`` computes in XLA (whose ~15 small XLA ops a layer took 0.31
  ms of a DeiT-S forward at 224 px on v5e by the clock, against 0.07 ms that the table adds to the
  kernel). Not differentiable (a selection); per batch shard (``applies`` must hold)."""
  interpret = backend.target().interpret
  def run(qkv, consts):
    return _table(qkv, consts, block, selection, interpret)
  operands = jax.lax.stop_gradient((qkv, consts))
  return sharding.per_batch_shard(run, operands, (True, False))
