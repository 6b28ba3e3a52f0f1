"""The accelerator path end to end: a whole Sparsifiner model traced for TPU or GPU (``auto`` -> the Pallas
mask and attention kernels, run in Pallas' interpreter on CPU) against the same model on the reference
``masked`` executor with the XLA mask.

Tolerances: float32 logits and every parameter gradient within 1e-5 (absolute, of values of order 1);
masks identical bit for bit; bfloat16 logits within 2e-2 (bf16 keeps 8 bits of mantissa, and the two
paths sum products in different orders).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_images
from sparsifiner_jax import models
from sparsifiner_jax.attention import backend
from sparsifiner_jax.attention.pallas import block_predictor

BACKENDS = ("tpu", "gpu")
CASES = {   # name: model overrides (vit_test: 17 tokens at 16 px, 2 layers, 2 heads)
    "keep0.3": dict(keep_rate=0.3),
    "keep1.0": dict(keep_rate=1.0),
    "n37": dict(keep_rate=0.25, img_size=24),
    "tokens_drop": dict(keep_rate=0.4, img_size=24, depth=3, token_keep_rate=0.5, token_pruning_layers=(1,)),
    "tokens_mask": dict(keep_rate=0.4, img_size=24, depth=3, token_keep_rate=0.5, token_pruning_layers=(1,),
                        token_pruning_mode="mask"),
    # Block mode: 82 tokens in blocks of 16 (the last one ragged: 2 tokens).
    "blocks": dict(keep_rate=0.4, img_size=36, mask_block=16),
    "blocks_keep1.0": dict(keep_rate=1.0, img_size=36, mask_block=16),
    # Heads of 64 in pairs (one 128-lane tile): on TPU the block predictor's projections run in their kernel.
    "blocks_lanes": dict(keep_rate=0.4, img_size=36, mask_block=16, embed_dim=128, num_heads=2),
    "blocks_tokens_drop": dict(keep_rate=0.5, img_size=36, depth=3, mask_block=16, token_keep_rate=0.5,
                               token_pruning_layers=(1,)),
    "blocks_tokens_mask": dict(keep_rate=0.5, img_size=36, depth=3, mask_block=16, token_keep_rate=0.5,
                               token_pruning_layers=(1,), token_pruning_mode="mask"),
}


def _variance_preserving(model):
  """Every parameter redrawn at unit scale (matrices: ``N(0, 1 / fan_in)``), so that attention moves the
  logits by O(1) and an error in it cannot hide under the tiny initialisation of a fresh model."""
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  fresh = [jax.random.normal(k, x.shape, x.dtype) / (np.sqrt(x.shape[0]) if x.ndim >= 2 else 4.0)
           for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(tree, fresh))


def _pair(dtype="float32", **overrides):
  """The model on ``auto`` and a copy on ``masked`` with the same parameters."""
  fast = models.create("vit_test", executor="auto", dtype=dtype, **overrides)
  _variance_preserving(fast)
  ref = models.create("vit_test", executor="masked", dtype=dtype, **overrides)
  nnx.update(ref, nnx.state(fast))
  return fast, ref


@nnx.jit
def _forward(model, images):
  logits, aux = model(images)
  return logits, [m.packed_rows() for m in aux["masks"] if m is not None]


@nnx.jit
def _grads(model, images):
  def loss(model):
    logits, _ = model(images, train=True)
    return jnp.sum(logits * jnp.linspace(-1.0, 1.0, logits.size).reshape(logits.shape))
  return nnx.grad(loss)(model)


def _on(platform, fn, *args):
  with backend.compiling_for(platform, interpret=True):
    return fn(*args)


@pytest.mark.parametrize("platform", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_model_forward_and_masks_match_masked(platform, case):
  fast, ref = _pair(**CASES[case])
  images = random_images(2, fast.config.img_size, seed=7)
  want_logits, want_masks = _forward(ref, images)
  got_logits, got_masks = _on(platform, _forward, fast, images)
  assert len(got_masks) == fast.config.depth
  for want, got in zip(want_masks, got_masks):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("platform", BACKENDS)
@pytest.mark.parametrize("case", ["keep0.3", "tokens_drop", "blocks", "blocks_lanes", "blocks_tokens_drop"])
def test_model_gradients_match_masked(platform, case):
  fast, ref = _pair(**CASES[case])
  images = random_images(2, fast.config.img_size, seed=7)
  want = _grads(ref, images)
  got = _on(platform, _grads, fast, images)
  want_leaves, got_leaves = jax.tree.leaves(want), jax.tree.leaves(got)
  assert len(got_leaves) == len(want_leaves) > 0
  for w, g in zip(want_leaves, got_leaves):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_bf16_model_matches_masked():
  fast, ref = _pair(dtype="bfloat16", keep_rate=0.3)
  images = random_images(2, fast.config.img_size, seed=7)
  want, _ = _forward(ref, images)
  got, _ = _on("tpu", _forward, fast, images)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=0)


def test_pallas_can_be_switched_off(monkeypatch):
  """``SPARSIFINER_JAX_PALLAS=0``: the accelerator path traces no Pallas call (``masked`` instead)."""
  fast, _ = _pair(keep_rate=0.3)
  images = random_images(2, fast.config.img_size, seed=7)

  def hlo():
    with backend.compiling_for("tpu", interpret=True):
      return jax.jit(lambda images: nnx.merge(*nnx.split(fast))(images)[0]).lower(images).as_text()

  assert backend.target().platform == "cpu"
  monkeypatch.setenv("SPARSIFINER_JAX_PALLAS", "0")
  off = hlo()
  monkeypatch.setenv("SPARSIFINER_JAX_PALLAS", "1")
  on = hlo()
  # Interpreted kernels lower to loops over the grid (while ops); masked attention has none.
  assert on.count("stablehlo.while") > off.count("stablehlo.while")


@pytest.mark.parametrize("table_kernel", [True, False], ids=["table_kernel", "xla_selection"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepared_constants_change_nothing(dtype, table_kernel, monkeypatch):
  """Evaluation computes block mode's parameter-only kernel operands once ahead
  (``models.inference_constants``; on TPU the predictor's kernels take them, the table kernel's or, where
  XLA selects, as at 896 px, the projections kernel's): logits and masks bit-identical to the model
  computing them in its forward. Corrupted constants change the masks: the kernels read them."""
  if not table_kernel:
    monkeypatch.setattr(block_predictor, "table_applies", lambda *_: False)
  fast, _ = _pair(dtype=dtype, **CASES["blocks_lanes"])
  images = random_images(2, fast.config.img_size, seed=7)
  graphdef, params, rest = models.split_params(fast)
  consts = models.inference_constants(graphdef, params, rest)
  assert len(consts) == fast.config.depth and all(c.basis is not None for c in consts)

  @jax.jit
  def forward(params, rest, consts, images):
    model = models.use_constants(models.merge_params(graphdef, params, rest), consts)
    logits, aux = model(images)
    return logits, [m.packed_rows() for m in aux["masks"]]

  want_logits, want_masks = _on("tpu", forward, params, rest, None, images)
  got_logits, got_masks = _on("tpu", forward, params, rest, consts, images)
  np.testing.assert_array_equal(np.asarray(got_logits, np.float32), np.asarray(want_logits, np.float32))
  for want, got in zip(want_masks, got_masks):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  flat = [c._replace(basis=c.basis[:, ::-1]) for c in consts]     # key blocks' scores reversed
  _, bad_masks = _on("tpu", forward, params, rest, flat, images)
  assert any((np.asarray(b) != np.asarray(w)).any() for b, w in zip(bad_masks, want_masks))
