"""Compiles the real train or eval step for a TPU topology on a machine without a TPU, and reports what
XLA's TPU compiler says about it: memory per chip against the chip's HBM, FLOPs and bytes accessed.

  python -m sparsifiner_jax.compile_for --config configs/deit_s_sparsifiner.py --topology v5e:2x4 \\
      --what eval|train [--phase distill] [--batch_per_chip 64] [--json out.json] [--config.x.y=v ...]

Needs ``libtpu`` (``pip install "libtpu==0.0.42.*"``), not a TPU. The step is the one training and
evaluation run (``train.step.make_train_step``, ``evaluation.evaluator.make_eval_step``), with the
configured mesh and shardings and the accelerator kernels ``auto`` picks on TPU. Unless ``--nocompare``,
the dense counterpart (the same config with ``model.keep_rate=None`` and no token sparsity) is compiled
too and the ratios printed. For the ``recon`` phase, which a dense model does not have, the dense figures
are its ``distill`` step.

Figures are per device (a chip; on v4, whose topologies compile each TensorCore as a device, half a
chip), from ``compiled.memory_analysis()`` and ``compiled.cost_analysis()``. XLA cannot
see inside a Pallas kernel: it counts what the kernel declares (``pl.CostEstimate``: its FLOPs, and at
least its operand and result bytes as HBM traffic).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from sparsifiner_jax import cli, config_check, errors, models, sharding
from sparsifiner_jax.attention import backend
from sparsifiner_jax.evaluation.evaluator import make_eval_step
from sparsifiner_jax.io import atomic, paths
from sparsifiner_jax.train.phases import TRAINABLE, resolve_phases
from sparsifiner_jax.train.step import make_train_step, state_layout

# HBM per chip (GiB) of each TPU family, by the name a topology starts with.
HBM_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
# What libtpu would read from a TPU VM's metadata server; given, it starts quietly on a machine without.
_ACCELERATOR_TYPE = {"v2": "v2-8", "v3": "v3-8", "v4": "v4-8", "v5e": "v5litepod-4",
                     "v5litepod": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}
WHAT = ("eval", "train")
GIB = 2 ** 30

_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x4, v4:2x2x2, v5p:2x2x4.")
_WHAT = flags.DEFINE_enum("what", "eval", WHAT, "Which step to compile.")
_PHASE = flags.DEFINE_string("phase", None, "train: the phase (default: the config's last phase).")
_BATCH = flags.DEFINE_integer("batch_per_chip", None, "Examples per chip (default: the config's "
                              "batch_size, or eval_batch_size, over the chips).", lower_bound=1)
_COMPARE = flags.DEFINE_bool("compare", True, "Also compile the dense counterpart and print ratios.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


class TopologyError(ValueError):
  """The topology is unknown, or libtpu (the TPU compiler) is missing."""


@dataclasses.dataclass(frozen=True)
class Figures:
  """One compiled program, per chip (bytes, FLOPs)."""
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


def hbm_bytes(topology: str, devices=None) -> int:
  """HBM per device of ``topology``: a chip's, or its share where the topology lists each TensorCore of a
  chip as a device (v4 compiles without megacore: two devices of 16 GiB per 32 GiB chip)."""
  cores = 1 + max((getattr(d, "core_on_chip", 0) for d in devices), default=0) if devices else 1
  return HBM_GIB[topology.split(":")[0]] * GIB // cores


def topology_devices(topology: str) -> list:
  """The devices of a TPU ``topology`` (``family:shape``), compile-only (no TPU is opened)."""
  family = topology.split(":")[0]
  if family not in HBM_GIB or ":" not in topology:
    raise TopologyError(f"unknown TPU topology {topology!r}; allowed: <family>:<chips per axis> with "
                        f"family one of {sorted(HBM_GIB)}, e.g. v5e:2x4 or v4:2x2x2")
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError("compiling for a TPU topology needs the TPU compiler: pip install "
                        "'libtpu==0.0.42.*'")
  for name, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),    # compile-only: no chip is claimed
                      ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_ACCELERATOR_TYPE", _ACCELERATOR_TYPE[family])):
    os.environ.setdefault(name, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top  # loads libtpu
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu's errors are RuntimeErrors
    raise TopologyError(f"topology {topology!r}: {errors.with_type(e)}") from None


def figures(compiled) -> Figures:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return Figures(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                 argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                 alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                 code_bytes=int(mem.generated_code_size_in_bytes))


def dense_counterpart(config):
  """``config`` with dense attention and no token sparsity (the same backbone, teacher and batch)."""
  dense = config.copy_and_resolve_references()
  with dense.unlocked():
    dense.model.keep_rate = None
    if "token_keep_rate" in dense.model:
      dense.model.token_keep_rate = None
    if "attention_pattern" in dense.model:
      dense.model.attention_pattern = "sparsifiner"
  return dense


def _phase(config, name: str | None):
  phases = resolve_phases(config, steps_per_epoch=1000)   # the length only shapes the LR schedule
  if not phases:
    raise config_check.ConfigError("config.phases: no phase has a positive length; nothing to compile")
  if name is None:
    return phases[-1]
  if name not in TRAINABLE:
    raise config_check.ConfigError(f"--phase={name!r} is not a phase; allowed: {list(TRAINABLE)}")
  found = [p for p in phases if p.name == name]
  if not found:
    raise config_check.ConfigError(f"--phase={name!r} has no steps in this config; its phases: "
                                   f"{[p.name for p in phases]}")
  return found[0]


def _teacher(config, phase, mesh):
  """``(graphdef, abstract cast params, shardings)`` of the teacher the phase needs, or Nones."""
  if not any(phase.weight(t) for t in config_check.TEACHER_TERMS):
    return None, None, None
  teacher = models.build_teacher(config)
  graphdef, params = nnx.split(teacher)
  params = models.cast_kernels(params, teacher.config.dtype)
  shardings = sharding.tree_shardings(mesh, params)
  return graphdef, sharding.abstract(params, shardings), shardings


def compile_step(config, devices, what: str, *, phase: str | None = None,
                 batch_per_chip: int | None = None):
  """Lowers and compiles ``what`` (``"eval"`` or ``"train"``) of ``config`` on a mesh of ``devices``
  for the TPU; returns ``(compiled, info)``, info naming the phase, batch and mesh."""
  mesh = sharding.make_mesh(config.get("mesh"), devices)
  chips = mesh.size
  batch = (batch_per_chip * chips if batch_per_chip is not None else
           int(config.batch_size if what == "train" else config.get("eval_batch_size", config.batch_size)))
  if batch % chips:
    raise config_check.ConfigError(f"the batch of {batch} does not divide over {chips} chips; allowed: "
                                   f"a multiple of {chips} (or --batch_per_chip)")
  size = config.model.img_size
  bs = sharding.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=bs)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs)
  model = models.build_model(config)
  graphdef, params, rest = models.split_params(model)
  params_sh = sharding.tree_shardings(mesh, params)
  rest_abs = sharding.abstract(rest, sharding.tree_shardings(mesh, rest))
  info: dict[str, Any] = dict(what=what, batch=batch, batch_per_chip=batch // chips, chips=chips,
                              mesh=dict(mesh.shape))
  if what == "eval":
    step = make_eval_step(graphdef, mesh)
    cast = sharding.abstract(models.cast_kernels(params, config.model.dtype), params_sh)
    args = (cast, rest_abs, images, labels, jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=bs))
  else:
    ph = _phase(config, phase)
    info["phase"] = ph.name
    tx, state, state_sh = state_layout(params, params_sh, ph, mesh, ema=config.get("ema_decay", 0.0) > 0)
    t_graphdef, t_params, t_sh = _teacher(config, ph, mesh)
    step = make_train_step(graphdef, rest, t_graphdef, ph, tx, config, mesh, state_sh, t_sh)
    args = (state, t_params, dict(image=images, label=labels))
  with backend.compiling_for("tpu"), jax.set_mesh(mesh):   # models are built (on the host) before
    lowered = step.lower(*args)
  return lowered.compile(), info


def compare(config, topology: str, what: str, *, phase: str | None = None,
            batch_per_chip: int | None = None, dense: bool = True) -> dict[str, Any]:
  """Compiles ``config`` (and its dense counterpart) for ``topology``; the report as a dict."""
  devices = topology_devices(topology)
  compiled, info = compile_step(config, devices, what, phase=phase, batch_per_chip=batch_per_chip)
  out = dict(topology=topology, hbm_bytes=hbm_bytes(topology, devices), **info,
             model=dataclasses.asdict(figures(compiled)))
  out["model"]["peak_bytes"] = figures(compiled).peak_bytes
  if dense:
    dense_phase = "distill" if info.get("phase") == "recon" else info.get("phase")
    compiled, dense_info = compile_step(dense_counterpart(config), devices, what, phase=dense_phase,
                                        batch_per_chip=info["batch_per_chip"])
    d = figures(compiled)
    out["dense"] = dict(dataclasses.asdict(d), peak_bytes=d.peak_bytes, phase=dense_info.get("phase"))
    out["ratios"] = {k: out["model"][k] / out["dense"][k] if out["dense"][k] else None
                     for k in ("flops", "bytes_accessed", "temp_bytes", "peak_bytes")}
  return out


def format_report(r: dict[str, Any]) -> str:
  """The report as a small table."""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  phase = f" ({r['phase']})" if r.get("phase") else ""
  lines = [f"{r['what']}{phase} on {r['topology']}: {r['chips']} devices of {r['hbm_bytes'] / GIB:.0f} GiB HBM, "
           f"batch {r['batch']} ({r['batch_per_chip']} per device), mesh {mesh}",
           f"{'per device':<12}{'peak GiB':>10}{'% HBM':>8}{'temp GiB':>10}{'FLOPs':>11}{'bytes':>11}"]
  rows = [("model", r["model"])] + ([("dense", r["dense"])] if "dense" in r else [])
  for name, f in rows:
    lines.append(f"{name:<12}{f['peak_bytes'] / GIB:>10.2f}{100 * f['peak_bytes'] / r['hbm_bytes']:>7.0f}%"
                 f"{f['temp_bytes'] / GIB:>10.2f}{f['flops']:>11.3g}{f['bytes_accessed']:>11.3g}")
  if "ratios" in r:
    q = r["ratios"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"   # noqa: E731
    lines.append(f"{'model/dense':<12}{fmt(q['peak_bytes']):>10}{'':>8}{fmt(q['temp_bytes']):>10}"
                 f"{fmt(q['flops']):>11}{fmt(q['bytes_accessed']):>11}")
  if r["model"]["peak_bytes"] > r["hbm_bytes"]:
    lines.append("does NOT fit: lower the batch per chip, raise grad_accum, or shard parameters (mesh fsdp)")
  return "\n".join(lines)


USER_ERRORS = cli.USER_ERRORS + (TopologyError,)


def main(argv) -> None:
  del argv
  if "JAX_PLATFORMS" not in os.environ:   # compile-only: never open a local accelerator
    jax.config.update("jax_platforms", "cpu")
  config = cli.load_config()
  if config is None or _TOPOLOGY.value is None:
    raise app.UsageError("--config and --topology are required")
  try:
    paths.require_local(_JSON.value, "--json")
    config_check.check_misc(config)
    config_check.check_model(config)
    report = compare(config, _TOPOLOGY.value, _WHAT.value, phase=_PHASE.value,
                     batch_per_chip=_BATCH.value, dense=_COMPARE.value)
    print(format_report(report))
    if _JSON.value:
      atomic.write_json(_JSON.value, report)
  except Exception as e:  # pylint: disable=broad-except
    if cli.debug_requested():
      raise
    sys.exit(errors.report(e, USER_ERRORS, prog="compile_for"))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
