"""Sparsifiner's mask selection, one dispatcher for its three implementations.

``predictor_mask`` turns the predictor's low-rank factors into the layer's ``AttentionMask`` and is the one
place that chooses how:

* **Pallas** (``pallas.topk_mask``, TPU and GPU, where the kernel fits): one pass per batch shard writes
  only the bit-packed rows (``mask.packed_mask``);
* **C++** (``cpu.lowrank_topk_mask``, CPU with the kernels built): one call reads q and the keys in place
  from the layer's qkv projection and writes the boolean rows (``mask.keep_mask``);
* **XLA**: the top-``k`` of the predictor's approximation (``mask.topk_mask``). It is the reference, the
  fallback of the C++ call on other backends, and the only path with token pruning (``key_keep``), whose
  pruned keys are never selected.

Each keeps the ``k`` highest-scoring keys per patch row (ties: lowest index) and the CLS row dense; they
agree up to float rounding (tests/attention/test_accelerator_path.py, test_kernels.py, test_pallas_mask.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsifiner_jax import sharding
from sparsifiner_jax.attention import backend, cpu
from sparsifiner_jax.attention import mask as mask_lib
from sparsifiner_jax.attention.pallas import topk_mask as pallas_topk_mask

Array = jax.Array


def predictor_mask(qkv: Array, factors: tuple[Array, ...], weights: Array, basis: Array,
                   up_projection: Array, approx: Array, *, k: int, scale: float, coef_k: int,
                   basis_threshold: float, signed_basis: bool, compute_dtype,
                   key_keep: Array | None = None) -> mask_lib.AttentionMask:
  """The mask of the ``k`` keys per patch row the predictor ranks highest (the CLS row dense).

  Args:
    qkv: ``[B, N, S >= 2, H, d]`` the layer's projections (q in slot 0, keys in slot 1).
    factors: ``MaskPredictor.factors(...)``: ``(keys, proj_n [1|B, N, m], w_k [d, c], b_k [c], w_q [d, c],
      b_q [c])``.
    weights: ``query_weights(*factors)`` ``[B, H, d + 1, m]`` float32.
    basis: the thresholded basis for the tokens present, ``[m, N]`` or ``[B, m, N]``.
    up_projection: the unthresholded ``proj_back_n`` rows ``[1|B, N, m]`` (the C++ kernel thresholds it).
    approx: the predictor's approximation ``[B, H, N - 1, N]`` in sparse mode: the XLA path's scores
      (under ``jax.jit`` computed only if that path runs).
    k: keys kept per patch row. scale: the coefficient logits' scale. coef_k: coefficients kept per row.
    basis_threshold, signed_basis: the basis rule (``predictor.threshold_basis``), for the C++ kernel.
    compute_dtype: the products' input dtype.
    key_keep: ``[B, N] bool`` live tokens under token pruning, or None.

  Returns:
    An ``AttentionMask`` with one dense row (CLS). No gradient: a selection.
  """
  q = qkv[:, :, 0]
  if key_keep is not None:
    scores = jnp.where(key_keep[:, None, None, :], jax.lax.stop_gradient(approx), -jnp.inf)
    return mask_lib.topk_mask(scores, k, num_dense_rows=1)
  if backend.pallas_enabled() and pallas_topk_mask.fits(
      q.shape[1], weights.shape[-1], q.shape[-1], compute_dtype, backend.target().platform):
    packed = pallas_packed_mask(q, weights, basis, k=k, scale=scale, coef_k=coef_k,
                                compute_dtype=compute_dtype)
    return mask_lib.packed_mask(packed, k, num_dense_rows=1)
  # The C++ kernel on CPU; elsewhere (or without the kernels) the top-k of the approximation in XLA.
  keep = cpu.lowrank_topk_mask(
      qkv.astype(compute_dtype), *factors[1:], up_projection, first_row=1, scale=scale, coef_k=coef_k,
      k=k, basis_threshold=basis_threshold, signed_basis=signed_basis, compute_dtype=compute_dtype,
      reference=lambda *_: cpu.topk_keep_mask(approx, k))
  return mask_lib.keep_mask(keep, k, num_dense_rows=1)


def pallas_packed_mask(q: Array, weights: Array, basis: Array, *, k: int, scale: float, coef_k: int,
                       compute_dtype) -> Array:
  """The packed mask ``[B, H, ceil(N / 32), N] int32`` (CLS row dense) in one Pallas pass for
  ``backend.target()``, per batch shard, from raw q ``[B, N, H, d]``, the query weights
  ``[B, H, d + 1, m]`` and the sparse basis (``[m, N]`` or ``[B, m, N]``). No gradient: a selection."""
  target = backend.target()

  def run(q, weights, basis):
    return pallas_topk_mask.lowrank_topk_packed(
        q, weights, basis, scale=scale, coef_k=coef_k, k=k, num_dense_rows=1, compute_dtype=compute_dtype,
        backend=target.platform, interpret=target.interpret)

  args = jax.lax.stop_gradient((q, weights, basis))
  return sharding.per_batch_shard(run, args, (True, True, basis.ndim == 3))
