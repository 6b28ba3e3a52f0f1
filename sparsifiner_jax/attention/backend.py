"""Which accelerator the attention code is traced for, and so which kernels ``auto`` picks.

Normally the platform of ``jax.default_backend()``. ``compiling_for("tpu")`` overrides it while a CPU
process traces a program for a TPU topology (``sparsifiner_jax.compile_for``), and ``interpret=True``
there runs the Pallas kernels in interpret mode, so tests exercise the accelerator path on CPU.
``SPARSIFINER_JAX_PALLAS=0`` turns the Pallas kernels off (``auto`` then runs ``masked`` on accelerators).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os

import jax

PLATFORMS = ("cpu", "tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class Target:
  platform: str
  interpret: bool = False


# The platform ``compiling_for`` traces for (None: the default backend).
_TRACE_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar("sparsifiner_trace_target",
                                                                            default=None)


def target() -> Target:
  """The platform being traced for (``compiling_for``'s, else the default backend's)."""
  override = _TRACE_TARGET.get()
  if override is not None:
    return override
  platform = jax.default_backend()
  return Target("gpu" if platform in ("gpu", "cuda", "rocm") else platform)


def pallas_enabled() -> bool:
  """Whether ``auto`` may use the Pallas kernels (not on CPU, and not with ``SPARSIFINER_JAX_PALLAS=0``)."""
  t = target()
  return t.platform in ("tpu", "gpu") and os.environ.get("SPARSIFINER_JAX_PALLAS", "1") != "0"


@contextlib.contextmanager
def compiling_for(platform: str, *, interpret: bool = False):
  """Traces attention for ``platform`` (``"cpu"``, ``"tpu"`` or ``"gpu"``) inside the block."""
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; allowed: {PLATFORMS}")
  token = _TRACE_TARGET.set(Target(platform, interpret))
  try:
    yield
  finally:
    _TRACE_TARGET.reset(token)
