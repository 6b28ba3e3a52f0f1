"""Weights in and out: timm/DeiT/big_vision/LV-ViT/Sparsifiner checkpoints <-> our NNX models.

Command line (``python -m sparsifiner_jax.convert --help``)::

    python -m sparsifiner_jax.convert deit_small_patch16_224-cd65a155.pth weights/deit_s
    python -m sparsifiner_jax.convert deit_s.safetensors weights/deit_s_384 --img-size 384
    python -m sparsifiner_jax.convert ViT-S_16.npz weights/vit_s --model deit_small_patch16_224
    python -m sparsifiner_jax.convert weights/deit_s deit_s.safetensors     # export, timm key names
    python -m sparsifiner_jax.convert weights/deit_s deit_s.npz             # export, big_vision names

Import formats (``--src-format``, detected from the suffix or the file's first bytes):

* ``torch`` -- ``.pth``/``.pt``/``.pth.tar``/``.bin`` (needs torch). A ``model``/``state_dict``/``module``
  wrapper is unwrapped and a DDP ``module.`` key prefix stripped. Loaded with ``weights_only=True``
  (``argparse.Namespace`` allowed, as in training checkpoints); other pickled objects need
  ``--trust-pickle``.
* ``safetensors`` -- read without torch.
* ``npz`` -- big_vision (``params/`` prefix, ``pos_embedding`` without the CLS slot, ``cls`` with no
  position added, ``MultiHeadDotProductAttention_0``/``LayerNorm_1``/``MlpBlock_0``, scanned
  ``encoderblock`` stacks) and vit_jax/AugReg (``opt/target/`` or no prefix,
  ``Transformer/posembed_input/pos_embedding`` with the CLS slot, ``..._1``/``LayerNorm_2``/``MlpBlock_3``).
  Split ``query``/``key``/``value`` kernels ``[D, H, d]`` are joined into ``qkv``.
* ``weights`` -- one of our weights directories (``sparsifiner_jax.weights``).

Export formats (``--format``, default from the DST suffix): ``weights`` (a directory), ``safetensors``
(timm key names; ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``
loads it), ``npz`` (big_vision names, ``params/`` prefix) and ``torch`` (``.pth`` state dict).

Key mapping. Our attribute names are timm's (and the official Sparsifiner's for ``mask_predictor``, the
official LV-ViT's for its stem and ``aux_head``), so a parameter path ``blocks/3/attn/qkv/kernel`` is the
timm key ``blocks.3.attn.qkv.weight``. Linear kernels are transposed (``[out, in]`` -> ``[in, out]``), conv
kernels go ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]`` (HWIO), LayerNorm/BatchNorm ``weight`` is our ``scale``,
BatchNorm ``running_mean``/``running_var`` are our ``mean``/``var`` (``nnx.BatchStat``);
``num_batches_tracked`` is accepted on import and written as 0 on export.

The architecture is inferred from the shapes (embedding width, depth, patch size, MLP width, qkv bias,
LV-ViT stem) and matched against ``models.VARIANTS`` unless ``--model`` names it. A checkpoint with
``mask_predictor`` keys builds a Sparsifiner model (``keep_rate`` 0.25 as in the released config unless
``--keep-rate`` is given; ``reduce_c`` and the predictor's reduced token count ``m`` from the shapes).

Every conversion consumes every source key and checks every shape; a mismatch raises
:class:`ConversionError` naming the missing, unexpected and mis-shaped keys. Outputs are written to a
temporary path and renamed, so nothing is left at DST when a conversion fails.

Resolution changes (``--img-size``): the patch-grid part of ``pos_embed`` is resampled over the 2-D grid
with **bicubic interpolation exactly as timm's ``resample_abs_pos_embed`` defaults** (torch
``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``: Keys cubic a = -0.5, the kernel
widened by the scale when downsampling, weights renormalised at the borders; implemented with
``jax.image.resize(method="bicubic")``, which matches timm to ~1e-6). The CLS slot is kept. The predictor's
token-sized ``proj_n``/``proj_back_n`` ``[N, m]`` are resampled the same way over their patch rows, keeping
row 0 (CLS) and ``m`` (:func:`resize_token_params`). The official Sparsifiner code interpolates
with ``antialias=False`` (Keys a = -0.75, no border renormalisation) for its 384 fine-tuning, so its
resampled tables differ from timm's and ours.

Distilled DeiT checkpoints (``dist_token``/``head_dist``) are refused: our models have one class token.
Note that big_vision/AugReg weights expect inputs scaled to [-1, 1], not the ImageNet mean/std of DeiT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import traceback
import zipfile
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
RELEASED_KEEP_RATE = 0.25  # the only released Sparsifiner config (SPARSIFINER.md §4)

SRC_FORMATS = ("auto", "torch", "safetensors", "npz", "weights")
DST_FORMATS = ("weights", "safetensors", "npz", "torch")
_SUFFIXES = {".safetensors": "safetensors", ".npz": "npz", ".pth": "torch", ".pt": "torch",
             ".tar": "torch", ".bin": "torch", ".ckpt": "torch"}


class ConversionError(ValueError):
  """A checkpoint cannot be read or does not fit the model; the message says precisely why."""


# ------------------------------------------------------------------------------------------------
# Our parameter paths <-> timm keys and layouts.


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
    x = x.detach().cpu()
    x = x.float().numpy() if x.is_floating_point() else x.numpy()
  return np.asarray(x)


def _weight_state(model: nnx.Module):
  return nnx.state(model, WEIGHT_TYPES)


def _summarise(title: str, items: Sequence[str], limit: int, sep: str = ", ") -> str:
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
  state = _weight_state(model)
  ours = _flatten(nnx.to_pure_dict(state))
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
    raw = _as_numpy(src[key])
    value = to_ours(path, raw)
    if tuple(value.shape) != tuple(ours[path].shape):
      mis_shaped.append(f"{key}: checkpoint {tuple(raw.shape)} -> {tuple(value.shape)}, "
                        f"model wants {tuple(ours[path].shape)}")
      continue
    new[path] = jnp.asarray(value, dtype=ours[path].dtype)
  if missing or unexpected or mis_shaped:
    lines = []
    if missing:
      lines.append(_summarise("missing keys", missing, 12))
    if unexpected:
      lines.append(_summarise("unexpected keys", unexpected, 12))
    if mis_shaped:
      lines.append(_summarise("mis-shaped keys", mis_shaped, 6, sep="; "))
    raise ConversionError("state dict does not fit the model: " + " | ".join(lines))
  nnx.replace_by_pure_dict(state, _unflatten(new))
  nnx.update(model, state)
  return model


def timm_state_dict(model: nnx.Module, *, backbone_only: bool = False) -> dict[str, np.ndarray]:
  """Our model's weights as a timm-style state dict of numpy arrays (timm key names and layouts).

  BatchNorms also get ``num_batches_tracked`` (int64 0), as in a torch state dict. ``backbone_only``
  leaves out the Sparsifiner ``mask_predictor`` parameters (a plain timm model has none).
  """
  flat = _flatten(nnx.to_pure_dict(_weight_state(model)))
  out = {}
  for p, v in flat.items():
    if backbone_only and PREDICTOR in p:
      continue
    out[timm_key(p)] = np.ascontiguousarray(to_timm(p, np.asarray(jax.device_get(v))))
    if p[-1] == "var":
      out[timm_key(p[:-1] + ("num_batches_tracked",))] = np.zeros((), np.int64)
  return out


# ------------------------------------------------------------------------------------------------
# Resolution changes.


def resample_pos_embed(pos_embed: Any, new_grid: int | Sequence[int], *, num_prefix_tokens: int = 1,
                       old_grid: int | Sequence[int] | None = None) -> np.ndarray:
  """Resamples the patch-grid part of ``pos_embed`` ``[1, P + G_old, D]`` to ``[1, P + G_new, D]``.

  The ``P = num_prefix_tokens`` leading slots (CLS) are kept as they are; the grid part is reshaped to
  ``[h, w, D]`` (square unless ``old_grid`` says otherwise) and resized with bicubic interpolation as
  timm's ``resample_abs_pos_embed`` does by default (antialiased bicubic; matches it to ~1e-6).
  """
  pe = np.asarray(_as_numpy(pos_embed), np.float32)
  if pe.ndim == 2:
    pe = pe[None]
  new = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  n_grid = pe.shape[1] - num_prefix_tokens
  if old_grid is None:
    side = math.isqrt(max(n_grid, 0))
    if side * side != n_grid:
      raise ConversionError(f"position embedding has {pe.shape[1]} tokens: {n_grid} after "
                            f"{num_prefix_tokens} prefix token(s) is not a square grid")
    old = (side, side)
  else:
    old = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
  if old == new:
    return pe
  prefix, grid = pe[:, :num_prefix_tokens], pe[0, num_prefix_tokens:].reshape(*old, pe.shape[-1])
  grid = jax.image.resize(jnp.asarray(grid), (*new, pe.shape[-1]), method="bicubic")
  grid = np.asarray(grid, np.float32).reshape(1, new[0] * new[1], pe.shape[-1])
  return np.concatenate([prefix, grid], axis=1)


def resize_token_params(param: Any, new_grid: int | Sequence[int], *,
                        num_prefix_tokens: int = 1) -> np.ndarray:
  """Resamples a predictor's token-sized parameter ``[N, m]`` (``proj_n``/``proj_back_n``) to a new grid.

  Row 0 (the CLS token) is kept; the ``N - 1`` patch rows are viewed as a ``[g, g, m]`` map and resized
  to ``[g', g', m]`` with the same bicubic interpolation as :func:`resample_pos_embed`; ``m`` is unchanged.
  Returns ``[g'^2 + 1, m]``.
  """
  p = np.asarray(_as_numpy(param), np.float32)
  if p.ndim != 2:
    raise ConversionError(f"token parameter must be [N, m]; got shape {p.shape}")
  return resample_pos_embed(p[None], new_grid, num_prefix_tokens=num_prefix_tokens)[0]


def _reduce_n_keeping(m: int, num_tokens: int, preferred: int) -> int | None:
  """A ``reduce_n`` with ``num_tokens // reduce_n == m`` (``preferred`` if it works), else None."""
  if num_tokens // preferred == m:
    return preferred
  for rn in range(1, num_tokens + 1):
    if num_tokens // rn == m:
      return rn
  return None


def adapt_state_dict(state_dict: Mapping[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
  """Resamples ``pos_embed`` and the predictors' ``proj_n``/``proj_back_n`` to ``cfg``'s token grid."""
  sd = dict(state_dict)
  grid = cfg.grid_size
  if "pos_embed" in sd and _as_numpy(sd["pos_embed"]).shape[1] != cfg.num_tokens:
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid)
  for k in list(sd):
    if PREDICTOR in k and k.rsplit(".", 1)[-1] in ("proj_n", "proj_back_n"):
      if _as_numpy(sd[k]).shape[0] != cfg.num_tokens:
        sd[k] = resize_token_params(sd[k], grid)
  return sd


# ------------------------------------------------------------------------------------------------
# Reading checkpoints.


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def detect_format(path: str) -> str:
  """``torch``, ``safetensors``, ``npz`` or ``weights`` for ``path`` (suffix first, then content)."""
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "model.json")):
      return "weights"
    raise ConversionError(f"{path!r} is a directory but not a weights directory (no model.json)")
  if not os.path.exists(path):
    raise ConversionError(f"{path!r} does not exist")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in _SUFFIXES:
    return _SUFFIXES[suffix]
  with open(path, "rb") as f:
    head = f.read(16)
  size = os.path.getsize(path)
  if head[:4] == b"PK\x03\x04":
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile as e:
      raise ConversionError(f"{path!r} looks like a zip archive but cannot be read ({_one_line(e)}); "
                            "is the file truncated?") from e
    if any(n.endswith("data.pkl") for n in names):
      return "torch"
    if names and all(n.endswith(".npy") for n in names):
      return "npz"
  elif head[:1] == b"\x80":  # legacy (non-zip) torch.save pickle
    return "torch"
  elif len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
    return "safetensors"
  raise ConversionError(f"unknown checkpoint format for {path!r} (suffix {suffix or 'none'!r}); "
                        f"supported: .pth/.pt (torch), .safetensors, .npz (big_vision/vit_jax), a weights "
                        "directory; or name it with --src-format")


def _is_array(v: Any) -> bool:
  return isinstance(v, np.ndarray) or hasattr(v, "detach") or isinstance(v, jax.Array)


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, Any]:
  """The tensor dict inside a training checkpoint (``model``/``state_dict``/``module`` wrappers).

  Also strips a ``module.`` prefix present on every key (DistributedDataParallel).
  """
  seen = []
  while isinstance(obj, Mapping) and not all(_is_array(v) for v in obj.values()):
    for key in ("model", "state_dict", "module"):
      if isinstance(obj.get(key), Mapping):
        seen.append(key)
        obj = obj[key]
        break
    else:
      break
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(f"{where} holds no state dict (got {type(obj).__name__})")
  bad = sorted(str(k) for k, v in obj.items() if not _is_array(v))
  if bad:
    raise ConversionError(
        f"{where} is not a state dict: entries {bad[:8]} are not tensors (looked inside "
        f"{'/'.join(seen) or 'the top level'}; expected tensors or a 'model'/'state_dict'/'module' entry)")
  sd = {str(k): v for k, v in obj.items()}
  if all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def _read_torch(path: str, trust_pickle: bool) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError(f"reading {path!r} needs torch (pip install torch), or convert it to "
                          ".safetensors elsewhere") from e
  import pickle  # pylint: disable=import-outside-toplevel
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
      raise ConversionError(f"{path!r} contains pickled Python objects besides tensors; if you trust "
                            "the file, pass --trust-pickle (trust_pickle=True)") from e
    raise ConversionError(f"cannot read {path!r} as a torch checkpoint ({_one_line(e)}); "
                          "is the file corrupt?") from e
  except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated or corrupt files
    raise ConversionError(f"cannot read {path!r} as a torch checkpoint ({_one_line(e)}); "
                          "is the file truncated or corrupt?") from e
  return {k: _as_numpy(v) for k, v in unwrap_state_dict(obj, repr(path)).items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    try:
      sd = dict(load_file(path))
    except TypeError:  # bfloat16 without ml_dtypes registered: read through JAX
      with safe_open(path, framework="flax") as f:
        sd = {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
    return {k: _float32(v) for k, v in sd.items()}
  except Exception as e:  # SafetensorError for a bad header or a short file
    raise ConversionError(f"cannot read {path!r} as safetensors ({_one_line(e)}); "
                          "is the file truncated or corrupt?") from e


def _float32(v: np.ndarray) -> np.ndarray:
  """Floating arrays (float16/bfloat16/float64) as float32, like the torch reader; others unchanged."""
  return v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: np.asarray(z[k]) for k in z.files}
  except Exception as e:  # BadZipFile, ValueError, EOFError, OSError
    raise ConversionError(f"cannot read {path!r} as .npz ({_one_line(e)}); "
                          "is the file truncated or corrupt?") from e


def _read_weights_dir(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from sparsifiner_jax import weights  # pylint: disable=import-outside-toplevel
  try:
    meta = weights.read_meta(path)
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.restore(os.path.join(os.path.abspath(path), "params"))
  except Exception as e:
    raise ConversionError(f"cannot read weights directory {path!r} ({_one_line(e)})") from e
  sd = {timm_key(p): to_timm(p, np.asarray(v)) for p, v in _flatten(saved).items()}
  return sd, meta


def read_checkpoint(path: str, src_format: str = "auto", *, trust_pickle: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """Reads ``path`` into a timm-style state dict of numpy arrays (torch layouts).

  Returns ``(state_dict, meta)``; ``meta`` is a weights directory's ``model.json`` content, else None.
  """
  if src_format not in SRC_FORMATS:
    raise ConversionError(f"unknown source format {src_format!r}; allowed: {', '.join(SRC_FORMATS)}")
  if not os.path.exists(path):
    raise ConversionError(f"{path!r} does not exist")
  fmt = detect_format(path) if src_format == "auto" else src_format
  if fmt == "weights":
    return _read_weights_dir(path)
  if os.path.isdir(path):
    raise ConversionError(f"{path!r} is a directory, not a {fmt} file")
  if fmt == "torch":
    return _read_torch(path, trust_pickle), None
  if fmt == "safetensors":
    return _read_safetensors(path), None
  return from_big_vision(_read_npz(path), where=repr(path)), None


# ------------------------------------------------------------------------------------------------
# big_vision / vit_jax npz <-> timm names.


def from_big_vision(w: Mapping[str, np.ndarray], where: str = "npz") -> dict[str, np.ndarray]:
  """A big_vision or vit_jax ``.npz`` dict -> a timm-style ViT state dict (every key must be used).

  Our own Sparsifiner predictors, when present, are read from
  ``Transformer/encoderblock_i/MaskPredictor_0/{proj_c_q,proj_c_k}/{kernel,bias}`` and
  ``.../MaskPredictor_0/{proj_n,proj_back_n}`` (the names :func:`to_big_vision` writes).
  """
  prefix = next((p for p in ("params/", "opt/target/", "") if f"{p}embedding/kernel" in w), None)
  if prefix is None:
    raise ConversionError(f"{where} is not a big_vision/vit_jax ViT checkpoint: no "
                          f"'[params/|opt/target/]embedding/kernel' among {len(w)} arrays "
                          f"(first: {sorted(w)[:4]})")
  w = {k[len(prefix):]: np.asarray(v) for k, v in w.items() if k.startswith(prefix)}
  used: set[str] = set()

  def take(key):
    if key not in w:
      raise ConversionError(f"{where} lacks {prefix}{key}")
    used.add(key)
    return w[key]

  # Scanned checkpoints stack the blocks on axis 0 under Transformer/encoderblock/...
  stacked = [k for k in w if k.startswith("Transformer/encoderblock/")]
  for k in stacked:
    for i, v in enumerate(w[k]):
      w[k.replace("encoderblock/", f"encoderblock_{i}/")] = v
    used.add(k)
  big_vision = "pos_embedding" in w
  mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else (
      "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
  sd = {}
  sd["patch_embed.proj.weight"] = take("embedding/kernel").transpose(3, 2, 0, 1)
  sd["patch_embed.proj.bias"] = take("embedding/bias")
  cls = take("cls").reshape(1, 1, -1)
  sd["cls_token"] = cls
  if big_vision:  # big_vision adds the position embedding before prepending cls
    pe = take("pos_embedding")
    pe = pe.reshape(1, -1, pe.shape[-1])
    sd["pos_embed"] = np.concatenate([np.zeros_like(cls), pe], axis=1)
  else:
    pe = take("Transformer/posembed_input/pos_embedding")
    sd["pos_embed"] = pe.reshape(1, -1, pe.shape[-1])
  depth = 0
  while f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
    depth += 1
  for i in range(depth):
    b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    for src, dst in (("LayerNorm_0", "norm1"), (ln2, "norm2")):
      sd[t + dst + ".weight"] = take(f"{b}{src}/scale")
      sd[t + dst + ".bias"] = take(f"{b}{src}/bias")
    qkv = [take(f"{b}{mha}/{n}/kernel") for n in ("query", "key", "value")]
    dim = qkv[0].shape[0]
    sd[t + "attn.qkv.weight"] = np.concatenate([k.reshape(dim, -1).T for k in qkv], axis=0)
    if f"{b}{mha}/query/bias" in w:
      sd[t + "attn.qkv.bias"] = np.concatenate(
          [take(f"{b}{mha}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
    out = take(f"{b}{mha}/out/kernel")
    sd[t + "attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T
    sd[t + "attn.proj.bias"] = take(f"{b}{mha}/out/bias")
    for j, fc in enumerate(("fc1", "fc2")):
      sd[f"{t}mlp.{fc}.weight"] = take(f"{b}{mlp}/Dense_{j}/kernel").T
      sd[f"{t}mlp.{fc}.bias"] = take(f"{b}{mlp}/Dense_{j}/bias")
    mp = f"{b}MaskPredictor_0/"
    if f"{mp}proj_n" in w:
      for n in ("proj_c_q", "proj_c_k"):
        sd[f"{t}attn.{PREDICTOR}.{n}.weight"] = take(f"{mp}{n}/kernel").T
        sd[f"{t}attn.{PREDICTOR}.{n}.bias"] = take(f"{mp}{n}/bias")
      for n in ("proj_n", "proj_back_n"):
        sd[f"{t}attn.{PREDICTOR}.{n}"] = take(f"{mp}{n}")
  sd["norm.weight"] = take("Transformer/encoder_norm/scale")
  sd["norm.bias"] = take("Transformer/encoder_norm/bias")
  if "head/kernel" in w:
    sd["head.weight"] = take("head/kernel").T
    sd["head.bias"] = take("head/bias")
  unused = [prefix + k for k in sorted(w) if k not in used]
  if unused:
    raise ConversionError(f"{where}: " + _summarise("unsupported arrays", unused, 12)
                          + " (e.g. a pre_logits layer or a non-ViT model)")
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def to_big_vision(sd: Mapping[str, np.ndarray], num_heads: int, prefix: str = "params/"
                  ) -> dict[str, np.ndarray]:
  """A timm-style ViT/DeiT state dict -> big_vision ``.npz`` names (inverse of :func:`from_big_vision`).

  ``num_heads`` sets the ``[D, H, d]`` split of the attention kernels (shapes alone do not tell it).

  ``cls`` = ``cls_token + pos_embed[:, :1]`` and ``pos_embedding`` = ``pos_embed[:, 1:]`` (big_vision adds
  the position embedding before prepending the class token), so the model computes the same function.
  """
  if "patch_embed.conv1.weight" in sd:
    raise ConversionError("npz (big_vision) export supports ViT/DeiT models only; LV-ViT has a "
                          "convolutional stem with no big_vision counterpart -- use .safetensors")
  sd = {k: np.asarray(v) for k, v in sd.items()}
  used: set[str] = set()

  def take(key):
    used.add(key)
    return sd[key]

  w = {}
  w["embedding/kernel"] = take("patch_embed.proj.weight").transpose(2, 3, 1, 0)
  w["embedding/bias"] = take("patch_embed.proj.bias")
  pe = take("pos_embed")
  w["cls"] = take("cls_token") + pe[:, :1]
  w["pos_embedding"] = pe[:, 1:]
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  mha = "MultiHeadDotProductAttention_0"
  for i in range(depth):
    b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    for dst, src in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
      w[f"{b}{dst}/scale"] = take(t + src + ".weight")
      w[f"{b}{dst}/bias"] = take(t + src + ".bias")
    qkv = take(t + "attn.qkv.weight")
    dim = qkv.shape[1]
    heads = num_heads
    for n, part in zip(("query", "key", "value"), np.split(qkv, 3, axis=0)):
      w[f"{b}{mha}/{n}/kernel"] = part.T.reshape(dim, heads, -1)
    if t + "attn.qkv.bias" in sd:
      for n, part in zip(("query", "key", "value"), np.split(take(t + "attn.qkv.bias"), 3)):
        w[f"{b}{mha}/{n}/bias"] = part.reshape(heads, -1)
    w[f"{b}{mha}/out/kernel"] = take(t + "attn.proj.weight").T.reshape(heads, -1, dim)
    w[f"{b}{mha}/out/bias"] = take(t + "attn.proj.bias")
    for j, fc in enumerate(("fc1", "fc2")):
      w[f"{b}MlpBlock_0/Dense_{j}/kernel"] = take(f"{t}mlp.{fc}.weight").T
      w[f"{b}MlpBlock_0/Dense_{j}/bias"] = take(f"{t}mlp.{fc}.bias")
    mp = f"{t}attn.{PREDICTOR}."
    if mp + "proj_n" in sd:
      for n in ("proj_c_q", "proj_c_k"):
        w[f"{b}MaskPredictor_0/{n}/kernel"] = take(f"{mp}{n}.weight").T
        w[f"{b}MaskPredictor_0/{n}/bias"] = take(f"{mp}{n}.bias")
      for n in ("proj_n", "proj_back_n"):
        w[f"{b}MaskPredictor_0/{n}"] = take(mp + n)
  w["Transformer/encoder_norm/scale"] = take("norm.weight")
  w["Transformer/encoder_norm/bias"] = take("norm.bias")
  w["head/kernel"] = take("head.weight").T
  w["head/bias"] = take("head.bias")
  unused = sorted(set(sd) - used)
  if unused:
    raise ConversionError("npz (big_vision) export: " + _summarise("no big_vision name for", unused, 12))
  return {prefix + k: np.ascontiguousarray(v) for k, v in w.items()}


# ------------------------------------------------------------------------------------------------
# Architecture: inferred from shapes, or named.


def _block_indices(sd: Mapping[str, Any]) -> list[int]:
  return sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")
                 and k.split(".")[1].isdigit()})


def _shape(sd, key) -> tuple[int, ...]:
  return tuple(_as_numpy(sd[key]).shape)


def infer_model_name(sd: Mapping[str, Any]) -> str:
  """The ``models.VARIANTS`` name whose architecture fits the state dict's shapes."""
  from sparsifiner_jax import models  # pylint: disable=import-outside-toplevel
  from sparsifiner_jax.models.lvvit import LVViTConfig  # pylint: disable=import-outside-toplevel
  if "patch_embed.proj.weight" not in sd or "blocks.0.mlp.fc1.weight" not in sd:
    raise ConversionError("cannot infer the architecture: no patch_embed.proj.weight / "
                          "blocks.0.mlp.fc1.weight in the checkpoint; is it a ViT? (or pass --model)")
  dim, in_chans, k, _ = _shape(sd, "patch_embed.proj.weight")
  lv = "patch_embed.conv1.weight" in sd
  if lv:
    in_chans = _shape(sd, "patch_embed.conv1.weight")[1]
  found = dict(embed_dim=dim, depth=len(_block_indices(sd)), patch_size=2 * k if lv else k,
               in_chans=in_chans, mlp_hidden=_shape(sd, "blocks.0.mlp.fc1.weight")[0],
               qkv_bias="blocks.0.attn.qkv.bias" in sd)
  if lv:
    found["stem_channels"] = _shape(sd, "patch_embed.conv1.weight")[0]
  for name, cfg in models.VARIANTS.items():
    if (type(cfg) is LVViTConfig) != lv:
      continue
    have = dict(embed_dim=cfg.embed_dim, depth=cfg.depth, patch_size=cfg.patch_size,
                in_chans=cfg.in_chans, mlp_hidden=int(cfg.embed_dim * cfg.mlp_ratio),
                qkv_bias=cfg.qkv_bias)
    if lv:
      have["stem_channels"] = cfg.stem_channels
    if have == found:
      return name
  desc = ", ".join(f"{k}={v}" for k, v in found.items())
  raise ConversionError(f"no known model has {'an LV-ViT' if lv else 'a ViT'} architecture with "
                        f"{desc}; pass --model (known: {', '.join(models.names())})")


def _check_not_distilled(sd: Mapping[str, Any]) -> None:
  dist = sorted(k for k in sd if k == "dist_token" or k.startswith("head_dist."))
  if dist:
    raise ConversionError(
        f"distilled DeiT checkpoints are not supported ({', '.join(dist)} present): our models have a "
        "single class token and head; use the non-distilled DeiT weights (deit_*_patch16_224)")


def resolve_config(sd: Mapping[str, Any], *, model: str | None = None,
                   meta: Mapping[str, Any] | None = None, img_size: int | None = None,
                   keep_rate: float | None = None):
  """``(name, config)`` for loading ``sd``: the named/inferred architecture at the target resolution.

  ``img_size`` defaults to the checkpoint's own (from ``pos_embed``); ``num_classes`` comes from ``head``.
  ``keep_rate=None`` keeps the checkpoint's sparsity: dense without predictor keys, else the weights
  directory's rate or the released 0.25. A checkpoint predictor's ``m`` is kept at a new resolution by
  choosing ``reduce_n`` (an error names the sizes when no integer ``reduce_n`` keeps it).
  """
  from sparsifiner_jax import models  # pylint: disable=import-outside-toplevel
  saved: dict[str, Any] = {}
  if model is not None:
    name = model
  elif meta is not None and meta.get("name") in models.VARIANTS:
    name = meta["name"]
    base_fields = {f.name for f in dataclasses.fields(models.VARIANTS[name])}
    saved = {k: v for k, v in (meta.get("config") or {}).items() if k in base_fields}
  else:
    name = infer_model_name(sd)
  if name not in models.VARIANTS:
    raise ConversionError(f"unknown model {name!r}; known models: {', '.join(models.names())}")
  try:
    base = models.get_config(name, **saved)
  except ValueError as e:
    raise ConversionError(f"bad saved config for {name!r}: {e}") from e
  overrides: dict[str, Any] = {}
  if "pos_embed" in sd:
    n = _shape(sd, "pos_embed")[1] - 1
    side = math.isqrt(max(n, 0))
    if side * side != n:
      raise ConversionError(f"pos_embed has {n + 1} tokens: {n} is not a square patch grid")
    overrides["img_size"] = side * base.patch_size
  if img_size is not None:
    overrides["img_size"] = int(img_size)
  if "head.weight" in sd:
    overrides["num_classes"] = _shape(sd, "head.weight")[0]
  pred = [k for k in sd if PREDICTOR in k and k.endswith(".proj_n")]
  if keep_rate is not None:
    overrides["keep_rate"] = keep_rate
  elif pred:
    overrides["keep_rate"] = (base.keep_rate if base.keep_rate is not None else RELEASED_KEEP_RATE)
  else:
    overrides["keep_rate"] = None
  try:
    cfg = models.get_config(name, **{**saved, **overrides})
  except ValueError as e:
    raise ConversionError(f"cannot build {name!r}: {e}") from e
  if pred:
    m = _shape(sd, pred[0])[1]
    c_key = pred[0][:-len("proj_n")] + "proj_c_q.weight"
    fix: dict[str, Any] = {}
    if c_key in sd:
      c = _shape(sd, c_key)[0]
      rc = next((r for r in range(1, cfg.head_dim + 1) if cfg.head_dim // r == c), None)
      if rc is None:
        raise ConversionError(f"{c_key} has {c} outputs: no reduce_c gives head_dim {cfg.head_dim} // "
                              f"reduce_c == {c}; is --model right?")
      fix["reduce_c"] = rc
    rn = _reduce_n_keeping(m, cfg.num_tokens, cfg.reduce_n)
    if rn is None:
      raise ConversionError(
          f"the checkpoint's predictors have m={m} reduced tokens, and no integer reduce_n gives "
          f"{cfg.num_tokens} // reduce_n == {m} at img_size {cfg.img_size}; choose another --img-size, "
          "or drop the predictors (--backbone-only, with --keep-rate to initialise new ones)")
    fix["reduce_n"] = rn
    cfg = dataclasses.replace(cfg, **fix).validate()
  return name, cfg


def load_checkpoint(src: str, *, model: str | None = None, img_size: int | None = None,
                    keep_rate: float | None = None, src_format: str = "auto",
                    backbone_only: bool = False, trust_pickle: bool = False, seed: int = 0
                    ) -> tuple[nnx.Module, str]:
  """Reads a checkpoint and returns ``(model, name)`` with its weights loaded (strictly).

  Args:
    src: a ``.pth``/``.pt``, ``.safetensors``, ``.npz`` file or a weights directory.
    model: a ``models.VARIANTS`` name; inferred from the shapes (or the weights directory) when None.
    img_size: target resolution; ``pos_embed`` and predictor token params are resampled to it.
    keep_rate: build a Sparsifiner model with this keep rate (see :func:`resolve_config` for None).
    backbone_only: drop the checkpoint's ``mask_predictor`` parameters.
    seed: initialises parameters the checkpoint does not have (new predictors).
  """
  from sparsifiner_jax import models  # pylint: disable=import-outside-toplevel
  sd, meta = read_checkpoint(src, src_format, trust_pickle=trust_pickle)
  _check_not_distilled(sd)
  if backbone_only:
    sd = {k: v for k, v in sd.items() if PREDICTOR not in k}
  name, cfg = resolve_config(sd, model=model, meta=meta, img_size=img_size, keep_rate=keep_rate)
  sd = adapt_state_dict(sd, cfg)
  net = _build(models.BUILDERS[type(cfg)], cfg, sd, seed)
  try:
    load_timm_state_dict(net, sd)
  except ConversionError as e:
    raise ConversionError(f"{src!r} does not fit {name} ({_describe(cfg)}): {e}") from e
  return net, name


def _build(builder, cfg, sd: Mapping[str, Any], seed: int) -> nnx.Module:
  """The model to load ``sd`` into: abstract (no initialisation cost) when ``sd`` has every weight."""
  abstract = nnx.eval_shape(lambda: builder(cfg, rngs=nnx.Rngs(seed)))
  paths = _flatten(nnx.to_pure_dict(_weight_state(abstract)))
  others = jax.tree.leaves(nnx.state(abstract, nnx.Not(nnx.Any(*WEIGHT_TYPES))))
  if others or any(timm_key(p) not in sd for p in paths):
    return builder(cfg, rngs=nnx.Rngs(seed))  # new parameters (predictors) need their initialisers
  return abstract  # every variable is replaced by load_timm_state_dict


def _describe(cfg) -> str:
  return (f"embed_dim={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads}, img_size={cfg.img_size}, "
          f"keep_rate={cfg.keep_rate}")


# ------------------------------------------------------------------------------------------------
# Writing.


def _atomic_file(path: str, write) -> str:
  """Calls ``write(tmp_path)`` then renames ``tmp_path`` to ``path``; removes the temp file on failure."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def export_safetensors(model: nnx.Module, path: str, *, backbone_only: bool = False) -> str:
  """Writes ``model``'s weights with timm key names to ``path`` (atomically)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  sd = timm_state_dict(model, backbone_only=backbone_only)
  return _atomic_file(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))


def export_torch(model: nnx.Module, path: str, *, backbone_only: bool = False) -> str:
  """Writes ``model``'s weights as a torch state dict (``.pth``; needs torch)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError("writing .pth needs torch (pip install torch); use .safetensors") from e
  sd = {k: torch.from_numpy(np.array(v)) for k, v in
        timm_state_dict(model, backbone_only=backbone_only).items()}
  return _atomic_file(path, lambda tmp: torch.save(sd, tmp))


def export_npz(model: nnx.Module, path: str, *, backbone_only: bool = False) -> str:
  """Writes a ViT/DeiT ``model`` as a big_vision ``.npz`` (``params/`` prefix) to ``path`` (atomically)."""
  arrays = to_big_vision(timm_state_dict(model, backbone_only=backbone_only), model.config.num_heads)

  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  return _atomic_file(path, write)


def save_weights_dir(path: str, model: nnx.Module, *, name: str | None = None) -> str:
  """Writes a weights directory (``sparsifiner_jax.weights`` layout) for ``model``, atomically.

  Models without BatchNorm go through ``weights.save_weights``. For models with ``nnx.BatchStat``
  (LV-ViT's stem) the same layout is written with the running statistics included in the ``params``
  tree (``weights.save_weights`` stores ``nnx.Param`` only); ``weights.load_weights`` reads both.
  """
  from sparsifiner_jax import weights  # pylint: disable=import-outside-toplevel
  if not jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
    return weights.save_weights(path, model, name=name)
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    tree = jax.device_get(nnx.to_pure_dict(_weight_state(model)))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), tree)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump(weights.model_meta(model, name), f, indent=1, default=list)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def dst_format_for(path: str) -> str:
  suffix = os.path.splitext(path)[1].lower()
  return {".safetensors": "safetensors", ".npz": "npz", ".pth": "torch", ".pt": "torch"}.get(
      suffix, "weights")


def save(model: nnx.Module, dst: str, fmt: str | None = None, *, name: str | None = None,
         backbone_only: bool = False) -> str:
  """Writes ``model`` to ``dst`` as ``fmt`` (``weights``/``safetensors``/``npz``/``torch``; default from
  the suffix, a path without a known suffix is a weights directory). Atomic."""
  fmt = fmt or dst_format_for(dst)
  if fmt not in DST_FORMATS:
    raise ConversionError(f"unknown output format {fmt!r}; allowed: {', '.join(DST_FORMATS)}")
  if fmt == "weights":
    if backbone_only:
      raise ConversionError("--backbone-only applies to file exports; a weights directory holds "
                            "the model as built (use --backbone-only on import to drop predictors)")
    return save_weights_dir(dst, model, name=name)
  return {"safetensors": export_safetensors, "npz": export_npz, "torch": export_torch}[fmt](
      model, dst, backbone_only=backbone_only)


def convert(src: str, dst: str, *, model: str | None = None, img_size: int | None = None,
            keep_rate: float | None = None, src_format: str = "auto", dst_format: str | None = None,
            backbone_only: bool = False, trust_pickle: bool = False, overwrite: bool = False,
            seed: int = 0) -> str:
  """Converts checkpoint ``src`` into ``dst`` (see the module docstring); returns the written path.

  Every source key is consumed and every shape checked before anything is written; ``dst`` is written
  atomically and only if it does not exist (unless ``overwrite``).
  """
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst!r} exists; pass --overwrite (overwrite=True) to replace it")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ConversionError("source and destination are the same path")
  fmt = dst_format or dst_format_for(dst)
  if fmt not in DST_FORMATS:
    raise ConversionError(f"unknown output format {fmt!r}; allowed: {', '.join(DST_FORMATS)}")
  net, name = load_checkpoint(src, model=model, img_size=img_size, keep_rate=keep_rate,
                              src_format=src_format, backbone_only=backbone_only,
                              trust_pickle=trust_pickle, seed=seed)
  return save(net, dst, fmt, name=name, backbone_only=backbone_only and fmt != "weights")


# ------------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m sparsifiner_jax.convert",
      description="Convert ViT/DeiT/LV-ViT/Sparsifiner weights between timm/torch, safetensors, "
                  "big_vision npz and sparsifiner_jax weights directories.")
  p.add_argument("src", metavar="SRC", help=".pth/.pt, .safetensors, .npz or a weights directory")
  p.add_argument("dst", metavar="DST", help="output: a weights directory, or a .safetensors/.npz/.pth file")
  p.add_argument("--model", help="model name (models.VARIANTS); inferred from the shapes if omitted")
  p.add_argument("--img-size", type=int, help="target image size; pos_embed (and the predictors' "
                 "token params) are resampled bicubically to the new patch grid")
  p.add_argument("--keep-rate", type=float, help="build a Sparsifiner model with this attention keep "
                 "rate (new predictors are initialised); default: as in the checkpoint")
  p.add_argument("--format", dest="dst_format", choices=DST_FORMATS,
                 help="output format (default from the DST suffix; no known suffix = weights directory)")
  p.add_argument("--src-format", default="auto", choices=SRC_FORMATS, help="input format")
  p.add_argument("--backbone-only", action="store_true",
                 help="drop the Sparsifiner mask predictors (e.g. to export for plain timm)")
  p.add_argument("--trust-pickle", action="store_true",
                 help="allow arbitrary pickled objects in .pth files (only for files you trust)")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  p.add_argument("--seed", type=int, default=0, help="seed for parameters the checkpoint lacks")
  p.add_argument("--debug", action="store_true", help="show the traceback on errors")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point: returns 0 on success, 2 on any error (one line on stderr; --debug: traceback)."""
  args = _parser().parse_args(argv)
  try:
    out = convert(args.src, args.dst, model=args.model, img_size=args.img_size,
                  keep_rate=args.keep_rate, src_format=args.src_format, dst_format=args.dst_format,
                  backbone_only=args.backbone_only, trust_pickle=args.trust_pickle,
                  overwrite=args.overwrite, seed=args.seed)
  except Exception as e:  # pylint: disable=broad-except
    if args.debug:
      traceback.print_exc()
    known = isinstance(e, (ConversionError, OSError, ValueError))  # user-facing messages
    msg = " ".join(str(e).split()) if known else (
        f"internal error: {_one_line(e)} (rerun with --debug for the traceback)")
    print(f"error: {msg}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
