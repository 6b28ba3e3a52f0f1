"""LV-ViT backbone: pinned sizes, output shapes, torch-reference parity through the converter, Sparsifiner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import models
from sparsifiner_jax.io import convert, state_dict, weights
from sparsifiner_jax.models.lvvit import LVViT, LVViTConfig

# Derived from the official architecture (TokenLabeling lvvit_s / lvvit_m; Sparsifiner src/models/lvvit.py):
# stem 3*64*49 + 2*64*64*9 + 3*(64+64) BN affine; proj 64*D*8*8 + D; cls D; pos 197*D;
# per block 2*2D (LN) + 3D^2 (qkv, no bias) + D^2+D (proj) + 2*3D^2 + 3D + D (mlp 3x); norm 2D;
# head and aux_head D*1000+1000 each.
LVVIT_S_PARAMS = 26_151_824
LVVIT_M_PARAMS = 55_830_544


def _count(model_fn, kind=nnx.Param):
  abstract = nnx.eval_shape(model_fn)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, kind)))


def test_param_counts_pinned():
  assert _count(lambda: models.create("lvvit_s", rngs=nnx.Rngs(0))) == LVVIT_S_PARAMS
  assert _count(lambda: models.create("lvvit_m", rngs=nnx.Rngs(0))) == LVVIT_M_PARAMS
  # BatchNorm running statistics (3 BNs x 64 channels x mean/var) are BatchStat, not parameters.
  assert _count(lambda: models.create("lvvit_s", rngs=nnx.Rngs(0)), nnx.BatchStat) == 384
  # Sparsifiner LV-ViT-S (N=197, d=64, rc=2, rn=6): 16 x (2*(64*32+32) + 2*197*32) predictor params.
  sparse = _count(lambda: models.create("lvvit_s", keep_rate=0.25, rngs=nnx.Rngs(0)))
  assert sparse - LVVIT_S_PARAMS == 16 * (2 * (64 * 32 + 32) + 2 * 197 * 32)


def test_config_registered_and_validated():
  cfg = models.get_config("lvvit_s")
  assert isinstance(cfg, LVViTConfig)
  assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.skip_lam) == (
      384, 16, 6, 3.0, False, 2.0)
  assert models.BUILDERS[LVViTConfig] is LVViT
  with pytest.raises(ValueError, match="patch_size=15 must be even"):
    models.get_config("lvvit_s", patch_size=15, img_size=225)


def test_lvvit_s_shapes_and_eval_output():
  model = models.create("lvvit_s", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 224, 224, 3))
  logits, aux = nnx.jit(lambda m, x: m(x, train=False, with_attention=True))(model, x)
  assert logits.shape == (1, 1000)
  assert aux["tokens"].shape == (1, 196, 1000) and aux["features"].shape == (1, 196, 384)
  assert aux["pre_logits"].shape == (1, 384) and len(aux["attn"]) == 16
  assert aux["attn"][0].shape == (1, 6, 197, 197)
  want = aux["cls_logits"] + 0.5 * aux["aux_logits"].max(axis=1)
  np.testing.assert_allclose(logits, want, rtol=0, atol=1e-6)


# ---- torch reference (written here from the architecture description) ------------------------------


def _torch_lvvit(torch, cfg: LVViTConfig):
  nn = torch.nn
  d, ch, p = cfg.embed_dim, cfg.stem_channels, cfg.patch_size // 2

  class Attn(nn.Module):
    def __init__(self):
      super().__init__()
      self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
      self.proj = nn.Linear(d, d)

    def forward(self, x):
      b, n, _ = x.shape
      q, k, v = self.qkv(x).reshape(b, n, 3, cfg.num_heads, -1).permute(2, 0, 3, 1, 4)
      a = ((q * cfg.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
      return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))

  class Blk(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
      self.attn = Attn()
      self.mlp = nn.Module()
      self.mlp.fc1 = nn.Linear(d, int(d * cfg.mlp_ratio))
      self.mlp.fc2 = nn.Linear(int(d * cfg.mlp_ratio), d)

    def forward(self, x):
      x = x + self.attn(self.norm1(x)) / cfg.skip_lam
      h = self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))
      return x + h / cfg.skip_lam

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      pe = nn.Module()
      pe.conv1 = nn.Conv2d(cfg.in_chans, ch, 7, 2, 3, bias=False)
      pe.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
      pe.conv3 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
      pe.bn1, pe.bn2, pe.bn3 = nn.BatchNorm2d(ch), nn.BatchNorm2d(ch), nn.BatchNorm2d(ch)
      pe.proj = nn.Conv2d(ch, d, p, p)
      self.patch_embed = pe
      self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
      self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * 0.02)
      self.blocks = nn.ModuleList([Blk() for _ in range(cfg.depth)])
      self.norm = nn.LayerNorm(d)
      self.head = nn.Linear(d, cfg.num_classes)
      self.aux_head = nn.Linear(d, cfg.num_classes)

    def forward(self, x):
      pe = self.patch_embed
      for i in (1, 2, 3):
        x = torch.relu(getattr(pe, f"bn{i}")(getattr(pe, f"conv{i}")(x)))
      x = pe.proj(x).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
      for blk in self.blocks:
        x = blk(x)
      x = self.norm(x)
      return self.head(x[:, 0]) + 0.5 * self.aux_head(x[:, 1:]).max(1)[0]

  net = Net()
  with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
    for i in (1, 2, 3):
      bn = getattr(net.patch_embed, f"bn{i}")
      bn.running_mean.normal_(0, 0.5)
      bn.running_var.uniform_(0.5, 2.0)
      bn.weight.normal_(1, 0.2)
      bn.bias.normal_(0, 0.2)
      bn.num_batches_tracked.fill_(7)
  return net.eval()


def test_torch_reference_parity_through_converter(timm, tmp_path):
  import torch
  torch.manual_seed(0)
  cfg = models.get_config("lvvit_test")
  net = _torch_lvvit(torch, cfg)
  x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
  with torch.inference_mode():
    want = net(x).numpy()
  src = tmp_path / "lvvit.pth"
  torch.save(net.state_dict(), src)  # official LV-ViT checkpoints are a bare state dict
  out = convert.convert(str(src), str(tmp_path / "w"))
  model = models.create("lvvit_test", rngs=nnx.Rngs(5))
  weights.load_weights(out, model)  # BatchNorm statistics travel with the weights directory
  got, _ = model(x.permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
  # Export back: torch layouts and names, num_batches_tracked included -> strict torch load.
  convert.convert(out, str(tmp_path / "back.safetensors"))
  from safetensors.torch import load_file
  back = _torch_lvvit(torch, cfg)
  back.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)
  with torch.inference_mode():
    np.testing.assert_allclose(back.eval()(x).numpy(), want, rtol=0, atol=1e-6)
  with pytest.raises(state_dict.ConversionError, match="ViT/DeiT models only"):
    convert.convert(out, str(tmp_path / "x.npz"))
  assert not (tmp_path / "x.npz").exists()


def test_sparse_lvvit_forward_and_gradient_step():
  model = models.create("lvvit_s", keep_rate=0.5, img_size=64, num_classes=10, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  y = jnp.array([1, 7])
  logits, aux = model(x, train=False)
  assert logits.shape == (2, 10) and len(aux["masks"]) == 16
  assert aux["approx_attn"][0].shape == (2, 6, 16, 17)

  def loss_fn(m):
    out, _ = m(x, train=True, rng=jax.random.key(1))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))

  @nnx.jit
  def step(m):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(m)
    params = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))
    return loss, grads

  before = loss_fn(model)
  bn_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  loss, grads = step(model)
  assert np.isfinite(float(loss)) and abs(float(loss) - float(before)) < 1e-4
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["blocks"][3]["attn"]["qkv"]["kernel"]).max()) > 0
  assert float(loss_fn(model)) < float(before)
  # Frozen BatchNorm statistics by default: a training step does not move them.
  jax.tree.map(np.testing.assert_array_equal, bn_before,
               jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))


def test_recon_mode_and_unfrozen_batchnorm():
  model = models.create("lvvit_test", keep_rate=0.5, freeze_bn=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  logits, aux = model(x, train=True, recon=True)
  assert logits.shape == (4, 10) and aux["masks"][0] is None
  assert aux["approx_attn"][1].shape == (4, 2, 16, 17)
  # freeze_bn=False + train: batch statistics are used and the running averages move.
  assert float(jnp.abs(model.patch_embed.bn1.mean[...]).max()) > 0


def test_lvvit_config_and_two_phase_training_with_distillation(tmp_path):
  from configs import lvvit_sparsifiner, tiny_test
  from sparsifiner_jax.train import trainer
  from sparsifiner_jax.io import weights
  for variant, depth in (("lvvit_s", 16), ("lvvit_m", 20)):
    c = lvvit_sparsifiner.get_config(f"variant={variant}")
    assert c.model_name == variant
    assert models.get_config(c.model_name, **models.model_kwargs(c)).depth == depth
  # The tiny LV-ViT through both phases with a dense LV-ViT teacher (KD on CLS logits, MSE on the
  # aux head's per-token logits).
  teacher = weights.save_weights(str(tmp_path / "t"), models.create("lvvit_test", rngs=nnx.Rngs(3)))
  c = tiny_test.get_config("steps=2")
  c.model_name, c.model.img_size = "lvvit_test", 32
  c.teacher.weights = c.init = teacher
  c.phases.train.steps = 0
  out = trainer.train(c, str(tmp_path / "run"))
  assert out["step"] == 4
  assert set(out["phases"]) == {"recon", "distill"}
  assert np.isfinite(out["phases"]["distill"]["loss"])
