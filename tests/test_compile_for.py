"""``sparsifiner_jax.compile_for``: the real train and eval steps compiled with no accelerator, for a v5e
topology by XLA's TPU compiler (libtpu) and for H100s by XLA's GPU compiler (jax-cuda12-plugin), at tiny
size."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import digits_sparsifiner, tiny_test
from sparsifiner_jax import compile_for
from sparsifiner_jax.compile import targets
from conftest import need_compiler_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"
GPU_TOPOLOGY = "h100:2"
KERNEL_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}


def _config(**model):
  config = tiny_test.get_config()
  for key, value in model.items():
    config.model[key] = value
  return config


def _hlo(config, what, topology=TOPOLOGY, **kw):
  program = compile_for.compile_step(config, targets.devices(topology), what, **kw)
  return program.compiled.as_text(), program.figures, program.info


def _digits_config():
  """The digits model (vit_digits, 65 tokens) at keep 0.25. (The GPU steps use it rather than
  tiny_test's vit_test: with no GPU XLA does not autotune, and its default Triton GEMM tiling fails on
  one of vit_test's 17-token, 32-wide products.)"""
  config = digits_sparsifiner.get_config()
  config.model.keep_rate = 0.25
  return config


@pytest.mark.parametrize("topology", [TOPOLOGY, GPU_TOPOLOGY])
@pytest.mark.parametrize("what,phase", [("eval", None), ("train", "recon"), ("train", "distill")])
def test_digits_steps_compile(topology, what, phase):
  """The eval step and the recon and distill train steps, for 4 v5e chips and 2 H100s: every layer runs
  its mask kernel (eval, distill; recon trains the predictor on the dense attention) and the distill
  step differentiates through the attention kernels; FLOPs include the kernels' declared costs."""
  need_compiler_for(topology)
  config = _digits_config()
  text, fig, info = _hlo(config, what, topology, phase=phase, batch_per_chip=8)
  depth = 4
  calls = text.count(KERNEL_CALL[targets.platform(topology)])
  assert calls == {"eval": 2, "recon": 0, "distill": 4}[phase or what] * depth
  assert fig.flops > 0 and fig.bytes_accessed > 0
  assert 0 < fig.peak_bytes < targets.memory_bytes(topology)


def test_gpu_flops_count_what_tpu_flops_count():
  """XLA's GPU HLO cost analysis (through the CPU client) sees custom calls as -1 FLOP; the report adds
  the Pallas kernels' declared costs and any cuBLAS products' ``2 M N K`` (``compile.cost``). So the
  dense step counts what the TPU compiler counts for it (within 3 %: fusion differs), and the sparse step
  counts more (the selection's compare passes), as on TPU."""
  need_compiler_for(GPU_TOPOLOGY)
  gpu = compile_for.compare(_digits_config(), GPU_TOPOLOGY, "eval", batch_per_chip=8)
  tpu = compile_for.compare(_digits_config(), TOPOLOGY, "eval", batch_per_chip=8)
  assert gpu["platform"] == "gpu" and gpu["ratios"]["flops"] > 1.0
  assert gpu["dense"]["flops"] == pytest.approx(tpu["dense"]["flops"], rel=0.03)


def test_cublas_products_are_counted(monkeypatch):
  """A step whose products XLA compiles as cuBLAS calls (the fallback of ``targets.compile_lowered``)
  counts their FLOPs: the dense digits step's total matches the Triton-GEMM compile's within 2 % (the
  bias adds that cuBLAS fuses into its epilogue are not counted: 1.2 % of this small model; without the
  products' count the total would be a small fraction)."""
  need_compiler_for(GPU_TOPOLOGY)
  config = compile_for.dense_counterpart(_digits_config())
  devices = targets.devices(GPU_TOPOLOGY)
  default = compile_for.compile_step(config, devices, "eval", batch_per_chip=8)
  monkeypatch.setattr(targets, "compile_lowered",
                      lambda lowered, _: lowered.compile({"xla_gpu_enable_triton_gemm": False}))
  cublas = compile_for.compile_step(config, devices, "eval", batch_per_chip=8)
  assert "__cublas$" in cublas.compiled.as_text() and "__cublas$" not in default.compiled.as_text()
  assert cublas.figures.flops == pytest.approx(default.figures.flops, rel=0.02)


def test_v4_devices_are_tensorcores_with_half_a_chip_of_hbm():
  devices = targets.devices("v4:2x2x1")                       # 4 chips, 2 cores each
  assert len(devices) == 8
  assert targets.memory_bytes("v4:2x2x1", devices) == 16 * 2 ** 30
  assert targets.memory_bytes(TOPOLOGY, targets.devices(TOPOLOGY)) == 16 * 2 ** 30


@pytest.mark.parametrize("topology,count,kind", [("h100:8", 8, "H100"), ("h100:4x2", 8, "H100"),
                                                 ("a100:2", 2, "A100")])
def test_gpu_topologies(topology, count, kind):
  need_compiler_for(topology)
  devices = targets.devices(topology)
  assert len(devices) == count and all(kind in d.device_kind for d in devices)
  assert targets.platform_of(devices) == "gpu" and targets.memory_bytes(topology) > 79 * 2 ** 30


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


def test_importing_defines_no_flags():
  """The command's flags (and train.py's and eval.py's, from ``cli.entry``) are defined when it runs, not when
  tests or benchmarks import the module as a library."""
  code = ("from absl import flags; before = set(flags.FLAGS); import sparsifiner_jax.compile_for; "
          "print(sorted(set(flags.FLAGS) - before))")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  ours = {"config", "debug", "workdir", "out", "weights", "step", "topology", "what", "phase",
          "batch_per_chip", "compare", "json", "clock"}
  assert not ours & set(eval(r.stdout)), r.stdout  # pylint: disable=eval-used


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
    (("--topology", "v9z:2x2"), "unknown topology 'v9z:2x2'; allowed: a TPU"),
    (("--topology", "b200:8"), "unknown topology 'b200:8'; allowed"),
    (("--topology", "h100:9"), "1-8 GPUs per host"),
    (("--topology", "h100:0x2"), "unknown topology 'h100:0x2'"),
    (("--topology", "v5e:9x9"), "topology 'v5e:9x9'"),
    (("--topology", "h100:2", "--clock"), "--clock: no clock rate known for 'h100'"),
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


def test_recipe_train_step_fits_eight_h100s():
  """The paper recipe (DeiT-S, keep 0.25, batch 1,344) distill step with its teacher, compiled for 8 H100s:
  168 images per GPU fit in 80 GB (13.6 GiB when measured)."""
  need_compiler_for("h100:8")
  from configs import deit_s_sparsifiner   # pylint: disable=g-import-not-at-top
  report = compile_for.compare(deit_s_sparsifiner.get_config(), "h100:8", "train", dense=False)
  assert report["batch_per_chip"] == 168 and report["phase"] == "distill"
  assert 0 < report["model"]["peak_bytes"] < report["memory_bytes"]
  assert "does NOT fit" not in compile_for.format_report(report)


def test_report_says_by_how_much_a_step_does_not_fit():
  figures = dict(peak_bytes=20 * 2 ** 30, temp_bytes=2 ** 30, flops=1.0, bytes_accessed=1.0)
  report = dict(what="train", phase="distill", topology="v5e:2x2", platform="tpu", chips=4,
                memory_bytes=16 * 2 ** 30, batch=64, batch_per_chip=16, mesh={"data": 4}, model=figures)
  assert "does NOT fit: 4.00 GiB over per device" in compile_for.format_report(report)
