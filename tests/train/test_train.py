"""Training system: phases freeze what they should, sharded == single device, resume is exact."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny_test
from conftest import override
from sparsifiner_jax import models
from sparsifiner_jax.io import weights
from sparsifiner_jax.train import trainer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("teacher") / "w"
  return weights.save_weights(str(path), models.create("vit_test", rngs=nnx.Rngs(7)))


def _config(teacher, **kw):
  c = tiny_test.get_config()
  c.teacher.weights = teacher
  c.init = teacher
  return override(c, **kw)


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def test_phase_freezing(tmp_path, teacher_dir):
  c = _config(teacher_dir)
  c.phases.train.steps = 0
  out_recon = trainer.train(c, str(tmp_path / "a"), stop_after=3)      # recon only
  init = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))
  weights.load_weights(teacher_dir, init)
  _, p0, _ = models.split_params(init)
  p1 = out_recon["state"]["params"]
  b0, b1 = _flat(p0["backbone"]), _flat(p1["backbone"])
  assert all(np.array_equal(b0[k], b1[k]) for k in b0)                   # backbone frozen in recon
  q0, q1 = _flat(p0["predictor"]), _flat(p1["predictor"])
  assert any(not np.array_equal(q0[k], q1[k]) for k in q0)               # predictor trained
  out = trainer.train(c, str(tmp_path / "a"))                            # resume into distill
  p2 = out["state"]["params"]
  q2, b2 = _flat(p2["predictor"]), _flat(p2["backbone"])
  assert all(np.array_equal(q1[k], q2[k]) for k in q1)                   # predictor frozen in distill
  assert any(not np.array_equal(b1[k], b2[k]) for k in b1)


def test_resume_equals_uninterrupted(tmp_path, teacher_dir):
  c = _config(teacher_dir)
  full = trainer.train(c, str(tmp_path / "full"))
  trainer.train(c, str(tmp_path / "part"), stop_after=4)                 # stops mid-recon
  resumed = trainer.train(c, str(tmp_path / "part"))
  a, b = _flat(full["state"]["params"]), _flat(resumed["state"]["params"])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert os.path.isdir(tmp_path / "full" / "final")
  # best/ was chosen by the same evaluation: the resumed run compared against the top-1 recorded with
  # best/ instead of starting over at -1 (which rewrote best/ at the first phase end after a resume).
  full_best = weights.read_meta(str(tmp_path / "full" / "best"))["evaluation"]
  assert weights.read_meta(str(tmp_path / "part" / "best"))["evaluation"] == full_best
  assert set(full_best) == {"top1", "step", "phase"}


def test_eight_devices_equal_one(tmp_path, teacher_dir):
  c8 = _config(teacher_dir)
  c1 = _config(teacher_dir)
  c8.phases.recon.steps = 0
  c1.phases.recon.steps = 0
  c8.phases.distill.steps = 0
  c1.phases.distill.steps = 0
  c8.phases.train.steps = 2
  c1.phases.train.steps = 2
  c1.mesh = [("data", 1), ("fsdp", 1)]
  c8.mesh = [("data", 4), ("fsdp", 2)]
  devs1 = jax.devices()[:1]
  out8 = trainer.train(c8, str(tmp_path / "d8"))
  with jax.default_device(devs1[0]):
    out1 = trainer.train(c1, str(tmp_path / "d1"), devices=devs1)
  a, b = _flat(out8["state"]["params"]), _flat(out1["state"]["params"])
  assert out8["phases"]["train"]["loss"] == pytest.approx(out1["phases"]["train"]["loss"], abs=1e-5)
  dim = 32
  for k in a:
    x, y = a[k], b[k]
    if "qkv" in k and "bias" in k:
      # The key bias has an exactly-zero gradient (softmax is shift-invariant per query row), so Adam
      # turns float rounding noise of either sign into +-lr steps; compare q and v biases only.
      x, y = np.concatenate([x[:dim], x[2 * dim:]]), np.concatenate([y[:dim], y[2 * dim:]])
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=k)


def test_workdir_of_other_config_refused(tmp_path, teacher_dir):
  c = _config(teacher_dir)
  trainer.train(c, str(tmp_path / "w"), stop_after=1)
  c2 = _config(teacher_dir)
  c2.model.keep_rate = 0.25
  with pytest.raises(ValueError, match="holds a run of another config"):
    trainer.train(c2, str(tmp_path / "w"))


def _train_only(teacher, steps, **kw):
  c = _config(teacher, **kw)
  c.phases.recon.steps = 0
  c.phases.distill.steps = 0
  c.phases.train.steps = steps
  return c


def test_grad_accumulation_matches_full_batch(tmp_path, teacher_dir):
  one = trainer.train(_train_only(teacher_dir, 2), str(tmp_path / "a1"))
  two = trainer.train(_train_only(teacher_dir, 2, grad_accum=2), str(tmp_path / "a2"))
  a, b = _flat(one["state"]["params"]), _flat(two["state"]["params"])
  assert one["phases"]["train"]["loss"] == pytest.approx(two["phases"]["train"]["loss"], abs=1e-5)
  for k in a:
    x, y = a[k], b[k]
    if "qkv" in k and "bias" in k:  # key bias: zero gradient, see test_eight_devices_equal_one
      x, y = np.concatenate([x[:32], x[64:]]), np.concatenate([y[:32], y[64:]])
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=k)


def test_bfloat16_activations_keep_float32_state(tmp_path, teacher_dir):
  c = _train_only(teacher_dir, 2)
  c.model.dtype = "bfloat16"
  out = trainer.train(c, str(tmp_path / "bf16"))
  leaves = jax.tree.leaves(out["state"]["params"]) + jax.tree.leaves(out["state"]["opt"])
  assert all(x.dtype != jax.numpy.bfloat16 for x in leaves)
  assert np.isfinite(out["phases"]["train"]["loss"])


def test_short_digits_run_learns(tmp_path, teacher_dir):
  """150 steps of the 2-layer, 32-wide test ViT (keep 0.5) from scratch on digits (measured: 0.383)."""
  c = _train_only(teacher_dir, 150, **{"phases.train.lr": 2e-3, "batch_size": 64})
  c.init = ""
  c.phases.train.warmup_steps = 10
  out = trainer.train(c, str(tmp_path / "learn"))
  assert out["phases"]["train"]["top1"] > 0.3   # chance is 0.1 on the 360 test digits


def test_block_mode_trains_both_phases(tmp_path, teacher_dir):
  """Block mode by config alone: recon fits the block scores to the teacher's block mass (its loss
  falls), distill fine-tunes under the block mask (17 tokens in blocks of 16: one of two key blocks)."""
  c = _config(teacher_dir, **{"model.mask_block": 16, "phases.recon.steps": 12, "phases.recon.lr": 3e-2})
  c.phases.train.steps = 0
  out = trainer.train(c, str(tmp_path / "blocks"))
  lines = [json.loads(x) for x in (tmp_path / "blocks" / "metrics.jsonl").read_text().splitlines()]
  recon = [x["train/recon"] for x in lines if "train/recon" in x]                # steps 1-12
  assert len(recon) >= 2 and recon[-1] < recon[0]
  density = [x["train/density"] for x in lines if x["step"] > 12 and "train/density" in x]
  # The CLS row keeps all 17 keys, the other 16 rows the 16 tokens of key block 0.
  assert density and all(abs(d - (17 + 16 * 16) / 17 ** 2) < 1e-6 for d in density)
  assert np.isfinite(out["phases"]["distill"]["top1"])
