"""Training checkpoints in a workdir: orbax ``CheckpointManager`` over ``WORKDIR/ckpt``.

Each checkpoint holds the train state (student params, optimizer state, EMA, step) and a JSON ``meta``
item (phase, data position, config fingerprint). Orbax writes to a temporary directory and finalizes it
atomically, so a kill mid-save never leaves a checkpoint that looks complete. The teacher is never saved.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not match this run."""


class Checkpointer:
  """Thin wrapper so the rest of the code does not depend on orbax's moving API."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, save_every: int | None = None):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                        enable_async_checkpointing=False)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts)

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` at ``step`` (a no-op if that step is already saved) and waits for it."""
    if step in self._mngr.all_steps():
      return
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, step: int, abstract_state: Any) -> Any:
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return out["state"]

  def restore_latest_good(self, abstract_state_fn) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint; falls back to older ones with a warning.

    ``abstract_state_fn(meta) -> abstract state`` gives the target tree for a checkpoint's meta (the
    optimizer state's structure depends on the phase recorded there).
    """
    for step in reversed(self.all_steps()):
      try:
        meta = self.read_meta(step)
        return step, self.restore(step, abstract_state_fn(meta)), meta
      except Exception as e:  # corrupt/partial: orbax raises many types
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying an older one",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
    return None

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
