"""Sweep files, flags, sequential/dry runs, aggregation into tables and Pareto plots, CLI errors."""

import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from sparsifiner_jax import sweeps
from sparsifiner_jax.evaluation import viz
from sparsifiner_jax.io import atomic, paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP_RATE = os.path.join(ROOT, "configs", "sweeps", "keep_rate.py")
PREDICTOR = os.path.join(ROOT, "configs", "sweeps", "predictor.py")


def test_keep_rate_sweep():
  assert sweeps.load_sweep(KEEP_RATE) == [{"model.keep_rate": r} for r in (1.0, 0.5, 0.25, 0.1, 0.05)]
  assert sweeps.load_sweep(KEEP_RATE + ":0.3,0.2") == [{"model.keep_rate": 0.3},
                                                      {"model.keep_rate": 0.2}]
  with pytest.raises(sweeps.SweepError, match=r"keep rate 1.5 must be in \(0, 1\]"):
    sweeps.load_sweep(KEEP_RATE + ":1.5")


def test_predictor_sweep():
  sweep = sweeps.load_sweep(PREDICTOR)
  assert len(sweep) == 16
  assert {"model.keep_rate": 0.25, "model.basis_threshold": 0.02, "model.coef_topk": 8} in sweep
  assert {o["model.basis_threshold"] for o in sweep} == {0.0, 0.01, 0.02, 0.04}
  assert {o["model.coef_topk"] for o in sweep} == {4, 8, 16, 32}
  small = sweeps.load_sweep(PREDICTOR + ":keep_rate=0.1,thresholds=0.02/0.05,topk=8")
  assert small == [{"model.keep_rate": 0.1, "model.basis_threshold": t, "model.coef_topk": 8}
                   for t in (0.02, 0.05)]
  with pytest.raises(sweeps.SweepError, match="bad sweep argument 'foo=1'"):
    sweeps.load_sweep(PREDICTOR + ":foo=1")


def test_load_sweep_errors(tmp_path):
  with pytest.raises(sweeps.SweepError, match="not found"):
    sweeps.load_sweep(str(tmp_path / "missing.py"))
  (tmp_path / "empty.py").write_text("X = 1\n")
  with pytest.raises(sweeps.SweepError, match="defines no get_sweep"):
    sweeps.load_sweep(str(tmp_path / "empty.py"))
  (tmp_path / "bad.py").write_text("def get_sweep(arg=None):\n  return [{'a': 1}, 3]\n")
  with pytest.raises(sweeps.SweepError, match="entry 1 must be a dict"):
    sweeps.load_sweep(str(tmp_path / "bad.py"))
  (tmp_path / "syntax.py").write_text("def get_sweep(:\n")
  with pytest.raises(sweeps.SweepError, match="failed to load: SyntaxError"):
    sweeps.load_sweep(str(tmp_path / "syntax.py"))


def test_to_flags_and_run_names():
  overrides = {"model.keep_rate": 0.25, "model.coef_topk": 8, "model.executor": "gather",
               "model.signed_basis": True, "input.rrc_scale": (0.08, 1.0), "init": None}
  assert sweeps.to_flags(overrides) == [
      "--config.model.keep_rate=0.25", "--config.model.coef_topk=8",
      "--config.model.executor=gather", "--config.model.signed_basis=True",
      "--config.input.rrc_scale=(0.08,1.0)", "--config.init=None"]
  assert sweeps.run_name({"model.keep_rate": 0.25, "model.coef_topk": 8}) == "keep_rate=0.25,coef_topk=8"
  assert sweeps.run_name({"init": "a/b c"}) == "init=a_b_c"
  assert sweeps.run_name({}) == "default"


def test_dry_run_prints_commands(tmp_path, capsys):
  results = sweeps.run("eval.py", "configs/tiny_test.py", KEEP_RATE + ":0.5,0.25", str(tmp_path),
                       dry_run=True)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == len(results) == 2
  wd = os.path.join(str(tmp_path), "keep_rate=0.5")
  assert lines[0].split()[1:] == ["eval.py", "--config=configs/tiny_test.py", f"--workdir={wd}",
                                  f"--out={wd}/eval.json", "--config.model.keep_rate=0.5"]
  assert results[1]["returncode"] is None and not os.path.exists(results[1]["workdir"])
  # train.py: --workdir per run; eval.py with --weights: no --workdir, still its own --out.
  cmds = sweeps.build_commands("train.py", "c.py", [{"a": 1}], "R")
  assert cmds[0][1][1:] == ["train.py", "--config=c.py", "--workdir=R/a=1", "--config.a=1"]
  cmds = sweeps.build_commands("eval.py", "c.py", [{"a": 1}, {"a": 1}], "R", ["--weights=W"])
  assert cmds[1][1][1:] == ["eval.py", "--config=c.py", "--out=R/a=1.1/eval.json", "--config.a=1",
                            "--weights=W"]


def test_run_executes_sequentially(tmp_path):
  script = tmp_path / "fake_eval.py"
  script.write_text(
      "import json, sys\n"
      "args = dict(a.lstrip('-').split('=', 1) for a in sys.argv[1:])\n"
      "rate = float(args['config.model.keep_rate'])\n"
      "if rate == 0.05: sys.exit(3)\n"
      "json.dump({'method': 'fake', 'keep_rate': rate, 'top1': 0.5 + rate / 4,\n"
      "           'flops': {'total': 1e9 * (1 + rate), 'mhsa': 1e8 * (1 + rate)}},\n"
      "          open(args['out'], 'w'))\n")
  results = sweeps.run(str(script), "cfg.py", KEEP_RATE, str(tmp_path / "runs"))
  assert [r["returncode"] for r in results] == [0, 0, 0, 0, 3]
  outs = [os.path.join(r["workdir"], "eval.json") for r in results[:4]]
  rows = sweeps.aggregate(outs)
  assert [r["keep_rate"] for r in rows] == [1.0, 0.5, 0.25, 0.1]
  assert rows[0]["top1"] == pytest.approx(75.0)
  # Without keep_going a failure stops the sweep; the runs after it are reported as not run.
  results = sweeps.run(str(script), "cfg.py", KEEP_RATE + ":0.05,0.5", str(tmp_path / "stop"))
  assert [r["returncode"] for r in results] == [3, None]
  assert not os.path.exists(results[1]["workdir"])
  results = sweeps.run(str(script), "cfg.py", KEEP_RATE + ":0.05,0.5", str(tmp_path / "go"),
                       keep_going=True)
  assert [r["returncode"] for r in results] == [3, 0]


def fake_runs(tmp_path):
  records = [
      dict(method="dense", model="deit_small_patch16_224", keep_rate=None, top1=0.798, top5=0.95,
           loss=0.9, density=1.0, recall=1.0,
           flops=dict(total=4.60e9, mhsa=1.75e9, attention_matrix=0.358e9), images_per_s=10.0),
      *[dict(method="sparsifiner", model="deit_small_patch16_224", keep_rate=r, top1=a, top5=0.94,
             loss=1.0, density=d, recall=rc, flops=dict(total=t, mhsa=m, attention_matrix=am),
             images_per_s=9.0)
        for r, a, d, rc, t, m, am in [(0.5, 0.797, 0.5, 0.97, 4.57e9, 1.72e9, 0.31e9),
                                      (0.25, 0.794, 0.2576, 0.9123, 4.44e9, 1.59e9, 0.20e9),
                                      (0.1, 0.780, 0.104, 0.81, 4.38e9, 1.54e9, 0.15e9)]],
      # EViT-like (or written before eval.py reported recall): only some fields.
      dict(method="evit", keep_rate=0.7, top1=79.5, flops=dict(total=3.0e9)),
      dict(method="evit", keep_rate=0.5, top1=78.5, flops=dict(total=2.3e9)),
  ]
  files = []
  for i, rec in enumerate(records):
    path = tmp_path / f"run{i}" / "eval.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rec))
    files.append(str(path))
  return files


def test_aggregate_table_and_plot(tmp_path):
  files = fake_runs(tmp_path)
  rows = sweeps.aggregate(files)
  assert [r["method"] for r in rows] == ["dense"] + ["evit"] * 2 + ["sparsifiner"] * 3
  dense = rows[0]
  assert dense["dense"] and dense["top1"] == pytest.approx(79.8)
  assert dense["gmacs_total"] == pytest.approx(4.6)
  assert dense["gmacs_attention_matrix"] == pytest.approx(0.358)
  evit = rows[1]
  assert evit["top1"] == 79.5 and evit["gmacs_mhsa"] is None and evit["top5"] is None
  assert evit["recall"] is None and dense["recall"] == pytest.approx(100.0)
  assert rows[-2]["recall"] == pytest.approx(91.23)       # largest GMACs first: keep 0.25 is 2nd of 3
  assert not any(r["dense"] for r in rows[1:])

  md, csv_path = sweeps.write_table(rows, str(tmp_path / "out" / "t.md"), str(tmp_path / "out" / "t.csv"))
  text = open(md).read()
  assert "| method | model | keep rate | top-1 % | top-5 % | density % | recall % |" in text
  assert ("| sparsifiner | deit_small_patch16_224 | 0.25 | 79.40 | 94.00 | 25.76 | 91.23 | 4.440 | 1.590 "
          "| 0.2000 | 9.0 |") in text
  assert "| dense | deit_small_patch16_224 | – | 79.80 | 95.00 | 100.00 | 100.00 |" in text
  assert "| evit |  | 0.7 | 79.50 | – | – | – | 3.000 |" in text   # no recall: shown as "–"
  with open(csv_path) as f:
    table = list(csv.DictReader(f))
  assert len(table) == 6 and table[0]["method"] == "dense" and table[1]["gmacs_mhsa"] == ""
  assert table[0]["recall"] == "100.0" and table[1]["recall"] == ""

  png = viz.pareto_plot(rows, str(tmp_path / "out" / "pareto.png"), dpi=50)
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size == (600, 240)
  assert os.path.getsize(png) > 5000


def test_pareto_front():
  pts = [(4.6, 79.8), (4.4, 79.4), (4.5, 79.0), (3.0, 79.5), (2.3, 78.5), (3.0, 79.1)]
  assert viz.pareto_front(pts) == [4, 3, 0]


def test_aggregate_errors(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(sweeps.SweepError, match="malformed JSON"):
    sweeps.aggregate([str(bad)])
  bad.write_text(json.dumps({"method": "x"}))
  with pytest.raises(sweeps.SweepError, match="missing or non-numeric 'top1'"):
    sweeps.aggregate([str(bad)])
  with pytest.raises(sweeps.SweepError, match="not found"):
    sweeps.aggregate([str(tmp_path / "nope.json")])


def cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "sparsifiner_jax.sweeps", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=60)


def test_cli(tmp_path):
  files = fake_runs(tmp_path)
  out = cli("aggregate", *files, "--out", str(tmp_path / "agg"))
  assert out.returncode == 0, out.stderr
  assert {"results.md", "results.csv", "pareto.png"} <= set(os.listdir(tmp_path / "agg"))
  out = cli("run", "--config", "configs/tiny_test.py", "--sweep", "configs/sweeps/keep_rate.py:0.1",
            "--workdir-root", str(tmp_path / "r"), "--dry-run", "--", "--weights=W")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().endswith("--config.model.keep_rate=0.1 --weights=W")


@pytest.mark.parametrize("args,msg", [
    (("run", "--config", "c.py", "--sweep", "configs/sweeps/nope.py", "--workdir-root", "x"),
     "sweep file 'configs/sweeps/nope.py' not found"),
    (("aggregate", "BAD", "--out", "x"), "malformed JSON"),
    (("aggregate", "--out", "x"), "the following arguments are required: RUN_JSON"),
])
def test_cli_errors_are_one_line(tmp_path, args, msg):
  args = tuple(str(tmp_path / "bad.json") if a == "BAD" else a for a in args)
  (tmp_path / "bad.json").write_text("[{")
  out = cli(*args)
  assert out.returncode == 2
  assert msg in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_aggregate_reads_and_writes_a_bucket(tmp_path, bucket):
  remote = [atomic.write_text(f"{bucket}/run{i}/eval.json", open(p).read())
            for i, p in enumerate(fake_runs(tmp_path))]
  out = sweeps.aggregate_to_dir(remote, bucket + "/table", title="in a bucket")
  assert out["rows"] == "6" and out["plot"] == bucket + "/table/pareto.png"
  table = paths.resolve(out["markdown"]).read_text()
  assert "| sparsifiner | deit_small_patch16_224 | 0.25 | 79.40 |" in table
  assert paths.resolve(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_importing_the_commands_defines_no_global_flag():
  import importlib

  from absl import flags
  for module in ("sparsifiner_jax.convert", "sparsifiner_jax.demo"):   # sweeps is imported above
    importlib.import_module(module)
  for name in ("workdir-root", "dry-run", "keep-going", "sweep", "script", "title", "img-size", "keep-rate",
               "src-format", "trust-pickle", "backbone-only", "overwrite"):
    assert name not in flags.FLAGS, name
  assert "--workdir-root" in str(sweeps.define_flags("run"))
  assert "--title" in str(sweeps.define_flags("aggregate"))


def test_cli_help_and_unknown_flag(tmp_path):
  out = cli("run", "--help")
  assert out.returncode == 0 and "--workdir-root" in out.stdout and "--keep-going" in out.stdout
  out = cli("aggregate", "--nope", "--out", str(tmp_path))
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()]
  assert "Unknown command line flag 'nope'" in out.stderr
