"""DeiT/ViT backbone in Flax NNX with optional Sparsifiner attention.

Attribute names follow timm's ``VisionTransformer`` state-dict keys (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks[i].norm1``, ``blocks[i].attn.qkv``, ``blocks[i].attn.proj``, ``blocks[i].mlp.fc1``,
``norm``, ``head``) and the official Sparsifiner's (``blocks[i].attn.mask_predictor.*``), so weight
conversion is transposes only (``sparsifiner_jax.io.convert``).

Pre-LN blocks, LayerNorm eps 1e-6, exact-erf GELU, qkv bias.

Precision (``config.dtype``): every matmul -- Linear, Conv, attention, predictor -- takes its inputs in
``config.dtype`` and accumulates and returns float32 (``precision.matmul_kwargs``,
``precision.mixed_einsum``);
LayerNorm, softmax, GELU, the residual stream and the logits are float32; parameters are always float32.
With ``bfloat16`` this is bf16 compute at float32 accuracy of everything between the matmuls (and on
XLA:CPU the only bf16 dots that take the AMX path are those returning float32).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparsifiner_jax import attention as attn_lib
from sparsifiner_jax import precision
from sparsifiner_jax.attention import patterns
from sparsifiner_jax.models import token_order
from sparsifiner_jax.models.predictor import MaskPredictor

Array = jax.Array
TOKEN_PRUNING_MODES = ("drop", "mask", "official")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture and sparsity of a model. ``keep_rate=None`` builds a dense ViT (no predictors)."""

  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  num_classes: int = 1000
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-6       # LayerNorm epsilon
  skip_lam: float = 1.0        # residual branches are divided by this (LV-ViT: 2.0)
  # Sparsifiner (docs/method.md). A float or one value per layer.
  keep_rate: float | tuple[float, ...] | None = None
  reduce_n: int = 6
  reduce_c: int = 2
  basis_threshold: float = 0.02
  coef_topk: int = 8
  signed_basis: bool = False
  # Block mode (attention.blocks): 0 selects keys per query row (the official method); b > 0 (a power of
  # two >= 16) selects blocks of b keys per block of b query rows, which the block kernels skip whole.
  mask_block: int = 0
  # Order of the patch tokens in the sequence (models/token_order.py): "raster" (timm's) or "morton"
  # (Z-order: runs of tokens are squares of the image, so block mode's blocks are too).
  token_order: str = "raster"
  # Attention pattern (sparsifiner_jax.attention.patterns): "sparsifiner" (the learned predictor; dense when
  # keep_rate is None) or a fixed/oracle pattern such as "fibottention", with its options as
  # ((name, value), ...) pairs.
  attention_pattern: str = "sparsifiner"
  pattern_options: tuple[tuple[str, Any], ...] = ()
  # Token sparsity (EViT-style, docs/method.md): after each layer in token_pruning_layers keep the
  # top ceil(token_keep_rate^s * P) patch tokens (s = 1, 2, ...) by head-averaged CLS attention.
  # token_pruning_mode: "drop" (shorten the sequence), "mask" (simulate on the full sequence; equals
  # "drop"), "official" (the official code's zeroing: the dense CLS row still sees pruned tokens).
  token_keep_rate: float | None = None
  token_pruning_layers: tuple[int, ...] = (3, 6, 9)
  token_pruning_mode: str = "drop"
  executor: str = "auto"
  dtype: str = "float32"

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2 + 1

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def sparse(self) -> bool:
    """Whether any attention is sparse (the learned predictor, or a fixed/oracle pattern)."""
    return self.keep_rate is not None or self.attention_pattern != "sparsifiner"

  def layer_keep_rates(self) -> tuple[float, ...] | None:
    if self.keep_rate is None:
      return None
    if isinstance(self.keep_rate, (int, float)):
      return (float(self.keep_rate),) * self.depth
    return tuple(float(r) for r in self.keep_rate)

  def validate(self) -> "ViTConfig":
    """Raises ValueError naming the bad field and what is allowed."""
    def bad(msg):
      raise ValueError(msg)
    for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                 "num_heads", "reduce_n", "reduce_c", "coef_topk"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        bad(f"{name}={v!r} must be a positive integer")
    if self.img_size % self.patch_size:
      bad(f"patch_size={self.patch_size} must divide img_size={self.img_size}")
    if self.embed_dim % self.num_heads:
      bad(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
    if self.executor not in attn_lib.EXECUTORS:
      bad(f"unknown attention executor {self.executor!r}; allowed: {sorted(attn_lib.EXECUTORS)}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      bad(f"dtype={self.dtype!r}; allowed: float32, bfloat16, float16")
    if not 0.0 <= self.drop_path_rate < 1.0:
      bad(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
    if self.token_keep_rate is not None:
      if not 0.0 < self.token_keep_rate <= 1.0:
        bad(f"token_keep_rate={self.token_keep_rate} must be in (0, 1] (None: no token pruning)")
      layers = tuple(self.token_pruning_layers)
      if not layers or any(not isinstance(i, int) or not 0 <= i < self.depth - 1 for i in layers) \
          or list(layers) != sorted(set(layers)):
        bad(f"token_pruning_layers={layers} must be increasing layer indices in [0, {self.depth - 2}]")
      if self.token_pruning_mode not in TOKEN_PRUNING_MODES:
        bad(f"token_pruning_mode={self.token_pruning_mode!r}; allowed: {', '.join(TOKEN_PRUNING_MODES)}")
    if not isinstance(self.mask_block, int) or isinstance(self.mask_block, bool) or self.mask_block < 0 \
        or (self.mask_block and (self.mask_block < 16 or self.mask_block & (self.mask_block - 1))):
      bad(f"mask_block={self.mask_block!r} must be 0 (per-row selection) or a power of two >= 16")
    if self.mask_block and self.attention_pattern != "sparsifiner":
      bad(f"mask_block={self.mask_block} is block mode of the learned predictor; attention_pattern="
          f"{self.attention_pattern!r} takes mask_block=0")
    if self.token_order not in token_order.TOKEN_ORDERS:
      bad(f"token_order={self.token_order!r}; allowed: {', '.join(token_order.TOKEN_ORDERS)}")
    if self.token_order != "raster" and self.attention_pattern != "sparsifiner":
      bad(f"attention_pattern={self.attention_pattern!r} is laid out on the raster patch grid; it takes "
          f"token_order='raster', not {self.token_order!r}")
    patterns.validate(self)
    rates = self.layer_keep_rates()
    if rates is not None:
      if len(rates) != self.depth:
        bad(f"keep_rate has {len(rates)} entries but the model has depth {self.depth}; "
            "give one float or one per layer")
      for r in rates:
        if not 0.0 < r <= 1.0:
          bad(f"keep_rate={r} must be in (0, 1] (None for a dense model)")
    return self


class PatchEmbed(nnx.Module):
  """Non-overlapping patches -> tokens: ``[B, H, W, C] -> [B, P, D]``."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    p = cfg.patch_size
    self.proj = nnx.Conv(cfg.in_chans, cfg.embed_dim, kernel_size=(p, p), strides=(p, p),
                         padding="VALID", kernel_init=nnx.initializers.lecun_normal(),
                         **precision.matmul_kwargs(cfg.dtype), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return patch_projection(self.proj, x)


def patch_projection(conv: nnx.Conv, x: Array) -> Array:
  """``conv`` (kernel = stride, VALID) applied as patchify + one matmul: ``[B, H, W, C] -> [B, P, D]``.

  Same result as ``conv(x)`` flattened (to float32 rounding: 3e-6 on DeiT-S), 1.4x (float32) to 3x (bf16)
  faster on XLA:CPU, whose strided convolutions miss the GEMM paths (benchmarks/results/HISTORY.md,
  2026-11-21 bfloat16 section).
  """
  (p, _), (c, d) = conv.kernel_size, conv.kernel[...].shape[-2:]
  b, h, w, _ = x.shape
  hp, wp = h // p, w // p
  patches = x[:, :hp * p, :wp * p].reshape(b, hp, p, wp, p, c).transpose(0, 1, 3, 2, 4, 5)
  out = precision.mixed_einsum("bnk,kd->bnd", patches.reshape(b, hp * wp, p * p * c),
                              conv.kernel[...].reshape(p * p * c, d), conv.dtype)
  return out if conv.bias is None else out + conv.bias[...]


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, dtype_name: str, *, rngs: nnx.Rngs):
    kw = dict(kernel_init=nnx.initializers.truncated_normal(0.02),
              bias_init=nnx.initializers.zeros, **precision.linear_kwargs(dtype_name), rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, dim, **kw)

  def __call__(self, x: Array) -> Array:
    return self.fc2(gelu(self.fc1(x)))


def gelu(x: Array) -> Array:
  """Exact GELU in torch's erf form ``x/2 (1 + erf(x/sqrt 2))``; equals ``jax.nn.gelu(x, approximate=False)``
  (its erfc form) to 1 ulp, and XLA:CPU evaluates it ~3x faster (0.8 vs 2.2 ms on a DeiT-S MLP at batch 8)."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))


class Attention(nnx.Module):
  """Multi-head self-attention; with a ``mask_predictor`` when the layer is sparse.

  ``__call__(x [B, N, D], recon) -> (out [B, N, D], aux)`` with aux keys ``mask`` (AttentionMask or
  None), ``approx_attn`` (``[B, H, N-1, N]`` or None), ``attn`` (dense probabilities ``[B, H, N, N]``,
  float32, with ``with_attention=True``; else None) and ``cls_attn`` (the CLS row's head-averaged
  attention ``[B, N]``, with token pruning; else None).
  """

  def __init__(self, cfg: ViTConfig, keep_rate: float | None, *, layer: int = 0, rngs: nnx.Rngs):
    kw = dict(kernel_init=nnx.initializers.truncated_normal(0.02),
              bias_init=nnx.initializers.zeros, **precision.linear_kwargs(cfg.dtype), rngs=rngs)
    self.num_heads = cfg.num_heads
    self.compute_dtype = jnp.dtype(cfg.dtype)
    self.qkv = nnx.Linear(cfg.embed_dim, 3 * cfg.embed_dim, use_bias=cfg.qkv_bias, **kw)
    self.proj = nnx.Linear(cfg.embed_dim, cfg.embed_dim, **kw)
    self.executor = attn_lib.get_executor(cfg.executor)
    self.executor_name = cfg.executor
    learned = cfg.attention_pattern == "sparsifiner"
    # A fixed/oracle pattern: a hashable callable (q, k) -> AttentionMask, part of the graphdef.
    self.pattern = None if learned else patterns.build(cfg, layer, keep_rate)
    self.mask_predictor = nnx.data(None if keep_rate is None or not learned else MaskPredictor(
          cfg.num_heads, cfg.head_dim, cfg.num_tokens, keep_rate, reduce_n=cfg.reduce_n,
          reduce_c=cfg.reduce_c, basis_threshold=cfg.basis_threshold, coef_topk=cfg.coef_topk,
          signed_basis=cfg.signed_basis, block=cfg.mask_block, dtype=self.compute_dtype, rngs=rngs))

  def __call__(self, x: Array, *, recon: bool = False, tokens: "TokenState | None" = None,
               with_attention: bool = False) -> tuple[Array, dict[str, Any]]:
    b, n, dim = x.shape
    qkv = self.qkv(x).astype(self.compute_dtype).reshape(b, n, 3, self.num_heads, dim // self.num_heads)
    keep = None if tokens is None else tokens.keep                   # [B, N] bool (full-length modes)
    if keep is not None and tokens.mode == "official":                # the official code zeroes q, k, v
      qkv = qkv * keep[:, :, None, None, None].astype(qkv.dtype)
    # Split, not indexed: the gradient is then a concatenation, which XLA folds into the kernels' single
    # qkv-layout result (indexing's gradient adds three zero-padded copies).
    q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))       # [B, N, H, d]
    mask, approx = None, None
    if self.mask_predictor is not None:
      mask, approx = self.mask_predictor(
          qkv, recon=recon, token_index=None if tokens is None else tokens.index, key_keep=keep,
          kept_patches=None if tokens is None else tokens.live_patches(n))
    elif self.pattern is not None:
      mask = self.pattern(q, k)
    key_valid = keep if tokens is not None and tokens.mode == "mask" else None
    if mask is not None:
      if key_valid is not None:
        mask = dataclasses.replace(mask, key_valid=key_valid)
      out = self.executor(q, k, v, mask)
    else:
      out = attn_lib.unmasked_attention(q, k, v, key_valid, self.executor_name)
    out = self.proj(out.reshape(b, n, dim))
    aux = dict(mask=mask, approx_attn=approx,
               attn=attn_lib.attention_probs(q, k) if with_attention else None,
               cls_attn=None if tokens is None else cls_attention(q, k, key_valid))
    return out, aux


def cls_attention(q: Array, k: Array, key_valid: Array | None = None) -> Array:
  """Head-averaged attention of the CLS query (always a dense row): ``[B, N]`` float32."""
  logits = precision.mixed_einsum("bhd,bkhd->bhk", q[:, 0] * q.shape[-1] ** -0.5, k, q.dtype)
  if key_valid is not None:
    logits = jnp.where(key_valid[:, None, :], logits, -jnp.inf)
  return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)


class Block(nnx.Module):
  """Pre-LN block ``[B, N, D] -> [B, N, D]``.

  ``x += attn(norm1(x)) / skip_lam; x += mlp(norm2(x)) / skip_lam``.
  """

  def __init__(self, cfg: ViTConfig, keep_rate: float | None, drop_path: float, *, layer: int = 0,
               rngs: nnx.Rngs):
    norm = dict(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.norm1 = nnx.LayerNorm(cfg.embed_dim, **norm)
    self.attn = Attention(cfg, keep_rate, layer=layer, rngs=rngs)
    self.norm2 = nnx.LayerNorm(cfg.embed_dim, **norm)
    self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.dtype, rngs=rngs)
    self.drop_path = drop_path
    self.skip_lam = cfg.skip_lam

  def _branch(self, x: Array, rng: Array | None) -> Array:
    """Residual branch output: stochastic depth per sample (kept ones rescaled), then 1/skip_lam."""
    if rng is not None and self.drop_path > 0.0:
      keep = 1.0 - self.drop_path
      shape = (x.shape[0],) + (1,) * (x.ndim - 1)
      x = x * jax.random.bernoulli(rng, keep, shape).astype(x.dtype) / keep
    return x if self.skip_lam == 1.0 else x / self.skip_lam

  def __call__(self, x: Array, *, recon: bool = False, rng: Array | None = None,
               tokens: "TokenState | None" = None, with_attention: bool = False):
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    y, aux = self.attn(self.norm1(x), recon=recon, tokens=tokens, with_attention=with_attention)
    x = x + self._branch(y, rngs[0])
    x = x + self._branch(self.mlp(self.norm2(x)), rngs[1])
    return x, aux


# --------------------------------------------------------------------------------------------------
# Token sparsity (EViT-style, docs/method.md).


def token_schedule(cfg: ViTConfig) -> tuple[int, ...]:
  """Live tokens (CLS included) entering each block: ``ceil(r^s * P) + 1`` after the s-th pruning layer.

  DeiT-S, r = 0.7 at layers (3, 6, 9): 197 x4, 139 x3, 98 x3, 69 x2.
  """
  patches = kept = cfg.num_tokens - 1
  out, stage = [], 0
  for i in range(cfg.depth):
    out.append(kept + 1)
    if cfg.token_keep_rate is not None and i in cfg.token_pruning_layers:
      stage += 1
      kept = min(kept, math.ceil(round(cfg.token_keep_rate ** stage * patches, 9)))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class TokenState:
  """Which tokens are live, per ``mode`` (see ``ViTConfig.token_pruning_mode``).

  * ``drop``: the sequence is shortened; ``index [B, N_l]`` holds the original positions (CLS = 0).
  * ``mask``/``official``: full length; ``keep [B, N] bool`` marks live tokens, ``kept_patches`` counts
    the live patch tokens (the same for every sample).
  """

  mode: str
  index: Array | None = None
  keep: Array | None = None
  kept_patches: int | None = None

  def prune(self, x: Array, cls_attn: Array, num_keep: int) -> tuple[Array, "TokenState"]:
    """Keeps the ``num_keep`` live patch tokens with the highest CLS attention ``[B, N_l]``."""
    scores = cls_attn[:, 1:]
    if self.keep is not None:
      scores = jnp.where(self.keep[:, 1:], scores, -jnp.inf)
    _, top = jax.lax.top_k(jax.lax.stop_gradient(scores), num_keep)
    top = jnp.sort(top, axis=-1)                                 # original order: same tie-breaking
    if self.mode == "drop":
      kept = jnp.take_along_axis(x[:, 1:], top[:, :, None], axis=1)
      index = jnp.take_along_axis(self.index[:, 1:], top, axis=1)
      return (jnp.concatenate([x[:, :1], kept], axis=1),
              TokenState("drop", index=jnp.concatenate([self.index[:, :1], index], axis=1)))
    rows = jnp.arange(x.shape[0])[:, None]
    keep = jnp.zeros(self.keep.shape, bool).at[:, 0].set(True).at[rows, top + 1].set(True)
    return x, TokenState(self.mode, keep=keep, kept_patches=num_keep)

  def live_patches(self, num_tokens: int) -> int:
    """Live patch tokens of a ``num_tokens``-long sequence (static)."""
    return num_tokens - 1 if self.mode == "drop" else self.kept_patches

  def patch_index(self) -> Array:
    """Original patch positions (0-based, CLS excluded) of the live patch tokens ``[B, P_l]``."""
    if self.mode == "drop":
      return self.index[:, 1:] - 1
    p = self.keep.shape[1] - 1
    order = jnp.where(self.keep[:, 1:], p - jnp.arange(p), 0)    # live tokens, earlier ones higher
    return jax.lax.top_k(order, self.kept_patches)[1]            # ascending positions


def initial_token_state(cfg: ViTConfig, batch: int) -> TokenState:
  n = cfg.num_tokens
  if cfg.token_pruning_mode == "drop":
    return TokenState("drop", index=jnp.broadcast_to(jnp.arange(n), (batch, n)))
  return TokenState(cfg.token_pruning_mode, keep=jnp.ones((batch, n), bool), kept_patches=n - 1)


def run_blocks(blocks, cfg: ViTConfig, x: Array, *, train: bool, recon: bool, rng: Array | None,
               with_attention: bool = False) -> tuple[Array, dict[str, Any]]:
  """Runs the blocks with token sparsity (off in reconstruction mode, as in the official code).

  Returns ``x`` (live tokens only) and aux with per-layer ``masks``, ``approx_attn``, ``attn`` and
  ``token_index`` (``[B, P_L]`` original patch positions of the final live tokens, or None).
  """
  pruning = cfg.token_keep_rate is not None and not recon
  tokens = initial_token_state(cfg, x.shape[0]) if pruning else None
  schedule = token_schedule(cfg)
  masks, approx, attn = [], [], []
  for i, block in enumerate(blocks):
    block_rng = jax.random.fold_in(rng, i) if (train and rng is not None) else None
    x, aux = block(x, recon=recon, rng=block_rng, tokens=tokens, with_attention=with_attention)
    masks.append(aux["mask"])
    approx.append(aux["approx_attn"])
    attn.append(aux["attn"])
    if pruning and i + 1 < len(blocks) and schedule[i + 1] < schedule[i]:
      x, tokens = tokens.prune(x, aux["cls_attn"], schedule[i + 1] - 1)
    if pruning and tokens.mode == "official":               # pruned rows are zeroed after each block
      x = x * tokens.keep[:, :, None].astype(x.dtype)
  if not pruning:
    return x, dict(masks=masks, approx_attn=approx, attn=attn, token_index=None)
  index = tokens.patch_index()
  if tokens.mode != "drop":
    x = jnp.concatenate([x[:, :1], jnp.take_along_axis(x[:, 1:], index[:, :, None], axis=1)], axis=1)
  return x, dict(masks=masks, approx_attn=approx, attn=attn, token_index=index)


def check_images(cfg: ViTConfig, images: Array) -> None:
  """Raises ValueError unless ``images`` is ``[B, img_size, img_size, in_chans]``."""
  want = (cfg.img_size, cfg.img_size, cfg.in_chans)
  if images.ndim != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f"images must be [batch, {want[0]}, {want[1]}, {want[2]}] (NHWC, "
                     f"img_size={cfg.img_size}, in_chans={cfg.in_chans}); got shape "
                     f"{tuple(images.shape)}")


class VisionTransformer(nnx.Module):
  """DeiT/ViT with class token; Sparsifiner attention in every layer when ``cfg.keep_rate`` is set.

  Call: ``logits, aux = model(images, train=False, recon=False, rng=None, with_attention=False)``

  * ``images``: ``[B, img_size, img_size, in_chans]`` float, normalised (ImageNet mean/std for DeiT).
  * ``train``: enables stochastic depth (needs ``rng``).
  * ``recon``: Sparsifiner phase-1 mode -- dense attention, predictors in reconstruction mode.
  * ``with_attention``: also return every layer's dense attention (the reconstruction target, recall,
    pictures); without it ``aux["attn"]`` holds None per layer and nothing computes it.
  * ``logits``: ``[B, num_classes]`` float32.
  * ``aux`` (per-layer lists have ``depth`` entries; entries are None for dense layers):
      - ``masks``: ``AttentionMask`` per layer (``.to_dense()`` gives ``[B, H, N, N]`` bool);
      - ``approx_attn``: predictor's Â per layer, ``[B, H, N-1, N]`` float32;
      - ``attn``: dense softmax attention per layer, ``[B, H, N, N]`` float32, with
        ``with_attention=True`` (else None);
      - ``tokens``: final-LayerNorm patch tokens ``[B, N-1, D]`` (CLS excluded);
      - ``pre_logits``: final-LayerNorm CLS token ``[B, D]``.
  """

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.config = cfg.validate()
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, cfg.embed_dim)))
    self.pos_embed = nnx.Param(
        nnx.initializers.truncated_normal(0.02)(rngs.params(), (1, cfg.num_tokens, cfg.embed_dim)))
    rates = cfg.layer_keep_rates() or (None,) * cfg.depth
    dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    self.blocks = nnx.List([Block(cfg, rates[i], dpr[i], layer=i, rngs=rngs) for i in range(cfg.depth)])
    self.norm = nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.norm_eps, dtype=jnp.float32,
                              param_dtype=jnp.float32, rngs=rngs)
    self.head = nnx.Linear(cfg.embed_dim, cfg.num_classes, **precision.linear_kwargs(cfg.dtype),
                           kernel_init=nnx.initializers.truncated_normal(0.02),
                           bias_init=nnx.initializers.zeros, rngs=rngs)

  def check_input(self, images: Array) -> None:
    check_images(self.config, images)

  def __call__(self, images: Array, *, train: bool = False, recon: bool = False,
               rng: Array | None = None, with_attention: bool = False) -> tuple[Array, dict[str, Any]]:
    self.check_input(images)
    x = self.patch_embed(images)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    order = token_order.sequence_order(self.config.grid_size, self.config.token_order)
    if order is not None:
      x = x[:, order]
    x, aux = run_blocks(self.blocks, self.config, x, train=train, recon=recon, rng=rng,
                        with_attention=with_attention)
    x = self.norm(x)
    logits = self.head(x[:, 0])
    return logits, dict(aux, tokens=x[:, 1:], pre_logits=x[:, 0])
