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
* ``npz`` -- big_vision and vit_jax/AugReg (``io.big_vision``).
* ``weights`` -- one of our weights directories (``io.weights``).

Export formats (``--format``, default from the DST suffix): ``weights`` (a directory), ``safetensors``
(timm key names; ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``
loads it), ``npz`` (big_vision names, ``params/`` prefix) and ``torch`` (``.pth`` state dict).

Key names and layouts: ``io.state_dict``. Resolution changes (``--img-size``): ``io.resample``.

The architecture is inferred from the shapes (embedding width, depth, patch size, MLP width, qkv bias,
LV-ViT stem) and matched against ``models.VARIANTS`` unless ``--model`` names it. A checkpoint with
``mask_predictor`` keys builds a Sparsifiner model (``keep_rate`` 0.25 as in the released config unless
``--keep-rate`` is given; ``reduce_c`` and the predictor's reduced token count ``m`` from the shapes).

Every conversion consumes every source key and checks every shape; a mismatch raises
:class:`ConversionError` naming the missing, unexpected and mis-shaped keys. Outputs are written to a
temporary path and renamed, so nothing is left at DST when a conversion fails.

Distilled DeiT checkpoints (``dist_token``/``head_dist``) are refused: our models have one class token.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sparsifiner_jax import models
from sparsifiner_jax.cli import errors
from sparsifiner_jax.io import atomic, weights
from sparsifiner_jax.io.big_vision import from_big_vision, to_big_vision
from sparsifiner_jax.io.resample import reduce_n_keeping, adapt_state_dict
from sparsifiner_jax.io.state_dict import (PREDICTOR, WEIGHT_TYPES, ConversionError, as_numpy, flatten,
                                           load_timm_state_dict, timm_key, timm_state_dict, weight_state)

RELEASED_KEEP_RATE = 0.25  # the only released Sparsifiner config
SRC_FORMATS = ("auto", "torch", "safetensors", "npz", "weights")
DST_FORMATS = ("weights", "safetensors", "npz", "torch")
_SUFFIXES = {".safetensors": "safetensors", ".npz": "npz", ".pth": "torch", ".pt": "torch",
             ".tar": "torch", ".bin": "torch", ".ckpt": "torch"}

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
      raise ConversionError(f"{path!r} looks like a zip archive but cannot be read ({errors.with_type(e)}); "
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
    import torch  # pylint: disable=import-outside-toplevel  # optional: only .pth files need torch
  except ImportError as e:
    raise ConversionError(f"reading {path!r} needs torch (pip install torch), or convert it to "
                          ".safetensors elsewhere") from e
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
      raise ConversionError(f"{path!r} contains pickled Python objects besides tensors; if you trust "
                            "the file, pass --trust-pickle (trust_pickle=True)") from e
    raise ConversionError(f"cannot read {path!r} as a torch checkpoint ({errors.with_type(e)}); "
                          "is the file corrupt?") from e
  except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated or corrupt files
    raise ConversionError(f"cannot read {path!r} as a torch checkpoint ({errors.with_type(e)}); "
                          "is the file truncated or corrupt?") from e
  return {k: as_numpy(v) for k, v in unwrap_state_dict(obj, repr(path)).items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    try:
      sd = dict(load_file(path))
    except TypeError:  # bfloat16 without ml_dtypes registered: read through JAX
      with safe_open(path, framework="flax") as f:
        sd = {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
    return {k: _float32(v) for k, v in sd.items()}
  except Exception as e:  # SafetensorError for a bad header or a short file
    raise ConversionError(f"cannot read {path!r} as safetensors ({errors.with_type(e)}); "
                          "is the file truncated or corrupt?") from e


def _float32(v: np.ndarray) -> np.ndarray:
  """Floating arrays (float16/bfloat16/float64) as float32, like the torch reader; others unchanged."""
  return v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: np.asarray(z[k]) for k in z.files}
  except Exception as e:  # BadZipFile, ValueError, EOFError, OSError
    raise ConversionError(f"cannot read {path!r} as .npz ({errors.with_type(e)}); "
                          "is the file truncated or corrupt?") from e


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
    try:
      return weights.read_state_dict(path)
    except weights.WeightsError as e:
      raise ConversionError(str(e)) from e
  if os.path.isdir(path):
    raise ConversionError(f"{path!r} is a directory, not a {fmt} file")
  if fmt == "torch":
    return _read_torch(path, trust_pickle), None
  if fmt == "safetensors":
    return _read_safetensors(path), None
  return from_big_vision(_read_npz(path), where=repr(path)), None


def _block_indices(sd: Mapping[str, Any]) -> list[int]:
  return sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")
                 and k.split(".")[1].isdigit()})


def _shape(sd, key) -> tuple[int, ...]:
  return tuple(as_numpy(sd[key]).shape)


def infer_model_name(sd: Mapping[str, Any]) -> str:
  """The ``models.VARIANTS`` name whose architecture fits the state dict's shapes."""
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
    if (type(cfg) is models.LVViTConfig) != lv:
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
    rn = reduce_n_keeping(m, cfg.num_tokens, cfg.reduce_n)
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
  paths = flatten(nnx.to_pure_dict(weight_state(abstract)))
  others = jax.tree.leaves(nnx.state(abstract, nnx.Not(nnx.Any(*WEIGHT_TYPES))))
  if others or any(timm_key(p) not in sd for p in paths):
    return builder(cfg, rngs=nnx.Rngs(seed))  # new parameters (predictors) need their initialisers
  return abstract  # every variable is replaced by load_timm_state_dict


def _describe(cfg) -> str:
  return (f"embed_dim={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads}, img_size={cfg.img_size}, "
          f"keep_rate={cfg.keep_rate}")


def export_safetensors(model: nnx.Module, path: str, *, backbone_only: bool = False) -> str:
  """Writes ``model``'s weights with timm key names to ``path`` (atomically)."""
  sd = timm_state_dict(model, backbone_only=backbone_only)
  return atomic.write_file(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))


def export_torch(model: nnx.Module, path: str, *, backbone_only: bool = False) -> str:
  """Writes ``model``'s weights as a torch state dict (``.pth``; needs torch)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel  # optional: only .pth files need torch
  except ImportError as e:
    raise ConversionError("writing .pth needs torch (pip install torch); use .safetensors") from e
  sd = {k: torch.from_numpy(np.array(v)) for k, v in
        timm_state_dict(model, backbone_only=backbone_only).items()}
  return atomic.write_file(path, lambda tmp: torch.save(sd, tmp))


def export_npz(model: nnx.Module, path: str, *, backbone_only: bool = False) -> str:
  """Writes a ViT/DeiT ``model`` as a big_vision ``.npz`` (``params/`` prefix) to ``path`` (atomically)."""
  arrays = to_big_vision(timm_state_dict(model, backbone_only=backbone_only), model.config.num_heads)

  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  return atomic.write_file(path, write)


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
    return weights.save_weights(dst, model, name=name)
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
