"""Block mode's predictor products over the token axis, on TPU, with q and k read where the qkv projection
wrote them.

The block-mode predictor contracts q and k over tokens: ``kᵀ P`` (``P [N, m]``, the learned token
projection) and each query block's mean q. Written as XLA products, these made XLA on TPU copy the whole
qkv projection output with the token axis minor, once per layer (by the clock 2.1 ms of a 224 px eval
step at 64 images per chip, 3.7 ms at 448 px). Here one grid step per (example, head group) reads the
group's q and k tiles ``[N, g d]`` (``g d = 128`` lanes) in place and contracts the token axis on the
MXU as a transposed-operand product.

``token_products(qkv, proj_n, block=b, dtype=...)`` -> ``(k_proj [B, H, d, m], q_pool [B, nb, H, d])``:
``mixed_einsum("bnhd,nm->bhdm", k, proj_n, dtype)`` (products in ``dtype``) rounded to ``dtype``, which its
only consumer, the next product in ``dtype``, does anyway (a float32 result took a convert of its own,
costlier than the kernel: its minor axis is ``m``), and ``blocks.pool(q, b, axis=1, mean=True)``
(float32). The gradient is XLA's, of those same products: only the reconstruction phase, which trains
``P``, takes it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsifiner_jax import sharding
from sparsifiner_jax.attention import backend, blocks
from sparsifiner_jax.attention.pallas.common import F32, out_struct, same_vma
from sparsifiner_jax.precision import mixed_einsum

Array = jax.Array
_TN = (((0,), (0,)), ((), ()))        # a.T @ b: the token axis (rows of both) contracted


def applies(qkv: Array) -> bool:
  """Whether the kernel runs for ``qkv [B, N, 3, H, d]`` here: Pallas on TPU, and heads whose lanes form
  whole 128-lane tiles (DeiT: pairs of 64)."""
  *_, nh, d = qkv.shape
  return (backend.pallas_enabled() and backend.target().platform == "tpu" and 128 % d == 0
          and nh % (128 // d) == 0)


def reference(qkv: Array, proj_n: Array, block: int, dtype) -> tuple[Array, Array]:
  """The same products in XLA (and their gradient): ``qkv [B, N, 3, H, d]``, ``proj_n [N, m]``."""
  k_proj = mixed_einsum("bnhd,nm->bhdm", qkv[:, :, 1], proj_n, dtype).astype(dtype)
  return k_proj, blocks.pool(qkv[:, :, 0], block, axis=1, mean=True)


def _kernel(p_ref, w_ref, q_ref, k_ref, kp_ref, qp_ref):
  """``p_ref [N, m]``, ``w_ref [N, nb]`` (the mean-pooling weights), ``q_ref, k_ref [N, g d]`` ->
  ``kp_ref [g d, m] = kᵀ P`` (k rounded to P's dtype; the result to ``kp_ref``'s), ``qp_ref [nb, g d] = wᵀ q``
  (float32)."""
  kp = lax.dot_general(k_ref[...].astype(p_ref.dtype), p_ref[...], _TN, preferred_element_type=F32)
  kp_ref[...] = kp.astype(kp_ref.dtype)
  qp_ref[...] = lax.dot_general(w_ref[...], q_ref[...].astype(F32), _TN, preferred_element_type=F32,
                                precision=lax.Precision.HIGHEST)


def _forward(qkv: Array, proj_n: Array, block: int, dtype, interpret: bool) -> tuple[Array, Array]:
  bsz, n, _, nh, d = qkv.shape
  lanes = 128
  groups, m, nb = nh * d // lanes, proj_n.shape[-1], blocks.count(n, block)
  weights = blocks.pooling_matrix(n, block, mean=True)                                 # [N, nb]
  flat = qkv.reshape(bsz, 1, n, 3 * nh * d)
  flat, p, weights = same_vma(flat, proj_n.astype(dtype), weights)
  section = lambda s: pl.BlockSpec((None, None, n, lanes),                            # noqa: E731
                                   lambda b, grp: (b, 0, 0, s * groups + grp))
  whole = lambda shape: pl.BlockSpec(shape, lambda b, grp: (0, 0))                    # noqa: E731
  cost = pl.CostEstimate(flops=2 * bsz * n * nh * d * (m + nb), transcendentals=0,
                         bytes_accessed=2 * flat.size // 3 * flat.dtype.itemsize
                         + 4 * bsz * nh * d * (m + nb))
  kp, qp = pl.pallas_call(
      _kernel,
      out_shape=(out_struct((bsz, groups, lanes, m), flat, dtype), out_struct((bsz, nb, nh * d), flat)),
      grid=(bsz, groups),
      in_specs=[whole((n, m)), whole((n, nb)), section(0), section(1)],
      out_specs=[pl.BlockSpec((None, None, lanes, m), lambda b, grp: (b, grp, 0, 0)),
                 pl.BlockSpec((None, nb, lanes), lambda b, grp: (b, 0, grp))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=cost, interpret=pltpu.InterpretParams() if interpret else False,
      name="predictor_token_products",
  )(p, weights, flat, flat)
  return kp.reshape(bsz, nh, d, m), qp.reshape(bsz, nb, nh, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _products(qkv, proj_n, block, dtype, interpret):
  return _forward(qkv, proj_n, block, dtype, interpret)


def _products_fwd(qkv, proj_n, block, dtype, interpret):
  return _forward(qkv, proj_n, block, dtype, interpret), (qkv, proj_n)


def _products_bwd(block, dtype, interpret, res, cotangents):
  _, vjp = jax.vjp(lambda a, p: reference(a, p, block, dtype), *res)
  return vjp(cotangents)


_products.defvjp(_products_fwd, _products_bwd)


def token_products(qkv: Array, proj_n: Array, *, block: int, dtype) -> tuple[Array, Array]:
  """``(k_proj [B, H, d, m] dtype, q_pool [B, nb, H, d] float32)`` from ``qkv [B, N, 3, H, d]`` and the
  token projection ``proj_n [N, m]``, per batch shard (``applies`` must hold)."""
  interpret = backend.target().interpret
  run = lambda qkv, proj_n: _products(qkv, proj_n, block, jnp.dtype(dtype), interpret)   # noqa: E731
  return sharding.per_batch_shard(run, (qkv, proj_n), (True, False))
