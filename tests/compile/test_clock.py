"""``compile.clock``: time per step from libtpu's own output (XLA's estimated cycles, the Pallas kernels'
final bundles weighted by their loops), on small hand-made listings and on a real compile."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from sparsifiner_jax.compile import clock

ROOT = pathlib.Path(__file__).resolve().parents[2]

# A kernel listing in libtpu's format: 2 bundles before the grid loop, a 4-bundle loop body whose exit
# test says 5 trips (3 grid steps + 2 pipeline steps), a 3-bundle inner loop of 8 trips inside it (one
# level deeper: ``>>``), a 2-bundle inner loop with a dynamic trip count (its exit test compares with a
# register: counted once), and 1 bundle after.
BUNDLES = textwrap.dedent("""\
    = control target key start
    LB: loop body
    = control target key end

         0   :  { %s1 = smov 0 }
       0x1   :  { %s2 = smov 0 }
       0x2 LB: > { %s3 = sadd.s32 1, %s2 }
       0x3 LB: >> { %v1 = vadd.f32 %v0, %v0 }
       0x4   : >> { %p1 = scmp.ge.s32.totalorder %s9, 8 /* loop exit test */ }
       0x5   : >> { %10 = sbr.rel (!%p1) target = $region7 }
       0x6 LB: >> { %p3 = scmp.ge.s32.totalorder %s7, %s8  ;;  %v2 = vld [vmem:[%s4] sm:$0xf] }
       0x7   : >> { %13 = sbr.rel (!%p3) target = $region9 }
       0x8   : > { %p2 = scmp.ge.s32.totalorder %s3, 5 /* loop exit test */ }
       0x9   : > { %11 = sbr.rel (!%p2) target = $region3 }
       0xa   :  { %12 = vsyncpa [#allocation1], 1 }
    iteration_bounds: (3, 1, 1)
    """)


def test_static_cycles_weight_bundles_by_their_loops():
  # Outside: 0, 0x1, 0xa. Grid loop (0x2..0x9, 3 grid steps): 0x2, 0x6..0x9 once per step, the inner
  # loop (0x3..0x5) 8 times per step.
  assert clock.static_cycles(BUNDLES) == 3 + 3 * (5 + 3 * 8)


def test_static_cycles_find_the_grid_loop_without_iteration_bounds():
  """A kernel whose operands are all whole (no window) has no ``iteration_bounds`` line: its grid loop is
  the one whose first bundle carries the pipeline's ``iteration index``, counted at its trips less the
  two pipeline steps. Without the marker nothing says which loop is the grid: every loop at its trips."""
  no_bounds = BUNDLES.replace("iteration_bounds: (3, 1, 1)\n", "")
  marked = no_bounds.replace("%s2 }", "%s2 /* iteration index, stage = 0 */ }")
  assert "iteration index" in marked and "iteration_bounds" not in marked
  assert clock.static_cycles(marked) == 3 + 3 * (5 + 3 * 8)
  assert clock.static_cycles(no_bounds) == 3 + 5 * (5 + 3 * 8)


HLO = textwrap.dedent("""\
  HloModule jit_step, is_scheduled=true

  %body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
    %a = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused, backend_config={"estimated_cycles":"100"}
    %k = f32[8]{0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"kernel":"A"}
  }

  %cond (p: (s32[], f32[8])) -> pred[] {
    %c = pred[] compare(%i, %n), direction=LT, backend_config={"estimated_cycles":"2"}
  }

  ENTRY %main (x: f32[8]) -> f32[8] {
    %b = f32[8]{0} copy(%x), backend_config={"estimated_cycles":"30"}
    %k2 = f32[8]{0} custom-call(%b), custom_call_target="tpu_custom_call", backend_config={"kernel":"A"}
    %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  }
  """)


def test_program_ops_count_loops_and_share_identical_kernels(tmp_path):
  """XLA ops by their estimated cycles, a while body 4 times (its condition 5), and two calls of one
  kernel (libtpu dumps its bundles once, under one of the names) both at that kernel's cycles."""
  (tmp_path / "17-k2-03-final_bundles.txt").write_text(BUNDLES)
  files = clock.kernel_bundle_files(tmp_path, 0, 10 ** 20)
  ops = {op.name: op for op in clock.program_ops(HLO, files)}
  kernel = clock.static_cycles(BUNDLES)
  assert {n: (o.kind, o.cycles, o.count) for n, o in ops.items()} == {
      "b": ("xla", 30, 1), "k2": ("pallas", kernel, 1), "a": ("xla", 100, 4), "k": ("pallas", kernel, 4),
      "c": ("xla", 2, 5)}
  s = clock.summary(list(ops.values()), 1.5)
  assert s["ms"] == pytest.approx((30 + 400 + 10 + 5 * kernel) / 1.5e6)
  assert [(o["name"], o["count"]) for o in s["top"][:2]] == [("a", 4), ("k", 4)]   # 4 x 100, 4 x 84


def test_summary_groups_ops_by_name_stem():
  ops = [clock.Op("copy.5", "xla", 10), clock.Op("copy.8", "xla", 20), clock.Op("mask.12", "pallas", 5, 3)]
  top = clock.summary(ops, 1.0)["top"]
  assert [(o["name"], o["kind"], o["count"]) for o in top] == [("copy", "xla", 2), ("mask", "pallas", 3)]
  assert top[0]["ms"] == pytest.approx(30 / 1e6)


def test_a_kernel_without_bundles_is_one_clear_error():
  with pytest.raises(clock.ClockError, match="no final bundles of the Pallas kernel 'k'"):
    clock.program_ops(HLO, {})
  with pytest.raises(clock.ClockError, match="no clock rate known for 'h100'"):
    clock.clock_ghz("h100:8")


_COMPILE = """
import json, os, sys, tempfile
os.environ["JAX_PLATFORMS"] = "cpu"
from sparsifiner_jax.compile import clock
clock.enable(tempfile.mkdtemp())
from configs import tiny_test
from sparsifiner_jax import compile_for
from sparsifiner_jax.compile import targets
out = {}
for per_chip in (4, 16):
  p = compile_for.compile_step(tiny_test.get_config(), targets.devices("v5e:2x2"), "eval",
                               batch_per_chip=per_chip)
  out[per_chip] = dict(summary=clock.summary(p.ops, clock.clock_ghz("v5e")), text=p.compiled.as_text())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def real_compiles():
  """The tiny eval step compiled for v5e at 4 and 16 examples per chip, in a process whose libtpu
  writes its bundles (the flags must be set before libtpu starts)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return {int(k): v for k, v in json.loads(r.stdout.splitlines()[-1]).items()}


def test_real_compile_time_is_positive_and_reads_estimated_cycles(real_compiles):
  s, text = real_compiles[4]["summary"], real_compiles[4]["text"]
  assert 0 < s["ms"] < math.inf and s["pallas_ms"] > 0
  estimated = sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', text))
  assert s["xla_ms"] == pytest.approx(estimated / 1.5e6)   # no loops in the eval step


def test_kernel_time_grows_with_its_grid(real_compiles):
  """Four times the examples per chip: the kernels' grids (over the batch) are four times longer."""
  small, large = real_compiles[4]["summary"], real_compiles[16]["summary"]
  assert large["pallas_ms"] > 3 * small["pallas_ms"]
  assert large["ms"] > small["ms"]
