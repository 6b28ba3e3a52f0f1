"""``pallas.token_products``: block mode's predictor products over tokens on TPU (interpreted), against
the XLA products they replace, float32 within 1e-5 (values of order 1), with bfloat16 products (``dtype``)
too: both sides round the same operands, accumulate in float32 and round kᵀP to ``dtype``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsifiner_jax.attention import backend
from sparsifiner_jax.attention.pallas import token_products


def _operands(n=37, heads=4, d=64, m=9, seed=0):
  rng = np.random.default_rng(seed)
  qkv = jnp.asarray(rng.normal(size=(2, n, 3, heads, d)), jnp.float32)
  return qkv, jnp.asarray(rng.normal(size=(n, m)) * 0.1, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_the_xla_products(dtype):
  """N = 37 in blocks of 16 (a ragged last block: its mean is over its 5 tokens), two head groups."""
  qkv, proj_n = _operands()
  with backend.compiling_for("tpu", interpret=True):
    assert token_products.applies(qkv)
    got = token_products.token_products(qkv, proj_n, block=16, dtype=dtype)
    text = str(jax.make_jaxpr(lambda a, p: token_products.token_products(a, p, block=16, dtype=dtype))(
        qkv, proj_n))
  want = token_products.reference(qkv, proj_n, 16, dtype)
  assert "predictor_token_products" in text
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-5, rtol=0)
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32


def test_gradient_is_the_xla_products_gradient():
  qkv, proj_n = _operands(seed=1)
  weights = [jnp.asarray(np.random.default_rng(2).normal(size=s), jnp.float32)
             for s in ((2, 4, 64, 9), (2, 3, 4, 64))]

  def loss(fn):
    return lambda a, p: sum(jnp.sum(x * w) for x, w in zip(fn(a, p), weights))

  with backend.compiling_for("tpu", interpret=True):
    got = jax.grad(loss(lambda a, p: token_products.token_products(a, p, block=16, dtype=jnp.float32)),
                   argnums=(0, 1))(qkv, proj_n)
  want = jax.grad(loss(lambda a, p: token_products.reference(a, p, 16, jnp.float32)), argnums=(0, 1))(
      qkv, proj_n)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("platform,heads,d,runs", [("cpu", 4, 64, False), ("tpu", 3, 8, False),
                                                    ("tpu", 3, 64, False), ("tpu", 6, 64, True)])
def test_applies_on_tpu_to_whole_lane_tiles_of_heads(platform, heads, d, runs):
  qkv = jnp.zeros((1, 5, 3, heads, d))
  with backend.compiling_for(platform, interpret=platform != "cpu"):
    assert token_products.applies(qkv) == runs
