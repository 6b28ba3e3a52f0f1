"""The bit-packed mask format the accelerator kernels exchange (``attention.bitmask``)."""

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
