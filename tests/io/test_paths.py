"""The path layer (``io.paths``): which paths are URLs, and the commands that stay local-only refuse
URLs with one line before anything is written. Buckets themselves: tests/io/test_bucket.py."""

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


def test_config_path_fields_check_the_bucket(bucket):
  from configs import tiny_test   # pylint: disable=import-outside-toplevel
  config = tiny_test.get_config()
  config.init = "gs://no-such-bucket/weights"
  with pytest.raises(ValueError, match=r"config.init='gs://no-such-bucket/weights': bucket "
                     "'no-such-bucket' does not exist"):
    config_check.validate(config, "train")
  config.init = bucket + "/weights"
  with pytest.raises(ValueError, match=r"config.init='gs://.*/weights' does not exist"):
    config_check.validate(config, "train")


@pytest.mark.parametrize("argv", [
    ["-m", "sparsifiner_jax.convert", "weights/in", "gs://bucket/out"],
    ["-m", "sparsifiner_jax.demo", "--workdir", "gs://bucket/demo"],
])
def test_local_only_commands_refuse_urls_in_one_line_and_write_nothing(argv, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2, r.stderr
  assert len(lines) == 1 and "this command writes local files only" in lines[0], r.stderr
  assert list(tmp_path.iterdir()) == []          # no local "gs:" folder, nothing else either
