"""Fixed and oracle attention patterns on the one mask interface (``attention.AttentionMask``).

Select one with ``ViTConfig.attention_pattern=<name>`` and ``pattern_options`` (``((name, value), ...)``;
``models.create``/``models.get_config`` and the configs accept a dict). ``"sparsifiner"`` is the learned
predictor (``models.predictor``) and is not built here. Every other name is a class in ``PATTERNS``;
``build(cfg, layer, keep_rate)`` returns an instance for one layer: a frozen dataclass of Python scalars
(hashable, compared by value, so it can live in the NNX graphdef) whose ``__call__(q, k)``, with
``q, k: [B, N, H, d]``, returns an ``AttentionMask``. Static patterns build their index tables once on
the host (numpy, in :func:`_static_tables`, an ``lru_cache`` keyed by the pattern itself) and return
indices ``[1, H|1, R, K]``; the instance-dependent ones (``oracle_topk``, ``routing``) return
``[B, H, R, K]`` computed under ``stop_gradient``.

Conventions (N tokens with CLS first, P = N - 1 patches on a g x g grid in raster order, h heads):

* The CLS query row is dense (``num_dense_rows = 1``; BigBird's global patches add more dense rows) and
  every patch query keeps the CLS key.
* ``fill`` (an option of every pattern): ``"neg_inf"`` (default) is true sparse attention;
  ``"zero_logit"`` sets masked logits to 0, the official Fibottention code's multiply-by-mask
  semantics. With ``zero_logit`` every key takes part, so the attention is *not* sparse: the FLOPs
  counter (``flops.realised_stats``/``flops.count``) counts it dense, while ``density`` still reports
  the pattern's own kept fraction.
* Budgets: ``nnz_h`` is the number of kept entries of head h in the N x N matrix and the density is
  ``mean_h nnz_h / N^2``, exactly ``AttentionMask.density()``. Each class's :meth:`Pattern.nnz_per_head`
  is the closed form below (tests check it against the built masks); :func:`analytic_density` gives it
  for a config. With ``E_h`` the kept patch-to-patch entries, ``nnz_h = N + P + E_h`` (dense CLS row,
  CLS key of every patch row) unless stated. ``band(n, m) = n (2m' + 1) - m' (m' + 1)`` with
  ``m' = min(m, n - 1)`` counts the pairs ``|i - j| <= m`` in ``[0, n)``.

Patterns (options with defaults; budget):

* ``fibottention``: shuffle (False). ``E_h = 2 sum_{o in F_h} max(P - o, 0)``.
* ``window``: radius (1), variant ("clip" | "neighborhood"). clip ``E = band(g, radius)^2``;
  neighborhood ``E = P (2 radius + 1)^2``.
* ``sparse_transformer``: mode ("strided" | "fixed"), stride (0: g), summary (1), merge (False).
  Closed forms in :class:`SparseTransformer`.
* ``bigbird``: window (1), num_global (0), num_random (1), seed (0).
  ``nnz_h = (1 + G) N + (P - G)(1 + G + r) + band(P - G, window)``.
* ``random``: k (0: ``ceil(keep_rate N)``), seed (0). ``nnz_h = N + P k``.
* ``oracle_topk``: k (0: ``ceil(keep_rate N)``). ``nnz_h = N + P k``.
* ``routing``: clusters (0: ``round(sqrt N)``), size (0: ``ceil(P / C)``), iters (2).
  ``nnz_h = N + P (size + 1)``.
* ``full``: no options. ``nnz_h = N^2`` (dense, through the mask interface).

``full`` exists so that an executor other than softmax (``attention.EXECUTORS["sigmoid"]``) can run dense
attention: the model calls its executor only when a mask is present.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random as py_random
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sparsifiner_jax.attention import executors
from sparsifiner_jax.attention import mask as mask_lib

Array = jax.Array
LEARNED = "sparsifiner"
PATTERNS: dict[str, type["Pattern"]] = {}
# Fields set from the model config, not from ``pattern_options``.
STRUCTURAL = ("grid", "num_heads", "layer", "keep_rate")
# The option that sets each pattern's budget (configs/patterns.py matches it to a target density).
BUDGET_KNOBS = {"window": "radius", "sparse_transformer": "stride", "bigbird": "num_random",
                "random": "k", "oracle_topk": "k", "routing": "clusters"}


def register(cls):
  PATTERNS[cls.name] = cls
  return cls


def names() -> list[str]:
  return [LEARNED] + sorted(PATTERNS)


def band(n: int, m: int) -> int:
  """Pairs ``(i, j)`` in ``[0, n)^2`` with ``|i - j| <= m`` (``m >= 0``)."""
  if n <= 0:
    return 0
  m = min(m, n - 1)
  return n * (2 * m + 1) - m * (m + 1)


def _bad(pattern: str, msg: str):
  raise ValueError(f"attention_pattern {pattern!r}: {msg}")


# --------------------------------------------------------------------------------------------------
# Base classes.


@dataclasses.dataclass(frozen=True)
class Pattern:
  """One layer's attention pattern: ``(q, k) -> AttentionMask`` with ``q, k: [B, N, H, d]``.

  Attributes:
    grid: patches per side g (N = g^2 + 1).
    num_heads: h.
    layer: block index (seeds, Fibottention's head shuffle).
    keep_rate: the layer's keep rate from the config, for patterns whose budget is ``ceil(rho N)``.
    fill: ``"neg_inf"`` or ``"zero_logit"`` (module docstring).
  """

  name: ClassVar[str] = ""
  grid: int
  num_heads: int
  layer: int = 0
  keep_rate: float | None = None
  fill: str = "neg_inf"

  def __post_init__(self):
    if self.fill not in mask_lib.FILLS:
      _bad(self.name, f"fill={self.fill!r}; allowed: {', '.join(mask_lib.FILLS)}")
    self.check()

  def check(self) -> None:
    """Raises ValueError naming a bad option (subclasses)."""

  @classmethod
  def option_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in STRUCTURAL)

  @property
  def num_tokens(self) -> int:
    return self.grid ** 2 + 1

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def num_dense_rows(self) -> int:
    return 1

  def nnz_per_head(self) -> np.ndarray:
    """Analytic kept entries per head ``[H]`` (float64)."""
    raise NotImplementedError

  def density(self) -> float:
    """Analytic density ``mean_h nnz_h / N^2`` (equals the masks' ``AttentionMask.density()``)."""
    return float(np.mean(self.nnz_per_head())) / self.num_tokens ** 2

  def selection_macs(self, head_dim: int) -> float:
    """MACs per image spent choosing the mask (0 for static patterns)."""
    del head_dim
    return 0.0

  def _check_tokens(self, q: Array) -> None:
    if q.shape[1] != self.num_tokens:
      raise ValueError(f"attention_pattern {self.name!r} was built for {self.num_tokens} tokens but got "
                       f"{q.shape[1]} (fixed patterns do not support token_pruning_mode='drop'; use "
                       "'mask')")

  def __call__(self, q: Array, k: Array) -> mask_lib.AttentionMask:
    raise NotImplementedError


class StaticPattern(Pattern):
  """A data-independent pattern: ``keep()`` gives the sparse rows' key sets, packed once per pattern."""

  def keep(self) -> np.ndarray:
    """Bool ``[H|1, N - num_dense_rows, N]``: the keys of each sparse query row (CLS column included)."""
    raise NotImplementedError

  def tables(self) -> tuple[np.ndarray, np.ndarray | None]:
    """``indices [H|1, R, K] int32`` (ascending, padded with 0) and ``valid`` (None if no padding)."""
    return _static_tables(self)

  def __call__(self, q: Array, k: Array) -> mask_lib.AttentionMask:
    del k
    self._check_tokens(q)
    idx, valid = self.tables()
    return mask_lib.AttentionMask(
        indices=jnp.asarray(idx)[None], valid=None if valid is None else jnp.asarray(valid)[None],
        num_dense_rows=self.num_dense_rows, num_keys=self.num_tokens, fill=self.fill)


def index_table(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  """Bool ``[..., R, N]`` -> ascending kept columns ``[..., R, K]`` (K = max per row) and ``valid``."""
  counts = keep.sum(-1)
  width = max(int(counts.max(initial=0)), 1)
  order = np.argsort(~keep, axis=-1, kind="stable")[..., :width]     # kept columns first, ascending
  valid = np.arange(width) < counts[..., None]
  idx = np.where(valid, order, 0).astype(np.int32)
  return idx, (None if valid.all() else valid)


@functools.lru_cache(maxsize=256)
def _static_tables(pattern: StaticPattern) -> tuple[np.ndarray, np.ndarray | None]:
  tables = index_table(pattern.keep())
  for t in tables:
    if t is not None:
      t.flags.writeable = False          # shared by every caller of the cache
  return tables


def with_cls_column(block: np.ndarray) -> np.ndarray:
  """Patch-to-patch ``[H, P, P]`` -> patch rows over all tokens ``[H, P, N]`` with the CLS key kept."""
  cls = np.ones(block.shape[:-1] + (1,), bool)
  return np.concatenate([cls, block], axis=-1)


def _static_nnz(pattern: Pattern, edges) -> np.ndarray:
  """``N + P + E_h`` per head, for a sequence (or scalar) of patch-block edge counts."""
  e = np.broadcast_to(np.asarray(edges, np.float64), (pattern.num_heads,))
  return pattern.num_tokens + pattern.num_patches + e


# --------------------------------------------------------------------------------------------------
# Fibottention (arXiv 2406.19391).

PHI = (1 + math.sqrt(5)) / 2
FIB_W_MIN = 5


def wythoff_offsets(num_heads: int, num_patches: int, w_min: int = FIB_W_MIN) -> tuple[tuple[int, ...], ...]:
  """Fibottention's offset sets ``F_i`` for Wythoff rows i = 1..h (before any head shuffle).

  ``a_i = floor(floor(i phi) phi)``, ``b_i = floor(floor(i phi) phi^2)`` (the first two entries of row i of
  the Wythoff array); window ``w_i = w_min + floor((i - 1)(w_max - w_min) / (h - 1))`` with
  ``w_max = floor(P / 3)`` (``w_1 = w_min`` when h = 1); ``F_i`` is the Fibonacci recurrence from
  ``(a_i, b_i)`` cut to the terms ``<= w_i``, with ``a_i`` always kept.
  """
  w_max = num_patches // 3
  out = []
  for i in range(1, num_heads + 1):
    a = int(math.floor(math.floor(i * PHI) * PHI))
    b = int(math.floor(math.floor(i * PHI) * PHI ** 2))
    w = w_min + ((i - 1) * (w_max - w_min) // (num_heads - 1) if num_heads > 1 else 0)
    seq = [a]
    while b <= w:
      seq.append(b)
      a, b = b, a + b
    out.append(tuple(seq))
  return tuple(out)


def head_permutation(num_heads: int, seed: int) -> tuple[int, ...]:
  """Wythoff rows (1-based) per head position after Python's ``random.seed(seed); random.shuffle``."""
  rows = list(range(1, num_heads + 1))
  py_random.Random(seed).shuffle(rows)      # the same stream as random.seed(seed) + random.shuffle
  return tuple(rows)


@register
@dataclasses.dataclass(frozen=True)
class Fibottention(StaticPattern):
  """Fibottention (arXiv 2406.19391) exactly as the official image code builds it.

  Head position p keeps the patch pairs ``|j - k| in F_{row(p)}`` (1-D raster order, diagonal excluded,
  ±1 wraps across grid rows) plus the dense CLS row and column. ``row = head_permutation(h, s)`` with
  ``s = layer`` when ``shuffle`` is True; with ``shuffle=False`` (default) every layer uses layer 0's
  permutation ``s = 0``, which is what the official module-global cache effectively does (§1.2 item 5).

  Budget: ``nnz_h = N + P + 2 sum_{o in F_h} max(P - o, 0)``. N=197, h=6: 4.52 % on average.
  """

  name: ClassVar[str] = "fibottention"
  shuffle: bool = False

  def head_offsets(self) -> tuple[tuple[int, ...], ...]:
    """``F`` per head position, in this layer's head order."""
    rows = wythoff_offsets(self.num_heads, self.num_patches)
    perm = head_permutation(self.num_heads, self.layer if self.shuffle else 0)
    return tuple(rows[r - 1] for r in perm)

  def keep(self) -> np.ndarray:
    p = self.num_patches
    dist = np.abs(np.arange(p)[:, None] - np.arange(p)[None, :])
    block = np.stack([np.isin(dist, offs) for offs in self.head_offsets()])
    return with_cls_column(block)

  def nnz_per_head(self) -> np.ndarray:
    p = self.num_patches
    return _static_nnz(self, [2 * sum(max(p - o, 0) for o in offs) for offs in self.head_offsets()])


# --------------------------------------------------------------------------------------------------
# Local 2-D window.

WINDOW_VARIANTS = ("clip", "neighborhood")


@register
@dataclasses.dataclass(frozen=True)
class Window(StaticPattern):
  """Local 2-D window on the patch grid, plus the CLS key (SASA 1906.05909; NAT 2204.07143).

  ``variant="clip"``: patch (r, c) keeps (r', c') with ``|r - r'|, |c - c'| <= radius`` (fewer keys at the
  borders); ``"neighborhood"``: the window is shifted inside the grid at the borders so every query keeps
  exactly ``(2 radius + 1)^2`` patches (needs ``2 radius + 1 <= g``). Both include the query itself.

  Budget: clip ``E = band(g, radius)^2``; neighborhood ``E = P (2 radius + 1)^2``.
  """

  name: ClassVar[str] = "window"
  radius: int = 1
  variant: str = "clip"

  def check(self):
    if self.radius < 0:
      _bad(self.name, f"radius={self.radius} must be >= 0")
    if self.variant not in WINDOW_VARIANTS:
      _bad(self.name, f"variant={self.variant!r}; allowed: {', '.join(WINDOW_VARIANTS)}")
    if self.variant == "neighborhood" and 2 * self.radius + 1 > self.grid:
      _bad(self.name, f"radius={self.radius}: the neighborhood window 2r+1 must fit the "
           f"{self.grid}-patch grid")

  def _axis(self) -> np.ndarray:
    """Bool ``[g, g]``: which coordinates each coordinate keeps along one axis."""
    g, r = self.grid, self.radius
    pos = np.arange(g)
    if self.variant == "clip":
      return np.abs(pos[:, None] - pos[None, :]) <= r
    start = np.clip(pos - r, 0, g - (2 * r + 1))
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + 2 * r + 1)

  def keep(self) -> np.ndarray:
    a = self._axis()
    block = (a[:, None, :, None] & a[None, :, None, :]).reshape(self.num_patches, self.num_patches)
    return with_cls_column(block[None])

  def nnz_per_head(self) -> np.ndarray:
    if self.variant == "clip":
      return _static_nnz(self, band(self.grid, self.radius) ** 2)
    return _static_nnz(self, self.num_patches * (2 * self.radius + 1) ** 2)


# --------------------------------------------------------------------------------------------------
# Sparse Transformer (Child et al. 2019).

SPARSE_TRANSFORMER_MODES = ("strided", "fixed")


@register
@dataclasses.dataclass(frozen=True)
class SparseTransformer(StaticPattern):
  """Sparse Transformer patterns (1904.10509) on the 1-D raster order of patches, symmetrised, + CLS.

  With stride l (``stride=0``: l = g, i.e. ~sqrt(P)) and patch indices i, j:

  * ``strided``: A keeps ``|i - j| < l``; B keeps ``(i - j) mod l = 0``.
  * ``fixed``: A keeps ``floor(i / l) = floor(j / l)``; B keeps the ``summary`` = c "summary" positions
    ``t mod l >= l - c`` as keys of every query *and* as queries of every key (the symmetric closure of
    the bidirectional "fixed" pattern: the summary positions act as global tokens).

  Heads are split between the sub-patterns as in the paper's multi-head variant: the first ``ceil(h/2)``
  heads use A, the others B. ``merge=True`` (forced when h = 1) gives every head A or B (the "merged"
  variant).

  Budget (E per head): strided ``|A| = band(P, l - 1)``, ``|B| = P + 2 sum_{m=1}^{q} (P - m l)`` with
  ``q = floor((P - 1) / l)``, ``|A n B| = P``; fixed ``|A| = floor(P/l) l^2 + (P mod l)^2``,
  ``|B| = 2 s P - s^2`` with s the number of summary positions, ``|A n B| = floor(P/l)(l^2 - (l-c)^2)
  + r^2 - (r - s_r)^2`` (r = P mod l, s_r the summary positions of the last partial block); merged heads
  have ``|A| + |B| - |A n B|``.
  """

  name: ClassVar[str] = "sparse_transformer"
  mode: str = "strided"
  stride: int = 0
  summary: int = 1
  merge: bool = False

  def check(self):
    if self.mode not in SPARSE_TRANSFORMER_MODES:
      _bad(self.name, f"mode={self.mode!r}; allowed: {', '.join(SPARSE_TRANSFORMER_MODES)}")
    if not 0 <= self.stride <= self.num_patches:
      _bad(self.name, f"stride={self.stride} must be in [1, {self.num_patches}] (0: the grid size)")
    if self.mode == "fixed" and not 1 <= self.summary <= self.l:
      _bad(self.name, f"summary={self.summary} must be in [1, stride={self.l}]")

  @property
  def l(self) -> int:  # noqa: E743
    return self.stride or self.grid

  def _merged(self) -> bool:
    return self.merge or self.num_heads == 1

  def _head_uses(self) -> list[tuple[bool, bool]]:
    """(uses A, uses B) per head."""
    if self._merged():
      return [(True, True)] * self.num_heads
    n_a = -(-self.num_heads // 2)
    return [(h < n_a, h >= n_a) for h in range(self.num_heads)]

  def _blocks(self) -> tuple[np.ndarray, np.ndarray]:
    p, l, c = self.num_patches, self.l, self.summary
    i, j = np.arange(p)[:, None], np.arange(p)[None, :]
    if self.mode == "strided":
      return np.abs(i - j) < l, (i - j) % l == 0
    summary = np.arange(p) % l >= l - c
    return i // l == j // l, summary[:, None] | summary[None, :]

  def keep(self) -> np.ndarray:
    a, b = self._blocks()
    block = np.stack([(a & ua) | (b & ub) for ua, ub in self._head_uses()])
    return with_cls_column(block)

  def _counts(self) -> tuple[int, int, int]:
    """Analytic ``|A|, |B|, |A n B|``."""
    p, l, c = self.num_patches, self.l, self.summary
    if self.mode == "strided":
      q = (p - 1) // l
      return band(p, l - 1), p + 2 * (q * p - l * q * (q + 1) // 2), p
    full, r = divmod(p, l)
    s_r = max(0, r - (l - c))
    s = full * c + s_r
    return (full * l * l + r * r, 2 * s * p - s * s,
            full * (l * l - (l - c) ** 2) + r * r - (r - s_r) ** 2)

  def nnz_per_head(self) -> np.ndarray:
    a, b, ab = self._counts()
    return _static_nnz(self, [(a if ua else 0) + (b if ub else 0) - (ab if ua and ub else 0)
                              for ua, ub in self._head_uses()])


# --------------------------------------------------------------------------------------------------
# BigBird.


def _layer_rng(seed: int, layer: int) -> np.random.Generator:
  return np.random.default_rng((seed, layer))


@register
@dataclasses.dataclass(frozen=True)
class BigBird(StaticPattern):
  """BigBird (2007.14062), token version: a sliding window, global tokens and random keys, + CLS.

  Global tokens: CLS and the first ``num_global`` = G patches; they attend to everyone (dense rows) and
  everyone attends to them. Every other patch j keeps the patches ``|j - j'| <= window`` (raster order,
  non-global), plus ``num_random`` = r distinct random non-global patches outside its window, drawn per
  head, static per layer (numpy ``default_rng((seed, layer))``).

  Budget: ``nnz_h = (1 + G) N + (P - G)(1 + G + r) + band(P - G, window)``.
  """

  name: ClassVar[str] = "bigbird"
  window: int = 1
  num_global: int = 0
  num_random: int = 1
  seed: int = 0

  def check(self):
    p = self.num_patches
    if self.window < 0:
      _bad(self.name, f"window={self.window} must be >= 0")
    if not 0 <= self.num_global < p:
      _bad(self.name, f"num_global={self.num_global} must be in [0, {p - 1}]")
    rest = p - self.num_global
    most = rest - min(2 * self.window + 1, rest)
    if not 0 <= self.num_random <= most:
      _bad(self.name, f"num_random={self.num_random} must be in [0, {most}] (the patches outside the "
           "window of every query)")
    if self.seed < 0:
      _bad(self.name, f"seed={self.seed} must be >= 0")

  @property
  def num_dense_rows(self) -> int:
    return 1 + self.num_global

  def keep(self) -> np.ndarray:
    p, g, w, r = self.num_patches, self.num_global, self.window, self.num_random
    rows = np.arange(g, p)[:, None]
    cols = np.arange(p)[None, :]
    local = (np.abs(rows - cols) <= w) & (cols >= g)                        # [P-G, P]
    block = np.broadcast_to(local | (cols < g), (self.num_heads, p - g, p)).copy()
    if r:
      draw = _layer_rng(self.seed, self.layer).random(block.shape)
      draw[block] = np.inf                                                   # candidates only
      pick = np.argsort(draw, axis=-1, kind="stable")[..., :r]
      np.put_along_axis(block, pick, True, axis=-1)
    return with_cls_column(block)

  def nnz_per_head(self) -> np.ndarray:
    n, p, g, r = self.num_tokens, self.num_patches, self.num_global, self.num_random
    nnz = (1 + g) * n + (p - g) * (1 + g + r) + band(p - g, self.window)
    return np.full((self.num_heads,), float(nnz))


# --------------------------------------------------------------------------------------------------
# Budget from the keep rate: random and oracle top-k.


def _budget_k(pattern: Pattern, k: int) -> int:
  """``k`` if set, else ``ceil(keep_rate N)``; validated to ``[1, N]``."""
  n = pattern.num_tokens
  if k == 0:
    if pattern.keep_rate is None:
      _bad(pattern.name, "needs a budget: set keep_rate or the option k")
    k = mask_lib.budget(pattern.keep_rate, n)
  if not 1 <= k <= n:
    _bad(pattern.name, f"k={k} must be in [1, {n}] (keys per patch row)")
  return k


@register
@dataclasses.dataclass(frozen=True)
class Random(StaticPattern):
  """Random keys, data-independent: every patch row keeps k keys, the CLS key and k - 1 distinct random
  patches (drawn per head, static per layer: numpy ``default_rng((seed, layer))``).

  ``k`` (0: ``ceil(keep_rate N)``, the Sparsifiner budget). Budget: ``nnz_h = N + P k``.
  """

  name: ClassVar[str] = "random"
  k: int = 0
  seed: int = 0

  def check(self):
    _budget_k(self, self.k)
    if self.seed < 0:
      _bad(self.name, f"seed={self.seed} must be >= 0")

  def keep(self) -> np.ndarray:
    k, p = _budget_k(self, self.k), self.num_patches
    draw = _layer_rng(self.seed, self.layer).random((self.num_heads, p, p))
    pick = np.argsort(draw, axis=-1, kind="stable")[..., :k - 1]
    block = np.zeros((self.num_heads, p, p), bool)
    np.put_along_axis(block, pick, True, axis=-1)
    return with_cls_column(block)

  def nnz_per_head(self) -> np.ndarray:
    return np.full((self.num_heads,), float(self.num_tokens + self.num_patches * _budget_k(self, self.k)))


@register
@dataclasses.dataclass(frozen=True)
class OracleTopK(Pattern):
  """Oracle top-k / Explicit Sparse Transformer (1912.11637): per sample and head, each patch row keeps
  its k largest dense scaled logits (ties: lowest index; ``attention.topk_mask``); the CLS row is dense.

  It needs the full ``Q K^T``, so it saves nothing: the upper bound for learned predictors. Indices are
  under ``stop_gradient``; gradients flow through the kept logits. ``k`` (0: ``ceil(keep_rate N)``).
  Budget: ``nnz_h = N + P k``; selection cost ``(N - 1) N d h`` MACs (the logits).
  """

  name: ClassVar[str] = "oracle_topk"
  k: int = 0

  def check(self):
    _budget_k(self, self.k)

  def nnz_per_head(self) -> np.ndarray:
    return np.full((self.num_heads,), float(self.num_tokens + self.num_patches * _budget_k(self, self.k)))

  def selection_macs(self, head_dim: int) -> float:
    return float(self.num_patches * self.num_tokens * head_dim * self.num_heads)

  def __call__(self, q: Array, k: Array) -> mask_lib.AttentionMask:
    self._check_tokens(q)
    scores = executors.attention_logits(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k))
    mask = mask_lib.topk_mask(scores[:, :, 1:].astype(jnp.float32), _budget_k(self, self.k))
    return dataclasses.replace(mask, fill=self.fill)


# --------------------------------------------------------------------------------------------------
# Routing (clustering) attention.


def _normalize(x: Array, eps: float = 1e-6) -> Array:
  """Parameter-free LayerNorm over the last axis, in float32."""
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + eps)


def _sq_dist(x: Array, c: Array) -> Array:
  """Squared distances ``[..., M, d] x [..., C, d] -> [..., M, C]``."""
  return (jnp.sum(x * x, -1)[..., :, None] - 2 * jnp.einsum("...md,...cd->...mc", x, c)
          + jnp.sum(c * c, -1)[..., None, :])


@register
@dataclasses.dataclass(frozen=True)
class Routing(Pattern):
  """Routing-Transformer-style clustering (2003.05997) without learned parameters.

  Per sample and head: queries and keys of the patches are layer-normed (no parameters); C centroids
  (``clusters``, 0: ``round(sqrt(N))``) start at the keys of C evenly spaced patches and take ``iters``
  k-means steps over the union of queries and keys (nearest centroid, then the mean of its members; an
  empty cluster keeps its centroid). Balanced clusters: each centroid takes its ``size`` = w nearest
  patch keys (0: ``ceil(P / C)``), and each patch query attends to the w keys of its nearest centroid,
  plus CLS. Ties go to the lowest index. Computed under ``stop_gradient``.

  Budget: ``nnz_h = N + P (w + 1)``; selection cost ``(iters + 1) 2 P C d h`` MACs (the distances).
  """

  name: ClassVar[str] = "routing"
  clusters: int = 0
  size: int = 0
  iters: int = 2

  def check(self):
    p = self.num_patches
    if not 0 <= self.clusters <= p:
      _bad(self.name, f"clusters={self.clusters} must be in [1, {p}] (0: round(sqrt(N)))")
    if not 0 <= self.size <= p:
      _bad(self.name, f"size={self.size} must be in [1, {p}] (0: ceil(P / clusters))")
    if self.iters < 0:
      _bad(self.name, f"iters={self.iters} must be >= 0")

  @property
  def num_clusters(self) -> int:
    return self.clusters or min(max(round(math.sqrt(self.num_tokens)), 1), self.num_patches)

  @property
  def cluster_size(self) -> int:
    return self.size or -(-self.num_patches // self.num_clusters)

  def nnz_per_head(self) -> np.ndarray:
    return np.full((self.num_heads,), float(self.num_tokens + self.num_patches * (self.cluster_size + 1)))

  def selection_macs(self, head_dim: int) -> float:
    return float((self.iters + 1) * 2 * self.num_patches * self.num_clusters * head_dim * self.num_heads)

  def __call__(self, q: Array, k: Array) -> mask_lib.AttentionMask:
    self._check_tokens(q)
    p, c = self.num_patches, self.num_clusters
    qn = _normalize(jnp.swapaxes(jax.lax.stop_gradient(q[:, 1:]), 1, 2))   # [B, H, P, d]
    kn = _normalize(jnp.swapaxes(jax.lax.stop_gradient(k[:, 1:]), 1, 2))
    points = jnp.concatenate([qn, kn], axis=2)                                # [B, H, 2P, d]
    start = np.round(np.linspace(0, p - 1, c)).astype(np.int32)
    cent = kn[:, :, start]                                                    # [B, H, C, d]
    for _ in range(self.iters):
      member = jax.nn.one_hot(jnp.argmin(_sq_dist(points, cent), -1), c, dtype=jnp.float32)
      count = jnp.sum(member, axis=2)[..., None]                              # [B, H, C, 1]
      total = jnp.einsum("bhmc,bhmd->bhcd", member, points)
      cent = jnp.where(count > 0, total / jnp.maximum(count, 1.0), cent)
    _, keys = jax.lax.top_k(-jnp.swapaxes(_sq_dist(kn, cent), -1, -2), self.cluster_size)  # [B,H,C,w]
    home = jnp.argmin(_sq_dist(qn, cent), -1)                                # [B, H, P]
    idx = jnp.take_along_axis(keys, home[..., None], axis=2) + 1              # [B, H, P, w] tokens
    cls = jnp.zeros(idx.shape[:-1] + (1,), idx.dtype)
    idx = jnp.concatenate([cls, idx], axis=-1).astype(jnp.int32)
    return mask_lib.AttentionMask(indices=jax.lax.stop_gradient(idx), num_dense_rows=1,
                                  num_keys=self.num_tokens, fill=self.fill)


# --------------------------------------------------------------------------------------------------
# Full attention through the mask interface.


@register
@dataclasses.dataclass(frozen=True)
class Full(Pattern):
  """Every query row dense (``num_dense_rows = N``, no sparse rows). Budget: ``nnz_h = N^2``.

  Use with an executor that is not softmax (``executor="sigmoid"``): the model only calls its executor
  when a mask is present.
  """

  name: ClassVar[str] = "full"

  @property
  def num_dense_rows(self) -> int:
    return self.num_tokens

  def nnz_per_head(self) -> np.ndarray:
    return np.full((self.num_heads,), float(self.num_tokens ** 2))

  def __call__(self, q: Array, k: Array) -> mask_lib.AttentionMask:
    del k
    self._check_tokens(q)
    return mask_lib.AttentionMask(indices=jnp.zeros((1, 1, 0, 1), jnp.int32),
                                  num_dense_rows=self.num_tokens, num_keys=self.num_tokens,
                                  fill=self.fill)


# --------------------------------------------------------------------------------------------------
# Config entry points.


def _coerce(name: str, field: dataclasses.Field, value: Any) -> Any:
  """Checks an option's type against its default's (ints may come as integral floats from flags)."""
  default = field.default
  if isinstance(default, bool):
    if isinstance(value, (bool, np.bool_)):
      return bool(value)
  elif isinstance(default, int):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      return int(value)
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif isinstance(default, str):
    if isinstance(value, str):
      return value
  raise ValueError(f"attention_pattern {name!r}: option {field.name}={value!r} must be of type "
                   f"{type(default).__name__}")


def from_options(name: str, *, grid: int, num_heads: int, layer: int = 0,
                 keep_rate: float | None = None, options=()) -> Pattern:
  """Builds pattern ``name`` from ``options`` (a dict or ``((key, value), ...)``); ValueError if bad."""
  if name not in PATTERNS:
    raise ValueError(f"unknown attention_pattern {name!r}; allowed: {', '.join(names())}")
  cls = PATTERNS[name]
  opts = dict(options)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  allowed = cls.option_names()
  unknown = sorted(set(opts) - set(allowed))
  if unknown:
    raise ValueError(f"attention_pattern {name!r}: unknown option(s) {unknown}; allowed: {list(allowed)}")
  kwargs = {key: _coerce(name, fields[key], value) for key, value in opts.items()}
  return cls(grid=grid, num_heads=num_heads, layer=layer, keep_rate=keep_rate, **kwargs)


def validate(cfg) -> None:
  """Raises ValueError naming a bad ``attention_pattern`` or option (builds every layer's pattern)."""
  if cfg.attention_pattern == LEARNED:
    if cfg.pattern_options:
      raise ValueError(f"pattern_options {dict(cfg.pattern_options)} are for fixed patterns; "
                       f"attention_pattern={LEARNED!r} takes none")
    return
  rates = cfg.layer_keep_rates() or (None,) * cfg.depth
  for layer in range(cfg.depth):
    build(cfg, layer, rates[layer] if layer < len(rates) else None)


def build(cfg, layer: int, keep_rate: float | None) -> Pattern:
  """The pattern of layer ``layer`` for ``cfg`` (not the learned one)."""
  return from_options(cfg.attention_pattern, grid=cfg.grid_size, num_heads=cfg.num_heads,
                      layer=layer, keep_rate=keep_rate, options=cfg.pattern_options)


def analytic_density(cfg, layer: int = 0) -> float:
  """Kept fraction of layer ``layer``'s N x N attention under ``cfg``, from the closed forms.

  Also for the learned pattern: ``(N + (N - 1) ceil(rho N)) / N^2`` (1 for a dense model).
  """
  rates = cfg.layer_keep_rates()
  rho = None if rates is None else rates[layer]
  if cfg.attention_pattern == LEARNED:
    if rho is None:
      return 1.0
    n = cfg.num_tokens
    return (n + (n - 1) * mask_lib.budget(rho, n)) / n ** 2
  return build(cfg, layer, rho).density()


def match_budget(cfg, name: str, density: float, **options) -> dict[str, Any]:
  """Options for pattern ``name`` whose analytic density is closest to ``density`` (ties: the cheaper).

  Only the pattern's ``BUDGET_KNOBS`` option is searched; ``options`` fix the others. Patterns without a
  knob (Fibottention, full) return ``options`` unchanged.
  """
  knob = BUDGET_KNOBS.get(name)
  if knob is None:
    return dict(options)
  best = None
  for value in range(0, cfg.num_tokens + 1):
    try:
      pattern = from_options(name, grid=cfg.grid_size, num_heads=cfg.num_heads,
                             options={**options, knob: value})
    except ValueError:
      continue
    if knob in ("k", "stride", "clusters") and value == 0:   # 0 means "derive it": not a candidate
      continue
    score = (abs(pattern.density() - density), pattern.density())
    if best is None or score < best[0]:
      best = (score, value)
  if best is None:
    raise ValueError(f"attention_pattern {name!r}: no {knob} fits the model")
  return {**options, knob: best[1]}
