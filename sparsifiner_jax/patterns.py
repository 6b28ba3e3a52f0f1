"""Fixed and oracle attention patterns on the one mask interface (``attention.AttentionMask``).

``ViTConfig.attention_pattern`` names a pattern; ``"sparsifiner"`` is the learned predictor
(``models.predictor``) and is not built here. Every other name maps to a builder in ``PATTERNS``:
``build(cfg, layer, keep_rate) -> Pattern``, a hashable callable ``(q, k) -> AttentionMask`` with
``q, k: [B, N, H, d]``. Static patterns compute their indices on the host (numpy) from hashable
options only, so the module graph stays hashable.
"""

from __future__ import annotations

from typing import Any, Callable

PATTERNS: dict[str, Callable[..., Any]] = {}
LEARNED = "sparsifiner"


def names() -> list[str]:
  return [LEARNED] + sorted(PATTERNS)


def validate(cfg) -> None:
  """Raises ValueError naming a bad ``attention_pattern`` or option."""
  if cfg.attention_pattern != LEARNED and cfg.attention_pattern not in PATTERNS:
    raise ValueError(f"unknown attention_pattern {cfg.attention_pattern!r}; allowed: {', '.join(names())}")


def build(cfg, layer: int, keep_rate: float | None):
  """The pattern of layer ``layer`` for ``cfg`` (not the learned one)."""
  return PATTERNS[cfg.attention_pattern](cfg, layer, keep_rate)
