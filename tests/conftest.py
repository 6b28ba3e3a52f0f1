"""Test setup: 8 fake CPU devices (before JAX starts), offline HF hub, torchvision op shim for timm.

JAX runs on CPU only: libtpu is installed to compile for TPU topologies, and without the pin JAX would try
(and loudly fail) to open a TPU at start-up. Compile-only topologies do not need the TPU platform."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # test workers each load libtpu to compile

import pytest  # noqa: E402


def import_timm():
  """Imports timm against the CPU torch wheel (``sparsifiner_jax.io.timm_compat``), or skips with the reason."""
  pytest.importorskip("torch", reason="torch not installed (pip install -r requirements-test.txt)")
  from sparsifiner_jax.io import timm_compat  # pylint: disable=g-import-not-at-top
  timm_compat.register_torchvision_op_schemas()
  return pytest.importorskip("timm", reason="timm not installed (pip install -r requirements-test.txt)")


@pytest.fixture(scope="session")
def timm():
  return import_timm()
