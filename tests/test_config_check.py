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
