"""timm parity: random timm weights loaded into our models give timm's logits (fp32, atol 1e-4)."""

import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import models
from sparsifiner_jax.io import state_dict


def _timm_logits(timm, name, seed=0, batch=2, img=224):
  import torch
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False).eval()
  x = torch.randn(batch, 3, img, img)
  with torch.inference_mode():
    logits = model(x).numpy()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return sd, x.permute(0, 2, 3, 1).numpy(), logits


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224",
                                  "deit_base_patch16_224"])
def test_timm_parity(timm, name):
  sd, x, want = _timm_logits(timm, name)
  model = models.create(name, rngs=nnx.Rngs(0))
  state_dict.load_timm_state_dict(model, sd)
  got, _ = nnx.jit(lambda m, x: m(x))(model, x)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_timm_weights_into_sparsifiner_at_keep_one(timm):
  sd, x, want = _timm_logits(timm, "deit_small_patch16_224", batch=1)
  model = models.create("deit_small_patch16_224", keep_rate=1.0, rngs=nnx.Rngs(0))
  state_dict.load_timm_state_dict(model, sd)  # predictors are new: absent from sd, keep their init
  got, _ = nnx.jit(lambda m, x: m(x))(model, x)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_state_dict_round_trip_exact():
  model = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))
  sd = state_dict.timm_state_dict(model)
  assert "blocks.1.attn.mask_predictor.proj_back_n" in sd and "patch_embed.proj.weight" in sd
  assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32)  # torch layout [out, in]
  other = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(1))
  state_dict.load_timm_state_dict(other, sd)
  for k, v in state_dict.timm_state_dict(other).items():
    np.testing.assert_array_equal(v, sd[k])


def test_bad_state_dict_names_every_problem():
  model = models.create("vit_test", rngs=nnx.Rngs(0))
  sd = state_dict.timm_state_dict(model)
  del sd["norm.bias"]
  sd["dist_token"] = np.zeros((1, 1, 32), np.float32)
  sd["head.weight"] = np.zeros((5, 32), np.float32)
  with pytest.raises(state_dict.ConversionError) as err:
    state_dict.load_timm_state_dict(model, sd)
  msg = str(err.value)
  assert "missing keys (1): norm.bias" in msg
  assert "unexpected keys (1): dist_token" in msg
  assert "head.weight: checkpoint (5, 32)" in msg and "model wants (32, 10)" in msg


def test_missing_predictor_can_be_required():
  dense = models.create("vit_test", rngs=nnx.Rngs(0))
  sparse = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))
  with pytest.raises(state_dict.ConversionError, match="mask_predictor.proj_c_q.weight"):
    state_dict.load_timm_state_dict(sparse, state_dict.timm_state_dict(dense), allow_missing_predictor=False)
