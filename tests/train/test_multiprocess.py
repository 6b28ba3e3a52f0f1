"""Two processes on localhost (gloo CPU collectives) train like one process.

Each process has 2 CPU devices and reads its own shard of the data; the reference is one process with
4 devices that reads both shards (``input.data_shards=2``), so both see the same global batches.
"""

import pathlib
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny_test
from sparsifiner_jax.data import input_pipeline
from sparsifiner_jax.io import paths
from sparsifiner_jax.train import trainer

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
TIMEOUT = 300
STEPS = 3
OVERRIDES = (f"--config.phases.train.steps={STEPS}", "--config.phases.recon.steps=0",
             "--config.phases.distill.steps=0", "--config.ckpt_every=1")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, port, num_processes=2):
  procs = []
  for i in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               SPARSIFINER_JAX_COORDINATOR=f"127.0.0.1:{port}",
               SPARSIFINER_JAX_NUM_PROCESSES=str(num_processes), SPARSIFINER_JAX_PROCESS_ID=str(i))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs", "tiny_test.py"), "--workdir", str(workdir), *OVERRIDES]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT))
  finally:
    for p in procs:  # on a timeout or failure, never leave a process waiting on its peer
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _metrics(workdir):
  return [json.loads(line) for line in
          (paths.resolve(workdir) / "metrics.jsonl").read_text().splitlines()]


def _reference_config():
  c = tiny_test.get_config()
  c.phases.train.steps = STEPS
  c.phases.recon.steps = 0
  c.phases.distill.steps = 0
  c.ckpt_every = 1
  c.input.data_shards = 2  # this one process reads the two processes' shards
  return c


def _saved_params(path):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(paths.resolve(path) / "params")
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_one_process_can_read_the_shards_of_two():
  """Process p of 2 reads only shard p; one process with data_shards=2 yields both, concatenated."""
  cfg = tiny_test.get_config().input
  kw = dict(img_size=16, seed=0, start_batch=5)
  shards = [next(input_pipeline.build_train_iterator(cfg, local_batch_size=8, process_index=p,
                                                     process_count=2, **kw)) for p in range(2)]
  cfg.data_shards = 2
  both = next(input_pipeline.build_train_iterator(cfg, local_batch_size=16, **kw))
  for key in ("image", "label"):
    np.testing.assert_array_equal(both[key], np.concatenate([s[key] for s in shards]))
  assert not np.array_equal(shards[0]["image"], shards[1]["image"])
  cfg.data_shards = 3
  with pytest.raises(input_pipeline.InputConfigError, match="multiple of the number of processes 2"):
    input_pipeline.num_data_shards(cfg, process_count=2)


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_two_processes_reach_the_loss_of_one(where, tmp_path, request):
  """With a bucket workdir too (a GCS server on 127.0.0.1): each process writes its checkpoint shards
  there, process 0 the metrics and weights."""
  mp_dir = tmp_path / "mp" if where == "local" else request.getfixturevalue("bucket") + "/mp"
  results = _launch(mp_dir, _free_port())
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"process {i}:\n{err[-4000:]}"
  assert "phase train done at step 3" in results[0][1]
  assert "phase train done" not in results[1][1]  # only process 0 logs

  ref_dir = tmp_path / "ref"
  devs = jax.devices()[:4]
  with jax.default_device(devs[0]):
    ref = trainer.train(_reference_config(), str(ref_dir), devices=devs)

  mp, one = _metrics(mp_dir), _metrics(ref_dir)
  train_mp = {m["step"]: m["train/loss"] for m in mp if "train/loss" in m}
  train_one = {m["step"]: m["train/loss"] for m in one if "train/loss" in m}
  assert sorted(train_mp) == list(range(1, STEPS + 1))
  for step, loss in train_one.items():
    assert train_mp[step] == pytest.approx(loss, abs=1e-5), step
  eval_mp = [m["eval/loss"] for m in mp if "eval/loss" in m]
  assert eval_mp == [pytest.approx(ref["phases"]["train"]["loss"], abs=1e-5)]

  # Both processes wrote every checkpoint together, and process 0 wrote the gathered weights.
  ckpt = paths.resolve(mp_dir) / "ckpt"
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 3]
  got, want = _saved_params(paths.resolve(mp_dir) / "final"), _saved_params(ref_dir / "final")
  assert got.keys() == want.keys()
  for k in want:
    x, y = got[k], want[k]
    if "qkv" in k and "bias" in k:  # key bias: zero gradient, see tests/test_train.py
      x, y = np.concatenate([x[:32], x[64:]]), np.concatenate([y[:32], y[64:]])
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=k)
