"""Native CPU kernels (XLA FFI custom calls) for the sparse path, with pure-XLA fallbacks.

``topk_keep_mask(x, k)`` is the one public entry point: a boolean ``[..., n]`` mask of each row's ``k``
largest entries (ties: lowest index -- the set ``jax.lax.top_k`` returns). On CPU it runs
``topk_mask_cpu.cc``, a multi-threaded radix select (~30x faster than XLA:CPU's TopK plus a scatter on
Sparsifiner's ``[B, H, N-1, N]`` scores; BENCHMARKS.md); on other backends, or when the kernel cannot be
built, it runs the XLA reference (``lax.top_k`` and a scatter). The choice is made per platform at
lowering time (``lax.platform_dependent``), so one jitted function serves CPU and accelerators.

Building: the C++ source is compiled once per (source, jaxlib, CPU) into a cache directory
(``$SPARSIFINER_JAX_CACHE``, default ``~/.cache/sparsifiner_jax``) with ``$CXX`` (default ``g++``), written
atomically, so concurrent processes are safe. ``SPARSIFINER_JAX_CPU_KERNELS=0`` disables the kernels (the
XLA path is then used everywhere); ``kernel_status()`` says which path is active and why.

Known limitation: the custom call has no partitioning rule, so under a batch-sharded ``jit`` XLA gathers
its operand and every device selects over the global batch (correct, but the work is replicated; plain
``lax.top_k`` is partitioned the same way here). A ``custom_partitioning`` rule worked for plain batch
sharding but failed inside the trainer's gradient-accumulation reshape (JAX could not express that
sharding as a mesh spec), so it is not used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_SOURCE = pathlib.Path(__file__).with_name("topk_mask_cpu.cc")
_TARGET = "sparsifiner_topk_mask"
_CXXFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC",
             "-w")
_status = {"available": False, "reason": "not loaded yet"}


def _cpu_signature() -> str:
  """Identifies the CPU the library is built for (``-march=native`` code is not portable)."""
  try:
    flags = next(line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags"))
  except (OSError, StopIteration):
    flags = ""
  return f"{platform.machine()}|{platform.processor()}|{flags}"


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("SPARSIFINER_JAX_CACHE") or pathlib.Path.home() / ".cache" / "sparsifiner_jax"
  return pathlib.Path(root) / "kernels"


def _build() -> pathlib.Path:
  """Compiles the kernel library if it is not cached yet; returns its path. Raises on failure."""
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH")
  include = jax.ffi.include_dir()
  key = hashlib.sha256("\n".join([_SOURCE.read_text(), jax.__version__, cxx, " ".join(_CXXFLAGS),
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  lib = _cache_dir() / f"topk_mask_cpu_{key}.so"
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
    out = pathlib.Path(tmp) / lib.name
    cmd = [cxx, *_CXXFLAGS, f"-I{include}", str(_SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    os.replace(out, lib)          # atomic: another process sees the whole library or none
  return lib


@functools.cache
def _load() -> bool:
  """Builds, loads and registers the CPU kernel once per process; False (with a warning) on failure."""
  if os.environ.get("SPARSIFINER_JAX_CPU_KERNELS", "1") == "0":
    _status.update(available=False, reason="disabled by SPARSIFINER_JAX_CPU_KERNELS=0")
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.TopkMask), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    _status.update(available=False, reason=str(e))
    logging.warning("sparsifiner_jax: CPU top-k kernel unavailable, using XLA's TopK (slower): %s", e)
    return False
  _status.update(available=True, reason=f"loaded {lib._name}")
  return True


def kernel_status() -> dict:
  """``{"available": bool, "reason": str}`` for the CPU top-k kernel (builds it if needed)."""
  _load()
  return dict(_status)


def topk_keep_mask_xla(x: Array, k: int) -> Array:
  """Reference: ``lax.top_k`` indices scattered into a boolean ``[..., n]`` mask."""
  n = x.shape[-1]
  _, idx = jax.lax.top_k(x, k)
  rows = idx.reshape(-1, k)
  out = jnp.zeros((rows.shape[0], n), bool).at[jnp.arange(rows.shape[0])[:, None], rows].set(True)
  return out.reshape(x.shape)


def _ffi_topk_keep_mask(x: Array, k: int) -> Array:
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.bool_),
                          vmap_method="broadcast_all")
  return call(x, k=np.int64(k))


def topk_keep_mask(x: Array, k: int) -> Array:
  """Boolean ``[..., n]``: True at each row's ``k`` largest entries of ``x`` (ties: lowest index).

  Not differentiable (a selection): the input is wrapped in ``stop_gradient``. Float32, bfloat16 and
  float16 inputs are compared in float32 (exact); float64 ones take the XLA path.
  """
  n = x.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"top-k budget k={k} must be in [1, {n}] (the row length)")
  if k == n:
    return jnp.ones(x.shape, bool)
  if x.dtype == jnp.float64:            # the kernel compares in float32; keep float64 exact
    return topk_keep_mask_xla(jax.lax.stop_gradient(x), k)
  x = jax.lax.stop_gradient(x.astype(jnp.float32))    # exact for bf16/f16 inputs
  if x.size == 0 or not _load():
    return topk_keep_mask_xla(x, k)
  return jax.lax.platform_dependent(x, cpu=functools.partial(_ffi_topk_keep_mask, k=k),
                                    default=functools.partial(topk_keep_mask_xla, k=k))
