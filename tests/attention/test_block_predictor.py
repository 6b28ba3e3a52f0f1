"""``pallas.block_predictor``: block mode's predictor projections on TPU (interpreted), against the XLA
products they replace (``reference``), float32 within 1e-5 (values of order 1), with bfloat16 products
(``dtype``) too: both sides round the same operands to ``dtype`` and accumulate in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsifiner_jax.attention import backend
from sparsifiner_jax.attention.pallas import block_predictor


def _operands(n=37, heads=4, d=64, m=9, c=24, seed=0):
  """``qkv [2, n, 3, heads, d]`` and the predictor's ``(proj_n [1, n, m], w_k, b_k, w_q, b_q)``."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)   # noqa: E731
  return normal(2, n, 3, heads, d), (normal(1, n, m, scale=0.1), normal(d, c, scale=0.1), normal(c),
                                     normal(d, c, scale=0.1), normal(c))


def _reference(qkv, params, dtype):
  return block_predictor.reference(qkv[:, :, 0], qkv[:, :, 1], *params, block=16, dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_the_xla_projections(dtype):
  """N = 37 in blocks of 16 (a ragged last block: its mean is over its 5 tokens), four heads of 64."""
  qkv, params = _operands()
  run = lambda qkv, *params: block_predictor.projections(qkv, *params, block=16, dtype=dtype)   # noqa: E731
  with backend.compiling_for("tpu", interpret=True):
    assert block_predictor.applies(qkv, params[0])
    got = run(qkv, *params)
    text = str(jax.make_jaxpr(run)(qkv, *params))
  want = _reference(qkv, params, dtype)
  assert "block_predictor_projections" in text
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-5, rtol=0)
  assert got[0].shape == (2, 3, 4, 24) and got[1].shape == (2, 9, 4, 24)


def test_reference_matches_numpy():
  """The XLA projections themselves: ``K̂ᵀ = (k W_k + b_k)ᵀ P`` and the pooled ``q W_q + b_q`` in float64."""
  qkv, params = _operands(seed=3)
  q, k = np.asarray(qkv[:, :, 0], np.float64), np.asarray(qkv[:, :, 1], np.float64)
  proj_n, w_k, b_k, w_q, b_q = (np.asarray(p, np.float64) for p in params)
  q_pool = np.stack([q[:, i:i + 16].mean(1) for i in range(0, 37, 16)], 1)
  want_q = q_pool @ w_q + b_q
  want_k = np.einsum("bnhc,nm->bmhc", k @ w_k + b_k, proj_n[0])
  got_q, got_k = _reference(qkv, params, jnp.float32)
  np.testing.assert_allclose(np.asarray(got_q), want_q, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got_k), want_k, atol=1e-5, rtol=0)


def test_gradient_is_the_xla_gradient():
  qkv, params = _operands(seed=1)
  rng = np.random.default_rng(2)
  weights = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 3, 4, 24), (2, 9, 4, 24))]

  def loss(fn):
    return lambda *args: sum(jnp.sum(x * w) for x, w in zip(fn(*args), weights))

  args = (qkv, *params)
  with backend.compiling_for("tpu", interpret=True):
    got = jax.grad(loss(lambda qkv, *p: block_predictor.projections(qkv, *p, block=16, dtype=jnp.float32)),
                   argnums=tuple(range(6)))(*args)
  want = jax.grad(loss(lambda qkv, *p: _reference(qkv, p, jnp.float32)), argnums=tuple(range(6)))(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("platform,heads,d,batched_p,runs", [
    ("cpu", 4, 64, False, False), ("tpu", 3, 8, False, False), ("tpu", 3, 64, False, False),
    ("tpu", 6, 64, False, True), ("tpu", 4, 96, False, True), ("tpu", 6, 64, True, False)])
def test_applies_on_tpu_to_heads_filling_whole_lane_tiles(platform, heads, d, batched_p, runs):
  """``H d`` a multiple of 128 lanes, and one ``P`` for the batch (token sparsity gathers one per example)."""
  qkv = jnp.zeros((2, 5, 3, heads, d))
  with backend.compiling_for(platform, interpret=platform != "cpu"):
    assert block_predictor.applies(qkv, jnp.zeros((2 if batched_p else 1, 5, 4))) == runs
