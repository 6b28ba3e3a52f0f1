"""Object-storage URLs are refused with one line before anything is written (``io.paths``)."""

import os
import pathlib
import subprocess
import sys

import pytest

from sparsifiner_jax import config_check
from sparsifiner_jax.io import paths

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path,url", [("gs://bucket/run", True), ("s3://b/x", True), ("runs/a", False),
                                      ("/abs/gs:/x", False), ("C:/x", False), ("./a://b", False)])
def test_is_url(path, url):
  assert paths.is_url(path) == url


def test_config_path_fields_refuse_urls():
  from configs import tiny_test   # pylint: disable=import-outside-toplevel
  config = tiny_test.get_config()
  config.init = "gs://bucket/weights"
  with pytest.raises(ValueError, match=r"config.init='gs://bucket/weights': object-storage URLs"):
    config_check.check_config(config)


@pytest.mark.parametrize("argv", [
    ["train.py", "--config", str(ROOT / "configs/tiny_test.py"), "--workdir", "gs://bucket/run"],
    ["eval.py", "--config", str(ROOT / "configs/tiny_test.py"), "--workdir", "runs/x", "--out",
     "gs://b/eval.json"],
    ["-m", "sparsifiner_jax.convert", "weights/in", "gs://bucket/out"],
])
def test_commands_refuse_urls_in_one_line_and_write_nothing(argv, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  script = argv[0] if argv[0] == "-m" else str(ROOT / argv[0])
  r = subprocess.run([sys.executable, script, *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2, r.stderr
  assert len(lines) == 1 and "object-storage URLs are not supported yet" in lines[0], r.stderr
  assert list(tmp_path.iterdir()) == []          # no local "gs:" folder, nothing else either
