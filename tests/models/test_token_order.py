"""The order of the patch tokens (``ViTConfig.token_order``, ``models/token_order.py``): the Z-order
permutation, that a model's logits do not depend on it, that block mode's blocks become squares of the
image, and the pictures' mapping of tokens back to patches."""

import matplotlib.image as mpimg
import numpy as np
import pytest
from flax import nnx

from configs import digits_blocks
from conftest import random_images
from sparsifiner_jax import models
from sparsifiner_jax.evaluation import viz
from sparsifiner_jax.io import state_dict
from sparsifiner_jax.models import token_order


def test_morton_order_by_hand():
  # A 4 x 4 grid: the four 2 x 2 squares in Z order, each in Z order.
  assert token_order.patch_order(4, "morton").tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11,
                                                           14, 15]
  assert token_order.patch_order(3, "raster").tolist() == list(range(9))
  assert token_order.sequence_order(4, "raster") is None
  with pytest.raises(ValueError, match="token_order='hilbert'; allowed: raster, morton"):
    token_order.patch_order(4, "hilbert")


@pytest.mark.parametrize("grid,block,side", [(16, 16, (4, 4)), (16, 64, (8, 8)), (32, 128, (8, 16))])
def test_morton_blocks_are_squares_of_the_grid(grid, block, side):
  """Runs of ``block`` patches cover ``side`` rectangles (block mode's blocks are such runs, shifted by
  the CLS token at position 0)."""
  order = token_order.patch_order(grid, "morton")
  assert sorted(order.tolist()) == list(range(grid * grid))
  for start in range(0, grid * grid, block):
    rows, cols = np.divmod(order[start:start + block], grid)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == side


def test_logits_do_not_depend_on_the_token_order():
  """The same weights in raster and Z order: equal logits (float32, 1e-5), different token sequences."""
  raster = models.create("vit_test", rngs=nnx.Rngs(0))
  morton = models.create("vit_test", token_order="morton", rngs=nnx.Rngs(1))
  state_dict.load_timm_state_dict(morton, state_dict.timm_state_dict(raster))
  images = random_images(2, raster.config.img_size)
  (want, aux_r), (got, aux_m) = raster(images), morton(images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  order = token_order.patch_order(raster.config.grid_size, "morton")
  np.testing.assert_allclose(np.asarray(aux_m["tokens"]), np.asarray(aux_r["tokens"])[:, order], atol=1e-5)


def test_the_teacher_of_a_z_order_student_is_in_z_order():
  """Its attention maps (the reconstruction target) then match the student's token order."""
  cfg = digits_blocks.get_config()
  cfg.model.token_order = "morton"
  assert models.build_teacher(cfg).config.token_order == "morton"


@pytest.mark.parametrize("kw,msg", [
    (dict(token_order="spiral"), "token_order='spiral'; allowed: raster, morton"),
    (dict(token_order="morton", attention_pattern="fibottention"), "takes token_order='raster'"),
])
def test_bad_token_order_is_refused(kw, msg):
  with pytest.raises(ValueError, match=msg):
    models.create("vit_test", rngs=nnx.Rngs(0), **kw)


def test_lvvit_refuses_z_order():
  with pytest.raises(ValueError, match="LV-ViT's token labels"):
    nnx.eval_shape(lambda: models.create("lvvit_s", token_order="morton", rngs=nnx.Rngs(0)))


def test_connectivity_grid_maps_tokens_back_to_patches(tmp_path):
  """A mask in Z order drawn with ``token_order="morton"`` is the picture of the same mask in raster order."""
  grid, heads = 4, 2
  n = grid * grid + 1
  rng = np.random.default_rng(0)
  keep = rng.random((heads, n, n)) < 0.4
  seq = token_order.sequence_order(grid, "morton")
  image = rng.random((32, 32, 3))
  want = viz.connectivity_grid(image, [keep], (1, 2), grid, str(tmp_path / "raster.png"))
  got = viz.connectivity_grid(image, [keep[:, seq][:, :, seq]], (1, 2), grid, str(tmp_path / "z.png"),
                              token_order="morton")
  np.testing.assert_array_equal(mpimg.imread(got), mpimg.imread(want))
  unordered = viz.connectivity_grid(image, [keep[:, seq][:, :, seq]], (1, 2), grid, str(tmp_path / "u.png"))
  assert not np.array_equal(mpimg.imread(unordered), mpimg.imread(want))
