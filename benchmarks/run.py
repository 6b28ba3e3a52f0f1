"""Benchmarks: throughput ratios of our JAX models against dense, timm and PyTorch, measured in one process.

  python benchmarks/run.py                                   # DeiT-S, batch 1 and 8, cases a-e
  python benchmarks/run.py --img-size 448 --cases b          # (b) at 448 px (785 tokens)
  python benchmarks/run.py --cases masked gather             # the attention executors vs dense
  python benchmarks/run.py --append benchmarks/results/HISTORY.md            # also append a dated section
  python benchmarks/run.py --dtype bfloat16                  # bf16 matmuls; torch under autocast

Cases (``--cases``, default ``a b c d e``); "ours" is ``sparsifiner_jax``, jitted, in ``--dtype``
(``float32``, or ``bfloat16``: the models' mixed precision -- bf16 matmul inputs, float32 products and
everything else, ``vit.py`` -- with eval forwards on kernels cast to bf16 once, ``models.cast_kernels``; the
torch sides then run under ``torch.autocast("cpu", torch.bfloat16)``, timm's ``--amp`` mode):

* ``a``  our dense eval forward vs timm's eager forward (``torch.inference_mode``);
* ``b``  our Sparsifiner eval forward at ``--keep-rate`` (``--executor``) vs our dense forward;
* ``c``  the same plus token sparsity (``--token-keep-rate`` at ``--token-layers``, sequence dropping)
  vs our dense forward;
* ``d``  a phase-2 ("distill") training step -- the trainer's own jitted step
  (``train.step.make_train_step``: student fwd/bwd at ``--keep-rate``, dense teacher fwd, losses
  cls 1.0 + kd 0.5 + tok 0.5, AdamW; plus its grad-norm and finite checks) vs a PyTorch step of the same
  shapes and losses on timm's ViT with Sparsifiner attention (``benchmarks/torch_reference.py``),
  ``torch.optim.AdamW``. Both sides: label-smoothed one-hot targets (0.1), no mixup/cutmix (data-side in
  the official code) and no EMA; predictors frozen, as in phase 2;
* ``e``  achieved GFLOP/s of our dense forward (XLA's ``cost_analysis()`` FLOPs / time) vs the
  peak: a jitted N x N matmul in ``--dtype`` (N = ``--matmul-size``, 2048; 2 N^3 FLOPs) timed in the same
  rounds (the achievable peak), and, on CPU in float32, the theoretical peak
  ``logical CPUs x clock x SIMD fp32 lanes x 2 (FMA) x 2 FMA units`` from ``/proc/cpuinfo`` (clock from
  the model name's "@ x GHz", else "cpu MHz", no turbo; the 2 FMA units per core are an assumption, and
  hyperthreads share them);
* ``masked``, ``gather``  our Sparsifiner forward with that executor vs our dense forward.

Method: every side is compiled (jitted, or warmed up twice for torch) first; then, per batch size, all
sides of the selected cases run in ``--rounds`` rounds, each taking the median of ``--reps`` calls, in an
order that reverses every round (machine noise hits both sides of a comparison alike). A comparison's
ratio is computed per round and reported as median (min-max over rounds). Ratios are speed ratios:
images/s (or GFLOP/s) of the first side over the second, so > 1 means the first side is faster.
Run it on an otherwise idle machine: torch's OpenMP threads busy-wait, and on an oversubscribed CPU the
torch sides slow down far more than the JAX ones.

Output: a Markdown section on stdout (and appended to ``--append``), JSON to ``--json`` (default
``benchmarks/results/<date>_<model>_<img>px.json``) with every side's rows and every comparison.

Peak memory: JAX sides report ``argument + output + temp - alias`` bytes of the compiled executable
(``compiled.memory_analysis()``: parameters, inputs, optimizer state, outputs and XLA's temporary
buffers; donated buffers are counted once). Torch sides report the peak of live tensor storages during
one call, tracked at op boundaries (``torch_reference.LiveTensorBytes``), counting parameters, buffers,
inputs and optimizer state from the start; allocator caches and oneDNN scratch are not included.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_REPO, os.path.dirname(os.path.abspath(__file__))):
  if _p not in sys.path:
    sys.path.insert(0, _p)

from sparsifiner_jax.evaluation import flops as flops_lib  # noqa: E402
from sparsifiner_jax import models, sharding  # noqa: E402
from sparsifiner_jax.train import phases  # noqa: E402
from sparsifiner_jax.train.step import make_train_step  # noqa: E402

CASES = ("a", "b", "c", "d", "e", "masked", "gather")
DEFAULT_CASES = ("a", "b", "c", "d", "e")
MIB = 2 ** 20

FLOPS_DEFINITION = ("GFLOP/s: XLA's cost analysis of the compiled program per second. Programs that call "
                    "the CPU kernels (custom calls, 0 FLOPs to XLA): eval forwards count 2 x the analytic "
                    "MACs (`flops.count`; sparse work for the auto/gather executors, masked-dense work "
                    "for masked), train steps are not counted ('-').")
MEMORY_DEFINITIONS = {
    "xla": "compiled.memory_analysis(): argument + output + temp - alias bytes (params, inputs, optimizer "
           "state, outputs, XLA temporaries; donated buffers once)",
    "torch_live": "peak of live tensor storages during one call, tracked at op boundaries with a "
                  "TorchDispatchMode; params, buffers, inputs and optimizer state counted from the start; "
                  "allocator caches and oneDNN scratch not included",
}


@dataclasses.dataclass
class Side:
  """One thing that is timed: ``call()`` runs it once and blocks until the result is ready."""

  name: str
  impl: str                  # "jax" | "torch"
  kind: str                  # "eval forward" | "train step" | "matmul"
  call: Callable[[], object]
  batch: int | None          # images per call (None for the matmul)
  flops: float | None        # XLA's FLOPs per call (None: not counted, see _flops)
  peak_bytes: int | None
  memory: str | None         # key of MEMORY_DEFINITIONS


@dataclasses.dataclass(frozen=True)
class Comparison:
  """``numerator`` / ``denominator`` of ``metric`` ("img/s" or "GFLOP/s"), per round."""

  ids: str
  numerator: str
  denominator: str
  metric: str
  meaning: str


# --------------------------------------------------------------------------------------------------
# JAX sides.


def _memory_bytes(compiled) -> int | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _calls_kernels(compiled) -> bool:
  """Whether the program calls the CPU kernels: XLA's cost analysis counts their custom calls as 0 FLOPs."""
  return 'custom_call_target="sparsifiner_' in compiled.as_text()


def _flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program (callers check ``_calls_kernels`` first)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def jax_forward(name: str, model_name: str, batch: int, **kw) -> Side:
  """Our eval forward (logits only), compiled ahead of time; ``kw`` go to ``models.create``."""
  model = models.create(model_name, rngs=nnx.Rngs(0), **kw)
  graphdef, state = nnx.split(model)
  cfg = model.config
  state = models.cast_kernels(state, cfg.dtype)
  x = jax.random.normal(jax.random.key(0), (batch, cfg.img_size, cfg.img_size, cfg.in_chans))
  compiled = jax.jit(lambda s, im: nnx.merge(graphdef, s)(im)[0]).lower(state, x).compile()
  compiled(state, x).block_until_ready()
  if _calls_kernels(compiled):   # the analytic count of the work the executor does (FLOPS_DEFINITION)
    sparse = cfg.executor in ("auto", "gather")
    flops = 2.0 * flops_lib.count(cfg, sparse_kernels=sparse).totals["total"] * batch
  else:
    flops = _flops(compiled)
  return Side(name, "jax", "eval forward", lambda: compiled(state, x).block_until_ready(), batch,
              flops, _memory_bytes(compiled), "xla")


def jax_matmul(n: int, dtype: str) -> Side:
  """An n x n matmul with inputs in ``dtype`` and a float32 result (the models' matmul precision)."""
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
  mm = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)  # noqa: E731
  compiled = jax.jit(mm).lower(a, b).compile()
  compiled(a, b).block_until_ready()
  return Side(f"matmul {n}", "jax", "matmul", lambda: compiled(a, b).block_until_ready(), None,
              2.0 * n ** 3, _memory_bytes(compiled), "xla")


def distill_phase(model_name: str, cfg, batch: int, executor: str):
  """Trainer config and ``Phase`` of a phase-2 step: ``configs/common.py`` defaults, no mixup, no EMA."""
  from configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.model_name = model_name
  c.model.img_size = cfg.img_size
  c.model.num_classes = cfg.num_classes
  c.model.keep_rate = float(cfg.keep_rate)
  c.model.executor = executor
  c.model.dtype = cfg.dtype
  c.batch_size = batch
  c.mixup.prob = 0.0
  c.ema_decay = 0.0
  for name in phases.PHASES:
    c.phases[name].epochs, c.phases[name].steps = 0.0, 0
  c.phases.distill.steps = 10 ** 6
  (phase,) = phases.resolve_phases(c, steps_per_epoch=1)
  return c, phase


def jax_train_step(c, phase, cfg, batch: int) -> Side:
  """The trainer's jitted step for config ``c``, built from the same pieces as ``trainer.train``."""
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])
  graphdef, params, rest = models.split_params(models.build_model(c))
  teacher = models.build_teacher(c)
  teacher_graphdef, teacher_params = nnx.split(teacher)
  teacher_sh = sharding.tree_shardings(mesh, teacher_params)
  tx = phases.make_optimizer(phase, phases.trainable_of(params, phase))
  opt = tx.init(phases.trainable_of(params, phase))
  shard = dict(step=sharding.replicated(mesh), params=sharding.tree_shardings(mesh, params),
               opt=sharding.tree_shardings(mesh, opt), ema=None)
  state = jax.device_put(dict(step=jnp.int32(0), params=params, opt=opt, ema=None), shard)
  teacher_params = jax.device_put(teacher_params, teacher_sh)
  images = jax.random.normal(jax.random.key(0), (batch, cfg.img_size, cfg.img_size, cfg.in_chans))
  labels = jax.random.randint(jax.random.key(1), (batch,), 0, cfg.num_classes)
  data = jax.device_put(dict(image=images, label=labels), sharding.batch_sharding(mesh))
  step_fn = make_train_step(graphdef, rest, teacher_graphdef, phase, tx, c, mesh, shard,
                                    teacher_sh)
  compiled = step_fn.lower(state, teacher_params, data).compile()
  holder = [state]

  def call():
    holder[0], metrics = compiled(holder[0], teacher_params, data)
    return jax.block_until_ready(metrics["loss"])

  call()
  flops = None if _calls_kernels(compiled) else _flops(compiled)   # no analytic count of a step
  return Side("train step (ours)", "jax", "train step", call, batch, flops,
              _memory_bytes(compiled), "xla")


# --------------------------------------------------------------------------------------------------
# Torch sides.


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  return torch, torch_reference


def torch_forward(model_name: str, cfg, batch: int, compile_: bool) -> Side:
  """timm's eval forward under ``torch.inference_mode`` (memory measured on the eager module), under
  ``torch.autocast`` when ``cfg.dtype`` is bfloat16."""
  torch, tr = _torch()
  model = tr.create_timm(model_name, cfg)
  x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
  amp = tr.autocast(cfg.dtype)
  with torch.inference_mode(), amp:
    model(x)
    peak = tr.peak_bytes(lambda: model(x), [*model.parameters(), *model.buffers(), x])
  run_model = torch.compile(model) if compile_ else model

  def call():
    with torch.inference_mode(), amp:
      return run_model(x)

  call()
  call()
  return Side("timm", "torch", "eval forward", call, batch, None, peak, "torch_live")


def torch_train_step(model_name: str, cfg, batch: int, phase, label_smoothing: float,
                     compile_: bool) -> Side:
  """PyTorch phase-2 step on timm's ViT with Sparsifiner attention (``torch_reference.TrainStep``).

  Memory is measured on the eager step, before any ``torch.compile``.
  """
  torch, tr = _torch()
  student = tr.sparsifiner_student(model_name, cfg)
  teacher = tr.create_timm(model_name, dataclasses.replace(cfg, keep_rate=None))
  step = tr.TrainStep(student, teacher, lr=phase.lr, weight_decay=phase.weight_decay,
                      loss_weights=dict(phase.loss_weights), num_classes=cfg.num_classes,
                      label_smoothing=label_smoothing, dtype=cfg.dtype)
  x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
  y = torch.randint(0, cfg.num_classes, (batch,))
  step(x, y)
  peak = tr.peak_bytes(lambda: step(x, y), [*step.resident_tensors(), x, y])
  if compile_:
    student.forward_features = torch.compile(student.forward_features)
  step(x, y)
  step(x, y)
  return Side("train step (torch)", "torch", "train step", lambda: step(x, y), batch, None, peak,
              "torch_live")


# --------------------------------------------------------------------------------------------------
# Building the cases of one batch size.


def build(args, batch: int) -> tuple[dict[str, Side], list[Comparison]]:
  """The sides and comparisons of the selected cases at one batch size (each side built once)."""
  cases = set(args.cases)
  img = dict(img_size=args.img_size) if args.img_size else {}
  img["dtype"] = args.dtype
  base = models.get_config(args.model, **img)
  k = args.keep_rate
  sides: dict[str, Side] = {}
  comps: list[Comparison] = []

  def side(name, make):
    if name not in sides:
      t = time.perf_counter()
      sides[name] = dataclasses.replace(make(), name=name)
      _log(f"batch {batch}: built {name} in {time.perf_counter() - t:.1f} s")
    return name

  def dense():
    return side("dense", lambda: jax_forward("dense", args.model, batch, **img))

  def sparsifiner(executor, token_keep=None):
    tok = dict(token_keep_rate=token_keep, token_pruning_layers=tuple(args.token_layers)) \
        if token_keep else {}
    name = f"sparsifiner@{k}" + (f"+tok{token_keep}" if token_keep else "") + f"/{executor}"
    return side(name, lambda: jax_forward(name, args.model, batch, keep_rate=k,
                                          executor=executor, **tok, **img))

  if "a" in cases:
    timm = side("timm compiled" if args.torch_compile else "timm eager",
                lambda: torch_forward(args.model, base, batch, args.torch_compile))
    comps.append(Comparison("a", dense(), timm, "img/s", "ours dense / timm forward (>1: ours faster)"))
  if "b" in cases:
    comps.append(Comparison("b", sparsifiner(args.executor), dense(), "img/s",
                            f"Sparsifiner keep {k} / dense (>1: sparse faster)"))
  if "c" in cases:
    comps.append(Comparison("c", sparsifiner(args.executor, args.token_keep_rate), dense(), "img/s",
                            f"keep {k} + token keep {args.token_keep_rate} at layers "
                            f"{tuple(args.token_layers)} / dense (>1: sparse faster)"))
  for ex in ("masked", "gather"):
    if ex in cases:
      comps.append(Comparison(ex, sparsifiner(ex), dense(), "img/s",
                              f"Sparsifiner keep {k}, {ex} executor / dense (>1: sparse faster)"))
  if "d" in cases:
    student_cfg = dataclasses.replace(base, keep_rate=k, executor=args.executor)
    config, phase = distill_phase(args.model, student_cfg, batch, args.executor)
    ours = side("train step (ours)", lambda: jax_train_step(config, phase, student_cfg, batch))
    theirs = side("train step (torch)",
                  lambda: torch_train_step(args.model, student_cfg, batch, phase,
                                           float(config.mixup.label_smoothing), args.torch_compile))
    comps.append(Comparison("d", ours, theirs, "img/s",
                            "ours / PyTorch phase-2 training step (>1: ours faster)"))
  if "e" in cases:
    mm = side(f"matmul {args.matmul_size}", lambda: jax_matmul(args.matmul_size, args.dtype))
    comps.append(Comparison("e", dense(), mm, "GFLOP/s",
                            "dense forward GFLOP/s / measured matmul GFLOP/s (fraction of peak)"))
  return sides, _dedupe(comps)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _dedupe(comps: list[Comparison]) -> list[Comparison]:
  """One comparison per (numerator, denominator); the case ids that asked for it are joined."""
  out: dict[tuple[str, str], Comparison] = {}
  for c in comps:
    key = (c.numerator, c.denominator)
    out[key] = dataclasses.replace(out[key], ids=f"{out[key].ids},{c.ids}") if key in out else c
  return list(out.values())


# --------------------------------------------------------------------------------------------------
# Timing.


def _time(call, reps: int) -> float:
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    call()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def measure(sides: dict[str, Side], rounds: int, reps: int) -> dict[str, np.ndarray]:
  """Seconds per call of every side in every round; the order reverses each round."""
  names = list(sides)
  secs = {n: [] for n in names}
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      secs[n].append(_time(sides[n].call, reps))
  return {n: np.asarray(s) for n, s in secs.items()}


def _rate(side: Side, secs: np.ndarray, metric: str) -> np.ndarray:
  if metric == "img/s":
    return side.batch / secs
  return side.flops / secs / 1e9


def _stats(x: np.ndarray) -> dict:
  return dict(median=float(np.median(x)), min=float(np.min(x)), max=float(np.max(x)))


def side_row(args, batch: int, side: Side, secs: np.ndarray) -> dict:
  row = dict(model=args.model, img_size=args.img_size_resolved, batch=batch, case=side.name,
             impl=side.impl, kind=side.kind, sec_per_call=_stats(secs),
             img_per_s=_stats(side.batch / secs) if side.batch else None,
             gflop_per_call=None if side.flops is None else side.flops / 1e9,
             gflop_per_s=None if side.flops is None else _stats(side.flops / secs / 1e9),
             peak_mem_bytes=side.peak_bytes, peak_mem_definition=side.memory)
  if side.flops is not None and side.batch:
    row["gflop_per_img"] = side.flops / side.batch / 1e9
  return row


def comparison_rows(batch: int, sides, comps, secs, peak: dict) -> list[dict]:
  rows = []
  for c in comps:
    num, den = sides[c.numerator], sides[c.denominator]
    ratio = _rate(num, secs[c.numerator], c.metric) / _rate(den, secs[c.denominator], c.metric)
    rows.append(dict(id=c.ids, batch=batch, numerator=c.numerator, denominator=c.denominator,
                     metric=c.metric, ratio=_stats(ratio), meaning=c.meaning))
    if c.metric == "GFLOP/s" and peak.get("theoretical_gflops"):
      achieved = _rate(num, secs[c.numerator], c.metric) / peak["theoretical_gflops"]
      rows.append(dict(id=c.ids, batch=batch, numerator=c.numerator,
                       denominator="theoretical fp32 peak", metric=c.metric, ratio=_stats(achieved),
                       meaning="dense forward GFLOP/s / theoretical peak (" + peak["theoretical_formula"]
                       + ")"))
  return rows


# --------------------------------------------------------------------------------------------------
# Device and peak.


def _cpuinfo() -> dict[str, str]:
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return {}
  info = {}
  for line in text.split("\n\n")[0].splitlines():
    key, _, value = line.partition(":")
    info[key.strip()] = value.strip()
  return info


def logical_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_peak() -> dict:
  """Theoretical fp32 peak from /proc/cpuinfo: CPUs x GHz x SIMD lanes x 2 (FMA) x 2 FMA units."""
  info = _cpuinfo()
  flags = set(info.get("flags", "").split())
  m = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
  ghz, source = (float(m.group(1)), "model name") if m else (
      (float(info["cpu MHz"]) / 1e3, "cpu MHz") if "cpu MHz" in info else (None, None))
  lanes = 16 if "avx512f" in flags else 8 if "avx" in flags else 4 if "sse" in flags else None
  if ghz is None or lanes is None:
    return dict(theoretical_gflops=None, theoretical_formula="clock or SIMD width not in /proc/cpuinfo")
  fma = 2 if "fma" in flags else 1
  units = 2
  cpus = logical_cpus()
  gflops = cpus * ghz * lanes * fma * units
  isa = "AVX-512" if lanes == 16 else "AVX/AVX2" if lanes == 8 else "SSE"
  formula = (f"{cpus} logical CPUs x {ghz:.2f} GHz ({source}) x {lanes} fp32 lanes ({isa}) x "
             f"{fma} (FMA) x {units} FMA units/core (assumed)")
  return dict(theoretical_gflops=gflops, theoretical_formula=formula)


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    cpu = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    return f"cpu: {cpu}, {logical_cpus()} CPUs ({platform.machine()})"
  return f"{d.platform}: {d.device_kind} (torch sides on CPU)"


def versions(torch_threads: int) -> dict:
  out = dict(jax=jax.__version__, python=platform.python_version())
  if "torch" in sys.modules:
    import torch  # pylint: disable=g-import-not-at-top
    out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if "timm" in sys.modules:
      out["timm"] = sys.modules["timm"].__version__
  else:
    out["torch_threads"] = torch_threads
  return out


# --------------------------------------------------------------------------------------------------
# Output.


def _fmt(s: dict | None, digits: int = 2) -> str:
  if not s:
    return "-"
  return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def to_markdown(result: dict) -> str:
  """A dated section: header, side table, comparison table, peak and definitions."""
  lines = [f"## {result['date']}, {result['device']}: {result['model']} at {result['img_size']} px, "
           f"{result['dtype']}",
           "", f"`{result['command']}` -- {result['rounds']} rounds x {result['reps']} reps; "
           + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
           "| model | batch | case | impl | what | img/s (median, min-max) | GFLOP/s | peak memory MiB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / MIB:.1f}"
    lines.append(f"| {r['model']} | {r['batch']} | {r['case']} | {r['impl']} | {r['kind']} | "
                 f"{_fmt(r['img_per_s'])} | {_fmt(r['gflop_per_s'], 1)} | {mem} |")
  lines += ["", "| case | batch | ratio | median (min-max) | meaning |", "|---|---|---|---|---|"]
  for c in result["comparisons"]:
    lines.append(f"| {c['id']} | {c['batch']} | {c['numerator']} / {c['denominator']} ({c['metric']}) | "
                 f"{_fmt(c['ratio'], 3)} | {c['meaning']} |")
  peak = result["peak"]
  lines += [""]
  if peak.get("matmul_gflops_best"):
    lines.append(f"Peak: {peak['matmul']} best round {peak['matmul_gflops_best']:.1f} GFLOP/s "
                 "(the achievable peak used in case e).")
  if peak.get("theoretical_gflops") and "e" in result["cases"]:
    lines.append(f"Theoretical: {peak['theoretical_gflops']:.1f} GFLOP/s = "
                 f"{peak['theoretical_formula']}.")
  lines += [FLOPS_DEFINITION,
            f"Peak memory: jax = {MEMORY_DEFINITIONS['xla']}; torch = {MEMORY_DEFINITIONS['torch_live']}.",
            "Ratios: per-round speed ratio of the two sides (img/s or GFLOP/s), > 1 = first side faster."]
  return "\n".join(lines)


def default_json_path(model: str, img_size: int, dtype: str = "float32") -> str:
  date = datetime.date.today().isoformat()
  suffix = "" if dtype == "float32" else f"_{dtype}"
  return os.path.join(_REPO, "benchmarks", "results", f"{date}_{model}_{img_size}px{suffix}.json")


# --------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="deit_small_patch16_224")
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES),
                  help="comparisons to run (default: a b c d e)")
  ap.add_argument("--img-size", type=int, default=None, help="default: the model's (224 for DeiT-S)")
  ap.add_argument("--keep-rate", type=float, default=0.25)
  ap.add_argument("--executor", default="auto", help="executor of cases b, c, d")
  ap.add_argument("--token-keep-rate", type=float, default=0.7)
  ap.add_argument("--token-layers", type=int, nargs="+", default=[3, 6, 9])
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="compute dtype of our models (bf16 matmuls) and torch autocast")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--matmul-size", type=int, default=2048, help="side of the peak matmul (case e)")
  ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
  ap.add_argument("--torch-compile", action="store_true", help="torch.compile the torch sides")
  ap.add_argument("--json", help="output JSON (default: benchmarks/results/<date>_<model>_<img>px.json)")
  ap.add_argument("--append", help="Markdown file to append the dated section to "
                  "(make bench: benchmarks/results/HISTORY.md)")
  args = ap.parse_args(argv)
  args.img_size_resolved = args.img_size or models.get_config(args.model).img_size
  return args


def run(args) -> dict:
  """Builds and times every batch size's sides; returns the JSON-able result."""
  if {"a", "d"} & set(args.cases):
    torch, _ = _torch()
    torch.set_num_threads(args.torch_threads)
  rows, comparisons, matmul = [], [], []
  on_cpu = jax.devices()[0].platform == "cpu" and args.dtype == "float32"   # theoretical: fp32 only
  peak = cpu_peak() if on_cpu else dict(theoretical_gflops=None)
  for b in args.batch:
    sides, comps = build(args, b)
    secs = measure(sides, args.rounds, args.reps)
    rows += [side_row(args, b, sides[n], secs[n]) for n in sides]
    comparisons += comparison_rows(b, sides, comps, secs, peak)
    matmul += [float(np.max(_rate(s, secs[n], "GFLOP/s"))) for n, s in sides.items()
               if s.kind == "matmul"]
  if matmul:
    peak.update(matmul=f"jitted {args.matmul_size}x{args.matmul_size} {args.dtype} matmul (f32 result)",
                matmul_gflops_best=max(matmul))
  return dict(date=datetime.date.today().isoformat(), device=device_name(),
              command=" ".join(["python benchmarks/run.py", *args.argv]), model=args.model,
              img_size=args.img_size_resolved, dtype=args.dtype, batches=list(args.batch),
              cases=list(args.cases),
              keep_rate=args.keep_rate, executor=args.executor, token_keep_rate=args.token_keep_rate,
              token_layers=list(args.token_layers), rounds=args.rounds, reps=args.reps,
              versions=versions(args.torch_threads), peak=peak,
              definitions=dict(peak_memory=MEMORY_DEFINITIONS,
                               ratio="per-round speed ratio numerator/denominator (img/s or GFLOP/s); "
                                     "median and min-max over rounds; > 1: numerator faster",
                               img_per_s="batch / median seconds of --reps calls, per round"),
              rows=rows, comparisons=comparisons)


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  args.argv = argv
  result = run(args)
  table = to_markdown(result)
  print(table)
  path = args.json or default_json_path(args.model, args.img_size_resolved, args.dtype)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {path}")
  if args.append:
    with open(args.append, "a") as f:
      f.write("\n" + table + "\n")
  return result


if __name__ == "__main__":
  main()
