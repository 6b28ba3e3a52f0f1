"""Weights in and out: timm-style state dicts <-> our NNX models.

Our attribute names are timm's (and the official Sparsifiner's for ``mask_predictor``), so the mapping is
mechanical: a parameter path ``blocks/3/attn/qkv/kernel`` is the timm key ``blocks.3.attn.qkv.weight``;
Linear kernels are transposed (``[out, in]`` -> ``[in, out]``), the patch-embedding conv kernel goes
``[D, C, p, p]`` -> ``[p, p, C, D]`` (HWIO), LayerNorm ``weight`` is our ``scale``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_RENAME_TO_TIMM = {"kernel": "weight", "scale": "weight"}


class ConversionError(ValueError):
  """A state dict does not fit the model; the message names the offending keys."""


def _flatten(tree: Mapping[Any, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def timm_key(path: tuple) -> str:
  """Our parameter path -> the timm state-dict key."""
  parts = [str(p) for p in path]
  parts[-1] = _RENAME_TO_TIMM.get(parts[-1], parts[-1])
  return ".".join(parts)


def to_ours(path: tuple, value: np.ndarray) -> np.ndarray:
  """timm tensor -> our layout for the parameter at ``path``."""
  if path[-1] == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
  return value


def to_timm(path: tuple, value: np.ndarray) -> np.ndarray:
  """Our parameter at ``path`` -> timm's layout (inverse of :func:`to_ours`)."""
  if path[-1] == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
  return value


def _as_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # torch tensor, without importing torch
    x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
  return np.asarray(x)


def load_timm_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *,
                         allow_missing_predictor: bool = True) -> nnx.Module:
  """Loads a timm-style ``state_dict`` (numpy arrays or torch tensors) into ``model`` in place.

  Every key of ``state_dict`` must be consumed and every shape must match. Parameters of the
  Sparsifiner ``mask_predictor``s may be absent (they are new; they keep their initialisation) unless
  ``allow_missing_predictor=False``. Raises :class:`ConversionError` naming missing, unexpected and
  mis-shaped keys. Returns ``model``.
  """
  params = nnx.state(model, nnx.Param)
  ours = _flatten(nnx.to_pure_dict(params))
  by_key = {timm_key(p): p for p in ours}
  src = {k: v for k, v in state_dict.items()}
  missing = [k for k, p in by_key.items() if k not in src
             and not (allow_missing_predictor and "mask_predictor" in p)]
  unexpected = sorted(k for k in src if k not in by_key)
  mis_shaped, new = [], {}
  for key, path in by_key.items():
    if key not in src:
      new[path] = ours[path]
      continue
    value = to_ours(path, _as_numpy(src[key]))
    if tuple(value.shape) != tuple(ours[path].shape):
      mis_shaped.append(f"{key}: checkpoint {tuple(_as_numpy(src[key]).shape)} -> "
                        f"{tuple(value.shape)}, model wants {tuple(ours[path].shape)}")
      continue
    new[path] = jnp.asarray(value, dtype=ours[path].dtype)
  if missing or unexpected or mis_shaped:
    lines = []
    if missing:
      lines.append(f"missing keys ({len(missing)}): {', '.join(sorted(missing)[:12])}"
                   + (" ..." if len(missing) > 12 else ""))
    if unexpected:
      lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                   + (" ..." if len(unexpected) > 12 else ""))
    if mis_shaped:
      lines.append(f"mis-shaped keys ({len(mis_shaped)}): {'; '.join(mis_shaped[:6])}"
                   + (" ..." if len(mis_shaped) > 6 else ""))
    raise ConversionError("state dict does not fit the model: " + " | ".join(lines))
  nnx.replace_by_pure_dict(params, _unflatten(new))
  nnx.update(model, params)
  return model


def timm_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """Our model's parameters as a timm-style state dict of numpy arrays (timm key names and layouts)."""
  flat = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {timm_key(p): np.asarray(to_timm(p, np.asarray(jax.device_get(v)))) for p, v in flat.items()}
