"""Two-phase Sparsifiner training (SPARSIFINER.md §3-4) with a functional, sharded jit core.

Phases run in the fixed order ``train -> recon -> distill -> joint``; a phase with zero length is skipped.

=========  ==========================  ==================  ===========================================
phase      trainable                   forward             loss terms (weights from the config)
=========  ==========================  ==================  ===========================================
train      everything                  sparse if model is  cls (+ kd/tok if a teacher is set)
recon      mask predictors only        dense (recon mode)  recon: sum-MSE(Â, teacher attention)
distill    everything but predictors   sparse top-k mask   cls + kd(teacher||student) + tok MSE
joint      everything                  sparse top-k mask   all of the above (Â of the sparse mode)
=========  ==========================  ==================  ===========================================

The model is split once into ``graphdef`` and parameter groups ``{"backbone", "predictor"}``; the jitted
step differentiates only the phase's trainable groups. Each phase gets a fresh AdamW. The train state is a
pytree ``{"step", "params", "opt", "ema"}``; the step's randomness is ``fold_in(key(seed), step)`` and the
data stream is a pure function of (seed, step), so a resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from sparsifiner_jax import augment, config_check, losses, models, optim, sharding, weights
from sparsifiner_jax.checkpoint import Checkpointer, read_latest_meta

PHASES = config_check.PHASES
TRAINABLE = {"train": ("backbone", "predictor"), "recon": ("predictor",),
             "distill": ("backbone",), "joint": ("backbone", "predictor")}
LOSS_TERMS = config_check.LOSS_TERMS
PREEMPTED_EXIT_CODE = 75  # SIGTERM: checkpoint saved, run can be resumed

IS_PREDICTOR = nnx.All(nnx.Param, nnx.PathContains("mask_predictor"))


class TrainingError(RuntimeError):
  """Training cannot continue (non-finite loss, ...); the message names the step and the cause."""


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  start: int          # first global step of the phase
  steps: int
  lr: float
  final_lr: float
  warmup_steps: int
  weight_decay: float
  loss_weights: tuple[tuple[str, float], ...]

  @property
  def end(self) -> int:
    return self.start + self.steps

  @property
  def recon_forward(self) -> bool:
    return self.name == "recon"

  def weight(self, term: str) -> float:
    return dict(self.loss_weights).get(term, 0.0)


def resolve_phases(config, steps_per_epoch: int) -> list[Phase]:
  """Phase lengths in optimizer steps from ``epochs`` (or explicit ``steps``), in the fixed order."""
  out, start = [], 0
  for name in PHASES:
    if name not in config.phases:
      continue
    p = config.phases[name]
    steps = int(p.get("steps", 0) or 0) or int(round(float(p.get("epochs", 0)) * steps_per_epoch))
    if steps <= 0:
      continue
    warm = p.get("warmup_steps", -1)
    warm = int(warm) if warm is not None and warm >= 0 else int(
        round(float(p.get("warmup_epochs", 0)) * steps_per_epoch))
    lw = tuple((k, float(p.losses.get(k, 0.0))) for k in LOSS_TERMS)
    out.append(Phase(name, start, steps, float(p.lr), float(p.get("final_lr", 0.0)), min(warm, steps),
                     float(p.get("weight_decay", 0.05)), lw))
    start += steps
  return out


def phase_at(phases: list[Phase], step: int) -> Phase | None:
  for p in phases:
    if p.start <= step < p.end:
      return p
  return None


# --------------------------------------------------------------------------------------------------
# Model, teacher, state.


def model_kwargs(config) -> dict[str, Any]:
  """``config.model`` as ``models.create`` keywords; None means the variant's default (not keep_rate)."""
  return {k: v for k, v in config.model.to_dict().items() if v is not None or k == "keep_rate"}


def build_model(config, *, seed: int | None = None) -> nnx.Module:
  return models.create(config.model_name, rngs=nnx.Rngs(config.seed if seed is None else seed),
                       **model_kwargs(config))


def teacher_model_kwargs(config) -> dict[str, Any]:
  """The teacher is the dense version of the student architecture unless ``teacher.model`` says more."""
  kw = {k: v for k, v in model_kwargs(config).items()
        if k in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                 "num_heads", "mlp_ratio", "qkv_bias", "dtype")}
  kw.update(config.teacher.get("model", {}) or {})
  kw["keep_rate"] = None
  return kw


def split_params(model: nnx.Module):
  graphdef, predictor, backbone, rest = nnx.split(model, IS_PREDICTOR, nnx.Param, ...)
  return graphdef, {"backbone": backbone, "predictor": predictor}, rest


def make_optimizer(phase: Phase, trainable_params) -> optax.GradientTransformation:
  schedule = optim.warmup_cosine(phase.lr, phase.final_lr, phase.warmup_steps, phase.steps)
  return optim.adamw(trainable_params, schedule=schedule, weight_decay=phase.weight_decay)


def trainable_of(params: dict, phase: Phase) -> dict:
  return {k: params[k] for k in TRAINABLE[phase.name]}


# --------------------------------------------------------------------------------------------------
# The jitted step.


def make_train_step(graphdef, rest, teacher_graphdef, phase: Phase, tx, config, mesh,
                    state_shardings, teacher_shardings):
  """Returns ``step(state, teacher_params, batch) -> (state, metrics)``, jitted with shardings."""
  w = {t: phase.weight(t) for t in LOSS_TERMS}
  need_teacher = teacher_graphdef is not None and (w["kd"] or w["tok"] or w["recon"])
  if (w["kd"] or w["tok"] or w["recon"]) and teacher_graphdef is None:
    raise ValueError(f"phase {phase.name!r} uses teacher losses but no teacher is configured")
  trainable = TRAINABLE[phase.name]
  num_classes = config.model.num_classes
  mix = config.get("mixup", {})
  accum = int(config.get("grad_accum", 1))
  ema_decay = float(config.get("ema_decay", 0.0))
  ref_batch = int(config.get("recon_reference_batch", 168))
  skip_nonfinite = config.get("nonfinite", "stop") == "skip"
  seed = int(config.seed)

  def forward_teacher(tparams, images):
    teacher = nnx.merge(teacher_graphdef, tparams)
    logits, aux = teacher(images)
    return jax.lax.stop_gradient((logits, aux["tokens"], aux["attn"] if w["recon"] else None))

  def micro_loss(train_p, frozen_p, images, targets, rng, tparams):
    t_logits = t_tokens = t_attn = None
    if need_teacher:
      t_logits, t_tokens, t_attn = forward_teacher(tparams, images)
    params = {**frozen_p, **train_p}
    model = nnx.merge(graphdef, params["predictor"], params["backbone"], rest)
    logits, aux = model(images, train=True, recon=phase.recon_forward, rng=rng)
    terms = {}
    if w["cls"]:
      terms["cls"] = losses.soft_cross_entropy(logits, targets)
    if w["kd"]:
      terms["kd"] = losses.kd_kl(logits, t_logits)
    if w["tok"]:   # with token sparsity, only the student's final live tokens are compared
      index = aux.get("token_index")
      t_live = t_tokens if index is None else jnp.take_along_axis(t_tokens, index[..., None], axis=1)
      terms["tok"] = losses.token_mse(aux["tokens"], t_live)
    if w["recon"]:
      terms["recon"] = losses.attention_reconstruction(aux["approx_attn"], t_attn, ref_batch)
    total = sum(w[k] * v for k, v in terms.items())
    masks = [m for m in aux["masks"] if m is not None]
    density = jnp.mean(jnp.stack([m.density() for m in masks])) if masks else jnp.float32(1.0)
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    return total, dict(terms, density=density, train_acc=acc)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, tparams, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    params = state["params"]
    train_p = {k: params[k] for k in trainable}
    frozen_p = {k: v for k, v in params.items() if k not in trainable}
    images, labels = batch["image"], batch["label"]
    b = images.shape[0]
    onehot = augment.smooth_labels(labels, num_classes, float(mix.get("label_smoothing", 0.0)))
    if mix.get("prob", 0.0) > 0:
      images, onehot = augment.mixup_cutmix(
          jax.random.fold_in(rng, 1), images, onehot, mixup_alpha=float(mix.get("mixup_alpha", 0.8)),
          cutmix_alpha=float(mix.get("cutmix_alpha", 1.0)),
          switch_prob=float(mix.get("switch_prob", 0.5)), prob=float(mix.get("prob", 1.0)))
    drop_rng = jax.random.fold_in(rng, 2)
    if accum == 1:
      (loss, aux), grads = grad_fn(train_p, frozen_p, images, onehot, drop_rng, tparams)
    else:
      mb = b // accum
      split = lambda x: x.reshape(accum, mb, *x.shape[1:])

      def body(carry, xs):
        g_acc, l_acc, a_acc = carry
        im, tg, i = xs
        (l, a), g = grad_fn(train_p, frozen_p, im, tg, jax.random.fold_in(drop_rng, i), tparams)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
                jax.tree.map(jnp.add, a_acc, a)), None

      zeros = jax.tree.map(jnp.zeros_like, train_p)
      _, a0 = jax.eval_shape(lambda: micro_loss(train_p, frozen_p, split(images)[0],
                                                split(onehot)[0], drop_rng, tparams))
      a0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), a0)
      (grads, loss, aux), _ = jax.lax.scan(
          body, (zeros, jnp.float32(0.0), a0), (split(images), split(onehot), jnp.arange(accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      aux = jax.tree.map(lambda a: a / accum, aux)

    updates, new_opt = tx.update(grads, state["opt"], train_p)
    new_train = optax.apply_updates(train_p, updates)
    new_params = {**params, **new_train}
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = dict(step=state["step"] + 1, params=new_params, opt=new_opt, ema=state["ema"])
    if ema_decay > 0:
      new_state["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                      state["ema"], new_params)
    if skip_nonfinite:  # keep the old state (but advance the step) when the update is not finite
      kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
      kept["step"] = new_state["step"]
      new_state = kept
    metrics = dict(aux, loss=loss, finite=finite.astype(jnp.float32),
                   grad_norm=optax.global_norm(grads),
                   lr=optim.warmup_cosine(phase.lr, phase.final_lr, phase.warmup_steps,
                                          phase.steps)(state["step"] - phase.start))
    return new_state, metrics

  batch_sh = {"image": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)}
  repl = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(state_shardings, teacher_shardings, batch_sh),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))


# --------------------------------------------------------------------------------------------------
# The loop.


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


def state_meta(config, phase: Phase, step: int) -> dict[str, Any]:
  return dict(step=int(step), phase=phase.name, data_position=int(step),
              config_fingerprint=config_fingerprint(config))


def config_fingerprint(config) -> str:
  """Hash of the fields that define a run's trajectory (not logging/eval/checkpoint cadence, not the
  mesh: a run may resume on another topology)."""
  import hashlib
  import json
  d = config.to_dict()
  for k in ("log_every", "eval_every", "ckpt_every", "keep_ckpts", "progress", "total_steps_cap",
            "mesh"):
    d.pop(k, None)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_workdir(config, workdir: str) -> None:
  """Refuses, before anything is written, a workdir that is a file or holds a run of another config."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} exists and is not a directory")
  meta = read_latest_meta(os.path.join(workdir, "ckpt"))
  if (meta is not None and meta.get("config_fingerprint") != config_fingerprint(config)
      and not config.get("allow_config_change")):
    raise ValueError(f"workdir {workdir!r} holds a run of another config; use a new workdir, or set "
                     "--config.allow_config_change=True to continue it anyway")


@contextlib.contextmanager
def lock_workdir(workdir: str):
  """Holds ``WORKDIR/.lock`` (an exclusive ``flock``) while the block runs, on process 0 only.

  A second run on the same workdir fails at once with TrainingError naming the holder, instead of two
  runs interleaving checkpoints and metrics. The kernel drops the lock when its holder dies (even by
  SIGKILL), so a killed run never leaves a stale lock. Needs a filesystem with ``flock`` (local disks;
  on NFS only within one host).
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, ".lock")
  f = open(path, "a+")  # pylint: disable=consider-using-with  # held until the block ends
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown process"
      raise TrainingError(f"workdir {workdir!r} is in use by another run ({holder}); wait for it to "
                          "end or use another workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    yield
  finally:
    f.close()  # releases the lock


def train(config, workdir: str, *, stop_after: int | None = None, devices=None) -> dict[str, Any]:
  """Runs (or resumes) the configured phases in ``workdir``. Returns the final metrics dict.

  ``stop_after``: return (after checkpointing) once the global step reaches this value (for tests).
  ``devices``: the devices of the mesh (default: all). One run at a time per workdir (``lock_workdir``).
  """
  mesh, info = config_check.check_train(config, devices)  # every field, before anything is written
  check_workdir(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  with lock_workdir(workdir):
    return _train(config, workdir, mesh, info, stop_after)


def _train(config, workdir: str, mesh, info, stop_after: int | None) -> dict[str, Any]:
  from sparsifiner_jax import evaluate, input_pipeline
  from sparsifiner_jax.metrics import MetricWriter

  gbs = int(config.batch_size)
  steps_per_epoch = max(info.splits[config.input.train_split] // gbs, 1)
  phases = resolve_phases(config, steps_per_epoch)
  if not phases:
    raise ValueError("no training phase has a positive length; set config.phases.<name>.epochs")
  total = phases[-1].end

  model = build_model(config)
  if config.get("init"):
    weights.load_weights(config.init, model)
  graphdef, params, rest = split_params(model)
  params_sh = sharding.tree_shardings(mesh, params)

  teacher_graphdef = teacher_params = teacher_sh = None
  if config.teacher.get("weights"):
    teacher = models.create(config.teacher.get("model_name") or config.model_name,
                            rngs=nnx.Rngs(0), **teacher_model_kwargs(config))
    weights.load_weights(config.teacher.weights, teacher, allow_missing_predictor=False)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    teacher_params = models.cast_kernels(teacher_params, teacher.config.dtype)  # frozen: cast once
    teacher_sh = sharding.tree_shardings(mesh, teacher_params)
    teacher_params = jax.device_put(teacher_params, teacher_sh)

  def abstract_state(phase: Phase):
    tx = make_optimizer(phase, trainable_of(params, phase))
    opt = jax.eval_shape(tx.init, trainable_of(params, phase))
    ema = params if config.get("ema_decay", 0.0) > 0 else None
    st = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt=opt, ema=ema)
    shard = dict(step=sharding.replicated(mesh), params=params_sh,
                 opt=sharding.tree_shardings(mesh, opt),
                 ema=params_sh if ema is not None else None)
    abs_st = sharding.abstract(st, shard)
    return tx, abs_st, shard

  ckpt = Checkpointer(os.path.join(workdir, "ckpt"), max_to_keep=int(config.get("keep_ckpts", 2)))
  writer = MetricWriter(workdir)
  restored = ckpt.restore_latest_good(
      lambda meta: abstract_state(next(p for p in phases if p.name == meta["phase"]))[1])
  if restored is not None:
    step, state, meta = restored
    state_phase = meta["phase"]
    _log(f"resumed from step {step} (phase {state_phase}) in {workdir}")
  else:
    step, state, state_phase = 0, None, None

  eval_fn = evaluate.Evaluator(config, mesh)
  results: dict[str, Any] = {}
  best = -1.0
  pending: list = []  # (step, metrics) of the steps not yet checked for non-finite values
  with _Preemption() as preempt, mesh:
    for phase in phases:
      if step >= phase.end:
        continue
      tx, abs_st, shard = abstract_state(phase)
      if state is None or state_phase != phase.name:
        # A fresh optimizer for the phase; params come from the previous phase (or init).
        cur = params if state is None else state["params"]
        ema = state["ema"] if state is not None else (
            cur if config.get("ema_decay", 0.0) > 0 else None)
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
        if config.get("ckpt_every") and step % int(config.ckpt_every) == 0:
          _save(ckpt, config, phase, step, state, pending)
        if config.get("eval_every") and step % int(config.eval_every) == 0 and step != phase.end:
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
        _save_weights(graphdef, state["params"], rest, os.path.join(workdir, "best"), config)
  if step >= total:
    _save_weights(graphdef, state["params"], rest, os.path.join(workdir, "final"), config)
    if state.get("ema") is not None:
      _save_weights(graphdef, state["ema"], rest, os.path.join(workdir, "final_ema"), config)
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
    if config.get("nonfinite", "stop") == "skip":
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


def _save_weights(graphdef, params, rest, path, config):
  if jax.process_count() > 1:  # every process takes part in gathering arrays sharded over processes
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() != 0:
    return
  model = nnx.merge(graphdef, params["predictor"], params["backbone"], rest)
  weights.save_weights(path, model, name=config.model_name)


def _progress(config, phase: Phase, step: int):
  if jax.process_index() != 0 or not config.get("progress", True):
    return None
  from tqdm.auto import tqdm
  return tqdm(total=phase.steps, initial=max(step - phase.start, 0), desc=f"{phase.name}",
              unit="step", dynamic_ncols=True, leave=False)
