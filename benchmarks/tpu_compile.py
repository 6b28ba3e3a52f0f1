"""TPU compiler figures of Sparsifiner vs dense DeiT-S, per chip, in one run (no TPU needed; libtpu is).

  python benchmarks/tpu_compile.py [--topology v5e:2x2] [--cases eval tokens train 448] [--keep_rate 0.25]
      [--json out.json]

Each case compiles the project's real step twice with ``sparsifiner_jax.compile_for`` (the model, and its
dense counterpart: same config, ``keep_rate=None``, no token sparsity; its attention both ways, XLA's and
the fused Pallas kernel, the faster kept) and prints, per chip, the clock's
estimated time (``compile.clock``: XLA's estimated cycles for XLA ops, static bundles for the Pallas
kernels), XLA's FLOPs, bytes accessed and temporary memory, with the model/dense ratios, as a Markdown
table, and the top ops by time. DeiT-S in bfloat16, keep 0.25 (``--keep_rate``). XLA counts a Pallas
kernel by its declared ``pl.CostEstimate`` (its FLOPs; its operand and result bytes as HBM traffic, k and
v once per query block); only the clock sees how long its instructions take to issue.

Cases: ``eval`` (224 px, 64 images per chip), ``tokens`` (the same with token keep 0.7 at layers 3/6/9),
``train`` (the paper's phase-2 step: batch 1,344 on the topology, student and dense teacher), ``448``
(448 px, 785 tokens, 16 images per chip); block mode: ``blocks`` (224 px, blocks of 32), ``blocks448``
(blocks of 128), ``blocks896`` (3,137 tokens, 4 images per chip), ``blocks448_train`` (the phase-2 step
at 448 px, 32 images per chip, with the dense teacher).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile-only: never open a local accelerator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import deit_s_sparsifiner  # noqa: E402
from sparsifiner_jax import compile_for  # noqa: E402
from sparsifiner_jax.compile import clock  # noqa: E402

CASES = {   # name: (what, batch per chip or None for the config's, model overrides, phase)
    "eval": ("eval", 64, {}, None),
    "tokens": ("eval", 64, {"token_keep_rate": 0.7}, None),
    "train": ("train", None, {}, "distill"),
    "448": ("eval", 16, {"img_size": 448}, None),
    # Block mode (ViTConfig.mask_block): blocks of b query rows x b keys, skipped whole by the kernels;
    # the patches in Z-order, as configs/deit_s_blocks.py has them.
    "blocks": ("eval", 64, {"mask_block": 32, "token_order": "morton"}, None),
    "blocks448": ("eval", 16, {"img_size": 448, "mask_block": 128, "token_order": "morton"}, None),
    "blocks896": ("eval", 4, {"img_size": 896, "mask_block": 128, "token_order": "morton"}, None),
    "blocks448_train": ("train", 32, {"img_size": 448, "mask_block": 128, "token_order": "morton"},
                        "distill"),
}


def run_case(name: str, topology: str, keep_rate: float | None = None) -> dict:
  what, batch, model, phase = CASES[name]
  config = deit_s_sparsifiner.get_config()
  config.model.dtype = "bfloat16"
  for key, value in model.items():
    config.model[key] = value
  if keep_rate is not None:
    config.model.keep_rate = keep_rate
  return compile_for.compare(config, topology, what, phase=phase, batch_per_chip=batch)


def table(results: dict[str, dict]) -> str:
  rows = ["| case | topology | batch / chip | time (clock) | FLOPs | bytes accessed | temp memory "
          "| peak memory |",
          "|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    m, d, q = r["model"], r["dense"], r["ratios"]
    cell = lambda k, scale=1.0, unit="": (f"{m[k] / scale:.3g}{unit} vs {d[k] / scale:.3g}{unit}: "   # noqa
                                          f"**{q[k]:.2f}x**")
    time = (f"{m['time']['ms']:.3g} ms vs {d['time']['ms']:.3g} ms ({d['attention']}; other "
            f"{d['other_ms']:.3g}): **{q['time']:.2f}x**")
    rows.append(f"| {name} | {r['topology']} | {r['batch_per_chip']} | {time} | {cell('flops')} | "
                f"{cell('bytes_accessed')} | {cell('temp_bytes', 2 ** 20, ' MiB')} | "
                f"{cell('peak_bytes', 2 ** 20, ' MiB')} |")
  return "\n".join(rows)


def top_ops(results: dict[str, dict]) -> str:
  """Per case, the model's ops by time (XLA op kinds and kernels, summed over layers)."""
  out = []
  for name, r in results.items():
    t = r["model"]["time"]
    ops = ", ".join(f"{o['name']} x{o['count']} {o['ms']:.3g} ms" for o in t["top"][:6])
    out.append(f"* {name}: XLA ops {t['xla_ms']:.3g} ms, Pallas kernels {t['pallas_ms']:.3g} ms; {ops}")
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2", help="eval cases (per-chip figures)")
  parser.add_argument("--train-topology", default="v5e:2x4", help="the train case (batch 1,344)")
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  parser.add_argument("--keep_rate", type=float, default=None, help="instead of the config's 0.25")
  parser.add_argument("--json", default=None, help="also write the raw figures here")
  args = parser.parse_args()
  dump = tempfile.mkdtemp(prefix="sparsifiner_clock_")
  clock.enable(dump)   # before libtpu starts
  results = {}
  try:
    for name in args.cases:
      topology = args.train_topology if CASES[name][0] == "train" else args.topology
      print(f"compiling {name} for {topology} ...", file=sys.stderr, flush=True)
      results[name] = run_case(name, topology, args.keep_rate)
  finally:
    shutil.rmtree(dump, ignore_errors=True)
  print(f"## TPU compiler figures, {datetime.date.today()}: DeiT-S bf16 keep {args.keep_rate or 0.25}, "
        "per chip, model vs dense\n")
  print(table(results))
  print()
  print(top_ops(results))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
