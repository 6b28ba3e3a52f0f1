"""Reliability (docs/reliability.md): kills, preemption, damaged checkpoints, NaNs, topology, bad input.

The subprocess tests run ``train.py`` on the tiny config with a persistent XLA compilation cache in
their tmp dir, so only the first run of a test compiles.
"""

import pathlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny_test
from conftest import override
from sparsifiner_jax import config_check, models, sharding
from sparsifiner_jax.evaluation import evaluator
from sparsifiner_jax.io import checkpoint, paths
from sparsifiner_jax.train import trainer
from sparsifiner_jax.train import workdir as workdir_lib

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
TIMEOUT = 240  # seconds, per subprocess


def _env(tmp_path, devices=2):
  cache = tmp_path / "jax_cache"
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _train_cmd(workdir, *overrides):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
          os.path.join(ROOT, "configs", "tiny_test.py"), "--workdir", str(workdir), *overrides]


def _logged_steps(workdir) -> list[int]:
  """Steps in metrics.jsonl (a line cut by a kill is ignored); the workdir may be a bucket."""
  path = paths.resolve(workdir) / "metrics.jsonl"
  try:
    text = path.read_text()
  except FileNotFoundError:
    return []
  steps = []
  for line in text.splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "train/loss" in rec:
      steps.append(rec["step"])
  return steps


def _ckpt_names(workdir) -> list[str]:
  d = paths.resolve(workdir) / "ckpt"
  return [p.name for p in d.iterdir()] if d.is_dir() else []


def _ckpt_steps(workdir) -> list[int]:
  return sorted(int(n) for n in _ckpt_names(workdir) if n.isdigit())


def _final_meta(workdir) -> dict:
  ck = checkpoint.Checkpointer(paths.resolve(workdir) / "ckpt")
  try:
    return ck.read_meta(ck.latest_step())
  finally:
    ck.close()


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def _saved_weights(path):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    return _flat(ckptr.restore(paths.resolve(path) / "params"))


# --------------------------------------------------------------------------------------------------
# Kill -9 three times and SIGTERM once, at seeded-random steps: the result is bit-identical.

# Every source of randomness on: initialisation, mixup/cutmix, drop path, random erasing, flips, crops.
# (Resuming across phase changes: tests/test_train.py::test_resume_equals_uninterrupted.)
_RANDOM_RUN = ("--config.phases.train.steps=6", "--config.phases.recon.steps=0",
               "--config.phases.distill.steps=0", "--config.mixup.prob=1.0",
               "--config.model.drop_path_rate=0.1", "--config.input.random_erasing=0.25",
               "--config.input.hflip=True", "--config.ckpt_every=2", "--config.keep_ckpts=2")


def _interrupt(workdir, env, overrides, sig, target_step, delay):
  """Starts train.py, waits until ``target_step`` is logged (plus ``delay`` s), sends ``sig``."""
  proc = subprocess.Popen(_train_cmd(workdir, *overrides), cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + TIMEOUT
  try:
    while max(_logged_steps(workdir), default=0) < target_step:
      assert proc.poll() is None, f"run ended before step {target_step}: {proc.communicate()[1][-3000:]}"
      assert time.time() < deadline, "timed out waiting for training progress"
      time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, out, err


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_kill_and_preempt_resume_is_bit_identical(where, tmp_path, request):
  """In a bucket (a GCS server on 127.0.0.1) too, compared with a local reference run; then eval.py
  reads the bucket's final weights and writes its report there."""
  run = tmp_path / "run" if where == "local" else request.getfixturevalue("bucket") + "/run"
  env = _env(tmp_path)
  overrides = _RANDOM_RUN
  total = 6
  ref = subprocess.run(_train_cmd(tmp_path / "ref", *overrides), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)  # also fills the XLA cache
  assert ref.returncode == 0, ref.stderr[-3000:]

  rng = np.random.default_rng(2025)
  reached = 0
  for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGKILL):
    # A few steps past the furthest step so far, plus up to 0.3 s: mid-step, mid-save, mid-eval...
    target = min(reached + int(rng.integers(1, 3)), total - 1)
    rc, _, err = _interrupt(run, env, overrides, sig, target, float(rng.uniform(0.0, 0.3)))
    assert "unreadable" not in err, err[-3000:]  # every kill left only complete checkpoints
    reached = max(_logged_steps(run))
    if sig == signal.SIGKILL:
      assert rc == -signal.SIGKILL, err[-3000:]
    else:  # preemption notice: checkpoint at the step it stopped, distinct exit code, no traceback
      assert rc == trainer.PREEMPTED_EXIT_CODE, err[-3000:]
      assert max(_ckpt_steps(run)) == reached and "Traceback" not in err
  last = subprocess.run(_train_cmd(run, *overrides), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert last.returncode == 0, last.stderr[-3000:]
  assert "resumed from step" in last.stdout and "unreadable" not in last.stderr
  assert not [n for n in _ckpt_names(run) if "tmp" in n]  # no half-written leftovers
  if where == "bucket":  # no renames there: a finished step holds orbax's commit file
    assert all((paths.resolve(run) / "ckpt" / str(s) / "commit_success.txt").exists()
               for s in _ckpt_steps(run))

  want, got = _saved_weights(tmp_path / "ref" / "final"), _saved_weights(paths.resolve(run) / "final")
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The whole train state (params, optimizer moments, step) is bit-identical too.
  assert _final_meta(run)["state_checksum"] == _final_meta(tmp_path / "ref")["state_checksum"]
  if where == "bucket":
    ev = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--config",
                         os.path.join(ROOT, "configs", "tiny_test.py"), "--workdir", str(run)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((paths.resolve(run) / "eval.json").read_text())
    assert report["weights"] == f"{run}/final" and 0.0 <= report["top1"] <= 1.0


# --------------------------------------------------------------------------------------------------
# In-process runs of the train phase only.


ONE = jax.devices()[:1]  # in-process runs on one device: quicker to compile


def _config(steps=4, **kw):
  c = tiny_test.get_config()
  c.phases.train.steps = steps
  c.phases.recon.steps = 0
  c.phases.distill.steps = 0
  return override(c, **kw)


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_bit(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x10
    f.seek(0)
    f.write(data)


def _garble(step_dir):
  """Flips one bit in the middle of every array data file (some bytes there may be unused)."""
  for d, _, fs in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(d) == "d":
      for name in fs:
        _flip_bit(os.path.join(d, name))


def _truncate(step_dir):
  for d, _, fs in os.walk(os.path.join(step_dir, "state")):
    for name in fs:
      path = os.path.join(d, name)
      os.truncate(path, os.path.getsize(path) // 2)


def _snapshot(directory):
  return sorted((os.path.relpath(os.path.join(d, f), directory), os.path.getsize(os.path.join(d, f)),
                 os.path.getmtime(os.path.join(d, f)))
                for d, _, fs in os.walk(directory) for f in fs)


# A failed read can leave an orbax/tensorstore callback behind that fires after its event loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  c = _config(steps=4, ckpt_every=1, keep_ckpts=5)
  full = trainer.train(c, str(tmp_path / "w"), devices=ONE)
  assert _ckpt_steps(tmp_path / "w") == [1, 2, 3, 4]

  # A workdir holding another config's run is refused before anything in it changes.
  before = _snapshot(tmp_path / "w")
  with pytest.raises(ValueError, match="holds a run of another config"):
    trainer.train(_config(steps=4, ckpt_every=1, keep_ckpts=5, seed=1), str(tmp_path / "w"),
                  devices=ONE)
  assert _snapshot(tmp_path / "w") == before

  for damage in ("garble", "truncate", "half-written"):
    w = tmp_path / damage
    shutil.copytree(tmp_path / "w", w)
    if damage == "half-written":  # a save killed before orbax's atomic rename: step 5 never existed
      shutil.copytree(w / "ckpt" / "4", w / "ckpt" / "5.orbax-checkpoint-tmp")
      os.remove(_largest_file(w / "ckpt" / "5.orbax-checkpoint-tmp" / "state"))
      good = 4
    else:
      (_garble if damage == "garble" else _truncate)(str(w / "ckpt" / "4"))
      good = 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      out = trainer.train(c, str(w), stop_after=good, devices=ONE)  # restores, no training step
    assert out["step"] == good, damage
    if damage == "half-written":
      assert not any("unreadable" in r.getMessage() for r in caplog.records)
      assert not os.path.exists(w / "ckpt" / "5.orbax-checkpoint-tmp")  # cleaned up on open
    else:
      msgs = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
      assert len(msgs) == 1 and "step 4" in msgs[0], (damage, msgs)

  # Resuming the garbled run redoes step 4 from step 3, replaces the damaged checkpoint and ends
  # bit-identical to the undamaged run.
  resumed = trainer.train(c, str(tmp_path / "garble"), devices=ONE)
  a, b = _flat(full["state"]["params"]), _flat(resumed["state"]["params"])
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  assert _final_meta(tmp_path / "garble") == _final_meta(tmp_path / "w")

  # With every checkpoint damaged, training refuses to start over on top of them.
  for s in _ckpt_steps(tmp_path / "truncate"):
    _truncate(str(tmp_path / "truncate" / "ckpt" / str(s)))
  with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
    trainer.train(c, str(tmp_path / "truncate"), devices=ONE)


def test_checksum_catches_a_flipped_bit(tmp_path):
  state = {"w": jax.numpy.arange(4096, dtype=jax.numpy.float32), "step": jax.numpy.int32(7)}
  ck = checkpoint.Checkpointer(paths.resolve(tmp_path / "ckpt"))
  ck.save(7, state, {"phase": "train"})
  meta = ck.read_meta(7)
  assert meta["state_checksum"] == checkpoint.state_checksum(state)
  # The host sums (arrays held whole) equal the device sums (arrays sharded over processes).
  leaves = jax.tree.leaves(state)
  host = [checkpoint._weighted_sum(checkpoint._words(np.asarray(x), np), np) for x in leaves]
  assert [int(x) for x in jax.device_get(checkpoint._device_sums(leaves))] == [int(x) for x in host]
  ck.close()
  _flip_bit(_largest_file(tmp_path / "ckpt" / "7" / "state"))
  ck = checkpoint.Checkpointer(paths.resolve(tmp_path / "ckpt"))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with pytest.raises(checkpoint.CheckpointError, match="does not match its checksum"):
    ck.restore(7, abstract, meta)
  ck.close()


def _poison_step(monkeypatch, bad_step):
  """Feeds NaN images at global step ``bad_step`` (1-based) of a fresh run."""
  calls = []
  original = trainer._global_batch

  def poisoned(local, mesh):
    calls.append(1)
    if len(calls) == bad_step:
      local = dict(local, image=np.full_like(local["image"], np.nan))
    return original(local, mesh)

  monkeypatch.setattr(trainer, "_global_batch", poisoned)


def test_nonfinite_stop_names_step_and_terms_and_keeps_checkpoint(tmp_path, monkeypatch):
  # Checked every 5 steps, checkpointed every 3: step 4 goes bad, found at step 5.
  c = _config(steps=6, log_every=5, ckpt_every=3)
  _poison_step(monkeypatch, 4)
  with pytest.raises(workdir_lib.TrainingError) as e:
    trainer.train(c, str(tmp_path / "w"), devices=ONE)
  msg = str(e.value)
  assert "at step 4 " in msg and "cls=nan" in msg and "loss=nan" in msg, msg
  assert "the last checkpoint (step 3) is intact" in msg and "\n" not in msg
  ck = checkpoint.Checkpointer(paths.resolve(tmp_path / "w" / "ckpt"))
  assert ck.all_steps() == [3]
  ck.close()
  monkeypatch.undo()
  resumed = trainer.train(c, str(tmp_path / "w"), stop_after=3, devices=ONE)  # verified restore
  assert resumed["step"] == 3
  assert all(np.isfinite(v).all() for v in _flat(resumed["state"]["params"]).values())


def test_nonfinite_skip_drops_the_update_and_continues(tmp_path, monkeypatch, caplog):
  c = _config(steps=5, log_every=5, ckpt_every=1, keep_ckpts=10, nonfinite="skip")
  _poison_step(monkeypatch, 4)
  with caplog.at_level(logging.WARNING):
    out = trainer.train(c, str(tmp_path / "w"), devices=ONE)
  warned = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
  assert len(warned) == 1 and warned[0].startswith("step 4:") and "cls=nan" in warned[0], warned
  assert out["step"] == 5
  assert all(np.isfinite(v).all() for v in _flat(out["state"]["params"]).values())
  ck = checkpoint.Checkpointer(paths.resolve(tmp_path / "w" / "ckpt"), max_to_keep=10)
  s3, s4 = (ck._mngr.restore(s, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardRestore()))["state"] for s in (3, 4))
  ck.close()
  p3, p4 = _flat(s3["params"]), _flat(s4["params"])
  assert all(np.array_equal(p3[k], p4[k]) for k in p3)  # step 4 changed nothing but the step
  assert int(s3["step"]) == 3 and int(s4["step"]) == 4


# --------------------------------------------------------------------------------------------------
# Topology: a checkpoint written on 8 devices restores on 4 and on 1, and back, with the same eval.


def _restore(config, workdir, devices):
  """Restores the newest checkpoint of ``workdir`` on ``devices``, without a training step."""
  with jax.default_device(devices[0]):
    out = trainer.train(config, str(workdir), stop_after=0, devices=devices)
  return out["step"], out["state"]["params"]


def test_checkpoint_moves_between_8_4_and_1_devices(tmp_path):
  meshes = {8: [("data", 4), ("fsdp", 2)], 4: [("data", 2), ("fsdp", 2)], 1: [("data", 1), ("fsdp", 1)]}
  configs = {n: _config(steps=4, mesh=m) for n, m in meshes.items()}
  devs = {n: jax.devices()[:n] for n in meshes}
  graphdef, _, rest = models.split_params(models.build_model(configs[1]))
  evaluators = {}

  def evaluate_on(n, params):
    mesh = sharding.make_mesh(meshes[n], devs[n])
    ev = evaluators.setdefault(n, evaluator.Evaluator(configs[n], mesh))
    with jax.set_mesh(mesh):
      return ev.run(graphdef, params, rest)

  out8 = trainer.train(configs[8], str(tmp_path / "w8"), stop_after=2)  # checkpoint at step 2
  p8 = out8["state"]["params"]
  ev8 = evaluate_on(8, p8)
  assert ev8["num_examples"] == 360
  for n in (4, 1):
    shutil.copytree(tmp_path / "w8", tmp_path / f"w{n}")
    step, p = _restore(configs[n], tmp_path / f"w{n}", devs[n])
    assert step == 2 and jax.tree.leaves(p)[0].sharding.mesh.size == n
    assert _flat(p).keys() == _flat(p8).keys()
    for k, v in _flat(p).items():
      np.testing.assert_array_equal(v, _flat(p8)[k], err_msg=k)        # restoring is exact
    ev = evaluate_on(n, p)
    assert ev["top1"] == ev8["top1"] and ev["loss"] == pytest.approx(ev8["loss"], abs=1e-5)
  # And back: a step on 1 device writes a checkpoint that restores on 8 with the same eval.
  with jax.default_device(devs[1][0]):
    out1 = trainer.train(configs[1], str(tmp_path / "w1"), stop_after=3, devices=devs[1])
  ev1 = evaluate_on(1, out1["state"]["params"])
  step, p = _restore(configs[8], tmp_path / "w1", devs[8])
  assert step == 3
  for k, v in _flat(out1["state"]["params"]).items():
    np.testing.assert_array_equal(_flat(p)[k], v, err_msg=k)
  ev = evaluate_on(8, p)
  assert ev["top1"] == ev1["top1"] and ev["loss"] == pytest.approx(ev1["loss"], abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Validation: every bad value is one line on stderr, exit code 2, nothing written.


def test_mesh_and_device_checks():
  devs = jax.devices()[:4]
  c = _config(mesh=[("data", 3), ("fsdp", 1)])
  with pytest.raises(config_check.ConfigError, match=r"config.mesh=.*needs 3 devices but 4"):
    config_check.validate(c, "train", devs)
  c = _config(mesh=[("data", -1), ("model", 2)])
  with pytest.raises(config_check.ConfigError, match=r"unknown mesh axes \['model'\]"):
    config_check.validate(c, "train", devs)
  with pytest.raises(config_check.ConfigError, match="data_shards=3 is not allowed"):
    config_check.validate(_config(**{"input.data_shards": 3}), "train", devs)
  with pytest.raises(config_check.ConfigError, match="eval_batch_size=6 must be divisible by"):
    config_check.validate(_config(eval_batch_size=6), "train", devs)
  with pytest.raises(config_check.ConfigError, match=r"phases has unknown phase\(s\) \['warmup'\]"):
    config_check.validate(_config(**{"phases.warmup": dict(steps=1)}), "train", devs)
  assert config_check.validate(_config(), "train", devs).mesh.size == 4


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  """An image folder with one corrupt PNG."""
  import tensorflow as tf
  root = tmp_path_factory.mktemp("folder")
  png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
  for split in ("train", "test"):
    os.makedirs(root / split / "a")
    (root / split / "a" / "ok.png").write_bytes(png)
  (root / "train" / "a" / "broken.png").write_bytes(png[: len(png) // 2])
  return str(root)


_VALID = ("--config.phases.recon.steps=0", "--config.phases.distill.steps=0")
_BAD = [
    (("--config.batch_size=abc",), "flag --config.batch_size=abc: invalid literal for int()"),
    (("--config.model.keep_rat=0.3",),
     "unknown config field 'keep_rat' in --config.model.keep_rat; Did you mean \"keep_rate\""),
    (("--config.seed=-1",), "config.seed=-1 is not allowed; allowed: an integer in [0, "),
    (("--config.model.keep_rate=1.5",), "keep_rate=1.5 must be in (0, 1]"),
    (("--config.model.reduce_n=0",), "reduce_n=0 must be a positive integer"),
    (("--config.model.img_size=18",), "patch_size=4 must divide img_size=18"),
    (("--config.model.executor=nope",), "unknown attention executor 'nope'; allowed:"),
    (("--config.batch_size=15",), "batch_size=15 must be divisible by the number of devices 2"),
    (("--config.phases.train.warmup_steps=9",), "warmup_steps=9 is longer than the phase (steps=3)"),
    (("--config.phases.train.steps=0",), "no phase has a positive length"),
    (("--config.phases.recon.steps=2",), "uses the teacher loss(es) ['recon'] but config.teacher"),
    (("--config.init=/nonexistent/w",), "config.init='/nonexistent/w' does not exist"),
    (("--config.mixup.prob=2.0",), "config.mixup.prob=2.0 is not allowed; allowed: a number in [0, 1]"),
    (("--config.nonfinite=maybe",), "config.nonfinite='maybe' is not allowed; allowed: 'stop', 'skip'"),
    pytest.param(("--config.input.dataset=imagefolder:{folder}",),
                 "unreadable or corrupt image '{folder}/train/a/broken.png'", marks=pytest.mark.slow),
]


def _case_id(case):
  overrides = case.values[0] if hasattr(case, "values") else case[0]
  return overrides[0].split("=")[0][len("--config."):]


@pytest.mark.parametrize("overrides,message", _BAD, ids=[_case_id(c) for c in _BAD])
def test_cli_bad_override_is_one_line_and_writes_nothing(tmp_path, bad_folder, overrides, message):
  workdir = tmp_path / "w"
  workdir.mkdir()
  overrides = [o.format(folder=bad_folder) for o in overrides]
  r = subprocess.run(_train_cmd(workdir, *_VALID, *overrides), cwd=ROOT, env=_env(tmp_path),
                     capture_output=True, text=True, timeout=TIMEOUT)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, r.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  assert message.format(folder=bad_folder) in lines[0], lines[0]
  assert os.listdir(workdir) == []


def test_cli_debug_shows_the_traceback(tmp_path):
  r = subprocess.run(_train_cmd(tmp_path / "w", *_VALID, "--config.seed=-1", "--debug"), cwd=ROOT,
                     env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
  assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr
  assert not os.path.exists(tmp_path / "w")


def test_workdir_lock_refuses_a_second_run_and_is_released(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  # Another run holds the workdir (a second open file: flock conflicts).
  with workdir_lib.lock_workdir(paths.resolve(w)):
    with pytest.raises(workdir_lib.TrainingError, match=r"is in use by another run \(pid \d+ on .*\)"):
      trainer.train(_config(steps=1), str(w), devices=ONE)
  assert sorted(os.listdir(w)) == [".lock"]          # the refused run wrote nothing
  with workdir_lib.lock_workdir(paths.resolve(w)):        # released when its holder ends
    pass
  out = trainer.train(_config(steps=1), str(w), devices=ONE)
  assert out["step"] == 1
