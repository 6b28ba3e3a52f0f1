"""PyTorch/timm reference sides for ``benchmarks/run.py``: timm ViTs, a Sparsifiner student, a training step.

Written from the method description in docs/method.md (not from the official code): the student is timm's
ViT whose attention modules are replaced by :class:`SparsifinerAttention`, i.e. the official structure --
a low-rank mask predictor per block (``proj_c_q``/``proj_c_k`` d -> d/rc, ``proj_n``/``proj_back_n``
[N, N/rn], top-``kappa`` basis coefficients, ``|W_up|`` thresholded) whose top-k mask (k = ceil(rho N)
keys per patch query; the CLS row dense) is applied to a dense ``[N, N]`` softmax with ``-inf`` (the
official "simulated" inference).

The predictor's output only feeds the (detached) mask in phase 2, so it runs under ``torch.no_grad()``;
the official code builds its autograd graph because phase 1 reuses the module, but nothing flows back
through it in phase 2.

Also here: :func:`import_timm` (timm against the CPU torch wheel) and
:class:`LiveTensorBytes`, the peak-memory measure of the torch sides.
"""

from __future__ import annotations

import functools
import math
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sparsifiner_jax.io import timm_compat


def import_timm():
  """Imports timm with the CPU torch wheel (``sparsifiner_jax.io.timm_compat``); sets ``HF_HUB_OFFLINE=1``
  unless set (no weights are downloaded)."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  timm_compat.register_torchvision_op_schemas()
  import timm  # pylint: disable=g-import-not-at-top
  return timm


def autocast(dtype_name: str):
  """``torch.autocast("cpu", bfloat16)`` for ``"bfloat16"`` (timm's ``--amp`` mode), else a no-op context."""
  if dtype_name not in ("float32", "bfloat16"):
    raise ValueError(f"torch sides run in float32 or bfloat16, not {dtype_name!r}")
  return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")


def create_timm(name: str, cfg) -> nn.Module:
  """timm's ViT with the architecture of our ``ViTConfig`` (randomly initialised, eval mode).

  ``timm.create_model(name)`` at ``cfg.img_size`` when timm registers ``name`` (``deit_small_patch16_224``);
  otherwise (``vit_test``) timm's ``VisionTransformer`` built with ``cfg``'s dimensions.
  """
  timm = import_timm()
  if timm.is_model(name):
    model = timm.create_model(name, pretrained=False, img_size=cfg.img_size,
                              num_classes=cfg.num_classes)
  else:
    from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
    model = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                              num_classes=cfg.num_classes, embed_dim=cfg.embed_dim, depth=cfg.depth,
                              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias)
  return model.eval()


# --------------------------------------------------------------------------------------------------
# Sparsifiner student.


class MaskPredictor(nn.Module):
  """Per-block connectivity predictor: top-k mask ``[B, H, N, N]`` (bool) from raw q, k ``[B, H, N, d]``."""

  def __init__(self, num_heads: int, head_dim: int, num_tokens: int, keep_rate: float, *,
               reduce_n: int = 6, reduce_c: int = 2, basis_threshold: float = 0.02,
               coef_topk: int = 8):
    super().__init__()
    reduced_c, reduced_n = head_dim // reduce_c, num_tokens // reduce_n
    self.num_heads = num_heads
    self.budget = math.ceil(keep_rate * num_tokens)
    self.basis_threshold = basis_threshold
    self.coef_topk = min(coef_topk, reduced_n)
    self.proj_c_q = nn.Linear(head_dim, reduced_c)
    self.proj_c_k = nn.Linear(head_dim, reduced_c)
    self.proj_n = nn.Parameter(0.02 * torch.randn(num_tokens, reduced_n))
    self.proj_back_n = nn.Parameter(0.02 * torch.randn(num_tokens, reduced_n))

  def approx_attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Â ``[B, H, N-1, N]``: softmax of the low-rank scores (top-kappa kept) times the sparse basis."""
    q_r, k_r = self.proj_c_q(q), self.proj_c_k(k)                        # [B, H, N, c]
    k_hat = torch.einsum("bhnc,nm->bhcm", k_r, self.proj_n)              # [B, H, c, m]
    scores = torch.einsum("bhnc,bhcm->bhnm", q_r[:, :, 1:], k_hat) * self.num_heads ** -0.5
    coef = scores.softmax(dim=-1)
    vals, idx = coef.topk(self.coef_topk, dim=-1)
    coef = torch.zeros_like(coef).scatter_(-1, idx, vals)                 # not renormalised
    basis = self.proj_back_n.t().abs()
    basis = torch.where(basis > self.basis_threshold, basis, torch.zeros_like(basis))
    return coef @ basis

  def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    approx = self.approx_attention(q, k)
    idx = approx.topk(self.budget, dim=-1).indices
    sparse_rows = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, idx, True)
    b, h, _, n = approx.shape
    cls_row = torch.ones(b, h, 1, n, dtype=torch.bool, device=approx.device)
    return torch.cat([cls_row, sparse_rows], dim=2)


class SparsifinerAttention(nn.Module):
  """timm ``Attention`` (its ``qkv``/``proj`` reused) with the predicted top-k mask applied."""

  def __init__(self, attn: nn.Module, predictor: MaskPredictor):
    super().__init__()
    self.num_heads = attn.num_heads
    self.scale = attn.scale
    self.qkv, self.proj = attn.qkv, attn.proj
    self.mask_predictor = predictor

  def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    del args, kwargs  # timm passes attn_mask=None / is_causal=False
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
      keep = self.mask_predictor(q, k)
    logits = (q * self.scale) @ k.transpose(-2, -1)
    attn = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1).nan_to_num()
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def sparsifiner_student(name: str, cfg) -> nn.Module:
  """:func:`create_timm` with Sparsifiner attention at ``cfg.keep_rate`` in every block."""
  model = create_timm(name, cfg)
  for block in model.blocks:
    predictor = MaskPredictor(cfg.num_heads, cfg.head_dim, cfg.num_tokens, float(cfg.keep_rate),
                              reduce_n=cfg.reduce_n, reduce_c=cfg.reduce_c,
                              basis_threshold=cfg.basis_threshold, coef_topk=cfg.coef_topk)
    block.attn = SparsifinerAttention(block.attn, predictor)
  return model


# --------------------------------------------------------------------------------------------------
# Phase-2 ("distill") training step.


def adamw(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
  """AdamW over the trainable params; no decay on 1-D params, ``cls_token``, ``pos_embed`` (spec §4)."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    skip = p.ndim < 2 or name.split(".")[-1] in ("cls_token", "pos_embed", "dist_token")
    (no_decay if skip else decay).append(p)
  return torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                            dict(params=no_decay, weight_decay=0.0)],
                           lr=lr, betas=(0.9, 0.999), eps=1e-8)


def distill_losses(logits, tokens, t_logits, t_tokens, targets, weights) -> torch.Tensor:
  """w_cls soft CE + w_kd KL(teacher || student) ('batchmean') + w_tok MSE of the final patch tokens."""
  cls = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
  kd = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(t_logits, dim=-1), reduction="batchmean",
                log_target=True)
  tok = F.mse_loss(tokens, t_tokens)
  return weights["cls"] * cls + weights["kd"] * kd + weights["tok"] * tok


class TrainStep:
  """``step(images [B, C, H, W], labels [B])``: student fwd/bwd + teacher fwd (no_grad) + AdamW; the
  forwards under ``autocast(dtype)``.

  The student's mask predictors are frozen (phase 2 trains everything else). Targets are label-smoothed
  one-hot vectors; the gradients are dropped after the update, so nothing but parameters and optimizer
  state is live between steps.
  """

  def __init__(self, student: nn.Module, teacher: nn.Module, *, lr: float, weight_decay: float,
               loss_weights: dict[str, float], num_classes: int, label_smoothing: float,
               dtype: str = "float32"):
    self.student = student.train()
    self.teacher = teacher.eval()
    for name, p in student.named_parameters():
      p.requires_grad_("mask_predictor" not in name)
    for p in teacher.parameters():
      p.requires_grad_(False)
    self.optimizer = adamw(student, lr=lr, weight_decay=weight_decay)
    self.weights = dict(loss_weights)
    self.num_classes = num_classes
    self.smoothing = label_smoothing
    self.dtype = dtype

  def targets(self, labels: torch.Tensor) -> torch.Tensor:
    off = self.smoothing / self.num_classes
    return F.one_hot(labels, self.num_classes).float() * (1.0 - self.smoothing) + off

  def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with autocast(self.dtype):        # forwards and losses; backward and AdamW outside, as in timm
      with torch.no_grad():
        t_feats = self.teacher.forward_features(images)
        t_logits = self.teacher.forward_head(t_feats)
      feats = self.student.forward_features(images)
      logits = self.student.forward_head(feats)
      loss = distill_losses(logits.float(), feats[:, 1:].float(), t_logits.float(),
                            t_feats[:, 1:].float(), self.targets(labels), self.weights)
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def resident_tensors(self) -> list[torch.Tensor]:
    """Everything live between steps: both models' params/buffers and the optimizer state."""
    out = [*self.student.parameters(), *self.student.buffers(), *self.teacher.parameters(),
           *self.teacher.buffers()]
    for state in self.optimizer.state.values():
      out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out


# --------------------------------------------------------------------------------------------------
# Peak memory of a torch call.


class LiveTensorBytes(TorchDispatchMode):
  """Tracks the bytes of live tensor storages; ``peak`` is their maximum at op boundaries.

  ``resident`` tensors (parameters, optimizer state, inputs) are counted from the start. Every storage an
  op returns is counted once (views share it) until it is freed. Scratch memory inside an op (oneDNN
  workspaces) and allocator caching are not seen, so this is the tensor-level peak, comparable to XLA's
  argument + output + temp buffer sizes, not the process RSS.
  """

  def __init__(self, resident=()):
    super().__init__()
    self._refs: dict[int, weakref.ref] = {}
    self.live = 0
    self.peak = 0
    for t in resident:
      self._track(t)

  def _track(self, t: torch.Tensor) -> None:
    try:
      st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
      return
    key = id(st)
    if key in self._refs:
      return
    nbytes = st.nbytes()
    self._refs[key] = weakref.ref(st, functools.partial(self._free, key, nbytes))
    self.live += nbytes
    self.peak = max(self.peak, self.live)

  def _free(self, key: int, nbytes: int, _ref) -> None:
    if self._refs.pop(key, None) is not None:
      self.live -= nbytes

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    out = func(*args, **(kwargs or {}))
    for t in pytree.tree_leaves(out):
      if isinstance(t, torch.Tensor):
        self._track(t)
    return out


def peak_bytes(call, resident) -> int:
  """Peak live tensor bytes of one ``call()``, counting the ``resident`` tensors from the start."""
  tracker = LiveTensorBytes(resident)
  with tracker:
    call()
  return int(tracker.peak)
