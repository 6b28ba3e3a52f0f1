"""Fused masked attention in Pallas (flash style), forward and backward, for TPU (Mosaic) and GPU (Triton).

``flash_attention(q, k, v, packed, scale=...)`` is the function of the reference executor
``executors.masked_attention``: ``logits = scale * q.k`` (products in q's dtype, float32 accumulation),
``-inf`` where the bit-packed mask (``attention.bitmask``) drops a key, softmax in float32 over the kept keys,
a row with no kept key returns 0. q, k and v are read block by block, the mask is expanded from its bits
on chip, and no ``[B, H, N, N]`` logits or probabilities ever reach HBM: the forward keeps an online
softmax per query block and saves only the output and the per-row logsumexp; the backward (flash attention
2) recomputes the probabilities block by block in two kernels, one for dq (loop over key blocks) and one
for dk, dv (loop over query blocks).

Sizes: ``N_q``, ``N_k`` are token counts (queries, keys); ``bq``, ``bk`` the tokens of one block;
``q_blocks = ceil(N_q / bq)`` and ``k_blocks = ceil(N_k / bk)`` block counts.

Mask layout shared by both backends: the packed words ``[B|1, H|1, W, N_q]`` are padded and regrouped per
key block into ``words [B|1, H|1, k_blocks, ceil(bk / 32), q_blocks * bq]`` (queries on the minor axis:
compact in TPU HBM, whose tiles are 8 x 128). Word ``j`` of a block covers its keys ``32 j .. 32 j + 31``.

TPU: batch, query block and key block form the grid (``(B, q_blocks, k_blocks)`` forward and dq,
``(B, k_blocks, q_blocks)`` dk/dv) and each program loops over the heads. q, k and v are read from
``qkv [B, N, 3 H d]``, the qkv projection's own layout, and the output is written as ``[B, N, H d]``, the
output projection's: no transposes and no padding in HBM (a sequence up to 512 tokens is one block;
longer ones have a partial last block whose rows past N are zeroed in the kernel). A table of
``(query block, key block)`` pairs that some head keeps anything of is prefetched into SMEM, and the other
pairs are skipped.
GPU: the grid is ``(query or key block, B, H)`` over the ``[B, N, H, d]`` inputs (no transposes), with a
``fori_loop`` over the other block axis; d is padded to a power of two >= 16 as Triton requires.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from sparsifiner_jax.attention import bitmask
from sparsifiner_jax.attention.pallas.common import (F32, NN, NT, col_to_row, copy_all, finalize,
                                                   gpu_flash_core, nbytes, next_pow2, online_softmax_step,
                                                   out_struct, row_to_col, same_vma, scaled)

Array = jax.Array
BITS = bitmask.BITS


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of one call (hashable: the custom_vjp's non-differentiable argument)."""
  scale: float
  interpret: bool
  bq: int                # query rows per block
  bk: int                # keys per block (a multiple of 32)
  q_blocks: int          # query blocks: ceil(N_q / bq)
  k_blocks: int          # key blocks: ceil(N_k / bk)
  mask_b: bool           # the mask has a batch axis (else broadcast)
  mask_h: bool           # the mask has a head axis (else broadcast)
  heads: int = 0         # TPU: H, d and the real sequence length N
  head_dim: int = 0
  n: int = 0
  split: bool = True     # TPU: q, k and v are separate lane blocks of qkv (H d a multiple of 128)
  dense: bool = False    # no mask: every real key kept (the words are not read)
  n_keys: int = 0        # the real key count (keys past it are padding; TPU: equal to n)

  @property
  def in_place(self) -> bool:
    """TPU: the backward writes the qkv gradient in qkv's layout (``_write_kv_sections``): split sections
    and whole key blocks (a DMA takes whole sublane tiles: a ragged last block of several would not)."""
    return self.split and (self.k_blocks == 1 or self.n_keys % self.bk == 0)

  @property
  def nw(self) -> int:
    """Words per query and key block."""
    return bitmask.words(self.bk)

  def mask_index(self, b, h):
    return (b if self.mask_b else 0, h if self.mask_h else 0)

  def tpu_interpret(self):
    return pltpu.InterpretParams() if self.interpret else False


def _block_sizes(backend: str, n_q: int, n_k: int, block_q: int | None, block_k: int | None):
  """Default blocks. TPU: the whole sequence up to 512 tokens (a block equal to the array is always
  legal, and nothing is padded), else 128 rows (lane-aligned words; the last block partial). GPU: powers
  of two (Triton), 64 at most."""
  if backend == "tpu":
    bq = block_q or (n_q if n_q <= 512 else 128)
    bk = block_k or (n_k if n_k <= 512 else 128)
    if (bq != n_q and bq % 8) or (bk != n_k and bk % BITS):
      raise ValueError(f"TPU blocks: block_q={bq} must be N or a multiple of 8 and block_k={bk} N or a "
                       f"multiple of {BITS}")
    return bq, bk
  else:
    bq = block_q or min(64, max(16, next_pow2(n_q)))
    bk = block_k or min(64, max(32, next_pow2(n_k)))
    if bq & (bq - 1) or bk & (bk - 1):
      raise ValueError(f"GPU blocks must be powers of two, got block_q={bq}, block_k={bk}")
  if bq % 8 or bk % BITS:
    raise ValueError(f"block_q={bq} must be a multiple of 8 and block_k={bk} a multiple of {BITS}")
  return bq, bk


# ------------------------------------------------------------------------------------------------
# Shared on-chip math.


def _expand_bits(word_slices, shape, key_axis: int) -> Array:
  """The boolean keep tile ``shape`` (keys along ``key_axis``) from its ``bk / 32`` packed words.

  ``word_slices[j]`` broadcasts against ``shape`` (``[bq, 1]`` with keys on lanes, ``[1, bq]`` with keys
  on sublanes) and holds the word of keys ``32 j .. 32 j + 31``. Only selects, shifts and ands: no
  gathers, no unaligned concatenation.
  """
  key = lax.broadcasted_iota(jnp.int32, shape, key_axis)
  group = key >> 5
  word = jnp.zeros(shape, jnp.int32)
  for j, w in enumerate(word_slices):
    word = jnp.where(group == j, jnp.broadcast_to(w, shape), word)
  return (lax.shift_right_logical(word, key & (BITS - 1)) & 1) != 0


# ------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels. They read q, k and v where the qkv projection wrote them, ``qkv [B, N, 3 H d]``
# (no heads-first transpose, no padding: a block of rows is the whole sequence or a multiple of 128 rows,
# a partial last block masked in the kernel), loop over the heads inside a program, and write the output
# as ``[B, N, H d]``, the layout the output projection reads. Words are ``[H|1, nw, bq]`` tiles,
# lse/delta ``[H, 1, bq]`` (queries on lanes).


def _occupied(occ_ref, cfg: _Config, b, qi, ki):
  mb = b if cfg.mask_b else 0
  return occ_ref[(mb * cfg.q_blocks + qi) * cfg.k_blocks + ki] != 0


def _head(ref, cfg: _Config, section: int, h: int) -> Array:
  """Head ``h`` of a q (``section`` 0), k (1) or v (2) block ``[rows, d]``: its lanes of the block."""
  start = (0 if cfg.split else section * cfg.heads * cfg.head_dim) + h * cfg.head_dim
  return ref[:, start:start + cfg.head_dim]


def _live_rows(x: Array, block: int, size: int, n: int) -> Array:
  """``x [size, ...]`` of block ``block`` with rows at or past ``n`` zeroed: a partial last block reads
  past the array, and garbage times a zero probability would still be NaN."""
  if n % size == 0:
    return x
  row = block * size + lax.broadcasted_iota(jnp.int32, (size, 1), 0)
  return jnp.where(row < n, x, jnp.zeros_like(x))


def _keys_valid(ki, cfg: _Config, shape, key_axis: int) -> Array | None:
  """Dense mode: which keys of key block ``ki`` are real (``< n_keys``), as a ``shape`` tile with keys
  along ``key_axis``; None where no block has padding."""
  if cfg.n_keys % cfg.bk == 0:
    return None
  return ki * cfg.bk + lax.broadcasted_iota(jnp.int32, shape, key_axis) < cfg.n_keys


def _where(keep: Array | None, x: Array, fill) -> Array:
  return x if keep is None else jnp.where(keep, x, fill)


def _tpu_keep(w_ref, cfg: _Config, h: int, shape, key_axis: int, ki) -> Array | None:
  """The keep tile of head ``h`` (keys along ``key_axis``): the mask's bits, or in dense mode the real
  keys of key block ``ki`` (None: all)."""
  if cfg.dense:
    return _keys_valid(ki, cfg, shape, key_axis)
  hm = h if cfg.mask_h else 0
  words = [w_ref[hm, j:j + 1, :] for j in range(cfg.nw)]
  if key_axis == 1:
    words = [row_to_col(w) for w in words]
  return _expand_bits(words, shape, key_axis)


def _tpu_fwd_kernel(occ_ref, q_ref, k_ref, v_ref, w_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                    cfg: _Config):
  b, qi, ki = (pl.program_id(i) for i in range(3))

  @pl.when(ki == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, F32)
    l_sc[...] = jnp.zeros(l_sc.shape, F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

  @pl.when(_occupied(occ_ref, cfg, b, qi, ki))
  def _step():
    for h in range(cfg.heads):
      k = _head(k_ref, cfg, 1, h)
      v = _live_rows(_head(v_ref, cfg, 2, h), ki, cfg.bk, cfg.n)
      q = scaled(_head(q_ref, cfg, 0, h), cfg.scale, k.dtype)
      s = lax.dot_general(q, k, NT, preferred_element_type=F32)                  # [bq, bk]
      s = _where(_tpu_keep(w_ref, cfg, h, s.shape, 1, ki), s, -jnp.inf)
      m, l, acc = online_softmax_step(s, m_sc[h], l_sc[h], acc_sc[h], v)
      m_sc[h], l_sc[h], acc_sc[h] = m, l, acc

  @pl.when(ki == cfg.k_blocks - 1)
  def _done():
    d = cfg.head_dim
    for h in range(cfg.heads):
      out, lse = finalize(m_sc[h], l_sc[h], acc_sc[h])
      o_ref[:, h * d:(h + 1) * d] = out.astype(o_ref.dtype)
      lse_ref[h] = col_to_row(lse)


def _tpu_dq_kernel(occ_ref, q_ref, k_ref, v_ref, w_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
                   cfg: _Config):
  b, qi, ki = (pl.program_id(i) for i in range(3))
  d = cfg.head_dim

  @pl.when(ki == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, F32)

  @pl.when(_occupied(occ_ref, cfg, b, qi, ki))
  def _step():
    for h in range(cfg.heads):
      k = _live_rows(_head(k_ref, cfg, 1, h), ki, cfg.bk, cfg.n)
      v = _live_rows(_head(v_ref, cfg, 2, h), ki, cfg.bk, cfg.n)
      q = scaled(_head(q_ref, cfg, 0, h), cfg.scale, k.dtype)
      s = lax.dot_general(q, k, NT, preferred_element_type=F32)                  # [bq, bk]
      keep = _tpu_keep(w_ref, cfg, h, s.shape, 1, ki)
      p = _where(keep, jnp.exp(s - row_to_col(lse_ref[h])), 0.0)
      do = do_ref[:, h * d:(h + 1) * d].astype(v.dtype)
      dp = lax.dot_general(do, v, NT, preferred_element_type=F32)
      ds = _where(keep, p * (dp - row_to_col(delta_ref[h])), 0.0)
      dq_sc[h] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32)

  @pl.when(ki == cfg.k_blocks - 1)
  def _done():
    for h in range(cfg.heads):
      dq_ref[:, h * d:(h + 1) * d] = (dq_sc[h] * cfg.scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(occ_ref, q_ref, k_ref, v_ref, w_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
  """Keys on sublanes, queries on lanes: ``s.T [bk, bq]``, so lse/delta rows need no relayout and all
  four products are plain or rhs-transposed matmuls. Results: ``dk_ref, dv_ref [bk, H d]``, or with
  ``cfg.in_place`` the dq kernel's ``[B, N, 3 H d]`` result (in HBM, aliased), whose k and v sections this
  kernel fills by DMA (``_write_kv_sections``)."""
  if cfg.in_place:
    _, dqkv_hbm, dk_sc, dv_sc, stage, sems = refs
  else:
    dk_ref, dv_ref, dk_sc, dv_sc = refs
  b, ki, qi = (pl.program_id(i) for i in range(3))
  d = cfg.head_dim

  @pl.when(qi == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

  @pl.when(_occupied(occ_ref, cfg, b, qi, ki))
  def _step():
    for h in range(cfg.heads):
      k, v = _head(k_ref, cfg, 1, h), _head(v_ref, cfg, 2, h)
      q = _live_rows(scaled(_head(q_ref, cfg, 0, h), cfg.scale, k.dtype), qi, cfg.bq, cfg.n)
      do = _live_rows(do_ref[:, h * d:(h + 1) * d].astype(v.dtype), qi, cfg.bq, cfg.n)
      st = lax.dot_general(k, q, NT, preferred_element_type=F32)                 # [bk, bq]
      keep = _tpu_keep(w_ref, cfg, h, st.shape, 0, ki)
      pt = _where(keep, jnp.exp(st - lse_ref[h]), 0.0)
      dv_sc[h] += lax.dot_general(pt.astype(v.dtype), do, NN, preferred_element_type=F32)
      dpt = lax.dot_general(v, do, NT, preferred_element_type=F32)
      dst = _where(keep, pt * (dpt - delta_ref[h]), 0.0)
      dk_sc[h] += lax.dot_general(dst.astype(q.dtype), q, NN, preferred_element_type=F32)

  @pl.when(qi == cfg.q_blocks - 1)
  def _done():
    if cfg.in_place:
      _write_kv_sections(dqkv_hbm, stage, sems, dk_sc, dv_sc, cfg, b, ki)
      return
    for h in range(cfg.heads):
      dk_ref[:, h * d:(h + 1) * d] = dk_sc[h].astype(dk_ref.dtype)
      dv_ref[:, h * d:(h + 1) * d] = dv_sc[h].astype(dv_ref.dtype)


def _write_kv_sections(dqkv_hbm, stage, sems, dk_sc, dv_sc, cfg: _Config, b, ki) -> None:
  """Key block ``ki``'s dk and dv (``[H, bk, d]`` float32 scratch) into the k and v sections of
  ``dqkv_hbm [B, N, 3 H d]``, by DMA from a staging copy ``[2, bk, H d]``: the gradient of the qkv
  projection in its own layout, where separate results left XLA to concatenate them (and convert them
  from float32)."""
  d, hd = cfg.head_dim, cfg.heads * cfg.head_dim
  for section, grad in enumerate((dk_sc, dv_sc)):
    for h in range(cfg.heads):
      stage[section, :, h * d:(h + 1) * d] = grad[h].astype(stage.dtype)
  start = 0 if cfg.k_blocks == 1 else pl.multiple_of(ki * cfg.bk, cfg.bk)   # (one block: bk = N)
  copy_all([(stage.at[s], dqkv_hbm.at[b, pl.ds(start, cfg.bk), pl.ds((s + 1) * hd, hd)]) for s in range(2)],
           sems)


class _TpuSpecs(NamedTuple):
  """The TPU kernels' block specs over one grid (:func:`_tpu_specs`)."""
  q: pl.BlockSpec       # the q section of ``qkv [B, N, 3 H d]``: a query block
  k: pl.BlockSpec       # the k section: a key block
  v: pl.BlockSpec       # the v section: a key block
  qside: pl.BlockSpec   # a query block of a ``[B, N, H d]`` array (out, do, dq)
  kside: pl.BlockSpec   # a key block of a ``[B, N, H d]`` array (dk, dv)
  words: pl.BlockSpec   # the mask words of (query block, key block)
  rows: pl.BlockSpec    # a query block of the ``[B, H, 1, N_q_pad]`` rows (lse, delta)

  def backward_inputs(self) -> list[pl.BlockSpec]:
    """The specs of the backward kernels' inputs ``(qkv, qkv, qkv, words, do, lse, delta)``."""
    return [self.q, self.k, self.v, self.words, self.qside, self.rows, self.rows]


def _tpu_specs(cfg: _Config, kv_major: bool) -> _TpuSpecs:
  """Block specs for a ``(B, i, j)`` grid, ``(i, j)`` = ``(query block, key block)`` (or swapped when
  ``kv_major``)."""
  def order(i, j):
    return (j, i) if kv_major else (i, j)

  lanes = cfg.heads * cfg.head_dim if cfg.split else 3 * cfg.heads * cfg.head_dim
  hd = cfg.heads * cfg.head_dim
  mh = cfg.heads if cfg.mask_h else 1

  def section(s, rows, which):
    lane_block = s if cfg.split else 0
    return pl.BlockSpec((None, rows, lanes),
                        lambda b, i, j, occ: (b, order(i, j)[which], lane_block))

  qside = pl.BlockSpec((None, cfg.bq, hd), lambda b, i, j, occ: (b, order(i, j)[0], 0))
  kside = pl.BlockSpec((None, cfg.bk, hd), lambda b, i, j, occ: (b, order(i, j)[1], 0))

  def w_map(b, i, j, occ):
    qi, ki = order(i, j)
    return (b if cfg.mask_b else 0, 0, ki, 0, qi)

  return _TpuSpecs(
      q=section(0, cfg.bq, 0), k=section(1, cfg.bk, 1), v=section(2, cfg.bk, 1), qside=qside, kside=kside,
      words=pl.BlockSpec((None, mh, None, cfg.nw, cfg.bq), w_map),
      rows=pl.BlockSpec((None, cfg.heads, 1, cfg.bq), lambda b, i, j, occ: (b, 0, 0, order(i, j)[0])))


def _tpu_section_bytes(cfg: _Config, qkv: Array) -> int:
  """Bytes of one q/k/v read of ``qkv`` (a section, or whole rows when the sections share a block)."""
  return nbytes(qkv) // (3 if cfg.split else 1)


def _tpu_params(cfg: _Config, name: str, cost: pl.CostEstimate) -> dict:
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
              interpret=cfg.tpu_interpret(), cost_estimate=cost, name=name)


def _tpu_forward(cfg: _Config, qkv, words, occ, out_dtype):
  """``qkv [B, N, 3 H d]`` -> ``(out [B, N, H d] out_dtype, lse [B, H, 1, N_q_pad] f32)``."""
  bsz, n, _ = qkv.shape
  nh, d = cfg.heads, cfg.head_dim
  specs = _tpu_specs(cfg, kv_major=False)
  out_shape = (out_struct((bsz, n, nh * d), qkv, out_dtype),
               out_struct((bsz, nh, 1, cfg.q_blocks * cfg.bq), qkv))
  # Every block of an occupied pair is computed (skipping is data-dependent): two products of
  # 2 * bq * bk * d flops per head and pair; one exp per logit, one log per row; k and v read once per
  # query block.
  pairs = bsz * nh * cfg.q_blocks * cfg.bq * cfg.k_blocks * cfg.bk
  section = _tpu_section_bytes(cfg, qkv)
  cost = pl.CostEstimate(
      flops=4 * pairs * d, transcendentals=pairs + bsz * nh * cfg.q_blocks * cfg.bq,
      bytes_accessed=section * (1 + 2 * cfg.q_blocks) + nbytes(words, occ)
      + bsz * n * nh * d * jnp.dtype(out_dtype).itemsize + bsz * nh * cfg.q_blocks * cfg.bq * 4)
  return pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, cfg=cfg),
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, cfg.q_blocks, cfg.k_blocks),
          in_specs=[specs.q, specs.k, specs.v, specs.words],
          out_specs=[specs.qside, specs.rows],
          scratch_shapes=[pltpu.VMEM((nh, cfg.bq, 1), F32), pltpu.VMEM((nh, cfg.bq, 1), F32),
                          pltpu.VMEM((nh, cfg.bq, d), F32)]),
      **_tpu_params(cfg, "sparse_attention_fwd", cost),
  )(occ, qkv, qkv, qkv, words)


def _tpu_backward(cfg: _Config, qkv, words, occ, do, lse, delta):
  """``d qkv [B, N, 3 H d]`` (``qkv``'s dtype when ``cfg.in_place``, else float32) from ``do [B, N, H d]``
  and the rows ``lse, delta [B, H, 1, N_q_pad]``."""
  bsz, n, _ = qkv.shape
  nh, d = cfg.heads, cfg.head_dim
  pairs = bsz * nh * cfg.q_blocks * cfg.bq * cfg.k_blocks * cfg.bk
  section = _tpu_section_bytes(cfg, qkv)
  rows = nbytes(lse, delta)
  # In place (``cfg.in_place``): dq written straight into the q section of a qkv-shaped result, the k and
  # v sections by the dkv kernel (aliased); else three float32 results, concatenated.
  grad = out_struct(qkv.shape, qkv, qkv.dtype) if cfg.in_place else out_struct((bsz, n, nh * d), qkv)
  dq_specs = _tpu_specs(cfg, kv_major=False)
  # dq: products s, dp, dq (3 x 2 bq bk d flops per head and pair); k, v read once per query block.
  dq_cost = pl.CostEstimate(
      flops=6 * pairs * d, transcendentals=pairs,
      bytes_accessed=section * (1 + 2 * cfg.q_blocks) + nbytes(do, words, occ) + rows + nbytes(grad))
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, cfg=cfg),
      out_shape=grad,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, cfg.q_blocks, cfg.k_blocks),
          in_specs=dq_specs.backward_inputs(),
          out_specs=dq_specs.qside, scratch_shapes=[pltpu.VMEM((nh, cfg.bq, d), F32)]),
      **_tpu_params(cfg, "sparse_attention_dq", dq_cost),
  )(occ, qkv, qkv, qkv, words, do, lse, delta)

  dkv_specs = _tpu_specs(cfg, kv_major=True)
  # dk, dv: products s, dv, dp, dk (4 x 2 bq bk d flops per head and pair); q, do, lse, delta read once
  # per key block.
  dkv_cost = pl.CostEstimate(
      flops=8 * pairs * d, transcendentals=pairs,
      bytes_accessed=cfg.k_blocks * (section + nbytes(do) + rows) + 2 * section + nbytes(words, occ)
      + 2 * nbytes(grad))
  scratch = [pltpu.VMEM((nh, cfg.bk, d), F32), pltpu.VMEM((nh, cfg.bk, d), F32)]
  in_specs, args = dkv_specs.backward_inputs(), [occ, qkv, qkv, qkv, words, do, lse, delta]
  if cfg.in_place:
    in_specs, args = in_specs + [pl.BlockSpec(memory_space=pl.ANY)], args + [dq]
    out_shape, out_specs = grad, pl.BlockSpec(memory_space=pl.ANY)
    scratch += [pltpu.VMEM((2, cfg.bk, nh * d), qkv.dtype), pltpu.SemaphoreType.DMA((2,))]
    aliases = {len(args) - 1: 0}          # (the scalar-prefetch operand counts)
  else:
    out_shape, out_specs, aliases = (grad, grad), [dkv_specs.kside, dkv_specs.kside], {}
  result = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, cfg=cfg),
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, cfg.k_blocks, cfg.q_blocks), in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch),
      input_output_aliases=aliases,
      **_tpu_params(cfg, "sparse_attention_dkv", dkv_cost),
  )(*args)
  return result if cfg.in_place else jnp.concatenate([dq, *result], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _tpu_core(cfg: _Config, qkv, words, occ, out_dtype):
  return _tpu_forward(cfg, qkv, words, occ, out_dtype)[0]


def _tpu_core_fwd(cfg: _Config, qkv, words, occ, out_dtype):
  out, lse = _tpu_forward(cfg, qkv, words, occ, out_dtype)
  return out, (qkv, words, occ, out, lse)


def _tpu_core_bwd(cfg: _Config, out_dtype, res, dout):
  del out_dtype
  qkv, words, occ, out, lse = res
  bsz, n, hd = out.shape
  prod = (dout.astype(F32) * out.astype(F32)).reshape(bsz, n, cfg.heads, cfg.head_dim)
  delta = jnp.swapaxes(jnp.sum(prod, axis=-1), 1, 2)[:, :, None, :]        # rowsum(dO * O): [B, H, 1, N]
  delta = jnp.pad(delta, ((0, 0), (0, 0), (0, 0), (0, lse.shape[-1] - n)))
  dqkv = _tpu_backward(cfg, qkv, words, occ, dout, lse, delta)
  return dqkv.astype(qkv.dtype), None, None


_tpu_core.defvjp(_tpu_core_fwd, _tpu_core_bwd)


# ------------------------------------------------------------------------------------------------
# GPU (Triton) kernels. Operands keep the [B, N, H, d] layout; a kernel sees [N_block or N_pad, d]
# tiles, words [k_blocks, nw, bq] or [nw, N_q_pad], lse/delta rows [bq] or [N_q_pad].


def _gpu_keep(w_ref, ki, q_rows, cfg: _Config):
  """Keep tile ``[bq, bk]`` of key block ``ki`` for the query rows ``q_rows`` (a slice of the words' last
  axis) from ``w_ref [k_blocks, nw, *]``; in dense mode the real keys of the block (None: all)."""
  if cfg.dense:
    return _keys_valid(ki, cfg, (cfg.bq, cfg.bk), 1)
  words = [w_ref[ki, pl.ds(j, 1), q_rows].reshape(cfg.bq, 1) for j in range(cfg.nw)]
  return _expand_bits(words, (cfg.bq, cfg.bk), 1)


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, w_ref, o_ref, lse_ref, *, cfg: _Config):
  k_dtype = k_ref.dtype
  q = scaled(q_ref[...], cfg.scale, k_dtype)
  d = q.shape[-1]

  def body(ki, carry):
    keys = pl.ds(ki * cfg.bk, cfg.bk)
    s = lax.dot_general(q, k_ref[keys, :], NT, preferred_element_type=F32)
    s = _where(_gpu_keep(w_ref, ki, slice(None), cfg), s, -jnp.inf)
    return online_softmax_step(s, *carry, v_ref[keys, :])

  init = (jnp.full((cfg.bq, 1), -jnp.inf, F32), jnp.zeros((cfg.bq, 1), F32), jnp.zeros((cfg.bq, d), F32))
  out, lse = finalize(*lax.fori_loop(0, cfg.k_blocks, body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(cfg.bq)


def _gpu_dq_kernel(q_ref, k_ref, v_ref, w_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
  k_dtype = k_ref.dtype
  q = scaled(q_ref[...], cfg.scale, k_dtype)
  do = do_ref[...].astype(k_dtype)
  lse = lse_ref[...].reshape(cfg.bq, 1)
  delta = delta_ref[...].reshape(cfg.bq, 1)

  def body(ki, dq):
    keys = pl.ds(ki * cfg.bk, cfg.bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)
    s = _where(_gpu_keep(w_ref, ki, slice(None), cfg), s, -jnp.inf)
    p = jnp.exp(s - lse)
    ds = p * (lax.dot_general(do, v, NT, preferred_element_type=F32) - delta)
    return dq + lax.dot_general(ds.astype(k_dtype), k, NN, preferred_element_type=F32)

  dq = lax.fori_loop(0, cfg.k_blocks, body, jnp.zeros(q.shape, F32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, w_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                    cfg: _Config):
  k, v = k_ref[...], v_ref[...]
  tn = (((0,), (0,)), ((), ()))        # a.T @ b
  key_block = pl.program_id(0)

  def body(qi, carry):
    dk, dv = carry
    rows = pl.ds(qi * cfg.bq, cfg.bq)
    q = scaled(q_ref[rows, :], cfg.scale, k.dtype)
    do = do_ref[rows, :].astype(k.dtype)
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)                    # [bq, bk]
    if cfg.dense:
      keep = _keys_valid(key_block, cfg, s.shape, 1)
    else:
      keep = _expand_bits([w_ref[pl.ds(j, 1), rows].reshape(cfg.bq, 1) for j in range(cfg.nw)], s.shape, 1)
    s = _where(keep, s, -jnp.inf)
    p = jnp.exp(s - lse_ref[rows].reshape(cfg.bq, 1))
    dv = dv + lax.dot_general(p.astype(k.dtype), do, tn, preferred_element_type=F32)
    ds = p * (lax.dot_general(do, v, NT, preferred_element_type=F32) - delta_ref[rows].reshape(cfg.bq, 1))
    dk = dk + lax.dot_general(ds.astype(k.dtype), q, tn, preferred_element_type=F32)
    return dk, dv

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = lax.fori_loop(0, cfg.q_blocks, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_words_spec(cfg: _Config) -> pl.BlockSpec:
  """The words of query block ``i`` for every key block: ``[k_blocks, nw, bq]`` tiles on a ``(i, B, H)``
  grid."""
  return pl.BlockSpec((None, None, cfg.k_blocks, cfg.nw, cfg.bq),
                      lambda i, b, h: (*cfg.mask_index(b, h), 0, 0, i))


def _gpu_forward(cfg: _Config, q, k, v, words):
  """``q, k, v [B, N_pad, H, d]`` -> ``(out [B, N_q_pad, H, d] f32, lse [B, H, N_q_pad] f32)``."""
  bsz, n_q_pad, nh, d = q.shape
  n_k_pad = k.shape[1]
  in_specs = [
      pl.BlockSpec((None, cfg.bq, None, d), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, n_k_pad, None, d), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, n_k_pad, None, d), lambda i, b, h: (b, 0, h, 0)),
      _gpu_words_spec(cfg),
  ]
  out_specs = [pl.BlockSpec((None, cfg.bq, None, d), lambda i, b, h: (b, i, h, 0)),
               pl.BlockSpec((None, None, cfg.bq), lambda i, b, h: (b, h, i))]
  pairs = bsz * nh * n_q_pad * n_k_pad
  # Cost: all blocks computed (no skipping on GPU); k and v read once per query block.
  cost = pl.CostEstimate(
      flops=4 * pairs * d, transcendentals=pairs + bsz * nh * n_q_pad,
      bytes_accessed=nbytes(q, words) + cfg.q_blocks * nbytes(k, v) + bsz * nh * n_q_pad * (d + 1) * 4)
  return pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, cfg=cfg),
      out_shape=(out_struct((bsz, n_q_pad, nh, d), q), out_struct((bsz, nh, n_q_pad), q)),
      grid=(cfg.q_blocks, bsz, nh), in_specs=in_specs, out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=cfg.interpret, cost_estimate=cost, name="sparse_attention_fwd",
  )(q, k, v, words)


def _gpu_backward(cfg: _Config, q, k, v, words, do, lse, delta):
  """Gradients ``(dq, dk, dv)`` float32 ``[B, N_pad, H, d]`` from ``do [B, N_q_pad, H, d]`` and
  ``lse, delta [B, H, N_q_pad]``."""
  bsz, n_q_pad, nh, d = q.shape
  n_k_pad = k.shape[1]
  pairs = bsz * nh * n_q_pad * n_k_pad
  params = dict(interpret=cfg.interpret, compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))
  rows = nbytes(lse, delta)

  q_blk = pl.BlockSpec((None, cfg.bq, None, d), lambda i, b, h: (b, i, h, 0))
  k_all = pl.BlockSpec((None, n_k_pad, None, d), lambda i, b, h: (b, 0, h, 0))
  w_rows = _gpu_words_spec(cfg)
  row_blk = pl.BlockSpec((None, None, cfg.bq), lambda i, b, h: (b, h, i))
  dq_cost = pl.CostEstimate(
      flops=6 * pairs * d, transcendentals=pairs,
      bytes_accessed=nbytes(q, do, words) + rows + cfg.q_blocks * nbytes(k, v) + bsz * nh * n_q_pad * d * 4)
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, cfg=cfg),
      out_shape=out_struct(q.shape, q), grid=(cfg.q_blocks, bsz, nh),
      in_specs=[q_blk, k_all, k_all, w_rows, q_blk, row_blk, row_blk], out_specs=q_blk,
      cost_estimate=dq_cost, name="sparse_attention_dq", **params,
  )(q, k, v, words, do, lse, delta)

  q_all = pl.BlockSpec((None, n_q_pad, None, d), lambda i, b, h: (b, 0, h, 0))
  k_blk = pl.BlockSpec((None, cfg.bk, None, d), lambda i, b, h: (b, i, h, 0))
  w_cols = pl.BlockSpec((None, None, None, cfg.nw, n_q_pad), lambda i, b, h: (*cfg.mask_index(b, h), i, 0, 0))
  row_all = pl.BlockSpec((None, None, n_q_pad), lambda i, b, h: (b, h, 0))
  dkv_cost = pl.CostEstimate(
      flops=8 * pairs * d, transcendentals=pairs,
      bytes_accessed=cfg.k_blocks * (nbytes(q, do) + rows) + nbytes(k, v, words)
      + 2 * bsz * nh * n_k_pad * d * 4)
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, cfg=cfg),
      out_shape=(out_struct(k.shape, q), out_struct(v.shape, q)),
      grid=(cfg.k_blocks, bsz, nh),
      in_specs=[q_all, k_blk, k_blk, w_cols, q_all, row_all, row_all], out_specs=[k_blk, k_blk],
      cost_estimate=dkv_cost, name="sparse_attention_dkv", **params,
  )(q, k, v, words, do, lse, delta)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# The differentiable core (padded, backend layout) and the public wrapper.


_gpu_core = gpu_flash_core(_gpu_forward, _gpu_backward)


def _mask_layout(packed: Array, cfg: _Config) -> tuple[Array, Array]:
  """``packed [B|1, H|1, W, N_q]`` -> ``(words [B|1, H|1, k_blocks, nw, q_blocks * bq] int32,
  occ [B|1 * q_blocks * k_blocks] int32)``: the words of each key block (padding never kept; a reshape of
  the padded words, no transpose) and the flat table of ``(query block, key block)`` pairs that some head
  keeps anything of (TPU)."""
  mb, mh, n_words, n_rows = packed.shape
  padded = jnp.pad(packed, ((0, 0), (0, 0), (0, cfg.k_blocks * cfg.nw - n_words),
                            (0, cfg.q_blocks * cfg.bq - n_rows)))
  words = padded.reshape(mb, mh, cfg.k_blocks, cfg.nw, cfg.q_blocks * cfg.bq)
  blocked = words.reshape(mb, mh, cfg.k_blocks, cfg.nw, cfg.q_blocks, cfg.bq)
  occ = jnp.any(blocked != 0, axis=(1, 3, 5))                                 # [., k_blocks, q_blocks]
  return words, jnp.swapaxes(occ, 1, 2).reshape(-1).astype(jnp.int32)


def flash_attention(q: Array, k: Array, v: Array, packed: Array | None, *, scale: float,
                     backend: str = "tpu", interpret: bool = False, block_q: int | None = None,
                     block_k: int | None = None) -> Array:
  """Masked softmax attention, fused: ``[B, N, H, d]`` x3 and a bit-packed mask -> ``[B, N, H, d]`` f32.
  With ``packed=None``, dense attention in the same kernels (no mask read, no bits expanded; only the
  padding past the last real key is masked).

  Args:
    q, k, v: ``[B, N_q, H, d]``, ``[B, N_k, H, d]`` x2 (TPU: ``N_q = N_k``), any float dtype; the products
      run in q's dtype (k and v are cast to it) with float32 accumulation, the softmax in float32.
    packed: ``[B|1, H|1, ceil(N_k / 32), N_q] int32`` (``attention.bitmask``): bit j of ``packed[..., w, i]``
      set when query i keeps key 32 w + j. A leading 1 broadcasts over batch or heads. No gradient.
    scale: the logit scale (``d ** -0.5`` for the reference).
    backend: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton).
    interpret: run the kernels on CPU (TPU: ``pltpu.InterpretParams()``; GPU: the Pallas interpreter).
    block_q, block_k: query rows / keys per block. TPU: N (the default up to 512 tokens) or, on a real
      TPU, a multiple of 128 (the default above); GPU: powers of two, block_k at least 32.

  Returns:
    ``[B, N_q, H, d]`` float32; rows with no kept key are 0. Differentiable in q, k and v (the backward
    is Pallas too). TPU: the kernel writes q's dtype (the float32 result rounded once), which the output
    projection reads.
  """
  if backend not in ("tpu", "gpu"):
    raise ValueError(f"unknown backend {backend!r}; allowed: 'tpu', 'gpu'")
  bsz, n_q, nh, d = q.shape
  n_k = k.shape[1]
  dense = packed is None
  if dense:   # a [1, 1, W, N] stand-in: its blocks are fetched once (their index never changes), never read
    packed = jnp.zeros((1, 1, bitmask.words(n_k), n_q), jnp.int32)
  if packed.ndim != 4 or packed.shape[3] != n_q or packed.shape[2] != bitmask.words(n_k):
    raise ValueError(f"packed mask {packed.shape} does not fit q {q.shape} and {n_k} keys")
  if backend == "tpu" and n_q != n_k:
    raise ValueError(f"the TPU kernel needs as many queries as keys; got {n_q} and {n_k}")
  bq, bk = _block_sizes(backend, n_q, n_k, block_q, block_k)
  cfg = _Config(scale=float(scale), interpret=bool(interpret), bq=bq, bk=bk,
                q_blocks=-(-n_q // bq), k_blocks=-(-n_k // bk), mask_b=packed.shape[0] > 1,
                mask_h=packed.shape[1] > 1,
                heads=nh, head_dim=d, n=n_q, split=(nh * d) % 128 == 0, dense=dense, n_keys=n_k)
  dtype = q.dtype
  q, k, v, packed = same_vma(q, k.astype(dtype), v.astype(dtype), packed)
  words, occ = _mask_layout(packed.astype(jnp.int32), cfg)
  if dense:
    occ = jnp.ones_like(occ)

  if backend == "tpu":
    qkv = jnp.stack([q, k, v], axis=2).reshape(bsz, n_q, 3 * nh * d)   # the qkv projection's layout
    out = _tpu_core(cfg, qkv, words, occ, dtype)
    return out.reshape(bsz, n_q, nh, d).astype(F32)

  n_q_pad, n_k_pad = cfg.q_blocks * bq, cfg.k_blocks * bk
  d_pad = max(16, next_pow2(d))
  def prep_gpu(t, n_pad):                                  # pad N and d, keep [B, N, H, d]
    return jnp.pad(t, ((0, 0), (0, n_pad - t.shape[1]), (0, 0), (0, d_pad - d)))
  out = _gpu_core(cfg, prep_gpu(q, n_q_pad), prep_gpu(k, n_k_pad), prep_gpu(v, n_k_pad), words)
  return out[:, :n_q, :, :d]
