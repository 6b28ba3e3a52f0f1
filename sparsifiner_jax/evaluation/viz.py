"""Figures of the learned connectivity (matplotlib, Agg backend; no display needed).

* :func:`connectivity_grid` -- for one query patch, the keys it keeps in every (layer, head), drawn over
  the input image: kept patches at full brightness, dropped ones dimmed, the query outlined in red, and
  the CLS key shown by the panel border (green and thick: kept; thin grey dashed: dropped).
* :func:`density_histogram` -- distribution of per-row (or per-head) mask densities in each layer, plus
  their per-layer mean and spread.
* :func:`row_densities` -- the per-row densities of a layer's mask, the input of the histogram.
* :func:`pareto_plot` -- accuracy vs compute of a sweep's runs, one line per method, the Pareto front
  highlighted.

Both figure functions save a PNG and return its path. Their pixel size is fixed by the layout (no
``bbox_inches="tight"``), so it is predictable: see :func:`connectivity_grid_size`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
from matplotlib import patches as mpatches  # noqa: E402  pylint: disable=g-import-not-at-top
from matplotlib.lines import Line2D  # noqa: E402  pylint: disable=g-import-not-at-top
from matplotlib.ticker import (  # noqa: E402  pylint: disable=g-import-not-at-top
    FormatStrFormatter, MaxNLocator)

from sparsifiner_jax import attention as attn_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from sparsifiner_jax.io import atomic  # noqa: E402  pylint: disable=g-import-not-at-top
from sparsifiner_jax.models.token_order import patch_order  # noqa: E402  pylint: disable=g-import-not-at-top

# Layout of the connectivity grid, in inches.
_PANEL_IN = 1.6
_LEFT_IN, _RIGHT_IN, _TOP_IN, _BOTTOM_IN = 0.45, 0.1, 0.95, 0.1
_DIM = 0.28            # brightness of dropped key patches
_CLS_KEPT = "#1a9850"
_CLS_DROPPED = "#9e9e9e"
_QUERY = "#d7191c"


def _layer_mask(mask, b: int) -> np.ndarray | None:
  """One layer's boolean ``[H, N, N]`` mask for batch element ``b`` (None for a dense layer)."""
  if mask is None:
    return None
  if isinstance(mask, attn_lib.AttentionMask):
    mask = mask.to_dense()
  arr = np.asarray(mask).astype(bool)
  if arr.ndim == 4:
    arr = arr[b if arr.shape[0] > 1 else 0]
  if arr.ndim != 3 or arr.shape[-1] != arr.shape[-2]:
    raise ValueError(f"a layer mask must be [H, N, N] or [B, H, N, N] bool; got shape {arr.shape}")
  return arr


def _query_index(query_patch, grid_size: int) -> tuple[int, int, int]:
  """``(row, col, token)`` of a patch query given as raster index or ``(row, col)``."""
  if isinstance(query_patch, (tuple, list)):
    row, col = (int(v) for v in query_patch)
  else:
    row, col = divmod(int(query_patch), grid_size)
  if not (0 <= row < grid_size and 0 <= col < grid_size):
    raise ValueError(f"query_patch={query_patch!r} is outside the {grid_size}x{grid_size} patch grid")
  return row, col, 1 + row * grid_size + col


def connectivity_grid_size(num_layers: int, num_heads: int, dpi: int = 100) -> tuple[int, int]:
  """Pixel size ``(width, height)`` of the PNG :func:`connectivity_grid` writes."""
  width = _LEFT_IN + num_heads * _PANEL_IN + _RIGHT_IN
  height = _TOP_IN + num_layers * _PANEL_IN + _BOTTOM_IN
  return round(width * dpi), round(height * dpi)


def connectivity_grid(image, masks: Sequence, query_patch: int | tuple[int, int], grid_size: int,
                      out_path: str, *, b: int = 0, layers: Sequence[int] | None = None,
                      heads: Sequence[int] | None = None, title: str | None = None,
                      dpi: int = 100, token_order: str = "raster") -> str:
  """Saves a (layers x heads) grid of the keys one query patch attends to.

  Args:
    image: ``[H, W, 3]`` float in [0, 1] (or uint8), the (un-normalised) input image of sample ``b``.
    masks: per layer, an ``AttentionMask``, a bool array ``[H, N, N]`` / ``[B, H, N, N]``, or None (a
      dense layer: every key kept). ``N = grid_size**2 + 1`` with the CLS token first.
    query_patch: the query, as a raster patch index in ``[0, grid_size**2)`` or ``(row, col)``.
    grid_size: patches per image side.
    out_path: PNG path (parent folders are created).
    b: batch index into the masks.
    layers, heads: subsets to draw (default all).
    title: figure title (default describes the query).
    dpi: resolution; the size in pixels is :func:`connectivity_grid_size`.
    token_order: the model's ``ViTConfig.token_order``: how the masks' tokens map to patches.

  Returns:
    ``out_path``.
  """
  img = np.asarray(image, np.float32)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3]; got shape {img.shape}")
  if img.max() > 1.0 + 1e-6:
    img = img / 255.0
  img = np.clip(img, 0.0, 1.0)
  n = grid_size * grid_size + 1
  row, col, _ = _query_index(query_patch, grid_size)
  order = patch_order(grid_size, token_order)               # the raster patch at each sequence position
  token = 1 + int(np.argsort(order)[row * grid_size + col])

  per_layer = [_layer_mask(m, b) for m in masks]
  num_heads = max((m.shape[0] for m in per_layer if m is not None), default=1)
  for i, m in enumerate(per_layer):
    if m is not None and m.shape[-1] != n:
      raise ValueError(f"layer {i} mask has {m.shape[-1]} tokens but grid_size={grid_size} gives {n}")
  layer_ids = list(range(len(per_layer))) if layers is None else list(layers)
  head_ids = list(range(num_heads)) if heads is None else list(heads)
  if not layer_ids or not head_ids:
    raise ValueError("nothing to draw: no layers or no heads")

  height, width = img.shape[:2]
  ph, pw = height / grid_size, width / grid_size
  fig_w, fig_h = connectivity_grid_size(len(layer_ids), len(head_ids), dpi)
  fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
  fw, fh = fig_w / dpi, fig_h / dpi
  for r, li in enumerate(layer_ids):
    mask = per_layer[li]
    for cidx, hi in enumerate(head_ids):
      left = (_LEFT_IN + cidx * _PANEL_IN + 0.04) / fw
      bottom = (fh - _TOP_IN - (r + 1) * _PANEL_IN + 0.04) / fh
      ax = fig.add_axes([left, bottom, (_PANEL_IN - 0.08) / fw, (_PANEL_IN - 0.08) / fh])
      keep = np.ones(n, bool) if mask is None else mask[min(hi, mask.shape[0] - 1), token]
      patch_keep = np.empty(grid_size * grid_size, bool)
      patch_keep[order] = keep[1:]
      patch_keep = patch_keep.reshape(grid_size, grid_size)
      scale = np.where(patch_keep, 1.0, _DIM)
      scale = np.kron(scale, np.ones((int(np.ceil(ph)), int(np.ceil(pw)))))[:height, :width]
      ax.imshow(img * scale[..., None], extent=(0, width, height, 0), interpolation="nearest")
      ax.add_patch(mpatches.Rectangle((col * pw, row * ph), pw, ph, fill=False, ec=_QUERY, lw=1.8))
      cls_kept = bool(keep[0])
      for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(_CLS_KEPT if cls_kept else _CLS_DROPPED)
        spine.set_linewidth(3.0 if cls_kept else 1.0)
        spine.set_linestyle("-" if cls_kept else "--")
      ax.set_xticks([])
      ax.set_yticks([])
      ax.text(0.97, 0.03, f"{int(keep.sum())}/{n}", transform=ax.transAxes, ha="right", va="bottom",
              fontsize=7, color="white", bbox=dict(boxstyle="round,pad=0.15", fc="black", alpha=0.55,
                                                   lw=0))
      if r == 0:
        ax.set_title(f"head {hi}", fontsize=9)
      if cidx == 0:
        ax.set_ylabel(f"layer {li}" + (" (dense)" if mask is None else ""), fontsize=9)

  fig.suptitle(title or f"Kept keys of query patch {token - 1} (row {row}, col {col}), sample {b}",
               fontsize=11, y=1.0 - 0.12 / fh, va="top")
  handles = [
      mpatches.Patch(fc="none", ec=_QUERY, lw=1.8, label="query patch"),
      Line2D([], [], color=_CLS_KEPT, lw=3, label="CLS key kept"),
      Line2D([], [], color=_CLS_DROPPED, lw=1, ls="--", label="CLS key dropped"),
      mpatches.Patch(fc=(_DIM,) * 3, ec="none", label="key dropped (dimmed)"),
  ]
  fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=7, frameon=False,
             bbox_to_anchor=(0.5, 1.0 - 0.42 / fh))
  return _save(fig, out_path, dpi)


def row_densities(mask, b: int | None = None) -> np.ndarray:
  """Per-row kept fraction of one layer's mask, flattened over (batch,) heads and rows.

  Args:
    mask: an ``AttentionMask`` or a bool ``[..., N, N]`` array.
    b: restrict to one batch element (default: all).

  Returns:
    1-D float array of densities in [0, 1].
  """
  if isinstance(mask, attn_lib.AttentionMask):
    mask = mask.to_dense()
  arr = np.asarray(mask).astype(bool)
  if b is not None and arr.ndim == 4:
    arr = arr[b if arr.shape[0] > 1 else 0]
  return arr.mean(axis=-1).reshape(-1)


def density_histogram(densities_per_layer: Sequence, out_path: str, *, title: str | None = None,
                      bins: int = 30, dpi: int = 100) -> str:
  """Saves a two-panel figure of per-layer mask densities.

  Left: the distribution of densities in every layer (step histograms, colour = depth). Right: the
  per-layer mean with the 5-95 % range and min/max.

  Args:
    densities_per_layer: per layer, an array of densities in [0, 1] (per row, per head, ...); None or
      empty entries (dense/unmeasured layers) are skipped.
    out_path: PNG path (parent folders are created).
    title: figure title.
    bins: histogram bins over [0, 100] %.
    dpi: resolution; the figure is 11 x 4.2 inches.

  Returns:
    ``out_path``.
  """
  data = [(i, 100.0 * np.asarray(d, np.float64).reshape(-1)) for i, d in enumerate(densities_per_layer)
          if d is not None and np.size(d)]
  if not data:
    raise ValueError("density_histogram needs at least one layer with densities")
  fig, (ax_hist, ax_layer) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=dpi,
                                          gridspec_kw=dict(width_ratios=(1.4, 1)))
  cmap = plt.get_cmap("viridis")
  num_layers = len(densities_per_layer)
  lo = min(v.min() for _, v in data)
  hi = max(v.max() for _, v in data)
  pad = max(1.0, 0.05 * (hi - lo))
  edges = np.linspace(max(0.0, lo - pad), min(100.0, hi + pad), bins + 1)
  for i, values in data:
    ax_hist.hist(values, bins=edges, histtype="step", lw=1.5,
                 color=cmap(i / max(num_layers - 1, 1)), label=f"layer {i}")
  ax_hist.set_xlabel("kept entries per row (%)")
  ax_hist.set_ylabel("count")
  ax_hist.set_title("Distribution per layer")
  ax_hist.grid(alpha=0.3)
  if len(data) <= 12:
    ax_hist.legend(fontsize=7, ncol=2, frameon=False)
  else:
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, num_layers - 1))
    fig.colorbar(sm, ax=ax_hist, label="layer")

  idx = np.array([i for i, _ in data])
  mean = np.array([v.mean() for _, v in data])
  p5 = np.array([np.percentile(v, 5) for _, v in data])
  p95 = np.array([np.percentile(v, 95) for _, v in data])
  vmin = np.array([v.min() for _, v in data])
  vmax = np.array([v.max() for _, v in data])
  ax_layer.fill_between(idx, p5, p95, color="#4575b4", alpha=0.25, label="5-95 %")
  ax_layer.plot(idx, vmin, ls=":", color="#4575b4", lw=1, label="min / max")
  ax_layer.plot(idx, vmax, ls=":", color="#4575b4", lw=1)
  ax_layer.plot(idx, mean, marker="o", color="#d73027", lw=1.8, label="mean")
  ax_layer.set_xlabel("layer")
  ax_layer.set_ylabel("density (%)")
  ax_layer.set_title("Mean and spread per layer")
  ax_layer.set_xticks(idx)
  ax_layer.grid(alpha=0.3)
  ax_layer.legend(fontsize=8, frameon=False)
  fig.suptitle(title or "Attention-mask density", fontsize=12)
  fig.tight_layout()
  return _save(fig, out_path, dpi)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points not dominated under (lower cost x, higher accuracy y), sorted by x."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
  front, best = [], -math.inf
  for i in order:
    if points[i][1] > best:
      front.append(i)
      best = points[i][1]
  return front


def pareto_plot(rows: Sequence[dict[str, Any]], png_path: str, *, title: str | None = None,
                dpi: int = 110) -> str:
  """Top-1 vs total GMACs (left) and vs MHSA GMACs (right): a line per method, Pareto front highlighted.

  Dense baselines are drawn as stars; the front (over all methods) is a thick translucent step line
  with ringed points. Rows without the panel's FLOPs are left out of that panel. Returns ``png_path``.
  """
  panels = (("gmacs_total", "total GMACs / image"), ("gmacs_mhsa", "MHSA GMACs / image"))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=dpi)
  methods = sorted({r["method"] for r in rows})
  colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
  for ax, (field, xlabel) in zip(axes, panels):
    pts = [r for r in rows if r.get(field) is not None and r.get("top1") is not None]
    for method in methods:
      mine = sorted((r for r in pts if r["method"] == method), key=lambda r: r[field])
      if not mine:
        continue
      ax.plot([r[field] for r in mine], [r["top1"] for r in mine], marker="o", ms=5, lw=1.6,
              color=colors[method], label=method, zorder=3)
      for r in mine:
        if r["dense"]:
          ax.plot(r[field], r["top1"], marker="*", ms=16, color=colors[method], mec="black",
                  mew=0.8, ls="none", zorder=5)
        elif r.get("keep_rate") is not None:
          ax.annotate(f"{r['keep_rate']:g}", (r[field], r["top1"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=7, color=colors[method])
    if pts:
      front = [pts[i] for i in pareto_front([(r[field], r["top1"]) for r in pts])]
      xs, ys = [r[field] for r in front], [r["top1"] for r in front]
      ax.step(xs, ys, where="post", color="black", alpha=0.25, lw=5, zorder=2, label="Pareto front")
      ax.plot(xs, ys, "o", ms=11, mfc="none", mec="black", mew=1.2, zorder=4)
    else:
      ax.text(0.5, 0.5, "no runs report these FLOPs", ha="center", va="center",
              transform=ax.transAxes, color="gray")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))   # few, short tick labels: they never collide
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Top-1 vs {xlabel.split(' /')[0]}")
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  if any(r["dense"] for r in rows):
    handles.append(Line2D([], [], marker="*", ms=12, color="gray", mec="black", ls="none"))
    labels.append("dense baseline")
  if handles:
    axes[1].legend(handles, labels, fontsize=8, frameon=False, loc="lower right")
  fig.suptitle(title or "Accuracy vs compute (MACs per image)", fontsize=12)
  fig.tight_layout()
  return _save(fig, png_path, dpi)


def _save(fig, out_path: str, dpi: int) -> str:
  """Writes ``fig`` as a PNG to ``out_path`` atomically, closes it and returns ``out_path``."""
  try:
    atomic.write_file(out_path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
  finally:
    plt.close(fig)
  return out_path
