"""big_vision / vit_jax ``.npz`` checkpoints <-> timm-style state dicts.

big_vision: ``params/`` prefix, ``pos_embedding`` without the CLS slot, ``cls`` with no position added,
``MultiHeadDotProductAttention_0``/``LayerNorm_1``/``MlpBlock_0``, scanned ``encoderblock`` stacks.
vit_jax/AugReg: ``opt/target/`` or no prefix, ``Transformer/posembed_input/pos_embedding`` with the CLS slot,
``..._1``/``LayerNorm_2``/``MlpBlock_3``. Split ``query``/``key``/``value`` kernels ``[D, H, d]`` are joined
into ``qkv``. Note that these weights expect inputs scaled to [-1, 1], not the ImageNet mean/std of DeiT.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sparsifiner_jax.io.state_dict import PREDICTOR, ConversionError, summarise


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
    raise ConversionError(f"{where}: " + summarise("unsupported arrays", unused, 12)
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
    raise ConversionError("npz (big_vision) export: " + summarise("no big_vision name for", unused, 12))
  return {prefix + k: np.ascontiguousarray(v) for k, v in w.items()}
