"""Mixed precision: the one rule every matmul of the models follows.

Inputs are cast to the compute dtype (``config.dtype``), products are accumulated and returned in float32,
and the backward pass keeps its products in the compute dtype too. Parameters, LayerNorm, softmax, GELU,
the residual stream, losses and optimizer state stay float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

def mixed_einsum(spec: str, a: Array, b: Array, dtype) -> Array:
  """``jnp.einsum`` of ``a`` and ``b`` cast to ``dtype``, accumulated and returned in float32.

  The models' mixed-precision rule for every matmul (``matmul_kwargs``): inputs in the compute dtype,
  products in float32. On XLA:CPU only bf16 dots that *return* float32 take the AMX path: a 2048^2 matmul
  ran at 1400 GFLOP/s against 284.5 in float32 (about 5x; BENCHMARKS.md). bf16 -> bf16 dots were slower
  than float32 ones (docs/attention.md; no benchmark record has that figure). Below float32 the
  backward pass follows the same rule: the incoming float32 cotangent is rounded to ``dtype`` and both
  gradient products are ``dtype`` x ``dtype`` -> float32 (JAX's own rule would multiply the float32
  cotangent with the bf16 operand, i.e. upcast and run every backward matmul in float32). ``spec``: two
  operands, no repeated or operand-only-summed indices.
  """
  a, b = a.astype(dtype), b.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  return _low_precision_einsum(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec: str, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_precision_einsum_fwd(spec, a, b):
  return _low_precision_einsum(spec, a, b), (a, b)


def _low_precision_einsum_bwd(spec, res, ct):
  a, b = res
  operands, out = spec.replace(" ", "").split("->")
  sa, sb = operands.split(",")
  if not set(sa) <= set(out) | set(sb) or not set(sb) <= set(out) | set(sa):
    raise ValueError(f"mixed_einsum: {spec!r} sums an index within one operand; not supported")
  ct = ct.astype(a.dtype)
  da = jnp.einsum(f"{out},{sb}->{sa}", ct, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{out},{sa}->{sb}", ct, a, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def mixed_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None, out_sharding=None) -> Array:
  """``lax.dot_general`` as a :func:`mixed_einsum` in ``lhs.dtype`` (the ``dot_general`` of the models'
  ``nnx.Linear`` layers, so their backward products stay in the compute dtype too)."""
  del precision, preferred_element_type
  if out_sharding is not None:
    raise ValueError("mixed_dot_general: out_sharding is not supported")
  (lc, rc), (lb, rb) = dimension_numbers
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  sl, sr = [""] * lhs.ndim, [""] * rhs.ndim
  for i, j in (*zip(lb, rb), *zip(lc, rc)):
    sl[i] = sr[j] = next(letters)
  sl = [c or next(letters) for c in sl]
  sr = [c or next(letters) for c in sr]
  out = ([sl[i] for i in lb] + [c for i, c in enumerate(sl) if i not in (*lb, *lc)]
         + [c for j, c in enumerate(sr) if j not in (*rb, *rc)])
  return mixed_einsum(f"{''.join(sl)},{''.join(sr)}->{''.join(out)}", lhs, rhs, lhs.dtype)


def matmul_kwargs(dtype_name) -> dict:
  """``nnx.Linear``/``nnx.Conv`` precision arguments: float32 parameters, inputs cast to the compute dtype,
  products accumulated and returned in float32 -- in the backward pass too (``mixed_einsum``)."""
  return dict(dtype=jnp.dtype(dtype_name), param_dtype=jnp.float32,
              preferred_element_type=jnp.float32)


def linear_kwargs(dtype_name) -> dict:
  """``matmul_kwargs`` plus a ``dot_general`` keeping a Linear's backward products in the compute dtype."""
  return dict(matmul_kwargs(dtype_name), dot_general=mixed_dot_general)

