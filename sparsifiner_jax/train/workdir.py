"""A run's directory: which config it belongs to, and one run at a time in it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from typing import Any

import jax

from sparsifiner_jax.io.checkpoint import read_latest_meta
from sparsifiner_jax.train.phases import Phase


class TrainingError(RuntimeError):
  """Training cannot continue (non-finite loss, ...); the message names the step and the cause."""


def state_meta(config, phase: Phase, step: int) -> dict[str, Any]:
  return dict(step=int(step), phase=phase.name, data_position=int(step),
              config_fingerprint=config_fingerprint(config))


def config_fingerprint(config) -> str:
  """Hash of the fields that define a run's trajectory (not logging/eval/checkpoint cadence, not the
  mesh: a run may resume on another topology)."""
  d = config.to_dict()
  for k in ("log_every", "eval_every", "ckpt_every", "keep_ckpts", "progress", "total_steps_cap",
            "mesh"):
    d.pop(k, None)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_workdir(config, workdir: str) -> None:
  """Refuses, before anything is written, a workdir that is a file or holds a run of another config."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} exists and is not a directory")
  meta = read_latest_meta(os.path.join(workdir, "ckpt"))
  if (meta is not None and meta.get("config_fingerprint") != config_fingerprint(config)
      and not config.get("allow_config_change")):
    raise ValueError(f"workdir {workdir!r} holds a run of another config; use a new workdir, or set "
                     "--config.allow_config_change=True to continue it anyway")


@contextlib.contextmanager
def lock_workdir(workdir: str):
  """Holds ``WORKDIR/.lock`` (an exclusive ``flock``) while the block runs, on process 0 only.

  A second run on the same workdir fails at once with TrainingError naming the holder, instead of two
  runs interleaving checkpoints and metrics. The kernel drops the lock when its holder dies (even by
  SIGKILL), so a killed run never leaves a stale lock. Needs a filesystem with ``flock`` (local disks;
  on NFS only within one host).
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, ".lock")
  f = open(path, "a+")  # pylint: disable=consider-using-with  # held until the block ends
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown process"
      raise TrainingError(f"workdir {workdir!r} is in use by another run ({holder}); wait for it to "
                          "end or use another workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    yield
  finally:
    f.close()  # releases the lock
