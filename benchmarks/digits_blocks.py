"""Accuracy of block mode against token mode and dense, on digits at 257 tokens (32 px, patch 2).

  python benchmarks/digits_blocks.py [--workdir workdirs/digits_blocks] [--json out.json]

1. a dense teacher from scratch (``configs/digits_dense.py:img_size=32``);
2. from it, token-mode Sparsifiner (``configs/digits_blocks.py:mask_block=0``: top-k keys per row) and
   block-mode Sparsifiner (``configs/digits_blocks.py``: blocks of 16, patches in Z-order), both keep
   0.25, both phases (10 recon, 120 distill epochs);
3. each evaluated as ``eval.py`` does: top-1 on the 360 test digits, attention density, attention recall.

Prints a Markdown table. CPU time: about two hours on 2 cores (each sparse run about an hour). The runs
resume if interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import digits_blocks, digits_dense  # noqa: E402
from sparsifiner_jax.evaluation import report  # noqa: E402
from sparsifiner_jax.train import trainer  # noqa: E402


def run(workdir: str) -> dict[str, dict]:
  teacher_cfg = digits_dense.get_config("img_size=32")
  trainer.train(teacher_cfg, os.path.join(workdir, "dense"))
  teacher = os.path.join(workdir, "dense", "final")
  results = {"dense": report.evaluate_checkpoint(teacher_cfg, weights_path=teacher)}
  for name, block in (("token mode", 0), ("block mode (b = 16)", 16)):
    cfg = digits_blocks.get_config(f"mask_block={block}")
    cfg.init = cfg.teacher.weights = teacher
    run_dir = os.path.join(workdir, f"block{block}")
    trainer.train(cfg, run_dir)
    results[name] = report.evaluate_checkpoint(cfg, weights_path=os.path.join(run_dir, "final"))
  return results


def table(results: dict[str, dict]) -> str:
  rows = ["| model (257 tokens, keep 0.25) | test top-1 % | attention density % | attention recall % |",
          "|---|---|---|---|"]
  for name, r in results.items():
    rows.append(f"| {name} | {100 * r['top1']:.2f} | {100 * r['density']:.2f} | {100 * r['recall']:.2f} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdirs/digits_blocks")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  results = run(args.workdir)
  print(table(results))
  if args.json:
    keep = ("top1", "density", "recall", "layer_recall")
    pathlib.Path(args.json).write_text(json.dumps(
        {name: {k: r.get(k) for k in keep} for name, r in results.items()}, indent=1, default=float))


if __name__ == "__main__":
  main()
