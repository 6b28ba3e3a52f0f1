"""What the compiler says about one compiled program, per device: memory, FLOPs and bytes accessed.

TPU: ``compiled.cost_analysis()``, which counts each Pallas (Mosaic) kernel as what it declares
(``pl.CostEstimate``). GPU: the compile-only executable has no cost analysis, so XLA's generic HLO
cost analysis is run over its optimised HLO through the CPU client. It counts a custom call as -1 FLOP
and nothing else, so two kinds are added: the Pallas (Triton) kernels' declared costs, read from the
traced program, and cuBLAS matrix products (where ``targets.compile_lowered`` fell back to them), from
their shapes: ``2 M N K`` FLOPs, operand and result bytes. Both platforms' figures are counts, not time:
a kernel bound by instruction issue or latency looks as cheap here as its declared FLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.extend.core as jex_core

_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Figures:
  """One compiled program, per device (bytes, FLOPs)."""
  flops: float
  bytes_accessed: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int

  @property
  def peak_bytes(self) -> int:
    """Arguments, outputs not aliased to (donated) arguments, temporaries and code: what must fit."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)


def declared_kernel_costs(jaxpr) -> dict[str, float]:
  """Sum of the ``pl.CostEstimate`` of every ``pallas_call`` in ``jaxpr`` (a ``ClosedJaxpr`` or ``Jaxpr``,
  nested jaxprs included; a ``scan`` body counts ``length`` times): ``flops``, ``bytes accessed``,
  ``transcendentals``, ``calls``. Calls inside ``shard_map`` count per device, as they run."""
  totals = {"flops": 0.0, "bytes accessed": 0.0, "transcendentals": 0.0, "calls": 0.0}
  _walk(jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr, 1, totals)
  return totals


def _walk(jaxpr, times: int, totals: dict) -> None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      cost = eqn.params.get("cost_estimate")
      totals["calls"] += times
      if cost is not None:
        totals["flops"] += times * cost.flops
        totals["transcendentals"] += times * cost.transcendentals
        totals["bytes accessed"] += times * cost.bytes_accessed
      continue
    inner = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      _walk(sub, inner, totals)


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """``"(f32[8,4]{1,0}, s8[64]{0})"`` -> ``[("f32", (8, 4)), ("s8", (64,))]``."""
  return [(dt, tuple(int(x) for x in dims.split(",") if x)) for dt, dims in _ARRAY.findall(shape)]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
  bits = int(re.sub(r"\D", "", dtype) or 8) if dtype != "pred" else 8
  return math.prod(dims) * max(bits // 8, 1)


def cublas_costs(hlo_text: str) -> dict[str, float]:
  """FLOPs (``2 M N K``, batch dimensions included) and bytes (operands and result, workspace excluded)
  of the cuBLAS matrix products in an optimised GPU HLO module's text."""
  shapes, total = {}, {"flops": 0.0, "bytes accessed": 0.0}
  for line in hlo_text.splitlines():
    m = _DEFINITION.match(line)
    if m:
      shapes[m[1]] = _arrays(m[2])
  for line in hlo_text.splitlines():
    if 'custom_call_target="__cublas$' not in line:
      continue
    result = _arrays(_DEFINITION.match(line)[2])[0]
    operands = re.search(r"custom-call\(([^)]*)\)", line)[1]
    operands = [shapes[name.strip().lstrip("%")][0] for name in operands.split(",") if name.strip()]
    numbers = json.loads(re.search(r"backend_config=(\{.*\})\s*$", line)[1])
    contracting = numbers["gemm_backend_config"]["dot_dimension_numbers"]["lhs_contracting_dimensions"]
    k = math.prod(operands[0][1][int(i)] for i in contracting)
    total["flops"] += 2 * math.prod(result[1]) * k
    total["bytes accessed"] += _nbytes(*result) + sum(_nbytes(*o) for o in operands)
  return total


def _gpu_cost(compiled, jaxpr) -> dict[str, float]:
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top  # XLA's HLO cost analysis
  executable = compiled._executable  # pylint: disable=protected-access
  module = executable.xla_extension_executable().hlo_modules()[0]
  xla = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  text = compiled.as_text()
  kernels, gemms = declared_kernel_costs(jaxpr), cublas_costs(text)
  return {k: xla.get(k, 0.0) + kernels[k] + gemms[k] for k in ("flops", "bytes accessed")}


def figures(compiled, jaxpr, platform: str) -> Figures:
  """The figures of ``compiled`` (traced as ``jaxpr``) for ``platform`` (``"tpu"`` or ``"gpu"``)."""
  if platform == "gpu":
    cost = _gpu_cost(compiled, jaxpr)
  else:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return Figures(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                 argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                 alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                 code_bytes=int(mem.generated_code_size_in_bytes))
