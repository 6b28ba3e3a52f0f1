"""Augmentation: the TF per-example ops, checked against PIL where timm uses PIL."""


import numpy as np
import pytest
import tensorflow as tf

from sparsifiner_jax.data import augment


@pytest.fixture(scope="module")
def photo():
  """A real 64x80 RGB crop of scikit-learn's bundled flower.jpg (uint8)."""
  from sklearn.datasets import load_sample_images
  return np.ascontiguousarray(load_sample_images().images[1][100:164, 200:280])


def _seed(*ints):
  return tf.constant(list(ints), tf.int64)


# ----------------------------------------------------------------------------- TF per-example ops


def test_parse_randaugment():
  cfg = augment.parse_randaugment("rand-m9-mstd0.5")
  assert (cfg.magnitude, cfg.num_layers, cfg.magnitude_std, cfg.prob) == (9.0, 2, 0.5, 0.5)
  cfg = augment.parse_randaugment("rand-m7-n3-mstd0-inc1")
  assert (cfg.magnitude, cfg.num_layers, cfg.magnitude_std, cfg.increasing) == (7.0, 3, 0.0, True)
  assert augment.parse_randaugment("") is None
  with pytest.raises(ValueError, match="cannot parse 'x9'"):
    augment.parse_randaugment("rand-x9")
  with pytest.raises(ValueError, match="must start with 'rand-'"):
    augment.parse_randaugment("auto-m9")


def test_randaugment_ops_match_pil(photo):
  """timm applies these ops with PIL: pixel ops match exactly, affine ops (bilinear) within 1."""
  pil_image = pytest.importorskip("PIL.Image")
  from PIL import ImageEnhance, ImageOps
  pil = pil_image.fromarray(photo)
  fill = (124, 116, 104)
  x = tf.constant(photo, tf.float32)
  w, h = pil.size
  f = 8 / 10 * 1.8 + 0.1
  bil = pil_image.BILINEAR
  want = {
      ("AutoContrast", 9, 1): ImageOps.autocontrast(pil),
      ("Equalize", 9, 1): ImageOps.equalize(pil),
      ("Invert", 9, 1): ImageOps.invert(pil),
      ("Posterize", 9, 1): ImageOps.posterize(pil, 3),
      ("Solarize", 5, 1): ImageOps.solarize(pil, 128),
      ("Color", 8, 1): ImageEnhance.Color(pil).enhance(f),
      ("Contrast", 8, 1): ImageEnhance.Contrast(pil).enhance(f),
      ("Brightness", 8, 1): ImageEnhance.Brightness(pil).enhance(f),
      ("Sharpness", 8, 1): ImageEnhance.Sharpness(pil).enhance(f),
      ("Rotate", 5, -1): pil.rotate(-15, resample=bil, fillcolor=fill),
      ("ShearX", 5, 1): pil.transform(pil.size, pil_image.AFFINE, (1, .15, 0, 0, 1, 0), bil,
                                      fillcolor=fill),
      ("ShearY", 5, -1): pil.transform(pil.size, pil_image.AFFINE, (1, 0, 0, -.15, 1, 0), bil,
                                       fillcolor=fill),
      ("TranslateXRel", 10 * 0.1 / 0.45, 1): pil.transform(
          pil.size, pil_image.AFFINE, (1, 0, 0.1 * w, 0, 1, 0), bil, fillcolor=fill),
      ("TranslateYRel", 10 * 0.25 / 0.45, -1): pil.transform(
          pil.size, pil_image.AFFINE, (1, 0, 0, 0, 1, -0.25 * h), bil, fillcolor=fill),
  }
  for (name, level, sign), ref in want.items():
    got = augment.apply_op(x, augment.RAND_OPS.index(name), tf.constant(level, tf.float32),
                           tf.constant(float(sign)), fill=fill).numpy()
    diff = np.abs(got - np.asarray(ref, np.float32))
    tol = 1.0 if name.startswith(("Rotate", "Shear", "Translate")) else 0.0
    assert diff.max() <= tol, (name, diff.max())
  solarize_add = augment.apply_op(x, augment.RAND_OPS.index("SolarizeAdd"), tf.constant(10.0),
                                  tf.constant(1.0)).numpy()
  np.testing.assert_array_equal(solarize_add, np.where(photo < 128, np.minimum(photo + 110.0, 255),
                                                       photo))


def test_default_randaugment_is_the_official_string():
  """DeiT / Sparsifiner train with "rand-m9-mstd0.5-inc1"; the default and the recipe configs say so."""
  from configs import common, deit_s_sparsifiner
  from sparsifiner_jax.data import options
  official = "rand-m9-mstd0.5-inc1"
  assert options.default_config().randaugment == official
  assert common.base_config().input.randaugment == official
  assert deit_s_sparsifiner.get_config().input.randaugment == official
  cfg = augment.parse_randaugment(official)
  assert (cfg.magnitude, cfg.num_layers, cfg.magnitude_std, cfg.increasing) == (9.0, 2, 0.5, True)
  assert not augment.parse_randaugment("rand-m9-mstd0.5").increasing


@pytest.mark.parametrize("sign", [1, -1])
def test_inc1_ops_match_timm_increasing_transforms(photo, timm, monkeypatch, sign):
  """``inc1`` applies timm's ``_RAND_INCREASING_TRANSFORMS``: each op, at timm's own level-to-argument
  rule and PIL op, gives the same pixels; ``inc0`` differs where the two variants differ."""
  from PIL import Image
  aa = timm.data.auto_augment
  assert [n.replace("Increasing", "") for n in aa._RAND_INCREASING_TRANSFORMS] == list(augment.RAND_OPS)
  # timm's _randomly_negate negates when random.random() > 0.5: fix the sign it draws.
  monkeypatch.setattr(aa.random, "random", lambda: 0.0 if sign > 0 else 1.0)
  pil = Image.fromarray(photo)
  x = tf.constant(photo, tf.float32)
  for name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
    timm_name = name + "Increasing"
    assert timm_name in aa._RAND_INCREASING_TRANSFORMS
    for level in (3.0, 9.0):
      args = aa.LEVEL_TO_ARG[timm_name](level, dict(aa._HPARAMS_DEFAULT))
      want = np.asarray(aa.NAME_TO_OP[timm_name](pil, *args), np.float32)
      op = augment.RAND_OPS.index(name)
      got, plain = (augment.apply_op(x, op, tf.constant(level), tf.constant(float(sign)),
                                     increasing=inc).numpy() for inc in (True, False))
      np.testing.assert_array_equal(got, want, err_msg=f"{name} level {level} sign {sign}")
      assert not np.array_equal(plain, want), (name, level)


def test_randaugment_is_seeded_and_keeps_uint8_range(photo):
  cfg = augment.parse_randaugment("rand-m9-mstd0.5")
  x = tf.constant(photo, tf.float32)
  outs = [augment.randaugment(x, _seed(1, k), cfg).numpy() for k in range(4)]
  again = augment.randaugment(x, _seed(1, 0), cfg).numpy()
  np.testing.assert_array_equal(outs[0], again)
  for o in outs:
    assert o.shape == photo.shape and o.min() >= 0 and o.max() <= 255
    np.testing.assert_array_equal(o, np.round(o))
  assert len({o.tobytes() for o in outs}) > 1


def test_rrc_window_in_bounds_and_fallback():
  for k in range(20):
    top, left, h, w = (int(v) for v in augment.rrc_window(tf.constant([50, 80]), _seed(0, k)))
    assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80
    assert 0.08 * 4000 * 0.5 <= h * w <= 4000
  # Nothing of area >= 90 % fits a square in a 10x1000 strip: centre crop clamped to ratio 1.
  win = augment.rrc_window(tf.constant([10, 1000]), _seed(0, 0), scale=(0.9, 1.0), ratio=(1.0, 1.0))
  assert tuple(int(v) for v in win) == (0, 495, 10, 10)


def test_random_resized_crop_from_bytes_matches_decoded(photo):
  png = tf.io.encode_png(photo)
  jpg = tf.io.encode_jpeg(photo, quality=95)
  s = _seed(3, 4)
  ref = augment.random_resized_crop(tf.constant(photo), s, 32).numpy()
  assert ref.shape == (32, 32, 3) and 0 <= ref.min() and ref.max() <= 255
  np.testing.assert_array_equal(augment.decode_random_resized_crop(png, s, 32).numpy(), ref)
  from_jpg = augment.decode_random_resized_crop(jpg, s, 32).numpy()
  ref_jpg = augment.random_resized_crop(tf.io.decode_jpeg(jpg), s, 32).numpy()
  assert np.abs(from_jpg - ref_jpg).mean() < 2.0
  other = augment.random_resized_crop(tf.constant(photo), _seed(3, 5), 32).numpy()
  assert not np.array_equal(other, ref)


def test_eval_resize_crop_timm_geometry(photo):
  # 64x80, img 56, crop_pct 0.875: shorter side already 64 -> centre crop (4, 12).
  out = augment.eval_resize_crop(tf.constant(photo), 56, 0.875).numpy()
  np.testing.assert_allclose(out, photo[4:60, 12:68], atol=1.0)
  out = augment.eval_resize_crop(tf.constant(photo), 16, 1.0)
  assert out.shape == (16, 16, 3)
  norm = augment.normalize(tf.fill([2, 2, 3], 255.0), (0.5, 0.5, 0.5), (0.5, 0.25, 1.0)).numpy()
  np.testing.assert_allclose(norm[0, 0], [1.0, 2.0, 0.5])


def test_flip_and_random_erasing():
  x = tf.reshape(tf.range(2 * 3 * 1, dtype=tf.float32), [2, 3, 1])
  flips = {augment.random_flip(x, _seed(0, k)).numpy().tobytes() for k in range(10)}
  assert flips == {x.numpy().tobytes(), x.numpy()[:, ::-1].tobytes()}
  img = tf.fill([32, 32, 3], 7.0)
  assert np.all(augment.random_erasing(img, _seed(0, 1), prob=0.0).numpy() == 7.0)
  for k in range(5):
    out = augment.random_erasing(img, _seed(0, k), prob=1.0).numpy()
    erased = np.any(out != 7.0, axis=-1)
    rows, cols = np.nonzero(erased)
    assert erased.any()
    # One axis-aligned box of area 2 %..33 %, every channel erased.
    assert erased.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    assert 0.01 * 1024 <= erased.sum() <= 0.34 * 1024
    assert np.all(out[erased] != 7.0)
