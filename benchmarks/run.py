"""Eval-forward throughput: Sparsifiner executors vs the dense model, measured in one process.

  python benchmarks/run.py [--model deit_small_patch16_224] [--batch 1 8] [--keep-rate 0.25]
                           [--rounds 5] [--json out.json] [--append BENCHMARKS.md]

Every case is jitted once, then timed in ``rounds`` rounds that alternate the cases (so machine noise hits
all of them alike); each round takes the median of ``reps`` calls. Reported: images/s (median over rounds),
the spread (min-max of the per-round rates), and each sparse case's time relative to dense in the same
round (median ratio; < 1 means faster than dense).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsifiner_jax import models


def _forward(name, batch, **kw):
  model = models.create(name, rngs=nnx.Rngs(0), **kw)
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  cfg = model.config
  x = jax.random.normal(jax.random.key(0), (batch, cfg.img_size, cfg.img_size, cfg.in_chans))
  fn(state, x).block_until_ready()
  return lambda: fn(state, x).block_until_ready()


def _time(call, reps):
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    call()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def run(model: str, batches, keep_rate: float, rounds: int, reps: int) -> list[dict]:
  rows = []
  for b in batches:
    cases = {"dense": _forward(model, b),
             f"masked@{keep_rate}": _forward(model, b, keep_rate=keep_rate, executor="masked"),
             f"sparse@{keep_rate}": _forward(model, b, keep_rate=keep_rate, executor="sparse")}
    secs = {k: [] for k in cases}
    for _ in range(rounds):
      for k, call in cases.items():
        secs[k].append(_time(call, reps))
    for k, s in secs.items():
      s = np.asarray(s)
      ratio = np.median(s / np.asarray(secs["dense"]))
      rows.append(dict(model=model, batch=b, case=k, img_per_s=float(np.median(b / s)),
                       spread=(float(np.min(b / s)), float(np.max(b / s))),
                       time_vs_dense=float(ratio)))
  return rows


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def to_markdown(rows, device: str) -> str:
  date = datetime.date.today().isoformat()
  lines = [f"| date | device | model | batch | case | img/s (median, min-max) | time vs dense |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {date} | {device} | {r['model']} | {r['batch']} | {r['case']} | "
                 f"{r['img_per_s']:.2f} ({r['spread'][0]:.2f}-{r['spread'][1]:.2f}) | "
                 f"{r['time_vs_dense']:.2f}x |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="deit_small_patch16_224")
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--keep-rate", type=float, default=0.25)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--json")
  ap.add_argument("--append", help="Markdown file to append the table to (e.g. BENCHMARKS.md)")
  args = ap.parse_args(argv)
  rows = run(args.model, args.batch, args.keep_rate, args.rounds, args.reps)
  table = to_markdown(rows, device_name())
  print(table)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=device_name(), rows=rows), f, indent=1)
  if args.append:
    with open(args.append, "a") as f:
      f.write("\n" + table + "\n")
  return rows


if __name__ == "__main__":
  main()
