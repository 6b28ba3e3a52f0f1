"""Which paths the commands accept: local paths, including buckets mounted as filesystems.

Object-storage URLs (``gs://bucket/run``, ``s3://...``) are refused with one line before anything is
written: passed to the local filesystem calls they would create a folder literally named ``gs:`` on
every host. Reading and writing them directly is not implemented yet (docs/launch.md).
"""

from __future__ import annotations

import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class PathError(ValueError):
  """A path argument the commands cannot use."""


def is_url(path: str) -> bool:
  return bool(_URL.match(path))


def require_local(path: str | None, what: str) -> str | None:
  """``path`` unchanged if it is a local path (or None); a URL raises PathError naming ``what``."""
  if path is not None and is_url(str(path)):
    raise PathError(f"{what}={path!r}: object-storage URLs are not supported yet; allowed: a local "
                    "path, or the bucket mounted as a filesystem (docs/launch.md)")
  return path
