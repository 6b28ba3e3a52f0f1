"""Exact evaluation: top-1/top-5, loss, realised attention density and attention recall over a split.

The eval iterator pads the last batch and marks real examples with ``mask``; every statistic is a
masked sum divided by the number of real examples, so nothing is dropped or counted twice.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsifiner_jax import models, sharding
from sparsifiner_jax.evaluation import recall as recall_lib

Array = jax.Array


def topk_accuracy(logits: Array, labels: Array, k: int) -> Array:
  """Per-example 0/1 whether ``labels`` is among the top-``k`` logits: ``[B]`` float32."""
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)


def per_example_stats(model, images, labels, *, recall: bool = False):
  """``{"correct1", "correct5", "loss", "density": [B], "layer_density": [B, depth]}`` for one batch;
  with ``recall`` also ``"recall": [B]`` and ``"layer_recall": [B, depth]`` (``recall.attention_recall``;
  it makes XLA compute the dense attention of every masked layer)."""
  logits, aux = model(images, train=False, with_attention=recall)
  k5 = min(5, logits.shape[-1])
  logp = jax.nn.log_softmax(logits)
  out = dict(correct1=topk_accuracy(logits, labels, 1),
             correct5=topk_accuracy(logits, labels, k5),
             loss=-jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0])
  dens = []
  for m in aux["masks"]:
    if m is None:
      dens.append(jnp.ones(logits.shape[:1]))
    else:
      dens.append(jnp.broadcast_to(m.density_per_example(), logits.shape[:1]))
  layer = jnp.stack(dens, axis=-1)
  out["layer_density"] = layer
  out["density"] = jnp.mean(layer, axis=-1)
  if recall:
    out["layer_recall"] = recall_lib.layer_recalls(aux, logits.shape[0])
    out["recall"] = jnp.mean(out["layer_recall"], axis=-1)
  return out


def make_eval_step(graphdef, mesh, *, recall: bool = False):
  """``step(params, rest, constants, images, labels, mask) -> sums`` jitted over ``mesh``: the masked
  per-batch sums of ``per_example_stats`` (and ``count``), replicated; the batch split over the batch
  axes, the parameters placed as they come. ``constants``: ``models.inference_constants`` of ``params``
  (None: the predictors compute them in the forward). ``recall`` adds the attention-recall sums; off by
  default, so the step that ``compile_for`` measures is the model's inference alone."""
  def step(params, rest, constants, images, labels, mask):
    model = models.use_constants(models.merge_params(graphdef, params, rest), constants)
    stats = per_example_stats(model, images, labels, recall=recall)
    w = mask.astype(jnp.float32)
    sums = {k: jnp.sum(v * (w if v.ndim == 1 else w[:, None]), axis=0) for k, v in stats.items()}
    sums["count"] = jnp.sum(w)
    return sums

  bs = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(None, None, None, bs, bs, bs), out_shardings=sharding.replicated(mesh))


class Evaluator:
  """Evaluates parameter groups on ``config.input.eval_split``; the jitted step is built once.

  ``run`` returns fractions averaged over the real examples: ``top1``, ``top5``, ``loss``,
  ``density``, ``layer_density`` (one per layer), and with ``recall`` (the default) ``recall`` (the
  layer mean) and ``layer_recall`` (``recall.attention_recall``); plus ``num_examples``.
  """

  def __init__(self, config, mesh, split: str | None = None, *, recall: bool = True):
    self.config = config
    self.mesh = mesh
    self.split = split or config.input.eval_split
    self.recall = recall
    self._fn = self._constants = None

  def _compiled(self, graphdef):
    if self._fn is None:
      self._fn = make_eval_step(graphdef, self.mesh, recall=self.recall)
      self._constants = jax.jit(functools.partial(models.inference_constants, graphdef))
    return self._fn

  def run(self, graphdef, params, rest) -> dict[str, Any]:
    from sparsifiner_jax.data import input_pipeline  # deferred: imports TensorFlow
    fn = self._compiled(graphdef)
    cfg = self.config
    it = input_pipeline.build_eval_iterator(
        cfg.input, self.split, img_size=cfg.model.img_size,
        local_batch_size=int(cfg.get("eval_batch_size", cfg.batch_size)) // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count())
    bs = sharding.batch_sharding(self.mesh)
    params = models.cast_kernels(params, cfg.model.dtype)    # once, not in every batch's forward
    constants = self._constants(params, rest)                # likewise the predictors' parameter-only work
    total = None
    for local in it:
      arrays = [jax.make_array_from_process_local_data(bs, local[k]) for k in ("image", "label", "mask")]
      sums = fn(params, rest, constants, *arrays)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.device_get(total)
    n = max(float(total["count"]), 1.0)
    out = dict(top1=float(total["correct1"]) / n, top5=float(total["correct5"]) / n,
               loss=float(total["loss"]) / n, density=float(total["density"]) / n,
               layer_density=[float(x) / n for x in np.asarray(total["layer_density"])])
    if self.recall:
      out.update(recall=float(total["recall"]) / n,
                 layer_recall=[float(x) / n for x in np.asarray(total["layer_recall"])])
    out["num_examples"] = int(total["count"])
    return out
