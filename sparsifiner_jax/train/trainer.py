"""The training loop: phases in order, checkpoints, evaluation, preemption, resume.

Phases (``train.phases``) run in order: ``train -> recon -> distill -> joint``. The model is split once
into ``graphdef`` and parameter groups (``models.split_params``); each phase jits its own step
(``train.step``). The data stream is a pure function of (seed, step), so a resumed run is identical to
an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from sparsifiner_jax import config_check, models, sharding
from sparsifiner_jax.evaluation.evaluator import Evaluator
from sparsifiner_jax.io import paths, weights
from sparsifiner_jax.io.checkpoint import Checkpointer
from sparsifiner_jax.train.metrics import MetricWriter
from sparsifiner_jax.train.phases import LOSS_TERMS, Phase, resolve_phases, trainable_of
from sparsifiner_jax.train.step import make_train_step, state_layout
from sparsifiner_jax.train.workdir import TrainingError, check_workdir, lock_workdir, state_meta

PREEMPTED_EXIT_CODE = 75  # SIGTERM: checkpoint saved, run can be resumed


class _Preemption:
  """Turns SIGTERM into a flag the loop polls (so it can checkpoint and exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class Preempted(SystemExit):
  def __init__(self):
    super().__init__(PREEMPTED_EXIT_CODE)


def _global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, local[k]) for k in ("image", "label")}


def train(config, workdir, *, stop_after: int | None = None, devices=None) -> dict[str, Any]:
  """Runs (or resumes) the configured phases in ``workdir`` (a local path or gs:// URL). Returns the
  final metrics dict. The library's edge: validates ``config`` and resolves ``workdir`` once, then
  :func:`train_validated`.

  ``stop_after``: return (after checkpointing) once the global step reaches this value (for tests).
  ``devices``: the devices of the mesh (default: all).
  """
  checked = config_check.validate(config, "train", devices)  # every field, before anything is written
  return train_validated(config, paths.check_reachable(workdir, "workdir"), checked, stop_after=stop_after)


def train_validated(config, workdir: epath.Path, checked: config_check.Checked, *,
                    stop_after: int | None = None) -> dict[str, Any]:
  """:func:`train` with ``config`` validated (``checked``: ``config_check.validate(config, "train")``)
  and ``workdir`` resolved (``paths.check_reachable``); train.py calls it, having done both. One run at a
  time per workdir (``lock_workdir``)."""
  check_workdir(config, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with lock_workdir(workdir) as lock:
    return _train(config, workdir, checked.mesh, checked.info, stop_after, lock)


def _train(config, workdir: epath.Path, mesh, info, stop_after: int | None, lock) -> dict[str, Any]:
  """Start (or resume), run the phases not done yet, finish: the body of :func:`train`."""
  run = _start(config, workdir, mesh, info, lock)
  with _Preemption() as preempt, jax.set_mesh(mesh):
    for phase in run.phases:
      if run.step >= phase.end:
        continue
      if not _run_phase(run, phase, stop_after, preempt):
        break
  return _finish(run)


@dataclasses.dataclass
class _Run:
  """What the phases of one run share: the config, the model's parameter groups and the teacher, the
  checkpointer, writer and evaluator, and the position the steps move on (``step``, ``state``, the phase
  ``state`` belongs to, the best top-1 so far, each finished phase's evaluation, the unchecked steps)."""
  config: Any
  workdir: epath.Path
  mesh: Any
  phases: list[Phase]
  graphdef: Any
  params: Any
  rest: Any
  params_sh: Any
  teacher: tuple      # (graphdef, params, shardings); all None without a teacher
  ckpt: Checkpointer
  writer: MetricWriter
  evaluator: Evaluator
  step: int
  state: Any
  state_phase: str | None
  best: float
  results: dict = dataclasses.field(default_factory=dict)
  pending: list = dataclasses.field(default_factory=list)   # (step, metrics) not yet checked for NaNs


def _start(config, workdir: epath.Path, mesh, info, lock) -> _Run:
  """The run's phases, model (from ``config.init``) and teacher, checkpointer and metric writer, and its
  position: the latest good checkpoint's, or step 0 with no state."""
  phases = _resolve(config, info)
  model = models.build_model(config)
  if config.init:
    weights.load_weights(config.init, model)
  graphdef, params, rest = models.split_params(model)
  params_sh = sharding.tree_shardings(mesh, params)
  teacher = _teacher(config, mesh)
  ckpt = Checkpointer(workdir / "ckpt", max_to_keep=int(config.keep_ckpts),
                      before_save=lock.check)
  writer = MetricWriter(workdir)
  restored = ckpt.restore_latest_good(lambda meta: _abstract_state(
      config, params, params_sh, mesh, next(p for p in phases if p.name == meta["phase"]))[1])
  if restored is not None:
    step, state, meta = restored
    state_phase = meta["phase"]
    _log(f"resumed from step {step} (phase {state_phase}) in {workdir}")
  else:
    step, state, state_phase = 0, None, None
  evaluator = Evaluator(config, mesh)
  best = _best_top1(workdir / "best") if restored is not None else -1.0
  return _Run(config=config, workdir=workdir, mesh=mesh, phases=phases, graphdef=graphdef, params=params,
              rest=rest, params_sh=params_sh, teacher=teacher, ckpt=ckpt, writer=writer,
              evaluator=evaluator, step=step, state=state, state_phase=state_phase, best=best)


def _resolve(config, info) -> list[Phase]:
  """The configured phases at ``info``'s train split size; raises ValueError when none has a length."""
  steps_per_epoch = max(info.splits[config.input.train_split] // int(config.batch_size), 1)
  phases = resolve_phases(config, steps_per_epoch)
  if not phases:
    raise ValueError("no training phase has a positive length; set config.phases.<name>.epochs")
  return phases


def _teacher(config, mesh) -> tuple:
  """``(graphdef, params, shardings)`` of the frozen teacher (kernels cast once to its dtype, params
  placed on ``mesh``), or three Nones when ``config.teacher.weights`` is empty."""
  if not config.teacher.weights:
    return None, None, None
  teacher = models.build_teacher(config)
  weights.load_weights(config.teacher.weights, teacher, allow_missing_predictor=False)
  teacher_graphdef, teacher_params = nnx.split(teacher)
  teacher_params = models.cast_kernels(teacher_params, teacher.config.dtype)  # frozen: cast once
  teacher_sh = sharding.tree_shardings(mesh, teacher_params)
  return teacher_graphdef, jax.device_put(teacher_params, teacher_sh), teacher_sh


def _abstract_state(config, params, params_sh, mesh, phase: Phase):
  """``state_layout`` of ``phase``: ``(tx, abstract_state, state_shardings)``."""
  return state_layout(params, params_sh, phase, mesh, ema=config.ema_decay > 0)


def _run_phase(run: _Run, phase: Phase, stop_after: int | None, preempt: _Preemption) -> bool:
  """Runs ``phase`` from ``run.step``: its steps, then its end (checkpoint, evaluation, ``best/``).
  Returns False when ``stop_after`` stopped it before its end (after checkpointing)."""
  tx, _, shard = _abstract_state(run.config, run.params, run.params_sh, run.mesh, phase)
  _enter_phase(run, phase, tx, shard)
  teacher_graphdef, _, teacher_sh = run.teacher
  step_fn = make_train_step(run.graphdef, run.rest, teacher_graphdef, phase, tx, run.config, run.mesh,
                            shard, teacher_sh)
  _steps(run, phase, step_fn, stop_after, preempt)
  if stop_after is not None and run.step >= stop_after and run.step < phase.end:
    _save(run.ckpt, run.config, phase, run.step, run.state, run.pending)
    return False
  _end_phase(run, phase)
  return True


def _enter_phase(run: _Run, phase: Phase, tx, shard) -> None:
  """Unless ``run.state`` belongs to ``phase`` already: a fresh optimizer for the phase, parameters (and
  EMA) from the previous phase or the initial model, placed with ``shard``."""
  if run.state is not None and run.state_phase == phase.name:
    return
  cur = run.params if run.state is None else run.state["params"]
  ema = run.state["ema"] if run.state is not None else (cur if run.config.ema_decay > 0 else None)
  init = dict(step=jnp.int32(run.step), params=cur, opt=tx.init(trainable_of(cur, phase)), ema=ema)
  run.state = jax.device_put(init, shard)
  run.state_phase = phase.name


def _train_data(config, step: int):
  """This process's share of the train stream from global batch ``step`` on."""
  # Deferred: tf.data imports TensorFlow, which `config_check` errors and the step's tests do without.
  from sparsifiner_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  return input_pipeline.build_train_iterator(
      config.input, img_size=config.model.img_size,
      local_batch_size=int(config.batch_size) // jax.process_count(), seed=int(config.seed),
      start_batch=step, process_index=jax.process_index(), process_count=jax.process_count())


def _steps(run: _Run, phase: Phase, step_fn, stop_after: int | None, preempt: _Preemption) -> None:
  """Steps until ``phase``'s end or ``stop_after``: logs every ``log_every`` steps (and at the end),
  checkpoints every ``ckpt_every`` and on SIGTERM (then raises :class:`Preempted`), evaluates every
  ``eval_every`` (not at the phase's end: :func:`_end_phase` does)."""
  config = run.config
  data = _train_data(config, run.step)
  bar = _progress(config, phase, run.step)
  since = (time.time(), run.step)
  for local in data:
    if run.step >= phase.end or (stop_after is not None and run.step >= stop_after):
      break
    run.state, metrics = step_fn(run.state, run.teacher[1], _global_batch(local, run.mesh))
    run.step += 1
    run.pending.append((run.step, metrics))
    if bar is not None:
      bar.update(1)
    if run.step % int(config.log_every) == 0 or run.step == phase.end:
      since = _log_train(run, metrics, since, bar)
    if preempt.requested:
      _save(run.ckpt, config, phase, run.step, run.state, run.pending)
      raise Preempted()
    if config.ckpt_every and run.step % int(config.ckpt_every) == 0:
      _save(run.ckpt, config, phase, run.step, run.state, run.pending)
    if config.eval_every and run.step % int(config.eval_every) == 0 and run.step != phase.end:
      _evaluate(run)
  if bar is not None:
    bar.close()


def _log_train(run: _Run, metrics, since: tuple[float, int], bar) -> tuple[float, int]:
  """Checks the pending steps for non-finite values, then writes ``metrics`` as ``train/...`` with the
  images per second since ``since`` (time, step). Returns the new ``since``."""
  _check_finite(run.config, run.pending, run.ckpt)
  m = jax.device_get(metrics)
  dt = max(time.time() - since[0], 1e-9)
  m["img_per_s"] = (run.step - since[1]) * int(run.config.batch_size) / dt
  since = (time.time(), run.step)
  run.writer.write(run.step, {f"train/{k}": v for k, v in m.items()})
  if bar is not None:
    bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['img_per_s']:.0f}")
  return since


def _evaluate(run: _Run) -> dict[str, Any]:
  """Evaluates ``run.state``'s parameters and writes the result as ``eval/...`` at ``run.step``."""
  ev = run.evaluator.run(run.graphdef, run.state["params"], run.rest)
  run.writer.write(run.step, {f"eval/{k}": v for k, v in ev.items()})
  return ev


def _end_phase(run: _Run, phase: Phase) -> None:
  """Checkpoints, evaluates and logs the finished ``phase``; writes ``best/`` when its top-1 is the best."""
  _save(run.ckpt, run.config, phase, run.step, run.state, run.pending)
  ev = _evaluate(run)
  run.results[phase.name] = ev
  _log(f"phase {phase.name} done at step {run.step}: top1 {ev['top1']:.4f}, loss {ev['loss']:.4f}, "
       f"density {ev['density']:.4f}")
  if ev["top1"] > run.best:
    run.best = ev["top1"]
    _save_weights(run.graphdef, run.state["params"], run.rest, run.workdir / "best", run.config,
                  evaluation=dict(top1=float(run.best), step=run.step, phase=phase.name))


def _finish(run: _Run) -> dict[str, Any]:
  """Writes ``final/`` (and ``final_ema/``) once every phase is done, closes the checkpointer and writer.
  Returns ``{"step", "phases": {name: evaluation}, "state"}``."""
  if run.step >= run.phases[-1].end:
    _save_weights(run.graphdef, run.state["params"], run.rest, run.workdir / "final", run.config)
    if run.state.get("ema") is not None:
      _save_weights(run.graphdef, run.state["ema"], run.rest, run.workdir / "final_ema", run.config)
  run.ckpt.close()
  run.writer.close()
  return dict(step=run.step, phases=run.results, state=run.state)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _check_finite(config, pending: list, ckpt: Checkpointer) -> None:
  """Checks the steps not checked yet (``pending``: [(step, metrics)], emptied) for non-finite values.

  ``nonfinite="stop"``: raises TrainingError naming the first bad step and its loss terms; nothing
  since the last checkpoint is saved. ``"skip"``: the jitted step dropped that update; warns.
  """
  for step, m in jax.device_get(pending):
    if m.get("finite", 1.0) >= 1.0:
      continue
    terms = ", ".join(f"{k}={m[k]:.4g}" for k in (*LOSS_TERMS, "loss", "grad_norm") if k in m)
    if config.nonfinite == "skip":
      logging.warning("step %d: non-finite loss or gradients (%s); update skipped", step, terms)
      continue
    last = ckpt.latest_step()
    kept = ("no checkpoint was written" if last is None else
            f"the last checkpoint (step {last}) is intact")
    raise TrainingError(f"non-finite loss or gradients at step {step} ({terms}); {kept}. Lower the "
                        "learning rate or set --config.nonfinite=skip")
  pending.clear()


def _save(ckpt, config, phase, step, state, pending):
  _check_finite(config, pending, ckpt)  # never checkpoint a non-finite state
  ckpt.save(step, state, state_meta(config, phase, step))


def _best_top1(path) -> float:
  """The top-1 that ``best/`` was chosen by before this run resumed (-1 if there is none): every
  process reads the same file, so all of them agree on when to write ``best/`` again."""
  try:
    return float(weights.read_meta(path).get("evaluation", {}).get("top1", -1.0))
  except weights.WeightsError:
    return -1.0


def _save_weights(graphdef, params, rest, path, config, evaluation=None):
  if jax.process_count() > 1:  # every process takes part in gathering arrays sharded over processes
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() != 0:
    return
  weights.save_weights(path, models.merge_params(graphdef, params, rest), name=config.model_name,
                       evaluation=evaluation)


def _progress(config, phase: Phase, step: int):
  if jax.process_index() != 0 or not config.progress:
    return None
  return tqdm(total=phase.steps, initial=max(step - phase.start, 0), desc=f"{phase.name}",
              unit="step", dynamic_ncols=True, leave=False)
