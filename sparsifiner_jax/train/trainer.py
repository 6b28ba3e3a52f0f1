"""The training loop: phases in order, checkpoints, evaluation, preemption, resume.

Phases (``train.phases``) run in order: ``train -> recon -> distill -> joint``. The model is split once
into ``graphdef`` and parameter groups (``models.split_params``); each phase jits its own step
(``train.step``). The data stream is a pure function of (seed, step), so a resumed run is identical to
an uninterrupted one.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def train(config, workdir: str, *, stop_after: int | None = None, devices=None) -> dict[str, Any]:
  """Runs (or resumes) the configured phases in ``workdir``. Returns the final metrics dict.

  ``stop_after``: return (after checkpointing) once the global step reaches this value (for tests).
  ``devices``: the devices of the mesh (default: all). One run at a time per workdir (``lock_workdir``).
  """
  mesh, info = config_check.check_train(config, devices)  # every field, before anything is written
  path = paths.check_reachable(workdir, "workdir")
  check_workdir(config, path)
  path.mkdir(parents=True, exist_ok=True)
  with lock_workdir(path) as lock:
    return _train(config, path, mesh, info, stop_after, lock)


def _train(config, workdir, mesh, info, stop_after: int | None, lock) -> dict[str, Any]:
  # Deferred: tf.data imports TensorFlow, which `config_check` errors and the step's tests do without.
  from sparsifiner_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel

  gbs = int(config.batch_size)
  steps_per_epoch = max(info.splits[config.input.train_split] // gbs, 1)
  phases = resolve_phases(config, steps_per_epoch)
  if not phases:
    raise ValueError("no training phase has a positive length; set config.phases.<name>.epochs")
  total = phases[-1].end

  model = models.build_model(config)
  if config.init:
    weights.load_weights(config.init, model)
  graphdef, params, rest = models.split_params(model)
  params_sh = sharding.tree_shardings(mesh, params)

  teacher_graphdef = teacher_params = teacher_sh = None
  if config.teacher.weights:
    teacher = models.build_teacher(config)
    weights.load_weights(config.teacher.weights, teacher, allow_missing_predictor=False)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    teacher_params = models.cast_kernels(teacher_params, teacher.config.dtype)  # frozen: cast once
    teacher_sh = sharding.tree_shardings(mesh, teacher_params)
    teacher_params = jax.device_put(teacher_params, teacher_sh)

  def abstract_state(phase: Phase):
    return state_layout(params, params_sh, phase, mesh, ema=config.ema_decay > 0)

  ckpt = Checkpointer(workdir / "ckpt", max_to_keep=int(config.keep_ckpts),
                      before_save=lock.check)
  writer = MetricWriter(workdir)
  restored = ckpt.restore_latest_good(
      lambda meta: abstract_state(next(p for p in phases if p.name == meta["phase"]))[1])
  if restored is not None:
    step, state, meta = restored
    state_phase = meta["phase"]
    _log(f"resumed from step {step} (phase {state_phase}) in {workdir}")
  else:
    step, state, state_phase = 0, None, None

  eval_fn = Evaluator(config, mesh)
  results: dict[str, Any] = {}
  best = _best_top1(workdir / "best") if restored is not None else -1.0
  pending: list = []  # (step, metrics) of the steps not yet checked for non-finite values
  with _Preemption() as preempt, jax.set_mesh(mesh):
    for phase in phases:
      if step >= phase.end:
        continue
      tx, abs_st, shard = abstract_state(phase)
      if state is None or state_phase != phase.name:
        # A fresh optimizer for the phase; params come from the previous phase (or init).
        cur = params if state is None else state["params"]
        ema = state["ema"] if state is not None else (
            cur if config.ema_decay > 0 else None)
        init = dict(step=jnp.int32(step), params=cur, opt=tx.init(trainable_of(cur, phase)), ema=ema)
        state = jax.device_put(init, shard)
        state_phase = phase.name
      step_fn = make_train_step(graphdef, rest, teacher_graphdef, phase, tx, config, mesh, shard,
                                teacher_sh)
      data = input_pipeline.build_train_iterator(
          config.input, img_size=config.model.img_size,
          local_batch_size=gbs // jax.process_count(), seed=int(config.seed), start_batch=step,
          process_index=jax.process_index(), process_count=jax.process_count())
      bar = _progress(config, phase, step)
      t0, n0 = time.time(), step
      for local in data:
        if step >= phase.end or (stop_after is not None and step >= stop_after):
          break
        state, metrics = step_fn(state, teacher_params, _global_batch(local, mesh))
        step += 1
        pending.append((step, metrics))
        if bar is not None:
          bar.update(1)
        if step % int(config.log_every) == 0 or step == phase.end:
          _check_finite(config, pending, ckpt)
          m = jax.device_get(metrics)
          dt = max(time.time() - t0, 1e-9)
          m["img_per_s"] = (step - n0) * gbs / dt
          t0, n0 = time.time(), step
          writer.write(step, {f"train/{k}": v for k, v in m.items()})
          if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['img_per_s']:.0f}")
        if preempt.requested:
          _save(ckpt, config, phase, step, state, pending)
          raise Preempted()
        if config.ckpt_every and step % int(config.ckpt_every) == 0:
          _save(ckpt, config, phase, step, state, pending)
        if config.eval_every and step % int(config.eval_every) == 0 and step != phase.end:
          ev = eval_fn.run(graphdef, state["params"], rest)
          writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
      if bar is not None:
        bar.close()
      if stop_after is not None and step >= stop_after and step < phase.end:
        _save(ckpt, config, phase, step, state, pending)
        break
      _save(ckpt, config, phase, step, state, pending)
      ev = eval_fn.run(graphdef, state["params"], rest)
      writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
      results[phase.name] = ev
      _log(f"phase {phase.name} done at step {step}: top1 {ev['top1']:.4f}, loss {ev['loss']:.4f}, "
           f"density {ev['density']:.4f}")
      if ev["top1"] > best:
        best = ev["top1"]
        _save_weights(graphdef, state["params"], rest, workdir / "best", config,
                      evaluation=dict(top1=float(best), step=step, phase=phase.name))
  if step >= total:
    _save_weights(graphdef, state["params"], rest, workdir / "final", config)
    if state.get("ema") is not None:
      _save_weights(graphdef, state["ema"], rest, workdir / "final_ema", config)
  ckpt.close()
  writer.close()
  return dict(step=step, phases=results, state=state)


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
