"""Compile-only devices of a TPU or GPU topology, on a machine that has neither.

A topology is ``family:shape``:

- TPU: ``v4:2x2x1``, ``v5e:2x4``, ``v5p:2x2x4``, ``v6e:2x2`` (chips per axis; libtpu's names). Needs
  ``libtpu`` (the TPU compiler), not a TPU. v4 lists each TensorCore as a device (half a chip's HBM).
- GPU: ``h100:N`` or ``a100:N`` (N GPUs per host, 1-8), or ``h100:NxH`` (N GPUs on each of H hosts).
  Needs ``jax-cuda12-plugin`` (``requirements-gpu.txt``: XLA's GPU compiler, ``ptxas``), not a GPU. The
  device description is XLA's own target config of that GPU (``gpu_specs/``, from github.com/openxla/xla),
  and JAX must run on the CPU platform (``JAX_PLATFORMS=cpu`` before JAX starts): with a CUDA platform
  open, the plugin would look for a real GPU instead.

What a compile for these devices proves, and what it does not: docs/training.md ("Compiling for a TPU
or GPU topology").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re

from sparsifiner_jax.cli import errors

GIB = 2 ** 30
_SPECS = pathlib.Path(__file__).with_name("gpu_specs")


@dataclasses.dataclass(frozen=True)
class Gpu:
  """A GPU model: XLA's target config file, its architecture and memory."""
  spec: str                # file in gpu_specs/
  arch: str                # ptxas --gpu-name
  memory_bytes: int        # device memory (the target config's device_memory_size)


GPUS = {"h100": Gpu("h100_sxm.txtpb", "sm_90a", 84_942_979_072),
        "a100": Gpu("a100_sxm_80.txtpb", "sm_80", 85_100_068_864)}
MAX_GPUS_PER_HOST = 8

# HBM per chip (GiB) of each TPU family, by the name a topology starts with.
TPU_HBM_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
# What libtpu would read from a TPU VM's metadata server; given, it starts quietly on a machine without.
_ACCELERATOR_TYPE = {"v2": "v2-8", "v3": "v3-8", "v4": "v4-8", "v5e": "v5litepod-4",
                     "v5litepod": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}


class TopologyError(ValueError):
  """The topology is unknown, or the compiler it needs (libtpu, the CUDA plugin) is missing."""


def family(topology: str) -> str:
  return topology.split(":")[0].lower()


def platform(topology: str) -> str:
  """``"tpu"`` or ``"gpu"``: whose kernels the program is traced with (``backend.compiling_for``)."""
  return "gpu" if family(topology) in GPUS else "tpu"


def _allowed() -> str:
  return (f"allowed: a TPU <family>:<chips per axis> with family one of {sorted(TPU_HBM_GIB)} "
          f"(e.g. v5e:2x4, v4:2x2x2), or a GPU <model>:<GPUs per host>[x<hosts>] with model one of "
          f"{sorted(GPUS)} and 1-{MAX_GPUS_PER_HOST} GPUs per host (e.g. h100:8, h100:8x2)")


def devices(topology: str) -> list:
  """The compile-only devices of ``topology``; no accelerator is opened."""
  if ":" not in topology:
    raise TopologyError(f"unknown topology {topology!r}; {_allowed()}")
  if family(topology) in GPUS:
    return _gpu_devices(topology)
  if family(topology) in TPU_HBM_GIB:
    return _tpu_devices(topology)
  raise TopologyError(f"unknown topology {topology!r}; {_allowed()}")


def memory_bytes(topology: str, devs=None) -> int:
  """Memory per device of ``topology``: a GPU's, a TPU chip's HBM, or its share where the topology lists
  each TensorCore of a chip as a device (v4 compiles without megacore: two devices of 16 GiB per chip)."""
  if family(topology) in GPUS:
    return GPUS[family(topology)].memory_bytes
  cores = 1 + max((getattr(d, "core_on_chip", 0) for d in devs), default=0) if devs else 1
  return TPU_HBM_GIB[family(topology)] * GIB // cores


def gpu_target_config(name: str) -> str:
  """XLA's target config text of GPU model ``name`` (``"h100"``, ``"a100"``)."""
  return (_SPECS / GPUS[name].spec).read_text()


def _tpu_devices(topology: str) -> list:
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError("compiling for a TPU topology needs the TPU compiler: pip install "
                        "'libtpu==0.0.42.*'")
  for name, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),    # compile-only: no chip is claimed
                      ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_ACCELERATOR_TYPE", _ACCELERATOR_TYPE[family(topology)])):
    os.environ.setdefault(name, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top  # loads libtpu
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu's errors are RuntimeErrors
    raise TopologyError(f"topology {topology!r}: {errors.with_type(e)}") from None


def _gpu_devices(topology: str) -> list:
  shape = re.fullmatch(r"(\d+)(?:x(\d+))?", topology.split(":", 1)[1])
  per_host, hosts = (int(shape[1]), int(shape[2] or 1)) if shape else (0, 0)
  if not (1 <= per_host <= MAX_GPUS_PER_HOST and hosts >= 1):
    raise TopologyError(f"unknown topology {topology!r}; {_allowed()}")
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    raise TopologyError("compiling for a GPU needs XLA's CUDA compiler: pip install -r "
                        "requirements-gpu.txt (jax-cuda12-plugin and ptxas; no GPU needed)")
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_platforms != "cpu":
    raise TopologyError("compiling for a GPU without one needs JAX on the CPU platform: set "
                        "JAX_PLATFORMS=cpu before JAX starts")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                        target_config=gpu_target_config(family(topology)),
                                        topology=f"1x{hosts}x{per_host}")
  except Exception as e:  # pylint: disable=broad-except
    raise TopologyError(f"topology {topology!r}: {errors.with_type(e)}") from None
  return list(topo.devices)


def platform_of(devs) -> str:
  """``"tpu"`` or ``"gpu"``: the platform of compile-only devices (``devices(...)``)."""
  return "gpu" if devs[0].platform in ("gpu", "cuda") else "tpu"


def compile_lowered(lowered, platform: str):
  """``lowered.compile()`` for compile-only devices of ``platform``.

  GPU: without a GPU XLA cannot autotune its Triton GEMM fusions, and for some shapes the default tiling
  it falls back to has no solution ("Couldn't find output tile sizes", e.g. the weight gradient of
  DeiT-S's attention projection at 168 images per GPU). Such a program is compiled again with its matrix
  products as cuBLAS calls, one of the autotuner's own candidates on a real GPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if platform != "gpu" or "output tile sizes" not in str(e):
      raise
  return lowered.compile({"xla_gpu_enable_triton_gemm": False})
