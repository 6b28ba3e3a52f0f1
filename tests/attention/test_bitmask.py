"""The bit-packed mask format the accelerator kernels exchange (``attention.bitmask``)."""

import pathlib
import re

import jax
import numpy as np

from conftest import random_topk_rows
from sparsifiner_jax.attention import bitmask
from sparsifiner_jax.attention.mask import keep_mask, packed_mask


def test_word_major_layout_and_round_trip():
  keep = np.asarray(jax.random.bernoulli(jax.random.key(0), 0.3, (2, 3, 5, 70)))
  packed = np.asarray(bitmask.pack(keep))
  assert packed.shape == (2, 3, 3, 5) and packed.dtype == np.int32     # [.., ceil(70 / 32), N_q]
  # Bit j of word w of query i is key 32 w + j.
  for w in range(3):
    for j in range(32):
      key = 32 * w + j
      bit = (packed[..., w, :].astype(np.uint32) >> j) & 1
      np.testing.assert_array_equal(bit, keep[..., key] if key < 70 else 0)
  np.testing.assert_array_equal(np.asarray(bitmask.unpack(packed, 70)), keep)


def test_pack_rows_makes_the_dense_rows_full():
  rows = np.zeros((1, 1, 4, 40), bool)
  rows[..., 3] = True
  keep = np.asarray(bitmask.unpack(bitmask.pack_rows(rows, num_dense_rows=2), 40))
  assert keep.shape == (1, 1, 6, 40)
  assert keep[..., :2, :].all() and (keep[..., 2:, :].sum(-1) == 1).all()


def test_packed_mask_matches_keep_mask():
  rows = np.asarray(random_topk_rows((2, 2, 36, 37), 9, seed=1))
  want = keep_mask(rows, 9, num_dense_rows=1)
  got = packed_mask(bitmask.pack_rows(rows, 1), 9, num_dense_rows=1)
  np.testing.assert_array_equal(np.asarray(got.to_dense()), np.asarray(want.to_dense()))
  np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
  np.testing.assert_array_equal(np.asarray(got.packed_rows()), np.asarray(want.packed_rows()))
  assert float(got.density()) == float(want.density())


def _dims(shape: str) -> list[str]:
  """``"[B|1, H|1, W, N_q]"`` -> ``["B|1", "H|1", "W", "N_q"]`` (spaces dropped)."""
  return [d.replace(" ", "") for d in shape.strip("[]").split(",")]


def test_docs_give_the_packed_layout_of_bitmask():
  """docs/attention.md's mask table states ``packed``'s shape as bitmask's module docstring does."""
  doc = bitmask.__doc__
  shape, dtype = re.search(r"``packed (\[[^\]]+\]) (\w+)``", doc).groups()
  words = re.search(r"``W = (ceil\(N_k / 32\))``", doc).group(1)
  dims = [words.replace(" ", "") if d == "W" else d for d in _dims(shape)]
  want = [re.sub(r"\bN_[qk]\b", "N", d) for d in dims] + [dtype]

  table = (pathlib.Path(__file__).parents[2] / "docs" / "attention.md").read_text()
  row = re.search(r"^\| `packed` \| `(\[[^\]]+\]) (\w+)`", table, re.M)
  assert row, "docs/attention.md: no `packed` row in the mask table"
  got = [d.replace("\\|", "|") for d in _dims(row.group(1))] + [row.group(2)]
  assert got == want, f"docs/attention.md gives packed as {got}; bitmask.py as {want}"
