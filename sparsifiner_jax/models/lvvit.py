"""LV-ViT (Token Labeling, Jiang et al. 2021) backbone in Flax NNX, with optional Sparsifiner attention.

Written from the architecture of the official LV-ViT (``zihangJiang/TokenLabeling``, ``tlt/models/lvvit.py``)
as used by Sparsifiner (``src/models/lvvit.py`` teacher, ``src/models/sparsifiner_lvvit.py`` student):

* **Patch embedding "4_2"** (``patch_embed``): ``conv1`` 7x7 stride 2 pad 3 (no bias) -> ``bn1`` -> ReLU ->
  ``conv2`` 3x3 pad 1 (no bias) -> ``bn2`` -> ReLU -> ``conv3`` 3x3 pad 1 (no bias) -> ``bn3`` -> ReLU ->
  ``proj`` conv with kernel = stride = ``patch_size // 2`` (with bias). 64 stem channels. So a 224 image
  gives a 112x112 stem map and a 14x14 token grid, the same grid as a patch-16 ViT.
* **Blocks**: pre-LN, LayerNorm eps **1e-5** (torch's default; LV-ViT does not pass eps=1e-6 like DeiT),
  ``qkv`` without bias, ``mlp_ratio`` 3, exact-erf GELU, and residual branches divided by ``skip_lam``:
  ``x = x + attn(norm1(x)) / skip_lam; x = x + mlp(norm2(x)) / skip_lam``.
* **Heads**: ``head`` on the CLS token and the token-labelling ``aux_head`` on every patch token.
  The eval-mode output is ``head(cls) + 0.5 * max_over_tokens(aux_head(tokens))``; in training the
  official model returns the CLS logits (and the per-token logits separately).

Attribute names are the official ones (``patch_embed.conv1``, ``patch_embed.bn1``, ..., ``blocks.i.attn.qkv``,
``blocks.i.attn.mask_predictor.proj_c_q``, ``aux_head``), so the official checkpoints
(``lvvit_s-26M-224-83.3.pth.tar``, ``lvvit_m-56M-224-84.0.pth.tar``) load through
``sparsifiner_jax.io.convert``
(BatchNorm ``weight``/``bias`` are our ``scale``/``bias`` Params, ``running_mean``/``running_var`` our
``mean``/``var`` BatchStats).

Sparsifiner attention (``keep_rate`` set) reuses ``models.vit.Attention`` and its ``MaskPredictor`` unchanged.
The official LV-ViT student scales q before the q·k matmul, applies attention dropout (rate 0) and has no
``nan_to_num``; all three are numerically the same as ours (a top-k row always keeps k >= 1 keys).

Differences from the official code, on purpose:

* BatchNorm statistics are **frozen** by default (``freeze_bn=True``: running averages also in training),
  so a training step is a pure function of the parameters. The official code leaves the stem BatchNorms in
  train mode during fine-tuning (batch statistics, running stats updated). With ``freeze_bn=False`` and
  ``train=True`` the stem uses batch statistics and updates the ``nnx.BatchStat`` variables in place (the
  caller must then carry ``nnx.BatchStat`` state out of its jitted step).
* MixToken (a training-time augmentation inside the official ``forward``) is not implemented: the
  Sparsifiner LV-ViT student does not apply it either.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparsifiner_jax.precision import linear_kwargs, matmul_kwargs
from sparsifiner_jax.models.vit import Block, ViTConfig, check_images, patch_projection, run_blocks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LVViTConfig(ViTConfig):
  """An LV-ViT architecture; every ``ViTConfig`` field keeps its meaning (``patch_size`` is the token stride).

  Fields with LV-ViT defaults (the blocks are ``models.vit.Block``):
    skip_lam: residual branches are divided by this (2.0 for LV-ViT-S/M).
    norm_eps: LayerNorm epsilon (torch default 1e-5 in LV-ViT).
  Extra fields:
    stem_channels: width of the three stem convolutions (64 for "4_2").
    aux_weight: weight of the token-labelling max-pooled aux logits in the eval-mode output (0.5).
    bn_eps: BatchNorm epsilon (torch default 1e-5).
    freeze_bn: use BatchNorm running averages in training too (see the module docstring).
  """

  depth: int = 16
  mlp_ratio: float = 3.0
  qkv_bias: bool = False
  skip_lam: float = 2.0
  stem_channels: int = 64
  aux_weight: float = 0.5
  norm_eps: float = 1e-5
  bn_eps: float = 1e-5
  freeze_bn: bool = True

  def validate(self) -> "LVViTConfig":
    super().validate()
    if self.patch_size % 2:
      raise ValueError(f"patch_size={self.patch_size} must be even for the LV-ViT stem "
                       "(stride-2 conv, then a patch_size/2 projection)")
    if self.token_order != "raster":
      raise ValueError(f"token_order={self.token_order!r}: LV-ViT's token labels are laid out on the raster "
                       "patch grid; it takes token_order='raster'")
    if not isinstance(self.stem_channels, int) or self.stem_channels < 1:
      raise ValueError(f"stem_channels={self.stem_channels!r} must be a positive integer")
    for name in ("skip_lam", "norm_eps", "bn_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
    return self


# torch's default Conv2d init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)).
_TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class PatchEmbed4_2(nnx.Module):  # noqa: N801 -- the official name
  """Convolutional stem + patch projection: ``[B, H, W, C] -> [B, (H/p)*(W/p), D]``."""

  def __init__(self, cfg: LVViTConfig, *, rngs: nnx.Rngs):
    ch = cfg.stem_channels
    conv = dict(use_bias=False, **matmul_kwargs(cfg.dtype), kernel_init=_TORCH_CONV_INIT, rngs=rngs)
    bn = dict(use_running_average=True, momentum=0.9, epsilon=cfg.bn_eps, dtype=jnp.float32,
              param_dtype=jnp.float32, rngs=rngs)
    self.conv1 = nnx.Conv(cfg.in_chans, ch, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), **conv)
    self.bn1 = nnx.BatchNorm(ch, **bn)
    self.conv2 = nnx.Conv(ch, ch, (3, 3), padding=((1, 1), (1, 1)), **conv)
    self.bn2 = nnx.BatchNorm(ch, **bn)
    self.conv3 = nnx.Conv(ch, ch, (3, 3), padding=((1, 1), (1, 1)), **conv)
    self.bn3 = nnx.BatchNorm(ch, **bn)
    p = cfg.patch_size // 2
    self.proj = nnx.Conv(ch, cfg.embed_dim, (p, p), strides=(p, p), padding="VALID",
                         **matmul_kwargs(cfg.dtype), kernel_init=_TORCH_CONV_INIT, rngs=rngs)

  def __call__(self, x: Array, *, batch_stats: bool = False) -> Array:
    """``batch_stats=True`` normalises with batch statistics and updates the running averages."""
    ura = not batch_stats
    x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    x = jax.nn.relu(self.bn2(self.conv2(x), use_running_average=ura))
    x = jax.nn.relu(self.bn3(self.conv3(x), use_running_average=ura))
    return patch_projection(self.proj, x)


class LVViT(nnx.Module):
  """LV-ViT with class token and token-labelling head; Sparsifiner attention when ``keep_rate`` is set.

  Call: ``logits, aux = model(images, train=False, recon=False, rng=None, with_attention=False)``

  * ``images``: ``[B, img_size, img_size, in_chans]`` float, ImageNet mean/std normalised.
  * ``logits`` ``[B, num_classes]`` float32: with ``train=False`` the official eval output
    ``cls_logits + aux_weight * max_tokens(aux_logits)``; with ``train=True`` the CLS logits alone (what
    the official model returns in training and what its teacher returns for distillation).
  * ``aux``: the same keys as ``VisionTransformer`` -- ``masks``, ``approx_attn``, ``attn`` (per layer),
    ``pre_logits`` (final-LN CLS token ``[B, D]``) -- where ``tokens`` is, as in the official Sparsifiner
    LV-ViT losses, the **per-token aux-head logits** ``[B, N-1, num_classes]`` (float32); plus
    ``cls_logits`` ``[B, num_classes]``, ``aux_logits`` (= ``tokens``) and ``features`` (final-LN patch
    tokens ``[B, N-1, D]``).
  """

  def __init__(self, cfg: LVViTConfig, *, rngs: nnx.Rngs):
    self.config = cfg.validate()
    self.patch_embed = PatchEmbed4_2(cfg, rngs=rngs)
    trunc = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(trunc(rngs.params(), (1, 1, cfg.embed_dim)))
    self.pos_embed = nnx.Param(trunc(rngs.params(), (1, cfg.num_tokens, cfg.embed_dim)))
    rates = cfg.layer_keep_rates() or (None,) * cfg.depth
    dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    self.blocks = nnx.List([Block(cfg, rates[i], dpr[i], layer=i, rngs=rngs) for i in range(cfg.depth)])
    self.norm = nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.norm_eps, dtype=jnp.float32,
                              param_dtype=jnp.float32, rngs=rngs)
    head = dict(**linear_kwargs(cfg.dtype), kernel_init=trunc,
                bias_init=nnx.initializers.zeros, rngs=rngs)
    self.head = nnx.Linear(cfg.embed_dim, cfg.num_classes, **head)
    self.aux_head = nnx.Linear(cfg.embed_dim, cfg.num_classes, **head)

  def check_input(self, images: Array) -> None:
    check_images(self.config, images)

  def __call__(self, images: Array, *, train: bool = False, recon: bool = False,
               rng: Array | None = None, with_attention: bool = False) -> tuple[Array, dict[str, Any]]:
    self.check_input(images)
    cfg = self.config
    x = self.patch_embed(images, batch_stats=train and not cfg.freeze_bn)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    x, aux = run_blocks(self.blocks, cfg, x, train=train, recon=recon, rng=rng,
                        with_attention=with_attention)
    x = self.norm(x)
    cls_logits = self.head(x[:, 0])
    aux_logits = self.aux_head(x[:, 1:])
    logits = cls_logits if train else cls_logits + cfg.aux_weight * aux_logits.max(axis=1)
    return logits, dict(aux, tokens=aux_logits, pre_logits=x[:, 0], cls_logits=cls_logits,
                        aux_logits=aux_logits, features=x[:, 1:])
