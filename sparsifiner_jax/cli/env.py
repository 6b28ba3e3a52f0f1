"""The project's environment variables, all named ``SPARSIFINER_JAX_*``.

  * ``DISTRIBUTED=1``: ``jax.distributed.initialize()`` from a launcher JAX detects (``cli.entry``).
  * ``COORDINATOR=host:port``, ``NUM_PROCESSES``, ``PROCESS_ID``: an explicit multi-process run; with
    ``JAX_PLATFORMS=cpu``, ``CPU_COLLECTIVES=0`` turns off gloo CPU collectives (``cli.entry``).
  * ``LEASE_SECONDS``: a bucket workdir's lease length (``train.workdir``).
  * ``PALLAS``, ``CPU_KERNELS``, ``CACHE``: the attention backend, the CPU kernels' switch and build
    cache (``attention.backend``, ``attention.cpu``).

The names in :data:`RENAMED` were ``SPARSIFINER_<NAME>`` until 0.1.0. The old names are still read in
0.1.x, each with a one-line warning on stderr (once per process), and no longer from 0.2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

PREFIX = "SPARSIFINER_JAX_"
OLD_PREFIX = "SPARSIFINER_"
RENAMED = ("DISTRIBUTED", "COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "CPU_COLLECTIVES",
           "LEASE_SECONDS")
_warned: set[str] = set()


def get(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
  """``SPARSIFINER_JAX_<name>``; else, for a :data:`RENAMED` name, the old ``SPARSIFINER_<name>`` (with a
  one-line warning, once per process); else ``default``."""
  environ = os.environ if environ is None else environ
  new = PREFIX + name
  if new in environ:
    return environ[new]
  old = OLD_PREFIX + name
  if name in RENAMED and old in environ:
    if old not in _warned:
      _warned.add(old)
      sys.stderr.write(f"warning: {old} is deprecated (no longer read from 0.2); set {new} instead\n")
    return environ[old]
  return default
