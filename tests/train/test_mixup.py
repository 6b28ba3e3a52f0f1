"""Mixup / CutMix and label smoothing: the JAX batch ops the train step applies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsifiner_jax.train import mixup


def test_smooth_labels_timm_convention():
  y = mixup.smooth_labels(jnp.array([0, 3]), 10, smoothing=0.1)
  assert y.shape == (2, 10)
  np.testing.assert_allclose(y[0, 0], 1 - 0.1 + 0.01, rtol=1e-6)
  np.testing.assert_allclose(y[0, 1:], 0.01, rtol=1e-6)
  np.testing.assert_allclose(y[1, 3], 0.91, rtol=1e-6)
  np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(mixup.smooth_labels(jnp.array([2]), 4, 0.0), [[0, 0, 1, 0]])


def _batch(b=4, h=8, w=6, seed=0):
  x = jax.random.normal(jax.random.key(seed), (b, h, w, 3))
  y = jax.nn.one_hot(jnp.arange(b), b)  # distinct classes: lambda is readable from the targets
  return x, y


def test_mixup_is_a_convex_mix_with_the_flipped_batch():
  x, y = _batch()
  fn = jax.jit(functools.partial(mixup.mixup_cutmix, mixup_alpha=0.8, cutmix_alpha=0.0))
  for k in range(3):
    xm, t = fn(jax.random.key(k), x, y)
    lam = float(t[0, 0])
    assert 0 <= lam <= 1
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t, lam * y + (1 - lam) * y[::-1], atol=1e-6)
    np.testing.assert_allclose(xm, lam * x + (1 - lam) * x[::-1], atol=1e-5)


def test_cutmix_pastes_one_box_and_corrects_lambda():
  x, y = _batch(b=4, h=16, w=12)  # even: no example is its own mirror
  fn = jax.jit(functools.partial(mixup.mixup_cutmix, mixup_alpha=0.0, cutmix_alpha=1.0))
  saw_box = False
  for k in range(6):
    xm, t = fn(jax.random.key(k), x, y)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    from_flip = np.all(np.asarray(xm) == np.asarray(x[::-1]), axis=-1)  # [B, H, W]
    from_self = np.all(np.asarray(xm) == np.asarray(x), axis=-1)
    assert np.all(from_flip | from_self)
    # One box for the whole batch; lambda = 1 - box area / image area.
    box = from_flip[0] & ~from_self[0]
    for i in range(4):
      np.testing.assert_array_equal(from_flip[i] & ~from_self[i], box)
    np.testing.assert_allclose(float(t[0, 0]), 1 - box.mean(), atol=1e-6)
    saw_box |= bool(box.any())
  assert saw_box


def test_mixup_cutmix_switch_prob_and_jit():
  x, y = _batch(b=4, h=16, w=16)
  y = mixup.smooth_labels(jnp.arange(4), 4, 0.1)
  fn = jax.jit(functools.partial(mixup.mixup_cutmix, mixup_alpha=0.8, cutmix_alpha=1.0,
                                 switch_prob=0.5))
  modes = set()
  for k in range(12):
    xm, t = fn(jax.random.key(k), x, y)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-5)
    exact = np.all(np.asarray(xm) == np.asarray(x), axis=-1) | np.all(
        np.asarray(xm) == np.asarray(x[::-1]), axis=-1)
    modes.add("cutmix" if exact.all() else "mixup")
  assert modes == {"cutmix", "mixup"}
  off = jax.jit(functools.partial(mixup.mixup_cutmix, prob=0.0))
  xm, t = off(jax.random.key(0), x, y)
  np.testing.assert_array_equal(xm, x)
  np.testing.assert_array_equal(t, y)
  a = fn(jax.random.key(3), x, y)
  b = fn(jax.random.key(3), x, y)
  np.testing.assert_array_equal(a[0], b[0])
