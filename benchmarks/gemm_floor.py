"""GEMM floor of the DeiT-S phase-2 training step: every matmul of the step, timed alone, in XLA and torch.

The step (``benchmarks/run.py`` case d) runs the student forward and backward and the frozen teacher's
forward. Its matmuls are, per block, the four linears (qkv, proj, fc1, fc2) for the student and the
teacher forwards, the student's input and weight gradients of each, the patch embedding (forward twice,
weight gradient once) and the teacher's dense attention products (QKᵀ and PV). Their summed best-of-``reps``
times are the least time any implementation of the step can take with that library's GEMMs; BENCHMARKS.md
compares them with the measured step times to show which targets are reachable.

  python benchmarks/gemm_floor.py --batch 8 --reps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

EMBED, HEADS, HEAD_DIM, TOKENS, PATCHES, PATCH_IN, DEPTH = 384, 6, 64, 197, 196, 768, 12


def step_gemms(batch: int) -> list[tuple[str, int, int, int, int]]:
  """``(name, m, k, n, count)`` of every plain matmul ``[m, k] @ [k, n]`` in one phase-2 step."""
  rows = batch * TOKENS
  out = []
  for name, i, o in (("qkv", EMBED, 3 * EMBED), ("proj", EMBED, EMBED), ("fc1", EMBED, 4 * EMBED),
                     ("fc2", 4 * EMBED, EMBED)):
    out += [(f"{name} forward", rows, i, o, 2 * DEPTH),     # student and teacher
            (f"{name} dX", rows, o, i, DEPTH),              # student: dY Wᵀ
            (f"{name} dW", i, rows, o, DEPTH)]              # student: Xᵀ dY
  out += [("patch forward", batch * PATCHES, PATCH_IN, EMBED, 2),
          ("patch dW", PATCH_IN, batch * PATCHES, EMBED, 1)]
  return out


def _best(fn, *args, reps: int) -> float:
  def run():
    out = fn(*args)
    if hasattr(out, "block_until_ready"):
      out.block_until_ready()
  run()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def floor(batch: int, reps: int, threads: int = 2) -> dict:
  """Times every matmul of the step (best of ``reps``) in XLA and in torch (``threads`` threads)."""
  import torch  # the benchmarks' optional dependency, as in run.py
  torch.set_num_threads(threads)
  rows, flops, xla_s, torch_s = [], 0.0, 0.0, 0.0

  def add(name, count, gflop, tx, tt):
    nonlocal flops, xla_s, torch_s
    flops += count * gflop
    xla_s += count * tx
    torch_s += count * tt
    rows.append(dict(name=name, count=count, gflop=gflop, xla_gflops=gflop / tx, torch_gflops=gflop / tt))

  dot = jax.jit(jnp.dot)
  for name, m, k, n, count in step_gemms(batch):
    tx = _best(dot, jnp.ones((m, k)), jnp.ones((k, n)), reps=reps)
    tt = _best(torch.matmul, torch.ones(m, k), torch.ones(k, n), reps=reps)
    add(f"{name} {m}x{k}x{n}", count, 2 * m * k * n / 1e9, tx, tt)
  bh = batch * HEADS
  q, tq = jnp.ones((bh, TOKENS, HEAD_DIM)), torch.ones(bh, TOKENS, HEAD_DIM)
  p, tp = jnp.ones((bh, TOKENS, TOKENS)), torch.ones(bh, TOKENS, TOKENS)
  gflop = 2 * bh * TOKENS * TOKENS * HEAD_DIM / 1e9
  add("teacher QKᵀ", DEPTH, gflop,
      _best(jax.jit(lambda a: jnp.einsum("bnd,bmd->bnm", a, a)), q, reps=reps),
      _best(lambda a: a @ a.transpose(1, 2), tq, reps=reps))
  add("teacher PV", DEPTH, gflop, _best(jax.jit(jnp.matmul), p, q, reps=reps),
      _best(torch.matmul, tp, tq, reps=reps))
  return dict(batch=batch, reps=reps, threads=threads, gflop=flops, xla_ms=1e3 * xla_s,
              torch_ms=1e3 * torch_s, xla_gflops=flops / xla_s, torch_gflops=flops / torch_s, gemms=rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--reps", type=int, default=20, help="timed repetitions per matmul (best is kept)")
  parser.add_argument("--json", help="also write the result to this JSON file")
  args = parser.parse_args(argv)
  if args.batch < 1 or args.reps < 1:
    print("gemm_floor: --batch and --reps must be >= 1", file=sys.stderr)
    return 2
  result = floor(args.batch, args.reps)
  for row in result["gemms"]:
    print(f"{row['name']:28s} x{row['count']:3d}  xla {row['xla_gflops']:6.1f}  torch "
          f"{row['torch_gflops']:6.1f} GFLOP/s")
  print(f"batch {args.batch}: {result['gflop']:.1f} GFLOP of matmuls; alone they take XLA "
        f"{result['xla_ms']:.0f} ms ({result['xla_gflops']:.0f} GFLOP/s), torch {result['torch_ms']:.0f} ms "
        f"({result['torch_gflops']:.0f} GFLOP/s); device: {jax.devices()[0].device_kind}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
