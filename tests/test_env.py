"""Environment variables: one prefix, SPARSIFINER_JAX_; the old SPARSIFINER_ names warn, once."""

import os
import subprocess
import sys

import pytest

from sparsifiner_jax.cli import env
from sparsifiner_jax.train import workdir


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
  monkeypatch.setattr(env, "_warned", set())
  for name in env.RENAMED:
    monkeypatch.delenv(env.PREFIX + name, raising=False)
    monkeypatch.delenv(env.OLD_PREFIX + name, raising=False)


def test_new_name_is_read_quietly(monkeypatch, capsys):
  monkeypatch.setenv("SPARSIFINER_JAX_LEASE_SECONDS", "7")
  monkeypatch.setenv("SPARSIFINER_LEASE_SECONDS", "9")        # the new name wins, silently
  assert workdir.lease_seconds() == 7.0
  assert env.get("DISTRIBUTED", "0") == "0"
  assert capsys.readouterr().err == ""


def test_old_name_is_read_with_one_warning_line(monkeypatch, capsys):
  monkeypatch.setenv("SPARSIFINER_LEASE_SECONDS", "9")
  assert workdir.lease_seconds() == 9.0
  assert workdir.lease_seconds() == 9.0                        # warned once per process
  assert capsys.readouterr().err == ("warning: SPARSIFINER_LEASE_SECONDS is deprecated (no longer read "
                                     "from 0.2); set SPARSIFINER_JAX_LEASE_SECONDS instead\n")


def test_only_renamed_variables_fall_back():
  environ = {"SPARSIFINER_PALLAS": "0", "SPARSIFINER_PROCESS_ID": "3"}
  assert env.get("PALLAS", environ=environ) is None             # never had an old name
  assert env.get("PROCESS_ID", environ=environ) == "3"


def test_every_variable_in_the_code_has_the_prefix():
  """No code, test or doc still names an old variable, except this module's fallback and its tests."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  old = "|".join(f"SPARSIFINER_{n}" for n in env.RENAMED)
  r = subprocess.run(["git", "grep", "-n", "-E", f"({old})\\b", "--", ".", ":!tests/test_env.py"],
                     cwd=root, capture_output=True, text=True, check=False)
  if r.returncode not in (0, 1):
    pytest.skip(f"git grep unavailable: {r.stderr.strip()}")
  assert r.stdout == ""


def test_old_launch_variable_warns_in_train_py(tmp_path):
  """train.py reads the old coordinator name too (here: a bad process id, so it stops at once)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  environ = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFINER")}
  environ.update(JAX_PLATFORMS="cpu", SPARSIFINER_COORDINATOR="127.0.0.1:1",
                 SPARSIFINER_NUM_PROCESSES="1", SPARSIFINER_PROCESS_ID="not-a-number")
  r = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--config",
                      os.path.join(root, "configs", "tiny_test.py"), "--workdir", str(tmp_path / "w")],
                     cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)
  lines = r.stderr.splitlines()
  assert r.returncode == 2 and len(lines) == 4, r.stderr
  assert {ln.split()[1] for ln in lines[:3]} == {"SPARSIFINER_COORDINATOR", "SPARSIFINER_NUM_PROCESSES",
                                                  "SPARSIFINER_PROCESS_ID"}
  assert lines[3] == ("error: SPARSIFINER_JAX_PROCESS_ID='not-a-number' is not allowed with "
                      "SPARSIFINER_JAX_COORDINATOR; allowed: an integer >= 0")
