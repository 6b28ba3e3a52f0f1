"""What the Pallas kernels share (``attention``, ``block_sparse``, ``topk_mask``): block-size arithmetic,
the online softmax, the lane/sublane relayouts of a row, and results typed for ``shard_map``.

Shapes: ``bq``, ``bk`` are the query rows and keys of one block; every function here works on one block's
values inside a kernel, except the size helpers and :func:`out_struct`/:func:`same_vma`, which run at
trace time around a ``pallas_call``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from sparsifiner_jax.attention import backend

Array = jax.Array
F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))          # dot_general dimensions of a @ b.T
NN = (((1,), (0,)), ((), ()))          # dot_general dimensions of a @ b


def round_up(x: int, multiple: int) -> int:
  """The least multiple of ``multiple`` that is ``>= x``."""
  return -(-x // multiple) * multiple


def next_pow2(x: int) -> int:
  """The least power of two ``>= x`` (1 for ``x <= 1``)."""
  return 1 << max(x - 1, 0).bit_length()


def online_softmax_step(s, m_prev, l_prev, acc_prev, v, axis: int = -1):
  """One key block of the online softmax over masked logits ``s [bq, bk]`` (``-inf`` = dropped).

  ``m_prev, l_prev [bq, 1]``, ``acc_prev [bq, d]`` float32, ``v [bk, d]``; returns the updated
  ``(m, l, acc)``. A row with nothing kept so far keeps ``m = -inf, l = 0, acc = 0`` (no NaN: the shift is
  then 0).
  """
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=axis, keepdims=True))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m_prev - shift)
  p = jnp.exp(s - shift)
  l_new = alpha * l_prev + jnp.sum(p, axis=axis, keepdims=True)
  acc_new = alpha * acc_prev + lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=F32)
  return m_new, l_new, acc_new


def finalize(m, l, acc):
  """``(out [bq, d], lse [bq, 1])`` from the online softmax's ``m, l [bq, 1]``, ``acc [bq, d]``; empty rows
  give ``out = 0`` and ``lse = +inf`` (so that the backward's ``exp(s - lse)`` is 0 there)."""
  nonempty = l > 0
  out = jnp.where(nonempty, acc / jnp.where(nonempty, l, 1.0), 0.0)
  lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)
  return out, lse


def scaled(q_raw, scale, dtype):
  """``scale * q`` rounded to the product dtype, as the reference scales q before its einsum."""
  return (q_raw * scale).astype(dtype)


def row_to_col(row: Array) -> Array:
  """``[1, n] -> [n, 1]`` (a lane-to-sublane relayout)."""
  return jnp.expand_dims(row[0], -1)


def col_to_row(col: Array) -> Array:
  """``[n, 1] -> [1, n]``, the inverse relayout, as a transpose of a full 128-lane tile: a reshape would
  lower to a sublane gather, which TPUs before v5 (v4) do not have."""
  return jnp.transpose(jnp.broadcast_to(col, (col.shape[0], 128)))[:1, :]


def lane_masks(heads: int, width: int) -> list[Array]:
  """Per head, its lanes of a ``[1, heads * width]`` tile as a boolean mask (heads side by side on the
  lanes, ``width`` each)."""
  lane = lax.broadcasted_iota(jnp.int32, (1, heads * width), 1)
  return [(lane >= h * width) & (lane < (h + 1) * width) for h in range(heads)]


def copy_all(pairs, sems) -> None:
  """TPU: DMAs each ``(src, dst)`` ref pair (pair ``i`` signalling ``sems.at[i]``), all started before
  any is waited for, so the copies overlap."""
  copies = [pltpu.make_async_copy(src, dst, sems.at[i]) for i, (src, dst) in enumerate(pairs)]
  for c in copies:
    c.start()
  for c in copies:
    c.wait()


def out_struct(shape, like: Array, dtype=F32) -> jax.ShapeDtypeStruct:
  """A result of ``shape`` (float32 by default) that varies over the same ``shard_map`` axes as ``like``."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def same_vma(*xs: Array) -> list[Array]:
  """Casts the operands to vary over the union of their ``shard_map`` axes (a no-op outside shard_map),
  so that a kernel's operands and results agree (``check_vma``)."""
  axes = [frozenset(jax.typeof(x).manual_axis_type.varying) for x in xs]
  union = frozenset().union(*axes)
  return [x if a == union else lax.pcast(x, tuple(sorted(union - a)), to="varying") for x, a in zip(xs, axes)]


def nbytes(*arrays) -> int:
  """Bytes of ``arrays`` together (for ``pl.CostEstimate``)."""
  return int(sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays))


# An operand that XLA keeps in VMEM between ops (on v5e the qkv projection's output at 64 images of 197
# tokens, 28 MiB) reaches a windowed BlockSpec through a copy of every window by vector loads and stores,
# in the kernel's own bundles (the block predictor's table kernel: 230 of its 957 bundles a step). Taken
# whole (``pl.BlockSpec(memory_space=pltpu.VMEM)``) it is read where it lies. Only operands up to this
# share of the chip's VMEM are taken so: XLA must place them there, copying one it kept in HBM.
_WHOLE_VMEM_SHARE = 4


def whole_in_vmem(x) -> bool:
  """Whether a TPU kernel takes ``x`` whole from VMEM: the traced-for chip's VMEM is known
  (``backend.Target.vmem_bytes``) and ``x`` is at most ``1 / _WHOLE_VMEM_SHARE`` of it."""
  vmem = backend.target().vmem_bytes
  return vmem is not None and nbytes(x) * _WHOLE_VMEM_SHARE <= vmem


def gpu_flash_core(forward, backward):
  """The differentiable core of a GPU (Triton) flash-attention kernel set: ``core(cfg, q, k, v, mask)``
  with a custom VJP, from ``forward(cfg, q, k, v, mask) -> (out, lse [B, H, N])`` and ``backward(cfg, q,
  k, v, mask, dout, lse, delta) -> (dq, dk, dv)``. Operands ``[B, N_pad, H, d_pad]``; ``mask`` (packed
  words or a block table) gets no gradient; ``delta = rowsum(dO * O)`` as ``[B, H, N_pad]``."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(cfg, q, k, v, mask):
    return forward(cfg, q, k, v, mask)[0]

  def core_fwd(cfg, q, k, v, mask):
    out, lse = forward(cfg, q, k, v, mask)
    return out, (q, k, v, mask, out, lse)

  def core_bwd(cfg, res, dout):
    q, k, v, mask, out, lse = res
    delta = jnp.swapaxes(jnp.sum(dout * out, axis=-1), 1, 2)
    dq, dk, dv = backward(cfg, q, k, v, mask, dout, lse, delta)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

  core.defvjp(core_fwd, core_bwd)
  return core
