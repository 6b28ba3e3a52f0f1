"""Token sparsity (EViT-style): schedule, real dropping == masked simulation, the
official mode's CLS-row difference, FLOPs, and a training run with token distillation."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny_test
from conftest import random_images
from sparsifiner_jax.evaluation import flops
from sparsifiner_jax import models
from sparsifiner_jax.train import trainer
from sparsifiner_jax.io import weights
from sparsifiner_jax.models import vit
from sparsifiner_jax.models.vit import token_schedule

TOL = 1e-5  # fp32, absolute, on logits/tokens of order 1


def _pair(mode_a, mode_b, **kw):
  """Two models with the same weights that differ only in ``token_pruning_mode``."""
  a = models.create("vit_test", token_pruning_mode=mode_a, rngs=nnx.Rngs(0), **kw)
  b = models.create("vit_test", token_pruning_mode=mode_b, rngs=nnx.Rngs(0), **kw)
  return a, b


def test_schedule_matches_the_official_keep_rates():
  cfg = models.get_config("deit_small_patch16_224", token_keep_rate=0.7)
  assert token_schedule(cfg) == (197,) * 4 + (139,) * 3 + (98,) * 3 + (69,) * 2
  # ceil(r^s * 196) + CLS, s = 1, 2, 3
  assert [math.ceil(0.7 ** s * 196) + 1 for s in (1, 2, 3)] == [139, 98, 69]
  assert token_schedule(models.get_config("deit_small_patch16_224")) == (197,) * 12


@pytest.mark.parametrize("keep_rate,executor", [(None, "masked"), (0.5, "masked"), (0.5, "gather")])
def test_real_dropping_equals_masked_simulation(keep_rate, executor):
  kw = dict(keep_rate=keep_rate, token_keep_rate=0.6, token_pruning_layers=(0, 1, 2), depth=4,
            executor=executor)
  drop, mask = _pair("drop", "mask", **kw)
  x = random_images(3, 16, seed=1)
  (ld, ad), (lm, am) = drop(x), mask(x)
  np.testing.assert_allclose(ld, lm, atol=TOL, rtol=0)
  np.testing.assert_array_equal(ad["token_index"], am["token_index"])
  np.testing.assert_allclose(ad["tokens"], am["tokens"], atol=TOL, rtol=0)
  # Kept counts per layer as configured: 17 tokens, then ceil(0.6^s * 16) + 1 = 11, 7, 5.
  sched = token_schedule(drop.config)
  assert sched == (17, 11, 7, 5)
  assert ad["tokens"].shape == (3, sched[-1] - 1, 32)
  if keep_rate is not None:
    for i, (m_d, m_m) in enumerate(zip(ad["masks"], am["masks"])):
      assert m_d.num_keys == sched[i]                     # the sequence really is shorter
      assert m_m.num_keys == 17                           # the simulation keeps full length
      np.testing.assert_array_equal(m_m.live_tokens(), sched[i])
      np.testing.assert_allclose(m_d.density(), m_m.density(), rtol=1e-6)


def test_pruned_tokens_are_the_lowest_cls_attention():
  model = models.create("vit_test", token_keep_rate=0.5, token_pruning_layers=(0,), rngs=nnx.Rngs(0))
  x = random_images(3, 16, seed=1)
  # Block 0's CLS attention on the unpruned sequence decides which 8 of 16 patches stay.
  h = model.patch_embed(x)
  h = jnp.concatenate([jnp.broadcast_to(model.cls_token[...], (3, 1, 32)), h], 1) + model.pos_embed[...]
  _, aux0 = model.blocks[0](h, tokens=vit.initial_token_state(model.config, 3))   # CLS attention kept
  want = np.sort(np.argsort(-np.asarray(aux0["cls_attn"][:, 1:]), axis=-1)[:, :8], axis=-1)
  _, aux = model(x)
  np.testing.assert_array_equal(aux["token_index"], want)


def test_official_mode_differs_only_through_the_cls_row():
  # Prune after block 0 of 2: block 1's patch rows see the same keys in both modes, so the final
  # patch tokens agree; the official CLS row still gives each pruned (zeroed) key the weight e^0.
  official, mask = _pair("official", "mask", keep_rate=0.5, token_keep_rate=0.5,
                         token_pruning_layers=(0,))
  x = random_images(3, 16, seed=1)
  (lo, ao), (lm, am) = official(x), mask(x)
  np.testing.assert_array_equal(ao["token_index"], am["token_index"])
  np.testing.assert_allclose(ao["tokens"], am["tokens"], atol=TOL, rtol=0)
  assert np.abs(np.asarray(lo) - np.asarray(lm)).max() > 1e-4   # CLS -> logits differ


def test_flops_follow_the_token_schedule():
  cfg = models.get_config("deit_small_patch16_224", token_keep_rate=0.7)
  c, hidden = 384, 1536

  def layer_macs(n):   # qkv + proj + MLP + QK^T + AV
    return 4 * n * c * c + 2 * n * c * hidden + 2 * n * n * c

  got = flops.count(cfg)
  want_blocks = sum(layer_macs(n) for n in token_schedule(cfg))
  blocks = sum(sum(v for k, v in layer.items() if k in ("qkv", "proj", "mlp", "attn_qk", "attn_av"))
               for layer in got.per_layer)
  assert blocks == pytest.approx(want_blocks, rel=1e-12)
  dense = flops.count(models.get_config("deit_small_patch16_224"))
  ratio = got.totals["total"] / dense.totals["total"]
  assert 0.68 < ratio < 0.70, ratio    # the FLOPs floor of this schedule (~0.69x)
  # Attention sparsity budget is ceil(0.25 * 197) = 50 keys per patch row, capped by live patches.
  both = flops.count(models.get_config("deit_small_patch16_224", keep_rate=0.25, token_keep_rate=0.7))
  assert [lay["nnz_per_head"] for lay in both.per_layer][-1] == 69 + 68 * 50


def test_validation_messages():
  with pytest.raises(ValueError, match="token_keep_rate"):
    models.get_config("vit_test", token_keep_rate=1.5)
  with pytest.raises(ValueError, match="token_pruning_layers"):
    models.get_config("vit_test", token_keep_rate=0.7)        # (3, 6, 9) but depth 2
  with pytest.raises(ValueError, match="token_pruning_mode"):
    models.get_config("vit_test", token_keep_rate=0.7, token_pruning_layers=(0,),
                      token_pruning_mode="zero")


def test_training_with_token_sparsity_and_token_distillation(tmp_path):
  teacher = weights.save_weights(str(tmp_path / "t"), models.create("vit_test", rngs=nnx.Rngs(7)))
  c = tiny_test.get_config()
  c.teacher.weights = c.init = teacher
  c.model.token_keep_rate = 0.5
  c.model.token_pruning_layers = (0,)
  c.phases.train.steps = 0
  out = trainer.train(c, str(tmp_path / "run"))
  assert out["step"] == 6
  ev = out["phases"]["distill"]
  assert np.isfinite(ev["loss"]) and 0.0 < ev["density"] < 1.0
