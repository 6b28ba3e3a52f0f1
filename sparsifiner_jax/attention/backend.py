"""Which accelerator the attention code is traced for, and so which kernels ``auto`` picks.

Normally the platform of ``jax.default_backend()``. ``compiling_for("tpu")`` overrides it while a CPU
process traces a program for a TPU topology (``sparsifiner_jax.compile_for``), and ``interpret=True``
there runs the Pallas kernels in interpret mode, so tests exercise the accelerator path on CPU.
``SPARSIFINER_JAX_PALLAS=0`` turns the Pallas kernels off (``auto`` then runs ``masked`` on accelerators).
On TPU the target also knows its chip (``device_kind``), whose VMEM some kernels size their operands by.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os

import jax

PLATFORMS = ("cpu", "tpu", "gpu")


# VMEM per TensorCore of each TPU generation, by ``jax.Device.device_kind`` (the chips' published sizes).
_VMEM_MIB = {"TPU v2": 16, "TPU v3": 16, "TPU v4": 16, "TPU v4 lite": 16, "TPU v5 lite": 128, "TPU v5": 64,
             "TPU v5p": 64, "TPU v6 lite": 128}


@dataclasses.dataclass(frozen=True)
class Target:
  platform: str
  interpret: bool = False
  device_kind: str | None = None    # the accelerator's ``jax.Device.device_kind``, where known

  @property
  def vmem_bytes(self) -> int | None:
    """VMEM per TensorCore of a TPU target (None: not a TPU, or a chip not known)."""
    if self.platform != "tpu" or self.device_kind not in _VMEM_MIB:
      return None
    return _VMEM_MIB[self.device_kind] * 2 ** 20


# The platform ``compiling_for`` traces for (None: the default backend).
_TRACE_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar("sparsifiner_trace_target",
                                                                            default=None)


def target() -> Target:
  """The platform being traced for (``compiling_for``'s, else the default backend's)."""
  override = _TRACE_TARGET.get()
  if override is not None:
    return override
  platform = jax.default_backend()
  return Target("gpu" if platform in ("gpu", "cuda", "rocm") else platform,
                device_kind=jax.devices()[0].device_kind if platform == "tpu" else None)


def pallas_enabled() -> bool:
  """Whether ``auto`` may use the Pallas kernels (not on CPU, and not with ``SPARSIFINER_JAX_PALLAS=0``)."""
  t = target()
  return t.platform in ("tpu", "gpu") and os.environ.get("SPARSIFINER_JAX_PALLAS", "1") != "0"


@contextlib.contextmanager
def compiling_for(platform: str, *, interpret: bool = False, device_kind: str | None = None):
  """Traces attention for ``platform`` (``"cpu"``, ``"tpu"`` or ``"gpu"``; the chip's ``device_kind``
  where known) inside the block."""
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; allowed: {PLATFORMS}")
  token = _TRACE_TARGET.set(Target(platform, interpret, device_kind))
  try:
    yield
  finally:
    _TRACE_TARGET.reset(token)
