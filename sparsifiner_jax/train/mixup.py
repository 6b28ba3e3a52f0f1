"""Batch-level label mixing on the device (pure JAX, jit-able): ``mixup_cutmix`` (timm ``Mixup`` in batch
mode) and ``smooth_labels``. The per-example augmentations run in tf.data (``data.augment``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_labels(labels, num_classes: int, smoothing: float = 0.1):
  """One-hot targets with label smoothing (timm): off = smoothing / K, on = 1 - smoothing + off.

  Args:
    labels: int [B].
    num_classes: K.
    smoothing: total probability mass moved off the true class (spread over all K classes).

  Returns:
    float32 [B, K], rows sum to 1.
  """
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return onehot * (on - off) + off


def _box(rng, lam, h: int, w: int):
  """timm ``rand_bbox`` for a cut ratio sqrt(1 - lam): int32 (y0, y1, x0, x1), clipped to the image."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(h * ratio).astype(jnp.int32)
  cut_w = jnp.floor(w * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, h)
  cx = jax.random.randint(kx, (), 0, w)
  y0 = jnp.clip(cy - cut_h // 2, 0, h)
  y1 = jnp.clip(cy + cut_h // 2, 0, h)
  x0 = jnp.clip(cx - cut_w // 2, 0, w)
  x1 = jnp.clip(cx + cut_w // 2, 0, w)
  return y0, y1, x0, x1


def mixup_cutmix(rng, images, labels_onehot, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0):
  """timm ``Mixup`` in batch mode: one lambda per batch, each example mixed with the flipped batch.

  With probability ``prob`` the batch is mixed: CutMix (lambda ~ Beta(cutmix_alpha)) with probability
  ``switch_prob`` when both alphas are > 0, else MixUp (lambda ~ Beta(mixup_alpha)). CutMix pastes the
  box of ``images[::-1]`` (cut ratio sqrt(1 - lambda), centre uniform, clipped) and corrects lambda to
  1 - box area / image area. Targets = lambda * y + (1 - lambda) * y[::-1].

  Args:
    rng: a JAX PRNG key.
    images: float [B, H, W, C].
    labels_onehot: float [B, K] (e.g. from ``smooth_labels``), rows summing to 1.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that mode (static).
    switch_prob: probability of CutMix when both are enabled (static).
    prob: probability of mixing the batch at all (static).

  Returns:
    (images [B, H, W, C], targets [B, K]); targets rows sum to 1 when the inputs' do.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0 or prob <= 0:
    return images, labels_onehot
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  _, h, w, _ = images.shape
  flipped = images[::-1]
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, lam, 1.0)

  y0, y1, x0, x1 = _box(k_box, lam, h, w)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  box = box & use_cutmix & apply
  lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
  lam = jnp.where(use_cutmix & apply, lam_box, lam)

  lam_img = jnp.where(use_cutmix, 1.0, lam).astype(images.dtype)
  mixed = images * lam_img + flipped * (1 - lam_img)
  mixed = jnp.where(box[None, :, :, None], flipped, mixed)
  targets = labels_onehot * lam + labels_onehot[::-1] * (1.0 - lam)
  return mixed, targets.astype(labels_onehot.dtype)
