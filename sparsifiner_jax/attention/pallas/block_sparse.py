"""Block-sparse attention in Pallas, forward and backward, for TPU (Mosaic) and GPU (Triton).

``block_sparse_attention(q, k, v, table, block=b, scale=...)``: every query row of query block ``i``
attends to the tokens of the key blocks ``table[b, h, i, :]`` (``attention.blocks``), softmax in float32,
products in q's dtype with float32 accumulation. Only kept blocks are ever computed, and, but for the
resident TPU kernels, ever loaded:

* TPU, where a head group's whole sequence fits in VMEM (``_resident``: DeiT-S up to about 4,000 tokens
  forward, 1,800 backward): one grid step per example and head group reads q, k and v (and do, o) once
  and, per query block, gathers the kept key blocks from VMEM; the forward takes their softmax in one
  pass, the backward adds dk and dv at the kept blocks' offsets. The per-block grid below reads every
  kept block once per query block that keeps it (``nb K b`` rows of k and v against ``N``) and pays a
  grid step's overhead per (query block, kept block); by the clock the resident forward is 5-7x faster
  at 197 to 3,137 tokens, forward and backward 2.3-3.2x at 197 and 785;
* forward elsewhere, and dq: the grid (TPU) or the loop (GPU) runs over the ``K`` entries of the table,
  and the index map of k and v reads the kept key block from the table (prefetched into SMEM on TPU);
* dk, dv: on TPU in the same pass as dq (``_tpu_bwd_kernel``), accumulated for the whole sequence in
  VMEM; on GPU, and on TPU where that does not fit, over the transposed table (``blocks.transpose``): for
  each key block, the query blocks that keep it. Its static length is ``nb``; steps past a key block's
  count re-read the block of the step before (the same block index, so nothing new is loaded) and
  compute nothing.

No per-element mask is built: a kept block is kept whole. Only the ragged last block (``N`` not a
multiple of ``b``) is masked, in a separate code path taken for that block alone: its keys past ``N``
get ``-inf``, and rows past ``N`` (read past the array's end) are zeroed where a zero probability would
otherwise multiply garbage.

TPU: a grid step ``(B, head group, query or key block, step)`` takes a group of heads whose lanes form
one 128-lane tile, read from ``qkv [B, N, 3 H d]`` and written as ``[B, N, H d]`` (heads-first for other
head dims), online-softmax state in VMEM scratch, the per-row logsumexp saved as ``[B, G, nb, g, b]``
rows. GPU: ``[B, N_pad, H, d_pad]`` as Triton wants (powers of two), grid ``(block, B, H)`` with a
``fori_loop`` over the table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from sparsifiner_jax.attention import blocks
from sparsifiner_jax.attention.pallas.common import (F32, NN, NT, col_to_row, copy_all, finalize,
                                                   gpu_flash_core, lane_masks, nbytes, next_pow2,
                                                   online_softmax_step, out_struct, row_to_col, same_vma,
                                                   scaled, whole_in_vmem)
from sparsifiner_jax.precision import mixed_einsum

Array = jax.Array
_FUSED_BACKWARD_BYTES = 24 * 2 ** 20   # TPU: VMEM for the one-pass backward's whole-sequence dk, dv
_RESIDENT_BYTES = 12 * 2 ** 20    # TPU: VMEM for the resident kernels' operands, results and scratch
_RESIDENT_KEYS = 1024    # TPU: the resident kernels take a query block's kept keys in chunks of at most this
_UNROLL_BLOCKS = 32     # TPU: the resident kernels unroll their loop over query blocks up to this many bodies
_GPU_TILE = 64          # GPU: the most rows (and keys) a program's tile holds (shared memory at 128)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of one call (hashable: the custom_vjp's non-differentiable argument)."""
  scale: float
  interpret: bool
  block: int             # b: tokens per query and key block
  nb: int                # blocks: ceil(N / b)
  kept: int              # K: key blocks kept per query block
  n: int                 # N: real tokens
  heads: int
  head_dim: int
  group: int = 1         # TPU: heads per grid step (their lanes form one tile when ``lanes``)
  sub: int = 0           # GPU: rows and keys per tile (a block is block / sub tiles a side)
  lanes: bool = False    # TPU: operands in the qkv layout ``[B, 1, N, 3 H d]`` (else heads-first)
  dense_row: bool = False  # TPU: the first query row (CLS) attends to every key (its own kernels)
  residuals: bool = True   # TPU: the forward writes the backward's logsumexp rows (not without a gradient)
  first_zero: bool = False  # every table row starts with key block 0 (block mode's: the CLS key's block)
  whole: bool = False      # TPU resident kernels: qkv taken whole from VMEM (``common.whole_in_vmem``)

  def side_shape(self, bsz: int, n: int) -> tuple[int, ...]:
    """TPU: the query- or key-side operand shape (out, do, dq, dk, dv)."""
    return (bsz, 1, n, self.heads * self.head_dim) if self.lanes else (bsz, self.heads, n, self.head_dim)

  def from_side(self, x: Array) -> Array:
    """TPU: a side operand as ``[B, N, H, d]``."""
    if self.lanes:
      return x.reshape(x.shape[0], x.shape[2], self.heads, self.head_dim)
    return jnp.swapaxes(x, 1, 2)

  @property
  def ragged(self) -> bool:
    """The last block is partial."""
    return self.n % self.block != 0

  def pairs(self, bsz: int) -> int:
    """(query, key) token pairs the block kernels compute: ``B H nb K b^2``."""
    return bsz * self.heads * self.nb * self.kept * self.block * self.block


def _live(x: Array, blk, cfg: _Config, axis: int, first=None) -> Array:
  """``x`` with the entries of tokens at or past N along ``axis`` zeroed: block ``blk``'s tokens, or those
  from token ``first`` on."""
  token = (blk * cfg.block if first is None else first) + lax.broadcasted_iota(jnp.int32, x.shape, axis)
  return jnp.where(token < cfg.n, x, jnp.zeros_like(x))


def _real_keys(s: Array, kb, cfg: _Config, axis: int, first=None) -> Array:
  """Logits ``s`` with keys at or past N (along ``axis``) set to ``-inf``: block ``kb``'s keys, or those
  from key ``first`` on."""
  token = (kb * cfg.block if first is None else first) + lax.broadcasted_iota(jnp.int32, s.shape, axis)
  return jnp.where(token < cfg.n, s, -jnp.inf)


def _in_tail(blk, cfg: _Config, fn, *xs):
  """``fn(*xs)`` for the ragged last block (``blk == nb - 1``), ``xs`` unchanged for every other one: a
  branch around the masking alone, so a fully kept block does no per-element masking."""
  if not cfg.ragged:
    return xs
  return lax.cond(blk == cfg.nb - 1, lambda *a: tuple(fn(*a)), lambda *a: tuple(a), *xs)


# ------------------------------------------------------------------------------------------------
# TPU (Mosaic). A grid step handles a group of ``g`` heads whose lanes form one tile: with ``g d = 128``
# (DeiT: d = 64, two heads) the operands stay where the qkv projection wrote them, ``qkv [B, 1, N, 3 H d]``,
# and the output is written as ``[B, 1, N, H d]``, the output projection's layout: no transposes. Other
# head dims use heads-first ``[B, 3 H, N, d]`` (one transpose), one head per step. Each head of a group
# reads its own kept block of k and v (its own operand), through the lane tile that holds it.


def _entry(ref, cfg: _Config, width: int, b, h, i, j):
  """``table[b, h, i, j]`` of a flattened ``[B, H, nb, width]`` SMEM table."""
  return ref[((b * cfg.heads + h) * cfg.nb + i) * width + j]


def _lanes(ref, cfg: _Config, slot: int, rows: slice = slice(None)) -> Array:
  """Head ``slot`` of a group's ``[b, g d]`` tile: its ``[b, d]`` lanes (of ``rows``)."""
  return ref[rows, slot * cfg.head_dim:(slot + 1) * cfg.head_dim]


# The dense first row (``cfg.dense_row``: the CLS query attends to every key) has two small kernels of its
# own on a ``(B, head group)`` grid: each reads the group's whole k and v once, and its first 8 query rows
# (one sublane tile; row 0 is kept). The block kernels still compute row 0 over its block's kept keys:
# the forward replaces that row with the dense one and gives the block backward an lse of +inf there
# (probability 0: no gradient), and the dense row's backward adds its own gradients.
_TILE_ROWS = 8


def _first_row(x: Array, value) -> Array:
  """``x [r, c]`` with row 0 replaced by ``value`` (broadcast over it)."""
  return jnp.where(lax.broadcasted_iota(jnp.int32, x.shape, 0) == 0, value, x)


def _tpu_dense_row_fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
  """``o_ref [8, g d]``, ``lse_ref [g, 8]``: the first rows against every key (row 0 is used)."""
  for slot in range(cfg.group):
    k, v = _lanes(k_ref, cfg, slot), _lanes(v_ref, cfg, slot)                # [N, d]
    q = scaled(_lanes(q_ref, cfg, slot), cfg.scale, k.dtype)                 # [8, d]
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)                # [8, N]
    m = jnp.max(s, axis=1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=1, keepdims=True)
    out = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=F32) / l
    o_ref[:, slot * cfg.head_dim:(slot + 1) * cfg.head_dim] = out.astype(o_ref.dtype)
    lse_ref[slot:slot + 1, :] = col_to_row(m + jnp.log(l))


def _tpu_dense_row_bwd_kernel(q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, dq_ref, dk_ref, dv_ref, *,
                              cfg: _Config):
  """Row 0's gradients: ``dq_ref [8, g d]`` (rows 1.. zero) and ``dk_ref, dv_ref [N, g d]``, float32."""
  tn = (((0,), (0,)), ((), ()))        # a.T @ b
  for slot in range(cfg.group):
    lanes = slice(slot * cfg.head_dim, (slot + 1) * cfg.head_dim)
    k, v = _lanes(k_ref, cfg, slot), _lanes(v_ref, cfg, slot)                # [N, d]
    q = scaled(_lanes(q_ref, cfg, slot), cfg.scale, k.dtype)                 # [8, d]
    do = _lanes(do_ref, cfg, slot).astype(F32)
    delta = jnp.sum(do * _lanes(o_ref, cfg, slot).astype(F32), axis=1, keepdims=True)   # [8, 1]
    do = do.astype(v.dtype)
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)                # [8, N]
    p = _first_row(jnp.zeros_like(s), jnp.exp(s - row_to_col(lse_ref[slot:slot + 1, :])))
    ds = p * (lax.dot_general(do, v, NT, preferred_element_type=F32) - delta)
    dq_ref[:, lanes] = lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32) * cfg.scale
    dk_ref[:, lanes] = lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=F32)
    dv_ref[:, lanes] = lax.dot_general(p.astype(v.dtype), do, tn, preferred_element_type=F32)


# Sequences whose head group fits in VMEM (``_resident``) take other kernels: a ``(B, head group)`` grid
# whose step reads the group's q, k and v once, and for each query block gathers its kept key blocks from
# VMEM (dynamic slices at the table's offsets); the forward takes the softmax over them in one pass. Per
# group it reads N rows of k and v where the per-block grid reads nb K b (every query block re-reads its
# kept blocks), and it pays one grid step's overhead where the per-block grid pays nb K. The sequence is
# copied into zero-padded scratch (a whole number of blocks: every gather is in bounds), k and v as
# ``[nb, b, g d]``, indexed by the table's block numbers (less scalar address arithmetic per gather than
# row offsets: by the clock 1,126 -> 1,108 bundles a step at 197 tokens in blocks of 32); keys past N get
# -inf. A query block's kept blocks are taken in chunks of at most ``_RESIDENT_KEYS`` keys (``_chunks``),
# which bound its float32 logits in VMEM: the forward's softmax is one pass over a single chunk, online
# over several.


def _chunks(cfg: _Config) -> list[range]:
  """The table slots of each chunk of a query block's kept blocks: ``_RESIDENT_KEYS`` keys at most."""
  per = max(1, _RESIDENT_KEYS // cfg.block)
  return [range(c, min(c + per, cfg.kept)) for c in range(0, cfg.kept, per)]


def _kept_keys(starts: list, cfg: _Config) -> Array:
  """The token of each column of a chunk's gathered keys: ``[1, len(starts) b]`` int32, column ``j b + t``
  being token ``t`` of the block that starts at ``starts[j]``."""
  col = lax.broadcasted_iota(jnp.int32, (1, len(starts) * cfg.block), 1)
  first = starts[0]
  for j in range(1, len(starts)):
    first = jnp.where(col >= j * cfg.block, starts[j], first)
  return first + col % cfg.block


def _softmax_rows(s: Array, v: Array) -> tuple[Array, Array]:
  """``(softmax(s) @ v [r, d], lse [r, 1])`` float32 for logits ``s [r, c]`` with a finite entry per row."""
  m = jnp.max(s, axis=1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=1, keepdims=True)
  out = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=F32) / l
  return out, m + jnp.log(l)


def _masked_logits(q: Array, k: Array, starts: list, cfg: _Config) -> Array:
  """``q kᵀ`` ``[b, len(starts) b]`` float32 for a chunk's gathered keys, keys past N at -inf."""
  s = lax.dot_general(q, k, NT, preferred_element_type=F32)
  return jnp.where(_kept_keys(starts, cfg) < cfg.n, s, -jnp.inf) if cfg.ragged else s


def _empty_rows(rows: int, d: int) -> tuple[Array, Array, Array]:
  """The online softmax's start ``(m, l, acc)``: nothing seen yet."""
  return jnp.full((rows, 1), -jnp.inf, F32), jnp.zeros((rows, 1), F32), jnp.zeros((rows, d), F32)


def _unrolled(cfg: _Config) -> bool:
  """Whether the loop over query blocks is unrolled: up to ``_UNROLL_BLOCKS`` bodies (a query block of one
  head, in one chunk). Unrolled bodies keep their temporaries apart: 22 MB of VMEM for a 1,500-token
  backward in chunks, 30 MB for 25 blocks of 128 against 7 kept, two heads each."""
  return cfg.nb * cfg.group <= _UNROLL_BLOCKS and len(_chunks(cfg)) == 1


def _to_padded(pairs, cfg: _Config) -> None:
  """Copies each ``(ref [N, W], scratch [nb b, W] or [nb, b, W])`` pair into its scratch, the rows past N
  zeroed."""
  for src, dst in pairs:
    if dst.ndim == 3:
      _to_blocks(src, dst, cfg)
      continue
    if cfg.ragged:
      dst[(cfg.nb - 1) * cfg.block:, :] = jnp.zeros((cfg.block, dst.shape[1]), dst.dtype)
    dst[:cfg.n, :] = src[...]


def _to_blocks(src, dst, cfg: _Config) -> None:
  """``src [N, W]`` into ``dst [nb, b, W]``, block by block, the ragged last block zero-padded."""
  for blk in range(cfg.nb):
    first, last = blk * cfg.block, min(cfg.n, (blk + 1) * cfg.block)
    if last - first < cfg.block:
      dst[blk] = jnp.zeros(dst.shape[1:], dst.dtype)
    dst[blk, :last - first, :] = src[first:last, :]


def _sequence(ref) -> Array:
  """The whole of a ``[nb, b, W]`` block scratch as ``[nb b, W]``."""
  return ref[...].reshape(-1, ref.shape[-1])


def _gather_kept(tab_ref, k_sc, v_sc, cfg: _Config, b, h, i, slots: range):
  """Query block ``i`` of head ``h``, table ``slots`` (a chunk): ``(starts, k, v)``, the kept blocks' first
  rows and their keys and values ``[len(slots) b, g d]`` (the group's lanes) gathered from the block
  scratch ``[nb, b, g d]``. Keys past N get -inf from ``_masked_logits``. With ``cfg.first_zero`` slot 0
  is block 0, static: no table read, no address arithmetic (1,108 -> 1,090 bundles a step at 197 tokens
  in blocks of 32, by the clock)."""
  kept = [0 if cfg.first_zero and j == 0 else _entry(tab_ref, cfg, cfg.kept, b, h, i, j) for j in slots]
  k = jnp.concatenate([k_sc[blk] for blk in kept], axis=0)
  v = jnp.concatenate([v_sc[blk] for blk in kept], axis=0)
  return [pl.multiple_of(blk * cfg.block, cfg.block) if isinstance(blk, jax.Array) else blk * cfg.block
          for blk in kept], k, v


def _head_lanes(cfg: _Config) -> list:
  """Per head of the group, its lanes as a ``[1, g d]`` mask (``[None]`` for a group of one). Every head's
  products take the group's whole lane tile, the other heads' lanes of q (and do) zeroed: no lane shifts,
  and the MXU contracts 128 lanes as cheaply as 64; each head's lanes of the results are then merged."""
  return [None] if cfg.group == 1 else lane_masks(cfg.group, cfg.head_dim)


def _only(x: Array, own) -> Array:
  """``x`` on the lanes of ``own`` (a ``_head_lanes`` mask), zeros elsewhere."""
  return x if own is None else jnp.where(own, x, jnp.zeros_like(x))


def _merge(tile, x: Array, own) -> Array:
  """``tile`` with the lanes of ``own`` taken from ``x`` (``x`` itself for the first head)."""
  return x if tile is None else jnp.where(own, x, tile)


def _sums_on_mxu(cfg: _Config, dtype) -> bool:
  """Whether the resident forward takes its softmax sums on the MXU (``_group_softmax``): heads in lane
  groups, bfloat16 products (whose rounded probabilities the sums then add exactly as the output's
  products weigh them), and an unrolled loop over query blocks (one chunk). By the clock, per layer:
  0.164 -> 0.148 ms at 197 tokens in blocks of 32, 0.121 -> 0.114 at 785 in blocks of 128; in the rolled
  loop at 3,137 tokens slower, 0.284 -> 0.309."""
  return cfg.group > 1 and _unrolled(cfg) and jnp.dtype(dtype) == jnp.bfloat16


def _group_softmax(q_all, tab_ref, k_sc, v_sc, cfg: _Config, b, grp, i, heads) -> tuple[Array, Array | None]:
  """Query block ``i`` of a head group in one chunk: ``(out [b, g d], lse [g d, b])`` float32, head ``h``'s
  output on its lanes and its logsumexp as row ``h d`` of ``lse`` (None without ``cfg.residuals``).

  Each head's probabilities multiply its kept values with ones on the other heads' lanes, so those lanes
  of the product hold the head's row sums: the MXU adds them where cross-lane reductions (the forward's
  busiest unit) did. The sums of head ``h + 1`` merged onto head ``h``'s lanes, rotated by ``d`` lanes,
  give every head its own sums on its own lanes; one transpose of the group's tile gives the lse rows."""
  d = cfg.head_dim
  products, maxima = [], []
  for slot, own in enumerate(heads):
    starts, k, v = _gather_kept(tab_ref, k_sc, v_sc, cfg, b, grp * cfg.group + slot, i, range(cfg.kept))
    s = _masked_logits(_only(q_all, own), k, starts, cfg)                           # [b, K b]
    m = jnp.max(s, axis=1, keepdims=True)
    p = jnp.exp(s - m).astype(v.dtype)
    products.append(lax.dot_general(p, jnp.where(own, v, jnp.ones_like(v)), NN, preferred_element_type=F32))
    maxima.append(m)
  shifted = None          # lanes of head h: the sums of head h + 1
  numerators = maxima_tile = None
  for slot, own in enumerate(heads):
    shifted = _merge(shifted, products[(slot + 1) % cfg.group], own)
    numerators = _merge(numerators, products[slot], own)
    if cfg.residuals:
      maxima_tile = _merge(maxima_tile, jnp.broadcast_to(maxima[slot], products[slot].shape), own)
  sums = pltpu.roll(shifted, d, 1)
  return numerators / sums, jnp.transpose(maxima_tile + jnp.log(sums)) if cfg.residuals else None


def _tpu_resident_fwd_kernel(tab_ref, q_ref, k_ref, v_ref, o_ref, *refs, cfg: _Config):
  """``q_ref, k_ref, v_ref, o_ref [N, g d]`` (with ``cfg.whole`` all of qkv and of the output, in VMEM:
  the group's views are taken here); with ``cfg.residuals`` ``lse_ref [nb, g, b]`` (and, with
  ``cfg.dense_row``, ``row_lse_ref [g, 8]``); scratch ``[nb b, g d]`` for q and the output, ``[nb, b, g d]``
  for k and v."""
  (q_sc, k_sc, v_sc, o_sc), residuals = refs[-4:], refs[:-4]
  lse_ref, row_lse_ref = (residuals + (None, None))[:2]
  b, grp = pl.program_id(0), pl.program_id(1)
  n, bl, d = cfg.n, cfg.block, cfg.head_dim
  if cfg.whole:
    specs = _Specs(cfg, None)
    q_ref, k_ref, v_ref, o_ref = (specs.view(ref, s, b, grp) for ref, s in
                                  ((q_ref, 0), (k_ref, 1), (v_ref, 2), (o_ref, 0)))
  _to_padded(((q_ref, q_sc), (k_ref, k_sc), (v_ref, v_sc)), cfg)

  heads = _head_lanes(cfg)

  def query_block(i, carry):
    rows = pl.ds(pl.multiple_of(i * bl, bl), bl)
    q_all = scaled(q_sc[rows, :], cfg.scale, k_sc.dtype)
    if _sums_on_mxu(cfg, k_sc.dtype):
      out, lse = _group_softmax(q_all, tab_ref, k_sc, v_sc, cfg, b, grp, i, heads)
      o_sc[rows, :] = out.astype(o_sc.dtype)
      for slot in range(cfg.group if cfg.residuals else 0):
        lse_ref[i, slot:slot + 1, :] = lse[slot * d:slot * d + 1, :]
      return carry
    tile = None
    for slot, own in enumerate(heads):
      q = _only(q_all, own)
      chunks = _chunks(cfg)
      state = None
      for slots in chunks:
        starts, k, v = _gather_kept(tab_ref, k_sc, v_sc, cfg, b, grp * cfg.group + slot, i, slots)
        s = _masked_logits(q, k, starts, cfg)                                          # [b, chunk]
        if len(chunks) == 1:
          out, lse = _softmax_rows(s, v)
        else:
          state = online_softmax_step(s, *(state or _empty_rows(bl, cfg.group * d)), v)
      if len(chunks) > 1:
        out, lse = finalize(*state)
      tile = _merge(tile, out, own)
      if cfg.residuals:
        lse_ref[i, slot:slot + 1, :] = col_to_row(lse)
    o_sc[rows, :] = tile.astype(o_sc.dtype)
    return carry

  lax.fori_loop(0, cfg.nb, query_block, 0, unroll=_unrolled(cfg))
  if cfg.dense_row:                       # the CLS row (in a tile of 8) against every key
    q_all, k, v = scaled(q_sc[:_TILE_ROWS, :], cfg.scale, k_sc.dtype), _sequence(k_sc), _sequence(v_sc)
    tile = None
    for slot, own in enumerate(heads):
      s = lax.dot_general(_only(q_all, own), k, NT, preferred_element_type=F32)      # [8, nb b]
      out, lse = _softmax_rows(_real_keys(s, 0, cfg, 1), v)
      tile = _merge(tile, out, own)
      if cfg.residuals:
        row_lse_ref[slot:slot + 1, :] = col_to_row(lse)
        lse_ref[0, slot:slot + 1, :1] = jnp.full((1, 1), jnp.inf, F32)   # the block backward skips row 0
    o_sc[:1, :] = tile[:1].astype(o_sc.dtype)
  o_ref[...] = o_sc[:n, :]


def _tpu_resident_bwd_kernel(tab_ref, q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, *refs, cfg: _Config):
  """The resident forward's backward: ``q_ref ... o_ref [N, g d]``, ``lse_ref [nb, g, b]`` (and with
  ``cfg.dense_row`` ``row_lse_ref [g, 8]``) -> ``dq_ref, dk_ref, dv_ref [N, g d]``. Per query block the
  kept blocks' probabilities are recomputed from the saved lse, dq written, and dk, dv added at the kept
  blocks' offsets into whole-sequence float32 scratch; the dense CLS row adds its own gradients."""
  extra = 1 if cfg.dense_row else 0
  row_lse_ref = refs[0] if cfg.dense_row else None
  outputs = 1 if cfg.lanes else 3
  results = refs[extra:extra + outputs]
  q_sc, k_sc, v_sc, do_sc, o_sc, dq_sc, dk_sc, dv_sc = refs[extra + outputs:extra + outputs + 8]
  b, grp = pl.program_id(0), pl.program_id(1)
  n, bl = cfg.n, cfg.block
  tn = (((0,), (0,)), ((), ()))        # a.T @ b
  _to_padded(((q_ref, q_sc), (k_ref, k_sc), (v_ref, v_sc), (do_ref, do_sc), (o_ref, o_sc)), cfg)
  dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
  dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

  def grads(do, k, v, s, lse, delta):
    """``(p, ds)`` of logits ``s`` given the rows' ``lse``, ``delta = rowsum(do * o)`` and ``do``, and the
    keys' ``v``."""
    p = jnp.exp(s - lse)
    dp = lax.dot_general(do, v, NT, preferred_element_type=F32)
    return p, p * (dp - delta)

  heads = _head_lanes(cfg)

  def query_block(i, carry):
    rows = pl.ds(pl.multiple_of(i * bl, bl), bl)
    q_all, do_all = scaled(q_sc[rows, :], cfg.scale, k_sc.dtype), do_sc[rows, :]
    o_all = o_sc[rows, :].astype(F32)
    dq_tile = None
    for slot, own in enumerate(heads):
      q, do = _only(q_all, own), _only(do_all, own)         # zeros elsewhere: so are dk and dv
      lse = row_to_col(lse_ref[i, slot:slot + 1, :])
      delta = jnp.sum(do.astype(F32) * o_all, axis=1, keepdims=True)
      dq = None
      for slots in _chunks(cfg):
        starts, k, v = _gather_kept(tab_ref, k_sc, v_sc, cfg, b, grp * cfg.group + slot, i, slots)
        p, ds = grads(do, k, v, _masked_logits(q, k, starts, cfg), lse, delta)
        dq_chunk = lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32)
        dq = dq_chunk if dq is None else dq + dq_chunk
        dk = lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=F32)    # [chunk, g d]
        dv = lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=F32)
        for j, start in enumerate(starts):
          dk_sc[pl.ds(start, bl), :] += dk[j * bl:(j + 1) * bl]
          dv_sc[pl.ds(start, bl), :] += dv[j * bl:(j + 1) * bl]
      dq_tile = _merge(dq_tile, dq, own)
    dq_sc[rows, :] = dq_tile * cfg.scale
    return carry

  lax.fori_loop(0, cfg.nb, query_block, 0, unroll=_unrolled(cfg))
  if cfg.dense_row:                       # the CLS row (in a tile of 8) against every key
    rows = slice(0, _TILE_ROWS)
    k, v = _sequence(k_sc), _sequence(v_sc)                                            # [nb b, g d]
    q_all, do_all = scaled(q_sc[rows, :], cfg.scale, k.dtype), do_sc[rows, :]          # [8, g d]
    o_all = o_sc[rows, :].astype(F32)
    dq_tile = None
    for slot, own in enumerate(heads):
      q, do = _only(q_all, own), _only(do_all, own)
      s = _real_keys(lax.dot_general(q, k, NT, preferred_element_type=F32), 0, cfg, 1)
      lse = _first_row(jnp.full((_TILE_ROWS, 1), jnp.inf, F32), row_to_col(row_lse_ref[slot:slot + 1, :]))
      delta = jnp.sum(do.astype(F32) * o_all, axis=1, keepdims=True)
      p, ds = grads(do, k, v, s, lse, delta)                                           # rows 1..: 0
      dq_tile = _merge(dq_tile, lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32), own)
      dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=F32)
      dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=F32)
    dq_sc[rows, :] += dq_tile * cfg.scale
  if cfg.lanes:
    _write_qkv_lanes(results[0], *refs[-2:], (dq_sc, dk_sc, dv_sc), cfg, b, grp)
  else:
    for ref, sc in zip(results, (dq_sc, dk_sc, dv_sc)):
      ref[...] = sc[:n, :].astype(ref.dtype)


def _write_qkv_lanes(dqkv_hbm, stage, sems, grads, cfg: _Config, b, grp) -> None:
  """Copies a group's ``grads`` (dq, dk, dv scratch ``[nb b, g d]``) into its lanes of each section of
  ``dqkv_hbm [B, 1, N, 3 H d]`` (in HBM): the gradient in the qkv layout, where three outputs would leave
  XLA to concatenate them (at 785 tokens a third of the backward's time)."""
  width = cfg.group * cfg.head_dim
  groups = cfg.heads // cfg.group
  for section, grad in enumerate(grads):
    stage[section] = grad[:cfg.n, :].astype(stage.dtype)
  columns = [pl.multiple_of((section * groups + grp) * width, width) for section in range(3)]
  copy_all([(stage.at[s], dqkv_hbm.at[b, 0, :, pl.ds(col, width)]) for s, col in enumerate(columns)], sems)


def _tpu_fwd_kernel(tab_ref, q_ref, *refs, cfg: _Config):
  g = cfg.group
  k_refs, v_refs, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = refs[:g], refs[g:2 * g], refs[2 * g:]
  b, grp, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, F32)
    l_sc[...] = jnp.zeros(l_sc.shape, F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

  for slot in range(g):
    kb = _entry(tab_ref, cfg, cfg.kept, b, grp * g + slot, i, j)
    k, v = _lanes(k_refs[slot], cfg, slot), _lanes(v_refs[slot], cfg, slot)
    q = scaled(_lanes(q_ref, cfg, slot), cfg.scale, k.dtype)
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)                    # [b, b]
    s, v = _in_tail(kb, cfg, lambda s, v: (_real_keys(s, kb, cfg, 1), _live(v, kb, cfg, 0)), s, v)
    m_sc[slot], l_sc[slot], acc_sc[slot] = online_softmax_step(s, m_sc[slot], l_sc[slot], acc_sc[slot], v)

  @pl.when(j == cfg.kept - 1)
  def _done():
    for slot in range(g):
      out, lse = finalize(m_sc[slot], l_sc[slot], acc_sc[slot])
      o_ref[:, slot * cfg.head_dim:(slot + 1) * cfg.head_dim] = out.astype(o_ref.dtype)
      lse_ref[slot:slot + 1, :] = col_to_row(lse)


def _tpu_dq_kernel(tab_ref, q_ref, *refs, cfg: _Config):
  g = cfg.group
  k_refs, v_refs, (do_ref, lse_ref, delta_ref, dq_ref, dq_sc) = refs[:g], refs[g:2 * g], refs[2 * g:]
  b, grp, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, F32)

  for slot in range(g):
    kb = _entry(tab_ref, cfg, cfg.kept, b, grp * g + slot, i, j)
    # Rows past N: garbage that a zero probability would still turn into NaN.
    k, v = _in_tail(kb, cfg, lambda k, v: (_live(k, kb, cfg, 0), _live(v, kb, cfg, 0)),
                    _lanes(k_refs[slot], cfg, slot), _lanes(v_refs[slot], cfg, slot))
    q = scaled(_lanes(q_ref, cfg, slot), cfg.scale, k.dtype)
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)                    # [b, b]
    (s,) = _in_tail(kb, cfg, lambda s: (_real_keys(s, kb, cfg, 1),), s)
    p = jnp.exp(s - row_to_col(lse_ref[slot:slot + 1, :]))
    dp = lax.dot_general(_lanes(do_ref, cfg, slot).astype(v.dtype), v, NT, preferred_element_type=F32)
    ds = p * (dp - row_to_col(delta_ref[slot:slot + 1, :]))
    dq_sc[slot] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32)

  @pl.when(j == cfg.kept - 1)
  def _done():
    for slot in range(g):
      lanes = slice(slot * cfg.head_dim, (slot + 1) * cfg.head_dim)
      dq_ref[:, lanes] = (dq_sc[slot] * cfg.scale).astype(dq_ref.dtype)


def _tpu_bwd_kernel(tab_ref, q_ref, *refs, cfg: _Config):
  """dq, dk and dv in one pass over the table (flash attention 2's backward): each kept pair of blocks
  recomputes its probabilities once; dq accumulates per query block, dk and dv for the whole sequence of
  the head group in VMEM (``(g, N_pad, d)`` float32 each), written once at the last step. The rows'
  ``delta = rowsum(dO * O)`` is computed here, at a query block's first step, from its do and out tiles."""
  g = cfg.group
  k_refs, v_refs = refs[:g], refs[g:2 * g]
  do_ref, o_ref, lse_ref, dq_ref, dk_ref, dv_ref, dq_sc, dk_sc, dv_sc, delta_sc = refs[2 * g:]
  b, grp, i, j = (pl.program_id(a) for a in range(4))

  @pl.when((i == 0) & (j == 0))
  def _init_sequence():
    dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

  @pl.when(j == 0)
  def _init_block():
    dq_sc[...] = jnp.zeros(dq_sc.shape, F32)
    for slot in range(g):
      delta = jnp.sum(_lanes(do_ref, cfg, slot).astype(F32) * _lanes(o_ref, cfg, slot).astype(F32),
                      axis=1, keepdims=True)                                     # [b, 1]
      (delta_sc[slot],) = _in_tail(i, cfg, lambda x: (_live(x, i, cfg, 0),), delta)

  tn = (((0,), (0,)), ((), ()))        # a.T @ b
  for slot in range(g):
    kb = _entry(tab_ref, cfg, cfg.kept, b, grp * g + slot, i, j)
    # Rows past N (either side's ragged last block): garbage that a zero would still turn into NaN.
    k, v = _in_tail(kb, cfg, lambda k, v: (_live(k, kb, cfg, 0), _live(v, kb, cfg, 0)),
                    _lanes(k_refs[slot], cfg, slot), _lanes(v_refs[slot], cfg, slot))
    q = scaled(_lanes(q_ref, cfg, slot), cfg.scale, k.dtype)
    do = _lanes(do_ref, cfg, slot).astype(v.dtype)
    q, do = _in_tail(i, cfg, lambda q, do: (_live(q, i, cfg, 0), _live(do, i, cfg, 0)), q, do)
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)                    # [b, b]
    (s,) = _in_tail(kb, cfg, lambda s: (_real_keys(s, kb, cfg, 1),), s)
    p = jnp.exp(s - row_to_col(lse_ref[slot:slot + 1, :]))
    (p,) = _in_tail(i, cfg, lambda p: (_live(p, i, cfg, 0),), p)
    dp = lax.dot_general(do, v, NT, preferred_element_type=F32)
    ds = p * (dp - delta_sc[slot])
    dq_sc[slot] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32)
    keys = pl.ds(pl.multiple_of(kb * cfg.block, cfg.block), cfg.block)
    dv_sc[slot, keys, :] += lax.dot_general(p.astype(v.dtype), do, tn, preferred_element_type=F32)
    dk_sc[slot, keys, :] += lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=F32)

  @pl.when(j == cfg.kept - 1)
  def _done_block():
    for slot in range(g):
      lanes = slice(slot * cfg.head_dim, (slot + 1) * cfg.head_dim)
      dq_ref[:, lanes] = (dq_sc[slot] * cfg.scale).astype(dq_ref.dtype)

  @pl.when((i == cfg.nb - 1) & (j == cfg.kept - 1))
  def _done_sequence():
    for slot in range(g):
      lanes = slice(slot * cfg.head_dim, (slot + 1) * cfg.head_dim)
      dk_ref[:, lanes] = dk_sc[slot, :cfg.n, :].astype(dk_ref.dtype)
      dv_ref[:, lanes] = dv_sc[slot, :cfg.n, :].astype(dv_ref.dtype)


def _tpu_dkv_kernel(rows_ref, count_ref, k_ref, v_ref, *refs, cfg: _Config):
  """Keys on sublanes, queries on lanes (``s.T [b, b]``): the lse and delta rows need no relayout. Each
  head of the group steps through its own column of the transposed table."""
  g = cfg.group
  q_refs, do_refs = refs[:g], refs[g:2 * g]
  lse_refs, delta_refs = refs[2 * g:3 * g], refs[3 * g:4 * g]
  dk_ref, dv_ref, dk_sc, dv_sc = refs[4 * g:]
  b, grp, kb, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

  for slot in range(g):
    head = grp * g + slot
    qb = _entry(rows_ref, cfg, cfg.nb, b, head, kb, j)

    @pl.when(j < count_ref[(b * cfg.heads + head) * cfg.nb + kb])
    def _step(slot=slot, qb=qb):
      # (Keys past N, in a ragged last key block, only feed rows of dk and dv that are never written.)
      k, v = _lanes(k_ref, cfg, slot), _lanes(v_ref, cfg, slot)
      q = scaled(_lanes(q_refs[slot], cfg, slot), cfg.scale, k.dtype)
      do = _lanes(do_refs[slot], cfg, slot).astype(v.dtype)
      q, do = _in_tail(qb, cfg, lambda q, do: (_live(q, qb, cfg, 0), _live(do, qb, cfg, 0)), q, do)
      st = lax.dot_general(k, q, NT, preferred_element_type=F32)                 # [b keys, b queries]
      pt = jnp.exp(st - lse_refs[slot][slot:slot + 1, :])
      (pt,) = _in_tail(qb, cfg, lambda pt: (_live(pt, qb, cfg, 1),), pt)
      dv_sc[slot] += lax.dot_general(pt.astype(v.dtype), do, NN, preferred_element_type=F32)
      dpt = lax.dot_general(v, do, NT, preferred_element_type=F32)
      dst = pt * (dpt - delta_refs[slot][slot:slot + 1, :])
      dk_sc[slot] += lax.dot_general(dst.astype(q.dtype), q, NN, preferred_element_type=F32)

  @pl.when(j == cfg.nb - 1)
  def _done():
    for slot in range(g):
      lanes = slice(slot * cfg.head_dim, (slot + 1) * cfg.head_dim)
      dk_ref[:, lanes] = dk_sc[slot].astype(dk_ref.dtype)
      dv_ref[:, lanes] = dv_sc[slot].astype(dv_ref.dtype)


def _tpu_params(name: str, cost: pl.CostEstimate, cfg: _Config, sequential: bool = False,
                semantics: tuple[str, ...] | None = None) -> dict:
  """Compiler parameters of a ``(B, group, block, step)`` grid (or ``semantics``); ``sequential``: the
  block axis accumulates too (whole-sequence dk, dv)."""
  semantics = semantics or ("parallel", "parallel", "arbitrary" if sequential else "parallel", "arbitrary")
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics), cost_estimate=cost,
              interpret=pltpu.InterpretParams() if cfg.interpret else False, name=name)


class _Specs:
  """Block specs on a ``(B, group, i, j)`` grid over the 4-D operands ``[B, A, N, W]`` (``qkv`` and the
  ``[B, 1|H, N, H d|d]`` query- and key-side arrays) and the ``[B, G, nb, g, b]`` lse/delta rows.
  ``block_of(b, head, i, j, *tables)`` names the block a head's table-driven operand reads."""

  def __init__(self, cfg: _Config, block_of):
    self.cfg, self.block_of = cfg, block_of

  def at(self, section: int, grp):
    """``(A, W)`` block indices of ``section`` (0 q, 1 k, 2 v) of head group ``grp``."""
    c = self.cfg
    groups = c.heads // c.group
    return (0, section * groups + grp) if c.lanes else (section * c.heads + grp, 0)

  def tile(self, section: int, slot: int | None = None) -> pl.BlockSpec:
    """The ``[b, g d]`` tile of ``section``: of block ``i`` (``slot`` None), or of the block the table
    names for head ``slot`` of the group."""
    c = self.cfg

    def index(b, grp, i, j, *tables):
      blk = i if slot is None else self.block_of(b, grp * c.group + slot, i, j, *tables)
      return (b, self.at(section, grp)[0], blk, self.at(section, grp)[1])
    return pl.BlockSpec((None, None, c.block, c.group * c.head_dim), index)

  def q_and_kept_kv(self) -> list[pl.BlockSpec]:
    """q of block ``i``, then each head's kept k blocks, then its kept v blocks."""
    g = self.cfg.group
    return [self.tile(0)] + [self.tile(1, s) for s in range(g)] + [self.tile(2, s) for s in range(g)]

  def view(self, ref, section: int, b, grp):
    """With ``cfg.whole``: the group's ``[N, g d]`` of ``section`` for example ``b``, a view of all of qkv
    ``ref [B, A, N, W]`` in VMEM."""
    c = self.cfg
    a, w = self.at(section, grp)
    width = c.group * c.head_dim if c.lanes else c.head_dim
    return ref.at[b, a, :, pl.ds(pl.multiple_of(w * width, width), width)]

  def sequence(self, section: int) -> pl.BlockSpec:
    """The whole sequence ``[N, g d]`` of ``section`` for the group (one block index per example and
    group: loaded once for all its steps)."""
    c = self.cfg

    def index(b, grp, *rest):
      a, w = self.at(section, grp)
      return (b, a, 0, w)
    return pl.BlockSpec((None, None, c.n, c.group * c.head_dim), index)

  def first_rows(self, section: int = 0) -> pl.BlockSpec:
    """The first ``_TILE_ROWS`` rows ``[8, g d]`` of ``section`` for the group."""
    c = self.cfg

    def index(b, grp, *rest):
      a, w = self.at(section, grp)
      return (b, a, 0, w)
    return pl.BlockSpec((None, None, _TILE_ROWS, c.group * c.head_dim), index)

  def row_lse(self) -> pl.BlockSpec:
    """The dense first rows' lse ``[g, 8]`` of the group, on a ``(B, group)`` grid."""
    return pl.BlockSpec((None, None, self.cfg.group, _TILE_ROWS), lambda b, grp, *_: (b, grp, 0, 0))

  def all_rows(self) -> pl.BlockSpec:
    """Every block's lse rows ``[nb, g, b]`` of the group, on a ``(B, group)`` grid."""
    c = self.cfg
    return pl.BlockSpec((None, None, c.nb, c.group, c.block), lambda b, grp, *_: (b, grp, 0, 0, 0))

  def row(self, slot: int | None = None) -> pl.BlockSpec:
    """The group's lse/delta rows ``[g, b]`` of block ``i`` or of head ``slot``'s table block."""
    c = self.cfg

    def index(b, grp, i, j, *tables):
      blk = i if slot is None else self.block_of(b, grp * c.group + slot, i, j, *tables)
      return (b, grp, blk, 0, 0)
    return pl.BlockSpec((None, None, None, c.group, c.block), index)


def _tpu_forward(cfg: _Config, qkv, table, out_dtype):
  """``qkv [B, A, N, W]`` -> ``(out [B, 1|H, N, H d|d] out_dtype, lse [B, G, nb, g, b] f32)``."""
  bsz, n = qkv.shape[0], qkv.shape[2]
  g, d = cfg.group, cfg.head_dim
  specs = _Specs(cfg, lambda b, h, i, j, tab: _entry(tab, cfg, cfg.kept, b, h, i, j))
  pairs = cfg.pairs(bsz)
  side = nbytes(qkv) // 3
  cost = pl.CostEstimate(
      flops=4 * pairs * d, transcendentals=pairs + bsz * cfg.heads * cfg.nb * cfg.block,
      bytes_accessed=side * (1 + 2 * cfg.kept) + nbytes(table)
      + side // qkv.dtype.itemsize * jnp.dtype(out_dtype).itemsize + bsz * cfg.heads * cfg.nb * cfg.block * 4)
  return pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, cfg=cfg),
      out_shape=(out_struct(cfg.side_shape(bsz, n), qkv, out_dtype),
                 out_struct((bsz, cfg.heads // g, cfg.nb, g, cfg.block), qkv)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, cfg.heads // g, cfg.nb, cfg.kept),
          in_specs=specs.q_and_kept_kv(), out_specs=[specs.tile(0), specs.row()],
          scratch_shapes=[pltpu.VMEM((g, cfg.block, 1), F32), pltpu.VMEM((g, cfg.block, 1), F32),
                          pltpu.VMEM((g, cfg.block, d), F32)]),
      **_tpu_params("block_sparse_attention_fwd", cost, cfg),
  )(table.reshape(-1), qkv, *[qkv] * (2 * g))


def _resident(cfg: _Config, itemsize: int, backward: bool = False) -> bool:
  """Whether the resident kernels run (``_tpu_resident_fwd_kernel``, with ``backward`` its backward): a
  block is whole packed sublane tiles (the gathers concatenate blocks along sublanes), and the group's
  operands (double-buffered), results and padded scratch fit ``_RESIDENT_BYTES`` (a query block's float32
  logits, at most ``_RESIDENT_KEYS`` wide, come on top)."""
  n_pad = cfg.nb * cfg.block
  if backward:   # q, k, v, do, o in; dq, dk, dv out (or staged for DMA); scratch: the inputs, 3 gradients
    row_bytes = (2 * 5 + (3 if cfg.lanes else 2 * 3)) * cfg.n * itemsize + (5 * itemsize + 3 * 4) * n_pad
  else:          # q, k, v in; out; scratch: q, k, v, out
    row_bytes = (2 * 3 + 2) * cfg.n * itemsize + 4 * itemsize * n_pad
  return (cfg.block * itemsize) % 32 == 0 and row_bytes * cfg.group * cfg.head_dim <= _RESIDENT_BYTES


def _tpu_resident_forward(cfg: _Config, qkv, table, out_dtype):
  """``qkv [B, A, N, W]`` -> ``(out, lse [B, G, nb, g, b], row_lse [B, G, g, 8] | None)`` as
  ``_tpu_attention`` returns them, in one grid step per example and head group (without
  ``cfg.residuals``, ``(out, None, None)``: no logsumexp is computed)."""
  bsz, n = qkv.shape[0], qkv.shape[2]
  g, d = cfg.group, cfg.head_dim
  cfg = dataclasses.replace(cfg, whole=whole_in_vmem(qkv))
  specs = _Specs(cfg, None)
  pairs = cfg.pairs(bsz) + (bsz * cfg.heads * _TILE_ROWS * cfg.nb * cfg.block if cfg.dense_row else 0)
  rows = bsz * cfg.heads * cfg.nb * cfg.block if cfg.residuals else 0
  cost = pl.CostEstimate(flops=4 * pairs * d, transcendentals=pairs + rows,
                         bytes_accessed=nbytes(qkv, table) + nbytes(qkv) // 3 * jnp.dtype(out_dtype).itemsize
                         // qkv.dtype.itemsize + 4 * rows)
  out_shape = [out_struct(cfg.side_shape(bsz, n), qkv, out_dtype)]
  out_specs = [pl.BlockSpec(memory_space=pltpu.VMEM) if cfg.whole else specs.sequence(0)]
  if cfg.residuals:
    out_shape.append(out_struct((bsz, cfg.heads // g, cfg.nb, g, cfg.block), qkv))
    out_specs.append(specs.all_rows())
  if cfg.residuals and cfg.dense_row:
    out_shape.append(out_struct((bsz, cfg.heads // g, g, _TILE_ROWS), qkv))
    out_specs.append(specs.row_lse())
  padded = pltpu.VMEM((cfg.nb * cfg.block, g * d), qkv.dtype)
  in_blocks = pltpu.VMEM((cfg.nb, cfg.block, g * d), qkv.dtype)
  result = pl.pallas_call(
      functools.partial(_tpu_resident_fwd_kernel, cfg=cfg),
      out_shape=tuple(out_shape),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, cfg.heads // g),
          in_specs=([pl.BlockSpec(memory_space=pltpu.VMEM)] * 3 if cfg.whole
                    else [specs.sequence(0), specs.sequence(1), specs.sequence(2)]), out_specs=out_specs,
          scratch_shapes=[padded, in_blocks, in_blocks, pltpu.VMEM((cfg.nb * cfg.block, g * d), out_dtype)]),
      **_tpu_params("block_sparse_attention_resident_fwd", cost, cfg, semantics=("parallel", "parallel")),
  )(table.reshape(-1), qkv, qkv, qkv)
  return (tuple(result) + (None, None, None))[:3]


def _tpu_resident_backward(cfg: _Config, qkv, table, do, out, lse, row_lse):
  """The gradient of ``qkv``, the dense CLS row's included, in one grid step per example and head group:
  in ``qkv``'s layout and dtype with ``cfg.lanes``, else ``(dq, dk, dv)`` (the output's shape)."""
  bsz, n = qkv.shape[0], qkv.shape[2]
  g, d = cfg.group, cfg.head_dim
  specs = _Specs(cfg, None)
  pairs = cfg.pairs(bsz) + (bsz * cfg.heads * _TILE_ROWS * cfg.nb * cfg.block if cfg.dense_row else 0)
  # Products s, dp, dq, dk, dv (5 x 2 d flops per pair); q, k, v, do, out read once, dq, dk, dv written.
  cost = pl.CostEstimate(flops=10 * pairs * d, transcendentals=pairs,
                         bytes_accessed=nbytes(qkv, table, do, out, lse) + nbytes(qkv))
  in_specs = [specs.sequence(s) for s in range(3)] + [specs.sequence(0)] * 2 + [specs.all_rows()]
  args = [qkv, qkv, qkv, do, out, lse]
  if cfg.dense_row:
    in_specs.append(specs.row_lse())
    args.append(row_lse)
  padded = lambda dtype: pltpu.VMEM((cfg.nb * cfg.block, g * d), dtype)   # noqa: E731
  in_blocks = pltpu.VMEM((cfg.nb, cfg.block, g * d), qkv.dtype)                # k, v
  scratch = [padded(qkv.dtype), in_blocks, in_blocks] + [padded(qkv.dtype)] * 2 + [padded(F32)] * 3
  if cfg.lanes:   # one result in qkv's layout, written by DMA from a staging copy
    out_shape = out_struct(qkv.shape, qkv, qkv.dtype)
    out_specs = pl.BlockSpec(memory_space=pl.ANY)
    scratch += [pltpu.VMEM((3, n, g * d), qkv.dtype), pltpu.SemaphoreType.DMA((3,))]
  else:
    out_shape = (out_struct(cfg.side_shape(bsz, n), qkv, qkv.dtype),) * 3
    out_specs = [specs.sequence(0)] * 3
  return pl.pallas_call(
      functools.partial(_tpu_resident_bwd_kernel, cfg=cfg),
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, cfg.heads // g), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      **_tpu_params("block_sparse_attention_resident_bwd", cost, cfg, semantics=("parallel", "parallel")),
  )(table.reshape(-1), *args)


def _fused_backward_fits(cfg: _Config) -> bool:
  """Whether the one-pass backward's whole-sequence dk, dv (scratch and output blocks) fit its VMEM
  budget (``_FUSED_BACKWARD_BYTES``)."""
  n_pad = cfg.nb * cfg.block
  lanes = cfg.group * cfg.head_dim
  return 2 * 4 * n_pad * lanes + 2 * 2 * 4 * cfg.n * lanes <= _FUSED_BACKWARD_BYTES


def _tpu_backward(cfg: _Config, qkv, table, do, out, lse):
  """``(dq, dk, dv)`` (the output's shape, ``qkv``'s dtype) from ``do`` and ``out`` and the rows ``lse
  [B, G, nb, g, b]``: in one pass over the table (``_tpu_bwd_kernel``) where dk and dv fit in VMEM, else
  dq over the table and dk, dv over the transposed table."""
  bsz, n = qkv.shape[0], qkv.shape[2]
  g, d = cfg.group, cfg.head_dim
  pairs = cfg.pairs(bsz)
  grad = out_struct(cfg.side_shape(bsz, n), qkv, qkv.dtype)
  side = nbytes(qkv) // 3
  specs = _Specs(cfg, lambda b, h, i, j, tab: _entry(tab, cfg, cfg.kept, b, h, i, j))
  if _fused_backward_fits(cfg):
    # Products s, dp, dq, dk, dv (5 x 2 b^2 d flops per kept pair of blocks); k, v read once per kept block.
    cost = pl.CostEstimate(
        flops=10 * pairs * d, transcendentals=pairs,
        bytes_accessed=side * (1 + 2 * cfg.kept) + nbytes(do, out, table, lse)
        + 3 * side)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_tpu_bwd_kernel, cfg=cfg),
        out_shape=(grad, grad, grad),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(bsz, cfg.heads // g, cfg.nb, cfg.kept),
            in_specs=specs.q_and_kept_kv() + [specs.tile(0), specs.tile(0), specs.row()],
            out_specs=[specs.tile(0), specs.sequence(0), specs.sequence(0)],
            scratch_shapes=[pltpu.VMEM((g, cfg.block, d), F32)]
            + [pltpu.VMEM((g, cfg.nb * cfg.block, d), F32)] * 2 + [pltpu.VMEM((g, cfg.block, 1), F32)]),
        **_tpu_params("block_sparse_attention_bwd", cost, cfg, sequential=True),
    )(table.reshape(-1), qkv, *[qkv] * (2 * g), do, out, lse)
    return dq, dk, dv
  delta = _delta_rows(cfg, do, out)
  # dq: products s, dp, dq (3 x 2 b^2 d flops per kept pair of blocks); k, v read once per kept block.
  dq_cost = pl.CostEstimate(
      flops=6 * pairs * d, transcendentals=pairs,
      bytes_accessed=side * (2 + 2 * cfg.kept) + nbytes(do, table, lse, delta))
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, cfg=cfg),
      out_shape=grad,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, cfg.heads // g, cfg.nb, cfg.kept),
          in_specs=specs.q_and_kept_kv() + [specs.tile(0), specs.row(), specs.row()],
          out_specs=specs.tile(0), scratch_shapes=[pltpu.VMEM((g, cfg.block, d), F32)]),
      **_tpu_params("block_sparse_attention_dq", dq_cost, cfg),
  )(table.reshape(-1), qkv, *[qkv] * (2 * g), do, lse, delta)

  rows, counts = blocks.transpose(table, cfg.nb)
  # dk, dv over the transposed table: block i of the grid is a key block, the table names query blocks.
  specs = _Specs(cfg, lambda b, h, i, j, rws, cnt: _entry(rws, cfg, cfg.nb, b, h, i, j))
  dkv_cost = pl.CostEstimate(
      flops=8 * pairs * d, transcendentals=pairs,
      bytes_accessed=4 * side + nbytes(rows, counts) + cfg.kept * (side + nbytes(do, lse, delta)))
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, cfg=cfg),
      out_shape=(grad, grad),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(bsz, cfg.heads // g, cfg.nb, cfg.nb),
          in_specs=[specs.tile(1), specs.tile(2)] + [specs.tile(0, s) for s in range(g)]
          + [specs.tile(0, s) for s in range(g)] + [specs.row(s) for s in range(g)]
          + [specs.row(s) for s in range(g)],
          out_specs=[specs.tile(0), specs.tile(0)],
          scratch_shapes=[pltpu.VMEM((g, cfg.block, d), F32), pltpu.VMEM((g, cfg.block, d), F32)]),
      **_tpu_params("block_sparse_attention_dkv", dkv_cost, cfg),
  )(rows.reshape(-1), counts.reshape(-1), qkv, qkv, *[qkv] * g, *[do] * g, *[lse] * g, *[delta] * g)
  return dq, dk, dv


def _tpu_dense_row_forward(cfg: _Config, qkv, out_dtype):
  """The dense first row: ``(rows [B, 1|H, 8, H d|d] out_dtype, lse [B, G, g, 8] f32)``, row 0 valid."""
  bsz, n = qkv.shape[0], qkv.shape[2]
  g, d = cfg.group, cfg.head_dim
  specs = _Specs(cfg, None)
  pairs = bsz * cfg.heads * _TILE_ROWS * n
  cost = pl.CostEstimate(flops=4 * pairs * d, transcendentals=pairs,
                         bytes_accessed=2 * nbytes(qkv) // 3 + 2 * pairs // n * d * qkv.dtype.itemsize)
  return pl.pallas_call(
      functools.partial(_tpu_dense_row_fwd_kernel, cfg=cfg),
      out_shape=(out_struct(cfg.side_shape(bsz, _TILE_ROWS), qkv, out_dtype),
                 out_struct((bsz, cfg.heads // g, g, _TILE_ROWS), qkv)),
      grid=(bsz, cfg.heads // g),
      in_specs=[specs.first_rows(0), specs.sequence(1), specs.sequence(2)],
      out_specs=[specs.first_rows(0), specs.row_lse()],
      **_tpu_params("block_sparse_attention_cls_fwd", cost, cfg, semantics=("parallel", "parallel")),
  )(qkv, qkv, qkv)


def _tpu_dense_row_backward(cfg: _Config, qkv, do, out, row_lse):
  """The dense first row's gradients, float32: ``(dq [B, 1|H, 8, H d|d]`` (rows 1.. zero), ``dk, dv``
  (the output's shape))."""
  bsz, n = qkv.shape[0], qkv.shape[2]
  g, d = cfg.group, cfg.head_dim
  specs = _Specs(cfg, None)
  pairs = bsz * cfg.heads * _TILE_ROWS * n
  cost = pl.CostEstimate(flops=10 * pairs * d, transcendentals=pairs,
                         bytes_accessed=2 * nbytes(qkv) // 3 * (1 + 2 * 4 // qkv.dtype.itemsize))
  grads = (out_struct(cfg.side_shape(bsz, _TILE_ROWS), qkv),) + (out_struct(cfg.side_shape(bsz, n), qkv),) * 2
  return pl.pallas_call(
      functools.partial(_tpu_dense_row_bwd_kernel, cfg=cfg),
      out_shape=grads, grid=(bsz, cfg.heads // g),
      in_specs=[specs.first_rows(0), specs.sequence(1), specs.sequence(2), specs.first_rows(0),
                specs.first_rows(0), specs.row_lse()],
      out_specs=[specs.first_rows(0), specs.sequence(0), specs.sequence(0)],
      **_tpu_params("block_sparse_attention_cls_bwd", cost, cfg, semantics=("parallel", "parallel")),
  )(qkv, qkv, qkv, do, out, row_lse)


def _tpu_attention(cfg: _Config, qkv, table):
  """``(out, lse, row_lse)``: the block kernels' output and rows, with the dense first row in place
  (``row_lse`` its lse; the block backward's lse is +inf there) when ``cfg.dense_row``, else None."""
  if _resident(cfg, qkv.dtype.itemsize):
    return _tpu_resident_forward(cfg, qkv, table, qkv.dtype)
  out, lse = _tpu_forward(cfg, qkv, table, qkv.dtype)
  if not cfg.dense_row:
    return out, lse, None
  rows, row_lse = _tpu_dense_row_forward(cfg, qkv, qkv.dtype)
  return out.at[:, :, :1].set(rows[:, :, :1]), lse.at[:, :, 0, :, 0].set(jnp.inf), row_lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tpu_core(cfg: _Config, qkv, table):
  """The attention without a gradient (evaluation, a teacher): no logsumexp rows for a backward."""
  return _tpu_attention(dataclasses.replace(cfg, residuals=False), qkv, table)[0]


def _tpu_core_fwd(cfg: _Config, qkv, table):
  out, lse, row_lse = _tpu_attention(cfg, qkv, table)
  return out, (qkv, table, out, lse, row_lse)


def _delta_rows(cfg: _Config, do, out) -> Array:
  """``rowsum(dO * O)`` as the kernels' rows ``[B, G, nb, g, b]`` float32."""
  bsz, n = do.shape[0], do.shape[2]
  delta = jnp.sum(cfg.from_side(do.astype(F32) * out.astype(F32)), axis=-1)   # [B, N, H]
  delta = jnp.pad(delta, ((0, 0), (0, cfg.nb * cfg.block - n), (0, 0)))
  g = cfg.group
  return delta.reshape(bsz, cfg.nb, cfg.block, cfg.heads // g, g).transpose(0, 3, 1, 4, 2)


def _tpu_core_bwd(cfg: _Config, res, dout):
  qkv, table, out, lse, row_lse = res
  dout = dout.astype(qkv.dtype)
  if _resident(cfg, qkv.dtype.itemsize, backward=True):   # the dense row's gradients included
    grads = _tpu_resident_backward(cfg, qkv, table, dout, out, lse, row_lse)
    if cfg.lanes:
      return grads, None
    dq, dk, dv = grads
  else:
    dq, dk, dv = _tpu_backward(cfg, qkv, table, dout, out, lse)
    if cfg.dense_row:
      row_dq, row_dk, row_dv = _tpu_dense_row_backward(cfg, qkv, dout, out, row_lse)
      add = lambda x, y: (x.astype(F32) + y).astype(x.dtype)   # noqa: E731
      dq = dq.at[:, :, :_TILE_ROWS].set(add(dq[:, :, :_TILE_ROWS], row_dq))
      dk, dv = add(dk, row_dk), add(dv, row_dv)
  return jnp.concatenate([dq, dk, dv], axis=-1 if cfg.lanes else 1), None


_tpu_core.defvjp(_tpu_core_fwd, _tpu_core_bwd)


# ------------------------------------------------------------------------------------------------
# GPU (Triton). Operands ``[B, N_pad, H, d_pad]``; a program holds one tile of ``sub = min(b, 64)`` rows
# (Triton keeps a tile's logits in registers and shared memory: larger blocks run as several tiles) and
# loops over the tiles of its block's kept blocks, reading each at its offset.


def _split(j, r: int):
  """``(j // r, j % r)`` for a traced int32 ``j`` and a static ``r`` (no ops when ``r`` is 1)."""
  if r == 1:
    return j, 0
  return lax.div(j, jnp.int32(r)), lax.rem(j, jnp.int32(r))


def _gpu_fwd_kernel(tab_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
  q = scaled(q_ref[...], cfg.scale, k_ref.dtype)
  sub, r = cfg.sub, cfg.block // cfg.sub

  def body(j, carry):
    slot, tile = _split(j, r)                                       # key tile j: of kept block j // r
    first = tab_ref[slot] * cfg.block + tile * sub
    keys = pl.ds(first, sub)
    s = lax.dot_general(q, k_ref[keys, :], NT, preferred_element_type=F32)
    if cfg.ragged:
      s = _real_keys(s, None, cfg, 1, first)
    return online_softmax_step(s, *carry, v_ref[keys, :])

  init = (jnp.full((sub, 1), -jnp.inf, F32), jnp.zeros((sub, 1), F32), jnp.zeros((sub, q.shape[-1]), F32))
  out, lse = finalize(*lax.fori_loop(0, cfg.kept * r, body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(sub)


def _gpu_dq_kernel(tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
  dtype = k_ref.dtype
  sub, r = cfg.sub, cfg.block // cfg.sub
  q = scaled(q_ref[...], cfg.scale, dtype)
  do = do_ref[...].astype(dtype)
  lse, delta = lse_ref[...].reshape(sub, 1), delta_ref[...].reshape(sub, 1)

  def body(j, dq):
    slot, tile = _split(j, r)
    first = tab_ref[slot] * cfg.block + tile * sub
    keys = pl.ds(first, sub)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)
    if cfg.ragged:
      s = _real_keys(s, None, cfg, 1, first)
    p = jnp.exp(s - lse)
    ds = p * (lax.dot_general(do, v, NT, preferred_element_type=F32) - delta)
    return dq + lax.dot_general(ds.astype(dtype), k, NN, preferred_element_type=F32)

  dq = lax.fori_loop(0, cfg.kept * r, body, jnp.zeros(q.shape, F32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(rows_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                    cfg: _Config):
  """``rows_ref``: this key block's count, then the query blocks keeping it."""
  k, v = k_ref[...], v_ref[...]
  sub, r = cfg.sub, cfg.block // cfg.sub
  tn = (((0,), (0,)), ((), ()))        # a.T @ b
  first_key = pl.program_id(0) * sub

  def body(j, carry):
    dk, dv = carry
    slot, tile = _split(j, r)
    queries = pl.ds(rows_ref[slot + 1] * cfg.block + tile * sub, sub)
    q = scaled(q_ref[queries, :], cfg.scale, k.dtype)
    do = do_ref[queries, :].astype(k.dtype)
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)                    # [sub, sub]
    if cfg.ragged:
      s = _real_keys(s, None, cfg, 1, first_key)
    p = jnp.exp(s - lse_ref[queries].reshape(sub, 1))
    dv = dv + lax.dot_general(p.astype(k.dtype), do, tn, preferred_element_type=F32)
    ds = p * (lax.dot_general(do, v, NT, preferred_element_type=F32) - delta_ref[queries].reshape(sub, 1))
    dk = dk + lax.dot_general(ds.astype(k.dtype), q, tn, preferred_element_type=F32)
    return dk, dv

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = lax.fori_loop(0, rows_ref[0] * r, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_params(name: str, cost: pl.CostEstimate, cfg: _Config) -> dict:
  return dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=cfg.interpret,
              cost_estimate=cost, name=name)


def _pow2_columns(t: Array) -> Array:
  """Pads the last axis to a power of two (Triton's block rule) by repeating its last column."""
  width = next_pow2(t.shape[-1])
  return jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, width - t.shape[-1])], mode="edge")


class _GpuSpecs:
  """Block specs on a ``(tile, B, H)`` grid: ``[sub, d]`` tiles, the tile's table row (of its block,
  ``tile // r``), whole ``[N_pad, d]`` operands and lse/delta rows."""

  def __init__(self, cfg: _Config, n_pad: int, d: int):
    sub, r = cfg.sub, cfg.block // cfg.sub
    self.tile = pl.BlockSpec((None, sub, None, d), lambda i, b, h: (b, i, h, 0))
    self.whole = pl.BlockSpec((None, n_pad, None, d), lambda i, b, h: (b, 0, h, 0))
    self.row = pl.BlockSpec((None, None, sub), lambda i, b, h: (b, h, i))
    self.all_rows = pl.BlockSpec((None, None, n_pad), lambda i, b, h: (b, h, 0))
    self.table = lambda width: pl.BlockSpec((None, None, None, width),
                                            lambda i, b, h: (b, h, _split(i, r)[0], 0))


def _gpu_forward(cfg: _Config, q, k, v, table):
  """``q, k, v [B, N_pad, H, d_pad]`` -> ``(out [B, N_pad, H, d_pad] f32, lse [B, H, N_pad] f32)``."""
  bsz, n_pad, nh, d = q.shape
  table = _pow2_columns(table)
  specs = _GpuSpecs(cfg, n_pad, d)
  pairs = cfg.pairs(bsz)
  cost = pl.CostEstimate(
      flops=4 * pairs * d, transcendentals=pairs + bsz * nh * n_pad,
      bytes_accessed=nbytes(q, table) + 2 * cfg.kept * nbytes(k) + bsz * nh * n_pad * (d + 1) * 4)
  return pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, cfg=cfg),
      out_shape=(out_struct(q.shape, q), out_struct((bsz, nh, n_pad), q)),
      grid=(n_pad // cfg.sub, bsz, nh),
      in_specs=[specs.table(table.shape[-1]), specs.tile, specs.whole, specs.whole],
      out_specs=[specs.tile, specs.row],
      **_gpu_params("block_sparse_attention_fwd", cost, cfg),
  )(table, q, k, v)


def _gpu_backward(cfg: _Config, q, k, v, table, do, lse, delta):
  """``(dq, dk, dv)`` float32 ``[B, N_pad, H, d_pad]`` from ``do`` and ``lse, delta [B, H, N_pad]``."""
  bsz, n_pad, nh, d = q.shape
  pairs = cfg.pairs(bsz)
  specs = _GpuSpecs(cfg, n_pad, d)
  grid = (n_pad // cfg.sub, bsz, nh)
  padded = _pow2_columns(table)
  dq_cost = pl.CostEstimate(
      flops=6 * pairs * d, transcendentals=pairs,
      bytes_accessed=nbytes(q, do, padded, lse, delta) + 2 * cfg.kept * nbytes(k) + nbytes(q) * 4
      // q.dtype.itemsize)
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, cfg=cfg),
      out_shape=out_struct(q.shape, q), grid=grid,
      in_specs=[specs.table(padded.shape[-1]), specs.tile, specs.whole, specs.whole, specs.tile, specs.row,
                specs.row],
      out_specs=specs.tile, **_gpu_params("block_sparse_attention_dq", dq_cost, cfg),
  )(padded, q, k, v, do, lse, delta)

  rows, counts = blocks.transpose(table, cfg.nb)
  rows = _pow2_columns(jnp.concatenate([counts[..., None], rows], axis=-1))
  dkv_cost = pl.CostEstimate(
      flops=8 * pairs * d, transcendentals=pairs,
      bytes_accessed=nbytes(k, v, rows) + cfg.kept * nbytes(q, do, lse, delta) + 2 * nbytes(k) * 4
      // k.dtype.itemsize)
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, cfg=cfg),
      out_shape=(out_struct(k.shape, q), out_struct(v.shape, q)), grid=grid,
      in_specs=[specs.table(rows.shape[-1]), specs.whole, specs.tile, specs.tile, specs.whole,
                specs.all_rows, specs.all_rows],
      out_specs=[specs.tile, specs.tile], **_gpu_params("block_sparse_attention_dkv", dkv_cost, cfg),
  )(rows, q, k, v, do, lse, delta)
  return dq, dk, dv


_gpu_core = gpu_flash_core(_gpu_forward, _gpu_backward)


# ------------------------------------------------------------------------------------------------


def _tpu_layout(cfg: _Config, **changes) -> _Config:
  """``cfg`` with the TPU head grouping: heads whose lanes form one 128-lane tile per grid step, read in
  the qkv layout (``lanes``), else one head per step, heads-first."""
  d, nh = cfg.head_dim, cfg.heads
  group = 128 // d if 128 % d == 0 and nh % (128 // d) == 0 else 1
  return dataclasses.replace(cfg, group=group, lanes=group * d % 128 == 0, **changes)


DENSE_BLOCK = 128   # TPU: blocks of the dense attention on the resident kernels (every block kept)


def resident_dense_fits(shape: tuple[int, ...], dtype, backward: bool = False) -> bool:
  """Whether dense attention of ``q [B, N, H, d]`` runs on the TPU resident kernels (``dense_table``,
  blocks of ``DENSE_BLOCK``), the forward (DeiT-S: up to about 4,000 tokens) or with ``backward`` the
  backward (up to about 1,750). By the clock they beat the flash-style kernel (``pallas.attention``)
  1.25x at 197 tokens, 6.7x at 785 and 6.8x at 3,137 (DeiT-S, v5e, forward), whose grid pays a step's
  fixed cost per (query block, key block) and rescales an online softmax at every key block."""
  _, n, nh, d = shape
  nb = blocks.count(n, DENSE_BLOCK)
  cfg = _tpu_layout(_Config(scale=1.0, interpret=False, block=DENSE_BLOCK, nb=nb, kept=nb, n=n, heads=nh,
                            head_dim=d))
  return _resident(cfg, jnp.dtype(dtype).itemsize, backward=backward)


def dense_table(n: int, heads: int) -> Array:
  """The kept-block table ``[1, H, nb, nb]`` of dense attention in blocks of ``DENSE_BLOCK``."""
  nb = blocks.count(n, DENSE_BLOCK)
  return jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (1, heads, nb, nb))


def check_block(block: int, backend: str) -> None:
  """Raises ValueError unless ``block`` suits ``backend``'s kernels: a multiple of 8 (TPU sublanes), a
  power of two of at least 16 on GPU (Triton's dot tiles)."""
  if backend == "tpu" and block % 8:
    raise ValueError(f"mask_block={block}: the TPU block kernels need a multiple of 8")
  if backend == "gpu" and (block < 16 or block & (block - 1)):
    raise ValueError(f"mask_block={block}: the GPU block kernels need a power of two >= 16")


def block_sparse_attention(q: Array, k: Array, v: Array, table: Array, *, block: int, scale: float,
                           dense_rows: int = 0, first_zero: bool = False, backend: str = "tpu",
                           interpret: bool = False) -> Array:
  """Attention over kept blocks: ``[B, N, H, d]`` x3 and a kept-block table -> ``[B, N, H, d]`` float32.

  Args:
    q, k, v: ``[B, N, H, d]``; the products run in q's dtype (k and v cast to it), softmax in float32.
    table: ``[B|1, H, nb, K] int32`` (``attention.blocks``): query block ``i`` of head ``h`` attends to
      the tokens of key blocks ``table[b, h, i]`` (distinct; ``nb = ceil(N / block)``). No gradient.
    block: tokens per block (``check_block``).
    scale: the logit scale (``d ** -0.5``).
    dense_rows: the leading query rows (CLS) that attend to every key instead: one row has its own TPU
      kernels; more rows, and on GPU, they are computed in XLA here.
    first_zero: every row of ``table`` starts with key block 0 (block mode's tables, which always keep
      the CLS key's block, increasing; a dense table): the TPU resident kernels take that block without
      reading the table. Wrong results if it does not hold.
    backend: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton); ``interpret``: run on CPU.

  Returns:
    ``[B, N, H, d]`` float32, differentiable in q, k and v (the backward is Pallas too).
  """
  if backend not in ("tpu", "gpu"):
    raise ValueError(f"unknown backend {backend!r}; allowed: 'tpu', 'gpu'")
  check_block(block, backend)
  bsz, n, nh, d = q.shape
  nb = blocks.count(n, block)
  if table.ndim != 4 or table.shape[1:3] != (nh, nb) or table.shape[0] not in (1, bsz):
    raise ValueError(f"block table {table.shape} does not fit q {q.shape} with block {block} "
                     f"(want [B|1, {nh}, {nb}, K])")
  cfg = _Config(scale=float(scale), interpret=bool(interpret), block=block, nb=nb, kept=table.shape[-1],
                n=n, heads=nh, head_dim=d, first_zero=bool(first_zero))
  dtype = q.dtype
  table = jnp.broadcast_to(table.astype(jnp.int32), (bsz, *table.shape[1:]))
  q, k, v, table = same_vma(q, k.astype(dtype), v.astype(dtype), table)
  if backend == "tpu":
    cfg = _tpu_layout(cfg, dense_row=dense_rows == 1)
    qkv = jnp.stack([q, k, v], axis=2)                                      # [B, N, 3, H, d]
    qkv = (qkv.reshape(bsz, 1, n, 3 * nh * d) if cfg.lanes
           else qkv.transpose(0, 2, 3, 1, 4).reshape(bsz, 3 * nh, n, d))
    out = cfg.from_side(_tpu_core(cfg, qkv, lax.stop_gradient(table))).astype(F32)
    if cfg.dense_row:
      return out
  else:
    cfg = dataclasses.replace(cfg, sub=min(block, _GPU_TILE))
    n_pad, d_pad = nb * block, max(16, next_pow2(d))
    pad = lambda t: jnp.pad(t, ((0, 0), (0, n_pad - n), (0, 0), (0, d_pad - d)))   # noqa: E731
    out = _gpu_core(cfg, pad(q), pad(k), pad(v), lax.stop_gradient(table))[:, :n, :, :d]
  if not dense_rows:
    return out
  logits = mixed_einsum("bqhd,bkhd->bhqk", q[:, :dense_rows] * scale, k, dtype)   # [B, H, nd, N]
  first = mixed_einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, dtype)
  return jnp.concatenate([first, out[:, dense_rows:]], axis=1)
