"""Attention recall (``evaluation.recall``) against a NumPy reference, its edge cases, token pruning, and
the exact evaluator's per-layer recall (padding excluded).

Tolerances: float32 recall against a float64 reference, 1e-6 absolute (rows of at most 37 probabilities);
"mask" against "drop" token pruning, 1e-5 (two different float32 programs over the same live tokens).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_images
from sparsifiner_jax import models, sharding
from sparsifiner_jax.attention.mask import AttentionMask
from sparsifiner_jax.evaluation import evaluator
from sparsifiner_jax.evaluation.recall import attention_recall, layer_recalls

B, H, N, K = 3, 2, 17, 5


def random_attn(rng, b=B, h=H, n=N):
  """Dense softmax probabilities ``[b, h, n, n]`` with a spread of row shapes (float32)."""
  logits = rng.normal(size=(b, h, n, n)) * rng.uniform(0.5, 4.0, size=(b, h, n, 1))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def random_mask(rng, b=B, h=H, n=N, k=K, key_valid=None):
  """A mask with ``k`` random distinct keys per sparse row (some padded out) and its dense keep
  ``[b, h, n, n]`` built here, independently of ``to_dense``: ``(AttentionMask, keep)``."""
  idx = np.argsort(rng.random((b, h, n - 1, n)), axis=-1)[..., :k].astype(np.int32)
  valid = rng.random((b, h, n - 1, k)) < 0.8
  keep = np.zeros((b, h, n, n), bool)
  keep[:, :, 0] = True                                            # the dense CLS row
  for bi, hi, r, j in np.ndindex(*idx.shape):
    keep[bi, hi, r + 1, idx[bi, hi, r, j]] |= valid[bi, hi, r, j]
  mask = AttentionMask(indices=jnp.asarray(idx), valid=jnp.asarray(valid), num_dense_rows=1,
                       num_keys=n, key_valid=None if key_valid is None else jnp.asarray(key_valid))
  return mask, keep


def recall_reference(attn, keep, key_valid=None):
  """Per-example recall in float64, row by row: kept mass of the softmax renormalised over the live keys,
  averaged over heads and live query rows. ``keep`` broadcasts to ``attn``."""
  attn = attn.astype(np.float64)
  b, h, n, _ = attn.shape
  keep = np.broadcast_to(keep, attn.shape)
  live = np.ones((b, n), bool) if key_valid is None else key_valid
  out = np.zeros(b)
  for bi in range(b):
    rows = [attn[bi, hi, r][keep[bi, hi, r] & live[bi]].sum() / attn[bi, hi, r][live[bi]].sum()
            for hi in range(h) for r in range(n) if live[bi, r]]
    out[bi] = np.mean(rows)
  return out


def test_recall_matches_numpy_reference():
  rng = np.random.default_rng(0)
  attn = random_attn(rng)
  mask, keep = random_mask(rng)
  got = np.asarray(jax.jit(attention_recall)(jnp.asarray(attn), mask))
  assert got.shape == (B,)
  np.testing.assert_allclose(got, recall_reference(attn, keep), atol=1e-6, rtol=0)
  assert np.all(got < 0.9)          # a random 5-of-17 mask keeps far from all the mass


def test_recall_of_a_mask_shared_by_the_batch_and_heads():
  """A fixed pattern's mask is ``[1, 1, N, N]``: it broadcasts over examples and heads."""
  rng = np.random.default_rng(1)
  attn = random_attn(rng)
  mask, keep = random_mask(rng, b=1, h=1)
  np.testing.assert_allclose(np.asarray(attention_recall(jnp.asarray(attn), mask)),
                             recall_reference(attn, keep), atol=1e-6, rtol=0)


def test_dense_layer_and_full_mask_have_recall_one():
  rng = np.random.default_rng(2)
  attn = jnp.asarray(random_attn(rng))
  np.testing.assert_array_equal(attention_recall(attn, None), np.ones(B, np.float32))
  everything = np.broadcast_to(np.arange(N, dtype=np.int32), (B, H, N - 1, N))
  full = AttentionMask(indices=jnp.asarray(everything), num_dense_rows=1, num_keys=N)
  np.testing.assert_allclose(np.asarray(attention_recall(attn, full)), 1.0, atol=1e-6, rtol=0)


def test_pruned_tokens_count_neither_as_rows_nor_as_keys():
  """With ``key_valid`` the reference is the softmax over live keys, averaged over live rows; whatever
  the dense attention puts on pruned rows and keys does not move the figure."""
  rng = np.random.default_rng(3)
  key_valid = rng.random((B, N)) < 0.6
  key_valid[:, 0] = True                                          # CLS is never pruned
  attn = random_attn(rng)
  mask, keep = random_mask(rng, key_valid=key_valid)
  got = np.asarray(attention_recall(jnp.asarray(attn), mask))
  np.testing.assert_allclose(got, recall_reference(attn, keep, key_valid), atol=1e-6, rtol=0)
  assert not np.allclose(got, recall_reference(attn, keep), atol=1e-3)   # pruning matters here
  scrambled = attn.copy()
  pruned_rows = ~key_valid[:, None, :, None] & np.ones_like(attn, bool)
  scrambled[pruned_rows] = rng.random(int(pruned_rows.sum()))      # pruned rows: anything
  scrambled = np.where(key_valid[:, None, None, :], scrambled, scrambled * 5)   # more mass off-live
  np.testing.assert_allclose(np.asarray(attention_recall(jnp.asarray(scrambled), mask)), got,
                             atol=1e-6, rtol=0)
  # Every live key kept: recall 1 although the pruned keys hold dense probability mass.
  full = AttentionMask(indices=jnp.asarray(np.broadcast_to(np.arange(N, dtype=np.int32),
                                                           (B, H, N - 1, N))),
                       num_dense_rows=1, num_keys=N, key_valid=jnp.asarray(key_valid))
  np.testing.assert_allclose(np.asarray(attention_recall(jnp.asarray(attn), full)), 1.0, atol=1e-6)


def _unit_scale(model):
  """Every parameter redrawn at unit scale, so attention rows are peaked and top-k has no near-ties."""
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [
      jax.random.normal(k, x.shape, x.dtype) / (np.sqrt(x.shape[0]) if x.ndim >= 2 else 4.0)
      for k, x in zip(keys, leaves)]))
  return model


def test_mask_mode_token_pruning_equals_drop_mode():
  """"mask" pruning keeps full-length layers and marks pruned tokens in ``key_valid``; its recall must
  equal "drop" pruning's, where those tokens are gone (so pruned rows and keys are excluded)."""
  kw = dict(keep_rate=0.4, img_size=24, depth=3, token_keep_rate=0.5, token_pruning_layers=(1,))
  out = {}
  images = random_images(4, 24)
  for mode in ("drop", "mask"):
    model = _unit_scale(models.create("vit_test", token_pruning_mode=mode, rngs=nnx.Rngs(0), **kw))
    out[mode] = nnx.jit(lambda m, x: layer_recalls(m(x, train=False, with_attention=True)[1],
                                                   x.shape[0]))(model, images)
  assert out["mask"].shape == (4, 3)
  np.testing.assert_allclose(np.asarray(out["mask"]), np.asarray(out["drop"]), atol=1e-5, rtol=0)
  assert np.all(np.asarray(out["drop"]) < 1.0 - 1e-3)


def test_oracle_topk_recall_is_the_top_k_probability_mass():
  """A fixed pattern (oracle top-k by the dense logits) keeps each patch row's ``k`` largest
  probabilities: recall = the mean of their sum (the CLS row counts 1)."""
  model = _unit_scale(models.create("vit_test", keep_rate=0.25, attention_pattern="oracle_topk",
                                    rngs=nnx.Rngs(0)))
  images = random_images(4, 16)
  _, aux = model(images, train=False, with_attention=True)
  got = np.asarray(layer_recalls(aux, 4))
  k = 5                                                           # ceil(0.25 * 17)
  for layer, attn in enumerate(aux["attn"]):
    p = np.sort(np.asarray(attn, np.float64)[:, :, 1:], axis=-1)[..., ::-1]
    rows = np.concatenate([np.ones(p.shape[:2] + (1,)), p[..., :k].sum(-1)], axis=-1)
    np.testing.assert_allclose(got[:, layer], rows.mean(axis=(1, 2)), atol=1e-6, rtol=0)


def test_eval_step_sums_recall_over_real_examples_only():
  """``make_eval_step(recall=True)`` returns per-layer recall sums over the examples its ``mask`` marks
  real; padded examples (here: other images) change nothing."""
  model = _unit_scale(models.create("vit_test", keep_rate=0.25, rngs=nnx.Rngs(0)))
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  graphdef, params, rest = models.split_params(model)
  images = random_images(4, 16)
  labels = jnp.zeros((4,), jnp.int32)
  real = jnp.asarray([True, True, True, False])
  step = evaluator.make_eval_step(graphdef, mesh, recall=True)
  with jax.set_mesh(mesh):
    sums = jax.device_get(step(params, rest, None, images, labels, real))
    padded = jax.device_get(step(params, rest, None, images.at[3].set(5.0), labels, real))
  per_example = evaluator.per_example_stats(model, images, labels, recall=True)
  want = np.asarray(per_example["layer_recall"])[:3].sum(0)
  assert sums["layer_recall"].shape == (2,) and float(sums["count"]) == 3
  np.testing.assert_allclose(sums["layer_recall"], want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(sums["recall"], want.mean(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(padded["layer_recall"], sums["layer_recall"], atol=1e-5, rtol=0)
  assert "recall" not in jax.device_get(evaluator.make_eval_step(graphdef, mesh)(
      params, rest, None, images, labels, real))                       # off by default (compile_for)


@pytest.mark.parametrize("keep_rate", [None, 0.25])
def test_evaluator_reports_per_layer_recall(keep_rate):
  """The exact evaluator on the digits test split (360 images, a padded last batch)."""
  from configs import tiny_test
  config = tiny_test.get_config()
  config.model.keep_rate = keep_rate
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  graphdef, params, rest = models.split_params(models.build_model(config))
  with jax.set_mesh(mesh):
    ev = evaluator.Evaluator(config, mesh).run(graphdef, params, rest)
  assert ev["num_examples"] == 360 and len(ev["layer_recall"]) == 2
  assert ev["recall"] == pytest.approx(np.mean(ev["layer_recall"]), abs=1e-6)
  if keep_rate is None:
    assert ev["layer_recall"] == [1.0, 1.0]
  else:   # a fresh model's attention is near uniform: recall is about the density
    assert all(0.0 < r < 1.0 for r in ev["layer_recall"])
    assert ev["recall"] == pytest.approx(ev["density"], abs=0.05)


def test_demo_summary_has_a_recall_column():
  from sparsifiner_jax import demo
  summary = dict(dense_top1=0.98333, sparsifiner_top1=0.98, untrained_mask_top1=0.8139,
                 agreement_with_teacher=0.9889, keep_rate=0.25, attention_density=0.2729,
                 untrained_mask_density=0.2729, dense_recall=1.0, attention_recall=0.91234,
                 untrained_mask_recall=0.5, attention_matrix_flops_cut=0.39549, mhsa_flops_cut=0.133,
                 total_flops_cut=0.05)
  lines = demo.summary_lines(summary)
  assert lines[0] == ("| model | test top-1 % | attention density % | attention recall % | "
                      "agreement with teacher % |")
  assert lines[2] == "| dense ViT (teacher) | 98.33 | 100.00 | 100.00 | 100.00 |"
  assert lines[3] == "| Sparsifiner keep 0.25 | 98.00 | 27.29 | 91.23 | 98.89 |"
  assert lines[4] == "| teacher + untrained predictor mask | 81.39 | 27.29 | 50.00 | - |"
  assert lines[6].startswith("Attention-matrix MACs (QK^T, AV + predictor) cut: 39.5 %; MHSA MACs cut: "
                             "13.3 %; total: 5.0 %.")
