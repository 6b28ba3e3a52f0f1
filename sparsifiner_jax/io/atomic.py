"""Atomic writes: a file or directory appears whole at its final path, or not at all.

Local paths: everything is written under ``<path>.tmp-<pid>`` beside the target and renamed into place
(``os.replace``, atomic within one filesystem); the temporary is removed if writing fails. A directory
that already exists at ``path`` is replaced.

Object storage (``gs://``) has no rename, but each object appears whole when its upload completes. So
the writer runs on a local temporary and each file is uploaded in one request. A directory is uploaded
file by file with its ``last`` file (the one readers open first, e.g. a weights directory's
``model.json``) removed first and uploaded last: readers see a directory without that file as
incomplete, never a mix read as whole. Unlike the local case, a run killed while it replaces a
directory leaves it incomplete (the previous copy is gone).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

from sparsifiner_jax.io import paths

_CHUNK = 8 << 20


def _tmp(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}"


def upload(local: str, target) -> None:
  """Copies the local file ``local`` to the object ``target`` (an epath.Path) in one upload: a failed
  copy leaves no object behind."""
  dst = target.open("wb")
  try:
    with open(local, "rb") as src:
      shutil.copyfileobj(src, dst, _CHUNK)
  except BaseException:
    getattr(dst, "discard", lambda: None)()  # gcsfs: abandon the upload instead of finishing it
    raise
  dst.close()


def write_file(path, write: Callable[[str], Any]) -> str:
  """Calls ``write(tmp_path)`` (which creates a local file) and moves it to ``path``; returns ``path``
  made absolute. Parent directories are created."""
  target = paths.resolve(path)
  if paths.is_remote(target):
    with tempfile.TemporaryDirectory() as d:
      tmp = os.path.join(d, target.name)
      write(tmp)
      upload(tmp, target)
    return os.fspath(target)
  path = os.fspath(target)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _tmp(path)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_dir(path, write: Callable[[str], Any], *, last: str | None = None) -> str:
  """Calls ``write(tmp_dir)`` on a new empty local directory and moves it to ``path`` (replacing what
  was there); returns ``path`` made absolute. ``last``: on object storage, the file removed first and
  uploaded last (see the module docstring)."""
  target = paths.resolve(path)
  if paths.is_remote(target):
    with tempfile.TemporaryDirectory() as d:
      write(d)
      _upload_dir(d, target, last)
    return os.fspath(target)
  path = os.fspath(target)
  tmp = _tmp(path)
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def _upload_dir(local: str, target, last: str | None) -> None:
  files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
  if last is not None:
    if last not in files:
      raise ValueError(f"write_dir: the writer made no {last!r}")
    files.remove(last)
    files.append(last)
    (target / last).unlink(missing_ok=True)
  if target.exists():
    target.rmtree()
  for rel in files:
    upload(os.path.join(local, rel), target / rel)


def write_text(path, text: str) -> str:
  """``text`` to ``path``, atomically."""
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  return write_file(path, write)


def write_json(path, obj: Any, **dump_kwargs) -> str:
  """``obj`` as indented JSON to ``path``, atomically (``dump_kwargs`` go to ``json.dumps``)."""
  return write_text(path, json.dumps(obj, indent=1, **dump_kwargs) + "\n")
