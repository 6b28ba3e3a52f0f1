"""The jitted train step: ``step(state, teacher_params, batch) -> (state, metrics)``.

The train state is a pytree ``{"step", "params", "opt", "ema"}`` (``params``: ``models.split_params``
groups). The step differentiates only the phase's trainable groups; its randomness is
``fold_in(key(seed), step)``, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsifiner_jax import models, sharding
from sparsifiner_jax.train import losses, mixup, optim
from sparsifiner_jax.train.phases import (LOSS_TERMS, TEACHER_TERMS, TRAINABLE, Phase, make_optimizer,
                                          trainable_of)


def state_layout(params, params_shardings, phase: Phase, mesh, *, ema: bool):
  """``(tx, abstract_state, state_shardings)`` of ``phase``'s train state for ``params`` (concrete or
  abstract parameter groups) placed with ``params_shardings``: a fresh optimizer for the phase's trainable
  groups, and an EMA copy of the parameters when ``ema``. The abstract state is what a checkpoint
  restores into and what a compile-only run lowers the step with."""
  tx = make_optimizer(phase, trainable_of(params, phase))
  opt = jax.eval_shape(tx.init, trainable_of(params, phase))
  state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt=opt,
               ema=params if ema else None)
  shardings = dict(step=sharding.replicated(mesh), params=params_shardings,
                   opt=sharding.tree_shardings(mesh, opt), ema=params_shardings if ema else None)
  return tx, sharding.abstract(state, shardings), shardings


def teacher_outputs(teacher_graphdef, tparams, images, *, attn: bool):
  """The frozen teacher on ``images [B, H, W, 3]``: ``(logits [B, K], tokens [B, N, D], attn)``, gradients
  stopped; ``attn`` is the per-layer ``[B, H, N, N]`` attention list when asked for, else None."""
  teacher = nnx.merge(teacher_graphdef, tparams)
  logits, aux = teacher(images, with_attention=attn)
  return jax.lax.stop_gradient((logits, aux["tokens"], aux["attn"] if attn else None))


def loss_terms(weights, logits, aux, targets, teacher, *, ref_batch: int, block) -> dict:
  """The unweighted loss terms a phase uses (those of nonzero ``weights``), float32 scalars by name.

  ``logits [B, K]`` and ``aux`` are the student's, ``targets [B, K]`` soft labels, ``teacher`` the
  ``teacher_outputs`` triple (Nones without a teacher); ``ref_batch`` and ``block`` (the model's
  ``mask_block``) go to the reconstruction loss."""
  t_logits, t_tokens, t_attn = teacher
  terms = {}
  if weights["cls"]:
    terms["cls"] = losses.soft_cross_entropy(logits, targets)
  if weights["kd"]:
    terms["kd"] = losses.kd_kl(logits, t_logits)
  if weights["tok"]:   # with token sparsity, only the student's final live tokens are compared
    index = aux.get("token_index")
    t_live = t_tokens if index is None else jnp.take_along_axis(t_tokens, index[..., None], axis=1)
    terms["tok"] = losses.token_mse(aux["tokens"], t_live)
  if weights["recon"]:
    terms["recon"] = losses.attention_reconstruction(aux["approx_attn"], t_attn, ref_batch, block=block)
  return terms


def batch_stats(logits, aux, targets) -> dict:
  """``{"density", "train_acc"}``: the masks' mean kept fraction (1 for a dense model) and the top-1
  agreement of ``logits [B, K]`` with ``targets [B, K]``."""
  masks = [m for m in aux["masks"] if m is not None]
  density = jnp.mean(jnp.stack([m.density() for m in masks])) if masks else jnp.float32(1.0)
  acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
  return dict(density=density, train_acc=acc)


def mixed_batch(rng, batch, num_classes: int, mix):
  """``(images [B, H, W, 3], targets [B, K])``: label-smoothed one-hot targets, then mixup/cutmix with
  ``mix`` (``config.mixup``) when its ``prob`` is above 0, drawn from ``fold_in(rng, 1)``."""
  images, labels = batch["image"], batch["label"]
  onehot = mixup.smooth_labels(labels, num_classes, float(mix.label_smoothing))
  if mix.prob > 0:
    images, onehot = mixup.mixup_cutmix(
        jax.random.fold_in(rng, 1), images, onehot, mixup_alpha=float(mix.mixup_alpha),
        cutmix_alpha=float(mix.cutmix_alpha), switch_prob=float(mix.switch_prob),
        prob=float(mix.prob))
  return images, onehot


def accumulated_grads(loss_fn, train_p, images, targets, rng, accum: int):
  """``(loss, aux, grads)`` of ``loss_fn(train_p, images, targets, rng) -> (loss, aux)``, each the mean
  over ``accum`` micro-batches of ``B / accum`` examples (one ``lax.scan``; micro-batch ``i`` draws from
  ``fold_in(rng, i)``); with ``accum == 1`` one call on the whole batch with ``rng``."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, aux), grads = grad_fn(train_p, images, targets, rng)
    return loss, aux, grads
  mb = images.shape[0] // accum
  split = lambda x: x.reshape(accum, mb, *x.shape[1:])

  def body(carry, xs):
    g_acc, l_acc, a_acc = carry
    im, tg, i = xs
    (l, a), g = grad_fn(train_p, im, tg, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, a_acc, a)), None

  zeros = jax.tree.map(jnp.zeros_like, train_p)
  _, a0 = jax.eval_shape(lambda: loss_fn(train_p, split(images)[0], split(targets)[0], rng))
  a0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), a0)
  (grads, loss, aux), _ = jax.lax.scan(
      body, (zeros, jnp.float32(0.0), a0), (split(images), split(targets), jnp.arange(accum)))
  grads = jax.tree.map(lambda g: g / accum, grads)
  return loss / accum, jax.tree.map(lambda a: a / accum, aux), grads


def all_finite(loss, grads):
  """Scalar bool: ``loss`` and every gradient entry are finite."""
  return jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))


def ema_update(ema, params, decay: float):
  """``decay * ema + (1 - decay) * params``, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def apply_update(state, train_p, grads, tx, *, ema_decay: float, finite, skip_nonfinite: bool):
  """The next train state: ``tx``'s update of the trainable groups ``train_p`` by ``grads``, the step
  advanced, the EMA moved when ``ema_decay > 0``; with ``skip_nonfinite``, everything but the step stays
  as in ``state`` where ``finite`` (scalar bool) is false."""
  updates, new_opt = tx.update(grads, state["opt"], train_p)
  new_params = {**state["params"], **optax.apply_updates(train_p, updates)}
  new_state = dict(step=state["step"] + 1, params=new_params, opt=new_opt, ema=state["ema"])
  if ema_decay > 0:
    new_state["ema"] = ema_update(state["ema"], new_params, ema_decay)
  if skip_nonfinite:  # keep the old state (but advance the step) when the update is not finite
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    kept["step"] = new_state["step"]
    new_state = kept
  return new_state


def make_train_step(graphdef, rest, teacher_graphdef, phase: Phase, tx, config, mesh,
                    state_shardings, teacher_shardings):
  """Returns ``step(state, teacher_params, batch) -> (state, metrics)``, jitted with shardings.

  ``batch``: ``{"image": [B, H, W, 3], "label": [B]}``; ``metrics``: the loss terms, ``loss``,
  ``density``, ``train_acc``, ``finite``, ``grad_norm`` and ``lr``, float32 scalars. ``config`` has
  passed ``config_check.validate``, so a phase with teacher terms has a teacher (``teacher_graphdef``)."""
  w = {t: phase.weight(t) for t in LOSS_TERMS}
  need_teacher = any(w[t] for t in TEACHER_TERMS)
  trainable = TRAINABLE[phase.name]
  num_classes = config.model.num_classes
  mix = config.mixup  # every field guaranteed by config_check.REQUIRED
  accum = int(config.grad_accum)
  ema_decay = float(config.ema_decay)
  ref_batch = int(config.recon_reference_batch)
  skip_nonfinite = config.nonfinite == "skip"
  seed = int(config.seed)
  lr_at = optim.warmup_cosine(phase.lr, phase.final_lr, phase.warmup_steps, phase.steps)

  def micro_loss(train_p, frozen_p, images, targets, rng, tparams):
    """``(weighted total, metrics)`` of one (micro-)batch; differentiated with respect to ``train_p``."""
    teacher = (teacher_outputs(teacher_graphdef, tparams, images, attn=bool(w["recon"]))
               if need_teacher else (None, None, None))
    model = models.merge_params(graphdef, {**frozen_p, **train_p}, rest)
    logits, aux = model(images, train=True, recon=phase.recon_forward, rng=rng)
    terms = loss_terms(w, logits, aux, targets, teacher, ref_batch=ref_batch, block=model.config.mask_block)
    total = sum(w[k] * v for k, v in terms.items())
    return total, dict(terms, **batch_stats(logits, aux, targets))

  def step(state, tparams, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    params = state["params"]
    train_p = {k: params[k] for k in trainable}
    frozen_p = {k: v for k, v in params.items() if k not in trainable}
    images, targets = mixed_batch(rng, batch, num_classes, mix)
    loss_fn = lambda tp, im, tg, r: micro_loss(tp, frozen_p, im, tg, r, tparams)
    loss, aux, grads = accumulated_grads(loss_fn, train_p, images, targets, jax.random.fold_in(rng, 2),
                                         accum)
    finite = all_finite(loss, grads)
    new_state = apply_update(state, train_p, grads, tx, ema_decay=ema_decay, finite=finite,
                             skip_nonfinite=skip_nonfinite)
    metrics = dict(aux, loss=loss, finite=finite.astype(jnp.float32), grad_norm=optax.global_norm(grads),
                   lr=lr_at(state["step"] - phase.start))
    return new_state, metrics

  batch_sh = {"image": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)}
  repl = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(state_shardings, teacher_shardings, batch_sh),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))
