"""Test setup: 8 fake CPU devices (before JAX starts), offline HF hub, torchvision op shim for timm."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


def import_timm():
  """Imports timm against the CPU torch wheel, or skips the test with the reason.

  PyPI's torchvision wheels are CUDA builds whose C++ ops fail to register against CPU torch; timm
  imports torchvision unconditionally. Defining the two op schemas torchvision's meta registrations
  expect lets it import (only torchvision's C++ ops, unused here, stay unavailable).
  """
  torch = pytest.importorskip("torch", reason="torch not installed (pip install -r requirements-test.txt)")
  try:
    torch.ops.torchvision.nms  # noqa: B018
  except (AttributeError, RuntimeError):
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_timm._lib = lib  # keep the registration alive
  return pytest.importorskip("timm", reason="timm not installed (pip install -r requirements-test.txt)")


@pytest.fixture(scope="session")
def timm():
  return import_timm()
