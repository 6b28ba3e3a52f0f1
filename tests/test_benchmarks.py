"""The benchmark command runs at a tiny size (not timed here), so it cannot rot."""

import importlib.util
import json
import math
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax.evaluation import flops
from sparsifiner_jax.attention import cpu
from sparsifiner_jax import models
from sparsifiner_jax.io import state_dict

_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(script):
  spec = importlib.util.spec_from_file_location(f"benchmarks_{script}", os.path.join(_DIR, f"{script}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


bench = _load("run")
gemm_floor = _load("gemm_floor")

TINY = ["--model", "vit_test", "--batch", "2", "--rounds", "2", "--reps", "1", "--token-layers", "0",
        "--matmul-size", "128", "--torch-threads", "1"]


def _finite_positive(stats):
  return all(math.isfinite(stats[k]) and stats[k] > 0 for k in ("median", "min", "max"))


def _check_result(result, path, md, cases):
  on_disk = json.loads(path.read_text())
  assert on_disk["cases"] == cases and on_disk["model"] == "vit_test" and on_disk["img_size"] == 16
  assert on_disk["device"] == result["device"] and on_disk["date"] in md.read_text()
  assert set(on_disk["definitions"]["peak_memory"]) == {"xla", "torch_live"}
  for row in on_disk["rows"]:
    assert row["batch"] == 2 and row["peak_mem_bytes"] > 0
    assert row["peak_mem_definition"] in on_disk["definitions"]["peak_memory"]
    assert _finite_positive(row["sec_per_call"])
    if row["kind"] != "matmul":
      assert _finite_positive(row["img_per_s"])
    if row["impl"] == "jax":   # None only for a train step that calls the CPU kernels
      assert ((row["case"] == "train step (ours)" and row["gflop_per_s"] is None)
              or _finite_positive(row["gflop_per_s"]))
  for comp in on_disk["comparisons"]:
    assert _finite_positive(comp["ratio"]), comp
    assert comp["ratio"]["min"] <= comp["ratio"]["median"] <= comp["ratio"]["max"]
  return on_disk


def test_benchmark_jax_cases_tiny(tmp_path):
  out, md = tmp_path / "b.json", tmp_path / "B.md"
  cases = ["b", "c", "e", "masked", "gather"]
  # --executor masked: b then is the `masked` case's pair, listed once (the default, auto, is covered by
  # the torch test's d case and by test_benchmark_bfloat16_tiny).
  result = bench.main(TINY + ["--cases", *cases, "--executor", "masked", "--json", str(out),
                              "--append", str(md)])
  data = _check_result(result, out, md, cases)
  cases_run = [r["case"] for r in data["rows"]]
  assert cases_run == ["sparsifiner@0.25/masked", "dense", "sparsifiner@0.25+tok0.7/masked",
                       "sparsifiner@0.25/gather", "matmul 128"]
  ids = [c["id"] for c in data["comparisons"]]
  assert ids[:4] == ["b,masked", "c", "gather", "e"]   # b and masked are the same pair, listed once
  tok = data["rows"][2]
  assert tok["gflop_per_img"] < data["rows"][1]["gflop_per_img"]   # token dropping shortens the sequence
  if data["peak"]["theoretical_gflops"]:
    assert data["comparisons"][-1]["denominator"] == "theoretical fp32 peak"
  assert data["peak"]["matmul_gflops_best"] > 0
  text = md.read_text()
  assert "| vit_test | 2 | sparsifiner@0.25/gather | jax | eval forward |" in text
  assert "| c | 2 | sparsifiner@0.25+tok0.7/masked / dense (img/s) |" in text


def test_benchmark_torch_cases_tiny(tmp_path, timm):
  del timm  # the fixture skips without torch/timm
  out, md = tmp_path / "b.json", tmp_path / "B.md"
  result = bench.main(TINY + ["--cases", "a", "d", "--json", str(out), "--append", str(md)])
  data = _check_result(result, out, md, ["a", "d"])
  assert [(r["case"], r["impl"], r["kind"]) for r in data["rows"]] == [
      ("timm eager", "torch", "eval forward"), ("dense", "jax", "eval forward"),
      ("train step (ours)", "jax", "train step"), ("train step (torch)", "torch", "train step")]
  assert [(c["id"], c["numerator"], c["denominator"]) for c in data["comparisons"]] == [
      ("a", "dense", "timm eager"), ("d", "train step (ours)", "train step (torch)")]
  assert data["versions"]["torch_threads"] == 1 and "timm" in data["versions"]


def test_benchmark_bfloat16_tiny(tmp_path, timm):
  del timm
  out, md = tmp_path / "b.json", tmp_path / "B.md"
  result = bench.main(TINY + ["--dtype", "bfloat16", "--cases", "a", "b", "d", "e", "--json", str(out),
                              "--append", str(md)])
  data = _check_result(result, out, md, ["a", "b", "d", "e"])
  assert data["dtype"] == "bfloat16" and "px, bfloat16" in md.read_text()
  assert data["peak"]["theoretical_gflops"] is None          # the formula is fp32 only
  if cpu.kernel_status()["available"]:   # XLA would count the kernels' custom calls as 0 FLOPs
    cfg = models.get_config("vit_test", keep_rate=0.25, dtype="bfloat16")
    want = 2 * flops.count(cfg).totals["total"] / 1e9        # the analytic count instead, per image
    assert [r["gflop_per_img"] for r in data["rows"] if r["case"] == "sparsifiner@0.25/auto"] == [
        pytest.approx(want, rel=1e-12)]
    assert [r["gflop_per_s"] for r in data["rows"] if r["case"] == "train step (ours)"] == [None]
  assert "bfloat16 matmul" in data["peak"]["matmul"]
  assert bench.default_json_path("m", 16, "bfloat16").endswith("_m_16px_bfloat16.json")


def test_cpu_peak_formula():
  peak = bench.cpu_peak()
  if peak["theoretical_gflops"] is not None:
    assert peak["theoretical_gflops"] > 0 and "FMA" in peak["theoretical_formula"]


def test_torch_student_matches_ours(timm):
  """The PyTorch Sparsifiner student of case (d) computes our model's function (same weights)."""
  del timm
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _DIR)
  import torch_reference as tr  # pylint: disable=g-import-not-at-top
  cfg = models.get_config("vit_test", keep_rate=0.25)
  ours = models.create("vit_test", keep_rate=0.25, rngs=nnx.Rngs(0))
  for block in ours.blocks:   # basis all above the threshold: no tied scores, so top-k is unambiguous
    p = block.attn.mask_predictor.proj_back_n
    p[...] = 0.05 + abs(p[...]) * 10
  student = tr.sparsifiner_student("vit_test", cfg)
  sd = state_dict.timm_state_dict(ours)
  student.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  graphdef, state = nnx.split(ours)
  want = np.asarray(jax.jit(lambda s, im: nnx.merge(graphdef, s)(im)[0])(state, x))
  with torch.no_grad():
    got = student(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  n, k = cfg.num_tokens, math.ceil(0.25 * cfg.num_tokens)
  q = torch.randn(3, cfg.num_heads, n, cfg.head_dim)
  mask = student.blocks[0].attn.mask_predictor(q, q)
  assert mask.shape == (3, cfg.num_heads, n, n) and bool(mask[:, :, 0].all())
  assert (mask[:, :, 1:].sum(-1) == k).all()


def test_gemm_floor_tiny(tmp_path, timm):
  del timm  # the fixture skips without torch
  out = tmp_path / "floor.json"
  assert gemm_floor.main(["--batch", "1", "--reps", "1", "--json", str(out)]) == 0
  data = json.loads(out.read_text())
  # The student's and teacher's forward linears, the student's dX and dW: 4x the forward's linear FLOPs
  # (DeiT-S: 2 * 197 tokens * 1,769,472 weights a block * 12 blocks), the patch embedding 3x (no dX), and
  # the teacher's two attention products.
  linears = 4 * 2 * 197 * 12 * (384 * 1152 + 384 * 384 + 2 * 384 * 1536)
  patch, attention = 3 * 2 * 196 * 768 * 384, 12 * 2 * 2 * 6 * 197 * 197 * 64
  assert data["gflop"] == pytest.approx((linears + patch + attention) / 1e9, rel=1e-12)
  assert len(data["gemms"]) == 16 and sum(r["count"] for r in data["gemms"]) == 12 * 16 + 3 + 24
  assert data["xla_ms"] > 0 and data["torch_ms"] > 0
  assert gemm_floor.main(["--reps", "0"]) == 2


@pytest.mark.parametrize("bad", [["--cases", "z"], ["--batch"]])
def test_bad_arguments_exit(bad):
  with pytest.raises(SystemExit):
    bench.parse_args(bad)
