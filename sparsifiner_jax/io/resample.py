"""Resolution changes: the position embedding and the predictors' token-sized parameters resampled to a
new patch grid.

The patch-grid part of ``pos_embed`` is resampled over the 2-D grid with bicubic interpolation exactly as
timm's ``resample_abs_pos_embed`` defaults (torch ``F.interpolate(mode="bicubic", antialias=True,
align_corners=False)``: Keys cubic a = -0.5, the kernel widened by the scale when downsampling, weights
renormalised at the borders; implemented with ``jax.image.resize(method="bicubic")``, which matches timm to
~1e-6). The CLS slot is kept. The predictor's ``proj_n``/``proj_back_n`` ``[N, m]`` are resampled the same
way over their patch rows, keeping row 0 (CLS) and ``m``. The official Sparsifiner code interpolates with
``antialias=False`` (Keys a = -0.75, no border renormalisation) for its 384 fine-tuning, so its resampled
tables differ from timm's and ours.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsifiner_jax.io.state_dict import PREDICTOR, ConversionError, as_numpy


def resample_pos_embed(pos_embed: Any, new_grid: int | Sequence[int], *, num_prefix_tokens: int = 1,
                       old_grid: int | Sequence[int] | None = None) -> np.ndarray:
  """Resamples the patch-grid part of ``pos_embed`` ``[1, P + G_old, D]`` to ``[1, P + G_new, D]``.

  The ``P = num_prefix_tokens`` leading slots (CLS) are kept as they are; the grid part is reshaped to
  ``[h, w, D]`` (square unless ``old_grid`` says otherwise) and resized with bicubic interpolation as
  timm's ``resample_abs_pos_embed`` does by default (antialiased bicubic; matches it to ~1e-6).
  """
  pe = np.asarray(as_numpy(pos_embed), np.float32)
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
  p = np.asarray(as_numpy(param), np.float32)
  if p.ndim != 2:
    raise ConversionError(f"token parameter must be [N, m]; got shape {p.shape}")
  return resample_pos_embed(p[None], new_grid, num_prefix_tokens=num_prefix_tokens)[0]


def reduce_n_keeping(m: int, num_tokens: int, preferred: int) -> int | None:
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
  if "pos_embed" in sd and as_numpy(sd["pos_embed"]).shape[1] != cfg.num_tokens:
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid)
  for k in list(sd):
    if PREDICTOR in k and k.rsplit(".", 1)[-1] in ("proj_n", "proj_back_n"):
      if as_numpy(sd[k]).shape[0] != cfg.num_tokens:
        sd[k] = resize_token_params(sd[k], grid)
  return sd
