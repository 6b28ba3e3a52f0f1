"""Process-0 metric writers: JSONL (``metrics.jsonl``) and TensorBoard event files (``tb/``).

Both are append-only logs written through the path layer, so a workdir in a bucket gets them too. The
event files are written here (TensorBoard's record framing, scalar summaries), not by ``tf.summary``,
whose writer only reaches buckets through TensorFlow's own GCS client.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time

import jax
from etils import epath

from sparsifiner_jax.io import paths


class AppendLog:
  """An append-only file. Local: opened for appending, flushed after each record. Object storage (no
  appends): the content is kept in memory and the object rewritten whole at each flush, so readers
  see every record up to the last flush and never a torn one."""

  def __init__(self, path: epath.Path, *, binary: bool = False):
    """``path``: resolved (``io.paths``)."""
    self.path = path
    self._remote = paths.is_remote(self.path)
    if self._remote:
      self._buf = io.BytesIO(self.path.read_bytes() if self.path.exists() else b"")
      self._buf.seek(0, io.SEEK_END)
      self._binary = binary
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "ab" if binary else "a")  # pylint: disable=consider-using-with

  def write(self, data) -> None:
    if self._remote:
      self._buf.write(data if self._binary else data.encode())
    else:
      self._file.write(data)

  def flush(self) -> None:
    if self._remote:
      self.path.write_bytes(self._buf.getvalue())
    else:
      self._file.flush()

  def close(self) -> None:
    if self._remote:
      self.flush()
    else:
      self._file.close()


class EventLog:
  """A TensorBoard event file of scalar summaries (``events.out.tfevents.<time>.<host>``)."""

  def __init__(self, directory: epath.Path):
    """A new event file in ``directory`` (resolved: ``io.paths``)."""
    # Deferred: the protobufs and framing come with the tensorboard package (no TensorFlow import).
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.summary.writer import record_writer  # pylint: disable=import-outside-toplevel
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    now = time.time()
    name = f"events.out.tfevents.{now:.0f}.{socket.gethostname()}.{os.getpid()}"
    self._log = AppendLog(directory / name, binary=True)
    self._records = record_writer.RecordWriter(self._log)
    self._write(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def scalars(self, step: int, values: dict[str, float]) -> None:
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._log.flush()

  def close(self) -> None:
    self._log.close()


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: epath.Path, *, tensorboard: bool = True):
    """``workdir``: resolved (``io.paths``)."""
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    self._jsonl = AppendLog(workdir / "metrics.jsonl")
    if tensorboard:
      self._tb = EventLog(workdir / "tb")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    clean = {}
    for k, v in scalars.items():
      if isinstance(v, (list, tuple)):  # per-layer values -> key/0, key/1, ...
        clean.update({f"{k}/{i}": float(x) for i, x in enumerate(v)})
      elif v is not None:
        clean[k] = float(v)
    self._jsonl.write(json.dumps(dict(step=int(step), time=time.time(), **clean)) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.scalars(step, clean)

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
