"""Compiles the real train or eval step for a TPU or GPU topology on a machine that has neither, and
reports what the compiler says about it: memory per device against the device's memory, FLOPs and bytes.

  python -m sparsifiner_jax.compile_for --config configs/deit_s_sparsifiner.py --topology v5e:2x4 \\
      --what eval|train [--phase distill] [--batch_per_chip 64] [--clock] [--json out.json] \\
      [--config.x.y=v ...]

Topologies (``compile.targets``): TPU ``v4:2x2x1``, ``v5e:2x4``, ``v5p:2x2x4``, ``v6e:2x2`` (needs
``libtpu``), GPU ``h100:8``, ``a100:4``, ``h100:8x2`` (needs ``requirements-gpu.txt``). The step is the one
training and evaluation run (``train.step.make_train_step``, ``evaluation.evaluator.make_eval_step``),
with the configured mesh and shardings and the Pallas kernels ``auto`` picks on that platform. Unless
``--nocompare``, the dense counterpart (the same config with ``model.keep_rate=None`` and no token
sparsity) is compiled too and the ratios printed. For the ``recon`` phase, which a dense model does not
have, the dense figures are its ``distill`` step.

Figures are per device (a GPU; a TPU chip, or on v4, whose topologies compile each TensorCore as a
device, half a chip): ``compile.cost``. With ``--clock`` (TPU) also an estimated time per step and the op
kinds that take it (``compile.clock``), and the dense counterpart is compiled with XLA's attention and
with the fused dense kernel, the faster being the baseline. XLA cannot see inside a Pallas kernel: it
counts what the kernel declares (``pl.CostEstimate``: its FLOPs, and at least its operand and result bytes
as HBM traffic).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from sparsifiner_jax import config_check, models, sharding
from sparsifiner_jax.cli import entry, errors
from sparsifiner_jax.attention import backend
from sparsifiner_jax.compile import clock, cost, targets
from sparsifiner_jax.evaluation.evaluator import make_eval_step
from sparsifiner_jax.io import atomic, paths
from sparsifiner_jax.train.phases import TEACHER_TERMS, TRAINABLE, resolve_phases
from sparsifiner_jax.train.step import make_train_step, state_layout

WHAT = ("eval", "train")
GIB = 2 ** 30



@dataclasses.dataclass(frozen=True)
class Flags:
  """The command's flags (:func:`define_flags`)."""
  common: entry.CommonFlags
  topology: flags.FlagHolder
  what: flags.FlagHolder
  phase: flags.FlagHolder
  batch_per_chip: flags.FlagHolder
  compare: flags.FlagHolder
  json: flags.FlagHolder
  clock: flags.FlagHolder


def define_flags() -> Flags:
  """Defines the command's flags in absl's global flags; :func:`run` calls it, so importing this module
  (tests, benchmarks) defines none."""
  return Flags(
      common=entry.define_common_flags(),
      topology=flags.DEFINE_string("topology", None, "TPU or GPU topology, e.g. v5e:2x4, v4:2x2x2, h100:8."),
      what=flags.DEFINE_enum("what", "eval", WHAT, "Which step to compile."),
      phase=flags.DEFINE_string("phase", None, "train: the phase (default: the config's last phase)."),
      batch_per_chip=flags.DEFINE_integer(
          "batch_per_chip", None, "Examples per device (default: the config's batch_size, or "
          "eval_batch_size, over the devices).", lower_bound=1),
      compare=flags.DEFINE_bool("compare", True, "Also compile the dense counterpart and print ratios."),
      json=flags.DEFINE_string("json", None, "Also write the figures to this JSON file."),
      clock=flags.DEFINE_bool("clock", False, "TPU: also estimate the time per step from the TPU "
                              "compiler's own output (compile.clock: XLA's estimated cycles, the "
                              "kernels' bundles)."))


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled step: the executable, its per-device figures, and what was compiled (``info``: step,
  phase, batch, mesh)."""
  compiled: Any
  figures: cost.Figures
  info: dict[str, Any]
  ops: list[clock.Op] | None = None    # the clock's ops, where libtpu writes its bundles (clock.enable)


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
  if not any(phase.weight(t) for t in TEACHER_TERMS):
    return None, None, None
  teacher = models.build_teacher(config)
  graphdef, params = nnx.split(teacher)
  params = models.cast_kernels(params, teacher.config.dtype)
  shardings = sharding.tree_shardings(mesh, params)
  return graphdef, sharding.abstract(params, shardings), shardings


def compile_step(config, devices, what: str, *, phase: str | None = None,
                 batch_per_chip: int | None = None) -> Program:
  """Lowers and compiles ``what`` (``"eval"`` or ``"train"``) of ``config`` on a mesh of ``devices``
  (compile-only TPU or GPU devices: ``compile.targets.devices``)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  chips = mesh.size
  batch = (batch_per_chip * chips if batch_per_chip is not None else
           int(config.batch_size if what == "train" else config.eval_batch_size))
  if batch % chips:
    raise config_check.ConfigError(f"the batch of {batch} does not divide over {chips} devices; allowed: "
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
    consts = jax.eval_shape(functools.partial(models.inference_constants, graphdef), cast, rest_abs)
    consts = sharding.abstract(consts, jax.tree.map(lambda _: sharding.replicated(mesh), consts))
    args = (cast, rest_abs, consts, images, labels, jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=bs))
  else:
    ph = _phase(config, phase)
    info["phase"] = ph.name
    tx, state, state_sh = state_layout(params, params_sh, ph, mesh, ema=config.ema_decay > 0)
    t_graphdef, t_params, t_sh = _teacher(config, ph, mesh)
    step = make_train_step(graphdef, rest, t_graphdef, ph, tx, config, mesh, state_sh, t_sh)
    args = (state, t_params, dict(image=images, label=labels))
  platform = targets.platform_of(devices)
  # Traced for the chip (its VMEM sizes some kernels' operands); the models were built on the host before.
  with backend.compiling_for(platform, device_kind=devices[0].device_kind), jax.set_mesh(mesh):
    traced = step.trace(*args)
    start = clock.now()
    compiled = targets.compile_lowered(traced.lower(), platform)
    end = clock.now()
  ops = None
  if platform == "tpu" and clock.dump_dir() is not None:
    ops = clock.program_ops(compiled.as_text(), clock.kernel_bundle_files(clock.dump_dir(), start, end))
  return Program(compiled, cost.figures(compiled, traced.jaxpr, platform), info, ops)


def compare(config, topology: str, what: str, *, phase: str | None = None,
            batch_per_chip: int | None = None, dense: bool = True) -> dict[str, Any]:
  """Compiles ``config`` (and its dense counterpart) for ``topology``; the report as a dict."""
  devices = targets.devices(topology)
  program = compile_step(config, devices, what, phase=phase, batch_per_chip=batch_per_chip)
  info = program.info
  out = dict(topology=topology, platform=targets.platform(topology),
             memory_bytes=targets.memory_bytes(topology, devices), **info,
             model=_figures(program, topology))
  if dense:
    dense_phase = "distill" if info.get("phase") == "recon" else info.get("phase")
    out["dense"] = _fastest_dense(config, devices, what, dense_phase, info["batch_per_chip"], topology,
                                  timed=program.ops is not None)
    out["ratios"] = {k: out["model"][k] / out["dense"][k] if out["dense"][k] else None
                     for k in ("flops", "bytes_accessed", "temp_bytes", "peak_bytes")}
    if "time" in out["model"]:
      out["ratios"]["time"] = out["model"]["time"]["ms"] / out["dense"]["time"]["ms"]
  return out


def _fastest_dense(config, devices, what, phase, batch_per_chip, topology, timed: bool) -> dict[str, Any]:
  """The dense counterpart's figures. With the clock, its attention both ways, XLA's (executor
  ``dense``) and the fused Pallas kernel (``fused``), and the faster kept (``attention`` says which;
  ``other_ms`` the slower's time); without it, as ``auto`` picks."""
  executors = ("dense", "fused") if timed else (None,)
  found = []
  for executor in executors:
    c = dense_counterpart(config)
    if executor:
      c.model.executor = executor
    d = compile_step(c, devices, what, phase=phase, batch_per_chip=batch_per_chip)
    found.append(dict(_figures(d, topology), phase=d.info.get("phase"),
                      attention={"dense": "xla", "fused": "pallas", None: "auto"}[executor]))
  found.sort(key=lambda f: f["time"]["ms"] if timed else 0.0)
  if len(found) > 1:
    found[0]["other_ms"] = found[1]["time"]["ms"]
  return found[0]


def _figures(program: Program, topology: str) -> dict[str, Any]:
  """A program's figures for the report: counts, peak memory, and the clock's time where it ran."""
  out = dict(dataclasses.asdict(program.figures), peak_bytes=program.figures.peak_bytes)
  if program.ops is not None:
    out["time"] = clock.summary(program.ops, clock.clock_ghz(topology))
  return out


def format_report(r: dict[str, Any]) -> str:
  """The report as a small table."""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  phase = f" ({r['phase']})" if r.get("phase") else ""
  memory = "HBM" if r["platform"] == "tpu" else "memory"
  lines = [f"{r['what']}{phase} on {r['topology']}: {r['chips']} devices of "
           f"{r['memory_bytes'] / GIB:.0f} GiB {memory}, batch {r['batch']} "
           f"({r['batch_per_chip']} per device), mesh {mesh}",
           f"{'per device':<12}{'peak GiB':>10}{'% mem':>8}{'temp GiB':>10}{'FLOPs':>11}{'bytes':>11}"]
  rows = [("model", r["model"])] + ([("dense", r["dense"])] if "dense" in r else [])
  for name, f in rows:
    lines.append(f"{name:<12}{f['peak_bytes'] / GIB:>10.2f}{100 * f['peak_bytes'] / r['memory_bytes']:>7.0f}%"
                 f"{f['temp_bytes'] / GIB:>10.2f}{f['flops']:>11.3g}{f['bytes_accessed']:>11.3g}")
  if "ratios" in r:
    q = r["ratios"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"   # noqa: E731
    lines.append(f"{'model/dense':<12}{fmt(q['peak_bytes']):>10}{'':>8}{fmt(q['temp_bytes']):>10}"
                 f"{fmt(q['flops']):>11}{fmt(q['bytes_accessed']):>11}")
  if "time" in r["model"]:
    t = r["model"]["time"]
    dense_ms = (f" vs dense {r['dense']['time']['ms']:.3g} ms ({r['dense']['attention']} attention, the "
                f"faster; the other {r['dense']['other_ms']:.3g} ms): {r['ratios']['time']:.2f}x"
                if "dense" in r else "")
    lines.append(f"estimated time per step {t['ms']:.3g} ms{dense_ms} (XLA ops {t['xla_ms']:.3g} ms, "
                 f"Pallas kernels {t['pallas_ms']:.3g} ms, at {t['clock_ghz']} GHz); top ops:")
    lines += [f"  {o['ms']:9.3g} ms  {o['kind']:<6} {o['name']} (x{o['count']})" for o in t["top"]]
  over = r["model"]["peak_bytes"] - r["memory_bytes"]
  if over > 0:
    lines.append(f"does NOT fit: {over / GIB:.2f} GiB over per device; lower the batch per device, raise "
                 f"grad_accum, or shard parameters (mesh fsdp)")
  return "\n".join(lines)


USER_ERRORS = entry.USER_ERRORS + (targets.TopologyError, clock.ClockError)


def main(argv, f: Flags) -> None:
  """Compiles and reports as ``f`` says; user mistakes are one line and exit code 2."""
  del argv
  if "JAX_PLATFORMS" not in os.environ:   # compile-only: never open a local accelerator (and the GPU
    jax.config.update("jax_platforms", "cpu")   # compile-only topology needs the CPU platform)
  config = entry.load_config(f.common)
  if config is None or f.topology.value is None:
    raise app.UsageError("--config and --topology are required")
  dump = None
  try:
    if f.clock.value:   # before libtpu starts: it reads its dump flags once
      clock.clock_ghz(f.topology.value)
      dump = tempfile.mkdtemp(prefix="sparsifiner_clock_")
      clock.enable(dump)
    paths.require_local(f.json.value, "--json")
    config_check.validate(config, "compile")
    report = compare(config, f.topology.value, f.what.value, phase=f.phase.value,
                     batch_per_chip=f.batch_per_chip.value, dense=f.compare.value)
    print(format_report(report))
    if f.json.value:
      atomic.write_json(f.json.value, report)
  except Exception as e:  # pylint: disable=broad-except
    if f.common.debug.value:
      raise
    sys.exit(errors.report(e, USER_ERRORS, prog="compile_for"))
  finally:
    if dump:
      shutil.rmtree(dump, ignore_errors=True)


def run() -> None:
  """``python -m sparsifiner_jax.compile_for``: defines the flags, then parses them and runs :func:`main`."""
  f = define_flags()
  app.run(functools.partial(main, f=f), flags_parser=entry.parse_flags)


if __name__ == "__main__":
  run()
