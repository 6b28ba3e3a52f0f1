"""The named architectures (``VARIANTS``) and ``create(name, keep_rate=..., rngs=...)``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparsifiner_jax.models.lvvit import LVViT, LVViTConfig
from sparsifiner_jax.models.vit import ViTConfig, VisionTransformer

# Architectures, named after timm where timm has them.
VARIANTS: dict[str, ViTConfig] = {
    "deit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    # Small models for the embedded digits data (16x16 after upsampling) and for tests.
    "vit_digits": ViTConfig(img_size=16, patch_size=2, in_chans=3, num_classes=10, embed_dim=64,
                            depth=4, num_heads=4, mlp_ratio=2.0, reduce_n=4),
    "vit_test": ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32,
                          depth=2, num_heads=2, mlp_ratio=2.0, reduce_n=2, coef_topk=4),
    # LV-ViT (Token Labeling), as in the official Sparsifiner LV-ViT student/teacher.
    "lvvit_s": LVViTConfig(embed_dim=384, depth=16, num_heads=6),
    "lvvit_m": LVViTConfig(embed_dim=512, depth=20, num_heads=8),
    "lvvit_test": LVViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2,
                              num_heads=2, stem_channels=8, reduce_n=2, coef_topk=4),
}


# Which module class builds a config of a given type (LV-ViT etc. register their own config type).
BUILDERS: dict[type, type] = {ViTConfig: VisionTransformer, LVViTConfig: LVViT}


def names() -> list[str]:
  return sorted(VARIANTS)


def get_config(name: str, **overrides: Any) -> ViTConfig:
  """The validated ``ViTConfig`` of a named variant with keyword overrides applied."""
  if name not in VARIANTS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
  fields = {f.name for f in dataclasses.fields(VARIANTS[name])}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown model option(s) {unknown}; allowed: {sorted(fields)}")
  for key in ("keep_rate", "token_pruning_layers"):
    if isinstance(overrides.get(key), (list, tuple)):
      overrides[key] = tuple(overrides[key])
  if isinstance(overrides.get("pattern_options"), dict):   # hashable, order-independent
    overrides["pattern_options"] = tuple(sorted(overrides["pattern_options"].items()))
  return dataclasses.replace(VARIANTS[name], **overrides).validate()


def create(name: str, keep_rate: float | None = None, *, rngs: nnx.Rngs | None = None,
           **overrides: Any) -> VisionTransformer:
  """Builds a named model; ``keep_rate=None`` is the dense ViT, a float (or per-layer list) Sparsifiner."""
  cfg = get_config(name, keep_rate=keep_rate, **overrides)
  return BUILDERS[type(cfg)](cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))


def cast_kernels(state: Any, dtype_name: str) -> Any:
  """``state`` (an ``nnx.State`` or a tree of them) with every matmul kernel in the compute dtype.

  The models cast each ``kernel`` to ``config.dtype`` inside every call (``precision.matmul_kwargs``); for
  weights that stay fixed over many calls -- evaluation, the distillation teacher -- casting once ahead
  gives bit-identical outputs and saves that conversion (~50 ms of a ~190 ms bf16 DeiT-S forward at
  batch 8 on a 2-core CPU). float32: ``state`` unchanged.
  """
  dtype = jnp.dtype(dtype_name)
  if dtype == jnp.float32:
    return state

  def cast(path, x):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return x.astype(dtype) if names and names[-1] == "kernel" else x

  return jax.tree_util.tree_map_with_path(cast, state)
