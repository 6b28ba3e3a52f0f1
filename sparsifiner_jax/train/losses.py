"""Training losses (docs/method.md, "Losses").

All return float32 scalars averaged as the official code does.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from sparsifiner_jax.attention import blocks

Array = jax.Array


def soft_cross_entropy(logits: Array, targets: Array, weights: Array | None = None) -> Array:
  """timm SoftTargetCrossEntropy: mean over the batch of -sum(targets * log_softmax(logits))."""
  per = -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
  return _mean(per, weights)


def kd_kl(student_logits: Array, teacher_logits: Array, temperature: float = 1.0,
          weights: Array | None = None) -> Array:
  """KL(p_teacher || p_student) on logits, 'batchmean' (summed over classes, mean over batch), times T^2."""
  t = temperature
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
  log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t)
  per = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  return _mean(per, weights) * t * t


def token_mse(student_tokens: Array, teacher_tokens: Array, weights: Array | None = None) -> Array:
  """Mean squared error over all elements of the final patch tokens ``[B, N-1, D]``."""
  diff = student_tokens.astype(jnp.float32) - jax.lax.stop_gradient(teacher_tokens).astype(jnp.float32)
  per = jnp.mean(jnp.square(diff), axis=(1, 2))
  return _mean(per, weights)


def attention_reconstruction(approx: Sequence[Array], teacher_attn: Sequence[Array],
                             reference_batch: int, block: int = 0) -> Array:
  """Sum-reduced squared error between Â ``[B, H, N-1, N]`` and the teacher's patch rows, mean over layers.

  Block mode (``block`` > 0): between the predictor's block scores ``[B, H, nb, nb]`` and the teacher's
  attention mass per block (``blocks.attention_mass``), as SeerAttention trains its block gate.

  The official loss sums over (batch, heads, rows, columns) on each of 8 GPUs with a per-GPU batch of 168
  and DDP averages the gradients, so its scale is that of a sum over ``reference_batch`` examples.
  Here the sum over the global batch is rescaled by ``reference_batch / B`` so the loss weight (0.01)
  means the same thing at any batch size or device count.
  """
  pairs = [(a, t) for a, t in zip(approx, teacher_attn) if a is not None]
  if not pairs:
    raise ValueError("attention reconstruction needs a Sparsifiner model (no layer has a predictor)")
  target = ((lambda t: blocks.attention_mass(t, block)) if block
            else (lambda t: t[:, :, 1:, :].astype(jnp.float32)))
  terms = [jnp.sum(jnp.square(a.astype(jnp.float32) - jax.lax.stop_gradient(target(t))))
           for a, t in pairs]
  return jnp.mean(jnp.stack(terms)) * (reference_batch / pairs[0][0].shape[0])


def _mean(per: Array, weights: Array | None) -> Array:
  if weights is None:
    return jnp.mean(per)
  w = weights.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
