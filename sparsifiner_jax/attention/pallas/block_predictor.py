"""Block mode's predictor projections, on TPU in one kernel that reads q and k where the qkv projection
wrote them.

The block-mode predictor (``models.predictor``, docs/attention.md) scores (query block, key block) pairs
from two small projections per example and head:

* ``K̂ᵀ = (Pᵀ k) W_k + (1ᵀ P)ᵀ b_k`` ``[m, c]``: the keys down-projected over tokens by ``P [N, m]`` (the
  learned ``proj_n``), then over features by ``W_k [d, c]``;
* ``q_r = q̄ W_q + b_q`` ``[nb, c]``: each query block's mean q, projected by ``W_q [d, c]``.

Both contract the token axis of q and k. As XLA products they made XLA on TPU copy the whole qkv output
with the token axis minor, and their small ``m``/``c`` minor axes cost layout copies of their own. Here
one grid step per example reads its q and k ``[N, H d]`` in place; the token products are plain MXU
products with the constants ``Pᵀ [m, N]`` and the block membership ``[nb, N]``, and the per-head feature
projections one product each with a block-diagonal ``[H d, H c]`` copy of ``W_k`` or ``W_q``, so every
result keeps the heads on the lanes.

``projections(qkv, proj_n, w_k, b_k, w_q, b_q, block=b, dtype=...)`` -> ``(q_r [B, nb, H, c],
k_hat [B, m, H, c])`` in ``dtype`` (their consumer, the logits' product in ``dtype``, would round them
anyway); products in ``dtype`` (operands rounded to it, float32 accumulation, biases added in float32),
the pooling in float32. ``reference`` is the same in XLA (any backend; per-example ``P`` for token
sparsity), and its gradient is the kernel's (only the reconstruction phase, which trains the predictor,
takes one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsifiner_jax import sharding
from sparsifiner_jax.attention import backend, blocks
from sparsifiner_jax.attention.pallas.common import F32, out_struct, same_vma
from sparsifiner_jax.precision import mixed_einsum

Array = jax.Array


def applies(qkv: Array, proj_n: Array) -> bool:
  """Whether the kernel runs for ``qkv [B, N, 3, H, d]`` and ``proj_n [1|B, N, m]`` here: Pallas on TPU,
  one ``P`` for the batch (no token sparsity), and ``H d`` whole 128-lane tiles (DeiT-S: 384)."""
  *_, nh, d = qkv.shape
  return (backend.pallas_enabled() and backend.target().platform == "tpu" and proj_n.shape[0] == 1
          and nh * d % 128 == 0)


def reference(q: Array, k: Array, proj_n: Array, w_k: Array, b_k: Array, w_q: Array, b_q: Array, *,
              block: int, dtype) -> tuple[Array, Array]:
  """The projections in XLA, from ``q, k [B, N, H, d]``, ``proj_n [1|B, N, m]``, ``w_k, w_q [d, c]``,
  ``b_k, b_q [c]``."""
  mm = lambda spec, a, b: mixed_einsum(spec, a, b, dtype)   # noqa: E731
  pk = mm("nm,bnhd->bmhd", proj_n[0], k) if proj_n.shape[0] == 1 else mm("bnm,bnhd->bmhd", proj_n, k)
  k_hat = mm("bmhd,dc->bmhc", pk, w_k) + jnp.sum(proj_n, axis=1)[:, :, None, None] * b_k
  q_r = mm("bnhd,dc->bnhc", blocks.pool(q, block, axis=1, mean=True), w_q) + b_q
  return q_r.astype(dtype), k_hat.astype(dtype)


def _kernel(pt_ref, member_ref, size_ref, wk_ref, kb_ref, wq_ref, qb_ref, q_ref, k_ref, qr_ref, kh_ref):
  """One example. ``pt_ref [m, N]`` (Pᵀ, compute dtype), ``member_ref [nb, N]`` (``blocks.membership``ᵀ in
  q's dtype) and ``size_ref [nb, 1]`` (tokens per block, float32),
  ``wk_ref, wq_ref [H d, H c]`` (block-diagonal, compute dtype), ``kb_ref [m, H c]`` and ``qb_ref [1, H c]``
  (the biases' terms, float32), ``q_ref, k_ref [N, H d]`` -> ``qr_ref [nb, H c]``, ``kh_ref [m, H c]``
  (compute dtype)."""
  dtype = pt_ref.dtype
  pk = jnp.dot(pt_ref[...], k_ref[...].astype(dtype), preferred_element_type=F32)            # [m, H d]
  k_hat = jnp.dot(pk.astype(dtype), wk_ref[...], preferred_element_type=F32) + kb_ref[...]
  kh_ref[...] = k_hat.astype(kh_ref.dtype)
  # Block sums, exact on one pass for bf16 q (products by 0 or 1, float32 accumulation); then means.
  q = q_ref[...]
  exact = jax.lax.Precision.HIGHEST if q.dtype == F32 else None
  q_pool = jnp.dot(member_ref[...], q, preferred_element_type=F32, precision=exact) / size_ref[...]
  q_r = jnp.dot(q_pool.astype(dtype), wq_ref[...], preferred_element_type=F32) + qb_ref[...]
  qr_ref[...] = q_r.astype(qr_ref.dtype)


def _block_diagonal(w: Array, heads: int) -> Array:
  """``[d, c]`` -> ``[H d, H c]`` with ``w`` on the diagonal."""
  return jnp.kron(jnp.eye(heads, dtype=w.dtype), w)


def _forward(qkv, proj_n, w_k, b_k, w_q, b_q, block, dtype, interpret):
  bsz, n, _, nh, d = qkv.shape
  m, c, nb = proj_n.shape[-1], w_k.shape[-1], blocks.count(n, block)
  width, out_width = nh * d, nh * c
  constants = (proj_n[0].T.astype(dtype), blocks.membership(n, block, qkv.dtype).T,
               blocks.block_sizes(n, block)[:, None],
               _block_diagonal(w_k.astype(dtype), nh),
               jnp.tile(jnp.sum(proj_n[0], axis=0)[:, None] * b_k, (1, nh)).astype(F32),
               _block_diagonal(w_q.astype(dtype), nh), jnp.tile(b_q, nh)[None].astype(F32))
  flat = qkv.reshape(bsz, 1, n, 3 * width)
  flat, *constants = same_vma(flat, *constants)
  section = lambda s: pl.BlockSpec((None, None, n, width), lambda b: (b, 0, 0, s))        # noqa: E731
  whole = lambda x: pl.BlockSpec(x.shape, lambda b: (0, 0))                               # noqa: E731
  per_example = lambda rows: pl.BlockSpec((None, rows, out_width), lambda b: (b, 0, 0))   # noqa: E731
  cost = pl.CostEstimate(
      flops=2 * bsz * (n * width * (m + nb) + (m + nb) * width * out_width), transcendentals=0,
      bytes_accessed=2 * flat.size // 3 * flat.dtype.itemsize
      + jnp.dtype(dtype).itemsize * bsz * (m + nb) * out_width)
  q_r, k_hat = pl.pallas_call(
      _kernel,
      out_shape=(out_struct((bsz, nb, out_width), flat, dtype), out_struct((bsz, m, out_width), flat, dtype)),
      grid=(bsz,),
      in_specs=[whole(x) for x in constants] + [section(0), section(1)],
      out_specs=[per_example(nb), per_example(m)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=cost, interpret=pltpu.InterpretParams() if interpret else False,
      name="block_predictor_projections",
  )(*constants, flat, flat)
  return q_r.reshape(bsz, nb, nh, c), k_hat.reshape(bsz, m, nh, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _projections(qkv, proj_n, w_k, b_k, w_q, b_q, block, dtype, interpret):
  return _forward(qkv, proj_n, w_k, b_k, w_q, b_q, block, dtype, interpret)


def _projections_fwd(qkv, proj_n, w_k, b_k, w_q, b_q, block, dtype, interpret):
  residuals = (qkv, proj_n, w_k, b_k, w_q, b_q)
  return _forward(*residuals, block, dtype, interpret), residuals


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
