import os

import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import models
from sparsifiner_jax.io import state_dict, weights


def test_save_load_round_trip_and_dense_into_sparse(tmp_path):
  dense = models.create("vit_test", rngs=nnx.Rngs(0))
  path = weights.save_weights(str(tmp_path / "w"), dense, name="vit_test")
  assert sorted(os.listdir(path)) == ["model.json", "params"]
  assert weights.read_meta(path)["name"] == "vit_test"
  sparse = weights.load_weights(path, models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(1)))
  want = state_dict.timm_state_dict(dense)
  got = state_dict.timm_state_dict(sparse)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v)


def test_load_errors_are_clear(tmp_path):
  model = models.create("vit_test", rngs=nnx.Rngs(0))
  with pytest.raises(weights.WeightsError, match="does not exist"):
    weights.load_weights(str(tmp_path / "nope"), model)
  path = weights.save_weights(str(tmp_path / "w"), model)
  other = models.create("vit_test", embed_dim=48, rngs=nnx.Rngs(0))
  with pytest.raises(weights.WeightsError, match="do not fit the model: .*mis-shaped"):
    weights.load_weights(path, other)
