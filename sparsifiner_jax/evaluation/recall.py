"""Attention recall: how much of the dense attention's probability mass a sparse mask keeps.

For one query row, recall is the sum of the dense softmax probabilities at the keys the mask keeps,
divided by their sum over the live keys (1 without token pruning). A dense layer (no mask) and a mask
that keeps every live key have recall 1. Tokens pruned in ``"mask"`` mode (``AttentionMask.key_valid``)
count neither as keys nor as query rows: the dense reference is then the softmax over the live keys,
which is ``aux["attn"]`` (a softmax over every key) renormalised over them.

The mask is read only through ``AttentionMask.to_dense()`` (and ``key_valid``), so every mask layout
and pattern gives the same figure. Everything here is a reduction that runs inside a jitted step; the
``[B, H, N, N]`` operands never leave the device.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from sparsifiner_jax.attention.mask import AttentionMask

Array = jax.Array


def attention_recall(attn: Array, mask: AttentionMask | None) -> Array:
  """Per-example attention recall of one layer: ``[B]`` float32 in ``[0, 1]``.

  Args:
    attn: ``[B, H, N, N]`` dense softmax attention (``aux["attn"][i]``) from the same ``q``, ``k`` as
      ``mask``.
    mask: the layer's mask (``to_dense()`` is ``[B|1, H|1, N, N]`` bool), or None for a dense layer.

  Returns:
    For each example, the kept share of each live query row's dense probability mass, averaged over
    heads and live query rows (every row when ``mask.key_valid`` is None). Ones for a dense layer.
  """
  batch, heads = attn.shape[:2]
  if mask is None:
    return jnp.ones((batch,), jnp.float32)
  p = attn.astype(jnp.float32)
  kept = jnp.sum(jnp.where(mask.to_dense(), p, 0.0), axis=-1)                  # [B, H, N]
  live = mask.key_valid                                                        # [B, N] or None
  total = jnp.sum(p if live is None else jnp.where(live[:, None, None, :], p, 0.0), axis=-1)
  row = kept / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)                 # [B, H, N]
  if live is None:
    return jnp.mean(row, axis=(1, 2))
  rows = live.astype(jnp.float32)                                              # [B, N]
  return jnp.sum(row * rows[:, None, :], axis=(1, 2)) / (heads * jnp.sum(rows, axis=-1))


def layer_recalls(aux: dict[str, Any], batch: int) -> Array:
  """Recall of every layer of a forward's ``aux`` (``masks`` and ``attn`` lists, the model called with
  ``with_attention=True``): ``[B, depth]``. Layers without a mask give ones.
  """
  masks: Sequence[AttentionMask | None] = aux["masks"]
  if any(m is not None and a is None for m, a in zip(masks, aux["attn"])):
    raise ValueError("attention recall needs the dense attention: call the model with with_attention=True")
  cols = [jnp.ones((batch,), jnp.float32) if m is None else attention_recall(a, m)
          for m, a in zip(masks, aux["attn"])]
  return jnp.stack(cols, axis=-1)
