"""Analytic MAC counts for (Sparsifiner) ViTs, per layer and in total.

One multiply-add is one MAC. fvcore (which produced DeiT-S's "4.6 GFLOPs") also counts one MAC as one
"FLOP", so the paper-style numbers here are GMACs; XLA's ``cost_analysis()["flops"]`` counts two FLOPs per
MAC plus elementwise work (measured on XLA:CPU). Softmax, top-k, LayerNorm, GELU and residual adds are not
counted.

Per layer, per image, with ``N`` live tokens (CLS included), ``C`` embed dim, ``H`` heads, ``d = C / H``,
``c = d // reduce_c``, ``m = num_tokens // reduce_n`` (fixed by the predictor's parameters), and ``F`` the
MLP hidden size (docs/method.md, "Counting FLOPs"):

=====================  =============================================  ==================================
term                   dense layer                                    Sparsifiner layer
=====================  =============================================  ==================================
``qkv``                ``3 N C^2``                                    same
``proj``               ``N C^2``                                      same
``attn_qk``            ``N^2 C``                                      ``nnz d H``
``attn_av``            ``N^2 C``                                      ``nnz d H``
``predictor_channel``  0                                              ``2 N C c`` (q and k, d -> c)
``predictor_token``    0                                              ``H c N m`` (keys, N -> m)
``predictor_scores``   0                                              ``H N c m`` (coarse scores)
``predictor_recon``    0                                              ``H (N-1) kappa N delta_b``
``mlp``                ``2 N C F``                                    same
=====================  =============================================  ==================================

``nnz`` is the number of kept attention entries per head: by default the analytic ``N + (N-1) k`` with
``k = ceil(rho N)`` (the dense CLS row plus ``k`` keys per patch row), or the realised mean from the
masks (:func:`from_aux`). ``kappa`` is the number of basis coefficients kept per row (``coef_topk``, at most
``m``) and ``delta_b`` the fraction of basis entries ``|W_up| > threshold``. With ``sparse_kernels=False``
the attention matrix and the basis product are counted dense (``N^2 C`` each, ``H (N-1) m N``), i.e. what
the masked-dense executor actually computes (and what fvcore would report).
Outside the blocks: ``patch_embed = (N0-1) p^2 C_in C`` and ``head = C K`` (CLS token only).

Fixed/oracle patterns (``cfg.attention_pattern`` other than ``"sparsifiner"``,
``sparsifiner_jax.attention.patterns``): no predictor; ``nnz`` is the realised mean or the pattern's
closed form (``Pattern.nnz_per_head``), and ``predictor_scores`` holds the cost of choosing the mask
(``Pattern.selection_macs``: the full logits for ``oracle_topk``, the k-means distances for ``routing``,
0 for static patterns). A ``fill="zero_logit"`` mask is not sparse (every key keeps weight e^0), so its
attention matrix is counted dense (``nnz = N^2``).

Block mode (``mask_block = b``): ``predictor_scores`` and ``predictor_recon`` are evaluated at the
``nb = ceil(N / b)`` pooled query rows and key columns (``H nb c m``, ``H nb kappa nb delta_b``), and the
analytic ``nnz`` is ``N + (N-1) min(K b, N)`` with ``K = ceil(rho nb)`` kept key blocks (an upper bound
when the ragged last block is kept; the realised ``nnz`` is exact).

Token sparsity (``tokens_per_layer``): every per-layer term is evaluated at that layer's live token count
``N_l``, the attention budget becomes ``k = ceil(rho N_l)``, and ``m`` stays fixed.

**Named totals** (papers disagree on what "MHSA FLOPs" are, so every figure is named; all in MACs):

* ``"total"`` -- the whole model: patch embedding + all blocks (incl. predictors) + head.
* ``"mhsa"`` ("MHSA FLOPs") -- the attention sub-layer: ``qkv + proj`` + the attention matrix
  (``QK^T + AV``) + the predictor.
* ``"attention_matrix"`` ("attention-matrix FLOPs") -- only what attention sparsity can shrink:
  ``QK^T + AV`` (dense, or ``nnz``-based) **plus** the predictor overhead. This is the definition under
  which Sparsifiner's "48-69 % fewer MHSA FLOPs" is reachable (docs/method.md).
* ``"attention_matrix_dense"``, ``"mhsa_dense"``, ``"total_dense"`` -- the same quantities for the dense
  model at the same token counts (no predictor, ``nnz = N^2``): the references for relative savings.
* ``"predictor"``, ``"projections"`` (qkv + proj), ``"mlp"``, ``"patch_embed"``, ``"head"`` -- parts.

DeiT-S (dense): 4.60 GMACs in total, 146.0 M MHSA and 29.8 M attention-matrix MACs per layer; at
``rho = 0.25`` with a dense basis the attention matrix is 7.68 M + 9.12 M predictor = 16.8 M per layer
(-44 %).

Example::

  cfg = models.get_config("deit_small_patch16_224", keep_rate=0.25)
  report = flops.count(cfg)
  report.gmacs["total"], report.totals["attention_matrix"]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from sparsifiner_jax.attention import patterns
from sparsifiner_jax.attention import blocks
from sparsifiner_jax.attention.mask import budget
from sparsifiner_jax.models.vit import token_schedule

# Per-layer keys summed into the named totals.
ATTENTION_KEYS = ("attn_qk", "attn_av")
PREDICTOR_KEYS = ("predictor_channel", "predictor_token", "predictor_scores", "predictor_recon")
PROJECTION_KEYS = ("qkv", "proj")
MAC_KEYS = PROJECTION_KEYS + ATTENTION_KEYS + PREDICTOR_KEYS + ("mlp",)


@dataclasses.dataclass
class FlopsReport:
  """MAC counts of one image's forward pass.

  Attributes:
    per_layer: one dict per block with the MAC terms of ``MAC_KEYS`` plus descriptive entries
      ``tokens`` (live tokens N_l), ``nnz_per_head`` (kept attention entries per head), ``density``
      (``nnz_per_head / N_l^2``), ``coef_kept`` (kappa), ``basis_density`` (delta_b) and
      ``attention_matrix_dense`` (``2 N_l^2 C``).
    patch_embed: MACs of the patch embedding.
    head: MACs of the classifier head.
    totals: named totals in MACs (see the module docstring).
  """

  per_layer: list[dict[str, float]]
  patch_embed: float
  head: float
  totals: dict[str, float]

  @property
  def gmacs(self) -> dict[str, float]:
    """``totals`` in GMACs (1e9 MACs)."""
    return {k: v / 1e9 for k, v in self.totals.items()}

  @property
  def total_gmacs(self) -> float:
    return self.totals["total"] / 1e9

  @property
  def mhsa_gmacs(self) -> float:
    return self.totals["mhsa"] / 1e9

  @property
  def attention_matrix_gmacs(self) -> float:
    return self.totals["attention_matrix"] / 1e9

  def reduction(self, name: str = "attention_matrix") -> float:
    """Fractional saving of a named total against its dense reference (0.44 means -44 %)."""
    return 1.0 - self.totals[name] / self.totals[f"{name}_dense"]

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable form: ``{"totals", "gmacs", "patch_embed", "head", "per_layer"}``."""
    return {
        "totals": dict(self.totals),
        "gmacs": self.gmacs,
        "patch_embed": self.patch_embed,
        "head": self.head,
        "per_layer": [dict(layer) for layer in self.per_layer],
    }


def _per_layer(value, depth: int, name: str) -> list:
  if value is None or np.isscalar(value):
    return [value] * depth
  values = list(value)
  if len(values) != depth:
    raise ValueError(f"{name} has {len(values)} entries but the model has depth {depth}; "
                     "give one value or one per layer")
  return values


def count(cfg, *, nnz_per_head: Sequence[float | None] | None = None, coef_kept: int | None = None,
          basis_density: Sequence[float] | float = 1.0,
          tokens_per_layer: Sequence[int] | None = None, sparse_kernels: bool = True) -> FlopsReport:
  """Analytic MACs of one image through the model ``cfg`` describes.

  Args:
    cfg: a ``ViTConfig`` (``keep_rate=None`` is the dense ViT; otherwise every layer has a predictor).
    nnz_per_head: per layer, the realised number of kept attention entries per head (mean over batch
      and heads); ``None`` (or a ``None`` entry) uses the analytic ``N + (N-1) ceil(rho N)``. Ignored for
      dense layers (``N^2``).
    coef_kept: basis coefficients kept per query row (kappa); default ``cfg.coef_topk``, capped at m.
    basis_density: fraction of ``|W_up|`` entries above the threshold (delta_b), one value or per layer.
    tokens_per_layer: live tokens (CLS included) entering each block; default the config's token
      schedule (``models.vit.token_schedule``: ``cfg.num_tokens`` everywhere without token sparsity).
    sparse_kernels: if False, count what masked-dense execution does (dense attention matrix and basis
      product); the savings are then only the predictor's cost, negative.

  Returns:
    A :class:`FlopsReport`.
  """
  depth = cfg.depth
  g = _geometry(cfg, coef_kept)
  rates = cfg.layer_keep_rates() or (None,) * depth
  if tokens_per_layer is None and getattr(cfg, "token_keep_rate", None) is not None:
    tokens_per_layer = token_schedule(cfg)
  tokens = _per_layer(tokens_per_layer, depth, "tokens_per_layer")
  nnzs = _per_layer(nnz_per_head, depth, "nnz_per_head")
  deltas = _per_layer(basis_density, depth, "basis_density")
  learned = getattr(cfg, "attention_pattern", "sparsifiner") == "sparsifiner"
  per_layer = [_layer_macs(cfg, g, i, _live_tokens(tokens[i], g.n0, i), rates[i], nnzs[i], deltas[i],
                           learned=learned, sparse_kernels=sparse_kernels) for i in range(depth)]
  patch_embed = float((g.n0 - 1) * cfg.patch_size ** 2 * cfg.in_chans * g.big_c)
  head = float(g.big_c * cfg.num_classes)
  return FlopsReport(per_layer=per_layer, patch_embed=patch_embed, head=head,
                     totals=_totals(per_layer, patch_embed, head))


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """The sizes :func:`count` needs: ``n0`` tokens (CLS included), width ``big_c`` of ``heads`` heads of
  ``d`` channels, MLP width ``hidden``, predictor channels ``c`` per head, basis size ``m`` and the
  ``kappa`` basis coefficients kept per row."""
  n0: int
  big_c: int
  heads: int
  d: int
  hidden: int
  c: int
  m: int
  kappa: int


def _geometry(cfg, coef_kept: int | None) -> _Geometry:
  """``cfg``'s sizes; ``kappa`` is ``coef_kept`` (default ``cfg.coef_topk``) capped at ``m``."""
  big_c, heads, n0 = cfg.embed_dim, cfg.num_heads, cfg.num_tokens
  d = big_c // heads
  m = n0 // cfg.reduce_n
  return _Geometry(n0=n0, big_c=big_c, heads=heads, d=d, hidden=int(big_c * cfg.mlp_ratio),
                   c=d // cfg.reduce_c, m=m,
                   kappa=min(cfg.coef_topk if coef_kept is None else int(coef_kept), m))


def _live_tokens(given, n0: int, layer: int) -> int:
  """Layer ``layer``'s live tokens: ``given``, or ``n0`` when None; ValueError outside ``[1, n0]``."""
  n = n0 if given is None else int(given)
  if not 1 <= n <= n0:
    raise ValueError(f"tokens_per_layer[{layer}]={n} must be in [1, {n0}] (CLS included)")
  return n


def _layer_macs(cfg, g: _Geometry, layer: int, n: int, rho, nnz_given, delta_given, *, learned: bool,
                sparse_kernels: bool) -> dict[str, float]:
  """One block's MAC terms at ``n`` live tokens and keep rate ``rho`` (None: dense), with the
  descriptive entries of :class:`FlopsReport`'s ``per_layer``. ``nnz_given`` and ``delta_given`` are the
  realised kept entries per head and basis density (None: analytic); ``learned`` is False for a fixed or
  oracle pattern."""
  big_c, heads, d = g.big_c, g.heads, g.d
  out = {"tokens": float(n), "qkv": 3.0 * n * big_c ** 2, "proj": float(n) * big_c ** 2,
         "mlp": 2.0 * n * big_c * g.hidden, "attention_matrix_dense": 2.0 * n * n * big_c}
  if not learned:
    nnz, delta = _pattern_nnz(cfg, layer, rho, n, nnz_given), 0.0
    out.update(predictor_channel=0.0, predictor_token=0.0, predictor_recon=0.0, coef_kept=0.0,
               predictor_scores=patterns.build(cfg, layer, rho).selection_macs(d))
  elif rho is None:
    nnz, delta = float(n * n), 0.0
    out.update(predictor_channel=0.0, predictor_token=0.0, predictor_scores=0.0,
               predictor_recon=0.0, coef_kept=0.0)
  else:
    nnz, delta, predictor = _predictor_macs(g, n, rho, nnz_given, delta_given, sparse_kernels,
                                            block=getattr(cfg, "mask_block", 0))
    out.update(predictor)
  out["nnz_per_head"] = nnz
  out["density"] = nnz / (n * n)
  out["basis_density"] = delta
  attn_entries = nnz if sparse_kernels else float(n * n)
  out["attn_qk"] = attn_entries * d * heads
  out["attn_av"] = attn_entries * d * heads
  return out


def _predictor_macs(g: _Geometry, n: int, rho: float, nnz_given, delta_given, sparse_kernels: bool,
                    block: int = 0) -> tuple[float, float, dict[str, float]]:
  """``(nnz, delta, terms)`` of a learned-predictor layer at ``n`` live tokens: kept entries per head
  (``nnz_given``, or the analytic ``n + (n-1) k``), basis density (``delta_given``, or 1) and the
  predictor's MAC terms plus ``coef_kept``. Block mode (``block`` > 0): scores per block, ``nb =
  ceil(n / block)`` pooled rows against ``nb`` pooled basis columns, and the analytic ``nnz`` an upper
  bound, ``n + (n-1) min(K block, n)`` (a kept ragged last block counted whole)."""
  big_c, heads, c, m, kappa = g.big_c, g.heads, g.c, g.m, g.kappa
  if block:
    nb, kept = blocks.count(n, block), blocks.budget(rho, n, block)
    nnz = float(n + (n - 1) * min(kept * block, n)) if nnz_given is None else float(nnz_given)
    delta = 1.0 if delta_given is None else float(delta_given)
    return nnz, delta, dict(
        predictor_channel=2.0 * n * big_c * c, predictor_token=float(heads * c * n * m),
        predictor_scores=float(heads * nb * c * m),
        predictor_recon=(heads * nb * kappa * nb * delta if sparse_kernels else float(heads * nb * m * nb)),
        coef_kept=float(kappa))
  if nnz_given is None:
    # The budget is a fraction of the full token count, capped by the live patches when pruning.
    k = min(budget(rho, g.n0), n - 1 if n < g.n0 else n)
    nnz = float(n + (n - 1) * k)
  else:
    nnz = float(nnz_given)
  delta = 1.0 if delta_given is None else float(delta_given)
  terms = dict(
      predictor_channel=2.0 * n * big_c * c,
      predictor_token=float(heads * c * n * m),
      predictor_scores=float(heads * n * c * m),
      predictor_recon=(heads * (n - 1) * kappa * n * delta if sparse_kernels
                       else float(heads * (n - 1) * m * n)),
      coef_kept=float(kappa))
  return nnz, delta, terms


def _totals(per_layer: list[dict[str, float]], patch_embed: float, head: float) -> dict[str, float]:
  """The named totals of the module docstring from the per-layer terms and the two outer parts."""

  def total(keys):
    return float(sum(layer[k] for layer in per_layer for k in keys))

  projections = total(PROJECTION_KEYS)
  predictor = total(PREDICTOR_KEYS)
  attention = total(ATTENTION_KEYS)
  attn_dense = total(("attention_matrix_dense",))
  mlp = total(("mlp",))
  return {
      "total": patch_embed + head + projections + attention + predictor + mlp,
      "mhsa": projections + attention + predictor,
      "attention_matrix": attention + predictor,
      "attention_matrix_dense": attn_dense,
      "mhsa_dense": projections + attn_dense,
      "total_dense": patch_embed + head + projections + attn_dense + mlp,
      "predictor": predictor,
      "projections": projections,
      "mlp": mlp,
      "patch_embed": patch_embed,
      "head": head,
  }


def _pattern_nnz(cfg, layer: int, rho, n: int, realised) -> float:
  """Kept entries per head of a fixed/oracle pattern layer (N^2 for ``zero_logit``: not sparse)."""
  pattern = patterns.build(cfg, layer, rho)
  if pattern.fill == "zero_logit":
    return float(n * n)
  if realised is not None:
    return float(realised)
  # The closed form is for the full sequence; under token pruning scale the density to N_l^2.
  return pattern.density() * n * n if n != cfg.num_tokens else float(np.mean(pattern.nnz_per_head()))


def realised_stats(aux: dict[str, Any], model) -> dict[str, list]:
  """Realised sparsity of a forward pass: ``{"nnz_per_head", "density", "basis_density"}`` per layer.

  ``nnz_per_head`` is the mean over batch and heads of ``mask.nnz()`` (``N^2`` for a ``zero_logit``
  mask, which is not sparse); ``density`` is ``mask.density()``; ``basis_density`` the fraction of
  nonzeros of the layer's inference basis ``mask_predictor.basis(recon=False)``. Dense layers (mask
  ``None``) give ``None``.
  """
  nnz, density, basis = [], [], []
  for i, mask in enumerate(aux["masks"]):
    predictor = model.blocks[i].attn.mask_predictor
    if mask is None:
      nnz.append(None)
      density.append(None)
    else:
      if mask.fill == "zero_logit":     # every key takes part: executed dense
        nnz.append(float((mask.num_dense_rows + mask.indices.shape[-2]) * mask.num_keys))
      else:
        nnz.append(float(np.mean(np.asarray(mask.nnz(), np.float64))))
      density.append(float(mask.density()))
    basis.append(None if predictor is None
                 else float(np.mean(np.asarray(predictor.basis(recon=False)) != 0)))
  return {"nnz_per_head": nnz, "density": density, "basis_density": basis}


def from_aux(cfg, aux: dict[str, Any], model, **kwargs) -> FlopsReport:
  """MACs with the *realised* sparsity of a forward pass ``logits, aux = model(images)``.

  Uses the masks' mean kept entries per head and each predictor's realised basis density (see
  :func:`realised_stats`); ``kwargs`` (``coef_kept``, ``tokens_per_layer``, ``sparse_kernels``) go to
  :func:`count`.
  """
  stats = realised_stats(aux, model)
  if len(stats["nnz_per_head"]) != cfg.depth:
    raise ValueError(f"aux has {len(stats['nnz_per_head'])} masks but the model has depth {cfg.depth}")
  return count(cfg, nnz_per_head=stats["nnz_per_head"], basis_density=stats["basis_density"], **kwargs)


def xla_flops(model, images) -> float:
  """XLA's FLOP count (2 per MAC + elementwise work) for ``model(images)``, compiled, not run.

  ``images`` may be an array or a ``jax.ShapeDtypeStruct``; ``model`` may be abstract
  (``nnx.eval_shape``), so nothing needs to be allocated.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)[0]

  cost = jax.jit(forward).lower(state, images).compile().cost_analysis()   # a dict (jax 0.10)
  return float(cost["flops"])
