"""Memory plan of the paper recipe (DeiT-S Sparsifiner, batch 1,344, recon and distill phases) on TPU slices.

  python benchmarks/memory_plan.py [--topologies v5e:2x4 v5e:4x8 v4:2x2x4 v5p:2x4x4] [--json out.json]

For each topology and phase, compiles the real train step (``sparsifiner_jax.compile_for``, no TPU
needed) at the recipe's batch and reports per-device peak memory against the device's HBM (a device is a
chip; v4 topologies compile each of a chip's two TensorCores as a device with half its 32 GiB). Per chip
family, the largest per-chip batch that fits is found from two compiles (peak memory is close to linear in the
batch: the fit's intercept is the parameters, optimizer state and code) and then checked by compiling it
(stepping down by 8 until it fits). Where the recipe does not fit, the table gives the ``grad_accum`` that
brings the per-chip micro-batch under that limit. bfloat16 compute, data parallel (``fsdp = 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile-only

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import deit_s_sparsifiner  # noqa: E402
from sparsifiner_jax import compile_for  # noqa: E402
from sparsifiner_jax.compile import targets  # noqa: E402

GIB = 2 ** 30
NAMES = {"v5e:2x4": "v5e-8", "v5e:4x8": "v5e-32", "v4:2x2x4": "v4-32", "v5p:2x4x4": "v5p-64"}
PHASES = ("recon", "distill")
HEADROOM = 0.95   # a batch "fits" when its peak is at most this share of HBM


def _config(grad_accum: int = 1):
  config = deit_s_sparsifiner.get_config()
  config.model.dtype = "bfloat16"
  config.grad_accum = grad_accum
  return config


def peak(topology: str, phase: str, per_chip: int, grad_accum: int = 1) -> int:
  program = compile_for.compile_step(_config(grad_accum), targets.devices(topology), "train",
                                     phase=phase, batch_per_chip=per_chip)
  return program.figures.peak_bytes


def largest_batch(topology: str, phase: str, known: dict[int, int], log) -> int:
  """The largest per-chip batch (a multiple of 8) whose step fits, from a linear fit of ``known``
  ``{per_chip: peak}`` (two points at least), checked by compiling."""
  hbm = targets.memory_bytes(topology, targets.devices(topology)) * HEADROOM
  (b0, p0), (b1, p1) = sorted(known.items())[:1] + sorted(known.items())[-1:]
  slope = (p1 - p0) / (b1 - b0)
  guess = int((hbm - (p0 - slope * b0)) / slope) // 8 * 8
  while guess > 0:
    p = known.get(guess) or peak(topology, phase, guess)
    known[guess] = p
    log(f"  {topology} {phase}: {guess} per chip -> {p / GIB:.2f} GiB")
    if p <= hbm:
      return guess
    guess -= 8
  return 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topologies", nargs="+", default=list(NAMES))
  parser.add_argument("--batch", type=int, default=1344)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731
  rows, families = [], {}
  for topology in args.topologies:
    devices = targets.devices(topology)
    chips = len(devices)
    for phase in PHASES:
      per_chip = args.batch // chips
      p = peak(topology, phase, per_chip)
      log(f"{topology} {phase}: {per_chip} per chip -> {p / GIB:.2f} GiB")
      families.setdefault((topology.split(":")[0], phase), {"topology": topology, "known": {}})
      families[(topology.split(":")[0], phase)]["known"][per_chip] = p
      rows.append(dict(topology=topology, name=NAMES.get(topology, topology), chips=chips, phase=phase,
                       per_chip=per_chip, peak=p, hbm=targets.memory_bytes(topology, devices)))
  limits = {}
  for (family, phase), f in families.items():
    known = f["known"]
    if len(known) < 2:   # a second point for the fit: half the batch
      b = max(8, min(known) // 2 // 8 * 8)
      known[b] = peak(f["topology"], phase, b)
    limits[(family, phase)] = largest_batch(f["topology"], phase, known, log)
  print("| slice | devices | phase | batch / device | peak GiB / device | HBM GiB | fits "
        "| largest batch / device | to fit |\n|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    limit = limits[(r["topology"].split(":")[0], r["phase"])]
    fits = r["peak"] <= r["hbm"] * HEADROOM
    accum = 1
    while not fits and limit and r["per_chip"] // accum > limit:
      accum *= 2
    fix = "-" if fits else (f"grad_accum={accum}" if limit else "shard parameters: mesh fsdp")
    r.update(largest=limit, fits=fits, fix=fix)
    print(f"| {r['name']} (`{r['topology']}`) | {r['chips']} | {r['phase']} | {r['per_chip']} | "
          f"{r['peak'] / GIB:.2f} | {r['hbm'] / GIB:.0f} | {'yes' if fits else 'no'} | {limit} | {fix} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
