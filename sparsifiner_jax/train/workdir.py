"""A run's directory: which config it belongs to, and one run at a time in it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
from etils import epath

from sparsifiner_jax.cli import env
from sparsifiner_jax.io import paths
from sparsifiner_jax.io.checkpoint import read_latest_meta
from sparsifiner_jax.train.phases import Phase


class TrainingError(RuntimeError):
  """Training cannot continue (non-finite loss, ...); the message names the step and the cause."""


def state_meta(config, phase: Phase, step: int) -> dict[str, Any]:
  """A checkpoint's meta: where the run is, and the config fields it ran with (``trajectory_fields``)."""
  return dict(step=int(step), phase=phase.name, data_position=int(step),
              config_fingerprint=config_fingerprint(config), config=trajectory_fields(config))


# Fields that do not change a run's trajectory (logging, evaluation and checkpoint cadence; the mesh: a
# run may resume on another topology; the override flag itself): never compared.
UNCOMPARED = ("log_every", "eval_every", "ckpt_every", "keep_ckpts", "progress", "total_steps_cap",
              "mesh", "allow_config_change")

# Fields added while a checkpoint's meta held only the hash of the whole config (before it recorded
# ``config``), with the value that reproduces the older runs: a legacy fingerprint is also accepted
# without them. No later field needs an entry here (``config_changes`` handles them).
_ADDED_TO_LEGACY_FINGERPRINT = {"input.data_shards": None}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts to dotted names; an empty dict stays one value."""
  out = {}
  for key, value in d.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def trajectory_fields(config) -> dict[str, Any]:
  """The fields that define a run's trajectory: dotted name -> value as JSON gives it back (tuples
  become lists), every field but ``UNCOMPARED``."""
  flat = _flatten(json.loads(json.dumps(config.to_dict(), default=str)))
  return {k: v for k, v in flat.items() if k.split(".")[0] not in UNCOMPARED}


def config_fingerprint(config) -> str:
  """Hash of ``trajectory_fields``: equal configs, equal fingerprints."""
  blob = json.dumps(trajectory_fields(config), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_fields() -> dict[str, Any]:
  """``trajectory_fields`` of the defaults, ``configs/common.py``'s ``base_config()``."""
  from configs import common  # pylint: disable=import-outside-toplevel  # configs imports this package
  return trajectory_fields(common.base_config())


def config_changes(saved: dict[str, Any], config) -> list[str]:
  """How ``config`` differs from the ``trajectory_fields`` a run ``saved``, one "name: old -> new" each.

  A field absent from ``saved`` that ``config`` holds at its default (``default_fields``) is no change:
  a field added to the project with its default leaves earlier runs resumable. Any other difference
  is one: a changed value, a field either side lacks (including a default changed since the run began:
  ``saved`` holds the value the run used).
  """
  now, defaults, out = trajectory_fields(config), None, []
  for name in sorted(set(saved) | set(now)):
    if name not in now:
      out.append(f"{name}: {saved[name]!r} -> absent")
    elif name not in saved:
      defaults = default_fields() if defaults is None else defaults
      if name not in defaults or defaults[name] != now[name]:
        out.append(f"{name}: absent -> {now[name]!r}")
    elif saved[name] != now[name]:
      out.append(f"{name}: {saved[name]!r} -> {now[name]!r}")
  return out


def _legacy_fingerprints(config) -> set[str]:
  """The fingerprints a checkpoint written before metas recorded ``config`` may hold for ``config``:
  the hash of the whole ``config.to_dict()`` less cadence and mesh, with and without the fields of
  ``_ADDED_TO_LEGACY_FINGERPRINT`` (when at their value), under either ``allow_config_change``."""
  out = set()
  for allow in (False, True):
    for drop_added in (False, True):
      d = config.to_dict()
      for k in ("log_every", "eval_every", "ckpt_every", "keep_ckpts", "progress", "total_steps_cap",
                "mesh"):
        d.pop(k, None)
      d["allow_config_change"] = allow
      for name, value in _ADDED_TO_LEGACY_FINGERPRINT.items() if drop_added else ():
        *parents, leaf = name.split(".")
        node = d
        for key in parents:
          node = node.get(key, {})
        if leaf in node and node[leaf] == value:
          del node[leaf]
      blob = json.dumps(d, sort_keys=True, default=str)
      out.add(hashlib.sha256(blob.encode()).hexdigest()[:16])
  return out


def _run_changes(meta: dict[str, Any], config) -> list[str]:
  """``config_changes`` against a checkpoint's meta; a legacy meta (a fingerprint only) either
  matches one of ``_legacy_fingerprints`` or is one unnamed change."""
  if "config" in meta:
    return config_changes(meta["config"], config)
  if meta.get("config_fingerprint") in _legacy_fingerprints(config):
    return []
  return ["the fingerprint differs (the checkpoint predates recorded configs)"]


def check_workdir(config, workdir: epath.Path) -> None:
  """Refuses, before anything is written, a workdir (resolved: ``paths.check_reachable``) that is a file
  or holds a run of another config (``config_changes`` against its newest checkpoint), unless
  ``config.allow_config_change``."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {os.fspath(workdir)!r} exists and is not a directory")
  meta = read_latest_meta(workdir / "ckpt")
  if meta is None or config.allow_config_change:
    return
  changes = _run_changes(meta, config)
  if changes:
    more = f"; and {len(changes) - 3} more" if len(changes) > 3 else ""
    raise ValueError(f"workdir {os.fspath(workdir)!r} holds a run of another config "
                     f"({'; '.join(changes[:3])}{more}); use a new workdir, or set "
                     "--config.allow_config_change=True to continue it anyway")


class _NoLock:
  """What processes other than 0 hold."""

  def check(self) -> None:
    pass


@contextlib.contextmanager
def lock_workdir(workdir: epath.Path):
  """One run at a time per ``workdir`` (resolved: ``paths.check_reachable``): held while the block runs,
  by process 0 only.

  A second run on the same workdir fails at once with TrainingError naming the holder, instead of two
  runs interleaving checkpoints and metrics. Yields an object whose ``check()`` raises TrainingError if
  the workdir was taken over meanwhile (called before each checkpoint). Local workdirs: an exclusive
  ``flock`` on ``WORKDIR/.lock``, which the kernel drops when its holder dies (even by SIGKILL); needs a
  filesystem with ``flock`` (local disks; on NFS only within one host). Buckets: a lease
  (:class:`Lease`).
  """
  if jax.process_index() != 0:
    yield _NoLock()
    return
  if paths.is_remote(workdir):
    lease = Lease(workdir / LEASE_NAME, os.fspath(workdir))
    lease.acquire()
    try:
      yield lease
    finally:
      lease.release()
    return
  f = open(workdir / ".lock", "a+")  # pylint: disable=consider-using-with  # held until the block ends
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown process"
      raise TrainingError(f"workdir {os.fspath(workdir)!r} is in use by another run ({holder}); wait "
                          "for it to end or use another workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    yield _NoLock()
  finally:
    f.close()  # releases the lock


LEASE_NAME = "lease.json"


def lease_seconds() -> float:
  """How long a bucket lease outlives its last renewal (``SPARSIFINER_JAX_LEASE_SECONDS``, default
  120)."""
  v = env.get("LEASE_SECONDS", "120")
  try:
    seconds = float(v)
  except ValueError:
    seconds = -1.0
  if not seconds > 0:
    raise ValueError(f"SPARSIFINER_JAX_LEASE_SECONDS={v!r} is not allowed; allowed: seconds > 0")
  return seconds


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class Lease:
  """A workdir lock for object storage, where there is no ``flock``: the object ``WORKDIR/lease.json``.

  It names its holder (host, boot, pid) and a random token, and a thread renews it every quarter of
  :func:`lease_seconds`. A lease is free when it is absent, when its holder ran on this host (same
  boot) and that process is gone (a run killed by SIGKILL can be resumed at once on the same machine),
  or when it was not renewed for :func:`lease_seconds` (a holder that died on another host: its
  successor waits that long). After writing, the lease is read back after a short pause; two runs that
  start together both see one winner's token. A renewal that finds another token marks the lease lost,
  and ``check()`` then stops the run before its next checkpoint.
  """

  def __init__(self, path, workdir: str, *, settle: float = 1.0):
    self.path, self.workdir, self.settle = path, workdir, settle
    self.seconds = lease_seconds()
    self.token = uuid.uuid4().hex
    host, pid = socket.gethostname(), os.getpid()
    self._record = dict(token=self.token, host=host, boot=_boot_id(), pid=pid,
                        holder=f"pid {pid} on {host}", seconds=self.seconds)
    self.lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _read(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # garbled: held until a lease written when it was would expire
      try:
        written = float(self.path.stat().mtime)
      except OSError:
        written = 0.0
      return dict(holder="an unreadable lease", renewed=written)

  def _write(self) -> None:
    self.path.write_text(json.dumps(dict(self._record, renewed=time.time())))

  def _free(self, cur: dict[str, Any]) -> bool:
    if cur.get("host") == socket.gethostname() and cur.get("boot") == _boot_id() and "pid" in cur:
      return not _pid_alive(int(cur["pid"]))
    return time.time() - float(cur.get("renewed", 0)) > float(cur.get("seconds", self.seconds))

  def _refuse(self, cur: dict[str, Any]) -> TrainingError:
    age = time.time() - float(cur.get("renewed", 0))
    return TrainingError(
        f"workdir {self.workdir!r} is in use by another run ({cur.get('holder', 'unknown')}, lease "
        f"renewed {max(age, 0):.0f} s ago); wait for it to end (a run that died on another host frees "
        f"it {cur.get('seconds', self.seconds):.0f} s after its last renewal), or use another workdir")

  def acquire(self) -> None:
    cur = self._read()
    if cur is not None and not self._free(cur):
      raise self._refuse(cur)
    self._write()
    time.sleep(self.settle)
    cur = self._read()
    if cur is None:
      raise TrainingError(f"workdir {self.workdir!r}: another run removed this run's lease as it "
                          "started; is a second run starting on it? Try again")
    if cur.get("token") != self.token:
      raise self._refuse(cur)
    self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
    self._thread.start()

  def renew(self) -> bool:
    """Rewrites the lease with the current time, unless another run's token is there: then marks it
    lost and returns False."""
    cur = self._read()
    if cur is not None and cur.get("token") != self.token:
      self.lost = cur.get("holder", "another run")
      return False
    self._write()
    return True

  def _renew(self) -> None:
    while not self._stop.wait(self.seconds / 4):
      try:
        if not self.renew():
          return
      except Exception:  # pylint: disable=broad-except  # a failed renewal: the next one retries
        continue

  def check(self) -> None:
    if self.lost is not None:
      raise TrainingError(f"workdir {self.workdir!r} was taken over by {self.lost} (this run's lease "
                          "lapsed); stopping before the next checkpoint")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    cur = self._read()
    if cur is not None and cur.get("token") == self.token:
      self.path.unlink(missing_ok=True)
