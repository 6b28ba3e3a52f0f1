"""An estimated time per step on a TPU, read from libtpu's own compiler output, with no TPU.

FLOPs and bytes cannot see a kernel limited by instruction issue; the compiler's schedule can. Two
sources, both written by the real TPU compiler (libtpu):

- **XLA ops**: each op XLA schedules carries its cost model's ``"estimated_cycles"`` in the compiled
  program's backend_config (calibrated on DeiT-S: within ~30 % of the static bundles for compute-bound
  fusions; for memory-bound copies, pads and slices it includes the HBM time the bundles cannot show).
- **Pallas (Mosaic) kernels**: none. libtpu, started with :func:`libtpu_flags`, writes every kernel's final
  VLIW bundles (``*-<kernel>-03-final_bundles.txt``). A bundle issues in one cycle; a loop (the grid, and
  any loop inside the kernel) runs its body as many times as its exit test says. So a kernel's static
  cycles are its bundles weighted by their loops' trip counts. A lower bound: stalls (DMA waits, memory
  latency) are not in it, and a predicated region (``pl.when``) counts as executed on every step.

Time = cycles / the chip's clock (``CLOCK_GHZ``: peak bf16 FLOP/s over MXUs x 128 x 128 x 2). Ops in a
``while`` loop (gradient accumulation) count their loop's trip count times.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import time

CLOCK_GHZ = {"v4": 1.05, "v5e": 1.5, "v5litepod": 1.5, "v5p": 1.75}   # 275, 197, 459 TFLOP/s bf16
_DUMP_FLAG = "--xla_jf_dump_to="


class ClockError(RuntimeError):
  """The clock cannot read this compile: libtpu was started without the dump flags, or no clock rate."""


@dataclasses.dataclass(frozen=True)
class Op:
  """One op of a compiled program: ``cycles`` per execution, run ``count`` times per step."""
  name: str
  kind: str          # "xla" (estimated_cycles) or "pallas" (static bundles)
  cycles: int
  count: int = 1

  @property
  def total(self) -> int:
    return self.cycles * self.count


def libtpu_flags(dump_dir: str | os.PathLike) -> str:
  """``LIBTPU_INIT_ARGS`` that make libtpu write each program's final bundles to ``dump_dir``."""
  return f"{_DUMP_FLAG}{dump_dir} --xla_jf_dump_llo_pass_label_regex=final"


def enable(dump_dir: str | os.PathLike) -> None:
  """Asks libtpu, not started yet in this process, to write its final bundles to ``dump_dir``."""
  flags = os.environ.get("LIBTPU_INIT_ARGS", "")
  os.environ["LIBTPU_INIT_ARGS"] = f"{flags} {libtpu_flags(dump_dir)}".strip()


def dump_dir() -> pathlib.Path | None:
  """Where libtpu writes bundles in this process (from ``LIBTPU_INIT_ARGS``), or None."""
  m = re.search(re.escape(_DUMP_FLAG) + r"(\S+)", os.environ.get("LIBTPU_INIT_ARGS", ""))
  return pathlib.Path(m[1]) if m else None


def now() -> int:
  """A timestamp comparable with the dump files' prefixes (nanoseconds since the epoch)."""
  return time.time_ns()


# ------------------------------------------------------------------------------------------------
# Pallas kernels: bundles weighted by loop trip counts.

_BUNDLE = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s+(?:(LB|LH|LE|PB|PF|CT):|:)\s*(>*)\s*\{(.*)$")
_EXIT_TEST = re.compile(r"scmp\.ge\.s32\.totalorder %\w+, (\d+) /\* loop exit test \*/")


def _loops(bundles: list[tuple[str, int, str]]) -> list[tuple[int, int, int]]:
  """``(first, last, trips)`` bundle indices of each loop whose trip count is static: from a bundle marked
  ``LB:`` to the first branch after its ``loop exit test`` (``counter >= N``: N trips, counting from 0).
  ``bundles`` are ``(marker, depth, text)``, the depth being the listing's ``>`` count (the grid loop is
  ``>``, a loop inside the kernel ``>>``): an exit test belongs to the latest loop begun at its depth. A
  loop with a dynamic trip count (its exit test compares with a register, unannotated: e.g. a copy of a
  run of rows) is left unweighted: its body counts once."""
  loops, open_loops, closing = [], [], None     # open_loops: (first, depth); closing: (first, trips)
  for i, (marker, depth, body) in enumerate(bundles):
    if marker == "LB":
      open_loops.append((i, depth))
    test = _EXIT_TEST.search(body)
    if test:
      while open_loops and open_loops[-1][1] > depth:   # deeper loops that ended unannotated
        open_loops.pop()
      if open_loops and open_loops[-1][1] == depth:
        closing = (open_loops.pop()[0], int(test[1]))
    elif closing is not None and "sbr.rel" in body:
      loops.append((closing[0], i, closing[1]))
      closing = None
  return loops


def static_cycles(bundles_text: str) -> int:
  """Cycles of a kernel's final bundles: every bundle once, times the trip count of each loop around
  it. The grid loop runs the grid's steps plus two pipeline steps (the first and last DMA stages,
  mostly predicated off); it is counted as its grid steps: ``iteration_bounds`` where the listing gives
  them (it does for kernels with windowed operands), else its trips less two, the loop being the one
  whose first bundle carries the pipeline's ``iteration index`` (a kernel whose operands are all whole
  has no window and no ``iteration_bounds`` line)."""
  bundles = [(m[2], len(m[3]), m[4]) for m in map(_BUNDLE.match, bundles_text.splitlines()) if m]
  grid = [math.prod(int(x) for x in b.split(",") if x.strip())
          for b in re.findall(r"^iteration_bounds: \(([\d, ]+)\)", bundles_text, re.M)]
  weight = [1] * len(bundles)
  for first, last, trips in _loops(bundles):
    if (trips == grid[0] + 2) if grid else (trips > 2 and "iteration index" in bundles[first][2]):
      trips -= 2
    for i in range(first, last + 1):
      weight[i] *= trips
  return sum(weight)


def kernel_bundle_files(directory: pathlib.Path, start_ns: int, end_ns: int) -> dict[str, pathlib.Path]:
  """``{instruction name: final bundles file}`` of the programs libtpu wrote between the two times."""
  out = {}
  for f in directory.glob("*-03-final_bundles.txt"):
    stamp, _, rest = f.name.partition("-")
    if stamp.isdigit() and start_ns <= int(stamp) <= end_ns:
      out[rest[:-len("-03-final_bundles.txt")]] = f
  return out


# ------------------------------------------------------------------------------------------------
# The compiled program: XLA ops' estimated cycles, Pallas kernels' static cycles, loop counts.

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z\-]*)\(")
_ESTIMATED = re.compile(r'"estimated_cycles":"(\d+)"')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """``({computation: instruction lines}, entry name)`` of a compiled module's text."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m[2]
      comps[current] = []
      entry = current if m[1] else entry
    elif line.strip() == "}":
      current = None
    elif current is not None and _INSTRUCTION.match(line):
      comps[current].append(line)
  return comps, entry


def _counts(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each control computation runs per step: the entry once, a ``while`` body its known
  trip count times (its condition once more), a ``call`` or ``conditional`` branch as often as its
  caller (fusion bodies and reducers are parts of one op, not counted)."""
  counts, todo = {entry: 1}, [entry]
  while todo:
    comp = todo.pop()
    for line in comps.get(comp, ()):
      rest = _INSTRUCTION.match(line)[2]
      op = _OPCODE.search(rest)
      op = op[1] if op else ""
      callees = []
      if op == "while":
        trips = _TRIPS.search(rest)
        n = int(trips[1]) if trips else 1
        callees = [(re.search(r"body=%([\w.\-]+)", rest)[1], n),
                   (re.search(r"condition=%([\w.\-]+)", rest)[1], n + 1)]
      elif op in ("call", "conditional"):
        callees = [(c, 1) for c in re.findall(r"(?:to_apply|branch_computations=\{[^}]*|true_computation|"
                                              r"false_computation)=?%([\w.\-]+)", rest)]
      for callee, n in callees:
        if callee not in counts:
          counts[callee] = counts[comp] * n
          todo.append(callee)
  return counts


def _kernel_cycles(comps: dict[str, list[str]], bundle_files: dict[str, pathlib.Path]) -> dict[str, int]:
  """``{kernel instruction: static cycles}``. libtpu compiles identical kernels (same Mosaic module, e.g.
  one per layer) once and writes the bundles under one of their names, so kernels are matched by their
  backend config."""
  by_config: dict[str, list[str]] = {}
  for line in (line for lines in comps.values() for line in lines):
    name, rest = _INSTRUCTION.match(line).groups()
    if 'custom_call_target="tpu_custom_call"' in rest:
      by_config.setdefault(re.search(r"backend_config=(.*)$", rest)[1], []).append(name)
  cycles = {}
  for names in by_config.values():
    dumped = [n for n in names if n in bundle_files]
    if not dumped:
      raise ClockError(f"no final bundles of the Pallas kernel {names[0]!r}: libtpu must be started with "
                       f"LIBTPU_INIT_ARGS='{libtpu_flags('DIR')}' (compile_for --clock does this)")
    cycles.update(dict.fromkeys(names, static_cycles(bundle_files[dumped[0]].read_text())))
  return cycles


def program_ops(hlo_text: str, bundle_files: dict[str, pathlib.Path]) -> list[Op]:
  """Every timed op of a compiled TPU program: XLA ops with ``estimated_cycles``, and Pallas kernels
  (``tpu_custom_call``) by the static cycles of their bundles in ``bundle_files`` (from
  :func:`kernel_bundle_files`); each with the number of times it runs per step."""
  comps, entry = _computations(hlo_text)
  kernels = _kernel_cycles(comps, bundle_files)
  ops = []
  for comp, count in _counts(comps, entry).items():
    for line in comps.get(comp, ()):
      name, rest = _INSTRUCTION.match(line).groups()
      if name in kernels:
        ops.append(Op(name, "pallas", kernels[name], count))
        continue
      cycles = _ESTIMATED.search(rest)
      if cycles:
        ops.append(Op(name, "xla", int(cycles[1]), count))
  return ops


def clock_ghz(topology: str) -> float:
  family = topology.split(":")[0].lower()
  if family not in CLOCK_GHZ:
    raise ClockError(f"--clock: no clock rate known for {family!r}; it covers the TPU families "
                     f"{sorted(CLOCK_GHZ)}")
  return CLOCK_GHZ[family]


def summary(ops: list[Op], ghz: float, top: int = 8) -> dict:
  """Milliseconds per step (all ops, XLA ops, Pallas kernels), and the ``top`` kinds of op by time: ops
  grouped by name without XLA's numeric suffix (``copy.5`` and ``copy.8`` are ``copy``; the 12 layers'
  ``lowrank_topk_mask.N`` one kernel), with how many run per step."""
  ms = lambda cycles: cycles / (ghz * 1e6)   # noqa: E731
  groups: dict[tuple[str, str], list[Op]] = {}
  for op in ops:
    groups.setdefault((re.sub(r"\.\d+$", "", op.name), op.kind), []).append(op)
  by_time = sorted(groups.items(), key=lambda g: -sum(o.total for o in g[1]))
  return dict(ms=ms(sum(o.total for o in ops)), xla_ms=ms(sum(o.total for o in ops if o.kind == "xla")),
              pallas_ms=ms(sum(o.total for o in ops if o.kind == "pallas")), clock_ghz=ghz,
              top=[dict(name=name, kind=kind, count=sum(o.count for o in group),
                        ms=ms(sum(o.total for o in group))) for (name, kind), group in by_time[:top]])
