"""Losses against hand-computed values; schedules hit their endpoints; weight-decay mask; phases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny_test, deit_s_sparsifiner
from sparsifiner_jax import models
from sparsifiner_jax.train import losses, optim, phases


def test_soft_ce_and_kd_values():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  t = np.array([[0.7, 0.2, 0.1]], np.float32)
  logp = np.log(np.exp([2, 0, -1]) / np.exp([2, 0, -1]).sum())
  assert float(losses.soft_cross_entropy(logits, t)) == pytest.approx(float(-(t[0] * logp).sum()), rel=1e-6)
  tl = jnp.array([[0.0, 1.0, 0.0]])
  pt = np.exp([0, 1, 0]) / np.exp([0, 1, 0]).sum()
  want = (pt * (np.log(pt) - logp)).sum()
  assert float(losses.kd_kl(logits, tl)) == pytest.approx(want, rel=1e-6)
  assert float(losses.kd_kl(logits, logits)) == pytest.approx(0.0, abs=1e-7)


def test_recon_loss_is_sum_reduced_and_rescaled():
  a = [jnp.ones((2, 3, 4, 5)), None]
  t = [jnp.zeros((2, 3, 5, 5)), jnp.zeros((2, 3, 5, 5))]
  # one layer with a predictor: sum of 2*3*4*5 ones = 120, rescaled to a reference batch of 168
  assert float(losses.attention_reconstruction(a, t, reference_batch=168)) == pytest.approx(120 * 84)


@pytest.mark.parametrize("warm,total", [(3, 10), (0, 5), (5, 5)])
def test_schedule_endpoints(warm, total):
  s = optim.warmup_cosine(3e-4, 2e-4, warm, total)
  assert float(s(0)) == pytest.approx(0.0 if warm else 3e-4)
  if warm < total:
    assert float(s(warm)) == pytest.approx(3e-4, rel=1e-6)
    assert float(s(total)) == pytest.approx(2e-4, rel=1e-6)
  else:
    assert float(s(total)) == pytest.approx(3e-4, rel=1e-6)


def test_decay_mask_skips_vectors_cls_pos():
  model = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))
  mask = optim.decay_mask(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert not any(v for k, v in flat.items() if "cls_token" in k or "pos_embed" in k or "bias" in k
                 or "norm" in k)
  assert flat["['blocks'][0]['attn']['qkv']['kernel'].value"]
  assert flat["['blocks'][0]['attn']['mask_predictor']['proj_n'].value"]


def test_paper_recipe_resolves_to_official_steps():
  c = deit_s_sparsifiner.get_config()
  ph = phases.resolve_phases(c, steps_per_epoch=1_281_167 // 1344)
  assert [p.name for p in ph] == ["recon", "distill"]
  assert ph[0].steps == 5 * 953 and ph[0].warmup_steps == 3 * 953
  assert ph[1].start == 5 * 953 and ph[1].steps == 45 * 953
  assert (ph[0].lr, ph[0].final_lr, ph[1].lr, ph[1].final_lr) == (3e-4, 2e-4, 8e-5, 2e-6)
  assert ph[0].weight("recon") == 0.01 and ph[1].weight("kd") == 0.5


def test_keep_rate_override_flows_to_model():
  c = tiny_test.get_config("keep_rate=0.1")
  assert models.build_model(c).blocks[0].attn.mask_predictor.keep_rate == 0.1
