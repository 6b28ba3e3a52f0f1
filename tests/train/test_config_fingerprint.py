"""A workdir's config check: a field added with its default keeps older runs resumable; a changed
field is still refused (``train.workdir.config_changes``)."""

import hashlib
import json

import pytest

from configs import tiny_test
from sparsifiner_jax.io.checkpoint import read_latest_meta
from sparsifiner_jax.train import trainer, workdir


def _config(steps=2):
  """tiny_test's train phase only: no teacher, no init weights."""
  c = tiny_test.get_config()
  c.phases.recon.steps = 0
  c.phases.distill.steps = 0
  c.phases.train.steps = steps
  return c


def _before_data_shards():
  """The config as it was before ``input.data_shards`` existed."""
  c = _config()
  del c.input["data_shards"]
  return c


def _whole_config_fingerprint(config) -> str:
  """The fingerprint checkpoints held before they recorded their config (the whole config's hash)."""
  d = config.to_dict()
  for k in ("log_every", "eval_every", "ckpt_every", "keep_ckpts", "progress", "total_steps_cap",
            "mesh"):
    d.pop(k, None)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_config_changes_ignore_fields_added_with_their_default():
  c = _config()
  saved = workdir.trajectory_fields(c)
  assert not {"log_every", "mesh", "allow_config_change", "progress"} & set(saved)
  assert saved["input.data_shards"] is None and workdir.config_changes(saved, c) == []
  older = workdir.trajectory_fields(_before_data_shards())
  assert "input.data_shards" not in older
  assert workdir.config_changes(older, c) == []                  # added with its default
  c.input.data_shards = 2
  assert workdir.config_changes(older, c) == ["input.data_shards: absent -> 2"]
  c = _config()
  c.seed, c.log_every, c.allow_config_change = 3, 7, True         # only the seed matters
  assert workdir.config_changes(saved, c) == ["seed: 0 -> 3"]
  # A default changed since the run began is a change: the run recorded the value it used.
  assert workdir.config_changes(dict(saved, ema_decay=0.999), _config()) == [
      f"ema_decay: 0.999 -> {_config().ema_decay!r}"]
  del c.input["data_shards"]
  assert "input.data_shards: None -> absent" in workdir.config_changes(saved, c)


def test_fingerprint_leaves_out_cadence_and_the_override_flag():
  a, b = _config(), _config()
  b.log_every, b.ckpt_every, b.allow_config_change, b.mesh = 9, 9, True, (("data", 1), ("fsdp", 1))
  assert workdir.config_fingerprint(a) == workdir.config_fingerprint(b)
  b.seed = 1
  assert workdir.config_fingerprint(a) != workdir.config_fingerprint(b)


def test_resume_a_run_whose_config_lacked_a_field_now_defaulted(tmp_path):
  """A run written before ``input.data_shards`` existed resumes under today's config (which holds it at
  its default, None) without allow_config_change; a changed field is refused, naming it."""
  path = str(tmp_path / "w")
  trainer.train(_before_data_shards(), path, stop_after=1)
  assert "input.data_shards" not in read_latest_meta(tmp_path / "w" / "ckpt")["config"]
  changed = _config()
  changed.phases.train.lr = 0.125
  with pytest.raises(ValueError, match=r"holds a run of another config \(phases\.train\.lr: "
                                       r"[0-9.e-]+ -> 0\.125\); use a new workdir"):
    trainer.train(changed, path)
  now = _config()
  assert now.input.data_shards is None and not now.allow_config_change
  trainer.train(now, path)
  assert read_latest_meta(tmp_path / "w" / "ckpt")["step"] == 2


def test_resume_a_checkpoint_holding_only_the_whole_config_hash(tmp_path, monkeypatch):
  """Checkpoints written before metas recorded the config hold only the hash of the whole config,
  from before ``input.data_shards`` existed: they resume too; another config is still refused."""
  old = _before_data_shards()
  legacy = dict(config_fingerprint=_whole_config_fingerprint(old))
  monkeypatch.setattr(trainer, "state_meta", lambda config, phase, step: dict(
      step=int(step), phase=phase.name, data_position=int(step), **legacy))
  path = str(tmp_path / "w")
  trainer.train(old, path, stop_after=1)
  monkeypatch.undo()
  assert "config" not in read_latest_meta(tmp_path / "w" / "ckpt")
  changed = _config()
  changed.seed = 5
  with pytest.raises(ValueError, match="holds a run of another config .*predates recorded configs"):
    trainer.train(changed, path)
  trainer.train(_config(), path)
  assert read_latest_meta(tmp_path / "w" / "ckpt")["step"] == 2
