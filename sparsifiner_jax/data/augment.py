"""DeiT data augmentation: per-example TF ops for tf.data (batch-level mixing: ``train.mixup``).

Per-example (TensorFlow, graph-mode, for ``tf.data.Dataset.map``). Every random choice is a stateless
TF random op keyed by an explicit ``seed`` (int64 [2]), so an example's augmentation is a pure function
of (image, seed): the input pipeline derives the seed from (run seed, global example position).

  * ``random_resized_crop``: timm ``RandomResizedCrop`` (10 area/log-ratio attempts, first that fits,
    else a centre crop clamped to the ratio range), bicubic resize with antialiasing.
  * ``random_flip``: horizontal flip with probability 1/2.
  * ``randaugment``: timm ``rand-m{M}[-n{N}][-mstd{S}][-mmax{X}][-p{P}][-inc{0|1}]`` (default
    "rand-m9-mstd0.5-inc1", the DeiT / Sparsifiner recipe: 2 ops drawn with replacement from
    AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, SolarizeAdd, Color, Contrast,
    Brightness, Sharpness, ShearX/Y, TranslateX/Y (relative), each applied with probability 0.5 at
    magnitude ~ N(M, S) clipped to [0, X=10]). ``inc1`` swaps in timm's ``_RAND_INCREASING_TRANSFORMS``:
    Posterize, Solarize, Color, Contrast, Brightness and Sharpness grow stronger with the magnitude
    (enhance factor 1 +- 0.9 M/10 with a random sign, instead of 0.1 + 1.8 M/10; 4 - 0.4 M bits
    kept; threshold 256 - 25.6 M). Affine ops fill with the mean colour and interpolate bilinearly
    (TF has no bicubic affine warp).
  * ``random_erasing``: timm ``RandomErasing(mode="pixel", max_count=1)`` on the normalised image.
  * ``eval_resize_crop``: resize the shorter side to ``floor(img_size / crop_pct)`` (bicubic), then
    centre-crop ``img_size``.

Images between ops are float32 [H, W, 3] holding integral values in 0..255 (a uint8 image, as timm's
PIL pipeline keeps it) until ``normalize``.

"""

from __future__ import annotations

import dataclasses
import math
import re

import tensorflow as tf

try:  # TF must never take a GPU from JAX.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # the TF context was already initialised by someone else
  pass

_LEVEL_DENOM = 10.0

# ----------------------------------------------------------------------------- per-example (TF)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval)


def _randint(seed, lo, hi):
  """Uniform int32 in [lo, hi] (inclusive, like Python's random.randint); lo, hi int32 tensors."""
  u = _uniform(seed)
  span = tf.cast(hi - lo + 1, tf.float32)
  return lo + tf.minimum(tf.cast(tf.floor(u * span), tf.int32), hi - lo)


def split_seed(seed, num: int):
  """Splits an int [2] seed into ``num`` independent [2] seeds ([num, 2])."""
  return tf.random.experimental.stateless_split(seed, num=num)


def rrc_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """timm ``RandomResizedCrop.get_params``: returns int32 (top, left, height, width).

  Args:
    shape: int [>=2], the image's (height, width, ...).
    seed: int [2] stateless seed.
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    attempts: tries before falling back to a centre crop.
  """
  h = tf.cast(shape[0], tf.int32)
  w = tf.cast(shape[1], tf.int32)
  area = tf.cast(h * w, tf.float32)
  s = split_seed(seed, 4)
  target_area = area * _uniform(s[0], [attempts], scale[0], scale[1])
  log_r = _uniform(s[1], [attempts], math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_r)
  cw = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  ch = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  cw_i, ch_i = cw[first], ch[first]
  u = _uniform(s[2], [2])
  top_r = tf.minimum(tf.cast(tf.floor(u[0] * tf.cast(h - ch_i + 1, tf.float32)), tf.int32), h - ch_i)
  left_r = tf.minimum(tf.cast(tf.floor(u[1] * tf.cast(w - cw_i + 1, tf.float32)), tf.int32), w - cw_i)
  # Fallback: whole image, clamped to the ratio range, centred.
  in_ratio = tf.cast(w, tf.float32) / tf.cast(h, tf.float32)
  fw = tf.where(in_ratio > ratio[1], tf.cast(tf.round(tf.cast(h, tf.float32) * ratio[1]), tf.int32), w)
  fh = tf.where(in_ratio < ratio[0], tf.cast(tf.round(tf.cast(w, tf.float32) / ratio[0]), tf.int32), h)
  fw, fh = tf.clip_by_value(fw, 1, w), tf.clip_by_value(fh, 1, h)
  any_ok = tf.reduce_any(ok)
  ch_o = tf.where(any_ok, ch_i, fh)
  cw_o = tf.where(any_ok, cw_i, fw)
  top = tf.where(any_ok, top_r, (h - fh) // 2)
  left = tf.where(any_ok, left_r, (w - fw) // 2)
  return top, left, ch_o, cw_o


def resize(image, size, antialias: bool = True):
  """Bicubic resize of an image to ``size`` (h, w); float32 rounded and clipped to 0..255."""
  out = tf.image.resize(tf.cast(image, tf.float32), size, method="bicubic", antialias=antialias)
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def random_resized_crop(image, seed, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop of a uint8/float [H, W, 3] image to float32 [size, size, 3] in 0..255."""
  top, left, h, w = rrc_window(tf.shape(image), seed, scale, ratio)
  crop = image[top:top + h, left:left + w]
  return resize(crop, (size, size))


def decode_random_resized_crop(image_bytes, seed, size: int, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)):
  """Decodes an encoded image (JPEG: only the crop window) and applies RandomResizedCrop.

  Same result as ``random_resized_crop(decode(image_bytes), seed, ...)`` up to JPEG decoding details,
  but JPEGs are only decoded inside the sampled window (``tf.image.decode_and_crop_jpeg``).
  """
  is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, 3), b"\xff\xd8\xff")

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    top, left, h, w = rrc_window(shape, seed, scale, ratio)
    return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([top, left, h, w]), channels=3)

  def other():
    image = decode_image(image_bytes)
    top, left, h, w = rrc_window(tf.shape(image), seed, scale, ratio)
    return image[top:top + h, left:left + w]

  crop = tf.cond(is_jpeg, jpeg, other)
  return resize(crop, (size, size))


def decode_image(image_bytes):
  """Decodes PNG/JPEG/BMP/GIF bytes to uint8 [H, W, 3] (grey is replicated to RGB)."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def random_flip(image, seed):
  """Flips [H, W, C] left-right with probability 1/2."""
  return tf.cond(_uniform(seed) < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)


def eval_resize_crop(image, img_size: int, crop_pct: float = 0.875):
  """timm eval transform: shorter side to floor(img_size / crop_pct) (bicubic), centre crop.

  Args:
    image: uint8/float [H, W, 3].
    img_size: output side.
    crop_pct: fraction of the resized shorter side kept by the centre crop.

  Returns:
    float32 [img_size, img_size, 3] in 0..255.
  """
  scale_size = int(math.floor(img_size / crop_pct))
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  long_ = tf.maximum(h, w)
  new_long = tf.cast(tf.floor(scale_size * tf.cast(long_, tf.float64) / tf.cast(short, tf.float64)),
                     tf.int32)
  new_long = tf.maximum(new_long, scale_size)
  nh = tf.where(h <= w, scale_size, new_long)
  nw = tf.where(h <= w, new_long, scale_size)
  image = resize(image, tf.stack([nh, nw]))
  top = tf.cast(tf.round(tf.cast(nh - img_size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(nw - img_size, tf.float32) / 2.0), tf.int32)
  image = image[top:top + img_size, left:left + img_size]
  return tf.ensure_shape(image, [img_size, img_size, 3])


def normalize(image, mean, std):
  """0..255 image -> (image / 255 - mean) / std, float32."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def random_erasing(image, seed, prob: float = 0.25, area=(0.02, 1 / 3), log_ratio_range=(0.3, 1 / 0.3),
                   attempts: int = 10):
  """timm RandomErasing, pixel mode, one box: with probability ``prob`` fills a random box with N(0, 1).

  Args:
    image: normalised float32 [H, W, C].
    seed: int [2].
    prob: probability of erasing.
    area: range of the box's area as a fraction of the image's.
    log_ratio_range: range of the box's aspect ratio (sampled log-uniformly).
    attempts: tries to find a box that fits strictly inside; if none does, nothing is erased.
  """
  if prob <= 0:
    return image
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  s = split_seed(seed, 5)
  total = tf.cast(h * w, tf.float32)
  target = total * _uniform(s[0], [attempts], area[0], area[1])
  aspect = tf.exp(_uniform(s[1], [attempts], math.log(log_ratio_range[0]), math.log(log_ratio_range[1])))
  bh = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  bw = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  ok = (bw < w) & (bh < h)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  bh, bw = bh[first], bw[first]
  st = split_seed(s[2], 2)
  top = _randint(st[0], 0, h - bh)
  left = _randint(st[1], 0, w - bw)
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
  do = (_uniform(s[3]) < prob) & tf.reduce_any(ok)
  noise = tf.random.stateless_normal(tf.shape(image), seed=s[4], dtype=image.dtype)
  return tf.where(box[:, :, None] & do, noise, image)


# ----------------------------------------------------------------------------- RandAugment (TF)


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  """Parsed timm RandAugment spec ("rand-m9-mstd0.5")."""

  magnitude: float = 9.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = _LEVEL_DENOM
  prob: float = 0.5
  increasing: bool = False


def parse_randaugment(spec: str) -> RandAugmentConfig | None:
  """Parses "rand-m9-mstd0.5[-n2][-mmax10][-p0.5][-inc1]"; "" -> None (off). Raises ValueError."""
  if not spec:
    return None
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"randaugment {spec!r} must start with 'rand-' (e.g. 'rand-m9-mstd0.5')")
  kw = {}
  for part in parts[1:]:
    m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([0-9.]+|inf)", part)
    if not m:
      raise ValueError(f"randaugment {spec!r}: cannot parse {part!r} (known: m<float>, n<int>, "
                       "mstd<float>, mmax<float>, p<float>, inc<0|1>)")
    key, val = m.groups()
    if key == "m":
      kw["magnitude"] = float(val)
    elif key == "n":
      kw["num_layers"] = int(float(val))
    elif key == "mstd":
      kw["magnitude_std"] = float(val)
    elif key == "mmax":
      kw["magnitude_max"] = float(val)
    elif key == "p":
      kw["prob"] = float(val)
    else:
      kw["increasing"] = bool(int(float(val)))
  return RandAugmentConfig(**kw)


def _blend(degenerate, image, factor):
  return tf.clip_by_value(tf.floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _grey(image):
  """PIL "L" conversion (ITU-R 601-2 luma), rounded; [H, W, 1]."""
  w = tf.constant([0.299, 0.587, 0.114], tf.float32)
  return tf.round(tf.reduce_sum(image * w, axis=-1, keepdims=True))


def _autocontrast(image):
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  out = tf.clip_by_value(tf.floor((image - lo) * scale), 0.0, 255.0)
  return tf.where(hi > lo, out, image)


def _equalize_channel(ch):
  """PIL ImageOps.equalize on one channel float [H, W] of integral values."""
  idx = tf.cast(ch, tf.int32)
  hist = tf.math.bincount(tf.reshape(idx, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  last = nonzero[-1]
  step = (tf.reduce_sum(hist) - last) // 255
  safe = tf.maximum(step, 1)
  lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // safe
  lut = tf.clip_by_value(lut, 0, 255)
  out = tf.cast(tf.gather(lut, idx), tf.float32)
  return tf.where(step > 0, out, ch)


def _equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _affine(image, coeffs, fill):
  """PIL ``Image.transform(AFFINE, coeffs, BILINEAR, fillcolor=fill)`` of float [H, W, 3] 0..255.

  ``coeffs`` (a, b, c, d, e, f) map an output point to the input point (a x + b y + c, d x + e y + f)
  in PIL's continuous coordinates (pixel centres at +0.5). As in PIL, an output pixel whose source
  point falls outside the image takes ``fill``; inside, bilinear sampling clamps at the edges.
  """
  a, b, c, d, e, f = tf.unstack(tf.cast(coeffs, tf.float32))
  # TF samples at integer pixel centres: shift the translation by half a pixel on both sides.
  t = tf.stack([a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), 0.0, 0.0])[None]
  shape = tf.shape(image)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=t, output_shape=shape, fill_value=0.0,
      interpolation="BILINEAR", fill_mode="NEAREST")[0]
  hw = tf.cast(shape, tf.float32)
  ys = tf.range(hw[0])[:, None] + 0.5
  xs = tf.range(hw[1])[None, :] + 0.5
  x_in = a * xs + b * ys + c
  y_in = d * xs + e * ys + f
  inside = (x_in >= 0) & (x_in < hw[1]) & (y_in >= 0) & (y_in < hw[0])
  out = tf.clip_by_value(tf.floor(out), 0.0, 255.0)
  return tf.where(inside[:, :, None], out, tf.constant(fill, tf.float32))


def _rotate(image, degrees, fill):
  """Counter-clockwise rotation about the centre (PIL ``Image.rotate``)."""
  theta = degrees * math.pi / 180.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  cy, cx = hw[0] / 2, hw[1] / 2
  t = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])
  return _affine(image, t, fill)


def _sharpness(image, factor):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.round(smooth)
  # PIL leaves the one-pixel border unfiltered.
  padded = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  hh, ww = tf.shape(image)[0], tf.shape(image)[1]
  rows = tf.range(hh)[:, None]
  cols = tf.range(ww)[None, :]
  inner = (rows > 0) & (rows < hh - 1) & (cols > 0) & (cols < ww - 1)
  degenerate = tf.where(inner[:, :, None], padded, image)
  return _blend(degenerate, image, factor)


def _op_fns(fill, increasing: bool):
  """The 15 RandAugment ops as fns (image, level in [0, X], sign in {-1, 1}) -> image."""

  def enhance(level, sign):
    if increasing:  # timm's *Increasing enhance ops: 1.0 is "no change"; kept >= 0.1 as timm does
      return tf.maximum(0.1, 1.0 + sign * (level / _LEVEL_DENOM) * 0.9)
    return (level / _LEVEL_DENOM) * 1.8 + 0.1

  def posterize(img, level, sign):
    del sign
    bits = tf.cast(tf.floor(level / _LEVEL_DENOM * 4), tf.int32)
    if increasing:
      bits = 4 - bits
    div = tf.cast(tf.bitwise.left_shift(1, 8 - tf.clip_by_value(bits, 0, 8)), tf.float32)
    return tf.floor(img / div) * div

  def solarize(img, level, sign):
    del sign
    thresh = tf.minimum(tf.floor(level / _LEVEL_DENOM * 256), 256.0)
    if increasing:
      thresh = 256 - thresh
    return tf.where(img >= thresh, 255.0 - img, img)

  def solarize_add(img, level, sign):
    del sign
    add = tf.minimum(tf.floor(level / _LEVEL_DENOM * 110), 128.0)
    return tf.where(img < 128, tf.minimum(img + add, 255.0), img)

  def color(img, level, sign):
    return _blend(tf.tile(_grey(img), [1, 1, 3]), img, enhance(level, sign))

  def contrast(img, level, sign):
    mean = tf.floor(tf.reduce_mean(_grey(img)) + 0.5)
    return _blend(tf.fill(tf.shape(img), mean), img, enhance(level, sign))

  def brightness(img, level, sign):
    return _blend(tf.zeros_like(img), img, enhance(level, sign))

  def sharpness(img, level, sign):
    return _sharpness(img, enhance(level, sign))

  def shear(axis):
    def fn(img, level, sign):
      f = sign * level / _LEVEL_DENOM * 0.3
      t = [1.0, f, 0.0, 0.0, 1.0, 0.0] if axis == "x" else [1.0, 0.0, 0.0, f, 1.0, 0.0]
      return _affine(img, tf.stack(t), fill)
    return fn

  def translate(axis):
    def fn(img, level, sign):
      pct = sign * level / _LEVEL_DENOM * 0.45
      hw = tf.cast(tf.shape(img)[:2], tf.float32)
      if axis == "x":
        t = [1.0, 0.0, pct * hw[1], 0.0, 1.0, 0.0]
      else:
        t = [1.0, 0.0, 0.0, 0.0, 1.0, pct * hw[0]]
      return _affine(img, tf.stack(t), fill)
    return fn

  return [
      ("AutoContrast", lambda img, level, sign: _autocontrast(img)),
      ("Equalize", lambda img, level, sign: _equalize(img)),
      ("Invert", lambda img, level, sign: 255.0 - img),
      ("Rotate", lambda img, level, sign: _rotate(img, sign * level / _LEVEL_DENOM * 30.0, fill)),
      ("Posterize", posterize),
      ("Solarize", solarize),
      ("SolarizeAdd", solarize_add),
      ("Color", color),
      ("Contrast", contrast),
      ("Brightness", brightness),
      ("Sharpness", sharpness),
      ("ShearX", shear("x")),
      ("ShearY", shear("y")),
      ("TranslateXRel", translate("x")),
      ("TranslateYRel", translate("y")),
  ]


RAND_OPS = tuple(name for name, _ in _op_fns((0, 0, 0), False))


def apply_op(image, op_index, level, sign, *, fill=(124, 116, 104), increasing: bool = False):
  """Applies RandAugment op ``RAND_OPS[op_index]`` at ``level`` (0..10) to float [H, W, 3] 0..255.

  ``op_index == len(RAND_OPS)`` returns the image unchanged.
  """
  fns = _op_fns(fill, increasing)
  branches = [lambda f=f: f(image, level, sign) for _, f in fns] + [lambda: image]
  out = tf.switch_case(tf.cast(op_index, tf.int32), branches)
  return tf.ensure_shape(out, image.shape)


def randaugment(image, seed, cfg: RandAugmentConfig, fill=(124, 116, 104)):
  """timm RandAugment on float32 [H, W, 3] 0..255: ``cfg.num_layers`` ops with replacement.

  Each op is applied with probability ``cfg.prob`` at magnitude N(m, mstd) clipped to [0, mmax]
  (mstd=inf: uniform in [0, m]); signed ops (rotate/shear/translate, increasing enhance) flip sign
  with probability 1/2. The layers run in a ``tf.while_loop`` so the op graph is built once.
  """
  seeds = split_seed(seed, cfg.num_layers)

  def layer(i, img):
    s = split_seed(seeds[i], 4)
    op = tf.random.stateless_uniform([], seed=s[0], minval=0, maxval=len(RAND_OPS), dtype=tf.int32)
    if math.isinf(cfg.magnitude_std):
      level = _uniform(s[1], (), 0.0, cfg.magnitude)
    elif cfg.magnitude_std > 0:
      level = cfg.magnitude + cfg.magnitude_std * tf.random.stateless_normal([], seed=s[1])
    else:
      level = tf.constant(cfg.magnitude, tf.float32)
    level = tf.clip_by_value(level, 0.0, cfg.magnitude_max)
    sign = tf.where(_uniform(s[2]) < 0.5, -1.0, 1.0)
    op = tf.where(_uniform(s[3]) < cfg.prob, op, len(RAND_OPS))  # len(RAND_OPS): identity
    return i + 1, apply_op(img, op, level, sign, fill=fill, increasing=cfg.increasing)

  _, image = tf.while_loop(lambda i, _: i < cfg.num_layers, layer, (tf.constant(0), image))
  return image
