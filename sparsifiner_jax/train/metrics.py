"""Process-0 metric writers: JSONL (``metrics.jsonl``) and TensorBoard event files (``tb/``)."""

from __future__ import annotations

import json
import os
import time

import jax


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      import tensorflow as tf  # lazy: only the writer needs TF
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tb"))

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
      import tensorflow as tf
      with self._tb.as_default(step=int(step)):
        for k, v in clean.items():
          tf.summary.scalar(k, v)
      self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
