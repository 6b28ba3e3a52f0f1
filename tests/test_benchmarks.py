"""The benchmark command runs at a tiny size (not timed here), so it cannot rot."""

import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py")
_spec = importlib.util.spec_from_file_location("benchmarks_run", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_benchmark_runs_tiny(tmp_path):
  out = tmp_path / "b.json"
  md = tmp_path / "B.md"
  rows = bench.main(["--model", "vit_test", "--batch", "2", "--rounds", "2", "--reps", "1",
                     "--json", str(out), "--append", str(md)])
  assert [r["case"] for r in rows] == ["dense", "masked@0.25", "sparse@0.25"]
  assert all(r["img_per_s"] > 0 for r in rows)
  assert rows[0]["time_vs_dense"] == 1.0
  assert json.loads(out.read_text())["rows"][2]["batch"] == 2
  assert "| vit_test | 2 | sparse@0.25 |" in md.read_text()
