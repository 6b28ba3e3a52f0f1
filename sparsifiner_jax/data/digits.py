"""scikit-learn's handwritten digits as a tensorflow-datasets builder (``sklearn_digits``, 1.0.0).

The only real image classification set available offline (scikit-learn ships it): 1,797 greyscale 8x8
scans of handwritten digits from ``sklearn.datasets.load_digits`` (UCI "optdigits" test set), 10
classes. Preparing needs no network and takes a few seconds, so the input pipeline prepares it on
demand into any ``data_dir`` (``input_cfg.dataset = "digits"``).

Features::

    image  uint8 (8, 8, 3)  grey level g in 0..16 stored as round(g * 255 / 16), same in R, G and B
    label  ClassLabel(10)   the digit, names "0".."9"

Fixed split (``split_indices``), indices into ``load_digits()`` order:

  * For each class ``c`` with ``n_c`` images, its test quota is ``q_c = floor(360 * n_c / 1797)``;
    the 5 seats left over go to the classes with the largest remainders ``360 * n_c / 1797 - q_c``
    (ties to the smaller class id). Quotas sum to exactly 360 and follow the class proportions.
  * The images of class ``c`` (in dataset order) are permuted with
    ``numpy.random.RandomState(SPLIT_SEED + c).permutation`` (``SPLIT_SEED = 0``; the legacy
    RandomState stream is frozen by NumPy, so the split never changes with the NumPy version); the
    first ``q_c`` are test, the rest train.
  * Each split is sorted by original index. Result: train 1,437 / test 360, disjoint, covering all
    1,797 images. (tfds stores examples in its own deterministic key-hashed order.)
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_EXAMPLES = 1797
NUM_TEST = 360
NUM_CLASSES = 10
SPLIT_SEED = 0
SPLITS = {"train": NUM_EXAMPLES - NUM_TEST, "test": NUM_TEST}


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(images uint8 [1797, 8, 8, 3], labels int64 [1797])`` in ``load_digits()`` order."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  grey = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  images = np.repeat(grey[..., None], 3, axis=-1)
  return images, digits.target.astype(np.int64)


def per_class_test_counts(labels: np.ndarray, num_test: int = NUM_TEST) -> np.ndarray:
  """Per-class test counts [K] by largest remainder (ties to the smaller class id); sums to num_test."""
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  exact = num_test * counts / counts.sum()
  quotas = np.floor(exact).astype(np.int64)
  order = sorted(range(len(counts)), key=lambda c: (-(exact[c] - quotas[c]), c))
  for c in order[:num_test - int(quotas.sum())]:
    quotas[c] += 1
  return quotas


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """The fixed stratified split (module docstring): ``{"train": idx [1437], "test": idx [360]}``."""
  labels = np.asarray(labels)
  quotas = per_class_test_counts(labels)
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    perm = np.random.RandomState(seed + c).permutation(len(members))
    test.append(members[perm[:quotas[c]]])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {"train": train, "test": test}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn ``load_digits`` (8x8 handwritten digits, 10 classes), fixed 1437/360 split."""

  name = "sklearn_digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: stratified 1437/360 split, seed 0."}
  # tfds derives this through `importlib_resources`, which tfds 4.9.10 does not install.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(NUM_CLASSES)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # bundled with scikit-learn: nothing to download
    images, labels = load_arrays()
    idx = split_indices(labels)
    return {name: self._generate_examples(images, labels, idx[name]) for name in SPLITS}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}
