"""The one path layer: every path a command reads or writes is a local path or a ``gs://`` URL.

Paths become ``etils.epath.Path`` objects (:func:`resolve`), the layer orbax uses too, so one call
works on a local disk and in a Cloud Storage bucket. Array data in checkpoints goes through
tensorstore's own GCS driver; everything else (directories, JSON, metrics, weights metadata) through
epath's fsspec backend, i.e. ``gcsfs``. TensorFlow's ``gfile`` is not used for buckets: it cannot be
pointed at a test server, so it would be the one code path no test reaches.

What differs on a bucket (docs/reliability.md): there are no directories, renames are copies, and there
is no ``flock``. So :mod:`sparsifiner_jax.io.atomic` uploads each file in one request instead of
renaming, and :mod:`sparsifiner_jax.train.workdir` holds a lease object instead of a lock.

Test servers: ``STORAGE_EMULATOR_HOST`` (gcsfs) and ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore) point
both halves at one server; the tests start one on 127.0.0.1 (tests/gcs_server.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

# Before gcsfs or etils look at them (both read them once): epath's fsspec backend for gs:// even with
# TensorFlow installed, and plain gcsfs (its bucket-type probe needs the storage-control API and warns
# once per call when that is unreachable).
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

# No cached bucket listings: checkpoint data is written by tensorstore's own client and other processes
# write to the same workdir, so a listing cached by gcsfs could miss what they wrote.
fsspec.config.conf.setdefault("gs", {}).setdefault("cache_timeout", 0)

SCHEMES = ("gs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
# Cloud Storage bucket names: 3-63 characters of lowercase letters, digits, '-', '_' and '.', starting
# and ending with a letter or digit (names with dots may be up to 222 characters).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
ALLOWED = "a local path or gs://BUCKET/PATH"
# How long check_reachable waits for a bucket to answer. gcsfs alone retries a connection error for
# over a minute (twice over: a failed bucket GET falls back to a listing), logging each traceback.
REACH_SECONDS = 10.0


class PathError(ValueError):
  """A path argument the commands cannot use."""


def is_url(path) -> bool:
  return bool(_URL.match(os.fspath(path)))


def is_remote(path) -> bool:
  """Whether ``path`` is in object storage (no directories, no rename, no flock)."""
  return is_url(path)


def _bucket_of(path: str, what: str) -> str:
  m = _URL.match(path)
  scheme, rest = m.group(1), m.group(2)
  if scheme not in SCHEMES:
    raise PathError(f"{what}={path!r}: {scheme}:// is not supported; allowed: {ALLOWED}")
  bucket = rest.split("/", 1)[0]
  if not _BUCKET.match(bucket) or (len(bucket) > 63 and "." not in bucket):
    raise PathError(f"{what}={path!r}: {bucket!r} is not a bucket name (3-63 lowercase letters, "
                    "digits, '-', '_' or '.'); allowed: " + ALLOWED)
  return bucket


def resolve(path, what: str = "path") -> epath.Path:
  """``path`` as an ``epath.Path``: a URL checked for its scheme and bucket name (not contacted), a
  local path made absolute (``~`` expanded). Raises PathError (one line naming ``what``)."""
  path = os.fspath(path)
  if is_url(path):
    _bucket_of(path, what)
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))


class _GcsfsErrors(logging.Filter):
  """Drops every record of the ``gcsfs`` logger, keeping the last exception it reported. gcsfs logs
  each retry from inside its ``except`` block, so that exception is ``sys.exc_info()`` then."""

  def __init__(self):
    super().__init__()
    self.last: BaseException | None = None

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
    self.last = exc if exc is not None else self.last
    return False


@contextlib.contextmanager
def _quiet_gcsfs():
  """Silences gcsfs's retry log while the block runs; yields the :class:`_GcsfsErrors` filter."""
  logger = logging.getLogger("gcsfs")
  errors, level = _GcsfsErrors(), logger.level
  logger.addFilter(errors)
  logger.setLevel(logging.DEBUG)  # the retry records are debug records
  try:
    yield errors
  finally:
    logger.removeFilter(errors)
    logger.setLevel(level)


def _bucket_exists(bucket: str, seconds: float) -> bool:
  """Whether ``gs://bucket`` exists, asked for at most ``seconds`` (gcsfs retries within them, quietly).
  Raises gcsfs's error, or a TimeoutError naming the last error it retried on."""
  fs = fsspec.filesystem("gs")  # the instance epath uses (fsspec caches one per arguments)
  with _quiet_gcsfs() as errors:
    try:
      return fs.exists(bucket, timeout=seconds)  # on timeout, fsspec cancels the request
    except fsspec.exceptions.FSTimeoutError:
      last = errors.last
      cause = f"; last error {type(last).__name__}: {last}" if last is not None else ""
      raise TimeoutError(f"no answer in {seconds:g} s{cause}") from None


def check_reachable(path, what: str) -> epath.Path:
  """:func:`resolve`, and for a URL: its bucket exists and answers within :data:`REACH_SECONDS`. Call
  before writing anything, so a typo in a bucket name or an unreachable endpoint ends in one line
  (naming the error's cause) instead of a run that fails at its first checkpoint."""
  p = resolve(path, what)
  if is_remote(p):
    bucket = _bucket_of(os.fspath(p), what)
    try:
      found = _bucket_exists(bucket, REACH_SECONDS)
    except Exception as e:  # pylint: disable=broad-except  # auth, network: many types
      raise PathError(f"{what}={os.fspath(path)!r}: cannot reach bucket {bucket!r} "
                      f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    if not found:
      raise PathError(f"{what}={os.fspath(path)!r}: bucket {bucket!r} does not exist (or these "
                      "credentials cannot see it); create it first")
  return p


def require_local(path: str | None, what: str) -> str | None:
  """``path`` unchanged if it is a local path (or None); a URL raises PathError naming ``what``. For
  the few outputs that stay local (the demo's folder, compile_for's JSON, convert's files)."""
  if path is not None and is_url(str(path)):
    raise PathError(f"{what}={path!r}: this command writes local files only; allowed: a local path")
  return path
