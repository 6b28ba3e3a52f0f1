"""Input pipeline (tf.data on the host CPU): deterministic, resumable, per-process train and exact eval.

Datasets (``input_cfg.dataset``):

  * ``"digits"``: scikit-learn's 8x8 handwritten digits as the tfds builder ``sklearn_digits``
    (``sparsifiner_jax.data.digits``; train 1,437 / test 360), prepared on demand into ``data_dir``.
  * any tfds name (``"cifar10"``, ``"imagenet2012"``, ``"name/config:version"``): read with
    ``tfds.builder(name, data_dir=data_dir)``, prepared on demand with
    ``tfds.download.DownloadConfig(manual_dir=manual_dir)`` (imagenet2012 needs the two ILSVRC2012
    tars in ``manual_dir`` unless it is already prepared in ``data_dir``).
  * ``"imagefolder:/path/to/root"``: ``root/<split>/<class>/*.{png,jpg,jpeg,bmp,gif}``; classes are the
    sorted union of class folder names over all splits, so labels agree between splits.

``input_cfg`` (an ``ml_collections.ConfigDict``; missing fields take the defaults of
``default_config()``):

  dataset         str   one of the above.
  data_dir        str|None  tfds data directory (None: tfds' default, ``$TFDS_DATA_DIR`` or
                        ``~/tensorflow_datasets``).
  manual_dir      str|None  tfds manual download directory (imagenet2012's tars).
  train_split     str   "train"; tfds slicing such as "train[:90%]" works for tfds datasets.
  eval_split      str   "test" (digits, cifar10) or "validation" (imagenet2012).
  mean, std       3-tuples in [0, 1] units; ImageNet's by default. Images are fed as
                        (x / 255 - mean) / std.
  crop_pct        float eval: resize the shorter side to floor(img_size / crop_pct), centre-crop.
  rrc_scale       (lo, hi) RandomResizedCrop area fraction, (0.08, 1.0).
  rrc_ratio       (lo, hi) RandomResizedCrop aspect ratio, (3/4, 4/3).
  hflip           bool  random horizontal flip.
  randaugment     str   timm spec, e.g. "rand-m9-mstd0.5-inc1" (the default); "" turns it off.
  random_erasing  float probability of timm RandomErasing (pixel mode, after normalisation).
  shuffle_buffer  int   tf.data shuffle buffer (tfds datasets; image folders are fully permuted).
  cache           bool  keep this process's encoded examples in memory after the first epoch
                        (tfds datasets; for image folders the OS page cache does this).
  bad_images      str   image folders: "fail" raises InputConfigError naming the first unreadable or
                        corrupt file; "skip" drops them with a warning that lists them. Files are
                        checked once per process by one parallel decode pass over the split.
  data_shards     int|None  number of data shards the train stream is cut into (None: one per
                        process). A process reads ``data_shards / process_count`` shards and
                        concatenates their batches, so a run on P processes and a run on one
                        process with ``data_shards=P`` see the same global batches.

Determinism. The train stream of a shard is a pure function of (seed, shard index, number of
shards, start_batch) and the data (below, "process" means "shard"; by default each process is
one shard, see ``data_shards``):

  * Process ``p`` of ``P`` reads a fixed, disjoint part of the split: the contiguous range
    ``[p * n // P, (p + 1) * n // P)`` for tfds (tfds stores examples pre-shuffled; read by absolute
    slicing, so only that part is read), examples ``p, p + P, ...`` of the sorted file list for image
    folders.
  * Epoch ``e`` is shuffled with a seed derived from (seed, p, e): a tf.data shuffle buffer without
    reshuffling (tfds), or a full stateless permutation (image folders).
  * Example ``j`` of local batch ``s`` has global position ``g = s * P * b + p * b + j``; all its
    augmentation randomness comes from stateless TF ops keyed by (seed, g).
  * ``start_batch = s`` starts at local example ``s * b``: whole epochs are skipped arithmetically and
    the rest of the epoch is skipped before decoding, so resuming costs reading (not decoding) part of
    one epoch. It yields exactly what the uninterrupted iterator yields from its s-th batch on.

Eval is exact: every process yields ``ceil(ceil(n / P) / b)`` batches; the last real batch is padded
and all-padding batches fill up, with ``mask`` marking the real examples (each exactly once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import logging
import os
import re
import sys
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

try:  # TF must never take a GPU from JAX.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # the TF context was already initialised by someone else
  pass

# tfds 4.9.10 needs `importlib_resources` to prepare datasets but does not install it: without it, the
# standard library's importlib.resources stands in.
if importlib.util.find_spec("importlib_resources") is None:
  import importlib.resources  # pylint: disable=g-import-not-at-top
  import importlib.resources.abc  # noqa: F401  # pylint: disable=g-import-not-at-top
  sys.modules.setdefault("importlib_resources", importlib.resources)

import tensorflow_datasets as tfds  # noqa: E402  # pylint: disable=g-import-not-at-top

from sparsifiner_jax.data import augment, digits  # noqa: E402  # pylint: disable=g-import-not-at-top
from sparsifiner_jax.data.options import (  # noqa: E402  # pylint: disable=g-import-not-at-top
    DIGITS, InputConfigError, default_config)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
FOLDER_PREFIX = "imagefolder:"
_MAX_EPOCHS = 2 ** 40
_SALT_SHUFFLE = 0x5EED
_SALT_AUGMENT = 0xA06


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset: its classes and split sizes ({split: n})."""

  num_classes: int
  splits: dict[str, int]
  name: str = ""


_DEFAULTS = default_config().to_dict()


def _get(input_cfg, key: str):
  value = input_cfg.get(key, None) if hasattr(input_cfg, "get") else getattr(input_cfg, key, None)
  nullable = ("data_dir", "manual_dir", "data_shards")
  return _DEFAULTS[key] if value is None and key not in nullable else value


# ----------------------------------------------------------------------------- seeds


def _key(*ints) -> tf.Tensor:
  """A stateless seed int64 [2] derived from a sequence of ints / int tensors."""
  key = tf.stack([tf.constant(ints[0], tf.int64), tf.constant(0, tf.int64)])
  for x in ints[1:]:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(x, tf.int64))
  return key


@contextlib.contextmanager
def _no_global_tf_seed():
  """tf.data shuffle seeds are (global seed, op seed): hide any ``tf.random.set_seed`` while building."""
  from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top
  ctx = context.context()
  saved = (getattr(ctx, "_seed", None), getattr(ctx, "_rng", None))
  if saved[0] is None:
    yield
    return
  ctx._seed = None  # pylint: disable=protected-access
  try:
    yield
  finally:
    ctx._seed, ctx._rng = saved  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- sources


def _process_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  return process_index * n // process_count, (process_index + 1) * n // process_count


def _max_local(n: int, process_count: int) -> int:
  """Largest per-process share of n examples (contiguous ranges and strides agree)."""
  return -(-n // process_count)


def _split_names(split: str) -> list[str]:
  """Base split names of a tfds split spec ("train[:10%]+test" -> ["train", "test"])."""
  return [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]


class _TfdsSource:
  """A tfds builder: encoded images are decoded only after shuffling / skipping."""

  folder = False

  def __init__(self, name: str, builder: tfds.core.DatasetBuilder):
    self.name = name
    self.builder = builder
    info = builder.info
    keys = info.supervised_keys or ("image", "label")
    self.image_key, self.label_key = keys[0], keys[1]
    features = info.features
    if self.image_key not in features or self.label_key not in features:
      raise InputConfigError(f"dataset {name!r} has no ({self.image_key!r}, {self.label_key!r}) "
                             f"features (it has {sorted(features.keys())})")
    label = features[self.label_key]
    if not hasattr(label, "num_classes"):
      raise InputConfigError(f"dataset {name!r}: feature {self.label_key!r} is not a ClassLabel")
    self.num_classes = int(label.num_classes)
    self.encoded = isinstance(features[self.image_key], tfds.features.Image)
    self._counts: dict[str, int] = {}

  @property
  def known_splits(self) -> dict[str, int] | None:
    splits = self.builder.info.splits
    return {k: int(v.num_examples) for k, v in splits.items()} if splits else None

  def check_split(self, split: str) -> None:
    known = self.known_splits
    if known is None:
      return
    missing = [s for s in _split_names(split) if s not in known]
    if missing:
      raise InputConfigError(f"dataset {self.name!r} has no split {missing[0]!r} (from {split!r}); "
                             f"its splits are {sorted(known)}")

  def num_examples(self, split: str) -> int:
    if split not in self._counts:
      self.check_split(split)
      if self.known_splits is not None:
        self._counts[split] = int(self.builder.info.splits[split].num_examples)
      else:  # no metadata (e.g. under tfds.testing.mock_data): count once
        self._counts[split] = int(self._read(split).reduce(0, lambda c, _: c + 1).numpy())
    return self._counts[split]

  def _read(self, split) -> tf.data.Dataset:
    decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded else None
    ds = self.builder.as_dataset(
        split=split, shuffle_files=False, decoders=decoders,
        read_config=tfds.ReadConfig(try_autocache=False, skip_prefetch=True))
    image_key, label_key = self.image_key, self.label_key
    return ds.map(lambda ex: {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32)})

  def local_records(self, split: str, process_index: int, process_count: int):
    """This process's examples in a fixed order: ({"image", "label"} dataset, count)."""
    n = self.num_examples(split)
    lo, hi = _process_range(n, process_index, process_count)
    if self.known_splits is None:  # cannot slice by name: read all, keep the range
      return self._read(split).skip(lo).take(hi - lo), hi - lo
    if hi == lo:
      return self._read(split).take(0), 0
    infos = self.builder.info.splits
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    parts, offset = [], 0
    for ins in instructions:
      start = ins.from_ or 0
      stop = infos[ins.splitname].num_examples if ins.to is None else ins.to
      a, b = max(lo - offset, 0), min(hi - offset, stop - start)
      if a < b:
        parts.append(f"{ins.splitname}[{start + a}:{start + b}]")
      offset += stop - start
    return self._read("+".join(parts)), hi - lo


class _FolderSource:
  """``root/<split>/<class>/<image>``, listed and checked in Python, decoded in tf.data."""

  folder = True

  def __init__(self, root: str, bad_images: str):
    self.name = FOLDER_PREFIX + root
    self.root = root
    self.bad_images = bad_images
    if not os.path.isdir(root):
      raise InputConfigError(f"imagefolder root {root!r} does not exist or is not a directory "
                             "(expected root/<split>/<class>/*.png|jpg)")
    self.splits = _subdirs(root)
    classes = set()
    for s in self.splits:
      classes.update(_subdirs(os.path.join(root, s)))
    if not classes:
      raise InputConfigError(f"imagefolder root {root!r} has no root/<split>/<class>/ folders "
                             f"(found splits {self.splits})")
    self.classes = sorted(classes)
    self.num_classes = len(self.classes)
    self._files: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  @property
  def known_splits(self) -> dict[str, int]:
    return {s: self.num_examples(s) for s in self.splits}

  def check_split(self, split: str) -> None:
    if split not in self.splits:
      raise InputConfigError(f"imagefolder {self.root!r} has no split folder {split!r}; "
                             f"its splits are {self.splits}")

  def _list(self, split: str) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, cls in enumerate(self.classes):
      d = os.path.join(self.root, split, cls)
      if not os.path.isdir(d):
        continue
      for f in sorted(os.listdir(d)):
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
          paths.append(os.path.join(d, f))
          labels.append(label)
    return paths, labels

  def files(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(paths [n], labels int32 [n]) of the readable images of ``split``, sorted by (class, name)."""
    if split not in self._files:
      self.check_split(split)
      paths, labels = self._list(split)
      bad = _undecodable(paths)
      if bad:
        shown = ", ".join(repr(paths[i]) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if self.bad_images != "skip":
          raise InputConfigError(f"unreadable or corrupt image {paths[bad[0]]!r} ({len(bad)} bad in "
                                 f"split {split!r}); fix or remove it, or set bad_images='skip'")
        log.warning("imagefolder %s split %s: skipping %d unreadable/corrupt images: %s",
                    self.root, split, len(bad), shown)
        keep = np.setdiff1d(np.arange(len(paths)), bad)
        paths = [paths[i] for i in keep]
        labels = [labels[i] for i in keep]
      self._files[split] = (np.asarray(paths, dtype=object), np.asarray(labels, np.int32))
    return self._files[split]

  def num_examples(self, split: str) -> int:
    return len(self.files(split)[0])

  def local_files(self, split: str, process_index: int, process_count: int):
    """This process's (paths, labels): every ``process_count``-th file from ``process_index``."""
    paths, labels = self.files(split)
    return paths[process_index::process_count], labels[process_index::process_count]

  def local_records(self, split: str, process_index: int, process_count: int):
    paths, labels = self.local_files(split, process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices((paths.astype(str), labels))
    return ds.map(lambda p, l: {"image": tf.io.read_file(p), "label": l}), len(paths)


def _subdirs(path: str) -> list[str]:
  """Sorted names of the visible sub-directories of ``path``."""
  return sorted(d for d in os.listdir(path)
                if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def _undecodable(paths: list[str]) -> list[int]:
  """Indices of files that TF cannot read or decode (one parallel pass)."""
  if not paths:
    return []
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), np.asarray(paths)))
  ds = ds.map(lambda i, p: (i, tf.shape(augment.decode_image(tf.io.read_file(p)))[0]),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors()
  good = {int(i) for i, _ in ds.as_numpy_iterator()}
  return [i for i in range(len(paths)) if i not in good]


def _tfds_name(dataset: str) -> str:
  return digits.SklearnDigits.name if dataset == DIGITS else dataset


def _suggest(dataset: str) -> str:
  names = [DIGITS] + tfds.list_builders(with_community_datasets=False)
  base = re.split(r"[/:]", dataset)[0]
  close = difflib.get_close_matches(base, names, n=3, cutoff=0.6)
  hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
  return (f"unknown dataset {dataset!r}; {hint}use 'digits', a tfds name (tfds.list_builders(), "
          "e.g. 'cifar10', 'imagenet2012') or 'imagefolder:/path/to/root'")


def _builder(dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(_tfds_name(dataset), data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise InputConfigError(_suggest(dataset)) from None
  except (ValueError, TypeError) as e:  # bad config / version
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise InputConfigError(f"cannot open tfds dataset {dataset!r}: {msg}") from None


def _needs_manual_dir(builder) -> bool:
  return bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)) and not builder.is_prepared()


def _check_manual_dir(dataset: str, builder, manual_dir: str | None) -> None:
  if not _needs_manual_dir(builder):
    return
  where = builder.data_dir
  if not manual_dir:
    raise InputConfigError(
        f"dataset {dataset!r} is not prepared in {where!r} and must be built from files you download "
        "yourself: set input.manual_dir to the folder holding them (imagenet2012: "
        "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar) or data_dir to where it is prepared")
  if not os.path.isdir(manual_dir):
    raise InputConfigError(f"manual_dir {manual_dir!r} for dataset {dataset!r} does not exist")


@functools.lru_cache(maxsize=16)
def _source_cached(dataset: str, data_dir: str | None, manual_dir: str | None, bad_images: str):
  if dataset.startswith(FOLDER_PREFIX):
    return _FolderSource(os.path.abspath(os.path.expanduser(dataset[len(FOLDER_PREFIX):])), bad_images)
  builder = _builder(dataset, data_dir)
  _check_manual_dir(dataset, builder, manual_dir)
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
      builder.download_and_prepare(download_config=config)
    except Exception as e:  # pylint: disable=broad-except
      if not _builder(dataset, data_dir).is_prepared():  # not just another process winning the race
        msg = str(e).splitlines()[0] if str(e) else ""
        raise InputConfigError(f"cannot prepare tfds dataset {dataset!r} in {builder.data_dir!r}: "
                               f"{type(e).__name__}: {msg}") from e
    builder = _builder(dataset, data_dir)
  return _TfdsSource(dataset, builder)


def _dataset_name(input_cfg) -> str:
  dataset = _get(input_cfg, "dataset")
  if not isinstance(dataset, str) or not dataset:
    raise InputConfigError(f"input.dataset must be a non-empty string, got {dataset!r}")
  return dataset


def _source(input_cfg):
  return _source_cached(_dataset_name(input_cfg), _get(input_cfg, "data_dir"),
                        _get(input_cfg, "manual_dir"), _get(input_cfg, "bad_images"))


def _check_tfds_split(dataset: str, builder, split: str) -> None:
  """Split check without preparing: declared splits if prepared (digits: always known)."""
  if builder.is_prepared():
    known = sorted(builder.info.splits.keys())
  elif dataset == DIGITS:
    known = sorted(digits.SPLITS)
  else:
    return
  missing = [s for s in _split_names(split) if s not in known]
  if missing:
    raise InputConfigError(f"dataset {dataset!r} has no split {missing[0]!r} (from {split!r}); "
                           f"its splits are {known}")


# ----------------------------------------------------------------------------- public API


def validate_input_config(input_cfg) -> None:
  """Checks ``input_cfg``; raises InputConfigError with one line saying what is wrong.

  Never downloads or prepares anything: tfds names, manual_dir and (where known) split names are
  checked from the builder's metadata. Image folders are listed and their train/eval files decoded
  once (memoised) so bad images are reported now (see ``bad_images``).
  """
  def check(ok, msg):
    if not ok:
      raise InputConfigError(msg)

  bad_images = _get(input_cfg, "bad_images")
  check(bad_images in ("fail", "skip"), f"input.bad_images must be 'fail' or 'skip', got {bad_images!r}")
  for key in ("mean", "std"):
    v = _get(input_cfg, key)
    check(len(tuple(v)) == 3, f"input.{key} must have 3 values (RGB), got {v!r}")
  check(all(s > 0 for s in _get(input_cfg, "std")), "input.std values must be > 0")
  crop_pct = _get(input_cfg, "crop_pct")
  check(0 < crop_pct <= 1, f"input.crop_pct must be in (0, 1], got {crop_pct!r}")
  scale, ratio = tuple(_get(input_cfg, "rrc_scale")), tuple(_get(input_cfg, "rrc_ratio"))
  check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
        f"input.rrc_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale!r}")
  check(len(ratio) == 2 and 0 < ratio[0] <= ratio[1],
        f"input.rrc_ratio must be (lo, hi) with 0 < lo <= hi, got {ratio!r}")
  erase = _get(input_cfg, "random_erasing")
  check(0 <= erase <= 1, f"input.random_erasing is a probability, got {erase!r}")
  check(int(_get(input_cfg, "shuffle_buffer")) >= 1, "input.shuffle_buffer must be >= 1")
  try:
    augment.parse_randaugment(_get(input_cfg, "randaugment"))
  except ValueError as e:
    raise InputConfigError(f"input.{e}") from None
  dataset = _dataset_name(input_cfg)
  splits = [_get(input_cfg, "train_split"), _get(input_cfg, "eval_split")]
  for key, split in zip(("train_split", "eval_split"), splits):
    check(isinstance(split, str) and split, f"input.{key} must be a split name, got {split!r}")
  if dataset.startswith(FOLDER_PREFIX):
    source = _source(input_cfg)
    for split in splits:
      source.check_split(split)
      source.files(split)  # raises on bad images with bad_images='fail'
    return
  builder = _builder(dataset, _get(input_cfg, "data_dir"))
  _check_manual_dir(dataset, builder, _get(input_cfg, "manual_dir"))
  for split in splits:
    _check_tfds_split(dataset, builder, split)


def get_dataset_info(input_cfg) -> DatasetInfo:
  """Number of classes and split sizes of ``input_cfg.dataset`` (prepares digits if needed).

  ``splits`` holds every split the dataset declares plus ``train_split`` and ``eval_split`` as
  written (e.g. "train[:90%]"), each with its number of examples.
  """
  source = _source(input_cfg)
  known = source.known_splits or {}
  splits = dict(known)
  for key in ("train_split", "eval_split"):
    split = _get(input_cfg, key)
    splits[split] = source.num_examples(split)
  return DatasetInfo(name=source.name, num_classes=source.num_classes, splits=splits)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  options.threading.max_intra_op_parallelism = 1
  return options


def _check_process(process_index: int, process_count: int, local_batch_size: int) -> None:
  if not 0 <= process_index < process_count:
    raise InputConfigError(f"process_index {process_index} not in [0, {process_count})")
  if local_batch_size < 1:
    raise InputConfigError(f"local_batch_size must be >= 1, got {local_batch_size}")


def _train_example_fn(input_cfg, *, img_size: int, encoded: bool, seed: int):
  """Returns fn(global position, example) -> {"image" float32 [S, S, 3], "label" int32}."""
  scale = tuple(float(x) for x in _get(input_cfg, "rrc_scale"))
  ratio = tuple(float(x) for x in _get(input_cfg, "rrc_ratio"))
  hflip = bool(_get(input_cfg, "hflip"))
  ra = augment.parse_randaugment(_get(input_cfg, "randaugment"))
  erase = float(_get(input_cfg, "random_erasing"))
  mean = tuple(float(x) for x in _get(input_cfg, "mean"))
  std = tuple(float(x) for x in _get(input_cfg, "std"))
  fill = tuple(min(255, round(255 * m)) for m in mean)

  def fn(position, ex):
    s = augment.split_seed(_key(seed, _SALT_AUGMENT, position), 4)
    if encoded:
      image = augment.decode_random_resized_crop(ex["image"], s[0], img_size, scale, ratio)
    else:
      image = augment.random_resized_crop(ex["image"], s[0], img_size, scale, ratio)
    image = tf.ensure_shape(image, [img_size, img_size, 3])
    if hflip:
      image = augment.random_flip(image, s[1])
    if ra is not None:
      image = augment.randaugment(image, s[2], ra, fill=fill)
    image = augment.normalize(image, mean, std)
    if erase > 0:
      image = augment.random_erasing(image, s[3], erase)
    return {"image": image, "label": ex["label"]}

  return fn


def _eval_example_fn(input_cfg, *, img_size: int, encoded: bool):
  crop_pct = float(_get(input_cfg, "crop_pct"))
  mean = tuple(float(x) for x in _get(input_cfg, "mean"))
  std = tuple(float(x) for x in _get(input_cfg, "std"))

  def fn(ex):
    image = augment.decode_image(ex["image"]) if encoded else ex["image"]
    image = augment.eval_resize_crop(image, img_size, crop_pct)
    return {"image": augment.normalize(image, mean, std), "label": ex["label"],
            "mask": tf.constant(True)}

  return fn


def build_train_dataset(input_cfg, *, img_size: int, local_batch_size: int, seed: int,
                        start_batch: int = 0, process_index: int = 0,
                        process_count: int = 1) -> tf.data.Dataset:
  """The infinite train ``tf.data.Dataset`` behind ``build_train_iterator`` (same arguments)."""
  _check_process(process_index, process_count, local_batch_size)
  source = _source(input_cfg)
  split = _get(input_cfg, "train_split")
  b, p, big_p = local_batch_size, process_index, process_count
  start = int(start_batch) * b
  if source.folder:
    paths, labels = source.local_files(split, p, big_p)
    n = len(paths)
  else:
    records, n = source.local_records(split, p, big_p)
  if n == 0:
    raise InputConfigError(f"train split {split!r} of {source.name!r} gives process {p} of {big_p} "
                           "no examples")
  first_epoch, offset = divmod(start, n)

  with _no_global_tf_seed():
    if source.folder:
      paths_t = tf.constant(paths.astype(str))
      labels_t = tf.constant(labels)

      def epoch(e, skip=0):
        keys = tf.random.stateless_uniform([n], seed=_key(seed, _SALT_SHUFFLE, p, e))
        perm = tf.argsort(keys, stable=True)[skip:]
        ds = tf.data.Dataset.from_tensor_slices((tf.gather(paths_t, perm), tf.gather(labels_t, perm)))
        return ds.map(lambda f, l: {"image": tf.io.read_file(f), "label": l})
    else:
      if _get(input_cfg, "cache"):
        records = records.cache()
      buffer = int(_get(input_cfg, "shuffle_buffer"))

      def epoch(e, skip=0):
        shuffle_seed = tf.random.stateless_uniform(
            [], seed=_key(seed, _SALT_SHUFFLE, p, e), minval=None, maxval=None, dtype=tf.int64)
        ds = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.skip(skip) if skip else ds

    ds = epoch(tf.constant(first_epoch, tf.int64), offset)
    rest = tf.data.Dataset.range(first_epoch + 1, _MAX_EPOCHS).flat_map(epoch)
    ds = ds.concatenate(rest)
    ds = ds.enumerate(start=start)
    example_fn = _train_example_fn(input_cfg, img_size=img_size, encoded=source.folder or
                                   source.encoded, seed=seed)

    def with_position(k, ex):
      g = (k // b) * (b * big_p) + p * b + k % b
      return example_fn(g, ex)

    ds = ds.map(with_position, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


def num_data_shards(input_cfg, process_count: int = 1) -> int:
  """``input_cfg.data_shards`` or, when unset, one shard per process; a multiple of process_count."""
  shards = _get(input_cfg, "data_shards")
  shards = process_count if shards is None else shards
  if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1 or shards % process_count:
    raise InputConfigError(f"input.data_shards={shards!r} must be a positive multiple of the number "
                           f"of processes {process_count} (or None: one shard per process)")
  return shards


def build_train_iterator(input_cfg, *, img_size: int, local_batch_size: int, seed: int,
                         start_batch: int = 0, process_index: int = 0,
                         process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of this process's train batches.

  Yields ``{"image": float32 [b, img_size, img_size, 3] (normalised), "label": int32 [b]}``, a pure
  function of (data, seed, data shards, start_batch) (module docstring): ``start_batch=s`` yields
  exactly what the uninterrupted iterator yields from its s-th batch on. A process that owns several
  shards (``input.data_shards``) yields their batches concatenated, in shard order.
  """
  _check_process(process_index, process_count, local_batch_size)
  shards = num_data_shards(input_cfg, process_count)
  per = shards // process_count
  if local_batch_size % per:
    raise InputConfigError(f"local batch size {local_batch_size} must be divisible by the "
                           f"{per} data shards of each process (input.data_shards={shards})")
  parts = [build_train_dataset(input_cfg, img_size=img_size, local_batch_size=local_batch_size // per,
                               seed=seed, start_batch=start_batch,
                               process_index=process_index * per + i, process_count=shards)
           for i in range(per)]
  if per == 1:
    return parts[0].as_numpy_iterator()
  ds = tf.data.Dataset.zip(tuple(parts)).map(
      lambda *xs: {k: tf.concat([x[k] for x in xs], 0) for k in xs[0]})
  return ds.as_numpy_iterator()


def num_eval_batches(num_examples: int, local_batch_size: int, process_count: int = 1) -> int:
  """Batches every process yields for a split of ``num_examples``: ceil(ceil(n / P) / b)."""
  return -(-_max_local(num_examples, process_count) // local_batch_size)


def build_eval_dataset(input_cfg, split: str, *, img_size: int, local_batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """The one-pass eval ``tf.data.Dataset`` behind ``build_eval_iterator`` (same arguments)."""
  _check_process(process_index, process_count, local_batch_size)
  source = _source(input_cfg)
  source.check_split(split)
  records, n_local = source.local_records(split, process_index, process_count)
  n = source.num_examples(split)
  b = local_batch_size
  num_batches = num_eval_batches(n, b, process_count)
  example_fn = _eval_example_fn(input_cfg, img_size=img_size,
                                encoded=source.folder or source.encoded)
  # No ``cache()``: each evaluation builds its dataset anew and reads it once, so a cache would never
  # serve a second pass (and TF warns when a caller stops after the first batch).
  ds = records.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros([img_size, img_size, 3], tf.float32),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False)}).repeat(num_batches * b - n_local)
  ds = ds.concatenate(pad).batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


def build_eval_iterator(input_cfg, split: str, *, img_size: int, local_batch_size: int,
                        process_index: int = 0,
                        process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's part of ``split``, padded for exact evaluation.

  Yields ``{"image": float32 [b, S, S, 3], "label": int32 [b], "mask": bool [b]}``. Every process
  yields ``num_eval_batches(n, b, process_count)`` batches; ``mask`` is True exactly once for each
  example of the split over all processes and False for padding (image 0, label 0).
  """
  ds = build_eval_dataset(input_cfg, split, img_size=img_size, local_batch_size=local_batch_size,
                          process_index=process_index, process_count=process_count)
  return ds.as_numpy_iterator()


def describe(input_cfg) -> dict[str, Any]:
  """A JSON-able summary of the dataset (name, classes, split sizes) for logs."""
  info = get_dataset_info(input_cfg)
  return {"dataset": info.name, "num_classes": info.num_classes, "splits": info.splits}
