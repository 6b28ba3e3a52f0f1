"""Connectivity grid and density histogram write non-empty PNGs of the expected size."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sparsifiner_jax import models
from sparsifiner_jax.evaluation import viz


@pytest.fixture(scope="module")
def run():
  model = models.create("vit_test", keep_rate=0.25, rngs=nnx.Rngs(0))   # 4x4 patches, 2 layers, 2 heads
  image = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
  _, aux = model(jnp.asarray(image))
  return image, aux["masks"]


def png_size(path):
  with Image.open(path) as im:
    assert im.format == "PNG"
    return im.size


def test_connectivity_grid_from_attention_masks(run, tmp_path):
  image, masks = run
  out = viz.connectivity_grid(image[1], masks, (1, 2), 4, str(tmp_path / "sub" / "grid.png"), b=1)
  assert out == str(tmp_path / "sub" / "grid.png")
  assert png_size(out) == viz.connectivity_grid_size(num_layers=2, num_heads=2)
  assert (tmp_path / "sub" / "grid.png").stat().st_size > 1000


def test_connectivity_grid_from_bool_arrays_and_dense_layer(tmp_path):
  grid, heads = 4, 3
  n = grid * grid + 1
  keep = np.zeros((heads, n, n), bool)
  keep[:, :, :5] = True
  image = np.full((32, 32, 3), 0.5)
  out = viz.connectivity_grid(image, [keep, None, keep[None]], 6, grid, str(tmp_path / "g.png"),
                              dpi=80)
  assert png_size(out) == viz.connectivity_grid_size(3, heads, dpi=80) == (
      round((0.45 + 3 * 1.6 + 0.1) * 80), round((0.95 + 3 * 1.6 + 0.1) * 80))
  out = viz.connectivity_grid(image, [keep], 0, grid, str(tmp_path / "h.png"), heads=[2])
  assert png_size(out) == viz.connectivity_grid_size(1, 1)


@pytest.mark.parametrize("query,msg", [((4, 0), "outside the 4x4 patch grid"), (16, "outside")])
def test_connectivity_grid_rejects_bad_query(run, tmp_path, query, msg):
  image, masks = run
  with pytest.raises(ValueError, match=msg):
    viz.connectivity_grid(image[0], masks, query, 4, str(tmp_path / "x.png"))


def test_connectivity_grid_rejects_wrong_grid(run, tmp_path):
  image, masks = run
  with pytest.raises(ValueError, match="grid_size=5 gives 26"):
    viz.connectivity_grid(image[0], masks, 0, 5, str(tmp_path / "x.png"))


def test_row_densities_match_mask_density(run):
  _, masks = run
  for mask in masks:
    dens = viz.row_densities(mask)
    assert dens.shape == (2 * 2 * 17,)
    assert dens.mean() == pytest.approx(float(mask.density()))
    assert dens.max() == 1.0   # the dense CLS rows


def test_density_histogram(run, tmp_path):
  _, masks = run
  dens = [viz.row_densities(m) for m in masks] + [None]
  out = viz.density_histogram(dens, str(tmp_path / "hist.png"), title="test", dpi=50)
  assert png_size(out) == (11 * 50, round(4.2 * 50))
  assert (tmp_path / "hist.png").stat().st_size > 1000
  many = [np.random.default_rng(i).uniform(0.1, 0.4, 50) for i in range(16)]   # colourbar path
  assert png_size(viz.density_histogram(many, str(tmp_path / "many.png"), dpi=50)) == (550, 210)
  with pytest.raises(ValueError, match="at least one layer"):
    viz.density_histogram([None], str(tmp_path / "none.png"))
