"""config_check.REQUIRED: the fields the trainer, the train step and compile_for read directly."""

import pytest

from configs import common, deit_s_sparsifiner, tiny_test
from conftest import dotted_parent
from sparsifiner_jax import config_check


def test_every_config_holds_the_required_fields():
  for config in (common.base_config(), tiny_test.get_config(), deit_s_sparsifiner.get_config()):
    config_check.check_required(config)


@pytest.mark.parametrize("path", config_check.REQUIRED)
def test_a_missing_required_field_is_one_line(path):
  c = tiny_test.get_config()
  node, leaf = dotted_parent(c, path)
  del node[leaf]
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check_misc(c)
  assert str(e.value) == (f"config.{path} is missing; allowed: a config built on configs/common.py's "
                          "base_config(), which sets every field")


def test_the_code_reads_required_fields_directly():
  """No ``config.get(<required>, default)`` fallback is left in the modules config_check covers (a
  default there could contradict configs/common.py's, as ``ema_decay`` 0.0 vs 0.9999 did)."""
  import pathlib  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(__file__).resolve().parents[1] / "sparsifiner_jax"
  top = {p.split(".")[0] for p in config_check.REQUIRED}
  for rel in ("train/step.py", "train/trainer.py", "compile_for.py", "config_check.py",
              "evaluation/report.py"):
    text = (root / rel).read_text()
    for name in top:
      assert f'config.get("{name}"' not in text and f"config.get('{name}'" not in text, (rel, name)


def test_a_teacher_loss_without_a_teacher_is_one_line_and_compiles_anyway():
  """tiny_test runs recon and distill with no ``teacher.weights``: training is refused in one line (by
  ``validate`` alone: the train step no longer checks the teacher again); compiling needs no weights."""
  c = tiny_test.get_config()
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c, "train")
  assert str(e.value) == ("config.phases.recon uses the teacher loss(es) ['recon'] but "
                          "config.teacher.weights is empty; allowed: set teacher.weights to a weights "
                          "directory, or phases.recon.steps=0 and epochs=0")
  checked = config_check.validate(c, "compile")
  assert checked.model.num_classes == 10 and checked.mesh is None and checked.info is None


def test_each_purpose_runs_its_checks_in_order():
  """``eval`` skips what only training reads (phases, teacher, ``init``); an unknown purpose is refused."""
  c = tiny_test.get_config()
  c.phases.train.warmup_steps = 9                      # longer than the phase: a train/compile mistake
  for purpose in ("train", "compile"):
    with pytest.raises(config_check.ConfigError, match="warmup_steps=9 is longer than the phase"):
      config_check.validate(c, purpose)
  checked = config_check.validate(c, "eval")
  assert checked.mesh.size == 8 and checked.info.num_classes == 10
  c.seed = -1                                          # fields come first, for every purpose
  for purpose in config_check.PURPOSES:
    with pytest.raises(config_check.ConfigError, match="config.seed=-1"):
      config_check.validate(c, purpose)
  with pytest.raises(ValueError, match="purpose='serve'; allowed: train, eval, compile"):
    config_check.validate(c, "serve")
