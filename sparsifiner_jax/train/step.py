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
from sparsifiner_jax.train.phases import LOSS_TERMS, TRAINABLE, Phase, make_optimizer, trainable_of


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


def make_train_step(graphdef, rest, teacher_graphdef, phase: Phase, tx, config, mesh,
                    state_shardings, teacher_shardings):
  """Returns ``step(state, teacher_params, batch) -> (state, metrics)``, jitted with shardings."""
  w = {t: phase.weight(t) for t in LOSS_TERMS}
  need_teacher = teacher_graphdef is not None and (w["kd"] or w["tok"] or w["recon"])
  if (w["kd"] or w["tok"] or w["recon"]) and teacher_graphdef is None:
    raise ValueError(f"phase {phase.name!r} uses teacher losses but no teacher is configured")
  trainable = TRAINABLE[phase.name]
  num_classes = config.model.num_classes
  mix = config.mixup  # every field guaranteed by config_check.REQUIRED
  accum = int(config.grad_accum)
  ema_decay = float(config.ema_decay)
  ref_batch = int(config.recon_reference_batch)
  skip_nonfinite = config.nonfinite == "skip"
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
    model = models.merge_params(graphdef, params, rest)
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
      terms["recon"] = losses.attention_reconstruction(aux["approx_attn"], t_attn, ref_batch,
                                                       block=model.config.mask_block)
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
    onehot = mixup.smooth_labels(labels, num_classes, float(mix.label_smoothing))
    if mix.prob > 0:
      images, onehot = mixup.mixup_cutmix(
          jax.random.fold_in(rng, 1), images, onehot, mixup_alpha=float(mix.mixup_alpha),
          cutmix_alpha=float(mix.cutmix_alpha), switch_prob=float(mix.switch_prob),
          prob=float(mix.prob))
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
