"""Optimisers and schedules: a fresh AdamW per training phase (docs/method.md).

Decoupled weight decay skips 1-D parameters (biases, LayerNorm scales), ``cls_token`` and ``pos_embed``;
the predictor's matrices (incl. ``proj_n``/``proj_back_n``) are decayed, as in the official code.
"""

from __future__ import annotations

import jax
import optax

NO_DECAY_NAMES = ("cls_token", "pos_embed", "dist_token")


def decay_mask(params):
  """True where weight decay applies: parameters with ndim >= 2 other than cls/pos embeddings."""
  def keep(path, x):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return x.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def warmup_cosine(base_lr: float, final_lr: float, warmup_steps: int, total_steps: int):
  """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then half-cosine to ``final_lr``.

  Per optimiser step, restarting at each phase's start (the official per-iteration schedule).
  """
  total_steps = max(int(total_steps), 1)
  warmup_steps = min(int(warmup_steps), total_steps)
  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, base_lr, total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, total_steps, final_lr)


def adamw(params, *, schedule, weight_decay: float, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, grad_clip: float | None = None) -> optax.GradientTransformation:
  tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                   mask=decay_mask(params))
  if grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx
