"""Our parameter paths <-> timm state-dict keys and layouts; strict loading of a state dict into a model.

Our attribute names are timm's (and the official Sparsifiner's for ``mask_predictor``, the official LV-ViT's
for its stem and ``aux_head``), so a parameter path ``blocks/3/attn/qkv/kernel`` is the timm key
``blocks.3.attn.qkv.weight``. Linear kernels are transposed (``[out, in]`` -> ``[in, out]``), conv kernels go
``[O, I, kh, kw]`` -> ``[kh, kw, I, O]`` (HWIO), LayerNorm/BatchNorm ``weight`` is our ``scale``, BatchNorm
``running_mean``/``running_var`` are our ``mean``/``var`` (``nnx.BatchStat``); ``num_batches_tracked`` is
accepted on import and written as 0 on export. This module imports nothing else of the package.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_RENAME_TO_TIMM = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                   "var": "running_var"}
# Variable types that are model weights (saved, loaded, converted); BatchStat = BatchNorm running stats.
WEIGHT_TYPES = (nnx.Param, nnx.BatchStat)
PREDICTOR = "mask_predictor"


class ConversionError(ValueError):
  """A checkpoint cannot be read or does not fit the model; the message says precisely why."""


def flatten(tree: Mapping[Any, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
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


def as_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # torch tensor, without importing torch
    x = x.detach().cpu()
    x = x.float().numpy() if x.is_floating_point() else x.numpy()
  return np.asarray(x)


def weight_state(model: nnx.Module):
  return nnx.state(model, WEIGHT_TYPES)


def summarise(title: str, items: Sequence[str], limit: int, sep: str = ", ") -> str:
  more = f"{sep.strip()} ... (+{len(items) - limit} more)" if len(items) > limit else ""
  return f"{title} ({len(items)}): {sep.join(items[:limit])}{more}"


def load_timm_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *,
                         allow_missing_predictor: bool = True) -> nnx.Module:
  """Loads a timm-style ``state_dict`` (numpy arrays or torch tensors) into ``model`` in place.

  Covers ``nnx.Param`` and ``nnx.BatchStat`` (BatchNorm running statistics). Every key of
  ``state_dict`` must be consumed (``*.num_batches_tracked`` of our BatchNorms is accepted and ignored)
  and every shape must match. Parameters of the Sparsifiner ``mask_predictor``s may be absent (they are
  new; they keep their initialisation) unless ``allow_missing_predictor=False``. Raises
  :class:`ConversionError` naming missing, unexpected and mis-shaped keys. Returns ``model``.
  """
  state = weight_state(model)
  ours = flatten(nnx.to_pure_dict(state))
  by_key = {timm_key(p): p for p in ours}
  src = dict(state_dict.items())
  ignorable = {k for k in src if k.endswith(".num_batches_tracked")
               and k[:-len("num_batches_tracked")] + "running_mean" in by_key}
  missing = sorted(k for k, p in by_key.items() if k not in src
                   and not (allow_missing_predictor and PREDICTOR in p))
  unexpected = sorted(k for k in src if k not in by_key and k not in ignorable)
  mis_shaped, new = [], {}
  for key, path in by_key.items():
    if key not in src:
      new[path] = ours[path]
      continue
    raw = as_numpy(src[key])
    value = to_ours(path, raw)
    if tuple(value.shape) != tuple(ours[path].shape):
      mis_shaped.append(f"{key}: checkpoint {tuple(raw.shape)} -> {tuple(value.shape)}, "
                        f"model wants {tuple(ours[path].shape)}")
      continue
    new[path] = jnp.asarray(value, dtype=ours[path].dtype)
  if missing or unexpected or mis_shaped:
    lines = []
    if missing:
      lines.append(summarise("missing keys", missing, 12))
    if unexpected:
      lines.append(summarise("unexpected keys", unexpected, 12))
    if mis_shaped:
      lines.append(summarise("mis-shaped keys", mis_shaped, 6, sep="; "))
    raise ConversionError("state dict does not fit the model: " + " | ".join(lines))
  nnx.replace_by_pure_dict(state, unflatten(new))
  nnx.update(model, state)
  return model


def timm_state_dict(model: nnx.Module, *, backbone_only: bool = False) -> dict[str, np.ndarray]:
  """Our model's weights as a timm-style state dict of numpy arrays (timm key names and layouts).

  BatchNorms also get ``num_batches_tracked`` (int64 0), as in a torch state dict. ``backbone_only``
  leaves out the Sparsifiner ``mask_predictor`` parameters (a plain timm model has none).
  """
  flat = flatten(nnx.to_pure_dict(weight_state(model)))
  out = {}
  for p, v in flat.items():
    if backbone_only and PREDICTOR in p:
      continue
    out[timm_key(p)] = np.ascontiguousarray(to_timm(p, np.asarray(jax.device_get(v))))
    if p[-1] == "var":
      out[timm_key(p[:-1] + ("num_batches_tracked",))] = np.zeros((), np.int64)
  return out
