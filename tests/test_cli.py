"""CLIs: user mistakes give one clear line on stderr and exit code 2, before anything is compiled."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import models
from sparsifiner_jax.io import paths, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,msg", [
    ("--config.input.dataset=no_such_dataset", "no_such_dataset"),
    ("--config.batch_size=15", "batch_size=15 must be divisible by the number of devices 2"),
    ("--config.teacher.weights=/nonexistent/teacher", "'/nonexistent/teacher' does not exist"),
    ("--config.model.keep_rate=1.5", "keep_rate=1.5 must be in (0, 1]"),
    ("--config.mesh=(('data', 3), ('fsdp', 1))", "needs 3 devices but 2 are available"),  # tuple override
])
def test_train_bad_input_one_line(tmp_path, override, msg):
  r = _run("train.py", "--config", "configs/tiny_test.py", "--workdir", str(tmp_path / "w"), override)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and msg in last, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_eval_writes_json_and_rejects_other_architecture(tmp_path):
  w = weights.save_weights(str(tmp_path / "w"), models.create("vit_test", keep_rate=0.5,
                                                                rngs=nnx.Rngs(0)))
  out = tmp_path / "eval.json"
  r = _run("eval.py", "--config", "configs/tiny_test.py", "--weights", w, "--out", str(out),
           "--config.model.keep_rate=0.25")
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  for key in ("top1", "top5", "loss", "density", "layer_density", "tokens_per_layer", "flops",
              "images_per_s", "peak_memory_bytes", "num_examples"):
    assert key in res, key
  assert res["num_examples"] == 360 and res["keep_rate"] == 0.25
  # 17 tokens at keep 0.25: k = 5 keys per patch row plus the dense CLS row.
  assert res["density"] == pytest.approx((17 + 16 * 5) / 17 ** 2, abs=1e-6)
  assert res["layer_density"] == pytest.approx([(17 + 16 * 5) / 17 ** 2] * 2, abs=1e-6)
  assert res["flops"]["total"] > 0 and res["flops"]["total_dense"] > 0
  other = weights.save_weights(str(tmp_path / "o"), models.create("vit_test", embed_dim=48,
                                                                    rngs=nnx.Rngs(0)))
  r = _run("eval.py", "--config", "configs/tiny_test.py", "--weights", other)
  assert r.returncode == 2 and "do not fit the model" in r.stderr.strip().splitlines()[-1]
  r = _run("eval.py", "--config", "configs/tiny_test.py", "--weights", str(tmp_path / "missing"))
  assert r.returncode == 2 and "does not exist" in r.stderr.strip().splitlines()[-1]
  r = _run("eval.py", "--config", "configs/tiny_test.py", "--weights", w,
           "--config.input.eval_split=validation")
  assert r.returncode == 2 and "validation" in r.stderr.strip().splitlines()[-1]


def test_train_teacher_of_other_architecture_one_line(tmp_path):
  other = weights.save_weights(str(tmp_path / "t"), models.create("vit_test", embed_dim=48,
                                                                    rngs=nnx.Rngs(0)))
  r = _run("train.py", "--config", "configs/tiny_test.py", "--workdir", str(tmp_path / "w"),
           f"--config.teacher.weights={other}")
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "do not fit the model" in last
  assert not os.path.exists(tmp_path / "w" / "ckpt") or not os.listdir(tmp_path / "w" / "ckpt")


def test_eval_reads_training_checkpoints(tmp_path):
  from configs import tiny_test
  from sparsifiner_jax.io import checkpoint
  from sparsifiner_jax.evaluation import report
  from sparsifiner_jax import sharding
  from sparsifiner_jax.train import trainer
  c = tiny_test.get_config()
  c.phases.recon.steps = c.phases.distill.steps = 0
  w = str(tmp_path / "w")
  one = jax.devices()[:1]
  out = trainer.train(c, w, stop_after=2, devices=one)  # mid-run: a checkpoint at step 2, no final/ or best/
  assert report.resolve_weights(paths.resolve(w), None) == (os.path.join(w, "ckpt"), -1)
  model = models.build_model(c)
  mesh = sharding.make_mesh(c.mesh, one)
  assert report.load_params(model, *report.resolve_weights(paths.resolve(w), None), mesh).endswith("ckpt@2")
  got = jax.tree.leaves(models.split_params(model)[1])
  want = jax.tree.leaves(out["state"]["params"])
  assert len(got) == len(want) > 0 and all(np.array_equal(a, b) for a, b in zip(got, want))
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint at step 1 .*saved steps: \[2\]"):
    report.load_params(model, os.path.join(w, "ckpt"), 1, mesh)
  with pytest.raises(ValueError, match="allowed: a step number or 'latest'"):
    report.parse_step("last")
  other_c = tiny_test.get_config()
  other_c.model.embed_dim = 48
  with pytest.raises(checkpoint.CheckpointError, match=r"do not fit the model: backbone\..* has shape "
                     r"\(32,\) in the checkpoint at step 2 .*the model's is \(48,\)"):
    report.load_params(models.build_model(other_c), os.path.join(w, "ckpt"), 2, mesh)
  dense_c = tiny_test.get_config()
  dense_c.model.keep_rate = None                        # the sparse run's backbone, evaluated dense
  dense = models.build_model(dense_c)
  report.load_params(dense, os.path.join(w, "ckpt"), -1, mesh)
  got = jax.tree.leaves(models.split_params(dense)[1]["backbone"])
  assert all(np.array_equal(a, b) for a, b in zip(got, jax.tree.leaves(out["state"]["params"]["backbone"])))
  r = _run("eval.py", "--config", "configs/tiny_test.py", "--workdir", w, "--step", "2",
           "--out", str(tmp_path / "e.json"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((tmp_path / "e.json").read_text())["weights"].endswith("ckpt@2")
  r = _run("eval.py", "--config", "configs/tiny_test.py", "--workdir", w, "--step", "7")
  assert r.returncode == 2 and "no checkpoint at step 7" in r.stderr.strip().splitlines()[-1]
