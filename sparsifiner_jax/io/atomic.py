"""Atomic writes: a file or directory appears whole at its final path, or not at all.

Everything is written under ``<path>.tmp-<pid>`` beside the target and renamed into place
(``os.replace``, atomic within one filesystem); the temporary is removed if writing fails. A directory
that already exists at ``path`` is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable


def _tmp(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}"


def write_file(path: str, write: Callable[[str], Any]) -> str:
  """Calls ``write(tmp_path)`` (which creates the file) and renames it to ``path``; returns ``path``
  made absolute. Parent directories are created."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _tmp(path)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_dir(path: str, write: Callable[[str], Any]) -> str:
  """Calls ``write(tmp_dir)`` on a new empty directory and moves it to ``path`` (replacing what was
  there); returns ``path`` made absolute."""
  path = os.path.abspath(path)
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


def write_text(path: str, text: str) -> str:
  """``text`` to ``path``, atomically."""
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  return write_file(path, write)


def write_json(path: str, obj: Any, **dump_kwargs) -> str:
  """``obj`` as indented JSON to ``path``, atomically (``dump_kwargs`` go to ``json.dumps``)."""
  return write_text(path, json.dumps(obj, indent=1, **dump_kwargs) + "\n")
