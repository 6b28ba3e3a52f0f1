"""What ``ptxas`` and XLA say about each GPU kernel of a program compiled without a GPU.

Compile with XLA's dump on (``lowered.compile({"xla_dump_to": DIR})``, or ``XLA_FLAGS=--xla_dump_to=DIR``
before JAX starts); XLA then writes, per program, the PTX of every kernel (``*.ptx``, entry named after
the Pallas kernel's ``name``) and its launch sequence
(``*thunk_sequence.txt``: grid, threads, shared memory per kernel). :func:`kernel_stats` reads both and
runs ``ptxas -v`` (from ``nvidia-cuda-nvcc-cu12``, ``requirements-gpu.txt``) on each kernel for the
registers per thread and the spilled bytes. A register or shared-memory figure is what one launch needs
on the chip; whether the kernel is fast is not in it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess

_THUNK = re.compile(r"kCustomKernel \[[^\]]*\] (\S+) grid: \[(\d+), (\d+), (\d+)\] "
                    r"threads: \[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+) bytes")


@dataclasses.dataclass(frozen=True)
class KernelStats:
  """One compiled GPU kernel."""
  name: str
  grid: tuple[int, int, int]
  threads: int              # per block
  shared_bytes: int         # per block (dynamic shared memory of the launch)
  registers: int            # per thread
  spill_bytes: int          # spill stores + loads
  ptx_bytes: int


def ptxas() -> str:
  """The path of ``ptxas`` from the ``nvidia-cuda-nvcc-cu12`` wheel."""
  import nvidia.cuda_nvcc  # pylint: disable=g-import-not-at-top
  return str(pathlib.Path(list(nvidia.cuda_nvcc.__path__)[0]) / "bin" / "ptxas")


def _ptxas_verbose(ptx: pathlib.Path, arch: str) -> tuple[int, int]:
  """``(registers per thread, spilled bytes)`` of the one kernel in ``ptx``."""
  out = subprocess.run([ptxas(), "-v", "--gpu-name", arch, str(ptx), "-o", "/dev/null"],
                       capture_output=True, text=True, check=True).stderr
  registers = int(re.search(r"Used (\d+) registers", out)[1])
  spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
  return registers, spills


def kernel_stats(dump_dir: str | pathlib.Path, names: tuple[str, ...], arch: str = "sm_90a"
                 ) -> list[KernelStats]:
  """The kernels named ``names`` (Pallas ``name=``) in XLA's dump ``dump_dir``, in launch order."""
  dump = pathlib.Path(dump_dir)
  entries = {}
  for ptx in dump.glob("*.ptx"):
    entry = re.search(r"\.entry (\w+)\(", ptx.read_text())
    if entry and entry[1] in names:
      entries[entry[1]] = ptx
  stats = []
  for sequence in sorted(dump.glob("*thunk_sequence.txt")):
    for m in _THUNK.finditer(sequence.read_text()):
      name = m[1]
      if name in entries and all(s.name != name for s in stats):
        registers, spills = _ptxas_verbose(entries[name], arch)
        stats.append(KernelStats(name, (int(m[2]), int(m[3]), int(m[4])), int(m[5]) * int(m[6]) * int(m[7]),
                                 int(m[8]), registers, spills, entries[name].stat().st_size))
  return stats
