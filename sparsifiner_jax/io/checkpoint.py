"""Training checkpoints in a workdir: orbax ``CheckpointManager`` over ``WORKDIR/ckpt``.

Each checkpoint holds the train state (student params, optimizer state, EMA, step) and a JSON ``meta``
item (phase, data position, config fingerprint, and a checksum of the state's contents). The teacher is
never saved.

What survives what (docs/reliability.md):

  * A kill mid-save: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it into place once
    complete (in a ``gs://`` bucket, which cannot rename: it writes ``<step>/commit_success.txt``
    last), so a checkpoint that looks complete is complete. Leftovers are removed when the next run
    opens the directory.
  * A damaged checkpoint (truncated, garbled or deleted files): restoring it fails, or its contents do
    not match the checksum in its meta (orbax does not notice a flipped bit in array data by itself).
    ``restore_latest_good`` then warns and falls back to the next older checkpoint; the damaged one is
    replaced when the run saves that step again.
  * Multi-process: every process calls every method in the same order (orbax synchronises them).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not match this run."""


# --------------------------------------------------------------------------------------------------
# Content checksum.


# Per leaf: sum_i bits_i * (2i + 1) mod 2**32 over its raw bits as uint32 words. Exact, so independent
# of sharding and topology; odd weights make every single-bit change (and every swap of two different
# words) change the sum. Computed on the host when every process holds whole copies of the arrays, on
# the devices (a collective) when they are sharded over processes.


def _words(x, xp):
  """The raw bits of ``x`` as a flat uint32 vector (sub-word types widened, 8-byte types split)."""
  x = xp.ravel(x)
  if x.dtype == xp.bool_:
    return x.astype(xp.uint32)
  size = x.dtype.itemsize
  if xp is np:
    return x.view(np.uint32) if size >= 4 else x.view({1: np.uint8, 2: np.uint16}[size]).astype(
        np.uint32)
  if size >= 4:
    return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
  return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _weighted_sum(words, xp):
  weights = 2 * xp.arange(words.shape[0], dtype=xp.uint32) + xp.uint32(1)
  return xp.sum(words * weights, dtype=xp.uint32)


@jax.jit
def _device_sums(leaves):
  return [_weighted_sum(_words(x, jnp), jnp) for x in leaves]


def _host_array(x):
  """``x`` as one numpy array if this process holds all of it, else None."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x.addressable_data(0) if not x.is_fully_addressable else x)
  return None


def state_checksum(state: Any) -> str:
  """A hex digest of every array in ``state`` (its paths, shapes, dtypes and exact contents).

  The same for any mesh and sharding. With arrays sharded over processes every process must call it.
  """
  paths_leaves = jax.tree_util.tree_leaves_with_path(state)
  leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            for _, x in paths_leaves]
  host = [_host_array(x) for x in leaves]
  if all(h is not None for h in host):
    sums = [_weighted_sum(_words(h, np), np) for h in host]
  else:
    sums = jax.device_get(_device_sums(leaves))
  h = hashlib.sha256(np.asarray(sums, np.uint32).tobytes())
  for path, x in paths_leaves:
    h.update(f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype};".encode())
  return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# The manager.


def _json_restore_args():
  return ocp.args.Composite(meta=ocp.args.JsonRestore())


@contextlib.contextmanager
def _quiet_absl():
  """Hides orbax's absl warnings about read-only managers (they would reach the CLI's stderr)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def read_latest_meta(directory: epath.Path) -> dict[str, Any] | None:
  """The meta of the newest checkpoint in ``directory`` (resolved: ``io.paths``) whose meta is readable,
  else None.

  Read-only: creates, cleans and changes nothing (used to refuse a workdir before writing to it).
  """
  if not directory.is_dir():
    return None
  opts = ocp.CheckpointManagerOptions(read_only=True, enable_async_checkpointing=False)
  with _quiet_absl():
    mngr = ocp.CheckpointManager(directory, options=opts)
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        return dict(mngr.restore(step, args=_json_restore_args())["meta"])
      except Exception:  # pylint: disable=broad-except  # unreadable: try an older one
        continue
    return None
  finally:
    mngr.close()


def restore_params(directory: epath.Path, abstract_params: dict[str, Any], step: int | None = None
                   ) -> tuple[int, dict[str, Any]]:
  """The ``params`` of the training state saved at ``step`` (None: the newest), as ``(step, params)``.

  ``abstract_params``: ``{part: tree of jax.ShapeDtypeStruct}`` (e.g. an eval model's ``backbone`` and
  ``predictor``); only those parts are read (not the optimizer state or EMA; an empty part, such as a
  dense model's predictor, is skipped), onto their shardings. Read-only. The state's checksum covers
  the whole state, so it is not checked here; orbax still fails on missing or truncated files. Raises
  CheckpointError (one line) for a missing step or parameters that do not fit.
  """
  path, directory = directory, os.fspath(directory)
  if not path.is_dir():
    raise CheckpointError(f"no training checkpoints: {directory!r} does not exist")
  target = dict(params={k: v for k, v in abstract_params.items() if jax.tree.leaves(v)})
  opts = ocp.CheckpointManagerOptions(read_only=True, enable_async_checkpointing=False)
  with _quiet_absl():
    mngr = ocp.CheckpointManager(path, options=opts,
                                 item_handlers=dict(state=ocp.PyTreeCheckpointHandler()))
    try:
      steps = sorted(mngr.all_steps())
      step = steps[-1] if step is None and steps else step
      if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {directory}; saved steps: {steps}")
      where = f"the checkpoint at step {step} in {directory}"
      try:
        saved = {_key_names(p): tuple(x.shape) for p, x in
                 jax.tree_util.tree_leaves_with_path(mngr.item_metadata(step)["state"])}
      except Exception as e:  # pylint: disable=broad-except  # orbax raises many types
        raise CheckpointError(f"cannot read {where}: {type(e).__name__}: {_first_words(e)}") from e
      for path, x in jax.tree_util.tree_leaves_with_path(target):   # fit first: a failed restore is noisy
        name = _key_names(path)
        if saved.get(name) != tuple(x.shape):
          found = "is missing" if name not in saved else f"has shape {saved[name]}"
          raise CheckpointError(f"the parameters do not fit the model: {'.'.join(name[1:])} {found} in "
                                f"{where}, the model's is {tuple(x.shape)}")
      args = ocp.args.PyTreeRestore(target, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(target))
      try:
        out = mngr.restore(step, args=ocp.args.Composite(state=args))
      except Exception as e:  # pylint: disable=broad-except  # damaged files
        raise CheckpointError(f"cannot read {where}: {type(e).__name__}: {_first_words(e)}") from e
      return int(step), dict(abstract_params, **out["state"]["params"])
    finally:
      mngr.close()


def _key_names(path) -> tuple[str, ...]:
  """A pytree key path as plain strings (dict keys, sequence indices and attributes alike)."""
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _first_words(e: BaseException) -> str:
  return " ".join(str(e).split())[:300]


class Checkpointer:
  """Thin wrapper so the rest of the code does not depend on orbax's moving API."""

  def __init__(self, directory: epath.Path, *, max_to_keep: int = 2, before_save=None):
    """``directory``: resolved (``io.paths``). ``before_save()``: called before each save; may raise to
    stop it (the workdir lock's check)."""
    self.directory = os.fspath(directory)
    self._before_save = before_save or (lambda: None)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                        enable_async_checkpointing=False,
                                        cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(directory, options=opts)
    self._unreadable: set[int] = set()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` at ``step`` with ``meta`` and the state's checksum, and waits for it.

    A no-op if that step is already saved, unless ``restore_latest_good`` found it unreadable: then it
    is replaced.
    """
    self._before_save()
    if step in self._mngr.all_steps():
      if step not in self._unreadable:
        return
      self._mngr.delete(step)
    self._unreadable.discard(step)
    meta = dict(meta, state_checksum=state_checksum(state))
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    return dict(self._mngr.restore(step, args=_json_restore_args())["meta"])

  def restore(self, step: int, abstract_state: Any, meta: dict[str, Any] | None = None) -> Any:
    """Restores the state at ``step``; checks it against ``meta``'s checksum when there is one."""
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    state = out["state"]
    want = (meta or {}).get("state_checksum")
    if want is not None and state_checksum(state) != want:
      raise CheckpointError(f"checkpoint at step {step} in {self.directory} does not match its "
                            "checksum (its files were changed or damaged)")
    return state

  def restore_latest_good(self, abstract_state_fn) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint; falls back to older ones with a warning.

    ``abstract_state_fn(meta) -> abstract state`` gives the target tree for a checkpoint's meta (the
    optimizer state's structure depends on the phase recorded there). Returns None when there is no
    checkpoint; raises CheckpointError when there are some but none is readable (never silently
    starts over on top of them).
    """
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        meta = self.read_meta(step)
        return step, self.restore(step, abstract_state_fn(meta), meta), meta
      except Exception as e:  # pylint: disable=broad-except  # corrupt/partial: orbax raises many types
        self._unreadable.add(step)
        first = (str(e).splitlines() or [""])[0][:200]
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying an older one",
                        step, self.directory, type(e).__name__, first)
    if steps:
      raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {steps} are all "
                            "unreadable; see the warnings); move them away or use a new workdir")
    return None

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
