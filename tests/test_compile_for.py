"""``sparsifiner_jax.compile_for``: the real train and eval steps compiled for a v5e topology by XLA's TPU
compiler (libtpu, no TPU), at tiny size."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny_test
from sparsifiner_jax import compile_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"


def _config(**model):
  config = tiny_test.get_config()
  for key, value in model.items():
    config.model[key] = value
  return config


def _hlo(config, what, **kw):
  compiled, info = compile_for.compile_step(config, compile_for.topology_devices(TOPOLOGY), what, **kw)
  return compiled.as_text(), compile_for.figures(compiled), info


def test_eval_step_runs_the_kernels_per_chip():
  """Sparse eval on 4 chips: Mosaic kernels in the program, no all-gather (the batch stays split)."""
  text, fig, info = _hlo(_config(), "eval")
  assert info["chips"] == 4 and info["batch"] % 4 == 0
  assert text.count("tpu_custom_call") >= 2                  # the mask and the attention kernels
  assert "all-gather" not in text
  assert fig.flops > 0 and fig.bytes_accessed > 0 and 0 < fig.peak_bytes < 16 * 2 ** 30


def test_v4_devices_are_tensorcores_with_half_a_chip_of_hbm():
  devices = compile_for.topology_devices("v4:2x2x1")                       # 4 chips, 2 cores each
  assert len(devices) == 8
  assert compile_for.hbm_bytes("v4:2x2x1", devices) == 16 * 2 ** 30
  assert compile_for.hbm_bytes(TOPOLOGY, compile_for.topology_devices(TOPOLOGY)) == 16 * 2 ** 30


def test_dense_counterpart_has_no_kernels():
  text, _, _ = _hlo(compile_for.dense_counterpart(_config(token_keep_rate=0.5)), "eval")
  assert "tpu_custom_call" not in text


@pytest.mark.parametrize("phase", ["recon", "distill"])
def test_train_step_with_fsdp_mesh(phase):
  """The train step compiles with parameters sharded over an fsdp axis (gathered per use) and the
  teacher; the distill step differentiates through the attention kernel (its backward is Pallas too)."""
  config = _config()
  config.mesh = (("data", 2), ("fsdp", 2))
  text, fig, info = _hlo(config, "train", phase=phase, batch_per_chip=4)
  assert info["phase"] == phase and info["mesh"] == {"data": 2, "fsdp": 2} and info["batch"] == 16
  assert "all-gather" in text                                # fsdp: parameters gathered for use
  kernels = text.count("tpu_custom_call")
  assert kernels >= (2 * 3 if phase == "distill" else 0)    # per layer: mask, attention fwd, dq, dk/dv
  assert fig.temp_bytes > 0


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "sparsifiner_jax.compile_for", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_reports_ratios_and_writes_json(tmp_path):
  out = tmp_path / "report.json"
  r = _cli("--config", "configs/tiny_test.py", "--topology", TOPOLOGY, "--what", "eval", "--json", str(out))
  assert r.returncode == 0, r.stderr
  assert "model/dense" in r.stdout and "v5e:2x2: 4 devices of 16 GiB HBM" in r.stdout
  report = json.loads(out.read_text())
  assert set(report["ratios"]) == {"flops", "bytes_accessed", "temp_bytes", "peak_bytes"}
  assert report["ratios"]["flops"] == pytest.approx(report["model"]["flops"] / report["dense"]["flops"])


@pytest.mark.parametrize("args,needle", [
    (("--topology", "v9z:2x2"), "unknown TPU topology 'v9z:2x2'"),
    (("--topology", "v5e:9x9"), "topology 'v5e:9x9'"),
    (("--topology", TOPOLOGY, "--what", "train", "--phase", "warmup"), "--phase='warmup' is not a phase"),
    (("--topology", TOPOLOGY, "--batch_per_chip", "0"), "batch"),
])
def test_cli_bad_input_is_one_line(args, needle, tmp_path):
  out = tmp_path / "never.json"
  r = _cli("--config", "configs/tiny_test.py", *args, "--json", str(out))
  assert r.returncode == 2, r.stderr
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and needle in lines[0], r.stderr
  assert not out.exists()
