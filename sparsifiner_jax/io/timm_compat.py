"""Lets timm import against the CPU torch wheel: PyPI's torchvision wheels are CUDA builds.

PyPI's torchvision wheels are CUDA builds whose C++ ops fail to register against CPU torch, and timm
imports torchvision unconditionally. Defining the two op schemas torchvision's meta registrations expect
lets it import; only torchvision's C++ ops (unused here) stay unavailable. Used by the tests and the
benchmarks, never by the library itself.
"""

from __future__ import annotations

_REGISTRATIONS = []  # keeps the library registration alive


def register_torchvision_op_schemas() -> None:
  """Defines ``torchvision::nms``/``qnms`` if torchvision's own ops did not load (idempotent)."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    torch.ops.torchvision.nms  # noqa: B018
  except (AttributeError, RuntimeError):
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _REGISTRATIONS.append(lib)
