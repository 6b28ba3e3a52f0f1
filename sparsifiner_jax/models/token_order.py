"""The order of the patch tokens in the sequence (``ViTConfig.token_order``).

* ``"raster"``: row by row, as the patch embedding writes them (timm's order);
* ``"morton"``: Z-order: the patches sorted by the interleaved bits of their (row, column). Runs of
  ``4^j`` consecutive tokens cover ``2^j x 2^j`` squares of the patch grid (on a grid whose side is a
  power of two; elsewhere compact pieces of one), so block mode's blocks (``attention.blocks``: runs of
  ``b`` tokens) are squares of the image where in raster order they are strips of image rows.

Attention, the MLPs and the class token's head do not depend on the order, so a model gives the same
logits in either order (position embeddings are added before the tokens are reordered). What does
depend on it: block mode's blocks, token-sized predictor parameters (``proj_n``: their rows follow the
sequence) and the fixed patterns of ``attention.patterns`` (raster only).
"""

from __future__ import annotations

import numpy as np

TOKEN_ORDERS = ("raster", "morton")


def patch_order(grid: int, order: str) -> np.ndarray:
  """``[grid^2] int``: the raster index of the patch at each sequence position (after the CLS token)."""
  if order not in TOKEN_ORDERS:
    raise ValueError(f"token_order={order!r}; allowed: {', '.join(TOKEN_ORDERS)}")
  raster = np.arange(grid * grid)
  if order == "raster":
    return raster
  row, col = np.divmod(raster, grid)
  key = np.zeros_like(raster)
  for bit in range(max(grid - 1, 1).bit_length()):
    key |= ((row >> bit) & 1) << (2 * bit + 1) | ((col >> bit) & 1) << (2 * bit)
  return np.argsort(key, kind="stable")


def sequence_order(grid: int, order: str) -> np.ndarray | None:
  """``[grid^2 + 1] int``: the token taken at each position of the reordered sequence, the CLS token
  first; None for the raster order (nothing to reorder)."""
  patches = patch_order(grid, order)
  return None if order == "raster" else np.concatenate([[0], 1 + patches])
